"""Rewrite a language model's loss region of the joint graph to run in chunks of rows
(`runtime.chunked_loss`), so that no tensor the size of the logits is ever alive.

The region, as autograd traces ``cross_entropy(lm_head(hidden), labels)`` (HF's
``ForCausalLMLoss`` included, under autocast or not)::

    forward:  mm(hidden, weight_t) -> [views, one dtype cast] -> _log_softmax(dim 1)
              -> nll_loss_forward(., target, weight=None, mean or sum, ignore_index)
    backward: nll_loss_backward -> _log_softmax_backward_data -> [views, one cast]
              -> mm(grad_logits, weight_t.t())          (gradient of hidden)
              -> mm(grad_logits.t(), hidden)            (gradient of the weight)

becomes one ``memsched::linear_cross_entropy`` in the forward and one
``memsched::linear_cross_entropy_backward`` in the backward. Everything else in the graph,
and every node the region's ends feed, is left as it was. A region whose intermediate
values have any other user (logits returned beside the loss, a frozen head with no weight
gradient, a class-weighted loss) is left alone.

This is op splitting, not a keep-or-recompute decision, so it is opt-in:
``optimize(..., chunked_loss=True)``. Losses and gradients then equal eager's to rounding,
not bitwise (`runtime.chunked_loss`). O(nodes) per rewrite.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from planner.capture import CapturedStep, OutputLeaf, Role, _eliminate_dead_code
from planner.errors import OptionError
from runtime import chunked_loss as chunked_loss_ops

log = logging.getLogger(__name__)
aten = torch.ops.aten

_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_ALIASES = {aten.detach.default, aten.alias.default}


@dataclass(frozen=True)
class _Region:
    hidden: fx.Node           # rows x width, the matmul's left operand
    weight_t: fx.Node         # width x vocabulary, its right operand
    target: fx.Node           # rows, int64
    reduction: int
    ignore_index: int
    logits_dtype: torch.dtype
    loss: fx.Node             # nll_loss_forward
    loss_backward: fx.Node    # nll_loss_backward
    grad_hidden: fx.Node      # mm(grad_logits, weight_t.t())
    grad_weight: fx.Node      # mm(grad_logits.t(), hidden)
    returned_logits: tuple[fx.Node, ...]   # region nodes the step also returns (the model's logits)


def chunk_rows_option(chunked_loss: bool | int) -> int | None:
    """The rows per chunk that ``chunked_loss=`` asks for (None: the default, or off).

    Raises:
        OptionError: neither a bool nor a positive int.
    """
    if isinstance(chunked_loss, bool):
        return None
    if not isinstance(chunked_loss, int) or chunked_loss < 1:
        raise OptionError(f"chunked_loss={chunked_loss!r}; give True (chunks of at most "
                          f"{chunked_loss_ops.DEFAULT_CHUNK_BYTES >> 20} MiB of float32 logits) or a positive "
                          "number of rows per chunk")
    return chunked_loss


def chunk_linear_cross_entropy(step: CapturedStep, chunk_rows: int | None = None) -> int:
    """Rewrite every linear + cross-entropy region of ``step``'s joint graph in place (see
    the module docstring); return how many were rewritten. ``chunk_rows`` is the rows per
    chunk (default: `runtime.chunked_loss.default_chunk_rows`).

    Raises:
        OptionError: ``chunk_rows`` is not a positive int, or the graph has no such region.
    """
    if chunk_rows is not None:
        chunk_rows_option(chunk_rows)
    graph = step.joint.graph
    regions = [region for node in list(graph.nodes)
               if node.op == "call_function" and node.target is aten.nll_loss_forward.default
               for region in [_match(node, step)] if region is not None]
    if not regions:
        raise OptionError(
            f"chunked_loss: {step.model_name or 'the model'}'s step has no linear layer followed by a cross-entropy "
            "whose logits are used by nothing else (the model must return the loss, not the logits beside it, and "
            "the head must be trained without class weights); drop chunked_loss")
    for region in regions:
        _rewrite(step, region, chunk_rows)
    _eliminate_dead_code(step.joint)
    alive = {node.name for node in graph.nodes}
    for table in (step.roles, step.modules):
        for name in [name for name in table if name not in alive]:
            del table[name]
    log.info("chunked %d linear + cross-entropy region(s) of %s", len(regions), step.model_name)
    return len(regions)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _value(node: fx.Node) -> torch.Tensor | None:
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def _row_preserving(node: fx.Node, vocabulary: int) -> bool:
    """A reshape that keeps the vocabulary as the last, contiguous dimension, or a cast
    of the dtype alone."""
    value, source = _value(node), _value(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if value is None or source is None or value.shape[-1] != vocabulary or not value.is_contiguous():
        return False
    if node.target in _RESHAPES:
        return True
    return (node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype", "layout", "device"}
            and value.device == source.device and value.layout == source.layout)


def _match(loss: fx.Node, step: CapturedStep) -> _Region | None:
    """The region ending in this ``nll_loss_forward``, or None if any check fails."""
    log_probabilities, target, class_weight, reduction, ignore_index = (list(loss.args) + [1, -100])[:5]
    if (class_weight is not None or reduction not in (1, 2) or not isinstance(log_probabilities, fx.Node)
            or log_probabilities.target is not aten._log_softmax.default
            or log_probabilities.args[1] not in (1, -1) or log_probabilities.args[2]
            or step.roles.get(loss.name) is not Role.FORWARD):
        return None
    logits_value = _value(log_probabilities)
    if logits_value is None or logits_value.dim() != 2:
        return None
    vocabulary = logits_value.shape[1]
    returned = []                                          # the logits as the model returns them
    node, consumer = log_probabilities.args[0], log_probabilities
    while isinstance(node, fx.Node):                       # back through reshapes and a cast to the matmul
        others = set(node.users) - {consumer}
        if others and not all(user.op == "output" for user in others):
            return None
        if others:
            returned.append(node)
        if node.target is aten.mm.default:
            break
        if not _row_preserving(node, vocabulary):
            return None
        node, consumer = node.args[0], node
    if not isinstance(node, fx.Node):
        return None
    matmul = node
    hidden, weight_t = matmul.args
    if _value(matmul) is None or not _value(matmul).is_contiguous() or _value(hidden) is None:
        return None
    # the log-probabilities feed the loss, its backward and the log-softmax's backward only
    aliases, frontier = {log_probabilities}, [log_probabilities]
    while frontier:
        for user in frontier.pop().users:
            if user.target in _ALIASES and user not in aliases:
                aliases.add(user)
                frontier.append(user)
    users = {user for alias in aliases for user in alias.users} - aliases
    loss_backward = next((u for u in users if u.target is aten.nll_loss_backward.default), None)
    softmax_backward = next((u for u in users if u.target is aten._log_softmax_backward_data.default), None)
    if users != {loss, loss_backward, softmax_backward} or None in (loss_backward, softmax_backward):
        return None
    total_weight = next((u for u in loss.users if u.target is operator.getitem and u.args[1] == 1), None)
    if (list(loss_backward.args[2:6]) != [target, None, reduction, ignore_index]
            or loss_backward.args[6] is not total_weight or _single_user(loss_backward) is not softmax_backward
            or softmax_backward.args[0] is not loss_backward):
        return None
    node = softmax_backward                                # forward through reshapes and a cast
    while True:
        user = _single_user(node)
        if user is None or not _row_preserving(user, vocabulary):
            break
        node = user
    grad_logits = node
    if _value(grad_logits) is None or _value(grad_logits).dim() != 2 or _value(grad_logits).dtype != _value(hidden).dtype:
        return None
    grad_hidden = grad_weight = None
    for user in grad_logits.users:
        if (user.target is aten.mm.default and user.args[0] is grad_logits and user.args[1].target is aten.t.default
                and user.args[1].args[0] is weight_t):
            grad_hidden = user
        elif user.target is aten.t.default and len(user.users) == 1:
            product = _single_user(user)
            if product.target is aten.mm.default and product.args[0] is user and product.args[1] is hidden:
                grad_weight = product
    if grad_hidden is None or grad_weight is None or len(grad_logits.users) != 2:
        return None
    return _Region(hidden=hidden, weight_t=weight_t, target=target, reduction=reduction, ignore_index=ignore_index,
                   logits_dtype=logits_value.dtype, loss=loss, loss_backward=loss_backward,
                   grad_hidden=grad_hidden, grad_weight=grad_weight, returned_logits=tuple(returned))


def _rewrite(step: CapturedStep, region: _Region, chunk_rows: int | None) -> None:
    graph = step.joint.graph
    hidden_value, weight_value = _value(region.hidden), _value(region.weight_t)
    rows = chunk_rows or chunked_loss_ops.default_chunk_rows(weight_value.shape[1], hidden_value.shape[0])
    options = (region.reduction, region.ignore_index, region.logits_dtype, rows)
    fake_mode = hidden_value.fake_mode
    with graph.inserting_before(region.loss):
        forward = graph.call_function(chunked_loss_ops.FORWARD, (region.hidden, region.weight_t, region.target, *options))
    region.loss.replace_all_uses_with(forward)
    grad_loss, total_weight = region.loss_backward.args[0], region.loss_backward.args[6]
    with graph.inserting_before(region.loss_backward):
        backward = graph.call_function(chunked_loss_ops.BACKWARD, (grad_loss, region.hidden, region.weight_t,
                                                                region.target, total_weight, *options))
        grad_hidden = graph.call_function(operator.getitem, (backward, 0))
        grad_weight = graph.call_function(operator.getitem, (backward, 1))
    _stop_returning(step, region.returned_logits)
    region.grad_hidden.replace_all_uses_with(grad_hidden)
    region.grad_weight.replace_all_uses_with(grad_weight)
    with fake_mode:                              # each new node's value, from its arguments' traced values
        for node in (forward, backward):
            node.meta["val"] = node.target(*fx.node.map_arg(node.args, lambda argument: argument.meta["val"]))
    grad_hidden.meta["val"], grad_weight.meta["val"] = backward.meta["val"]
    for new, old, role in ((forward, region.loss, Role.FORWARD), (backward, region.loss_backward, Role.BACKWARD),
                           (grad_hidden, region.grad_hidden, Role.BACKWARD),
                           (grad_weight, region.grad_weight, Role.BACKWARD)):
        step.roles[new.name] = role
        step.modules[new.name] = step.modules.get(old.name, "")


def _stop_returning(step: CapturedStep, nodes: tuple[fx.Node, ...]) -> None:
    """The step returns None where it returned one of ``nodes`` (the logits), as
    Liger-Kernel's fused loss does in training: they are never made whole."""
    output = next(node for node in step.joint.graph.nodes if node.op == "output")
    outputs = list(output.args[0])
    tensor_count = step.num_tensor_outputs
    dropped = [position for position in range(tensor_count) if outputs[position] in nodes]
    if not dropped:
        return
    leaves, position = [], 0
    for leaf in step.output_leaves:
        if leaf.is_tensor:
            if position in dropped:
                leaf = OutputLeaf(is_tensor=False, constant=None)
            position += 1
        leaves.append(leaf)
    step.output_leaves = leaves
    output.args = ([value for position, value in enumerate(outputs) if position not in dropped],)
