"""Solvers that offload: `ilp` and `brute_force` over the exact space with offload choices,
`chain` with offloaded checkpoints (Beaumont et al., NeurIPS 2021). With a real transfer
profile every plan replays within its budget, `ilp` reaches `brute_force`'s optimum and its
copies never make compute wait, `chain` is never slower than without offload and offloads
where that pays; with the nominal profile no solver offloads and the MILP is unchanged.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import Decision, Graph, InfeasibleBudgetError, Transfer, simulate, solve
from solvers.brute_force import least_feasible_plan
from solvers.kernel.space import offload_space, plan_space
from solvers.graph import TARGETS
from solvers.plan import StepKind
from strategies import chain_graphs, keep_all_peak_bytes, small_graphs
from test_chain import uniform_chain

import pulp  # noqa: F401,E402 - a required dependency: a broken install fails here

# a link slow enough that some copies hide behind compute and some cannot; odd figures keep
# copy ends off the op boundaries (times are multiples of 0.25 ms)
SLOW_LINK = Transfer(97.0, 83.0, 0.0137, "target slow test link (97 B/ms)")
LINKS = (TARGETS["h100-pcie5"], SLOW_LINK)

graphs = st.one_of(small_graphs(max_forward_ops=6), st.integers(2, 6).flatmap(chain_graphs))


def with_link(graph: Graph, link: Transfer) -> Graph:
    return dataclasses.replace(graph, transfer=link)


def offloaded(plan) -> set[str]:
    return {root for root, decision in plan.decisions.items() if decision is Decision.OFFLOAD}


def replay(graph: Graph, plan, budget_bytes: int):
    result = simulate(graph, plan)
    assert result.peak_bytes <= budget_bytes
    return result


@settings(max_examples=30, deadline=None)
@given(graph=graphs, link=st.sampled_from(LINKS), frac=st.floats(0.0, 1.0))
def test_ilp_matches_brute_force_with_offload(graph: Graph, link: Transfer, frac: float) -> None:
    graph = with_link(graph, link)
    least, _ = least_feasible_plan(graph)
    budget = least + int(frac * (keep_all_peak_bytes(graph) - least))
    best, plan = solve(graph, budget, "brute_force"), solve(graph, budget, "ilp")
    assert plan.optimal and best.optimal
    ilp, brute = replay(graph, plan, budget), replay(graph, best, budget)
    assert ilp.time_ms == pytest.approx(brute.time_ms, rel=1e-6)
    for result in (ilp, brute):     # copies hide: the time is what the objective counts
        assert result.stall_ms == pytest.approx(0.0, abs=1e-6)
        assert result.time_ms == pytest.approx(graph.total_time_ms + result.recompute_ms, rel=1e-9)
    with pytest.raises(InfeasibleBudgetError, match="least feasible"):
        solve(graph, least - 1, "ilp")


@settings(max_examples=25, deadline=None)
@given(graph=graphs, link=st.sampled_from(LINKS), frac=st.floats(0.2, 1.0))
def test_every_solver_fits_with_a_real_link(graph: Graph, link: Transfer, frac: float) -> None:
    graph = with_link(graph, link)
    budget = int(keep_all_peak_bytes(graph) * frac)
    for solver in ("greedy", "chain", "ilp", "brute_force"):
        try:
            plan = solve(graph, budget, solver)
        except InfeasibleBudgetError:
            continue
        replay(graph, plan, budget)
        prefetched = {s.name for s in plan.backward if s.kind is StepKind.PREFETCH}
        assert offloaded(plan) <= prefetched | {s.name for s in plan.forward if s.kind is StepKind.OFFLOAD}


@settings(max_examples=25, deadline=None)
@given(graph=st.integers(2, 10).flatmap(chain_graphs), link=st.sampled_from(LINKS), frac=st.floats(0.3, 1.0))
def test_chain_with_offload_is_never_slower(graph: Graph, link: Transfer, frac: float) -> None:
    graph = with_link(graph, link)
    budget = int(keep_all_peak_bytes(graph) * frac)
    try:
        without = replay(graph, solve(graph, budget, "chain", offload=False), budget)
    except InfeasibleBudgetError:
        return
    with_offload = replay(graph, solve(graph, budget, "chain"), budget)
    assert with_offload.time_ms <= without.time_ms + 1e-9


def test_chain_offloads_where_recompute_is_costly() -> None:
    """Uniform 12-layer chain, H100 on PCIe 5: at 60 % of the keep-all peak, recompute-only
    re-runs most of the forward; offloading the forward's checkpoints avoids most of it."""
    graph = with_link(uniform_chain(12), TARGETS["h100-pcie5"])
    budget = int(0.6 * keep_all_peak_bytes(graph))
    # stages run "all" keep everything (no stage options): the checkpoints' offload alone
    recompute_only = solve(graph, budget, "chain", offload=False, options_per_segment=1)
    plan = solve(graph, budget, "chain", options_per_segment=1)
    assert offloaded(plan) and not offloaded(recompute_only)
    assert plan.options.get("offload") is True
    assert plan.predicted_peak_bytes <= budget
    assert plan.overhead < recompute_only.overhead - 0.1
    result = simulate(graph, plan)
    # the DP's safe-side stall: a latency per copy at most, here
    assert result.stall_ms <= len(offloaded(plan)) * 2 * (graph.transfer.latency_ms + 1e-3)


