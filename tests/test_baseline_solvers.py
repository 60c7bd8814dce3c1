"""Properties of the baseline solvers (``none``, ``greedy``) and of the schedule builder,
checked by the independent replay on random graphs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from typing import Any, Iterable

import pytest
from hypothesis import given, settings, strategies as st

from solvers import (Decision, Graph, InfeasibleBudgetError, InvalidPlanError, Op, Phase, Plan, SimResult,
                     SolverUnavailableError, StepKind, Value, ValueKind, available_solvers,
                     least_feasible_lower_bound, simulate, solve)
from solvers.kernel.recompute import recompute_time_ms
from solvers.explain import explain
from solvers.kernel.options import _drop_order_options
from solvers.plan import Step
from solvers.kernel.program import build_program, decisions_for, insert_frees, saved_roots
from strategies import KEEP_ALL_BUDGET_BYTES, budget_between, chain_graphs, keep_all_peak_bytes, small_graphs

BASELINES = ("none", "greedy")
FWD, BWD = Phase.FORWARD, Phase.BACKWARD

graphs = st.one_of(small_graphs(), st.integers(1, 6).flatmap(chain_graphs))
fracs = st.floats(0.0, 1.2)


def end_of_step_bytes(graph: Graph) -> int:
    """What must be alive when the step ends: resident placeholders, tangents, forward
    outputs, gradients (each storage once), and the caller's bytes."""
    roots = {graph.value(name).root for name in graph.placeholders + graph.forward_outputs + graph.gradients}
    return sum(graph.value(root).size_bytes for root in roots) + graph.caller_bytes


def check_program(graph: Graph, plan: Plan) -> SimResult:
    """Replay ``plan`` and check what every plan made by the schedule builder promises."""
    result = simulate(graph, plan)
    runs = {phase: [step.name for step in plan.steps(phase) if step.kind is StepKind.RUN] for phase in (FWD, BWD)}
    assert runs[FWD] == [op.name for op in graph.forward_ops], "every forward op runs once, in order"
    assert [name for name in runs[BWD] if graph.op(name).phase is BWD] == [op.name for op in graph.backward_ops]
    recomputed = [name for name in runs[BWD] if graph.op(name).phase is FWD]
    assert all(graph.op(name).recomputable for name in recomputed)
    assert result.recompute_ms == pytest.approx(sum(graph.op(name).time_ms for name in recomputed))
    assert result.compute_ms == pytest.approx(graph.total_time_ms + result.recompute_ms)
    assert result.time_ms == pytest.approx(result.compute_ms + result.stall_ms)
    assert result.peak_bytes >= least_feasible_lower_bound(graph).total
    assert result.timeline[-1].bytes_in_use == end_of_step_bytes(graph), "a storage leaked past the step"
    offloaded = {root for root, decision in plan.decisions.items() if decision is Decision.OFFLOAD}
    offload_steps = [step.name for step in plan.forward if step.kind is StepKind.OFFLOAD]
    assert sorted(offload_steps) == sorted(offloaded)
    assert not any(step.kind is StepKind.OFFLOAD for step in plan.backward)
    prefetches = [step.name for step in plan.backward if step.kind is StepKind.PREFETCH]
    assert len(prefetches) == len(set(prefetches)) and set(prefetches) <= offloaded
    return result


# -- every plan fits and is what the replay says -----------------------------------------------

