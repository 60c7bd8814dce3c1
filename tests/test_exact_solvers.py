"""The exact solvers: `ilp` reaches `brute_force`'s optimum on random tiny graphs.

Both search the same plan space (solvers/brute_force.py docstring): the forward runs once
and keeps or drops each saved storage; each backward stage recomputes forward ops in graph
order, then runs its backward op. Every plan is judged by `simulate`, never by the
solver's own accounting.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from solvers import (Decision, Graph, InfeasibleBudgetError, Op, Phase, Plan, SolverUnavailableError,
                     UnsupportedGraphError, Value, ValueKind, simulate, solve)
from solvers import ilp
from solvers.brute_force import least_feasible_plan
from solvers.kernel.space import assemble_plan, plan_space, start_runs
from solvers.plan import StepKind
from strategies import budget_between, chain_graphs, keep_all_peak_bytes, small_graphs

import pulp  # noqa: E402 - a required dependency: a broken install fails here

MAX_FORWARD_OPS = 8


def feasible_budget(graph: Graph, frac: float) -> int:
    """``frac`` 0 -> the least peak any plan of the space reaches, 1 -> the keep-all peak."""
    least, _ = least_feasible_plan(graph)
    return least + int(frac * (keep_all_peak_bytes(graph) - least))


def out_of_space(graph: Graph, plan: Plan) -> str | None:
    """Why ``plan`` is not in the exact solvers' space, or None when it is."""
    space = plan_space(graph)
    if [s.name for s in plan.forward if s.kind is StepKind.RUN] != [op.name for op in graph.forward_ops]:
        return "the forward does not run every forward op once, in order"
    if any(s.kind in (StepKind.OFFLOAD, StepKind.PREFETCH) for s in plan.forward + plan.backward):
        return "offloads"
    live: set[str] = set()
    last = -1       # graph index of the last forward op recomputed in the current stage
    for phase, step in [(Phase.FORWARD, s) for s in plan.forward] + [(Phase.BACKWARD, s) for s in plan.backward]:
        if step.kind is StepKind.FREE:
            live.discard(step.name)
            continue
        op = graph.op(step.name)
        if phase is Phase.FORWARD or op.phase is Phase.BACKWARD:
            last = -1
        else:
            index = space.forward_index[op.name]
            if op.name not in space.recomputable:
                return f"recomputes {op.name}, which the space never recomputes"
            if index <= last:
                return f"recomputes {op.name} out of graph order within a stage"
            if any(graph.value(name).root in space.own_roots[op.name] for name in live):
                return f"recomputes {op.name} while a value on its old storage is live"
            last = index
        live.update(op.outputs)
    return None


def replay_time(graph: Graph, plan: Plan, budget_bytes: int) -> float:
    result = simulate(graph, plan)
    assert result.peak_bytes <= budget_bytes
    assert plan.predicted_peak_bytes == result.peak_bytes and plan.predicted_time_ms == result.time_ms
    return result.time_ms


@given(graph=small_graphs(max_forward_ops=MAX_FORWARD_OPS), frac=st.floats(0.0, 1.2))
def test_ilp_matches_brute_force(graph: Graph, frac: float) -> None:
    budget = budget_between(graph, frac)
    try:
        best = solve(graph, budget, "brute_force")
    except InfeasibleBudgetError as error:
        least, _ = least_feasible_plan(graph)
        assert error.least_feasible_bytes >= least > budget or error.solver.startswith("lower bound")
        with pytest.raises(InfeasibleBudgetError, match="least feasible"):
            solve(graph, budget, "ilp")
        return
    plan = solve(graph, budget, "ilp")
    assert plan.optimal and plan.gap == 0.0 and best.optimal
    assert replay_time(graph, plan, budget) == pytest.approx(replay_time(graph, best, budget), rel=1e-6)


