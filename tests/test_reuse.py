"""A new step signature is planned from the first profile on fake tensors (`planner.reuse`):
its graph is the one a real profile of that step records, byte for byte, its scratch is
measured by running the ops that have any alone, and the solvers start from the previous
shape's plan (`solvers.baselines.solve_greedy`'s ``start``)."""

from __future__ import annotations

import pytest
import torch

from planner.budget import resolve_budget
from planner.capture import capture
from planner.profile import profile
from planner.reuse import ProfileReuse
from solvers import simulate, solve
from solvers.baselines import solve_greedy
from solvers.errors import InfeasibleBudgetError
from helpers import trace_zoo


def _shapes(name: str, inputs: tuple) -> list[tuple]:
    """A smaller and a larger step: sequence length for the GPT, batch size for the ResNet."""
    if name == "gpt":
        idx, targets = inputs
        return [(idx[:, :24].contiguous(), targets[:, :24].contiguous()),
                (torch.cat([idx, idx]), torch.cat([targets, targets]))]
    (images,) = inputs
    return [(images[:3].clone(),), (torch.cat([images, images]),)]


def _structure(graph):
    return ([(v.name, v.size_bytes, v.alias_of, v.kind, v.shape, v.dtype) for v in graph.values],
            [(o.name, o.target, o.inputs, o.outputs, o.phase, o.random, o.recomputable) for o in graph.ops],
            graph.placeholders, graph.forward_outputs, graph.gradients)


@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_a_new_shape_is_sized_as_a_real_profile_sizes_it(name: str) -> None:
    """Values, sizes, aliases and ops equal a real profile's; each op's temporary memory
    (CPU scratch measured in isolation) equals what the real step measured; and a plan
    made on the reused graph peaks on the real graph exactly as predicted."""
    torch.manual_seed(0)
    model, inputs, step, graph = trace_zoo(name)
    reuse = ProfileReuse(step, graph)
    for new in _shapes(name, inputs):
        new_step = capture(model, new)
        reused = reuse.graph_for(new_step, model, new, None)
        real = profile(new_step, model, new, repeats=1)
        assert _structure(reused) == _structure(real)
        assert [o.tmp_bytes for o in reused.ops] == [o.tmp_bytes for o in real.ops]
        assert all(o.time_ms >= 0 for o in reused.ops) and reused.total_time_ms > 0
        budget_bytes = resolve_budget(0.6, real).budget_bytes
        plan = solve(reused, budget_bytes, "hierarchical")
        assert simulate(real, plan, check_hash=False).peak_bytes == plan.predicted_peak_bytes <= budget_bytes


def test_a_warm_started_greedy_fits_and_only_gives_back_drops() -> None:
    """From a plan made for a lower budget, greedy at a higher one fits and is never
    slower than its start (the restore pass only removes drops); from a plan for a higher
    budget it drops more until it fits, or says it cannot."""
    _, _, _, graph = trace_zoo("gpt")
    low, high = resolve_budget(0.5, graph).budget_bytes, resolve_budget(0.8, graph).budget_bytes
    tight = solve_greedy(graph, low)
    warm = solve_greedy(graph, high, start=tight.decisions)
    assert simulate(graph, warm).peak_bytes <= high
    assert simulate(graph, warm).time_ms <= simulate(graph, tight).time_ms
    loose = solve_greedy(graph, high)
    try:
        from_loose = solve_greedy(graph, low, start=loose.decisions)
    except InfeasibleBudgetError as error:
        assert error.least_feasible_bytes > low
    else:
        assert simulate(graph, from_loose).peak_bytes <= low
    started = solve(graph, high, start=tight.decisions)       # auto from a start
    assert started.predicted_peak_bytes <= high and "ilp" not in started.options["auto_tried"]


def test_planning_a_new_shape_stays_within_its_budget_and_leaves_the_model_alone() -> None:
    """The planning call itself (fake walk, the isolated convolutions and batch norms on
    real tensors) peaks within the new step's budget, per the allocator's events; batch-norm
    statistics, which an isolated kernel would update in place, are left as they were, as
    are the generators: the first step of the new shape equals the plain model's."""
    import copy

    from planner import optimize, zoo
    from planner.memory import measure_allocator_peak
    from helpers import assert_same_training_step

    torch.manual_seed(0)
    model, (images,) = zoo.make("resnet", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    optimized = optimize(model, 0.7, (images,), repeats=1)
    larger = (torch.cat([images, images]),)
    buffers = [buffer.clone() for buffer in model.buffers()]
    rng = torch.get_rng_state()
    resident = list(model.parameters()) + list(model.buffers()) + list(larger)
    plan, planning_peak_bytes = measure_allocator_peak(lambda: optimized.prepare(*larger), resident)
    assert planning_peak_bytes <= plan.budget_bytes
    assert all(torch.equal(before, after) for before, after in zip(buffers, model.buffers()))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_training_step(optimized, model, reference, larger, label="larger batch")
    assert not any(cached.runners_up for cached in optimized.plans), "a cached plan keeps its solver's others"