@given(graph=graphs, frac=fracs, solver=st.sampled_from(BASELINES))
def test_plans_fit_the_budget_and_predict_the_replay(graph: Graph, frac: float, solver: str) -> None:
    budget_bytes = budget_between(graph, frac)
    keep_all_bytes = keep_all_peak_bytes(graph)
    try:
        plan = solve(graph, budget_bytes, solver)
    except InfeasibleBudgetError as error:
        assert budget_bytes < keep_all_bytes, "keeping everything fits, so every baseline must find a plan"
        assert error.budget_bytes == budget_bytes
        assert budget_bytes < error.least_feasible_bytes
        assert error.least_feasible_bytes >= least_feasible_lower_bound(graph).total
        assert str(error.least_feasible_bytes) in str(error)
        if solver == "none":
            assert error.least_feasible_bytes == keep_all_bytes
        # the figure the message asks for is one the solver meets
        assert solve(graph, error.least_feasible_bytes, solver).predicted_peak_bytes <= error.least_feasible_bytes
        return
    result = check_program(graph, plan)
    assert result.peak_bytes <= budget_bytes
    assert plan.predicted_peak_bytes == result.peak_bytes
    assert plan.predicted_time_ms == result.time_ms
    assert plan.baseline_time_ms == graph.total_time_ms
    assert (plan.solver, plan.budget_bytes, plan.graph_hash) == (solver, budget_bytes, graph.hash)
    assert plan.graph is graph
    assert set(plan.decisions) == set(saved_roots(graph))
    assert plan.overhead >= -1e-12
    if solver == "none":
        assert set(plan.decisions.values()) <= {Decision.KEEP} and result.recompute_ms == 0.0


@given(graph=graphs, extra_bytes=st.integers(0, 4096))
def test_at_or_above_keep_all_peak_the_overhead_is_zero(graph: Graph, extra_bytes: int) -> None:
    budget_bytes = keep_all_peak_bytes(graph) + extra_bytes
    keep_all = solve(graph, budget_bytes, "none")
    greedy = solve(graph, budget_bytes, "greedy")
    for plan in (keep_all, greedy):
        assert plan.predicted_time_ms == graph.total_time_ms
        assert plan.overhead == 0.0
        assert all(decision is Decision.KEEP for decision in plan.decisions.values())
        assert simulate(graph, plan).recompute_ms == 0.0
    assert (greedy.forward, greedy.backward) == (keep_all.forward, keep_all.backward)


# -- infeasible budgets ---------------------------------------------------------------------------

def working_peaks(graph: Graph, data: st.DataObject) -> list[int]:
    """Peaks of plans that exist: keep-all, all-recompute, all-offload, a random mix, and
    greedy at a few budgets where it succeeds."""
    peaks = [keep_all_peak_bytes(graph)]
    for mode in ("recompute", "offload", "mixed"):
        peaks.append(simulate(graph, builder_plan(graph, random_decisions(graph, data, mode))).peak_bytes)
    for frac in (0.0, 0.3, 0.7):
        try:
            peaks.append(solve(graph, budget_between(graph, frac), "greedy").predicted_peak_bytes)
        except InfeasibleBudgetError:
            pass   # greedy is a heuristic; the other plans above still exist
    return peaks


@given(graph=graphs, data=st.data())
def test_below_the_lower_bound_every_solver_refuses(graph: Graph, data: st.DataObject) -> None:
    floor = least_feasible_lower_bound(graph)
    budget_bytes = data.draw(st.integers(0, floor.total - 1), label="budget_bytes")
    peaks = working_peaks(graph, data)
    assert available_solvers()
    for solver in available_solvers():
        with pytest.raises(InfeasibleBudgetError) as info:
            solve(graph, budget_bytes, solver)
        error = info.value
        assert error.budget_bytes == budget_bytes < error.least_feasible_bytes
        assert all(error.least_feasible_bytes <= peak for peak in peaks), (error.least_feasible_bytes, peaks)
        assert error.breakdown and all(0 <= part <= error.least_feasible_bytes for part in error.breakdown.values())
        assert all(name in str(error) for name in error.breakdown)


def test_unknown_solver_lists_the_known_ones() -> None:
    graph = tiny_chain()
    with pytest.raises(SolverUnavailableError, match="greedy"):
        solve(graph, KEEP_ALL_BUDGET_BYTES, "magic")


def tiny_chain() -> Graph:
    values = (Value("x", 16, ValueKind.INPUT), Value("w", 16, ValueKind.PARAMETER), Value("t", 16, ValueKind.TANGENT),
              Value("y", 64, ValueKind.ACTIVATION, "f"), Value("g", 16, ValueKind.GRADIENT_WORK, "f_bw"))
    ops = (Op("f", ("x", "w"), ("y",), FWD, 1.0), Op("f_bw", ("t", "x"), ("g",), BWD, 1.0))
    return Graph(ops=ops, values=values, placeholders=("x", "w", "t"), forward_outputs=("y",), gradients=("g",))


