"""The chunked loss (`runtime.chunked_loss`, `planner.chunked_loss`): the ops equal the eager
region they replace, the rewrite keeps the step's loss and gradients, the logits are never
whole, the budget holds as measured, and the estimate sees the same graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from planner import optimize
from planner.capture import capture
from planner.chunked_loss import chunk_linear_cross_entropy
from planner.errors import OptionError
from planner.estimate import estimated_graph
from planner.memory import measure_allocator_peak
from planner.roofline import op_flops, op_time_ms
from runtime import chunked_loss
from solvers.targets import device_target

aten = torch.ops.aten


class TinyLM(torch.nn.Module):
    """Embedding, one MLP block, an untied head and ``cross_entropy``: the loss region of a
    language model, without transformers."""

    def __init__(self, vocabulary: int = 500, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, width)
        self.block = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                         torch.nn.Linear(4 * width, width))
        self.head = torch.nn.Linear(width, vocabulary, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = hidden + self.block(hidden)
        logits = self.head(hidden)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def _eager_region(hidden, weight_t, target, reduction, grad_loss):
    logits = aten._to_copy(aten.mm(hidden, weight_t), dtype=torch.float32)
    log_probabilities = aten._log_softmax(logits, 1, False)
    loss, total_weight = aten.nll_loss_forward(log_probabilities, target, None, reduction, -100)
    grad = aten.nll_loss_backward(grad_loss, log_probabilities, target, None, reduction, -100, total_weight)
    grad_logits = aten._log_softmax_backward_data(grad, log_probabilities, 1, torch.float32).to(hidden.dtype)
    return loss, total_weight, aten.mm(grad_logits, weight_t.t()), aten.mm(grad_logits.t(), hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", [1, 2])
def test_the_chunked_ops_equal_the_eager_region(dtype, reduction) -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16, dtype=dtype), torch.randn(53, 16, dtype=dtype)
    target = torch.randint(0, 53, (37,))
    target[[3, 20]] = -100                                   # ignored rows
    grad_loss = torch.tensor(1.3)
    expected = _eager_region(hidden, weight.t(), target, reduction, grad_loss)
    for chunk_rows in (37, 100):                             # one chunk: the same kernels on the same rows
        loss, total_weight = chunked_loss.linear_cross_entropy(hidden, weight.t(), target, reduction, -100,
                                                               torch.float32, chunk_rows)
        grads = chunked_loss.linear_cross_entropy_backward(grad_loss, hidden, weight.t(), target, total_weight,
                                                           reduction, -100, torch.float32, chunk_rows)
        for got, want in zip((loss, total_weight, *grads), expected):
            assert torch.equal(got, want)
    for chunk_rows in (1, 5, 16):                            # several: sums over rows taken in chunks
        loss, total_weight = chunked_loss.linear_cross_entropy(hidden, weight.t(), target, reduction, -100,
                                                               torch.float32, chunk_rows)
        grad_hidden, grad_weight = chunked_loss.linear_cross_entropy_backward(
            grad_loss, hidden, weight.t(), target, total_weight, reduction, -100, torch.float32, chunk_rows)
        assert total_weight.item() == 35
        torch.testing.assert_close(loss, expected[0])
        torch.testing.assert_close(grad_hidden, expected[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_weight.float(), expected[3].float(),
                                   **({} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}))


def test_the_rewrite_replaces_the_loss_region_and_keeps_the_step() -> None:
    torch.manual_seed(0)
    model, ids = TinyLM(), torch.randint(0, 500, (4, 16))
    step = capture(model, (ids,), {"labels": ids})
    assert chunk_linear_cross_entropy(step, chunk_rows=8) == 1
    targets = [node.target for node in step.joint.graph.nodes if node.op == "call_function"]
    assert chunked_loss.FORWARD in targets and chunked_loss.BACKWARD in targets
    assert aten._log_softmax.default not in targets and aten.nll_loss_forward.default not in targets
    assert set(step.roles) == {node.name for node in step.joint.graph.nodes if node.name in step.roles}

    scheduled_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = optimize(scheduled_model, 1.0, (ids,), example_kwargs={"labels": ids}, chunked_loss=8)
    loss = scheduled(ids, labels=ids)
    loss.backward()
    loss_reference = reference(ids, labels=ids)
    loss_reference.backward()
    torch.testing.assert_close(loss, loss_reference)
    for (name, p), (_, q) in zip(scheduled_model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"grad {name}: {m}")


def test_a_chunked_step_peaks_lower_and_within_its_budget_as_measured() -> None:
    """Keep-all with the loss chunked peaks below eager's (the logits are never whole), and
    plans at lower budgets run within them, as the allocator's events measure."""
    torch.manual_seed(0)
    model, ids = TinyLM(vocabulary=4000, width=32), torch.randint(0, 4000, (4, 64))
    reference = copy.deepcopy(model)

    def eager_step():
        reference(ids, labels=ids).backward()
    eager_step()
    reference.zero_grad(set_to_none=True)
    _, eager_peak = measure_allocator_peak(eager_step, list(reference.parameters()) + [ids])
    for budget in (eager_peak, int(eager_peak * 0.55)):
        scheduled = optimize(copy.deepcopy(model), budget, (ids,), example_kwargs={"labels": ids}, chunked_loss=True)

        def step():
            scheduled(ids, labels=ids).backward()
        step()
        scheduled.module.zero_grad(set_to_none=True)
        _, peak = measure_allocator_peak(step, list(scheduled.module.parameters()) + [ids])
        assert peak == scheduled.plan.predicted_peak_bytes
        assert peak <= budget
        assert peak < 0.6 * eager_peak
    with pytest.raises(Exception, match="least feasible"):       # the same budget without chunking
        optimize(copy.deepcopy(model), int(eager_peak * 0.55), (ids,), example_kwargs={"labels": ids})


