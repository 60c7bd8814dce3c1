"""A segment's recompute options, shared by the segment DPs (`solvers.hierarchical`,
`solvers.chain`, `solvers.pipeline`): its droppable storages in one drop order (greedy's
score, bytes per recompute millisecond, independent drops first) and a few prefixes of
that order spread over the dropped bytes. Option 0 keeps everything; the last drops every
storage (a checkpoint of the segment). After the segment-wise option tables of
Rockmate (Zhao et al., ICML 2023), with greedy's order in place of its per-block ILP.
O(R * graph) per distinct block; identical blocks share one order.
"""

from __future__ import annotations

from dataclasses import dataclass

from solvers.baselines import recompute_frontier, recompute_time_ms
from solvers.graph import Graph
from solvers.schedule import saved_roots
from solvers.segments import Segment


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
