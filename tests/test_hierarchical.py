"""The ``hierarchical`` solver: its chain DP against enumeration, and its plans on the zoo's
tiny graphs (replay within the budget, never slower than ``every_block``, zero overhead at
the keep-all peak, deterministic, identical blocks sharing options), end to end with exact
gradients.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest
import torch
from hypothesis import given, strategies as st

from planner.budget import resolve_budget
from runtime.module import ScheduledModule
from solvers import (Decision, Graph, InfeasibleBudgetError, Op, OptionError, Phase, Plan, Value, ValueKind,
                     least_feasible_lower_bound, simulate, solve)
from solvers import hierarchical
from solvers import portfolio
from solvers.baselines import solve_greedy
from solvers.hierarchical import choose_levels, restore
from solvers.portfolio import solve_hierarchical
from solvers.kernel.options import OptionCost, segment_options
from solvers.kernel.replay import Replays
from solvers.kernel.segments import segment_chain
from strategies import budget_between, chain_graphs, small_graphs
from helpers import assert_same_training_step, trace_zoo

MODELS = ("gpt", "resnet", "unet")
FRACTIONS = (0.7, 0.5, 0.4)


@pytest.fixture(scope="module", params=MODELS)
def traced(request):
    return (request.param, *trace_zoo(request.param))


# -- the chain DP ----------------------------------------------------------------------------------

def enumerate_levels(costs: list[list[OptionCost]], budget_bytes: int) -> float | None:
    """Least summed time over every choice whose additive peaks fit (exact bytes)."""
    best = None
    for levels in itertools.product(*(range(len(options)) for options in costs)):
        before, fits = 0, True
        for options, level in zip(costs, levels):
            fits &= before + options[level].need_bytes <= budget_bytes
            before += options[level].saved_bytes
        fits &= before <= budget_bytes
        time_ms = sum(options[level].time_ms for options, level in zip(costs, levels))
        if fits and (best is None or time_ms < best):
            best = time_ms
    return best


COSTS = [
    [OptionCost(40, 50, 0.0), OptionCost(20, 45, 1.0), OptionCost(5, 60, 3.0)],
    [OptionCost(30, 35, 0.0), OptionCost(10, 30, 2.0)],
    [OptionCost(50, 20, 0.0), OptionCost(25, 25, 0.5), OptionCost(8, 40, 4.0)],
]


@pytest.mark.parametrize("budget_bytes", [60, 75, 90, 100, 120, 150])
def test_chain_dp_matches_enumeration(budget_bytes: int) -> None:
    expected = enumerate_levels(COSTS, budget_bytes)
    levels = choose_levels(COSTS, budget_bytes, resolution=budget_bytes)   # unit of 1 byte: exact
    if expected is None:
        assert levels is None
        return
    assert sum(options[level].time_ms for options, level in zip(COSTS, levels)) == pytest.approx(expected)


def test_chain_dp_rounds_bytes_on_the_safe_side() -> None:
    costs = [[OptionCost(saved_bytes=7, need_bytes=7, time_ms=0.0), OptionCost(0, 0, 1.0)],
             [OptionCost(saved_bytes=0, need_bytes=3, time_ms=0.0)]]
    assert choose_levels(costs, 10, resolution=10) == [0, 0]      # exact units: 7 + 3 fits 10
    assert choose_levels(costs, 10, resolution=2) == [1, 0]       # units of 5: 7 -> 10, 3 -> 5


def hierarchical_or_greedy_fails_too(graph, budget: int):
    """The hierarchical plan, or None after checking that greedy finds no plan either."""
    try:
        return solve(graph, budget, "hierarchical")
    except InfeasibleBudgetError:
        with pytest.raises(InfeasibleBudgetError, match="least feasible"):
            solve(graph, budget, "greedy")
        return None


# -- random graphs ---------------------------------------------------------------------------------

@given(graph=st.one_of(small_graphs(), st.integers(1, 6).flatmap(chain_graphs)), frac=st.floats(0.0, 1.2))
def test_random_graphs_fit_or_greedy_fails_too(graph, frac: float) -> None:
    budget = budget_between(graph, frac)
    plan = hierarchical_or_greedy_fails_too(graph, budget)
    if plan is None:
        return
    assert simulate(graph, plan).peak_bytes <= budget
    if frac >= 1.0:
        assert plan.overhead == 0.0


# -- plans on the zoo -------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", FRACTIONS)
def test_plan_fits_and_beats_every_block(traced, fraction: float) -> None:
    name, _, _, _, graph = traced
    budget = resolve_budget(fraction, graph).budget_bytes
    plan = hierarchical_or_greedy_fails_too(graph, budget)
    if plan is None:
        return
    result = simulate(graph, plan)
    assert result.peak_bytes <= budget, f"{name} at {fraction:.0%}"
    assert plan.predicted_time_ms == pytest.approx(result.time_ms)
    try:
        every_block = solve(graph, budget, "every_block")
    except InfeasibleBudgetError:
        return
    assert result.time_ms <= every_block.predicted_time_ms + 1e-9, f"{name} at {fraction:.0%}"


def test_zero_overhead_at_keep_all_peak(traced) -> None:
    _, _, _, _, graph = traced
    keep_all_peak = resolve_budget(1.0, graph).keep_all_peak_bytes
    for budget in (keep_all_peak, keep_all_peak + 1, 2 * keep_all_peak):
        plan = solve(graph, budget, "hierarchical")
        assert plan.overhead == 0.0
        assert simulate(graph, plan).recompute_ms == 0.0


def test_deterministic(traced) -> None:
    _, _, _, _, graph = traced
    budget = resolve_budget(0.5, graph).budget_bytes
    first, second = solve(graph, budget, "hierarchical"), solve(graph, budget, "hierarchical")
    assert first.forward == second.forward and first.backward == second.backward
    assert first.decisions == second.decisions


def test_identical_blocks_share_options(traced) -> None:
    name, _, _, _, graph = traced
    if name != "gpt":
        pytest.skip(f"{name} has no identical blocks to share options between (the tiny GPT has two)")
    segments = segment_chain(graph)
    options = segment_options(graph, segments, options_per_segment=6)

    def shape_of(index: int) -> tuple:
        """The drop order as op targets and sizes, and the option prefixes."""
        order = tuple((graph.op(graph.value(root).producer).target, graph.value(root).size_bytes)
                      for root in options[index].order)
        return order, options[index].prefix_lengths

    blocks = [segment.index for segment in segments if segment.forward_ops
              and graph.op(segment.forward_ops[0]).module.startswith("blocks.")]
    assert len(blocks) == 2, [graph.op(segment.forward_ops[0]).module for segment in segments]
    first, second = blocks
    assert options[first].order and set(options[first].order).isdisjoint(options[second].order)
    assert shape_of(first) == shape_of(second)


def test_invalid_arguments_and_infeasible_budget(traced) -> None:
    _, _, _, _, graph = traced
    with pytest.raises(OptionError, match="options_per_segment must be at least 2"):
        solve_hierarchical(graph, 10**12, options_per_segment=1)
    with pytest.raises(InfeasibleBudgetError, match="least feasible"):
        solve_hierarchical(graph, 1)


# -- end to end -------------------------------------------------------------------------------------

def test_gpt_gradients_equal_the_plain_model() -> None:
    model, inputs, step, graph = trace_zoo("gpt")
    plan = solve(graph, resolve_budget(0.5, graph).budget_bytes, "hierarchical")
    assert simulate(graph, plan).recompute_ms > 0, "the budget should force recomputation"
    scheduled_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(scheduled_model, step, graph, plan)
    assert_same_training_step(scheduled, scheduled_model, reference, inputs)


def test_forward_reruns_reach_below_every_block() -> None:
    """Below every_block's peak a uniform chain needs Revolve-like re-runs of whole
    segments: hierarchical returns `chain`'s schedule there (fits, no slower than chain)."""
    from test_chain import uniform_chain
    graph = uniform_chain(12)
    every_block_peak = simulate(graph, solve(graph, 10**12, "every_block")).peak_bytes
    budget = every_block_peak - 1000
    chain = solve(graph, budget, "chain")
    plan = solve(graph, budget, "hierarchical")
    assert simulate(graph, plan).peak_bytes <= budget
    assert plan.predicted_time_ms <= chain.predicted_time_ms + 1e-9
    assert max(plan.options["forward_reruns"]) >= 1
    without = solve_hierarchical(graph, budget, with_reruns=False)   # keep/drop only: greedy's fallback
    assert without.options.get("fallback") == "greedy"
    assert simulate(graph, without).time_ms >= plan.predicted_time_ms - 1e-9