def test_the_estimate_sees_the_chunked_graph_that_optimize_profiles() -> None:
    torch.manual_seed(0)
    model, ids = TinyLM(), torch.randint(0, 500, (4, 16))
    scheduled = optimize(copy.deepcopy(model), 1.0, (ids,), example_kwargs={"labels": ids}, chunked_loss=8)
    _, graph = estimated_graph(model, (ids,), target="h100-sxm", example_kwargs={"labels": ids}, chunked_loss=8)
    assert [op.name for op in graph.ops] == [op.name for op in scheduled.graph.ops]
    assert ([(v.name, v.size_bytes, v.alias_of) for v in graph.values]
            == [(v.name, v.size_bytes, v.alias_of) for v in scheduled.graph.values])
    measured = {op.name: op.tmp_bytes for op in scheduled.graph.ops if op.target.startswith("memsched.")}
    estimated = {op.name: op.tmp_bytes for op in graph.ops if op.target.startswith("memsched.")}
    assert set(measured) == set(estimated) and len(measured) == 2
    for name, scratch_bytes in measured.items():               # the formula bounds this machine's scratch
        assert 0 < scratch_bytes <= estimated[name]


def test_chunked_ops_are_priced_by_their_matmuls() -> None:
    hidden, weight_t, target = torch.empty(64, 32), torch.empty(32, 1000), torch.zeros(64, dtype=torch.long)
    forward_args = (hidden, weight_t, target, 1, -100, torch.float32, 16)
    backward_args = (torch.empty(()), hidden, weight_t, target, torch.empty(()), 1, -100, torch.float32, 16)
    assert op_flops(chunked_loss.FORWARD, forward_args, {}, None) == 2 * 64 * 32 * 1000
    assert op_flops(chunked_loss.BACKWARD, backward_args, {}, None) == 3 * 2 * 64 * 32 * 1000
    h100 = device_target("h100-sxm")
    forward_ms = op_time_ms(chunked_loss.FORWARD, forward_args, {}, None, h100)
    backward_ms = op_time_ms(chunked_loss.BACKWARD, backward_args, {}, None, h100)
    assert 0 < forward_ms < backward_ms


@pytest.mark.parametrize("chunked", [0, -3, 2.5, "yes"])
def test_a_bad_chunked_loss_is_refused_before_tracing(chunked) -> None:
    model, ids = TinyLM(), torch.randint(0, 500, (2, 8))
    with pytest.raises(OptionError, match="chunked_loss="):
        optimize(model, 1.0, (ids,), example_kwargs={"labels": ids}, chunked_loss=chunked)


def test_a_step_without_a_cross_entropy_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(OptionError, match="no linear layer followed by a cross-entropy"):
        optimize(model, 1.0, (torch.randn(4, 8),), chunked_loss=True)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("autocast", [False, True])
def test_transformers_language_models_train_alike_with_a_chunked_loss(architecture, autocast) -> None:
    """HF's ``ForCausalLMLoss`` (upcast, padded labels, tied or untied head): the loss and
    every gradient as the plain model's, to rounding; ``logits`` is None (never whole)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config).train()
    else:
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=64, vocab_size=97,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 97, (2, 8))
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        scheduled = optimize(model, 0.9, (ids,), example_kwargs={"labels": ids}, chunked_loss=5,
                             release_outputs=True)
        output = scheduled(ids, labels=ids)
        expected = reference(ids, labels=ids)
    assert output.logits is None
    output.loss.backward()
    expected.loss.backward()
    tolerance = {"rtol": 2e-2, "atol": 4e-3} if autocast else {}
    torch.testing.assert_close(output.loss, expected.loss, **tolerance)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tolerance, msg=lambda m, name=name: f"grad {name}: {m}")


def test_the_estimate_cli_chunks_the_loss_on_request(capsys) -> None:
    pytest.importorskip("transformers")
    from planner.estimate_cli import main
    import json

    reports = {}
    for flags in ([], ["--chunked-loss"]):
        assert main(["gpt2", "--batch", "4", "--seq", "256", "--autocast", "bf16", "--json", "--no-progress",
                     *flags]) == 0
        reports[bool(flags)] = json.loads(capsys.readouterr().out)
    assert reports[True]["chunked_loss"] and not reports[False]["chunked_loss"]
    assert reports[True]["peak_bytes"] < reports[False]["peak_bytes"]
    assert reports[True]["step_time_ms"] > reports[False]["step_time_ms"]     # the logits' matmul once more


def test_new_shapes_are_chunked_and_planned_within_the_budget() -> None:
    """A training loop's later signatures are chunked too, and sized on fake tensors from
    the first profile (`planner.reuse`): each step peaks as predicted, within the budget."""
    torch.manual_seed(0)
    model, ids = TinyLM(vocabulary=2000), torch.randint(0, 2000, (4, 32))
    reference = copy.deepcopy(model)
    budget_bytes = 3_000_000
    scheduled = optimize(model, budget_bytes, (ids,), example_kwargs={"labels": ids}, chunked_loss=True)
    for shape in [(3, 48), (2, 20)]:
        batch = torch.randint(0, 2000, shape)
        scheduled.prepare(batch, labels=batch)
        model.zero_grad(set_to_none=True)
        _, peak = measure_allocator_peak(lambda: scheduled(batch, labels=batch).backward(),
                                         list(model.parameters()) + [batch])
        assert chunked_loss.FORWARD in [node.target for node in scheduled._step.joint.graph.nodes]
        assert peak == scheduled.plan.predicted_peak_bytes <= budget_bytes
        reference.zero_grad(set_to_none=True)
        reference(batch, labels=batch).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
