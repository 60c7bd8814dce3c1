"""planner.capture and planner.profile on small models built for each case."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from planner import UnsupportedModelError, optimize
from planner.capture import capture
from planner.profile import profile
from planner.scratch import OpScratch
from planner.capture import Role
from solvers import Graph, Phase, ValueKind


class BatchNormDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.norm(self.fc1(x)))))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_capture_and_profile_leave_model_and_rng_unchanged() -> None:
    torch.manual_seed(0)
    model, x = BatchNormDropout(), torch.randn(16, 8)
    before, rng_before = state_of(model), torch.get_rng_state()
    step = capture(model, (x,))
    profile(step, model, (x,), repeats=2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in model.parameters())


def test_roles_buffer_updates_and_random_ops() -> None:
    model, x = BatchNormDropout(), torch.randn(16, 8)
    step = capture(model, (x,))
    # running statistics are updated in place by eager's fused native_batch_norm (a re-run
    # uses a variant that leaves them alone); the step counter by a trailing copy_
    assert sorted(step.buffer_updates.values()) == ["norm.num_batches_tracked"]
    assert any(str(node.target) == "aten.native_batch_norm.default" for node in step.joint.graph.nodes)
    roles = list(step.roles.values())
    assert roles.count(Role.PARAMETER) == 6 and roles.count(Role.BUFFER) == 3
    assert roles.count(Role.INPUT) == 1 and roles.count(Role.TANGENT) == 1
    graph = profile(step, model, (x,), repeats=1)
    random_ops = [op for op in graph.ops if op.random]
    assert random_ops and all(op.phase is Phase.FORWARD for op in random_ops)
    # every buffer update runs once in the forward and can never be recomputed
    updates = [op for op in graph.ops if op.name in step.buffer_updates]
    assert len(updates) == 1 and all(op.phase is Phase.FORWARD and not op.recomputable for op in updates)
    # the backward reads no tangent-free forward-only thing it cannot have
    assert {graph.value(g).kind for g in graph.gradients} == {ValueKind.GRADIENT_WORK}
    assert len(graph.gradients) == 6


def test_attention_without_dropout_is_not_random() -> None:
    """SDPA kernels are tagged random for their dropout; called with ``dropout_p=0`` they draw
    nothing, so recomputing them must not hold a generator state (5,056 B each on CPU)."""
    class Attention(nn.Module):
        def __init__(self, dropout_p: float) -> None:
            super().__init__()
            self.qkv, self.dropout_p = nn.Linear(8, 24), dropout_p

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(2, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True).sum()

    x = torch.randn(2, 4, 8)
    model = Attention(0.0)
    graph = profile(capture(model, (x,)), model, (x,), repeats=1)
    assert any("scaled_dot_product" in op.target for op in graph.ops)
    assert not any(op.random for op in graph.ops)
    model = Attention(0.5)          # on CPU, attention with dropout runs as the math kernels
    graph = profile(capture(model, (x,)), model, (x,), repeats=1)
    assert any(op.random for op in graph.ops)
    state = torch.get_rng_state()
    q = torch.randn(1, 2, 4, 8)
    torch.set_rng_state(state)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, q, q, 0.0, True)
    assert torch.equal(torch.get_rng_state(), state), "the kernel drew numbers at dropout_p=0"


def test_views_own_no_storage_and_point_to_their_root() -> None:
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)                       # (4, 12) new storage
            return h.view(4, 3, 4).transpose(1, 2).sum()

    model, x = Views(), torch.randn(4, 12)
    graph = profile(capture(model, (x,)), model, (x,), repeats=1)
    addmm = next(v for v in graph.values if v.producer and graph.op(v.producer).target == "aten.addmm.default")
    assert addmm.size_bytes == 4 * 12 * 4 and addmm.alias_of is None
    views = [v for v in graph.values if v.producer and graph.op(v.producer).phase is Phase.FORWARD
             and graph.op(v.producer).target in ("aten.view.default", "aten.transpose.int")]
    assert views and all(v.size_bytes == 0 and v.alias_of == addmm.name for v in views)


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor
    steps: int


def test_tuple_dict_and_dataclass_outputs_round_trip() -> None:
    class Structured(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict:
            h = self.fc(x) * scale
            return {"out": Output(logits=h.relu(), hidden=h, steps=3), "pair": (h.sum(), x.argmax(dim=1))}

    torch.manual_seed(0)
    model, x = Structured(), torch.randn(5, 6)
    step = capture(model, (x,), {"scale": 2.0})
    assert [leaf.is_tensor for leaf in step.output_leaves].count(False) == 1
    differentiable = [leaf.differentiable for leaf in step.output_leaves if leaf.is_tensor]
    assert differentiable.count(False) == 1      # argmax is an integer output
    reference = copy.deepcopy(model)
    optimized = optimize(model, 1.0, (x,), example_kwargs={"scale": 2.0}, repeats=1)
    out, expected = optimized(x, scale=2.0), reference(x, scale=2.0)
    assert isinstance(out["out"], Output) and out["out"].steps == 3 and isinstance(out["pair"], tuple)
    torch.testing.assert_close(out["out"].logits, expected["out"].logits)
    torch.testing.assert_close(out["out"].hidden, expected["out"].hidden)
    assert torch.equal(out["pair"][1], expected["pair"][1])
    out["pair"][0].backward()                    # the scalar output is the loss
    expected["pair"][0].backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_data_dependent_control_flow_names_the_module_and_the_fix() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gate = Branchy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(self.fc(x))

    with pytest.raises(UnsupportedModelError, match=r"'gate'.*torch\.where"):
        capture(Net(), (torch.randn(2, 4),))


def test_model_without_trainable_parameters_is_refused() -> None:
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(UnsupportedModelError, match="requires grad"):
        capture(model, (torch.randn(2, 3),))


def test_not_a_module_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_profile_times_are_positive_and_graph_is_json_stable() -> None:
    model, x = BatchNormDropout(), torch.randn(16, 8)
    step = capture(model, (x,))
    first = profile(step, model, (x,), repeats=3)
    second = profile(step, copy.deepcopy(model), (x,), repeats=1)
    assert first.hash == second.hash                     # timings differ, structure does not
    reloaded = Graph.from_json(json.loads(json.dumps(first.to_json())))
    assert reloaded == first and reloaded.hash == first.hash
    assert sum(op.time_ms for op in first.ops) > 0
    assert all(op.time_ms >= 0 for op in first.ops)


def test_in_place_update_of_an_input_is_refused_with_the_fix() -> None:
    class MutatesInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return self.fc(x)

    with pytest.raises(UnsupportedModelError, match=r"modifies its input in place.*clone"):
        capture(MutatesInput(), (torch.randn(2, 4),))


@pytest.mark.parametrize("repeats, expected_ms", [(1, 1000.0), (2, 3.0), (3, 1.0)])
def test_cpu_op_time_is_the_fastest_repeat_after_the_first(monkeypatch: pytest.MonkeyPatch, repeats: int,
                                                           expected_ms: float) -> None:
    """On CPU a repeat can only be slowed (page faults of memory handed back to the
    system, other processes), so the profile takes the fastest timed repeat: runs of
    1 s (warm-up, left out), 3 ms and 1 ms give 1 ms; a single run is all there is."""
    import planner.profile as profiling
    clock = iter([0.0, 1.0, 10.0, 10.003, 20.0, 20.001])
    monkeypatch.setattr(profiling, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    builder = profiling.GraphBuilder.__new__(profiling.GraphBuilder)
    builder.device, builder.repeats, builder.scratch = torch.device("cpu"), repeats, OpScratch()
    result, time_ms, workspace_bytes = builder._timed("add", torch.add, (torch.ones(2), 1), {})
    assert torch.equal(result, torch.full((2,), 2.0)) and workspace_bytes == 0
    assert time_ms == pytest.approx(expected_ms)


def test_an_op_whose_timed_runs_are_long_enough_is_not_repeated_further(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once an op's timed runs add up to `ENOUGH_TIMED_MS`, the repeats stop: with five
    repeats asked, an op timed at 50 ms after its warm-up runs twice in all."""
    import planner.profile as profiling
    clock = iter([0.0, 1.0, 10.0, 10.05])
    monkeypatch.setattr(profiling, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    builder = profiling.GraphBuilder.__new__(profiling.GraphBuilder)
    builder.device, builder.repeats, builder.scratch = torch.device("cpu"), 5, OpScratch()
    assert profiling.ENOUGH_TIMED_MS < 50.0
    _, time_ms, _ = builder._timed("add", lambda *args: calls.append(args) or torch.add(*args), (torch.ones(2), 1), {})
    assert len(calls) == 2 and time_ms == pytest.approx(50.0)


class Dropouts(nn.Module):
    """Two dropouts whose noise the backward reads (through ``x * noise``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(torch.tanh(self.fc1(x)), 0.3, training=self.training)
        return F.dropout(self.fc2(hidden), 0.1, training=self.training)


def test_dropout_masks_are_one_byte_and_the_backward_reads_them() -> None:
    """Each mask is drawn into a bool tensor; the backward makes the float noise from it
    again instead of reading the forward's (4 bytes an element). The keep-all plan keeps the
    bool masks, computes bitwise eager's gradients and peaks no higher than eager (here
    131 KiB above eager before the masks were one byte: the forward's float noise and the
    functional graph's out-of-place division)."""
    from planner.benchmark import allocator_step_peak
    from runtime.step import random_fill_like

    torch.manual_seed(0)
    model, x = Dropouts(), torch.randn(512, 64)
    step = capture(model, (x,))
    nodes = list(step.joint.graph.nodes)
    fills = [node for node in nodes if node.target is random_fill_like]
    assert len(fills) == 2
    assert all(node.kwargs == {"dtype": torch.bool} and node.meta["val"].dtype == torch.bool for node in fills)
    forward_floats = {node for node in nodes if step.roles.get(node.name) is Role.FORWARD
                      and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].dtype == torch.float32}
    for fill in fills:                 # the backward reads the mask, and no float made from it in the forward
        made_from_mask = {user for user in fill.users} | {u for user in fill.users for u in user.users}
        assert any(step.roles.get(user.name) is Role.BACKWARD for user in fill.users)
        backward_reads = {argument for node in nodes if step.roles.get(node.name) is Role.BACKWARD
                          for argument in node.all_input_nodes}
        assert not (made_from_mask & forward_floats & backward_reads)

    kept = optimize(model, 1.0, (x,), solver="none", progress=False)
    peaks, gradients = {}, {}
    for name, module in (("eager", model), ("memsched", kept)):
        torch.manual_seed(3)
        peaks[name] = allocator_step_peak(module, (x,))
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        module(x).sum().backward()
        gradients[name] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(gradients["memsched"], gradients["eager"]))
    kept_masks = [name for name, decision in kept.plan.decisions.items()
                  if kept.graph.value(name).dtype == "bool" and decision.value == "keep"]
    assert len(kept_masks) == 2
    assert peaks["memsched"] <= peaks["eager"] + 64        # a scalar's worth, not a mask's


def test_bool_draw_check_answers_no_where_it_cannot_draw() -> None:
    from planner.capture import _bool_draw_matches

    assert _bool_draw_matches((4, 5), (5, 1), torch.float32, torch.device("cpu"), 0.9)
    assert not _bool_draw_matches((4, 5), (5, 1), torch.float32, torch.device("meta"), 0.9)
    # a mask of 2**33 elements (an estimate's batch) is checked on a flat sample, not drawn
    assert _bool_draw_matches((1 << 20, 1 << 13), (1 << 13, 1), torch.bfloat16, torch.device("cpu"), 0.9)