@given(graph=small_graphs(max_forward_ops=MAX_FORWARD_OPS), frac=st.floats(0.0, 1.0))
def test_ilp_optimal_and_no_slower_than_greedy(graph: Graph, frac: float) -> None:
    """Budgets where a plan exists: ilp = brute_force, and ilp <= greedy whenever greedy's
    plan lies in the space (greedy recomputes depth-first just in time, so its order within
    a stage can leave it)."""
    budget = feasible_budget(graph, frac)
    plan = solve(graph, budget, "ilp")
    assert out_of_space(graph, plan) is None
    ilp_ms = replay_time(graph, plan, budget)
    assert ilp_ms == pytest.approx(replay_time(graph, solve(graph, budget, "brute_force"), budget), rel=1e-6)
    try:
        greedy = solve(graph, budget, "greedy")
    except InfeasibleBudgetError:
        return
    if out_of_space(graph, greedy) is None:
        assert ilp_ms <= replay_time(graph, greedy, budget) * (1 + 1e-9)


@given(graph=st.integers(1, 6).flatmap(chain_graphs), frac=st.floats(0.0, 1.0))
def test_ilp_matches_brute_force_on_chains(graph: Graph, frac: float) -> None:
    budget = feasible_budget(graph, frac)
    ilp_ms = replay_time(graph, solve(graph, budget, "ilp"), budget)
    assert ilp_ms == pytest.approx(replay_time(graph, solve(graph, budget, "brute_force"), budget), rel=1e-6)


@given(graph=small_graphs(max_forward_ops=MAX_FORWARD_OPS), extra=st.integers(0, 1000))
def test_no_overhead_at_or_above_keep_all_peak(graph: Graph, extra: int) -> None:
    budget = keep_all_peak_bytes(graph) + extra
    for solver in ("ilp", "brute_force"):
        plan = solve(graph, budget, solver)
        result = simulate(graph, plan)
        assert result.recompute_ms == 0.0 and result.time_ms == pytest.approx(graph.total_time_ms)
        assert plan.overhead == pytest.approx(0.0)


@given(graph=small_graphs(max_forward_ops=MAX_FORWARD_OPS))
def test_brute_force_least_feasible_is_exact(graph: Graph) -> None:
    """The least peak is reached by a plan (simulate agrees) and one byte less is refused."""
    least, plan = least_feasible_plan(graph)
    assert simulate(graph, plan).peak_bytes == least
    assert simulate(graph, solve(graph, least, "brute_force")).peak_bytes <= least
    with pytest.raises(InfeasibleBudgetError) as refused:
        solve(graph, least - 1, "brute_force")
    assert refused.value.least_feasible_bytes >= least or refused.value.solver.startswith("lower bound")
    with pytest.raises(InfeasibleBudgetError, match="least feasible"):
        solve(graph, least - 1, "ilp")


def two_branch_graph() -> Graph:
    """x -> f0 -> a (64) -> f1 -> b (64) -> f2 -> out (16); the backward reads a and b.

    Keep-all peak 208 bytes (during b2: w, x, a, b, out, t, g_b). One byte less: drop a
    (recomputed from x, w in 1 ms before b1; peak 160) rather than b (2 ms).
    """
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    values = (Value("w", 16, ValueKind.PARAMETER), Value("x", 16, ValueKind.INPUT), Value("t", 16, ValueKind.TANGENT),
              Value("a", 64, act, "f0"), Value("b", 64, act, "f1"), Value("out", 16, act, "f2"),
              Value("g_b", 16, work, "b2"), Value("g_a", 16, work, "b1"), Value("g_w", 16, work, "b0"))
    ops = (Op("f0", ("x", "w"), ("a",), Phase.FORWARD, 1.0), Op("f1", ("a",), ("b",), Phase.FORWARD, 2.0),
           Op("f2", ("b",), ("out",), Phase.FORWARD, 1.0),
           Op("b2", ("t", "b"), ("g_b",), Phase.BACKWARD, 1.0), Op("b1", ("g_b", "a"), ("g_a",), Phase.BACKWARD, 1.0),
           Op("b0", ("g_a", "x"), ("g_w",), Phase.BACKWARD, 1.0))
    return Graph(ops=ops, values=values, placeholders=("w", "x", "t"), forward_outputs=("out",),
                 gradients=("g_w",), name="two_branch")