# -- determinism and purity ---------------------------------------------------------------------

def plan_text(plan: Plan) -> str:
    """The plan's JSON without the wall-clock solve time."""
    return json.dumps(replace(plan, solve_time_s=0.0).to_json(), sort_keys=True)


@given(graph=graphs, frac=fracs)
def test_plans_are_deterministic(graph: Graph, frac: float) -> None:
    budget_bytes = budget_between(graph, frac)
    twin = Graph.from_json(json.loads(json.dumps(graph.to_json())))
    for solver in BASELINES:
        try:
            first = solve(graph, budget_bytes, solver)
        except InfeasibleBudgetError as error:
            with pytest.raises(InfeasibleBudgetError) as again:
                solve(twin, budget_bytes, solver)
            assert again.value.least_feasible_bytes == error.least_feasible_bytes
            continue
        assert plan_text(solve(graph, budget_bytes, solver)) == plan_text(first)
        assert plan_text(solve(twin, budget_bytes, solver)) == plan_text(first)


PLAN_IN_SUBPROCESS = """
import json, sys
from dataclasses import replace
from solvers import Graph, InfeasibleBudgetError, solve
graph = Graph.from_json(json.load(sys.stdin))
texts = []
for solver in ("none", "greedy"):
    try:
        texts.append(replace(solve(graph, int(sys.argv[1]), solver), solve_time_s=0.0).to_json())
    except InfeasibleBudgetError as error:
        texts.append(error.least_feasible_bytes)
json.dump(texts, sys.stdout, sort_keys=True)
"""


@settings(max_examples=4)
@given(graph=small_graphs(), frac=st.floats(0.3, 1.0))
def test_plans_do_not_depend_on_the_hash_seed(graph: Graph, frac: float) -> None:
    """Set and dict iteration order must not leak into plans: two processes with
    different ``PYTHONHASHSEED`` give the same JSON."""
    budget_bytes = budget_between(graph, frac)
    outputs = []
    for seed in ("1", "4242"):
        completed = subprocess.run([sys.executable, "-c", PLAN_IN_SUBPROCESS, str(budget_bytes)],
                                   input=json.dumps(graph.to_json()), capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60)
        outputs.append(completed.stdout)
    assert outputs[0] == outputs[1]


@given(graph=graphs, frac=fracs)
def test_solvers_do_not_mutate_the_graph(graph: Graph, frac: float) -> None:
    budget_bytes = budget_between(graph, frac)
    before = (json.dumps(graph.to_json(), sort_keys=True), copy.deepcopy(graph.consumers),
              dict(graph.op_by_name), dict(graph.value_by_name), graph.saved_candidates, graph.pinned_values)
    for solver in BASELINES:
        try:
            solve(graph, budget_bytes, solver)
        except InfeasibleBudgetError:
            pass
    after = (json.dumps(graph.to_json(), sort_keys=True), graph.consumers, graph.op_by_name, graph.value_by_name,
             graph.saved_candidates, graph.pinned_values)
    assert after == before


# -- the schedule builder -------------------------------------------------------------------------

def random_decisions(graph: Graph, data: st.DataObject, mode: str) -> dict[str, Decision]:
    """``recompute``: every root whose op can run again; ``offload``: every root;
    ``mixed``: a random choice per root."""
    decisions = {}
    for root in saved_roots(graph):
        can_recompute = graph.op(graph.value(root).producer).recomputable
        if mode == "recompute":
            decisions[root] = Decision.RECOMPUTE if can_recompute else Decision.KEEP
        elif mode == "offload":
            decisions[root] = Decision.OFFLOAD
        else:
            choices = list(Decision) if can_recompute else [Decision.KEEP, Decision.OFFLOAD]
            decisions[root] = data.draw(st.sampled_from(choices), label=f"decision of {root}")
    return decisions


