"""``pipeline_baselines``: the splits a user gets without memsched's split DP, priced by the
same stage cost model (`solvers.pipeline_cost`) so that their step times compare with
`solvers.pipeline_split.solve_pipeline_chain`'s.

The two balancing rules of torchgpipe (Kim et al., "torchgpipe: On-the-fly Pipeline
Parallelism for Training Giant Models", 2020): equal layers per stage
(`split_equal_layers`, O(K)) and balance by time (`split_balance_by_time`: torchgpipe's
objective, the least largest stage time, solved exactly by a min-max DP, O(K * S^2), where
torchgpipe uses a block-partition heuristic). `evaluate_split` then gives each stage of a
given split a plan: memsched's best under its budget, keep-all, or
``torch.utils.checkpoint`` on every block of a stage over its budget (Chen et al.,
"Training Deep Nets with Sublinear Memory Cost", 2016, as GPipe applies it).
"""

from __future__ import annotations

import itertools
from typing import Sequence

from solvers.errors import OptionError
from solvers.pipeline_cost import (DEFAULT_LINK_BYTES_PER_MS, PipelineChain, PipelineSolution, StageCost,
                                   check_pipeline_arguments, evaluate_stage)
from solvers.pipeline_split import least_max_split
from solvers.pipeline_stage_table import StageTable

STAGE_PLANS = ("best", "every_block", "keep_all")


def _check_num_stages(chain: PipelineChain, num_stages: int) -> None:
    if not 1 <= num_stages <= chain.num_segments:
        raise OptionError(f"num_stages must be between 1 and the {chain.num_segments} segments, got {num_stages}")


def split_equal_layers(chain: PipelineChain, num_stages: int) -> tuple[int, ...]:
    """torchgpipe's naive balance: S // K segments per stage, the S % K left over going
    one each to the first stages. Raises `OptionError` when K < 1 or K > S."""
    _check_num_stages(chain, num_stages)
    base, extra = divmod(chain.num_segments, num_stages)
    return tuple(base + (stage < extra) for stage in range(num_stages))


def split_balance_by_time(chain: PipelineChain, num_stages: int) -> tuple[int, ...]:
    """torchgpipe's ``balance_by_time`` objective: the contiguous split minimizing the
    largest per-stage forward + backward time, everything kept, no transfers. torchgpipe
    solves it with a block-partition heuristic; this is the exact min-max DP, O(K * S^2),
    ties to the earliest cuts. Raises `OptionError` when K < 1 or K > S."""
    _check_num_stages(chain, num_stages)
    count = chain.num_segments
    prefix = [0.0]
    for segment in chain.segments:
        prefix.append(prefix[-1] + segment.forward_ms + segment.backward_ms)
    times = [[prefix[end] - prefix[first] if end > first else None for end in range(count + 1)]
             for first in range(count + 1)]
    found = least_max_split([times] * num_stages, count)
    assert found is not None, "every stage count up to the segment count has a split"
    ends = found[1]
    return tuple(end - first for first, end in zip((0,) + ends[:-1], ends))


def evaluate_split(chain: PipelineChain, balance: Sequence[int], budgets_bytes: Sequence[int], *, microbatches: int,
                   schedule: str = "1f1b", stage_plan: str = "best",
                   link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS, resolution: int = 400) -> PipelineSolution:
    """A given split (segments per stage) under the same model, each stage's plan chosen by
    ``stage_plan``: ``"best"`` the fastest discretized option choice that fits (the
    closest to fitting when none does), ``"keep_all"`` option 0 everywhere,
    ``"every_block"`` keep-all where the stage fits with it and otherwise every segment
    of the stage at its last option (``torch.utils.checkpoint`` on every block). A stage
    over its budget gives ``feasible=False``; nothing raises for that.

    Raises:
        OptionError: an unknown ``stage_plan``, or a balance that does not give every stage
            at least one segment and cover the chain (and `check_pipeline_arguments`).
    """
    check_pipeline_arguments(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms)
    if stage_plan not in STAGE_PLANS:
        raise OptionError(f"unknown stage_plan {stage_plan!r}; choose one of {', '.join(STAGE_PLANS)}")
    stages = len(budgets_bytes)
    if len(balance) != stages or any(size < 1 for size in balance) or sum(balance) != chain.num_segments:
        raise OptionError(f"balance {tuple(balance)} must give each of the {stages} stages at least one segment "
                          f"and cover the {chain.num_segments} segments")
    ends = tuple(itertools.accumulate(balance))
    firsts = (0,) + ends[:-1]
    table = (StageTable(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution, prune=False)
             if stage_plan == "best" else None)
    costs = []
    for stage, (first, end) in enumerate(zip(firsts, ends)):
        def cost(levels: Sequence[int]) -> StageCost:
            return evaluate_stage(chain, first, end, levels, stage=stage, num_stages=stages,
                                  microbatches=microbatches, schedule=schedule,
                                  budget_bytes=budgets_bytes[stage], link_bytes_per_ms=link_bytes_per_ms)
        keep_all = cost([0] * (end - first))
        if stage_plan == "keep_all" or (stage_plan == "every_block" and keep_all.fits):
            costs.append(keep_all)
        elif stage_plan == "every_block":
            costs.append(cost([len(segment.options) - 1 for segment in chain.segments[first:end]]))
        else:
            entry = table.best[stage][first][end] or table.closest[stage][first][end]
            costs.append(cost(entry[1]))
    return PipelineSolution.of_stages(costs, microbatches, schedule)