@pytest.mark.parametrize("solver", ["ilp", "brute_force"])
def test_hand_graph_optimum(solver: str) -> None:
    graph = two_branch_graph()
    keep_all = keep_all_peak_bytes(graph)
    assert simulate(graph, solve(graph, keep_all, solver)).time_ms == 7.0
    assert keep_all == 208
    plan = solve(graph, keep_all - 1, solver)
    assert plan.optimal
    assert simulate(graph, plan).time_ms == 8.0
    assert plan.decisions == {"a": "recompute", "b": "keep"}


def test_ilp_backends_agree_and_plans_are_deterministic() -> None:
    graph = two_branch_graph()
    budget = keep_all_peak_bytes(graph) - 1
    highs = solve(graph, budget, "ilp", backend="highs")
    again = solve(graph, budget, "ilp", backend="highs")
    assert (again.forward, again.backward, again.decisions) == (highs.forward, highs.backward, highs.decisions)
    cbc = solve(graph, budget, "ilp", backend="cbc", time_limit_s=10)
    assert cbc.optimal and simulate(graph, cbc).time_ms == simulate(graph, highs).time_ms
    assert Plan.from_json(highs.to_json()) == highs


def chain(length: int) -> Graph:
    """``a_i = f_i(a_{i-1})``, the backward reads every ``a_i``; 16 bytes and 1 ms each."""
    values = [Value("a0", 16, ValueKind.INPUT), Value("t", 16, ValueKind.TANGENT)]
    ops = []
    for i in range(1, length + 1):
        values.append(Value(f"a{i}", 16, ValueKind.ACTIVATION, f"f{i}"))
        ops.append(Op(f"f{i}", (f"a{i - 1}",), (f"a{i}",), Phase.FORWARD, 1.0))
    values.append(Value("g", 16, ValueKind.GRADIENT_WORK, "b"))
    ops.append(Op("b", ("t",) + tuple(f"a{i}" for i in range(length + 1)), ("g",), Phase.BACKWARD, 1.0))
    return Graph(ops=tuple(ops), values=tuple(values), placeholders=("a0", "t"), forward_outputs=(f"a{length}",),
                 gradients=("g",), name=f"chain{length}")


def test_brute_force_refuses_large_graphs() -> None:
    graph = chain(12)
    with pytest.raises(UnsupportedGraphError, match="too large for brute_force"):
        solve(graph, 10**12, "brute_force")


# -- starts: the MILP ends without an incumbent, or with a slower one -------------------------------

START_SOLVERS = ("hierarchical", "greedy", "every_block", "chain")


class NoIncumbent:
    """A MILP backend that stops as HiGHS does at a time limit before any incumbent."""

    def actualSolve(self, problem: pulp.LpProblem, **kwargs: object) -> int:   # noqa: N802 (pulp's name)
        problem.assignStatus(pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound)
        return pulp.LpStatusNotSolved


def start_times(graph: Graph, budget: int) -> dict[str, float]:
    """Simulated time of the fastest start converted from each heuristic whose plan fits."""
    space = plan_space(graph)
    times = {}
    for name in START_SOLVERS:
        try:
            decisions = solve(graph, budget, name).decisions
        except InfeasibleBudgetError:
            continue
        found = [start[2] for carry in (True, False)
                 if (start := start_runs(graph, budget, space, decisions, carry)) is not None]
        if found:
            times[name] = min(found)
    return times


