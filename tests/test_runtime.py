"""runtime: generated programs reproduce the plain step exactly, under any valid plan."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from planner import BudgetError, optimize
from planner.capture import capture
from planner.profile import profile
from planner.budget import parse_budget
from runtime.module import ScheduledModule
from solvers import Decision, InfeasibleBudgetError, Plan, PlanMismatchError, simulate, solve
from solvers.kernel.program import build_program, saved_roots


class DropoutNet(nn.Module):
    """Linear -> BatchNorm -> GELU -> Dropout -> attention -> Linear, with a residual."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.norm = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.gelu(self.norm(self.fc1(x))))
        q = h.view(4, -1, 2, h.shape[1] // 2).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(h.shape)
        return self.fc2(a + h) + x


def all_recompute_plan(graph) -> Plan:
    """Every saved storage that may be dropped is recomputed (dropout masks included)."""
    pinned = {graph.value(name).root for name in graph.pinned_values}
    decisions = {root: Decision.RECOMPUTE if graph.op(graph.value(root).producer).recomputable and root not in pinned
                 else Decision.KEEP for root in saved_roots(graph)}
    forward, backward = build_program(graph, decisions)
    return Plan(graph.hash, "all-recompute", 2**62, forward, backward, decisions)


def step(model: nn.Module, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model(x)
    loss = out.square().mean()
    loss.backward()
    return loss.detach()


def assert_same_training_state(model: nn.Module, reference: nn.Module) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"grad of {name}: {m}")
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, c, msg=lambda m: f"buffer {name}: {m}")


def test_all_recompute_replays_dropout_and_matches_plain_step() -> None:
    torch.manual_seed(0)
    model, x = DropoutNet(), torch.randn(64, 16)
    reference = copy.deepcopy(model)
    traced = capture(model, (x,))
    graph = profile(traced, model, (x,), repeats=1)
    plan = all_recompute_plan(graph)
    assert any(graph.op(s.name).random for s in plan.backward if s.kind.value == "run"), "no dropout recomputed"
    scheduled = ScheduledModule(model, traced, graph, plan)
    loss = step(scheduled, x)
    rng_after_scheduled = torch.get_rng_state()
    loss_reference = step(reference, x)
    assert torch.equal(torch.get_rng_state(), rng_after_scheduled)   # same random stream consumed
    torch.testing.assert_close(loss, loss_reference)
    assert_same_training_state(model, reference)


def test_gradients_accumulate_over_steps_like_the_plain_model() -> None:
    torch.manual_seed(0)
    model, x = DropoutNet(), torch.randn(64, 16)
    reference = copy.deepcopy(model)
    scheduled = optimize(model, 0.85, (x,), repeats=1)
    for seed in (1, 2):
        step(scheduled, x, seed)
        step(reference, x, seed)
    assert_same_training_state(model, reference)


