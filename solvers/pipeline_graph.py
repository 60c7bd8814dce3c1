"""``pipeline_graph``: a `Graph` as the chain the pipeline cost model reads, and
`solve_pipeline`, the graph-level entry point (graph in, `PipelinePlan` out).

`pipeline_chain` cuts the joint forward+backward graph of ONE micro-batch into the segment
chain of `kernel.segments.segment_chain` and measures what `solvers.pipeline_cost` needs of each
segment (times, static bytes, recompute options) and of each cut (the activation bytes
crossing it). `solve_pipeline` runs the split DP (`solvers.pipeline_split`) on that chain
and turns its solution into a plan (`solvers.pipeline_plan`).
"""

from __future__ import annotations

import time
from typing import Sequence

from solvers.errors import OptionError, UnsupportedGraphError
from solvers.graph import Graph, ValueKind
from solvers.kernel.options import OptionCost, SegmentOptions, probe_costs, segment_options
from solvers.kernel.segments import Segment, boundary_roots, segment_chain
from solvers.pipeline_cost import DEFAULT_LINK_BYTES_PER_MS, PipelineChain, SegmentCosts, check_schedule
from solvers.pipeline_plan import PipelinePlan, plan_from_solution
from solvers.pipeline_split import solve_pipeline_chain


def pipeline_chain(graph: Graph, *, options_per_segment: int = 8
                   ) -> tuple[PipelineChain, tuple[Segment, ...], list[SegmentOptions]]:
    """The graph's segment chain as a `PipelineChain`, with the segments and their options.

    Options and their costs come from `kernel.options.segment_options` and one
    `kernel.options.probe_costs` (L replays of the whole graph); an option's transient bytes
    are its probed need minus the graph's resident bytes (parameters, buffers, inputs),
    at least 0. ``param_bytes``: the parameter storages a segment's ops read, twice (the
    gradient), and its buffers once; ``model_input_bytes``: the input storages they read.
    ``cut_bytes`` from `kernel.segments.boundary_roots`. O(L * N + S * (ops + edges)).

    Raises:
        UnsupportedGraphError: ``options_per_segment`` < 2.
    """
    if options_per_segment < 2:
        raise UnsupportedGraphError(f"options_per_segment must be at least 2 (keep all, checkpoint), "
                                    f"got {options_per_segment}")
    segments = segment_chain(graph)
    options = segment_options(graph, segments, options_per_segment)
    costs = probe_costs(graph, segments, options)
    resident = graph.resident_bytes()
    weights = {ValueKind.PARAMETER: 2, ValueKind.BUFFER: 1}
    chain_segments = []
    for segment, segment_costs in zip(segments, costs):
        names = segment.forward_ops + segment.backward_ops
        # an op that only makes views (the trace's detach of every parameter, at the very
        # start) does not make its segment hold the parameter: the ops reading the view do
        roots = dict.fromkeys(graph.value(value).root for name in names if not _only_views(graph, name)
                              for value in graph.op(name).inputs)
        placeholders = [graph.value(root) for root in roots if graph.value(root).kind.is_placeholder]
        chain_segments.append(SegmentCosts(
            forward_ms=sum(graph.op(name).time_ms for name in segment.forward_ops),
            backward_ms=sum(graph.op(name).time_ms for name in segment.backward_ops),
            param_bytes=sum(weights.get(value.kind, 0) * value.size_bytes for value in placeholders),
            gradient_bytes=sum(value.size_bytes for value in placeholders if value.kind is ValueKind.PARAMETER),
            model_input_bytes=sum(value.size_bytes for value in placeholders if value.kind is ValueKind.INPUT),
            options=tuple(OptionCost(cost.saved_bytes, max(0, cost.need_bytes - resident), cost.time_ms)
                          for cost in segment_costs)))
    cuts = [0] + [sum(graph.value(root).size_bytes for root in boundary_roots(graph, segments, index))
                  for index in range(1, len(segments))] + [0]
    return PipelineChain(tuple(chain_segments), tuple(cuts)), segments, options


def _only_views(graph: Graph, op_name: str) -> bool:
    """Whether every output of the op is a view or alias (no storage of its own)."""
    outputs = graph.op(op_name).outputs
    return bool(outputs) and all(graph.value(name).alias_of is not None for name in outputs)


def solve_pipeline(graph: Graph, budgets_bytes: Sequence[int] | int, *, num_stages: int, microbatches: int,
                   schedule: str = "1f1b", link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS,
                   options_per_segment: int = 8, resolution: int = 400) -> PipelinePlan:
    """Split ``graph`` (one micro-batch's joint step) into ``num_stages`` pipeline stages
    and choose every stage's recompute plan: the least predicted step time for
    ``microbatches`` micro-batches under ``schedule`` ("gpipe" or "1f1b") with every
    device's peak within its budget (one int for all devices, or one per stage). Model in
    `solvers.pipeline_cost`; algorithm, complexity and optimality in
    `solvers.pipeline_split`.

    Raises:
        InfeasibleBudgetError: no split fits; names the device and the budget it needs.
        UnsupportedGraphError: more stages than the graph has segments.
        OptionError: num_stages or microbatches < 1, unknown schedule, wrong budget count.
    """
    started = time.perf_counter()
    if num_stages < 1:
        raise OptionError(f"num_stages must be at least 1, got {num_stages}")
    if isinstance(budgets_bytes, int):
        budgets = [budgets_bytes] * num_stages
    else:
        budgets = [int(budget) for budget in budgets_bytes]
        if len(budgets) != num_stages:
            raise OptionError(f"{len(budgets)} budgets for {num_stages} stages; give one budget per stage "
                              "or a single int for all of them")
    if microbatches < 1:
        raise OptionError(f"microbatches must be at least 1, got {microbatches}")
    check_schedule(schedule)
    chain, segments, options = pipeline_chain(graph, options_per_segment=options_per_segment)
    if num_stages > chain.num_segments:
        raise UnsupportedGraphError(f"graph {graph.name!r} cuts into {chain.num_segments} segments, too few for "
                                    f"{num_stages} stages; use num_stages <= {chain.num_segments}")
    solution = solve_pipeline_chain(chain, budgets, microbatches=microbatches, schedule=schedule,
                                    link_bytes_per_ms=link_bytes_per_ms, resolution=resolution)
    return plan_from_solution(graph, segments, options, solution, budgets, link_bytes_per_ms=link_bytes_per_ms,
                              solve_time_s=time.perf_counter() - started,
                              settings={"options_per_segment": options_per_segment, "resolution": resolution,
                                        "segments": chain.num_segments})
