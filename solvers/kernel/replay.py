"""Replay with a cache: the checker every local search asks "does this decision set fit, and how fast is it?".

`Replays` builds the program of a decision set (`kernel.program`) and replays it with
`simulate`, Checkmate's schedule checker in the role of the cost model (Jain et al., MLSys
2020): the searches (`greedy`, `hierarchical`'s bisection and restore passes,
`offload_refine`) never trust a model of their own. Results are memoized by the storages
not kept and their decisions, so a search that returns to a decision set pays nothing;
an optional budget of ops replayed bounds the work of searches on large graphs. Each new
decision set costs one build and one replay, O(steps + sum of op arity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from solvers.graph import Graph
from solvers.kernel.program import plan_from_decisions, plan_with_offload
from solvers.plan import Decision
from solvers.simulate import simulate


@dataclass(frozen=True)
class Replayed:
    """What one replay of a decision set gives."""

    peak_bytes: int
    time_ms: float
    excess_bytes: int     # over the budget, summed over the steps (`SimResult.excess_bytes`)


class Replays:
    """Replays decision sets on ``graph``, memoized. The program is `plan_from_decisions`'s,
    built with ``program_options`` (``free_intermediates``, ``hold_for_next_op``,
    ``hold_remade``, ...), or, with ``prefetch_by_transfer_time``, `plan_with_offload`'s.
    ``ops_left``: ops that may still be replayed (None: no limit)."""

    def __init__(self, graph: Graph, budget_bytes: int, *, prefetch_by_transfer_time: bool = False,
                 ops_left: int | None = None, **program_options: Any) -> None:
        self.graph, self.budget_bytes = graph, budget_bytes
        self.prefetch_by_transfer_time, self.program_options = prefetch_by_transfer_time, program_options
        self.ops_left = ops_left
        self.lowest_peak_bytes: int | None = None     # the lowest peak any replay reached
        self._seen: dict[frozenset[tuple[str, Decision]], Replayed] = {}

    def replay(self, decisions: dict[str, Decision]) -> Replayed | None:
        """The replay of ``decisions`` (missing storages kept), or None when it is new and
        the ops budget is spent."""
        key = frozenset((root, decision) for root, decision in decisions.items() if decision is not Decision.KEEP)
        if key not in self._seen:
            if self.ops_left is not None:
                if self.ops_left <= 0:
                    return None
                self.ops_left -= len(self.graph.ops)
            if self.prefetch_by_transfer_time:
                plan = plan_with_offload(self.graph, decisions, "replay", self.budget_bytes)
            else:
                plan = plan_from_decisions(self.graph, decisions, "replay", self.budget_bytes,
                                           **self.program_options)
            result = simulate(self.graph, plan, check_hash=False)
            self._seen[key] = Replayed(result.peak_bytes, result.time_ms, result.excess_bytes(self.budget_bytes))
            if self.lowest_peak_bytes is None or result.peak_bytes < self.lowest_peak_bytes:
                self.lowest_peak_bytes = result.peak_bytes
        return self._seen[key]

    def measure(self, decisions: dict[str, Decision]) -> tuple[int, float]:
        """(peak bytes, time ms) of ``decisions``; for replays without an ops budget."""
        replayed = self.replay(decisions)
        return replayed.peak_bytes, replayed.time_ms

    def fits(self, decisions: dict[str, Decision]) -> bool:
        return self.measure(decisions)[0] <= self.budget_bytes

    def time_ms(self, decisions: dict[str, Decision]) -> float:
        return self.measure(decisions)[1]
