"""Simple solvers: ``none`` (keep every saved value) and ``greedy`` (recompute by
bytes-per-millisecond until the plan fits).

The greedy rule is the "max bytes freed per recompute time" heuristic that Checkmate
(Jain et al., MLSys 2020, Sec. 6) uses as a baseline; it is neither optimal nor monotone in
the budget, and exists as a fast fallback and a reference for the exact solvers.
"""

from __future__ import annotations

from typing import Mapping

from solvers.errors import InfeasibleBudgetError
from solvers.graph import Graph
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.kernel.program import plan_from_decisions, saved_roots
from solvers.kernel.recompute import droppable_roots, recompute_frontier, recompute_time_ms
from solvers.kernel.replay import Replays
from solvers.plan import Decision, Plan
from solvers.simulate import simulate


def solve_none(graph: Graph, budget_bytes: int) -> Plan:
    """Keep every value the backward reads, as autograd does. O(ops)."""
    plan = plan_from_decisions(graph, {root: Decision.KEEP for root in saved_roots(graph)}, "none", budget_bytes,
                               optimal=True)
    peak = simulate(graph, plan).peak_bytes
    if peak > budget_bytes:
        raise InfeasibleBudgetError(budget_bytes, peak, {"keep-all peak": peak}, solver="none")
    return plan


def solve_greedy(graph: Graph, budget_bytes: int, *, start: Mapping[str, Decision] | None = None) -> Plan:
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

    ``start`` (a warm start: the decisions of a plan for a similar graph, by root name, as
    the plan of the previous input shape) begins each pass from those drops instead of
    keeping everything: drops go on in the same order while the plan does not fit, and the
    restore pass then tries every drop, the start's too; two passes (recomputed values kept
    or intermediates freed), without the independent-drops sweep. O(D + added) simulations
    per pass for the start's D drops: fewer than O(R) when the start is close.
    """
    lowest_peak = None
    best: tuple[float, Plan] | None = None
    for free_intermediates in (False, True):
        # the passes of one policy share their replays: both begin with the same drops
        replays = Replays(graph, budget_bytes, free_intermediates=free_intermediates)
        for independent_first in (True, False) if start is None else (False,):   # a start's drops are not independent
            plan, peak = _greedy_pass(graph, budget_bytes, replays, independent_first, start or {})
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


def _greedy_pass(graph: Graph, budget_bytes: int, replays: Replays, independent_first: bool,
                 start: Mapping[str, Decision]) -> tuple[Plan | None, int]:
    """One greedy pass under the recompute policy of ``replays`` (its program options), from
    ``start``'s drops: (plan, peak) or (None, lowest peak)."""
    decisions = {root: Decision.KEEP for root in saved_roots(graph)}

    def measure(trial: dict[str, Decision]) -> tuple[int, int]:
        """(excess over budget summed over steps, peak)."""
        replayed = replays.replay(trial)
        return replayed.excess_bytes, replayed.peak_bytes

    # offload competes with recompute only where copies really overlap compute
    choices = (Decision.RECOMPUTE, Decision.OFFLOAD) if graph.transfer.real else (Decision.RECOMPUTE,)

    excess, peak = measure(decisions)
    if peak <= budget_bytes:
        return plan_from_decisions(graph, decisions, "greedy", budget_bytes, optimal=True), peak

    def score(root: str) -> float:
        return graph.value(root).size_bytes / (recompute_time_ms(graph, root) + 1e-6)

    candidates = sorted(droppable_roots(graph), key=score, reverse=True)   # stable: ties keep graph order
    frontier = {root: recompute_frontier(graph, root) for root in candidates}
    dropped = [root for root in candidates if start.get(root, Decision.KEEP) in choices]
    if start:
        decisions.update({root: start[root] for root in dropped})
        excess, peak = measure(decisions)
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
                        best is None or (trial_excess, trial_peak, replays.time_ms(decisions)) < best[:3]):
                    best = (trial_excess, trial_peak, replays.time_ms(decisions), choice)
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
    return plan_from_decisions(graph, decisions, "greedy", budget_bytes, **replays.program_options), peak
