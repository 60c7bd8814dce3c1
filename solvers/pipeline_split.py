"""``pipeline_split``: split a pipeline chain into K contiguous stages for K devices and pick
each stage's recompute options, minimizing the step time of M micro-batches under a named
schedule (GPipe or 1F1B), every device under its own budget.

A dynamic program over split points in the spirit of PipeDream's partitioner (Narayanan et
al., "PipeDream: Generalized Pipeline Parallelism for DNN Training", SOSP 2019) and of
MadPipe (Beaumont, Eyraud-Dubois, Guermouche, Lambert, "MadPipe: Memory Aware Dynamic
Programming Algorithm for Pipelined Model Parallelism", IPDPS 2021), whose stage costs come
from the per-segment recompute options of `solvers.hierarchical` (the stage table of
`solvers.pipeline_stage_table`) instead of a fixed checkpointing policy. Every stage is
priced by the one cost model of `solvers.pipeline_cost`.

Algorithm. ``sum(t_s) + (M - 1) * max(t_s)`` is not a min-max: for a cap T on the stage
times, a DP over (stage, split point) finds the least ``sum(t_s)`` with every
``t_s <= T`` (ties: least max), O(K * S^2). Caps walk the Pareto front of (max, sum) from
the top: after a solution of max T', the next cap is the largest stage cost below T', and
the walk stops when no split is left or when its sum plus (M - 1) times the least possible
max (a min-max DP, O(K * S^2)) cannot beat the best. O(Q * K * S^2) for Q points of that
front (Q <= K * S^2, a handful in practice), after the stage table's O(S^2 * L * P +
K * S^2 * P).

Optimal for the cost model and the discretized options: no split and no choice of the
given options whose rounded bytes fit the budgets (or, for keep-all stages, whose exact
bytes fit) has a shorter step time (with ``resolution`` at least the chain's activation
scale the unit is one byte and the result is exactly optimal, which the tests check
against `solvers.pipeline_brute_force`).
"""

from __future__ import annotations

import bisect
from typing import Sequence

from solvers.errors import InfeasibleBudgetError, OptionError
from solvers.pipeline_cost import (DEFAULT_LINK_BYTES_PER_MS, PipelineChain, PipelineSolution,
                                   check_pipeline_arguments, evaluate_stage)
from solvers.pipeline_stage_table import StageTable

SOLVER = "pipeline"

CostTable = Sequence[Sequence[Sequence[float | None]]]   # [stage][first][end] -> cost, None when it does not fit


def least_max_split(table: CostTable, count: int) -> tuple[float, tuple[int, ...]] | None:
    """The split of ``count`` segments into ``len(table)`` stages (stage end points) whose
    largest stage cost is the least (torchgpipe's objective), ties to the earliest cuts:
    (that cost, ends), or None when no split has a cost for every stage. O(K * S^2)."""
    stages = len(table)
    best: list[tuple[float, tuple[int, ...]] | None] = [
        None if table[0][0][end] is None else (table[0][0][end], (end,)) for end in range(count + 1)]
    for stage in range(1, stages):
        following: list[tuple[float, tuple[int, ...]] | None] = [None] * (count + 1)
        for end in range(stage + 1, count + 1):
            for first in range(stage, end):
                previous, cost = best[first], table[stage][first][end]
                if previous is None or cost is None:
                    continue
                candidate = (max(previous[0], cost), previous[1] + (end,))
                if following[end] is None or candidate[0] < following[end][0]:
                    following[end] = candidate
        best = following
    return best[count]


def _least_sum_split(table: CostTable, count: int, cap: float) -> tuple[float, float, tuple[int, ...]] | None:
    """The split (stage end points) with the least sum of stage costs, every cost <= cap;
    ties: least max. (sum, max, ends) or None. O(K * S^2)."""
    stages = len(table)
    # best[b] after stage s: (sum, max, ends) of stages 0..s covering segments [0, b)
    best: list[tuple[float, float, tuple[int, ...]] | None] = [None] * (count + 1)
    for end in range(1, count + 1):
        cost = table[0][0][end]
        if cost is not None and cost <= cap:
            best[end] = (cost, cost, (end,))
    for stage in range(1, stages):
        following: list[tuple[float, float, tuple[int, ...]] | None] = [None] * (count + 1)
        for end in range(stage + 1, count + 1):
            for first in range(stage, end):
                previous, cost = best[first], table[stage][first][end]
                if previous is None or cost is None or cost > cap:
                    continue
                candidate = (previous[0] + cost, max(previous[1], cost), previous[2] + (end,))
                if following[end] is None or candidate[:2] < following[end][:2]:
                    following[end] = candidate
        best = following
    return best[count]