def builder_plan(graph: Graph, decisions: dict[str, Decision], **options: Any) -> Plan:
    forward, backward = build_program(graph, decisions, **options)
    return Plan(graph_hash=graph.hash, solver="builder", budget_bytes=0, forward=forward, backward=backward,
                decisions=decisions)


@given(graph=graphs, mode=st.sampled_from(["recompute", "offload", "mixed"]),
       free_intermediates=st.booleans(), hold_for_next_op=st.booleans(), data=st.data())
def test_builder_replays_every_decision_mix(graph: Graph, mode: str, free_intermediates: bool, hold_for_next_op: bool,
                                            data: st.DataObject) -> None:
    decisions = random_decisions(graph, data, mode)
    activations = [value.name for value in graph.values if value.kind is ValueKind.ACTIVATION]
    hold_remade = frozenset(data.draw(st.lists(st.sampled_from(activations), unique=True), label="hold_remade")
                            if activations else ())
    hold_remade_from = data.draw(st.integers(0, len(graph.backward_ops)), label="hold_remade_from")
    hold_remade_for = {op.name: frozenset(data.draw(st.lists(st.sampled_from(activations), unique=True),
                                                    label=f"held for {op.name}"))
                       for op in graph.backward_ops if activations and data.draw(st.booleans())}
    plan = builder_plan(graph, decisions, free_intermediates=free_intermediates, hold_for_next_op=hold_for_next_op,
                        hold_remade=hold_remade, hold_remade_from=hold_remade_from, hold_remade_for=hold_remade_for)
    result = check_program(graph, plan)   # raises if a gradient is never produced
    end_of_forward = [point for point in result.timeline if point.phase is FWD][-1].bytes_in_use
    keep_roots = {root for root, decision in decisions.items() if decision is Decision.KEEP}
    pinned_roots = {graph.value(name).root for name in graph.placeholders + graph.forward_outputs
                    if graph.value(name).kind is not ValueKind.TANGENT}
    unrecomputable = {name for op in graph.forward_ops if not op.recomputable for name in op.outputs}
    may_stay = pinned_roots | keep_roots | {graph.value(name).root for name in unrecomputable} | {
        graph.value(name).root for op in graph.backward_ops for name in op.inputs
        if graph.value(name).root not in decisions and graph.value(name).kind is ValueKind.ACTIVATION}

    def size(roots: Iterable[str]) -> int:
        return sum(graph.value(root).size_bytes for root in roots)

    assert size(pinned_roots | keep_roots) <= end_of_forward <= size(may_stay), "dropped storages stay"
    if mode == "offload":
        assert result.offloaded_bytes == size(decisions)
        # offloaded storages come back by prefetch; only views of them are made again
        for step in plan.backward:
            if step.kind is StepKind.RUN and graph.op(step.name).phase is FWD:
                assert any(graph.value(name).alias_of in decisions for name in graph.op(step.name).outputs)


def test_builder_keeps_what_an_unrecomputable_op_feeds_a_recomputation() -> None:
    """z = f(y) with y from a buffer update: recomputing z needs y, which the forward
    must therefore keep (it cannot be made again)."""
    act = ValueKind.ACTIVATION
    values = (Value("x", 16, ValueKind.INPUT), Value("buf", 16, ValueKind.BUFFER), Value("t", 16, ValueKind.TANGENT),
              Value("y", 16, act, "update"), Value("z", 64, act, "f"), Value("out", 16, act, "loss"),
              Value("g", 16, ValueKind.GRADIENT_WORK, "f_bw"))
    ops = (Op("update", ("buf", "x"), ("y",), FWD, 1.0, recomputable=False), Op("f", ("y",), ("z",), FWD, 1.0),
           Op("loss", ("z",), ("out",), FWD, 1.0), Op("f_bw", ("t", "z"), ("g",), BWD, 1.0))
    graph = Graph(ops=ops, values=values, placeholders=("x", "buf", "t"), forward_outputs=("out",), gradients=("g",))
    plan = builder_plan(graph, decisions_for(graph, recompute=["z"]))
    result = check_program(graph, plan)
    assert [step.name for step in plan.backward if step.kind is StepKind.RUN] == ["f", "f_bw"]
    assert result.saved_bytes == 16   # y, not z
    for budget_bytes in range(least_feasible_lower_bound(graph).total, keep_all_peak_bytes(graph) + 16, 8):
        try:
            assert solve(graph, budget_bytes, "greedy").predicted_peak_bytes <= budget_bytes
        except InfeasibleBudgetError as error:
            assert error.least_feasible_bytes > budget_bytes
    with pytest.raises(InvalidPlanError, match="'update'.*cannot be recomputed"):
        build_program(graph, {"z": Decision.RECOMPUTE, "y": Decision.RECOMPUTE})