@given(graph=st.integers(1, 6).flatmap(chain_graphs), frac=st.floats(0.3, 1.2))
def test_ilp_returns_the_fastest_start_when_the_milp_finds_no_plan(graph: Graph, frac: float) -> None:
    budget = budget_between(graph, frac)
    times = start_times(graph, budget)
    assume(times)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ilp, "_backend", lambda *args, **kwargs: NoIncumbent())
        plan = solve(graph, budget, "ilp", time_limit_s=0.01)
    assert out_of_space(graph, plan) is None
    fastest = min(times.values())
    first = next(name for name in START_SOLVERS if times.get(name) == fastest)
    assert replay_time(graph, plan, budget) == fastest
    assert plan.options["warm_start"] == first and plan.options["incumbent"] == f"start:{first}"
    assert not plan.optimal and plan.gap is None and plan.solver == "ilp"


def layers(length: int) -> Graph:
    """`strategies.chain_graphs`' shape with fixed sizes and times: ``a_i = f_i(a_{i-1}, w_i)``,
    ``a_i`` of 64, 128 or 192 bytes, ``f_i`` 0.25 to 1 ms, ``b_i`` 0.5 ms. At 8 layers:
    keep-all peak 1616 bytes; hierarchical and greedy fit from 1136, every_block and chain
    from 1264."""
    def size(i: int) -> int:
        return 64 * (1 + i % 3)

    values = [Value("a0", 64, ValueKind.INPUT)]
    ops = []
    for i in range(1, length + 1):
        values += [Value(f"w{i}", 16, ValueKind.PARAMETER), Value(f"a{i}", size(i), ValueKind.ACTIVATION, f"f{i}")]
        ops.append(Op(f"f{i}", (f"a{i - 1}", f"w{i}"), (f"a{i}",), Phase.FORWARD, 0.25 * (1 + i % 4)))
    values.append(Value(f"grad_a{length}", size(length), ValueKind.TANGENT))
    for i in range(length, 0, -1):
        values.append(Value(f"grad_w{i}", 16, ValueKind.GRADIENT_WORK, f"b{i}"))
        if i > 1:
            values.append(Value(f"grad_a{i - 1}", size(i - 1), ValueKind.GRADIENT_WORK, f"b{i}"))
        ops.append(Op(f"b{i}", (f"grad_a{i}", f"a{i - 1}", f"w{i}"),
                      (f"grad_w{i}",) + ((f"grad_a{i - 1}",) if i > 1 else ()), Phase.BACKWARD, 0.5))
    return Graph(ops=tuple(ops), values=tuple(values),
                 placeholders=("a0",) + tuple(f"w{i}" for i in range(1, length + 1)) + (f"grad_a{length}",),
                 forward_outputs=(f"a{length}",), gradients=tuple(f"grad_w{i}" for i in range(1, length + 1)),
                 name=f"layers{length}")


@pytest.mark.parametrize("time_limit_s", [0.0, 0.01])
def test_ilp_with_almost_no_time_is_no_slower_than_its_start(time_limit_s: float) -> None:
    """Real HiGHS: whether it stops with the start, a better incumbent or none, the plan fits
    and is no slower than the fastest heuristic start."""
    for graph, budget in ((two_branch_graph(), 207), (layers(8), 1136), (layers(8), 1296)):
        times = start_times(graph, budget)
        assert times
        plan = solve(graph, budget, "ilp", time_limit_s=time_limit_s)
        assert replay_time(graph, plan, budget) <= min(times.values())
        assert plan.options["warm_start"] in times
        assert plan.options["incumbent"] in ("milp", f"start:{plan.options['warm_start']}")


