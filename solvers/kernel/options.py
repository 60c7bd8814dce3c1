"""A segment's recompute options and what each costs, shared by the segment DPs
(`solvers.hierarchical`, `solvers.chain`, `solvers.pipeline_graph`).

Options: a segment's droppable storages in one drop order (greedy's score, bytes per
recompute millisecond, `kernel.recompute`; independent drops first) and a few prefixes of
that order spread over the dropped bytes. Option 0 keeps everything; the last drops every
storage (a checkpoint of the segment). After the segment-wise option tables of Rockmate
(Zhao et al., ICML 2023) and HiRemate (Gusak et al., 2025), with greedy's order in place
of their per-block ILP. O(R * graph) per distinct block; identical blocks share one order.

Costs (`probe_costs`): each option level is *probed*: the plan with that level in every
segment is built and replayed by `simulate`, and for each segment k the probe gives
``saved[k]`` (bytes of k's storages alive at the end of the forward, `live_roots_at`),
``time[k]`` (time of k's forward ops run again in the backward) and ``need[k]`` (the
highest memory while k's forward or k's backward runs, recomputations included, minus the
saved bytes of the segments before k). The model is additive: the peak while segment k
runs is ``sum(saved[j] for j < k) + need[k]``; the DPs check it by replaying their plans.
One build and one replay per level: O(L * steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from solvers.graph import Graph, Phase, ValueKind
from solvers.kernel.program import plan_from_decisions, saved_roots
from solvers.kernel.recompute import recompute_frontier, recompute_time_ms
from solvers.kernel.segments import Segment, segment_of_forward_op
from solvers.plan import Decision, Plan, StepKind
from solvers.simulate import SimResult, live_roots_at, simulate


@dataclass(frozen=True)
class SegmentOptions:
    """The droppable storages of one segment in drop order, and the prefix lengths that
    are its options (ascending: 0 is keep-all, ``len(order)`` is checkpoint)."""

    order: tuple[str, ...]
    prefix_lengths: tuple[int, ...]

    def dropped(self, level: int) -> tuple[str, ...]:
        return self.order[:self.prefix_lengths[min(level, len(self.prefix_lengths) - 1)]]


def segment_options(graph: Graph, segments: tuple[Segment, ...], options_per_segment: int
                    ) -> list[SegmentOptions]:
    """One `SegmentOptions` per segment; identical blocks share the object (the order is
    computed on the first of them and mapped by position). O(R * graph) per distinct block."""
    owner = {}
    for segment in segments:
        for name in segment.forward_ops:
            for value_name in graph.op(name).outputs:
                owner[value_name] = segment.index
    pinned_roots = {graph.value(name).root for name in graph.pinned_values}
    boundaries = {root for segment in segments for root in segment.crossing_in}
    droppable: list[list[str]] = [[] for _ in segments]
    for root in saved_roots(graph):
        producer = graph.op(graph.value(root).producer)
        if (root in pinned_roots or root in boundaries or graph.value(root).size_bytes == 0
                or not producer.recomputable or root not in owner):
            continue
        droppable[owner[root]].append(root)

    shared: dict[tuple, tuple[list[str], SegmentOptions]] = {}
    result = []
    for segment in segments:
        roots = droppable[segment.index]
        key = (_signature(graph, segment), len(roots))
        if key in shared:
            first_roots, first = shared[key]
            position = {root: i for i, root in enumerate(first_roots)}
            order = tuple(roots[position[root]] for root in first.order)
            result.append(first if order == first.order else SegmentOptions(order, first.prefix_lengths))
            continue
        options = _drop_order_options(graph, roots, options_per_segment)
        shared[key] = (roots, options)
        result.append(options)
    return result


def _signature(graph: Graph, segment: Segment) -> tuple:
    """What makes two blocks identical: op targets and output sizes and shapes, in order."""
    def describe(name: str) -> tuple:
        op = graph.op(name)
        return op.target, tuple((graph.value(v).size_bytes, graph.value(v).shape) for v in op.outputs)
    return tuple(describe(name) for name in segment.forward_ops), tuple(describe(name) for name in segment.backward_ops)


def _drop_order_options(graph: Graph, roots: list[str], options_per_segment: int) -> SegmentOptions:
    """Greedy's order (bytes per recompute ms, independent drops first) and the prefixes
    spread evenly over the dropped bytes."""
    def score(root: str) -> float:
        return graph.value(root).size_bytes / (recompute_time_ms(graph, root) + 1e-6)

    by_score = sorted(roots, key=score, reverse=True)   # stable: ties keep graph order
    frontier = {root: recompute_frontier(graph, root) for root in by_score}
    independent: list[str] = []
    for root in by_score:
        if not any(other in frontier[root] or root in frontier[other] for other in independent):
            independent.append(root)
    chosen = set(independent)
    order = tuple(independent + [root for root in by_score if root not in chosen])

    cumulative = [0]
    for root in order:
        cumulative.append(cumulative[-1] + graph.value(root).size_bytes)
    lengths = {0, len(order)}
    steps = options_per_segment - 1
    for i in range(1, steps):
        target = cumulative[-1] * i / steps
        lengths.add(min(range(len(cumulative)), key=lambda n: (abs(cumulative[n] - target), n)))
    return SegmentOptions(order, tuple(sorted(lengths)))


def option_decisions(graph: Graph, segments: tuple[Segment, ...], options: list[SegmentOptions],
                     levels: list[int]) -> dict[str, Decision]:
    """Recompute what option ``levels[k]`` of each segment k drops, keep every other saved storage."""
    dropped = {root for segment, level in zip(segments, levels) for root in options[segment.index].dropped(level)}
    return {root: Decision.RECOMPUTE if root in dropped else Decision.KEEP for root in saved_roots(graph)}


@dataclass(frozen=True)
class OptionCost:
    saved_bytes: int     # the segment's storages alive at the end of the forward
    need_bytes: int      # peak while the segment runs, minus what earlier segments saved
    time_ms: float       # the segment's forward ops run again in the backward


def probe_costs(graph: Graph, segments: tuple[Segment, ...], options: list[SegmentOptions]
                ) -> list[list[OptionCost]]:
    """``costs[k][i]``: the cost of the i-th option of segment k, read from the replay of
    the plan with option level i in every segment (the last option where a segment has
    fewer). One build and one replay per level."""
    levels = max(len(o.prefix_lengths) for o in options)
    costs: list[list[OptionCost]] = [[] for _ in segments]
    for level in range(levels):
        decisions = option_decisions(graph, segments, options, [level] * len(segments))
        plan = plan_from_decisions(graph, decisions, "probe", 0)
        measured = _segment_costs(graph, segments, plan, simulate(graph, plan, check_hash=False))
        for segment in segments:
            if level < len(options[segment.index].prefix_lengths):
                costs[segment.index].append(measured[segment.index])
    return costs


def _segment_costs(graph: Graph, segments: tuple[Segment, ...], plan: Plan, result: SimResult) -> list[OptionCost]:
    """Split one replay into per-segment saved bytes, need and recompute time."""
    forward_segment = segment_of_forward_op(segments)
    backward_segment = {name: segment.index for segment in segments for name in segment.backward_ops}
    count = len(segments)

    # storages alive at the end of the forward, by owning segment
    pinned_roots = {graph.value(name).root for name in graph.pinned_values}
    saved = [0] * count
    for root in live_roots_at(graph, plan, Phase.FORWARD, len(plan.forward) - 1, during_step=False):
        value = graph.value(root)
        if value.kind is ValueKind.ACTIVATION and root not in pinned_roots and value.producer in forward_segment:
            saved[forward_segment[value.producer]] += value.size_bytes

    # which segment each step works for: a forward step for the op it follows, a backward
    # step for the next backward op (recomputations run just before the op they serve)
    forward_owner, current = [], 0
    for step in plan.forward:
        if step.kind is StepKind.RUN:
            current = forward_segment[step.name]
        forward_owner.append(current)
    backward_owner: list[int | None] = [None] * len(plan.backward)
    upcoming = None
    for index in range(len(plan.backward) - 1, -1, -1):
        step = plan.backward[index]
        if step.kind is StepKind.RUN and step.name in backward_segment:
            upcoming = backward_segment[step.name]
        backward_owner[index] = upcoming
    # the steps after the last backward op (frees) stay with that op's segment
    tail = next((owner for owner in reversed(backward_owner) if owner is not None), count - 1)
    backward_owner = [tail if owner is None else owner for owner in backward_owner]

    high = [0] * count
    for point in result.timeline:
        owners = forward_owner if point.phase is Phase.FORWARD else backward_owner
        k = owners[point.step_index]
        high[k] = max(high[k], point.high_water_bytes)

    recompute = [0.0] * count
    for step in plan.backward:
        if step.kind is StepKind.RUN and step.name in forward_segment:
            recompute[forward_segment[step.name]] += graph.op(step.name).time_ms

    costs, before = [], 0
    for k in range(count):
        costs.append(OptionCost(saved_bytes=saved[k], need_bytes=max(0, high[k] - before), time_ms=recompute[k]))
        before += saved[k]
    return costs