def test_below_every_dp_greedy_runs_only_where_drop_all_finds_no_plan(monkeypatch) -> None:
    """Where no DP plan fits, on graphs over `GREEDY_AFTER_DROP_ALL_MAX_OPS` ops, drop-all's
    plan is the fallback and greedy does not run (the plan says so); ``auto`` does not run
    it either. On smaller graphs both run and the faster wins."""
    import solvers.baselines
    import solvers.portfolio as portfolio
    from test_chain import uniform_chain
    graph = uniform_chain(12)
    budget = simulate(graph, solve(graph, 10**12, "every_block")).peak_bytes - 1000
    greedy_calls = []
    original = solvers.baselines.solve_greedy
    monkeypatch.setattr(portfolio, "solve_greedy", lambda *a, **k: greedy_calls.append(1) or original(*a, **k))
    small = solve_hierarchical(graph, budget, with_reruns=False)
    assert small.options["fallback"] == "greedy" and "greedy" in small.options["solvers_run"] and greedy_calls
    monkeypatch.setattr(portfolio, "GREEDY_AFTER_DROP_ALL_MAX_OPS", 0)
    greedy_calls.clear()
    large = solve_hierarchical(graph, budget, with_reruns=False)
    assert large.options["fallback"] == "drop-all" and not greedy_calls
    assert "greedy" not in large.options["solvers_run"] and "greedy" in large.options["solvers_covered"]
    assert simulate(graph, large).peak_bytes <= budget