def test_ilp_without_start_or_incumbent_raises() -> None:
    graph = two_branch_graph()
    budget = keep_all_peak_bytes(graph) - 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ilp, "_backend", lambda *args, **kwargs: NoIncumbent())
        with pytest.raises(SolverUnavailableError, match="no plan found within time_limit_s=0.01 .* warm_start=False"):
            solve(graph, budget, "ilp", time_limit_s=0.01, warm_start=False)
        plan = solve(graph, budget, "ilp", time_limit_s=0.01)
    assert plan.options["incumbent"] == f"start:{plan.options['warm_start']}"
    assert simulate(graph, plan).time_ms == 8.0


def test_ilp_returns_the_start_when_the_milp_incumbent_is_slower() -> None:
    """The MILP's incumbent recomputes everything (as a time-limited one may); the start,
    keep-all, is faster and returned."""
    graph = two_branch_graph()
    budget = keep_all_peak_bytes(graph)
    space = plan_space(graph)
    keep, runs, _ = start_runs(graph, 10**18, space, {root: Decision.RECOMPUTE for root in space.droppable_roots},
                                    carry=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ilp._Model, "solution", lambda self: (keep, runs, frozenset()))
        plan = solve(graph, budget, "ilp")
    assert replay_time(graph, plan, budget) == graph.total_time_ms == 7.0
    assert plan.options["warm_start"] == "hierarchical" and plan.options["incumbent"] == "start:hierarchical"
    assert plan.optimal and plan.gap == 0.0            # keep-all: the dual bound proves it


def test_start_drops_the_kept_sibling_of_a_recomputed_output() -> None:
    """f0 makes p and q on their own storages (an attention op's output and log-sum-exp);
    a heuristic keeps q and drops p. Recomputing f0 while q is live leaves the space, so the
    start keeps neither and f0 makes both again."""
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    values = (Value("w", 16, ValueKind.PARAMETER), Value("x", 16, ValueKind.INPUT), Value("t", 16, ValueKind.TANGENT),
              Value("p", 64, act, "f0"), Value("q", 16, act, "f0"), Value("out", 16, act, "f1"),
              Value("g_p", 64, work, "b1"), Value("g_w", 16, work, "b0"))
    ops = (Op("f0", ("x", "w"), ("p", "q"), Phase.FORWARD, 1.0), Op("f1", ("p",), ("out",), Phase.FORWARD, 1.0),
           Op("b1", ("t", "p"), ("g_p",), Phase.BACKWARD, 1.0),
           Op("b0", ("g_p", "q", "x", "w"), ("g_w",), Phase.BACKWARD, 1.0))
    graph = Graph(ops=ops, values=values, placeholders=("w", "x", "t"), forward_outputs=("out",), gradients=("g_w",),
                  name="siblings")
    space = plan_space(graph)
    for carry, recomputed in ((True, ["f0"]), (False, ["f0", "f0"])):
        keep, runs, time_ms = start_runs(graph, 10**18, space, {"p": Decision.RECOMPUTE, "q": Decision.KEEP},
                                              carry)
        assert "q" not in keep and [name for name in runs if name.startswith("f")] == recomputed
        plan = assemble_plan(graph, "ilp", 10**18, keep, runs, optimal=False, gap=None)
        assert out_of_space(graph, plan) is None and simulate(graph, plan).time_ms == time_ms


def test_auto_refines_small_graphs_with_the_milp(monkeypatch) -> None:
    """Up to `portfolio.AUTO_EXACT_MAX_OPS` ops `auto` runs `ilp` briefly from the heuristics' plans:
    on this chain every heuristic recomputes 1.5 ms more than the MILP's optimum. Above the
    threshold `auto` does not try it."""
    from solvers import portfolio
    from test_chain import checkpoint_freed_early_chain
    graph = checkpoint_freed_early_chain()
    plan = solve(graph, 344, "auto")
    assert plan.solver == "ilp" and plan.predicted_time_ms == 4.0
    assert plan.options["auto_tried"][-1] == "ilp"
    assert solve(graph, 344, "hierarchical").predicted_time_ms > 4.0
    monkeypatch.setattr(portfolio, "AUTO_EXACT_MAX_OPS", 0)
    plan = solve(graph, 344, "auto")
    assert plan.solver != "ilp" and "ilp" not in plan.options["auto_tried"]


