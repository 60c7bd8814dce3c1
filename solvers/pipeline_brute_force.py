"""``pipeline_brute_force``: the reference the pipeline split DP is tested against. Every
split times every option of every segment, each stage priced in exact bytes by the one
stage cost model (`solvers.pipeline_cost.evaluate_stage`). Optimal by enumeration;
O(C(S-1, K-1) * prod(L_k) * S), so for chains of S <= 6 segments.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

from solvers.errors import InfeasibleBudgetError
from solvers.pipeline_cost import (DEFAULT_LINK_BYTES_PER_MS, PipelineChain, PipelineSolution,
                                   check_pipeline_arguments, evaluate_stage)


def _balances(count: int, stages: int) -> Iterator[tuple[int, ...]]:
    """Every way to give each of ``stages`` stages at least one of ``count`` segments."""
    for cuts in itertools.combinations(range(1, count), stages - 1):
        bounds = (0,) + cuts + (count,)
        yield tuple(end - first for first, end in zip(bounds, bounds[1:]))


def brute_force_pipeline(chain: PipelineChain, budgets_bytes: Sequence[int], *, microbatches: int,
                         schedule: str = "1f1b",
                         link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS) -> PipelineSolution:
    """The least step time over every split and every option choice whose stages fit
    their budgets (module docstring).

    Raises:
        InfeasibleBudgetError: nothing fits; ``least_feasible_bytes - budget_bytes`` is the
            least number of extra bytes that, given to every device, makes a plan fit.
    """
    check_pipeline_arguments(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms)
    stages = len(budgets_bytes)
    best: PipelineSolution | None = None
    closest: tuple[int, int] | None = None     # (max over stages of peak - budget, -device)
    for balance in _balances(chain.num_segments, stages):
        ends = tuple(itertools.accumulate(balance))
        firsts = (0,) + ends[:-1]
        for levels in itertools.product(*(range(len(segment.options)) for segment in chain.segments)):
            costs = [evaluate_stage(chain, first, end, levels[first:end], stage=stage, num_stages=stages,
                                    microbatches=microbatches, schedule=schedule,
                                    budget_bytes=budgets_bytes[stage], link_bytes_per_ms=link_bytes_per_ms)
                     for stage, (first, end) in enumerate(zip(firsts, ends))]
            over = max((cost.peak_bytes - cost.budget_bytes, -cost.index) for cost in costs)
            if closest is None or over < closest:
                closest = over
            if over[0] <= 0:
                solution = PipelineSolution.of_stages(costs, microbatches, schedule)
                if best is None or solution.step_time_ms < best.step_time_ms:
                    best = solution
    if best is not None:
        return best
    assert closest is not None, "every chain has at least one split"
    over_bytes, device = closest[0], -closest[1]
    raise InfeasibleBudgetError(int(budgets_bytes[device]), int(budgets_bytes[device] + over_bytes),
                                {"extra bytes every device needs": over_bytes},
                                solver=f"brute_force_pipeline, device {device}")
