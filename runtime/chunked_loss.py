"""A language model's last linear layer and its cross-entropy, run a chunk of rows at a time.

``loss = cross_entropy(hidden @ weight_t, target)`` as eager autograd runs it keeps
tensors the size of the logits (rows x vocabulary) alive: the logits, their float32
upcast and log-softmax (saved for the backward), and in the backward the gradients of
each. With a vocabulary of 50-130 thousand words these dominate a training step's peak
once the blocks are checkpointed, and no keep-or-recompute decision can lower them: they
are one op's working set. The two ops here replace that region of the joint graph
(`planner.chunked_loss` rewrites it):

* ``memsched::linear_cross_entropy`` (forward) computes the loss ``chunk_rows`` rows at a
  time and saves nothing but its inputs;
* ``memsched::linear_cross_entropy_backward`` recomputes each chunk's logits and
  log-softmax and returns the gradients of ``hidden`` and of ``weight_t`` (transposed, as
  the joint graph's matmul makes it).

So the logits' memory becomes one chunk's (``chunk_scratch_bytes``), for an extra matmul
of the logits in the backward. The idea is the one of Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and of Cut Cross-Entropy (Wijmans et
al. 2025, arXiv:2411.09009), which recompute the logits blockwise; here each chunk runs
the same aten kernels as the eager region (``mm``, the upcast, ``_log_softmax``,
``nll_loss_forward``/``_backward``, ``_log_softmax_backward_data``), so every row's
log-probabilities and logit gradients are bitwise the eager ones. The sums over rows are
not: the loss is a sum of per-chunk sums and the weight's gradient a sum of per-chunk
matmuls (accumulated in float32), so both equal eager's to rounding, not bitwise.

Cost: O(rows x vocabulary x width) time, one extra forward matmul; memory O(chunk_rows x
vocabulary) beside the outputs.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

# float32 logits of one chunk, when the caller does not choose the rows per chunk
DEFAULT_CHUNK_BYTES = 64 * 2**20


# and at least this many chunks, so that a small step's loss is split too
DEFAULT_MIN_CHUNKS = 8


def default_chunk_rows(vocabulary: int, rows: int) -> int:
    """Rows per chunk: float32 logits of at most `DEFAULT_CHUNK_BYTES`, and at least
    `DEFAULT_MIN_CHUNKS` chunks."""
    return max(1, min(-(-rows // DEFAULT_MIN_CHUNKS), DEFAULT_CHUNK_BYTES // (4 * vocabulary)))


def _chunks(rows: int, chunk_rows: int) -> range:
    return range(0, rows, max(1, chunk_rows))


def _log_probabilities(hidden: torch.Tensor, weight_t: torch.Tensor, logits_dtype: torch.dtype) -> torch.Tensor:
    logits = aten.mm(hidden, weight_t)
    if logits.dtype != logits_dtype:
        logits = aten._to_copy(logits, dtype=logits_dtype)
    return aten._log_softmax(logits, 1, False)


@torch.library.custom_op("memsched::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: torch.Tensor, weight_t: torch.Tensor, target: torch.Tensor, reduction: int,
                         ignore_index: int, logits_dtype: torch.dtype,
                         chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nll_loss_forward(log_softmax(hidden @ weight_t), target)``: (loss, total weight).
    ``reduction`` is aten's (0 none is not supported, 1 mean, 2 sum)."""
    loss = torch.zeros((), dtype=logits_dtype, device=hidden.device)
    total_weight = torch.zeros((), dtype=logits_dtype, device=hidden.device)
    for start in _chunks(hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        log_probabilities = _log_probabilities(hidden[rows], weight_t, logits_dtype)
        chunk_loss, chunk_weight = aten.nll_loss_forward(log_probabilities, target[rows], None, 2, ignore_index)
        del log_probabilities
        loss += chunk_loss
        total_weight += chunk_weight
    if reduction == 1:
        loss = loss / total_weight
    return loss, total_weight


@linear_cross_entropy.register_fake
def _(hidden, weight_t, target, reduction, ignore_index, logits_dtype, chunk_rows):
    return hidden.new_empty((), dtype=logits_dtype), hidden.new_empty((), dtype=logits_dtype)


@torch.library.custom_op("memsched::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight_t: torch.Tensor,
                                  target: torch.Tensor, total_weight: torch.Tensor, reduction: int,
                                  ignore_index: int, logits_dtype: torch.dtype,
                                  chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `linear_cross_entropy`'s loss: of ``hidden`` (rows x width) and of
    ``weight_t`` transposed (vocabulary x width, as ``mm(grad_logits.t(), hidden)`` gives it)."""
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    accumulate_dtype = torch.promote_types(hidden.dtype, torch.float32)
    grad_weight = torch.zeros((weight_t.shape[1], hidden.shape[1]), dtype=accumulate_dtype, device=hidden.device)
    weight = weight_t.t()
    for start in _chunks(hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        log_probabilities = _log_probabilities(hidden[rows], weight_t, logits_dtype)
        grad_log_probabilities = aten.nll_loss_backward(grad_loss, log_probabilities, target[rows], None, reduction,
                                                        ignore_index, total_weight)
        grad_logits = aten._log_softmax_backward_data(grad_log_probabilities, log_probabilities, 1, logits_dtype)
        del grad_log_probabilities, log_probabilities
        if grad_logits.dtype != hidden.dtype:
            grad_logits = aten._to_copy(grad_logits, dtype=hidden.dtype)
        grad_hidden[rows] = aten.mm(grad_logits, weight)
        if grad_weight.dtype == hidden.dtype:
            grad_weight.addmm_(grad_logits.t(), hidden[rows])
        else:                       # a 16-bit product, summed in float32
            grad_weight += aten.mm(grad_logits.t(), hidden[rows])
        del grad_logits
    if grad_weight.dtype != hidden.dtype:
        grad_weight = grad_weight.to(hidden.dtype)
    return grad_hidden, grad_weight


@linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight_t, target, total_weight, reduction, ignore_index, logits_dtype, chunk_rows):
    return (hidden.new_empty(hidden.shape),
            hidden.new_empty((weight_t.shape[1], hidden.shape[1])))


FORWARD = torch.ops.memsched.linear_cross_entropy.default
BACKWARD = torch.ops.memsched.linear_cross_entropy_backward.default


def _shapes(target, args: tuple) -> tuple[int, int, int, torch.dtype, torch.dtype, int]:
    """(rows, width, vocabulary, hidden dtype, logits dtype, rows per chunk) of a call."""
    hidden, weight_t = (args[0], args[1]) if target is FORWARD else (args[1], args[2])
    logits_dtype, chunk_rows = args[-2], args[-1]
    return hidden.shape[0], hidden.shape[1], weight_t.shape[1], hidden.dtype, logits_dtype, max(1, chunk_rows)


def chunk_scratch_bytes(target, args: tuple) -> int:
    """Bytes a call allocates beside its outputs, at most: one chunk's logits in two
    dtypes at once (the forward's upcast, then its log-softmax), three float32 chunks in
    the backward (log-probabilities and both gradients), and with 16-bit hidden states the
    backward's float32 accumulator of the weight's gradient and each chunk's 16-bit product."""
    rows, width, vocabulary, hidden_dtype, logits_dtype, chunk_rows = _shapes(target, args)
    chunk = min(rows, chunk_rows) * vocabulary
    hidden_size = hidden_dtype.itemsize
    logits_size = logits_dtype.itemsize
    if target is FORWARD:
        return chunk * max(hidden_size + logits_size, 2 * logits_size) + 2 * logits_size   # + the sums
    accumulator = vocabulary * width * (4 + hidden_size) if hidden_size < 4 else 0
    return chunk * 3 * logits_size + accumulator


def chunk_flops(target, args: tuple) -> int:
    """Matmul FLOPs of a call: the logits (forward); the logits again and the two
    gradients (backward)."""
    rows, width, vocabulary, *_ = _shapes(target, args)
    logits_flops = 2 * rows * width * vocabulary
    return logits_flops if target is FORWARD else 3 * logits_flops


def chunk_bytes_moved(target, args: tuple) -> int:
    """Memory traffic of a call: the operands, and each chunk's logits written and read
    by the upcast, the log-softmax and the loss (forward; twice as many in the backward)."""
    rows, width, vocabulary, hidden_dtype, logits_dtype, _ = _shapes(target, args)
    hidden_size = hidden_dtype.itemsize
    logits_size = logits_dtype.itemsize
    operands = (rows + vocabulary) * width * hidden_size
    per_pass = rows * vocabulary * (2 * hidden_size + 4 * logits_size)
    return operands + (per_pass if target is FORWARD else 2 * per_pass + vocabulary * width * 8)


def chunk_kernels(target, args: tuple) -> int:
    """Kernels a call launches: per chunk, the matmul, upcast, log-softmax and loss
    (forward), and those with the loss's and the log-softmax's backwards, the downcast
    and two matmuls and a sum (backward)."""
    rows, *_, chunk_rows = _shapes(target, args)
    chunks = -(-rows // chunk_rows)
    return chunks * (4 if target is FORWARD else 9)