def _best_split(table: CostTable, count: int, microbatches: int) -> tuple[int, ...] | None:
    """Ends of the split minimizing ``sum + (M - 1) * max`` (module docstring)."""
    least_max = least_max_split(table, count)
    if least_max is None:
        return None
    floor = least_max[0]
    caps = sorted({cost for per_stage in table for row in per_stage for cost in row if cost is not None})
    best: tuple[float, tuple[int, ...]] | None = None
    cap = caps[-1]
    while True:
        found = _least_sum_split(table, count, cap)
        if found is None:
            break
        total, highest, ends = found
        objective = total + (microbatches - 1) * highest
        if best is None or objective < best[0]:
            best = (objective, ends)
        if microbatches == 1 or total + (microbatches - 1) * floor >= best[0]:
            break
        below = bisect.bisect_left(caps, highest)
        if below == 0:
            break
        cap = caps[below - 1]
    return None if best is None else best[1]


def solve_pipeline_chain(chain: PipelineChain, budgets_bytes: Sequence[int], *, microbatches: int,
                         schedule: str = "1f1b", link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS,
                         resolution: int = 400) -> PipelineSolution:
    """The split into ``len(budgets_bytes)`` stages and the option per segment with the
    least step time whose stage peaks fit the budgets (module docstring: algorithm,
    complexity, optimality). Predictions are exact bytes of the chosen options.

    Raises:
        InfeasibleBudgetError: no split fits; it names the device that is furthest over
            its budget in the closest split and the budget it needs (every other device
            needing at most the same number of extra bytes).
        UnsupportedGraphError: more stages than segments.
        OptionError: M < 1, an unknown schedule, a non-positive link bandwidth or resolution.
    """
    check_pipeline_arguments(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms)
    if resolution < 1:
        raise OptionError(f"resolution must be at least 1, got {resolution}")
    stages = len(budgets_bytes)
    table = StageTable(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution)
    times = [[[None if entry is None else entry[0] for entry in row] for row in per_stage]
             for per_stage in table.best]
    ends = _best_split(times, chain.num_segments, microbatches)
    if ends is None:
        raise _infeasible(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution)
    firsts = (0,) + ends[:-1]
    costs = [evaluate_stage(chain, first, end, table.best[stage][first][end][1], stage=stage, num_stages=stages,
                            microbatches=microbatches, schedule=schedule, budget_bytes=budgets_bytes[stage],
                            link_bytes_per_ms=link_bytes_per_ms)
             for stage, (first, end) in enumerate(zip(firsts, ends))]
    return PipelineSolution.of_stages(costs, microbatches, schedule)


def _infeasible(chain: PipelineChain, budgets_bytes: Sequence[int], microbatches: int, schedule: str,
                link_bytes_per_ms: float, resolution: int) -> InfeasibleBudgetError:
    """The split whose worst stage is the least over its budget (the min-max DP over the
    unpruned table), as an error naming that stage's device and breakdown."""
    table = StageTable(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution, prune=False)
    excess = [[[None if entry is None else float(entry[0]) for entry in row] for row in per_stage]
              for per_stage in table.closest]
    stages = len(budgets_bytes)
    closest = least_max_split(excess, chain.num_segments)
    assert closest is not None, "an unpruned stage table has an entry for every stage"
    over, ends = closest
    firsts = (0,) + ends[:-1]
    worst = max(range(stages), key=lambda s: (excess[s][firsts[s]][ends[s]], -s))
    cost = evaluate_stage(chain, firsts[worst], ends[worst], table.closest[worst][firsts[worst]][ends[worst]][1],
                          stage=worst, num_stages=stages, microbatches=microbatches, schedule=schedule,
                          budget_bytes=budgets_bytes[worst], link_bytes_per_ms=link_bytes_per_ms)
    return InfeasibleBudgetError(
        int(budgets_bytes[worst]), int(budgets_bytes[worst] + over),
        {f"stage {worst} static (parameters, gradients, inputs)": cost.static_bytes,
         "receive buffers": cost.receive_bytes, f"{cost.in_flight - 1} other micro-batches in flight":
         cost.in_flight_bytes, "working": cost.working_bytes, "extra bytes every device needs": int(over)},
        solver=f"{SOLVER}, device {worst} of {stages}, balance {tuple(e - f for f, e in zip(firsts, ends))}")