@given(graph=st.integers(2, 6).flatmap(chain_graphs))
def test_auto_does_not_run_greedy_again_where_hierarchical_refused_after_it(graph: Graph) -> None:
    """At the lower bound `hierarchical` refuses after running ``greedy`` as one of its
    fallbacks, and says so (``solvers_run``); `auto` then refuses without running greedy's
    passes a second time."""
    from solvers import baselines

    budget_bytes = budget_between(graph, 0.0)
    try:
        solve(graph, budget_bytes, "hierarchical")
        assume(False)                                 # the bound is met: nothing refused
    except InfeasibleBudgetError as refused:
        assert refused.solvers_run == ("greedy",)
    passes = []
    greedy_pass = baselines._greedy_pass

    def counted(*args):
        passes.append(1)
        return greedy_pass(*args)

    baselines._greedy_pass = counted
    try:
        with pytest.raises(InfeasibleBudgetError):
            solve(graph, budget_bytes, "greedy")
        one_run = len(passes)
        passes.clear()
        with pytest.raises(InfeasibleBudgetError):
            solve(graph, budget_bytes, "auto")
    finally:
        baselines._greedy_pass = greedy_pass
    assert len(passes) == one_run > 0


@given(graph=st.integers(2, 6).flatmap(chain_graphs), frac=st.floats(0.0, 1.0))
def test_auto_keeps_the_other_plans_it_found_as_runners_up(graph: Graph, frac: float) -> None:
    """`auto`'s plan carries the other plans its candidates found (``runners_up``): each
    fits the budget and has its own schedule; greedy's plan (which `hierarchical` runs
    for auto) is among them wherever it fits and lost."""
    budget_bytes = budget_between(graph, frac)
    try:
        plan = solve(graph, budget_bytes, "auto")
    except InfeasibleBudgetError:
        return
    schedules = [(plan.forward, plan.backward)]
    for other in plan.runners_up:
        assert simulate(graph, other).peak_bytes <= budget_bytes
        assert (other.forward, other.backward) not in schedules and not other.runners_up
        schedules.append((other.forward, other.backward))
    try:
        greedy = solve(graph, budget_bytes, "greedy")
    except InfeasibleBudgetError:
        return
    if (greedy.forward, greedy.backward) != schedules[0] and simulate(graph, greedy).peak_bytes <= budget_bytes:
        assert (greedy.forward, greedy.backward) in schedules[1:]


@given(graph=st.integers(2, 6).flatmap(chain_graphs), frac=st.floats(0.0, 1.0))
def test_auto_does_not_rerun_what_hierarchical_ran(graph: Graph, frac: float) -> None:
    """`hierarchical` runs chain, every_block and (small graphs) greedy as candidates and
    says so; `auto` then skips them and still returns a plan at least as fast as each."""
    budget_bytes = budget_between(graph, frac)
    try:
        hierarchical = solve(graph, budget_bytes, "hierarchical")
    except InfeasibleBudgetError:
        return
    plan = solve(graph, budget_bytes, "auto")
    if hierarchical.optimal:   # keep-all fits: nothing else runs
        assert plan.options["auto_tried"] == ["hierarchical"] and plan.predicted_time_ms == graph.total_time_ms
    else:
        assert {"chain", "every_block", "greedy"} <= set(hierarchical.options["solvers_run"])
        assert not {"chain", "every_block", "greedy"} & set(plan.options["auto_tried"])
    assert plan.predicted_time_ms <= hierarchical.predicted_time_ms + 1e-9
    for name in ("chain", "every_block", "greedy"):
        try:
            assert plan.predicted_time_ms <= solve(graph, budget_bytes, name).predicted_time_ms + 1e-9
        except InfeasibleBudgetError:
            pass