def test_drop_all_fallback_below_every_dp(monkeypatch) -> None:
    """Above GREEDY_MAX_OPS ops the fallback is one replay of every droppable
    storage recomputed (boundaries alive at the peak dropped in rounds), not greedy's O(R)
    replays: below what the DPs reach it fits, no lower than greedy's own floor by much,
    and trains with the plain model's gradients."""
    monkeypatch.setattr(portfolio, "GREEDY_MAX_OPS", 0)
    model, inputs, step, graph = trace_zoo("gpt")

    def least_fitting(solver: str) -> int:
        low, high = resolve_budget(0.01, graph).budget_bytes // 2, resolve_budget(1.0, graph).budget_bytes
        while high - low > high // 256:
            middle = (low + high) // 2
            try:
                solve(graph, middle, solver)
                high = middle
            except InfeasibleBudgetError:
                low = middle
        return high

    floor = least_fitting("hierarchical")
    plan = solve(graph, floor, "hierarchical")
    assert plan.options.get("fallback") == "drop-all", plan.options
    assert simulate(graph, plan).peak_bytes <= floor
    with pytest.raises(InfeasibleBudgetError) as greedy_refused:      # greedy's lowest peak, in one search
        solve_greedy(graph, 1)
    assert floor <= greedy_refused.value.least_feasible_bytes * 1.02
    scheduled_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(scheduled_model, step, graph, plan)
    assert_same_training_step(scheduled, scheduled_model, reference, inputs, label="drop-all fallback")


def test_drop_all_remakes_each_boundary_once_where_the_loss_leaves_no_room_for_one() -> None:
    """A language model whose loss sets the floor (vocabulary 4,096 against width 32; GPT-2
    at 4 x 512 tokens is the real case): at the floor no block boundary fits beside the
    loss. Released after each use, the dropped boundaries are remade from the tokens for
    every backward op, O(blocks^2) block runs; `drop_all_plan` holds them once remade, and
    what each block's backward remakes of that block, from the backward op after the loss's
    peak on. Its plan fits, runs each forward op a few times instead of dozens, and trains
    with the plain model's gradients within its budget by the tracker."""
    from planner.capture import capture
    from planner.memory import measure_step_memory
    from planner.profile import profile
    from planner.zoo import GPT
    from solvers.kernel.program import plan_from_decisions
    from solvers.kernel.segments import segmentations
    from solvers.plan import StepKind

    torch.manual_seed(0)
    model = GPT(n_layer=6, n_head=2, d_model=32, seq_len=64, vocab_size=4096, dropout=0.0)
    stream = torch.randint(4096, (4, 65))
    inputs = (stream[:, :-1].contiguous(), stream[:, 1:].contiguous())
    step = capture(model, inputs)
    graph = profile(step, model, inputs, repeats=1)
    segments = segmentations(graph)[0]
    block_output_bytes = 4 * 64 * 32 * 4
    budget_bytes = least_feasible_lower_bound(graph).total + block_output_bytes // 4
    plan = hierarchical.drop_all_plan(graph, budget_bytes, segments)
    assert plan.options.get("hold_remade") and plan.options["hold_remade_from"] > 0, plan.options
    assert plan.options.get("hold_remade_for") == "segment", plan.options
    released = plan_from_decisions(graph, dict(plan.decisions), "released", budget_bytes, free_intermediates=True,
                                   hold_for_next_op=bool(plan.options.get("hold_for_next_op")))
    forward_ops = {op.name for op in graph.forward_ops}

    def most_runs(of: Plan) -> int:
        return max(Counter(s.name for s in of.backward if s.kind is StepKind.RUN and s.name in forward_ops).values())

    held_result, released_result = simulate(graph, plan), simulate(graph, released)
    assert held_result.peak_bytes <= budget_bytes
    assert most_runs(plan) * 10 < most_runs(released)
    assert held_result.time_ms * 3 < released_result.time_ms
    scheduled_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(scheduled_model, step, graph, plan)
    assert_same_training_step(scheduled, scheduled_model, reference, inputs, label="drop-all at the loss's floor")
    scheduled_model.zero_grad(set_to_none=True)
    resident = [*scheduled_model.parameters(), *scheduled_model.buffers(), *inputs]
    _, report = measure_step_memory(lambda: scheduled(*inputs).backward(), "cpu", resident)
    assert report.peak_bytes <= budget_bytes