@pytest.mark.parametrize("p_bytes, held_is_lower", [(256, True), (16, False)])
def test_holding_a_recomputed_value_for_the_next_backward_op(p_bytes: int, held_is_lower: bool) -> None:
    """p = f0(x), a = f1(p), b = f2(a), all dropped; ``b_bw`` reads b (p and a are made on
    the way) and the op after it, ``a_bw``, reads a and b_bw's 256-byte gradient. Freeing
    intermediates at once makes p and a again for a_bw, with that gradient alive (as on
    ResNet-50); holding a for a_bw runs f0 and f1 once, but keeps a through b_bw. With a
    large p holding is lower, with a small one higher: `hierarchical.drop_all_plan` tries
    both."""
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    values = (Value("x", 16, ValueKind.INPUT), Value("t", 16, ValueKind.TANGENT), Value("p", p_bytes, act, "f0"),
              Value("a", 64, act, "f1"), Value("b", 64, act, "f2"), Value("out", 16, act, "loss"),
              Value("g_b", 256, work, "b_bw"), Value("g_a", 16, work, "a_bw"))
    ops = (Op("f0", ("x",), ("p",), FWD, 1.0), Op("f1", ("p",), ("a",), FWD, 1.0), Op("f2", ("a",), ("b",), FWD, 1.0),
           Op("loss", ("b",), ("out",), FWD, 1.0),
           Op("b_bw", ("t", "b"), ("g_b",), BWD, 1.0), Op("a_bw", ("g_b", "a"), ("g_a",), BWD, 1.0))
    graph = Graph(ops=ops, values=values, placeholders=("x", "t"), forward_outputs=("out",), gradients=("g_a",))
    decisions = decisions_for(graph, recompute=["p", "a", "b"])
    freed = builder_plan(graph, decisions, free_intermediates=True)
    held = builder_plan(graph, decisions, free_intermediates=True, hold_for_next_op=True)
    runs = {name: [step.name for step in plan.backward if step.kind is StepKind.RUN] for name, plan in
            (("freed", freed), ("held", held))}
    assert runs == {"freed": ["f0", "f1", "f2", "b_bw", "f0", "f1", "a_bw"], "held": ["f0", "f1", "f2", "b_bw", "a_bw"]}
    freed_result, held_result = check_program(graph, freed), check_program(graph, held)
    assert held_result.time_ms == freed_result.time_ms - 2.0
    # freed: x, t, out (48) and g_b (256) while f1 makes a again from p; held: 48, a held
    # through b_bw beside b and g_b (384)
    assert freed_result.peak_bytes == 48 + 256 + p_bytes + 64
    assert held_result.peak_bytes == 48 + 64 + 64 + 256
    assert (held_result.peak_bytes < freed_result.peak_bytes) is held_is_lower


