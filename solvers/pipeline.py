"""``pipeline``: split the segment chain of one micro-batch's joint graph into K contiguous
stages for K devices and pick each stage's recompute plan, minimizing the step time of M
micro-batches under GPipe or 1F1B, every device under its own budget.

This module is the public face of the pipeline solver; each idea lives in a module of
its own:

=============================  ==========================================================
`solvers.pipeline_cost`        the one stage cost model (peak bytes and time of a stage,
                               `StageSpec.cost`), schedules, the chain's data types
`solvers.pipeline_stage_table` per stage and device, the fastest recompute options that fit
`solvers.pipeline_split`       the split DP (`solve_pipeline_chain`), optimal for the model
`solvers.pipeline_baselines`   torchgpipe's equal-layers and balance-by-time splits
`solvers.pipeline_brute_force` the enumeration the tests check the DP against
`solvers.pipeline_plan`        `PipelinePlan`, its JSON format, `plan_from_solution`
`solvers.pipeline_graph`       a `Graph` as a chain (`pipeline_chain`), `solve_pipeline`
=============================  ==========================================================

Papers: GPipe (Huang et al., NeurIPS 2019), PipeDream and 1F1B (Narayanan et al., SOSP
2019; PipeDream-Flush, ICML 2021), MadPipe (Beaumont et al., IPDPS 2021), torchgpipe
(Kim et al., 2020); each module cites what it follows.
"""

from solvers.pipeline_baselines import STAGE_PLANS, evaluate_split, split_balance_by_time, split_equal_layers
from solvers.pipeline_brute_force import brute_force_pipeline
from solvers.pipeline_cost import (DEFAULT_LINK_BYTES_PER_MS, SCHEDULES, PipelineChain, PipelineSolution,
                                   SegmentCosts, StageCost, StagePlace, StageSpec, StageTerms, check_schedule,
                                   evaluate_stage, in_flight_microbatches, step_time_ms)
from solvers.pipeline_graph import pipeline_chain, solve_pipeline
from solvers.pipeline_plan import PIPELINE_FORMAT, PipelinePlan, StagePlan, plan_from_solution
from solvers.pipeline_split import SOLVER, solve_pipeline_chain

__all__ = ["DEFAULT_LINK_BYTES_PER_MS", "PIPELINE_FORMAT", "SCHEDULES", "SOLVER", "STAGE_PLANS", "PipelineChain",
           "PipelinePlan", "PipelineSolution", "SegmentCosts", "StageCost", "StagePlace", "StagePlan", "StageSpec",
           "StageTerms", "brute_force_pipeline", "check_schedule", "evaluate_split", "evaluate_stage",
           "in_flight_microbatches", "pipeline_chain", "plan_from_solution", "solve_pipeline",
           "solve_pipeline_chain", "split_balance_by_time", "split_equal_layers", "step_time_ms"]