def test_input_gradient_and_eval_and_no_grad_fall_back_to_plain_forward() -> None:
    torch.manual_seed(0)
    model = DropoutNet()
    x = torch.randn(64, 16, requires_grad=True)
    reference = copy.deepcopy(model)
    scheduled = optimize(model, 1.0, (x,), repeats=1)
    x_ref = x.detach().clone().requires_grad_(True)
    step(scheduled, x)
    step(reference, x_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    scheduled.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(scheduled(x), reference(x))


def test_state_dict_keys_and_parameters_are_the_plain_models() -> None:
    model = DropoutNet()
    x = torch.randn(64, 16)
    scheduled = optimize(model, 1.0, (x,), repeats=1)
    assert list(scheduled.state_dict()) == list(model.state_dict())
    assert [id(p) for p in scheduled.parameters()] == [id(p) for p in model.parameters()]
    scheduled.load_state_dict(DropoutNet().state_dict())


def test_saved_plan_is_reused_without_solving(tmp_path) -> None:
    model, x = DropoutNet(), torch.randn(64, 16)
    first = optimize(model, 0.85, (x,), repeats=1, solver="greedy")
    path = tmp_path / "plan.json"
    first.plan.save(path)
    again = optimize(model, 0.85, (x,), plan=path)
    # the same plan; its predictions are the replay on this run's profile (times move)
    assert replace(again.plan, predicted_time_ms=0.0) == replace(first.plan, predicted_time_ms=0.0)
    assert again.plan.predicted_peak_bytes == first.plan.predicted_peak_bytes
    assert again.plan.graph is not None and again.plan.graph.hash == first.graph.hash


def test_plan_for_another_graph_or_shape_is_refused(tmp_path) -> None:
    model = DropoutNet()
    plan_path = tmp_path / "plan.json"
    optimize(model, 1.0, (torch.randn(64, 16),), repeats=1).plan.save(plan_path)
    with pytest.raises(PlanMismatchError, match="re-plan|Re-plan"):
        optimize(model, 1.0, (torch.randn(32, 16),), plan=plan_path)
    scheduled = optimize(model, 1.0, (torch.randn(64, 16),), repeats=1, on_new_shape="error")
    with pytest.raises(PlanMismatchError, match=r"\[32, 16\].*optimize\(\) again"):
        scheduled(torch.randn(32, 16))
    traced = capture(model, (torch.randn(64, 16),))
    graph = profile(traced, model, (torch.randn(64, 16),), repeats=1)
    other = Plan("0" * 16, "none", 1, (), ())
    with pytest.raises(PlanMismatchError, match="plan was made for graph 0{16}"):
        ScheduledModule(model, traced, graph, other)


def test_second_backward_through_one_step_says_why_it_fails() -> None:
    model, x = DropoutNet(), torch.randn(64, 16)
    scheduled = optimize(model, 1.0, (x,), repeats=1)
    loss = scheduled(x).square().mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_budgets_parse_and_bad_ones_are_explained() -> None:
    assert parse_budget("6GiB") == 6 * 2**30
    assert parse_budget("800MB") == 800 * 10**6
    assert parse_budget("50%") == 0.5 and parse_budget(0.25) == 0.25 and parse_budget("1000B") == 1000
    bad_budgets = {"6 gigs": "cannot read budget", -5: "must be positive", 0: "must be positive",
                   1.5: r"fraction in \(0, 1\]", True: "is a bool", "0%": r"fraction in \(0, 1\]",
                   "abc%": "write a percentage", "1": "has no unit", "1.0": "has no unit", "0.5": "'0.5B' for bytes",
                   (1,): "got tuple"}
    for bad, message in bad_budgets.items():
        with pytest.raises(BudgetError, match=message):
            parse_budget(bad)


def test_budget_below_least_feasible_names_it() -> None:
    model, x = DropoutNet(), torch.randn(64, 16)
    with pytest.raises(InfeasibleBudgetError, match="least feasible") as caught:
        optimize(model, 1000, (x,), repeats=1)
    assert caught.value.least_feasible_bytes > 1000


def test_greedy_plans_run_at_their_predicted_peak() -> None:
    """What the allocator's events show the runtime using is what the plan predicted, at
    every budget greedy meets, and within the budget (the storage tracker does not see the
    generator states saved for dropout replays, made outside the dispatcher)."""
    from planner.budget import resolve_budget
    from planner.memory import measure_allocator_peak
    torch.manual_seed(0)
    model, x = DropoutNet(), torch.randn(64, 16)
    step_graph = capture(model, (x,))
    graph = profile(step_graph, model, (x,), repeats=1)
    measured = 0
    for fraction in (1.0, 0.8, 0.6):
        budget = resolve_budget(fraction, graph).budget_bytes
        try:
            plan = solve(graph, budget, "greedy")
        except InfeasibleBudgetError:
            continue
        scheduled = ScheduledModule(model, step_graph, graph, plan)
        model.zero_grad(set_to_none=True)
        step(scheduled, x)                               # warm-up: lazy initialisation
        model.zero_grad(set_to_none=True)
        _, peak_bytes = measure_allocator_peak(lambda: step(scheduled, x),
                                               list(model.parameters()) + list(model.buffers()) + [x])
        assert peak_bytes <= budget, f"{fraction}: {peak_bytes} > {budget}"
        assert peak_bytes == pytest.approx(plan.predicted_peak_bytes, rel=0.01)
        measured += 1
    assert measured >= 2


class TiedTransformer(nn.Module):
    """PyTorch's own TransformerEncoder (dropout after a transposed attention output) with
    the LM head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class Recurrent(nn.Module):
    """An LSTM: its CPU kernel keeps a training workspace only when grad mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("make", [lambda: (TiedTransformer(), torch.randint(0, 50, (4, 12))),
                                  lambda: (Recurrent(), torch.randn(4, 6, 8))], ids=["tied-transformer", "lstm"])
def test_models_written_elsewhere_match_and_fit(make) -> None:
    """Random fills keep eager's layout (dropout on a transposed tensor draws the same mask);
    kernels see grad mode on as when traced; the caller's loss is inside the budget."""
    from planner.benchmark import step_memory, train_step
    torch.manual_seed(0)
    model, x = make()
    reference = copy.deepcopy(model)
    scheduled = optimize(model, 1.0, (x,), repeats=1)
    report = step_memory(scheduled, (x,))
    assert report.peak_bytes <= scheduled.plan.budget_bytes
    assert abs(report.peak_bytes - scheduled.plan.predicted_peak_bytes) <= 0.05 * report.peak_bytes
    model.load_state_dict(reference.state_dict())
    torch.manual_seed(5)
    loss = train_step(scheduled, (x,))
    torch.manual_seed(5)
    loss_reference = train_step(reference, (x,))
    torch.testing.assert_close(loss, loss_reference)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_autocast_state_is_part_of_what_a_plan_is_for() -> None:
    """A step under autocast is another step: refused with on_new_shape="error", planned
    (traced and profiled under the same autocast) by default, with autocast's gradients."""
    torch.manual_seed(0)
    model, x = DropoutNet(), torch.randn(64, 16)
    strict = optimize(copy.deepcopy(model), 1.0, (x,), repeats=1, on_new_shape="error")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(PlanMismatchError, match="autocast"):
        strict(x)
    reference = copy.deepcopy(model)
    scheduled = optimize(model, 0.9, (x,), repeats=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(scheduled, x, seed=3)
        step(reference, x, seed=3)
    assert len(scheduled.plans) == 2 and scheduled.plan.predicted_peak_bytes <= scheduled.plan.budget_bytes
    assert_same_training_state(model, reference)