def test_remade_boundaries_are_held_from_the_given_backward_op() -> None:
    """a0 = f0(x), a1 = f1(a0), a2 = f2(a1), all dropped; b2, b1, b0 read a2, a1, a0.
    Freeing intermediates at once re-runs the chain from x for every backward op (f0 three
    times); holding the remade boundaries a0 and a1 runs each forward op once; holding them
    from b1 on releases what b2's recomputation made and keeps what b1's makes."""
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    values = (Value("x", 16, ValueKind.INPUT), Value("t", 16, ValueKind.TANGENT), Value("a0", 64, act, "f0"),
              Value("a1", 64, act, "f1"), Value("a2", 64, act, "f2"), Value("out", 16, act, "loss"),
              Value("g2", 16, work, "b2"), Value("g1", 16, work, "b1"), Value("g0", 16, work, "b0"))
    ops = (Op("f0", ("x",), ("a0",), FWD, 1.0), Op("f1", ("a0",), ("a1",), FWD, 1.0),
           Op("f2", ("a1",), ("a2",), FWD, 1.0), Op("loss", ("a2",), ("out",), FWD, 1.0),
           Op("b2", ("t", "a2"), ("g2",), BWD, 1.0), Op("b1", ("g2", "a1"), ("g1",), BWD, 1.0), Op("b0", ("g1", "a0"), ("g0",), BWD, 1.0))
    graph = Graph(ops=ops, values=values, placeholders=("x", "t"), forward_outputs=("out",), gradients=("g0",))
    decisions = decisions_for(graph, recompute=["a0", "a1", "a2"])
    boundaries = frozenset({"a0", "a1"})
    plans = {"freed": builder_plan(graph, decisions, free_intermediates=True),
             "held": builder_plan(graph, decisions, free_intermediates=True, hold_remade=boundaries),
             "held from b1": builder_plan(graph, decisions, free_intermediates=True, hold_remade=boundaries,
                                          hold_remade_from=1)}
    runs = {name: [step.name for step in plan.backward if step.kind is StepKind.RUN] for name, plan in plans.items()}
    assert runs == {"freed": ["f0", "f1", "f2", "b2", "f0", "f1", "b1", "f0", "b0"],
                    "held": ["f0", "f1", "f2", "b2", "b1", "b0"],
                    "held from b1": ["f0", "f1", "f2", "b2", "f0", "f1", "b1", "b0"]}
    results = {name: check_program(graph, plan) for name, plan in plans.items()}
    assert results["held"].time_ms == results["freed"].time_ms - 3.0
    # x, t and out are 48 bytes throughout. Freed: a0 and a1 remade for b1 beside g2;
    # held: a0, a1 and a2 during b2 beside g2; held from b1: a0 held through b1 (a1, g2, g1)
    assert results["freed"].peak_bytes == 48 + 64 + 64 + 16
    assert results["held"].peak_bytes == 48 + 3 * 64 + 16
    assert results["held from b1"].peak_bytes == 48 + 64 + 64 + 16 + 16


def dropout_mask_graph() -> Graph:
    """A dropout-like forward: the saved mask ``m`` comes from a cheap scaling of an
    expensive random fill that is not saved, beside a saved ``y`` of the same size from a
    moderately expensive op; the peak is the workspace of a last forward op. Recomputing
    ``m`` costs the fill too (5.1 ms), ``y`` 1 ms."""
    act = ValueKind.ACTIVATION
    values = (Value("x", 16, ValueKind.INPUT), Value("t", 16, ValueKind.TANGENT),
              Value("r", 64, act, "fill"), Value("m", 64, act, "scale"), Value("y", 64, act, "f"),
              Value("z", 16, act, "mix"), Value("out", 16, act, "head"), Value("g", 16, ValueKind.GRADIENT_WORK, "mix_bw"))
    ops = (Op("fill", ("x",), ("r",), FWD, 5.0, random=True), Op("scale", ("r",), ("m",), FWD, 0.1),
           Op("f", ("x",), ("y",), FWD, 1.0), Op("mix", ("m", "y"), ("z",), FWD, 1.0),
           Op("head", ("z",), ("out",), FWD, 1.0, tmp_bytes=512), Op("mix_bw", ("t", "m", "y"), ("g",), BWD, 1.0))
    return Graph(ops=ops, values=values, placeholders=("x", "t"), forward_outputs=("out",), gradients=("g",))


