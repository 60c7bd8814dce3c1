"""memsched adds no memory of its own (docs/design.md, invariant 6), measured with the allocator's
own events (`planner.memory.measure_allocator_peak`), on small shapes that reproduce each
excess found on real-size models:

* a model that returns large logits beside its loss: the traced backward took a tangent
  for the logits and summed it into the loss's gradient, two logits-sized tensors eager
  never makes (GPT-2 small: 98 MiB each);
* an embedding tied to the output layer: its two gradients were summed out of place, one
  vocabulary x width tensor more than eager (GPT-2 small: 147 MiB);
* kernels that allocate scratch inside one call beyond the families listed by name
  (``native_batch_norm_backward``): the tracker and the prediction missed it, and a
  ResNet-50 plan at 30 % ran over its budget.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from planner import optimize
from planner.capture import capture
from planner.memory import measure_allocator_peak, measure_step_memory
from planner.profile import profile
from solvers import PlanMismatchError
from helpers import assert_same_training_step


class TiedLM(nn.Module):
    """A one-block language model whose output layer shares the embedding's weight and
    that returns its loss beside its logits, as transformers' models do."""

    def __init__(self, vocab: int = 4096, width: int = 64, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                   nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(ids)
        h = h + self.block(h)
        logits = self.head(h)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def _peaks(model: nn.Module, owner: nn.Module, inputs: tuple) -> tuple[int, int]:
    """(allocator-event peak, storage-tracker peak) of one step whose output is held
    through the backward, parameters and inputs resident."""
    resident = list(owner.parameters()) + list(owner.buffers()) + list(inputs)

    def step() -> torch.Tensor:
        out = model(*inputs)
        out["loss"].backward()
        return out["loss"].detach()

    step()                                          # warm up lazy initialisation
    owner.zero_grad(set_to_none=True)
    _, allocator_bytes = measure_allocator_peak(step, resident)
    owner.zero_grad(set_to_none=True)
    _, report = measure_step_memory(step, "cpu", resident)
    owner.zero_grad(set_to_none=True)
    return allocator_bytes, report.peak_bytes


@pytest.mark.parametrize("tied", [True, False])
def test_nothing_dropped_never_peaks_above_eager(tied: bool) -> None:
    torch.manual_seed(0)
    model = TiedLM(tied=tied)
    ids = torch.randint(0, 4096, (2, 64))
    inputs = (ids, ids)
    eager_bytes, _ = _peaks(model, model, inputs)
    scheduled = optimize(copy.deepcopy(model), 1.0, inputs, solver="none", repeats=1)
    allocator_bytes, tracker_bytes = _peaks(scheduled, scheduled.module, inputs)
    assert allocator_bytes <= eager_bytes, f"none plan {allocator_bytes} B > eager {eager_bytes} B"
    assert tracker_bytes == allocator_bytes
    assert scheduled.plan.predicted_peak_bytes == pytest.approx(allocator_bytes, rel=0.01)


def test_no_tangent_for_outputs_the_loss_does_not_use() -> None:
    model = TiedLM()
    ids = torch.randint(0, 4096, (2, 64))
    step = capture(model, (ids, ids))
    assert [leaf.tangent for leaf in step.output_leaves] == [True, False]       # loss, logits
    assert [leaf.differentiable for leaf in step.output_leaves] == [True, True]
    every = capture(model, (ids, ids), backward_from="all")
    assert [leaf.tangent for leaf in every.output_leaves] == [True, True]


def test_a_gradient_into_an_output_without_tangent_is_refused_with_the_fix() -> None:
    torch.manual_seed(0)
    model = TiedLM(vocab=64, width=16)
    ids = torch.randint(0, 64, (2, 8))
    scheduled = optimize(copy.deepcopy(model), 1.0, (ids, ids), solver="none", repeats=1)
    out = scheduled(ids, ids)
    with pytest.raises(PlanMismatchError, match=r"output 1 .*backward_from='all'"):
        (out["loss"] + out["logits"].square().mean()).backward()

    def loss_of_both(module: nn.Module) -> torch.Tensor:
        out = module(ids, ids)
        return out["loss"] + out["logits"].square().mean()

    every = optimize(copy.deepcopy(model), 1.0, (ids, ids), solver="none", repeats=1, backward_from="all")
    loss_of_both(every).backward()
    loss_of_both(model).backward()
    for (name, p), q in zip(model.named_parameters(), every.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_tied_gradients_are_summed_in_place_with_equal_gradients() -> None:
    torch.manual_seed(0)
    model = TiedLM(vocab=256, width=32)
    ids = torch.randint(0, 256, (2, 16))
    step = capture(model, (ids, ids))
    in_place = [node for node in step.joint.graph.nodes if node.target is torch.ops.aten.index_put_.default]
    assert {tuple(node.meta["val"].shape) for node in in_place} == {(256, 32)}, \
        "the embedding's rows are not added into the output layer's gradient"
    assert not any(node.target is torch.ops.aten.embedding_dense_backward.default for node in step.joint.graph.nodes)
    scheduled = optimize(copy.deepcopy(model), 1.0, (ids, ids), solver="none", repeats=1)
    assert_same_training_step(scheduled, scheduled.module, copy.deepcopy(model), ((ids, ids)), label="tied")


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_a_tied_embedding_gradient_needs_no_vocabulary_sized_buffer(padding_idx: int | None) -> None:
    """Eager autograd makes the embedding's gradient as a vocabulary x width buffer and
    adds it into the tied weight's; memsched adds the token rows into it directly, so
    with nothing dropped the step peaks (measured with the allocator's events) at the
    parameters and their gradients plus less than half such a buffer, below eager, with
    equal gradients, the padding token's rows left out."""
    torch.manual_seed(0)
    vocab, width = 32768, 128                # few tokens: the end of the backward is eager's peak
    model = TiedLM(vocab=vocab, width=width)
    model.embed.padding_idx = padding_idx
    ids = torch.randint(0, vocab, (2, 4))
    ids[0, :3] = 3                          # a repeated token (the padding one where there is one)
    inputs = (ids, ids)
    embedding_bytes = vocab * width * 4
    eager_bytes = _loss_only_peak(model, model, inputs)
    scheduled = optimize(copy.deepcopy(model), 1.0, inputs, solver="none", repeats=1, release_outputs=True)
    allocator_bytes = _loss_only_peak(scheduled, scheduled.module, inputs)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert allocator_bytes <= 2 * parameter_bytes + embedding_bytes // 2, (allocator_bytes, parameter_bytes)
    assert allocator_bytes <= eager_bytes
    assert scheduled.plan.predicted_peak_bytes == pytest.approx(allocator_bytes, rel=0.01)
    torch.manual_seed(1)
    scheduled(*inputs)["loss"].backward()
    torch.manual_seed(1)
    model(*inputs)["loss"].backward()
    for (name, p), q in zip(model.named_parameters(), scheduled.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.body(x).mean((2, 3)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_batch_norm_backward_scratch_is_predicted_and_measured() -> None:
    """native_batch_norm_backward takes an input-sized temporary on CPU: the profile
    records it as the op's workspace, and the tracker's peak equals the allocator's."""
    torch.manual_seed(0)
    model = ConvBN()
    inputs = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    step = capture(model, inputs)
    graph = profile(step, model, inputs, repeats=1)
    norm_backward = [op for op in graph.ops if op.target == "aten.native_batch_norm_backward.default"]
    activation_bytes = 4 * 32 * 32 * 32 * 4
    assert norm_backward and all(op.tmp_bytes >= activation_bytes for op in norm_backward), \
        [(op.name, op.tmp_bytes) for op in norm_backward]
    for fraction in (1.0, 0.9):
        scheduled = optimize(copy.deepcopy(model), fraction, inputs, repeats=1)
        allocator_bytes, tracker_bytes = _peaks(scheduled, scheduled.module, inputs)
        assert allocator_bytes <= scheduled.plan.budget_bytes
        assert tracker_bytes == allocator_bytes
        assert scheduled.plan.predicted_peak_bytes == pytest.approx(allocator_bytes, rel=0.01)


def _loss_only_peak(model: nn.Module, owner: nn.Module, inputs: tuple, kwargs: dict | None = None) -> int:
    """Allocator-event peak of a step that keeps only the loss (``loss = model(x)["loss"]``)."""
    kwargs = kwargs or {}
    resident = list(owner.parameters()) + list(owner.buffers()) + list(inputs) + list(kwargs.values())

    def step() -> torch.Tensor:
        loss = model(*inputs, **kwargs)["loss"]
        loss.backward()
        return loss.detach()

    step()
    owner.zero_grad(set_to_none=True)
    _, allocator_bytes = measure_allocator_peak(step, resident)
    owner.zero_grad(set_to_none=True)
    return allocator_bytes


def test_released_outputs_are_counted_freed_before_the_backward() -> None:
    """release_outputs=True: a loop that keeps only the loss frees the logits after the
    forward, as in eager; the plan counts that (prediction = allocator, <= eager), which
    lowers the floor by up to a logits tensor; an output still held at the backward is refused."""
    torch.manual_seed(0)
    model = TiedLM(vocab=4096, width=64)
    ids = torch.randint(0, 4096, (2, 64))
    inputs = (ids, ids)
    logits_bytes = 2 * 64 * 4096 * 4
    eager_bytes = _loss_only_peak(model, model, inputs)
    held = optimize(copy.deepcopy(model), 1.0, inputs, solver="none", repeats=1)
    released = optimize(copy.deepcopy(model), 1.0, inputs, solver="none", repeats=1, release_outputs=True)
    assert released.graph.released_outputs and not held.graph.released_outputs
    allocator_bytes = _loss_only_peak(released, released.module, inputs)
    assert allocator_bytes <= eager_bytes
    assert released.plan.predicted_peak_bytes == pytest.approx(allocator_bytes, rel=0.01)
    assert released.plan.predicted_peak_bytes <= held.plan.predicted_peak_bytes - logits_bytes // 2
    out = released(*inputs)
    with pytest.raises(PlanMismatchError, match="release_outputs"):
        out["loss"].backward()
    del out
    released.module.zero_grad(set_to_none=True)
    loss = released(*inputs)["loss"]            # the step runs once the caller lets go
    loss.backward()
    model(*inputs)["loss"].backward()
    for (name, p), q in zip(model.named_parameters(), released.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_transformers_llama_traces_the_program_it_runs_eagerly() -> None:
    """transformers materializes the causal mask and repeats grouped-query k, v under
    fake-tensor tracing unless its packed-sequence test is known (no ``position_ids``
    given): the none plan then saved 2.5 MiB per Llama layer more than eager."""
    transformers = pytest.importorskip("transformers")       # optional: the experiments extra
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                      tie_word_embeddings=False, use_cache=False)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 4096, (2, 128))
    batch = {"input_ids": ids, "labels": ids}
    eager_bytes = _loss_only_peak(model, model, (), batch)
    optimized = optimize(model, 1.0, (), example_kwargs=batch, solver="none", release_outputs=True, repeats=1)
    assert _loss_only_peak(optimized, model, (), batch) <= eager_bytes
    assert not any(op.target == "aten.where.self" for op in optimized.graph.ops), "a materialized mask"
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    optimized(**batch).loss.backward()
    torch.manual_seed(1)
    reference(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
