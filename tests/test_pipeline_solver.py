"""The ``pipeline`` solver: its split DP against enumeration on random chains (step time,
infeasibility and the least extra bytes), stage peaks recomputed from the documented
formula, monotonicity in the budgets, K = 1 against the single-device chain DP, the
baselines, and a plan for the zoo's tiny GPT (op coverage, JSON round trip, corrupt files).

Times are multiples of 0.25 ms and the link moves 4 bytes per ms, so every predicted time
is exact in floating point and the tests compare times with ``==``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import given, settings, strategies as st

from solvers import InfeasibleBudgetError, PlanFormatError, PlanMismatchError, UnsupportedGraphError
from solvers.hierarchical import choose_levels
from solvers.kernel.options import OptionCost
from solvers.pipeline import (PipelineChain, PipelinePlan, SegmentCosts, brute_force_pipeline, evaluate_split,
                              pipeline_chain, solve_pipeline, solve_pipeline_chain, split_balance_by_time,
                              split_equal_layers)
from solvers.kernel.program import saved_roots
from helpers import trace_zoo

LINK_BYTES_PER_MS = 4.0
EXACT = 10**12                       # a resolution whose unit is one byte for these chains
quarters = st.integers(0, 24).map(lambda n: n / 4)


# -- random chains ---------------------------------------------------------------------------------

@st.composite
def segment_costs(draw: st.DrawFn) -> SegmentCosts:
    """1-3 options: saved bytes falling, recompute time rising, option 0 free."""
    count = draw(st.integers(1, 3))
    saved = sorted(draw(st.lists(st.integers(0, 60), min_size=count, max_size=count, unique=True)), reverse=True)
    times = [0.0] + sorted(draw(st.lists(quarters.filter(lambda t: t > 0), min_size=count - 1,
                                         max_size=count - 1)))
    options = tuple(OptionCost(saved_bytes=s, need_bytes=draw(st.integers(0, 80)), time_ms=t)
                    for s, t in zip(saved, times))
    return SegmentCosts(forward_ms=draw(quarters), backward_ms=draw(quarters), param_bytes=draw(st.integers(0, 40)),
                        options=options, model_input_bytes=draw(st.sampled_from((0, 0, 4, 10))),
                        gradient_bytes=draw(st.sampled_from((0, 0, 8, 20))))


@st.composite
def pipeline_chains(draw: st.DrawFn, min_segments: int = 2, max_segments: int = 6) -> PipelineChain:
    segments = tuple(draw(st.lists(segment_costs(), min_size=min_segments, max_size=max_segments)))
    cuts = (0,) + tuple(draw(st.integers(0, 30)) for _ in segments[1:]) + (0,)
    return PipelineChain(segments, cuts)


@st.composite
def problems(draw: st.DrawFn, max_segments: int = 6):
    """A chain, K budgets, M, a schedule. Mostly, the budgets lie between the least and the
    keep-all peak of each stage of a random split (so plans recompute); sometimes anywhere
    between nothing and a bit over the loosest peak (mostly infeasible, or keep-all)."""
    chain = draw(pipeline_chains(max_segments=max_segments))
    stages = draw(st.integers(1, min(3, chain.num_segments)))
    microbatches = draw(st.integers(1, 4))
    schedule = draw(st.sampled_from(("gpipe", "1f1b")))
    if draw(st.integers(0, 3)) == 0:
        loose = loosest_peak_bytes(chain, microbatches)
        return chain, [int(loose * draw(st.floats(0.0, 1.1))) for _ in range(stages)], microbatches, schedule
    cuts = sorted(draw(st.lists(st.integers(1, chain.num_segments - 1), min_size=stages - 1, max_size=stages - 1,
                                unique=True)))
    bounds = [0] + cuts + [chain.num_segments]
    budgets = []
    for stage, (first, end) in enumerate(zip(bounds, bounds[1:])):
        peaks = [expected_stage(chain, first, end, levels, stage, stages, microbatches, schedule)[1]
                 for levels in itertools.product(*(range(len(s.options)) for s in chain.segments[first:end]))]
        tight = draw(st.integers(0, 7)) == 0
        budgets.append(min(peaks) - 3 if tight else draw(st.integers(min(peaks), max(peaks) + 4)))
    return chain, budgets, microbatches, schedule


def loosest_peak_bytes(chain: PipelineChain, microbatches: int) -> int:
    """A peak no stage of any plan exceeds: everything at its largest, all micro-batches in flight."""
    saved = sum(max(o.saved_bytes for o in s.options) for s in chain.segments)
    transient = max(o.need_bytes for s in chain.segments for o in s.options)
    static = sum(s.param_bytes + s.gradient_bytes + microbatches * s.model_input_bytes for s in chain.segments)
    return static + 3 * microbatches * max(chain.cut_bytes) + microbatches * (saved + max(chain.cut_bytes)) \
        + saved + transient


# -- the model, written out again --------------------------------------------------------------------

def expected_stage(chain: PipelineChain, first: int, end: int, levels, stage: int, stages: int, microbatches: int,
                   schedule: str) -> tuple[float, int]:
    """(time ms per micro-batch, peak bytes) of a stage, straight from the module docstring."""
    segments = chain.segments[first:end]
    chosen = [segment.options[level] for segment, level in zip(segments, levels)]
    in_flight = microbatches if schedule == "gpipe" else min(microbatches, stages - stage)
    saved = sum(option.saved_bytes for option in chosen)
    working = max([saved] + [sum(o.saved_bytes for o in chosen[:k]) + chosen[k].need_bytes
                             for k in range(len(chosen))])
    peak = (sum(s.param_bytes for s in segments) + microbatches * sum(s.model_input_bytes for s in segments)
            + (sum(s.gradient_bytes for s in segments) if microbatches > 1 else 0)
            + (2 * microbatches * chain.cut_bytes[first] if stage > 0 else 0)
            + (microbatches * chain.cut_bytes[end] if stage < stages - 1 else 0)
            + (in_flight - 1) * (saved + chain.cut_bytes[end]) + working)
    time_ms = (sum(s.forward_ms + s.backward_ms for s in segments) + sum(o.time_ms for o in chosen)
               + (chain.cut_bytes[first] + chain.cut_bytes[end]) / LINK_BYTES_PER_MS)
    return time_ms, peak


def check_solution(chain: PipelineChain, solution, budgets, microbatches: int, schedule: str) -> None:
    """Contiguous stages covering the chain, each stage's time and peak as the formula
    says, every peak within its budget, the step time and bubble as documented."""
    stages = len(budgets)
    assert [stage.index for stage in solution.stages] == list(range(stages))
    assert solution.stages[0].first_segment == 0 and solution.stages[-1].end_segment == chain.num_segments
    for before, after in zip(solution.stages, solution.stages[1:]):
        assert before.end_segment == after.first_segment > before.first_segment
    times = []
    for stage in solution.stages:
        time_ms, peak = expected_stage(chain, stage.first_segment, stage.end_segment, stage.levels, stage.index,
                                       stages, microbatches, schedule)
        assert (stage.time_ms, stage.peak_bytes) == (time_ms, peak)
        assert stage.peak_bytes == stage.static_bytes + stage.receive_bytes + stage.in_flight_bytes \
            + stage.working_bytes
        assert peak <= budgets[stage.index]
        times.append(time_ms)
    assert solution.feasible
    assert solution.step_time_ms == sum(times) + (microbatches - 1) * max(times)
    assert solution.bubble_ms == solution.step_time_ms - microbatches * max(times)


def solve(chain, budgets, microbatches, schedule, resolution=EXACT):
    return solve_pipeline_chain(chain, budgets, microbatches=microbatches, schedule=schedule,
                                link_bytes_per_ms=LINK_BYTES_PER_MS, resolution=resolution)


def brute(chain, budgets, microbatches, schedule):
    return brute_force_pipeline(chain, budgets, microbatches=microbatches, schedule=schedule,
                                link_bytes_per_ms=LINK_BYTES_PER_MS)


# -- the DP against enumeration --------------------------------------------------------------------

@settings(max_examples=300)
@given(problem=problems())
def test_dp_matches_brute_force(problem) -> None:
    chain, budgets, microbatches, schedule = problem
    try:
        best = brute(chain, budgets, microbatches, schedule)
    except InfeasibleBudgetError as reference:
        with pytest.raises(InfeasibleBudgetError) as raised:
            solve(chain, budgets, microbatches, schedule)
        extra = raised.value.least_feasible_bytes - raised.value.budget_bytes
        assert extra == reference.least_feasible_bytes - reference.budget_bytes > 0
        # the promise of the message: that many more bytes on every device is enough
        check_solution(chain, solve(chain, [b + extra for b in budgets], microbatches, schedule),
                       [b + extra for b in budgets], microbatches, schedule)
        return
    check_solution(chain, best, budgets, microbatches, schedule)
    found = solve(chain, budgets, microbatches, schedule)
    check_solution(chain, found, budgets, microbatches, schedule)
    assert found.step_time_ms == best.step_time_ms


KEEP_ALL = (OptionCost(0, 0, 0.0),)
# Segments of 2, 2 and 4 ms, 4 bytes (1 ms) across the second cut, none across the first.
# Split (1, 2): stages of 2 and 6 ms, sum 8, max 6; split (2, 1): 5 and 5 ms, sum 10, max 5.
# One micro-batch: 8 < 10; four: 8 + 3 * 6 = 26 > 10 + 3 * 5 = 25.
SUM_OR_MAX = PipelineChain((SegmentCosts(1.0, 1.0, 0, KEEP_ALL), SegmentCosts(1.0, 1.0, 0, KEEP_ALL),
                            SegmentCosts(2.0, 2.0, 0, KEEP_ALL)), (0, 0, 4, 0))
# Segments of 4, 1 and 1 ms, no transfers: both splits sum to 6, the slowest stage is the first.
# (1, 2): 4 and 2 ms, 6 + 3 * 4 = 18; (2, 1): 5 and 1 ms, 6 + 3 * 5 = 21.
SLOW_FIRST = PipelineChain((SegmentCosts(2.0, 2.0, 0, KEEP_ALL), SegmentCosts(0.5, 0.5, 0, KEEP_ALL),
                            SegmentCosts(0.5, 0.5, 0, KEEP_ALL)), (0, 0, 0, 0))


@pytest.mark.parametrize("chain, microbatches, balance, step_time_ms", [
    (SUM_OR_MAX, 1, (1, 2), 8.0), (SUM_OR_MAX, 4, (2, 1), 25.0), (SLOW_FIRST, 4, (1, 2), 18.0)])
def test_the_objective_is_neither_least_sum_nor_least_max(chain: PipelineChain, microbatches: int, balance,
                                                         step_time_ms: float) -> None:
    for schedule in ("gpipe", "1f1b"):
        found = solve(chain, [10**6] * 2, microbatches, schedule)
        assert (found.balance, found.step_time_ms) == (balance, step_time_ms)
        assert brute(chain, [10**6] * 2, microbatches, schedule).step_time_ms == step_time_ms


@given(problem=problems(), resolution=st.integers(1, 12))
def test_coarse_units_stay_safe(problem, resolution: int) -> None:
    """Rounded bytes: whatever the DP returns fits the exact budgets and is never faster
    than the exact optimum."""
    chain, budgets, microbatches, schedule = problem
    try:
        found = solve(chain, budgets, microbatches, schedule, resolution)
    except InfeasibleBudgetError:
        return
    check_solution(chain, found, budgets, microbatches, schedule)
    assert found.step_time_ms >= brute(chain, budgets, microbatches, schedule).step_time_ms


@given(problem=problems(), extra=st.lists(st.integers(0, 200), min_size=3, max_size=3),
       resolution=st.sampled_from((3, 10, EXACT)))
def test_more_budget_is_never_slower(problem, extra, resolution: int) -> None:
    chain, budgets, microbatches, schedule = problem
    try:
        tight = solve(chain, budgets, microbatches, schedule, resolution)
    except InfeasibleBudgetError:
        return
    loose = solve(chain, [b + e for b, e in zip(budgets, extra)], microbatches, schedule, resolution)
    assert loose.step_time_ms <= tight.step_time_ms


@given(problem=problems())
def test_1f1b_is_never_slower_than_gpipe(problem) -> None:
    """Same times, never more memory in flight (min(M, K - s) <= M)."""
    chain, budgets, microbatches, _ = problem
    try:
        gpipe = solve(chain, budgets, microbatches, "gpipe")
    except InfeasibleBudgetError:
        return
    assert solve(chain, budgets, microbatches, "1f1b").step_time_ms <= gpipe.step_time_ms


@given(chain=pipeline_chains(min_segments=1), fraction=st.floats(0.0, 1.1))
def test_one_stage_is_the_single_device_chain_dp(chain: PipelineChain, fraction: float) -> None:
    budget = int(loosest_peak_bytes(chain, 1) * fraction)
    static = sum(s.param_bytes + s.model_input_bytes for s in chain.segments)
    levels = choose_levels([list(s.options) for s in chain.segments], budget - static,
                           resolution=max(1, budget - static))
    if levels is None:
        with pytest.raises(InfeasibleBudgetError, match="least feasible"):
            solve(chain, [budget], 1, "1f1b")
        return
    found = solve(chain, [budget], 1, "1f1b")
    recompute_ms = sum(s.options[level].time_ms for s, level in zip(chain.segments, levels))
    assert found.step_time_ms == sum(s.forward_ms + s.backward_ms for s in chain.segments) + recompute_ms


# -- baselines -------------------------------------------------------------------------------------

def test_equal_layers_gives_the_remainder_to_the_first_stages() -> None:
    chain = PipelineChain(tuple(SegmentCosts(1.0, 2.0, 0, (OptionCost(0, 0, 0.0),)) for _ in range(7)), (0,) * 8)
    assert split_equal_layers(chain, 3) == (3, 2, 2)
    assert split_equal_layers(chain, 7) == (1,) * 7
    with pytest.raises(ValueError, match="num_stages"):
        split_equal_layers(chain, 8)


@given(chain=pipeline_chains(), stages=st.integers(1, 3))
def test_balance_by_time_minimizes_the_slowest_stage(chain: PipelineChain, stages: int) -> None:
    stages = min(stages, chain.num_segments)
    work = [s.forward_ms + s.backward_ms for s in chain.segments]

    def slowest(balance) -> float:
        ends = list(itertools.accumulate(balance))
        return max(sum(work[first:end]) for first, end in zip([0] + ends[:-1], ends))

    balance = split_balance_by_time(chain, stages)
    assert len(balance) == stages and sum(balance) == chain.num_segments and min(balance) >= 1
    every = [b for b in itertools.product(range(1, chain.num_segments + 1), repeat=stages)
             if sum(b) == chain.num_segments]
    assert slowest(balance) == min(slowest(b) for b in every)


@given(problem=problems())
def test_baselines_are_never_faster_than_the_dp(problem) -> None:
    chain, budgets, microbatches, schedule = problem
    stages = len(budgets)
    try:
        best = solve(chain, budgets, microbatches, schedule).step_time_ms
    except InfeasibleBudgetError:
        best = None
    for balance in {split_equal_layers(chain, stages), split_balance_by_time(chain, stages)}:
        for stage_plan in ("best", "every_block", "keep_all"):
            baseline = evaluate_split(chain, balance, budgets, microbatches=microbatches, schedule=schedule,
                                      stage_plan=stage_plan, link_bytes_per_ms=LINK_BYTES_PER_MS,
                                      resolution=EXACT)
            assert baseline.balance == balance
            for stage in baseline.stages:
                assert (stage.time_ms, stage.peak_bytes) == expected_stage(
                    chain, stage.first_segment, stage.end_segment, stage.levels, stage.index, stages,
                    microbatches, schedule)
                assert stage.fits == (stage.peak_bytes <= budgets[stage.index])
                every_level = tuple(len(s.options) - 1 for s in chain.segments[stage.first_segment:stage.end_segment])
                if stage_plan == "keep_all":
                    assert set(stage.levels) == {0}
                elif stage_plan == "every_block":
                    assert set(stage.levels) == {0} or stage.levels == every_level
            assert baseline.feasible == all(stage.fits for stage in baseline.stages)
            if baseline.feasible:
                assert best is not None and best <= baseline.step_time_ms


def test_invalid_arguments_name_the_fix() -> None:
    chain = PipelineChain(tuple(SegmentCosts(1.0, 2.0, 0, (OptionCost(0, 0, 0.0),)) for _ in range(2)), (0, 5, 0))
    with pytest.raises(UnsupportedGraphError, match="num_stages <= 2"):
        solve(chain, [100] * 3, 1, "1f1b")
    with pytest.raises(ValueError, match="microbatches"):
        solve(chain, [100] * 2, 0, "1f1b")
    with pytest.raises(ValueError, match="gpipe, 1f1b"):
        solve(chain, [100] * 2, 1, "interleaved")
    with pytest.raises(ValueError, match="stage_plan"):
        evaluate_split(chain, (1, 1), [100, 100], microbatches=1, stage_plan="sometimes")
    with pytest.raises(ValueError, match="balance"):
        evaluate_split(chain, (2, 0), [100, 100], microbatches=1)
    with pytest.raises(UnsupportedGraphError, match="cut_bytes"):
        PipelineChain(chain.segments, (0, 0))


# -- a real graph ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt():
    graph = trace_zoo("gpt", "tiny", "cpu")[3]
    chain, segments, options = pipeline_chain(graph)
    keep_all = evaluate_split(chain, split_equal_layers(chain, 2), [0, 0], microbatches=4, stage_plan="keep_all")
    return graph, chain, max(stage.peak_bytes for stage in keep_all.stages)


def between_least_and_keep_all(chain, schedule: str = "1f1b") -> int:
    """A budget halfway between the least feasible one and the equal split's keep-all peak:
    recompute or another split is needed, and a plan exists."""
    keep_all = evaluate_split(chain, split_equal_layers(chain, 2), [0, 0], microbatches=4, schedule=schedule,
                              stage_plan="keep_all")
    with pytest.raises(InfeasibleBudgetError) as raised:
        solve_pipeline_chain(chain, [1, 1], microbatches=4, schedule=schedule)
    return (raised.value.least_feasible_bytes + max(stage.peak_bytes for stage in keep_all.stages)) // 2


def test_pipeline_chain_of_a_graph(gpt) -> None:
    graph, chain, _ = gpt
    assert chain.num_segments >= 2
    assert chain.cut_bytes[0] == chain.cut_bytes[-1] == 0 and min(chain.cut_bytes[1:-1]) > 0
    assert all(s.options[0].time_ms == 0.0 for s in chain.segments)
    assert sum(s.forward_ms + s.backward_ms for s in chain.segments) == pytest.approx(graph.total_time_ms)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_plan_for_gpt(gpt, schedule: str, tmp_path) -> None:
    graph, chain, _ = gpt
    budget = between_least_and_keep_all(chain, schedule)
    plan = solve_pipeline(graph, budget, num_stages=2, microbatches=4, schedule=schedule)
    assert plan.num_stages == len(plan.stages) == 2 and plan.budgets_bytes == (budget, budget)
    assert plan.solver == "pipeline" and plan.graph_hash == graph.hash and plan.feasible
    stage_of_op = plan.stage_of_op()
    assert set(stage_of_op) == {op.name for op in graph.ops}
    assert len(stage_of_op) == sum(len(s.forward_ops) + len(s.backward_ops) for s in plan.stages)
    forward_stages = [stage_of_op[op.name] for op in graph.forward_ops]
    assert forward_stages == sorted(forward_stages) and set(forward_stages) == {0, 1}
    assert set(plan.decisions) == set(saved_roots(graph))
    for stage in plan.stages:
        assert stage.cost.peak_bytes <= budget
        assert stage.cost.in_flight == (4 if schedule == "gpipe" else 2 - stage.index)
    times = [stage.cost.time_ms for stage in plan.stages]
    assert plan.predicted_step_time_ms == pytest.approx(sum(times) + 3 * max(times))
    plan.check_graph(graph)
    with pytest.raises(PlanMismatchError, match="Re-plan"):
        plan.check_graph(dataclasses.replace(graph, caller_bytes=graph.caller_bytes + 1))

    assert PipelinePlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = PipelinePlan.load(str(path))
    assert loaded == plan and loaded.graph.hash == graph.hash
    path.write_text(path.read_text()[:-200])
    with pytest.raises(PlanFormatError, match="truncated"):
        PipelinePlan.load(str(path))
    data = plan.to_json()
    with pytest.raises(PlanFormatError, match="format"):
        PipelinePlan.from_json({**data, "format": "memsched.plan/1"})
    with pytest.raises(PlanFormatError, match="corrupt"):
        PipelinePlan.from_json({key: value for key, value in data.items() if key != "stages"})
    with pytest.raises(PlanFormatError, match="corrupt"):
        PipelinePlan.from_json({**data, "stages": data["stages"][:1]})


def test_gpt_baselines_are_never_faster(gpt) -> None:
    graph, chain, keep_all_peak = gpt
    budgets = [between_least_and_keep_all(chain)] * 2
    best = solve_pipeline_chain(chain, budgets, microbatches=4, resolution=EXACT)
    for balance in (split_equal_layers(chain, 2), split_balance_by_time(chain, 2)):
        for stage_plan in ("best", "every_block", "keep_all"):
            baseline = evaluate_split(chain, balance, budgets, microbatches=4, stage_plan=stage_plan,
                                      resolution=EXACT)
            if baseline.feasible:
                assert best.step_time_ms <= baseline.step_time_ms + 1e-9


def test_gpt_infeasible_budget_names_what_is_needed(gpt) -> None:
    graph, chain, keep_all_peak = gpt
    with pytest.raises(InfeasibleBudgetError) as raised:
        solve_pipeline(graph, keep_all_peak // 10, num_stages=2, microbatches=4)
    assert "device" in str(raised.value) and raised.value.least_feasible_bytes > keep_all_peak // 10
    plan = solve_pipeline(graph, raised.value.least_feasible_bytes, num_stages=2, microbatches=4)
    assert plan.feasible


def test_solve_pipeline_validates_its_arguments(gpt) -> None:
    graph, chain, keep_all_peak = gpt
    with pytest.raises(ValueError, match="one budget per stage"):
        solve_pipeline(graph, [keep_all_peak] * 3, num_stages=2, microbatches=4)
    with pytest.raises(UnsupportedGraphError, match="num_stages <="):
        solve_pipeline(graph, keep_all_peak, num_stages=chain.num_segments + 1, microbatches=4)
    with pytest.raises(ValueError, match="microbatches"):
        solve_pipeline(graph, keep_all_peak, num_stages=2, microbatches=0)
    with pytest.raises(ValueError, match="schedule"):
        solve_pipeline(graph, keep_all_peak, num_stages=2, microbatches=2, schedule="zero-bubble")


@settings(max_examples=10)
@given(fraction=st.floats(0.5, 1.2))
def test_gpt_more_budget_is_never_slower(gpt, fraction: float) -> None:
    graph, chain, keep_all_peak = gpt
    budgets = [int(fraction * keep_all_peak)] * 2
    try:
        tight = solve_pipeline_chain(chain, budgets, microbatches=4)
    except InfeasibleBudgetError:
        return
    assert solve_pipeline_chain(chain, [b + 4096 for b in budgets], microbatches=4).step_time_ms \
        <= tight.step_time_ms