@pytest.mark.parametrize("solver", ["greedy", "hierarchical"])
def test_drops_are_scored_by_the_whole_recomputation(solver: str) -> None:
    """Room for one of ``m`` and ``y``: the mask's own op is the cheaper one, but dropping
    it means running the fill again, so the solvers drop ``y`` (1 ms, not 5.1 ms)."""
    graph = dropout_mask_graph()
    assert recompute_time_ms(graph, "m") == pytest.approx(5.1)
    assert recompute_time_ms(graph, "y") == pytest.approx(1.0)
    def peak_bytes(recompute: list[str]) -> int:
        return simulate(graph, builder_plan(graph, decisions_for(graph, recompute=recompute))).peak_bytes

    budget_bytes = max(peak_bytes(["m"]), peak_bytes(["y"]))   # either drop fits
    assert budget_bytes < peak_bytes([])
    assert _drop_order_options(graph, ["m", "y"], 3).order == ("y", "m")   # hierarchical's options
    plan = solve(graph, budget_bytes, solver)
    assert plan.decisions["m"] is Decision.KEEP and plan.decisions["y"] is Decision.RECOMPUTE
    assert simulate(graph, plan).recompute_ms == pytest.approx(1.0)
    why = {row.name: row.why for row in explain(graph, plan).rows}   # plan-inspect says the same
    assert why["m"].startswith("keep: recomputing would cost 5.1 ms") and "rank 2 of 2" in why["m"]
    assert why["y"].startswith("recompute: frees 64 B for 1 ms")


# -- insert_frees: liveness ------------------------------------------------------------------------

def uses_and_defs(graph: Graph, step: Step) -> tuple[set[str], tuple[str, ...]]:
    if step.kind is StepKind.RUN:
        return set(graph.op(step.name).inputs), graph.op(step.name).outputs
    return ({step.name}, ()) if step.kind is StepKind.OFFLOAD else (set(), (step.name,))


def expected_frees(graph: Graph, steps: list[Step], live_out: set[str], live_in: set[str]) -> Counter:
    """Forward scan: each value instance (from its definition, or the phase start for
    ``live_in``, to its redefinition) dies after its last read, or right after it is made
    when nothing reads it; live-out instances and placeholders never die. -1 = phase start."""
    last_touch = {name: -1 for name in live_in}
    deaths: list[tuple[int, str]] = []
    for index, step in enumerate(steps):
        uses, defs = uses_and_defs(graph, step)
        for name in uses:
            last_touch[name] = index
        for name in defs:
            if name in last_touch:
                deaths.append((last_touch[name], name))
            last_touch[name] = index
    deaths += [(index, name) for name, index in last_touch.items() if name not in live_out]
    return Counter(death for death in deaths if death[1] not in graph.placeholders)


def actual_frees(steps: tuple[Step, ...]) -> tuple[list[Step], Counter]:
    others, frees, anchor = [], Counter(), -1
    for step in steps:
        if step.kind is StepKind.FREE:
            frees[(anchor, step.name)] += 1
        else:
            others.append(step)
            anchor += 1
    return others, frees


@given(graph=graphs, free_intermediates=st.booleans(), data=st.data())
def test_insert_frees_frees_each_instance_once_after_its_last_use(graph: Graph, free_intermediates: bool,
                                                                  data: st.DataObject) -> None:
    plan = builder_plan(graph, random_decisions(graph, data, "mixed"), free_intermediates=free_intermediates)
    forward_values = [v.name for v in graph.values if v.kind is ValueKind.ACTIVATION]
    for phase, live_in in ((FWD, set()), (BWD, set(data.draw(st.lists(st.sampled_from(forward_values)), "live_in")))):
        core = [step for step in plan.steps(phase) if step.kind is not StepKind.FREE]
        live_out = set(data.draw(st.lists(st.sampled_from(forward_values + list(graph.gradients))), "live_out"))
        steps = insert_frees(graph, core, live_out=live_out, live_in=live_in | set(graph.placeholders))
        others, frees = actual_frees(steps)
        assert others == core
        assert frees == expected_frees(graph, core, live_out, live_in | set(graph.placeholders))
        assert max(frees.values(), default=1) == 1
        assert not any(name in graph.placeholders for _, name in frees)