def test_chain_does_not_offload_over_a_link_too_slow_to_hide() -> None:
    graph = with_link(uniform_chain(12), Transfer(1.0, 1.0, 0.01, "target dial-up"))
    budget = int(0.6 * keep_all_peak_bytes(graph))
    plan = solve(graph, budget, "chain")
    assert not offloaded(plan)
    assert plan.predicted_time_ms == solve(uniform_chain(12), budget, "chain").predicted_time_ms


@pytest.mark.parametrize("solver", ["ilp", "brute_force"])
def test_exact_solvers_offload_where_it_pays(solver: str) -> None:
    """Uniform 6-layer chain one layer's bytes under the keep-all peak: dropping a1 costs a
    1 ms recomputation; offloading it (and, at no cost, others) hides behind the compute.
    Over a link too slow to hide any copy, a1 is recomputed."""
    nominal = uniform_chain(6)
    budget = keep_all_peak_bytes(nominal) - 1000
    recompute_only = solve(nominal, budget, solver)
    assert not offloaded(recompute_only)
    fast = with_link(nominal, TARGETS["h100-pcie5"])
    plan = solve(fast, budget, solver)
    assert offloaded(plan) and "a1" in offloaded(plan)
    assert plan.predicted_time_ms == nominal.total_time_ms < recompute_only.predicted_time_ms
    slow = with_link(nominal, Transfer(50.0, 50.0, 0.01, "target slow"))
    assert not offload_space(slow, plan_space(slow)).candidates
    assert solve(slow, budget, solver).predicted_time_ms == recompute_only.predicted_time_ms


@settings(max_examples=20, deadline=None)
@given(graph=graphs, frac=st.floats(0.2, 1.0))
def test_nominal_transfer_never_offloads(graph: Graph, frac: float) -> None:
    assert not graph.transfer.real
    budget = int(keep_all_peak_bytes(graph) * frac)
    for solver in ("greedy", "chain", "ilp", "brute_force"):
        try:
            plan = solve(graph, budget, solver)
        except InfeasibleBudgetError:
            continue
        assert not offloaded(plan), solver
        assert not any(s.kind in (StepKind.OFFLOAD, StepKind.PREFETCH) for s in plan.forward + plan.backward)


