"""Simple solvers: ``none`` (keep every saved value) and ``greedy`` (recompute by
bytes-per-millisecond until the plan fits).

The greedy rule is the "max bytes freed per recompute time" heuristic that Checkmate
(Jain et al., MLSys 2020, Sec. 6) uses as a baseline; it is neither optimal nor monotone in
the budget, and exists as a fast fallback and a reference for the exact solvers.
"""

from __future__ import annotations

from solvers.errors import InfeasibleBudgetError
from solvers.graph import Graph
from solvers.plan import Decision, Plan
from solvers.registry import least_feasible_lower_bound, register
from solvers.schedule import build_program, saved_roots
from solvers.simulate import simulate


def plan_from_decisions(graph: Graph, decisions: dict[str, Decision], solver: str, budget_bytes: int,
                        optimal: bool = False, free_intermediates: bool = False) -> Plan:
    forward, backward = build_program(graph, decisions, free_intermediates=free_intermediates)
    return Plan(graph_hash=graph.hash, solver=solver, budget_bytes=budget_bytes, forward=forward,
                backward=backward, decisions=dict(decisions), optimal=optimal,
                options={"free_intermediates": True} if free_intermediates else {})


@register("none")
def solve_none(graph: Graph, budget_bytes: int) -> Plan:
    """Keep every value the backward reads, as autograd does. O(ops)."""
    plan = plan_from_decisions(graph, {root: Decision.KEEP for root in saved_roots(graph)}, "none", budget_bytes,
                               optimal=True)
    peak = simulate(graph, plan).peak_bytes
    if peak > budget_bytes:
        raise InfeasibleBudgetError(budget_bytes, peak, {"keep-all peak": peak}, solver="none")
    return plan


@register("greedy")
def solve_greedy(graph: Graph, budget_bytes: int) -> Plan:
    """Drop saved storages (recompute them, or offload them when the graph's transfer
    profile is real and that is better) in order of bytes per recompute millisecond (of the
    whole recomputation, `recompute_time_ms`: a dropout mask costs its random fill too),
    keeping a drop only when it lowers the simulated excess over the budget (summed over
    all steps, so a drop that helps one of several equal peaks counts), until the peak
    fits; then restore the drops the budget does not need, most recently added first.

    Four passes, and the fastest plan that fits wins: recomputed values kept until their
    last backward use or recompute intermediates freed at once (recomputed again when
    needed), each with or without a first sweep of independent drops only (a storage
    whose recomputation reads no other dropped storage: checkpointed segments, no
    cascades). O(R) simulations of O(steps) each per pass, for R saved storages. Raises
    `InfeasibleBudgetError` with the lowest peak it reached.
    """
    lowest_peak = None
    best: tuple[float, Plan] | None = None
    for free_intermediates in (False, True):
        for independent_first in (True, False):
            plan, peak = _greedy_pass(graph, budget_bytes, free_intermediates, independent_first)
            lowest_peak = peak if lowest_peak is None else min(lowest_peak, peak)
            if plan is not None:
                time_ms = simulate(graph, plan, check_hash=False).time_ms
                if best is None or time_ms < best[0]:
                    best = (time_ms, plan)
    if best is not None:
        return best[1]
    floor = least_feasible_lower_bound(graph)
    raise InfeasibleBudgetError(budget_bytes, lowest_peak, {"greedy's lowest peak": lowest_peak,
                                                            "lower bound for any plan": floor.total}, solver="greedy")