def kept_output_raises_the_peak_by_more_than_its_size() -> tuple[Graph, dict[str, Decision]]:
    """A graph (found by a hypothesis search) where keeping the 16-byte ``a4_0`` instead of
    recomputing it raises the peak by 256 bytes: without the re-run of its op ``f4`` the
    schedule builder orders the other recomputation differently."""
    fwd, bwd, act, work = Phase.FORWARD, Phase.BACKWARD, ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    ops = (Op("f0", ("x", "w0"), ("a0_0",), fwd, 0.75), Op("f1", ("a0_0",), ("a1_0",), fwd, 3.25, tmp_bytes=64),
           Op("f2", ("a0_0",), ("v2",), fwd, 0.0), Op("f3", ("x",), ("a3_0", "a3_1"), fwd, 1.75),
           Op("f4", ("a1_0", "v2"), ("a4_0", "a4_1"), fwd, 1.75, tmp_bytes=256),
           Op("f5", ("a3_0",), ("a5_0",), fwd, 3.0, tmp_bytes=64),
           Op("b0", ("tangent0", "a4_0"), ("g0_0", "g0_1"), bwd, 0.5), Op("b1", ("g0_1", "a1_0"), ("g1_0",), bwd, 0.25),
           Op("b2", ("g0_0",), ("gv2",), bwd, 0.0), Op("b3", ("g0_0",), ("gv3",), bwd, 0.0),
           Op("b4", ("gv3", "a4_0", "a4_1"), ("g4_0",), bwd, 0.75),
           Op("b5", ("gv3", "g1_0"), ("g5_0", "g5_1"), bwd, 2.5, tmp_bytes=256))
    values = (Value("w0", 272, ValueKind.PARAMETER), Value("x", 256, ValueKind.INPUT),
              Value("tangent0", 224, ValueKind.TANGENT), Value("a0_0", 224, act, "f0"), Value("a1_0", 128, act, "f1"),
              Value("v2", 0, act, "f2", alias_of="a0_0"), Value("a3_0", 128, act, "f3"), Value("a3_1", 432, act, "f3"),
              Value("a4_0", 16, act, "f4"), Value("a4_1", 192, act, "f4"), Value("a5_0", 224, act, "f5"),
              Value("g0_0", 64, work, "b0"), Value("g0_1", 448, work, "b0"), Value("g1_0", 32, work, "b1"),
              Value("gv2", 0, work, "b2", alias_of="g0_0"), Value("gv3", 0, work, "b3", alias_of="g0_0"),
              Value("g4_0", 432, work, "b4"), Value("g5_0", 224, work, "b5"), Value("g5_1", 208, work, "b5"))
    graph = Graph(ops=ops, values=values, placeholders=("w0", "x", "tangent0"), forward_outputs=("a5_0",),
                  gradients=("gv2",))
    return graph, {"a1_0": Decision.RECOMPUTE, "a4_0": Decision.RECOMPUTE, "a4_1": Decision.KEEP}


