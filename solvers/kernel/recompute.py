"""What a plan may recompute and what recomputing costs: the facts every dropping solver scores with.

`droppable_roots` are the saved storages a keep/recompute/offload plan may drop;
`recompute_frontier` and `recompute_time_ms` walk back from one of them to what its
recomputation reads and runs (a dropout mask's random fill behind a cheap scaling
included), the denominator of the bytes-per-millisecond score of Checkmate's greedy
baseline (Jain et al., MLSys 2020, Sec. 6) that `greedy`, the segment options and the
offload refinement order by. `checkpoint_decisions` is the decision set of a fixed
checkpointing policy (keep a set, recompute the rest: Chen et al., 2016), and
`every_block_decisions` the one of ``torch.utils.checkpoint`` on every segment, which
`every_block` returns and the portfolio seeds the segment DPs (`chain`, `hierarchical`)
with (a `Seed`: a named decision set of the segment chain, one more candidate).
"""

from __future__ import annotations

from typing import Callable

from solvers.graph import Graph
from solvers.kernel.program import saved_roots
from solvers.kernel.segments import Segment
from solvers.plan import Decision


def droppable_roots(graph: Graph) -> tuple[str, ...]:
    """Saved storages a plan may drop: not pinned, not empty, made by an op that can run
    again. Graph order. O(values)."""
    pinned_roots = {graph.value(name).root for name in graph.pinned_values}
    return tuple(root for root in saved_roots(graph)
                 if root not in pinned_roots and graph.value(root).size_bytes > 0
                 and graph.op(graph.value(root).producer).recomputable)


def recompute_frontier(graph: Graph, root: str) -> frozenset[str]:
    """The storages that recomputing ``root`` reads: walk back from its producer through
    forward values the forward does not keep (they would be recomputed too) to the
    first saved storages or placeholders. O(size of that sub-graph)."""
    return _recompute_walk(graph, root)[0]


def recompute_time_ms(graph: Graph, root: str) -> float:
    """Time to recompute ``root`` alone, every other saved storage kept: its producer and
    the ops behind it whose outputs the forward does not keep (a dropout mask's random
    fill behind the saved, cheap scaling). What dropping ``root`` costs at the least, the
    denominator of the drop scores. O(size of that sub-graph)."""
    return sum(graph.op(name).time_ms for name in _recompute_walk(graph, root)[1])


def _recompute_walk(graph: Graph, root: str) -> tuple[frozenset[str], frozenset[str]]:
    """(storages read, ops run) by the recomputation of ``root`` (`recompute_frontier`)."""
    saved = set(saved_roots(graph))
    found: set[str] = set()
    seen: set[str] = set()
    producer = graph.value(root).producer
    ops = {producer}
    stack = list(graph.op(producer).inputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        value = graph.value(name)
        if value.root in saved or value.producer is None:
            found.add(value.root)
            if value.root == name or value.root in saved or value.producer is None:
                continue
        ops.add(value.producer)
        stack.extend(graph.op(value.producer).inputs)
    found.discard(root)
    return frozenset(found), frozenset(ops)


def checkpoint_decisions(graph: Graph, keep: set[str]) -> dict[str, Decision]:
    """Recompute every saved storage except ``keep``, the pinned values (forward outputs:
    the caller holds them) and those whose producer cannot run twice. O(values)."""
    pinned_roots = {graph.value(name).root for name in graph.pinned_values}
    decisions = {}
    for root in saved_roots(graph):
        producer = graph.op(graph.value(root).producer)
        must_keep = root in keep or root in pinned_roots or not producer.recomputable
        decisions[root] = Decision.KEEP if must_keep else Decision.RECOMPUTE
    return decisions


def every_block_decisions(graph: Graph, segments: tuple[Segment, ...]) -> dict[str, Decision]:
    """Checkpoint every segment: keep only the storages crossing into each one
    (``Segment.crossing_in``, skip tensors included), recompute the rest. O(values)."""
    return checkpoint_decisions(graph, {root for segment in segments for root in segment.crossing_in})


# A named decision set over the segment chain that a segment DP takes as one more candidate.
Seed = tuple[str, Callable[[Graph, tuple[Segment, ...]], dict[str, Decision]]]
