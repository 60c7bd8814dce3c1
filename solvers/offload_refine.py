"""Offload on graphs of any size: turn a recompute plan's recomputations into transfers
where the host link hides them.

A recompute-only plan (`hierarchical`'s, on graphs of thousands of ops) pays for every
dropped storage with compute in the backward. With a real host link
(`solvers.graph.Transfer.real`), the same storage can instead be copied to the host in the
forward and back before its backward reader, on copy streams that run beside compute
(Rhu et al., "vDNN", MICRO 2016; the swap side of Capuchin, Peng et al., ASPLOS 2020,
and of POFO / OffMate, Beaumont et al. 2021-2024). This pass starts from the plan's
decisions and, per segment then per storage, replaces ``recompute`` by ``offload`` where
the replayed step (`simulate`, which models both copy streams and the stalls they cause)
gets faster within the budget; prefetches are issued one copy time ahead of their use
(`kernel.program.build_program`'s ``prefetch_by_transfer_time``). Then it keeps storages again
that the memory freed by offloading now allows, most recompute time per byte first.

Greedy, not optimal. Each trial is one replay, O(N) for N program steps; the trials are
bounded by `OFFLOAD_REPLAY_OPS` ops replayed in all (so a graph of 8,000 ops gets about a
hundred), and every accepted change lowers the replayed time, so the result is never
slower than the plan it started from.
"""

from __future__ import annotations

from typing import Callable

from solvers.graph import Graph
from solvers.kernel.program import saved_roots
from solvers.kernel.recompute import recompute_time_ms
from solvers.kernel.replay import Replays
from solvers.plan import Decision

OFFLOAD_REPLAY_OPS = 150_000   # ops replayed, in all, by the trials of one refinement
OFFLOAD_BISECTIONS = 8         # DP budgets tried per offload set by `offload_with_recompute`


def _replays(graph: Graph, budget_bytes: int) -> Replays:
    """The replays of one refinement: programs with prefetches a copy time ahead
    (`kernel.program.plan_with_offload`), at most `OFFLOAD_REPLAY_OPS` ops replayed."""
    return Replays(graph, budget_bytes, prefetch_by_transfer_time=True, ops_left=OFFLOAD_REPLAY_OPS)


def refine_with_offload(graph: Graph, decisions: dict[str, Decision], budget_bytes: int,
                        groups: list[list[str]] | None = None) -> tuple[dict[str, Decision], float] | None:
    """Decisions at least as fast as ``decisions`` (replayed with `plan_with_offload`) within
    ``budget_bytes``, some recomputations turned into offloads (module docstring), and
    their replayed time; None when nothing improves.
    ``groups``: storages to try as one change first (a segment's), before single storages."""
    replays = _replays(graph, budget_bytes)
    current = dict(decisions)
    start = replays.replay(current)
    if start is None:
        return None
    start_peak, start_time = start.peak_bytes, start.time_ms
    best_time = start_time if start_peak <= budget_bytes else float("inf")

    def transfer_ms(root: str) -> float:
        size_bytes = graph.value(root).size_bytes
        return 2 * graph.transfer.latency_ms + size_bytes / graph.transfer.device_to_host_bytes_per_ms \
            + size_bytes / graph.transfer.host_to_device_bytes_per_ms

    def try_change(roots: list[str], decision: Decision) -> bool:
        nonlocal current, best_time
        trial = dict(current)
        trial.update({root: decision for root in roots})
        measured = replays.replay(trial)
        if measured is None or measured.peak_bytes > budget_bytes or measured.time_ms >= best_time:
            return False
        current, best_time = trial, measured.time_ms
        return True

    recomputed = [root for root, decision in current.items() if decision is Decision.RECOMPUTE]
    # the most recompute time saved per millisecond of copying first
    recomputed.sort(key=lambda root: recompute_time_ms(graph, root) / transfer_ms(root), reverse=True)
    for group in groups or []:
        members = [root for root in group if current.get(root) is Decision.RECOMPUTE]
        if members:
            try_change(members, Decision.OFFLOAD)
    for root in recomputed:
        if current[root] is Decision.RECOMPUTE:
            try_change([root], Decision.OFFLOAD)
    # memory the offloads freed may let recomputed storages stay
    for root in sorted((r for r, d in current.items() if d is Decision.RECOMPUTE),
                       key=lambda r: recompute_time_ms(graph, r) / (graph.value(r).size_bytes + 1), reverse=True):
        try_change([root], Decision.KEEP)
    if best_time >= start_time or best_time == float("inf"):
        return None
    return current, best_time


def early_offload_set(graph: Graph, share: float = 1.0) -> list[str]:
    """Saved storages to offload whatever else the plan does: the earliest made in the
    forward (they wait longest for their backward reader, as vDNN offloads the first
    layers), as many as ``share`` of the link can copy to the host while the forward runs
    and back while the backward runs. O(saved storages)."""
    forward_ms = sum(op.time_ms for op in graph.forward_ops)
    backward_ms = sum(op.time_ms for op in graph.backward_ops)
    transfer = graph.transfer
    capacity_bytes = share * min(forward_ms * transfer.device_to_host_bytes_per_ms,
                                 backward_ms * transfer.host_to_device_bytes_per_ms)
    chosen, total = [], 0.0
    for root in saved_roots(graph):            # graph order: forward production order
        size_bytes = graph.value(root).size_bytes
        if total + size_bytes > capacity_bytes:
            break
        chosen.append(root)
        total += size_bytes
    return chosen


def offload_with_recompute(graph: Graph, budget_bytes: int,
                           recompute_decisions: Callable[[int], dict[str, Decision] | None],
                           shares: tuple[float, ...] = (1.0, 0.5)) -> tuple[dict[str, Decision], float] | None:
    """Offload and recompute chosen together: for each offload set (`early_offload_set` at
    each link ``share``), a recompute plan is asked for a budget raised by up to the set's
    bytes (what offloading frees) and the set is offloaded on top of it; the raise is
    bisected (`OFFLOAD_BISECTIONS` replays per set) to the largest whose replay fits
    ``budget_bytes``. The fastest fitting decisions and their time, or None."""
    replays = _replays(graph, budget_bytes)
    best: tuple[dict[str, Decision], float] | None = None
    for share in shares:
        chosen = early_offload_set(graph, share)
        if not chosen:
            continue
        low, high = 0, sum(graph.value(root).size_bytes for root in chosen)
        extra = high
        for _ in range(OFFLOAD_BISECTIONS):
            decisions = recompute_decisions(budget_bytes + extra)
            measured = None
            if decisions is not None:
                trial = {**decisions, **{root: Decision.OFFLOAD for root in chosen}}
                measured = replays.replay(trial)
            if measured is not None and measured.peak_bytes <= budget_bytes:
                if best is None or measured.time_ms < best[1]:
                    best = (trial, measured.time_ms)
                low = extra
            else:
                high = extra
            if extra == high and low == high or high - low <= max(1, budget_bytes // 1000):
                break
            extra = (low + high) // 2
    return best