def test_milp_without_offload_is_the_keep_recompute_model() -> None:
    """Nominal link, or a real one with ``offload=False``: the same variables and constraints."""
    nominal = uniform_chain(6)
    budget = keep_all_peak_bytes(nominal) - 1000
    sizes = [solve(graph, budget, "ilp", **options).options
             for graph, options in ((nominal, {}), (with_link(nominal, TARGETS["h100-pcie5"]), {"offload": False}))]
    assert [(s["variables"], s["binaries"], s["constraints"]) for s in sizes] == [
        (sizes[0]["variables"], sizes[0]["binaries"], sizes[0]["constraints"])] * 2
    with_offload = solve(with_link(nominal, TARGETS["h100-pcie5"]), budget, "ilp").options
    assert with_offload["offload_candidates"] > 0 and with_offload["binaries"] > sizes[0]["binaries"]


def test_optimize_chain_with_offload_trains_exactly() -> None:
    """End to end on CPU (offload runs synchronously): the MLP at half its activation memory,
    planned for an H100 on PCIe 5 by ``chain``, offloads, fits, and computes the same step."""
    from planner import optimize, zoo
    from planner.benchmark import step_memory
    from helpers import assert_same_training_step

    model, inputs = zoo.make("mlp", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    scheduled = optimize(model, 0.5, inputs, solver="chain", target="h100-pcie5", repeats=1)
    plan = scheduled.plan
    assert plan.solver == "chain" and offloaded(plan)
    report = step_memory(scheduled, inputs)
    assert report.peak_bytes <= plan.budget_bytes and report.host_peak_bytes > 0
    model.load_state_dict(reference.state_dict())
    assert_same_training_step(scheduled, model, reference, inputs, label="mlp chain+offload")


def test_ilp_with_a_start_returns_the_optimum_not_the_start() -> None:
    """Regression (found by hypothesis): on this chain HiGHS, handed the start (recompute
    f1 for b2), proved the optimum (offload a1, a2: no recomputation) but returned the
    start's column values; `ilp` notices and solves again without the start."""
    from solvers import Op, Phase, Value, ValueKind
    sizes = {"a0": 16, "w1": 16, "a1": 48, "w2": 16, "a2": 32, "w3": 16, "a3": 80, "w4": 16, "a4": 32,
             "w5": 48, "a5": 16}
    values = [Value("a0", 16, ValueKind.INPUT)]
    ops = []
    for i in range(1, 6):
        values += [Value(f"w{i}", sizes[f"w{i}"], ValueKind.PARAMETER),
                   Value(f"a{i}", sizes[f"a{i}"], ValueKind.ACTIVATION, producer=f"f{i}")]
        ops.append(Op(f"f{i}", (f"a{i - 1}", f"w{i}"), (f"a{i}",), Phase.FORWARD, 0.25))
    values.append(Value("grad_a5", 16, ValueKind.TANGENT))
    for i in range(5, 0, -1):
        values.append(Value(f"grad_w{i}", sizes[f"w{i}"], ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        if i > 1:
            values.append(Value(f"grad_a{i - 1}", sizes[f"a{i - 1}"], ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        ops.append(Op(f"b{i}", (f"grad_a{i}", f"a{i - 1}", f"w{i}"),
                      (f"grad_w{i}",) + ((f"grad_a{i - 1}",) if i > 1 else ()), Phase.BACKWARD,
                      0.75 if i == 5 else 0.25, tmp_bytes=64 if i == 2 else 0))
    graph = Graph(ops=tuple(ops), values=tuple(values),
                  placeholders=("a0", "w1", "w2", "w3", "w4", "w5", "grad_a5"), forward_outputs=("a5",),
                  gradients=tuple(f"grad_w{i}" for i in range(1, 6)), name="chain5",
                  transfer=TARGETS["h100-pcie5"])
    least, _ = least_feasible_plan(graph)
    best, plan = solve(graph, least, "brute_force"), solve(graph, least, "ilp")
    assert plan.options["warm_start"] and plan.optimal
    assert replay(graph, plan, least).time_ms == pytest.approx(replay(graph, best, least).time_ms) == 3.0
