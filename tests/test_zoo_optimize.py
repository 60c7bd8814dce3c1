"""The model zoo through the whole path, at 100 %, 70 % and 50 % of activation memory:
loss, every gradient and every buffer equal the plain model's; the measured peak (CPU
storage tracker, and the allocator's own events from torch.profiler, which must agree within
1 %) stays within the budget; the prediction is within 5 % of the measurement.
"""

from __future__ import annotations

import copy

import pytest

from planner.benchmark import allocator_step_peak, step_memory
from planner.budget import resolve_budget
from runtime.module import ScheduledModule
from solvers import simulate, solve
from helpers import assert_same_training_step, trace_zoo

MODELS = ("mlp", "resnet", "gpt", "unet", "encoder")
FRACTIONS = (1.0, 0.7, 0.5)


@pytest.fixture(scope="module", params=MODELS)
def traced(request):
    """Capture and profile each zoo model once; every budget re-uses the graph."""
    model, inputs, step, graph = trace_zoo(request.param)
    return request.param, model, inputs, step, graph


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_zoo_model_at_budget(traced, fraction: float) -> None:
    name, model, inputs, step, graph = traced
    budget = resolve_budget(fraction, graph)
    plan = solve(graph, budget.budget_bytes, "auto")
    if fraction < 1.0:
        assert plan.predicted_peak_bytes < budget.keep_all_peak_bytes, f"{name}: nothing was saved"
    model_copy = copy.deepcopy(model)      # each budget starts from the same weights and buffers
    reference = copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, plan)

    report = step_memory(scheduled, inputs)
    assert report.peak_bytes <= plan.budget_bytes, f"{name} at {fraction:.0%}: measured {report.peak_bytes} > budget"
    allocator_bytes = allocator_step_peak(scheduled, inputs)       # the allocator's events agree
    assert allocator_bytes <= plan.budget_bytes, f"{name} at {fraction:.0%}: allocator {allocator_bytes} > budget"
    assert abs(allocator_bytes - report.peak_bytes) <= 0.01 * report.peak_bytes, (name, allocator_bytes, report)
    assert abs(plan.predicted_peak_bytes - report.peak_bytes) <= 0.05 * report.peak_bytes, (
        f"{name} at {fraction:.0%}: predicted {plan.predicted_peak_bytes} vs measured {report.peak_bytes}")
    assert simulate(graph, plan).peak_bytes == plan.predicted_peak_bytes

    # the memory step above trained model_copy once; compare from fresh copies
    model_copy.load_state_dict(model.state_dict())
    assert_same_training_step(scheduled, model_copy, reference, inputs, label=f"{name}")


def test_measured_plain_peak_equals_keep_all_prediction(traced) -> None:
    """The memory model itself: the un-optimized step, measured, is what we predict."""
    name, model, inputs, _, graph = traced
    report = step_memory(copy.deepcopy(model), inputs)
    predicted = resolve_budget(1.0, graph).keep_all_peak_bytes
    assert abs(predicted - report.peak_bytes) <= 0.05 * report.peak_bytes, (name, predicted, report.peak_bytes)


SOLVERS = ("hierarchical", "chain", "greedy", "every_block", "sqrt_n", "ilp")


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_end_to_end(traced, solver: str) -> None:
    """Each solver's plan at 60 % of activation memory, run by the runtime: measured peak
    within the budget, loss, gradients and buffers equal. The checkpoint baselines keep
    every block boundary and may not fit a model at that budget (they fit the MLP and the
    U-Net, not the tiny GPT and ResNet: those four cases skip); the others must. `ilp` gets
    3 s: on these graphs its plan is the heuristic start or what the MILP improves."""
    from solvers import InfeasibleBudgetError
    name, model, inputs, step, graph = traced
    budget = resolve_budget(0.6, graph)
    options = {"time_limit_s": 3.0} if solver == "ilp" else {}
    try:
        plan = solve(graph, budget.budget_bytes, solver, **options)
    except InfeasibleBudgetError:
        if solver in ("every_block", "sqrt_n"):
            pytest.skip(f"{solver} does not fit {name} at 60 %")
        raise
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, plan)
    report = step_memory(scheduled, inputs)
    assert report.peak_bytes <= plan.budget_bytes, f"{name}/{solver}: measured {report.peak_bytes} > budget"
    allocator_bytes = allocator_step_peak(scheduled, inputs)
    assert allocator_bytes <= plan.budget_bytes, f"{name}/{solver}: allocator {allocator_bytes} > budget"
    model_copy.load_state_dict(model.state_dict())
    assert_same_training_step(scheduled, model_copy, reference, inputs, label=f"{name}/{solver}")