def test_the_restore_pass_replays_what_it_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The restore pass keeps storages again without a replay while the peak plus their
    size fits; that bound can fail, so its result is replayed and, if over the budget,
    made again with a replay per trial: it never returns decisions that do not fit. (No
    replays allowed for the rest, so that keeping ``a1_0`` as well cannot rescue it.)"""
    monkeypatch.setattr(hierarchical, "RESTORE_REPLAYS", 0)
    graph, decisions = kept_output_raises_the_peak_by_more_than_its_size()
    checker = Replays(graph, 0)
    peak_bytes = checker.measure(decisions)[0]
    kept = {**decisions, "a4_0": Decision.KEEP}
    assert checker.measure(kept)[0] - peak_bytes > graph.value("a4_0").size_bytes   # the bound fails here
    checker = Replays(graph, peak_bytes + graph.value("a4_0").size_bytes)
    restored, _ = restore(graph, decisions, checker)
    assert checker.measure(restored)[0] <= checker.budget_bytes


class _SizeBoundReplays:
    """A stand-in for `Replays` with the restore pass's bound built in: keeping a storage
    raises the peak by its size and saves 1 ms, except that keeping ``breaker`` raises it
    by ``extra_bytes`` more."""

    def __init__(self, graph: Graph, start: dict[str, Decision], breaker: str, extra_bytes: int,
                 budget_bytes: int) -> None:
        self.graph, self.start, self.breaker, self.extra_bytes = graph, start, breaker, extra_bytes
        self.budget_bytes = budget_bytes

    def measure(self, decisions: dict[str, Decision]) -> tuple[int, float]:
        kept = [root for root, decision in decisions.items()
                if decision is Decision.KEEP and self.start[root] is Decision.RECOMPUTE]
        peak_bytes = 1000 + sum(self.graph.value(root).size_bytes for root in kept)
        return peak_bytes + (self.extra_bytes if self.breaker in kept else 0), 100.0 - len(kept)

    def fits(self, decisions: dict[str, Decision]) -> bool:
        return self.measure(decisions)[0] <= self.budget_bytes

    def time_ms(self, decisions: dict[str, Decision]) -> float:
        return self.measure(decisions)[1]


def test_where_the_size_bound_fails_restore_keeps_what_was_trusted_before_the_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When keeping the last storage the bound trusted breaks the budget, what was trusted
    before it stays kept (found by bisection), not only what the replayed trials can win
    back: with no replays allowed for trials, every storage but the last comes back."""
    monkeypatch.setattr(hierarchical, "RESTORE_REPLAYS", 0)
    graph, _ = kept_output_raises_the_peak_by_more_than_its_size()
    dropped = ("a0_0", "a1_0", "a3_0", "a3_1", "a4_0", "a4_1")
    decisions = {root: Decision.RECOMPUTE for root in dropped}
    trusted_first = sorted(dropped, key=lambda root: hierarchical.recompute_time_ms(graph, root)
                           / (graph.value(root).size_bytes + 1), reverse=True)
    budget_bytes = 1000 + sum(graph.value(root).size_bytes for root in dropped)
    replays = _SizeBoundReplays(graph, decisions, trusted_first[-1], 1, budget_bytes)
    restored, count = restore(graph, decisions, replays)
    assert replays.fits(restored)
    assert count == len(dropped) - 1
    assert [root for root in dropped if restored[root] is Decision.RECOMPUTE] == [trusted_first[-1]]


def test_a_chain_rerun_short_by_a_few_units_is_solved_again_in_finer_ones() -> None:
    """ResNet-50's graph as estimated for an H100 (experiments/real_models.py's builder,
    `planner.estimate.estimated_graph`, its host link set to "nominal" so that nothing is
    offloaded) at 288.8 MiB, 1.045x the lowest peak any solver reaches: ``chain`` in its
    default 200 units has no plan (its sizes round up by up to a unit each), and the
    portfolio's fallback was drop-all at +90.9 %. In `portfolio.CHAIN_FINE_RESOLUTION`
    units the chain DP fits, and wins (+41.5 %)."""
    import gzip
    import json
    from pathlib import Path

    data = Path(__file__).with_name("data") / "resnet50_h100_estimate_no_offload.graph.json.gz"
    graph = Graph.from_json(json.loads(gzip.decompress(data.read_bytes())))
    budget_bytes = int(288.8 * 2**20)
    with pytest.raises(InfeasibleBudgetError):
        portfolio.solve_chain(graph, budget_bytes, options_per_segment=8)
    plan = solve(graph, budget_bytes, "hierarchical")
    result = simulate(graph, plan, check_hash=False)
    assert result.peak_bytes <= budget_bytes
    assert plan.options["source"].startswith("chain/")
    assert result.time_ms < 1.5 * graph.total_time_ms