def _greedy_pass(graph: Graph, budget_bytes: int, free_intermediates: bool,
                 independent_first: bool) -> tuple[Plan | None, int]:
    """One greedy pass under one recompute policy: (plan, peak) or (None, lowest peak)."""
    decisions = {root: Decision.KEEP for root in saved_roots(graph)}

    def plan_of(trial: dict[str, Decision]) -> Plan:
        return plan_from_decisions(graph, trial, "greedy", budget_bytes, free_intermediates=free_intermediates)

    replays: dict[frozenset, object] = {}

    def replay(trial: dict[str, Decision]):
        key = frozenset(trial.items())
        if key not in replays:
            replays[key] = simulate(graph, plan_of(trial), check_hash=False)
        return replays[key]

    def measure(trial: dict[str, Decision]) -> tuple[int, int]:
        """(excess over budget summed over steps, peak)."""
        result = replay(trial)
        return result.excess_bytes(budget_bytes), result.peak_bytes

    def time_of(trial: dict[str, Decision]) -> float:
        return replay(trial).time_ms

    # offload competes with recompute only where copies really overlap compute
    choices = (Decision.RECOMPUTE, Decision.OFFLOAD) if graph.transfer.real else (Decision.RECOMPUTE,)

    excess, peak = measure(decisions)
    if peak <= budget_bytes:
        return plan_from_decisions(graph, decisions, "greedy", budget_bytes, optimal=True), peak

    def score(root: str) -> float:
        return graph.value(root).size_bytes / (recompute_time_ms(graph, root) + 1e-6)

    candidates = sorted(droppable_roots(graph), key=score, reverse=True)   # stable: ties keep graph order
    frontier = {root: recompute_frontier(graph, root) for root in candidates}
    dropped: list[str] = []
    # sweep 1 drops only storages whose recomputation reads kept storages (no cascades,
    # as with checkpointed segments); sweep 2 allows chains
    for independent_only in ((True, False) if independent_first else (False,)):
        for root in candidates:
            if decisions[root] is not Decision.KEEP or peak <= budget_bytes:
                continue
            if independent_only and any(other in frontier[root] or root in frontier[other] for other in dropped):
                continue
            best = None
            for choice in choices:
                decisions[root] = choice
                trial_excess, trial_peak = measure(decisions)
                if (trial_excess, trial_peak) < (excess, peak) and (
                        best is None or (trial_excess, trial_peak, time_of(decisions)) < best[:3]):
                    best = (trial_excess, trial_peak, time_of(decisions), choice)
            if best is not None:
                excess, peak, _, decisions[root] = best
                dropped.append(root)
            else:
                decisions[root] = Decision.KEEP
    if peak > budget_bytes:
        return None, peak
    for root in reversed(dropped):
        chosen, decisions[root] = decisions[root], Decision.KEEP
        if measure(decisions)[1] > budget_bytes:
            decisions[root] = chosen
    return plan_of(decisions), peak


def droppable_roots(graph: Graph) -> tuple[str, ...]:
    """Saved storages a plan may drop: not pinned, not empty, made by an op that can run
    again. Graph order. O(values)."""
    pinned_roots = {graph.value(name).root for name in graph.pinned_values}
    return tuple(root for root in saved_roots(graph)
                 if root not in pinned_roots and graph.value(root).size_bytes > 0
                 and graph.op(graph.value(root).producer).recomputable)


def recompute_frontier(graph: Graph, root: str) -> frozenset[str]:
    """The storages that recomputing ``root`` reads: walk back from its producer through
    forward values the forward does not keep (they would be recomputed too) to the
    first saved storages or placeholders. O(size of that sub-graph)."""
    return _recompute_walk(graph, root)[0]


def recompute_time_ms(graph: Graph, root: str) -> float:
    """Time to recompute ``root`` alone, every other saved storage kept: its producer and
    the ops behind it whose outputs the forward does not keep (a dropout mask's random
    fill behind the saved, cheap scaling). What dropping ``root`` costs at the least, the
    denominator of the drop scores. O(size of that sub-graph)."""
    return sum(graph.op(name).time_ms for name in _recompute_walk(graph, root)[1])


def _recompute_walk(graph: Graph, root: str) -> tuple[frozenset[str], frozenset[str]]:
    """(storages read, ops run) by the recomputation of ``root`` (`recompute_frontier`)."""
    saved = set(saved_roots(graph))
    found: set[str] = set()
    seen: set[str] = set()
    producer = graph.value(root).producer
    ops = {producer}
    stack = list(graph.op(producer).inputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        value = graph.value(name)
        if value.root in saved or value.producer is None:
            found.add(value.root)
            if value.root == name or value.root in saved or value.producer is None:
                continue
        ops.add(value.producer)
        stack.extend(graph.op(value.producer).inputs)
    found.discard(root)
    return frozenset(found), frozenset(ops)
