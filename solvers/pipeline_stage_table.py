"""``pipeline_stage_table``: for every stage [a, b) of a pipeline chain and every device s,
the fastest choice of the segments' recompute options whose peak fits device s, priced by
the one stage cost model (`solvers.pipeline_cost.StageSpec.cost`). The split DP
(`solvers.pipeline_split`) and the ``"best"`` stage plan of the baselines read it.

The per-stage option choice follows the segment-option chain of `solvers.hierarchical`
(a MadPipe-style stage cost, Beaumont et al., "MadPipe: Memory Aware Dynamic Programming
Algorithm for Pipelined Model Parallelism", IPDPS 2021, with recompute options in place of
a fixed checkpointing policy).

Algorithm. Bytes of the options are counted in units of ``ceil(scale / resolution)``,
``scale`` the chain's largest activation bytes (`PipelineChain.activation_scale_bytes`),
rounded up (safe side); every other term is exact bytes. The unit depends on the chain
only, so more budget never gives a slower plan. For every first segment a, one pass over
a, a + 1, ... keeps the Pareto states (saved units, working units, recompute ms, levels)
after each segment; the cheapest state that fits device s's budget is the cost of stage
[a, b) on device s, read from the same pass for every b and s. The keep-all plan of every
stage is also priced in exact bytes (no recomputation costs nothing, so rounding must not
forbid it). O(S^2 * L * P) for the passes and O(K * S^2 * P) for the readout, P the
Pareto states of one pass (at most (U + 1)^2 for U = resolution, a few dozen in
practice), L options per segment. Exact (unit one byte) when ``resolution`` is at least
``scale``.
"""

from __future__ import annotations

import bisect
from typing import Sequence

from solvers.pipeline_cost import PipelineChain, StagePlace, StageSpec, run_segment

State = tuple[int, int, float, tuple[int, ...]]   # saved units, working units, recompute ms, levels


class StageTable:
    """Pareto states of every stage [a, b) (module docstring), and their readout:
    ``best[s][a][b]`` = (time ms, levels) of the fastest plan of stage [a, b) that fits
    device s, or None; ``closest[s][a][b]`` = (least estimated peak minus the budget,
    levels). Only stages that can stand at position s are read (stage 0 starts at segment
    0, stage K - 1 ends at segment S). ``prune=False`` keeps states over every budget, for
    the closest plans of an infeasible problem."""

    def __init__(self, chain: PipelineChain, budgets_bytes: Sequence[int], microbatches: int, schedule: str,
                 link_bytes_per_ms: float, resolution: int, prune: bool = True) -> None:
        self.chain, self.budgets = chain, list(budgets_bytes)
        self.microbatches, self.schedule, self.link_bytes_per_ms = microbatches, schedule, link_bytes_per_ms
        count, stages = chain.num_segments, len(self.budgets)
        self.unit_bytes = max(1, -(-chain.activation_scale_bytes() // resolution))
        limit = max(self.budgets) if prune else None
        self.best: list[list[list[tuple[float, tuple[int, ...]] | None]]] = [
            [[None] * (count + 1) for _ in range(count + 1)] for _ in range(stages)]
        self.closest: list[list[list[tuple[int, tuple[int, ...]] | None]]] = [
            [[None] * (count + 1) for _ in range(count + 1)] for _ in range(stages)]
        for first in range(count):
            keep_saved = keep_working = 0     # the keep-all plan of [first, end), exact bytes
            passes = self._pass(first, limit)
            for end in range(first + 1, count + 1):
                option = chain.segments[end - 1].options[0]
                keep_saved, keep_working = run_segment(keep_saved, keep_working, option.saved_bytes,
                                                       option.need_bytes)
                states = passes[end - first - 1] if end - first - 1 < len(passes) else []
                for stage in range(max(0, stages - 1 - (count - end)), min(first, stages - 1) + 1):
                    if (stage == 0) != (first == 0) or (stage == stages - 1) != (end == count):
                        continue
                    self._read(stage, first, end, states, keep_saved, keep_working)

    def _pass(self, first: int, limit: int | None) -> list[list[State]]:
        """States after each segment from ``first`` on; stops when none is left under
        ``limit``, priced as the lightest place a stage starting at ``first`` can have (one
        micro-batch in flight, nothing sent): a lower bound of every device's peak."""
        unit, chain = self.unit_bytes, self.chain
        lightest = StagePlace(in_flight=1, receives=first > 0, sends=False)
        states: list[State] = [(0, 0, 0.0, ())]
        result = []
        for end in range(first + 1, chain.num_segments + 1):
            spec = StageSpec.of_segments(chain, first, end, microbatches=self.microbatches, place=lightest,
                                         link_bytes_per_ms=self.link_bytes_per_ms)
            # one micro-batch in flight: what a plan saves adds nothing beyond its working peak
            headroom = None if limit is None else spec.working_headroom_bytes(limit, saved_bytes=0)
            following = []
            for saved, working, recompute_ms, levels in states:
                for level, option in enumerate(chain.segments[end - 1].options):
                    grown, peak = run_segment(saved, working, -(-option.saved_bytes // unit),
                                              -(-option.need_bytes // unit))
                    if headroom is not None and peak * unit > headroom:
                        continue
                    following.append((grown, peak, recompute_ms + option.time_ms, levels + (level,)))
            states = _pareto(following)
            if not states:
                break
            result.append(states)
        return result

    def _read(self, stage: int, first: int, end: int, states: list[State], keep_saved_bytes: int,
              keep_working_bytes: int) -> None:
        """``best`` and ``closest`` of stage [first, end) on device ``stage``: the keep-all
        plan in exact bytes first, then every state in rounded units."""
        spec = StageSpec.of_stage(self.chain, first, end, stage=stage, num_stages=len(self.budgets),
                                  microbatches=self.microbatches, schedule=self.schedule,
                                  link_bytes_per_ms=self.link_bytes_per_ms)
        budget, unit = self.budgets[stage], self.unit_bytes
        keep_all = (0,) * (end - first)
        keep_terms = spec.cost(keep_saved_bytes, keep_working_bytes)
        best = (0.0, keep_all, keep_terms) if keep_terms.peak_bytes <= budget else None
        closest = (keep_terms.peak_bytes - budget, keep_all)
        for saved, working, recompute_ms, levels in states:
            terms = spec.cost(saved * unit, working * unit, recompute_ms)
            if terms.peak_bytes <= budget and (best is None or recompute_ms < best[0]):
                best = (recompute_ms, levels, terms)
            if terms.peak_bytes - budget < closest[0]:
                closest = (terms.peak_bytes - budget, levels)
        if best is not None:
            self.best[stage][first][end] = (best[2].time_ms, best[1])
        self.closest[stage][first][end] = closest


def _pareto(states: list[State]) -> list[State]:
    """The states no other state beats in saved units, working units and time at once.
    Sorted by saved units; a staircase of (working, least time) over the kept ones answers
    "is this one dominated" by bisection. O(n log n) plus the staircase updates."""
    states.sort(key=lambda state: (state[0], state[1], state[2]))
    kept = []
    stair_working: list[int] = []    # ascending
    stair_time: list[float] = []     # strictly descending
    for state in states:
        _, working, time_ms, _ = state
        position = bisect.bisect_right(stair_working, working)
        if position > 0 and stair_time[position - 1] <= time_ms:
            continue
        kept.append(state)
        stop = position
        while stop < len(stair_working) and stair_time[stop] >= time_ms:
            stop += 1
        stair_working[position:stop] = [working]
        stair_time[position:stop] = [time_ms]
    return kept
