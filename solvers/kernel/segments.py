"""Cut the forward of a step into a chain of segments: transformer blocks, ResNet blocks,
U-Net levels. The unit of `every_block` and `sqrt_n` checkpointing (Chen et al., "Training
Deep Nets with Sublinear Memory Cost", 2016, checkpoint segment boundaries) and the stages
of the chain DPs (`chain`, after Rotor, Beaumont et al. 2019; `hierarchical`; `pipeline`).

A *cut* at position ``p`` lies between forward ops ``p - 1`` and ``p`` (graph order). The
storages *crossing* it are the activation storages (alias roots) produced before it and
read by a forward op after it; parameters, buffers and inputs are always resident and never
cross. Between two GPT blocks one storage crosses (the residual stream); in a U-Net the
encoder's skip tensors cross every cut up to the decoder level that reads them.

How `segment_chain` chooses the cuts:

1. Candidate cuts. Where both neighbouring ops carry a module path (``Op.module``), a cut
   must be a module boundary that does not split a *repeated unit* (an element of a
   ``ModuleList``/``Sequential``, whose path ends in an index): ``blocks.0 | blocks.1.ln``
   and ``stages.0.0 | stages.0.1`` are candidates, ``blocks.0.attn | blocks.0.mlp`` and
   ``encoders.0.layers.2 | encoders.0.layers.3`` are not, nor is a cut between two ops of
   one module (the aten decomposition of a BatchNorm). Where a neighbour has no module
   path (hand-built graphs), a cut is a candidate when its crossing bytes are a local
   minimum (no larger than at either neighbouring cut).
   With ``nested_cuts``, a cut between two indexed children deeper inside a
   repeated unit (``stages.0.layers.0 | stages.0.layers.1``: the bottleneck blocks of a
   ResNet stage) is a candidate too when it is a *chain point*: one storage is at least
   `CHAIN_CUT_SHARE` of the bytes crossing it (the block's output; small batch-norm
   statistics may cross beside it). A cut inside a block, crossed by the block's input
   for the shortcut and the main branch, is not. `segmentations` gives the DPs both
   chains where they differ.
2. Merging. The smallest segment with fewer than ``min_segment_ops`` ops or fewer than
   ``min_segment_bytes`` activation bytes is merged into the neighbour across the more
   expensive of its two cuts (more crossing bytes; ties: the cut deeper in the module
   tree, then the smaller neighbour), until none is left; then, while there are more than
   ``max_segments``, the most expensive cut goes (same ties). Long skips are never
   refused: a cut may be crossed by any number of storages, which are recorded in
   ``Segment.crossing_in`` of the segment that reads them.

Backward ops are assigned by the *latest-segment rule*: a forward value belongs to the
segments that produce or read it (a parameter to the segments that use it); a backward op
belongs to the latest segment among those of the forward values it reads, but no later
than the earliest segment whose backward produced one of its gradient inputs (the
backward walks the segments from last to first, and the gradient of a segment's input
comes from the segment itself or a later one). So the backward of a block, which reads the
block's input (produced by the previous segment) and its parameters, lands in the block.
An op that reads no forward value belongs to the earliest segment among the producers of
its inputs; one that reads only tangents or nothing assigned yet (a ``t`` of a tangent)
to the latest segment among its consumers, or to the last segment when it has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

from solvers.errors import OptionError, UnsupportedGraphError
from solvers.graph import Graph, Op, ValueKind

DEFAULT_MIN_SEGMENT_OPS = 2
CHAIN_CUT_SHARE = 0.9   # a nested cut is a candidate when one storage is this share of what crosses it
DEFAULT_MIN_SEGMENT_FRACTION = 1 / 8   # of the largest candidate segment's activation bytes


@dataclass(frozen=True)
class Segment:
    """A contiguous run of forward ops and the backward ops that differentiate it.

    ``crossing_in``: activation storages (roots) produced by earlier segments and read by
    this segment's forward ops, graph order. ``output_roots``: storages produced here and
    read by a later segment's forward ops or returned by the forward. ``activation_bytes``:
    the storages this segment's forward ops allocate.
    """

    index: int
    forward_ops: tuple[str, ...]
    backward_ops: tuple[str, ...]
    crossing_in: tuple[str, ...]
    output_roots: tuple[str, ...]
    activation_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "forward_ops": list(self.forward_ops), "backward_ops": list(self.backward_ops),
                "crossing_in": list(self.crossing_in), "output_roots": list(self.output_roots),
                "activation_bytes": self.activation_bytes}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Segment":
        return cls(index=int(data["index"]), forward_ops=tuple(data["forward_ops"]),
                   backward_ops=tuple(data["backward_ops"]), crossing_in=tuple(data["crossing_in"]),
                   output_roots=tuple(data["output_roots"]), activation_bytes=int(data["activation_bytes"]))


def segment_chain(graph: Graph, *, min_segment_bytes: int | None = None,
                  min_segment_ops: int = DEFAULT_MIN_SEGMENT_OPS,
                  max_segments: int | None = None, every_op: bool = False,
                  nested_cuts: bool = False) -> tuple[Segment, ...]:
    """The forward ops of ``graph`` cut into a chain of segments (module docstring).

    ``every_op``: one segment per forward op, no candidate rule and no merging (the
    finest chain; Rotor's own setting on a sequential model, and what makes the chain DP's
    space cover the exact solvers' on a chain graph).

    ``min_segment_bytes`` defaults to 1/8 of the largest candidate segment's activation
    bytes; ``max_segments`` (None: no cap) bounds the count. Deterministic.
    O(ops + edges + S * ops) for S candidate cuts. Raises `UnsupportedGraphError` for a graph
    without forward ops, `OptionError` for ``max_segments < 1``.
    """
    forward = graph.forward_ops
    if not forward:
        raise UnsupportedGraphError(f"graph {graph.name!r} has no forward ops to segment")
    if max_segments is not None and max_segments < 1:
        raise OptionError(f"segment_chain: max_segments must be at least 1, got {max_segments}; "
                          "pass max_segments >= 1, or None for no cap")
    if every_op:
        return _build_segments(graph, list(range(len(forward))))
    cut_bytes = crossing_bytes(graph)
    largest = partial(_largest_crossing_bytes, graph, *_storage_spans(graph)) if nested_cuts else None
    starts = _candidate_starts(forward, cut_bytes, largest)
    activation = _activation_bytes_per_op(graph)
    if min_segment_bytes is None:
        largest = max(sum(activation[a:b]) for a, b in zip(starts, starts[1:] + [len(forward)]))
        min_segment_bytes = int(largest * DEFAULT_MIN_SEGMENT_FRACTION)
    depth = [0] + [_common_depth(forward[p - 1].module, forward[p].module) for p in range(1, len(forward))]
    starts = _merge(starts, len(forward), cut_bytes, depth, activation, min_segment_bytes, min_segment_ops,
                    max_segments)
    return _build_segments(graph, starts)


def segmentations(graph: Graph) -> list[tuple[Segment, ...]]:
    """The chains the DPs try: `segment_chain` with ``nested_cuts`` and, where it differs,
    its default, cut at the outermost repeated units only. Finer segments give a DP
    more places to checkpoint (ResNet-50: 18 blocks instead of 5 stages, predicted
    overhead at 30 % of activations +20 % instead of +28 %); coarser ones, options that
    drop across blocks (the zoo U-Net's levels). Deterministic; two chains at most."""
    fine = segment_chain(graph, nested_cuts=True)
    coarse = segment_chain(graph)
    if [segment.forward_ops for segment in fine] == [segment.forward_ops for segment in coarse]:
        return [fine]
    return [fine, coarse]


def crossing_bytes(graph: Graph) -> list[int]:
    """``result[p]``: bytes of the activation storages crossing the cut before forward op
    ``p`` (``result[0] == 0``). Sweep over storage lifetimes, O(ops + edges)."""
    forward = graph.forward_ops
    birth, last_read = _storage_spans(graph)
    delta = [0] * (len(forward) + 2)
    for root, last in last_read.items():
        size = graph.value(root).size_bytes
        delta[birth[root] + 1] += size
        delta[last + 1] -= size
    result, running = [], 0
    for position in range(len(forward)):
        running += delta[position]
        result.append(running)
    return result


def _largest_crossing_bytes(graph: Graph, birth: dict[str, int], last_read: dict[str, int], position: int) -> int:
    """Bytes of the largest activation storage crossing the cut before forward op
    ``position``. O(storages)."""
    return max((graph.value(root).size_bytes for root, last in last_read.items()
                if birth[root] < position <= last), default=0)


def segment_of_forward_op(segments: tuple[Segment, ...]) -> dict[str, int]:
    """Forward op name -> index of its segment."""
    return {name: segment.index for segment in segments for name in segment.forward_ops}


def boundary_roots(graph: Graph, segments: tuple[Segment, ...], index: int) -> tuple[str, ...]:
    """Storages alive across the cut before segment ``index``: produced by an earlier
    segment, read by this or a later one (skips that pass over this segment included),
    graph order. What a checkpoint at that cut must keep. O(ops + edges)."""
    producer_segment = root_segments(graph, segments)
    roots = {root for segment in segments[index:] for root in segment.crossing_in if producer_segment[root] < index}
    return tuple(root for root in producer_segment if root in roots)


# -- cuts ------------------------------------------------------------------------------------

def _storage_spans(graph: Graph) -> tuple[dict[str, int], dict[str, int]]:
    """Activation storages: position of the forward op that allocates each, and of the
    last forward op after it that reads it (only storages read after their birth)."""
    birth: dict[str, int] = {}
    last_read: dict[str, int] = {}
    for position, op in enumerate(graph.forward_ops):
        for name in op.inputs:
            root = graph.value(name).root
            if root in birth and birth[root] < position:
                last_read[root] = position
        for name in op.outputs:
            value = graph.value(name)
            if value.alias_of is None and value.kind is ValueKind.ACTIVATION:
                birth[name] = position
    return birth, last_read


def _activation_bytes_per_op(graph: Graph) -> list[int]:
    return [sum(graph.value(name).size_bytes for name in op.outputs
                if graph.value(name).alias_of is None and graph.value(name).kind is ValueKind.ACTIVATION)
            for op in graph.forward_ops]


def _common_depth(before: str, after: str) -> int:
    """Number of leading module-path components two ops share (0 when a path is unknown)."""
    if not before or not after:
        return 0
    a, b = before.split("."), after.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common


def _module_cut_allowed(before: str, after: str) -> bool | None:
    """Whether a cut between ops of these module paths is a block boundary; None when a
    path is unknown. Forbidden: inside one module, and anywhere inside a repeated unit (a
    path ending in an index) except between two of its indexed children."""
    if not before or not after:
        return None
    if before == after:
        return False
    a = before.split(".")
    common = _common_depth(before, after)
    last_index = max((i for i in range(common) if a[i].isdigit()), default=-1)
    if last_index == -1:
        return True
    if last_index == common - 1:
        return _between_indexed_siblings(before, after)
    return False


def _between_indexed_siblings(before: str, after: str) -> bool:
    """Whether the paths part at two indexed children of one container (``layers.0.* |
    layers.1.*``), at any depth."""
    if not before or not after:
        return False
    a, b = before.split("."), after.split(".")
    common = _common_depth(before, after)
    return len(a) > common and len(b) > common and a[common].isdigit() and b[common].isdigit()


def _candidate_starts(forward: tuple[Op, ...], cut_bytes: list[int],
                      largest_crossing: Callable[[int], int] | None) -> list[int]:
    """First op position of each candidate segment (always starts with 0)."""
    starts, nested = [0], []
    for position in range(1, len(forward)):
        before, after = forward[position - 1].module, forward[position].module
        allowed = _module_cut_allowed(before, after)
        if allowed is None:
            here = cut_bytes[position]
            left = cut_bytes[position - 1] if position > 1 else here
            right = cut_bytes[position + 1] if position + 1 < len(forward) else here
            allowed = here <= left and here <= right
        if allowed:
            starts.append(position)
        elif largest_crossing is not None and _between_indexed_siblings(before, after):
            nested.append(position)
    chain_points = [position for position in nested
                    if cut_bytes[position] > 0 and largest_crossing(position) >= CHAIN_CUT_SHARE * cut_bytes[position]]
    return sorted(starts + chain_points)


def _merge(starts: list[int], num_ops: int, cut_bytes: list[int], depth: list[int], activation: list[int],
           min_segment_bytes: int, min_segment_ops: int, max_segments: int | None) -> list[int]:
    """Remove cuts (module docstring, step 2). O(S * ops) for S candidate segments."""
    starts = list(starts)

    def bounds(i: int) -> tuple[int, int]:
        return starts[i], starts[i + 1] if i + 1 < len(starts) else num_ops

    def size(i: int) -> int:
        first, end = bounds(i)
        return sum(activation[first:end])

    def ops(i: int) -> int:
        first, end = bounds(i)
        return end - first

    while len(starts) > 1:
        small = [i for i in range(len(starts)) if ops(i) < min_segment_ops or size(i) < min_segment_bytes]
        if not small:
            break
        i = min(small, key=lambda j: (size(j), ops(j), j))
        # cut k separates segment k - 1 from segment k; segment i has cuts i (left), i + 1 (right)
        options = [cut for cut in (i, i + 1) if 1 <= cut < len(starts)]
        neighbour_size = {i: size(i - 1) if i >= 1 else 0, i + 1: size(i + 1) if i + 1 < len(starts) else 0}
        cut = max(options, key=lambda k: (cut_bytes[starts[k]], depth[starts[k]], -neighbour_size[k], -k))
        del starts[cut]
    while max_segments is not None and len(starts) > max_segments:
        cut = max(range(1, len(starts)),
                  key=lambda k: (cut_bytes[starts[k]], depth[starts[k]], -(size(k - 1) + size(k)), -k))
        del starts[cut]
    return starts


# -- segments --------------------------------------------------------------------------------

def root_segments(graph: Graph, segments: tuple[Segment, ...]) -> dict[str, int]:
    """Activation storage -> segment of the forward op that allocates it."""
    op_segment = segment_of_forward_op(segments)
    result = {}
    for op in graph.forward_ops:
        for name in op.outputs:
            value = graph.value(name)
            if value.alias_of is None and value.kind is ValueKind.ACTIVATION:
                result[name] = op_segment[op.name]
    return result


def _build_segments(graph: Graph, starts: list[int]) -> tuple[Segment, ...]:
    forward = graph.forward_ops
    ends = starts[1:] + [len(forward)]
    op_segment = {op.name: index for index, (first, end) in enumerate(zip(starts, ends))
                  for op in forward[first:end]}
    root_segment: dict[str, int] = {}
    for op in forward:
        for name in op.outputs:
            value = graph.value(name)
            if value.alias_of is None and value.kind is ValueKind.ACTIVATION:
                root_segment[name] = op_segment[op.name]

    crossing: list[dict[str, None]] = [{} for _ in starts]
    outputs: list[dict[str, None]] = [{} for _ in starts]
    for op in forward:
        reader = op_segment[op.name]
        for name in op.inputs:
            root = graph.value(name).root
            if root in root_segment and root_segment[root] < reader:
                crossing[reader][root] = None
                outputs[root_segment[root]][root] = None
    for name in graph.forward_outputs:
        root = graph.value(name).root
        if root in root_segment:
            outputs[root_segment[root]][root] = None

    backward_segment = _assign_backward(graph, op_segment, len(starts))
    backward_lists: list[list[str]] = [[] for _ in starts]
    for op in graph.backward_ops:
        backward_lists[backward_segment[op.name]].append(op.name)

    segments = []
    for index, (first, end) in enumerate(zip(starts, ends)):
        names = tuple(op.name for op in forward[first:end])
        size = sum(graph.value(root).size_bytes for root, seg in root_segment.items() if seg == index)
        ordered_outputs = tuple(root for root in root_segment if root in outputs[index])
        segments.append(Segment(index=index, forward_ops=names, backward_ops=tuple(backward_lists[index]),
                                crossing_in=tuple(crossing[index]), output_roots=ordered_outputs,
                                activation_bytes=size))
    return tuple(segments)


def _assign_backward(graph: Graph, op_segment: dict[str, int], count: int) -> dict[str, int]:
    """Backward op -> segment, by the latest-segment rule (module docstring). O(ops + edges)."""
    forward_users: dict[str, set[int]] = {}
    for op in graph.forward_ops:
        for name in op.inputs:
            forward_users.setdefault(name, set()).add(op_segment[op.name])
        for name in op.outputs:
            forward_users.setdefault(name, set()).add(op_segment[op.name])
    tangents = {name for name in graph.placeholders if graph.value(name).kind is ValueKind.TANGENT}
    backward = graph.backward_ops
    producer = {name: op.name for op in backward for name in op.outputs}
    assigned: dict[str, int] = {}
    for op in backward:
        upstream = [assigned[producer[name]] for name in op.inputs if name in producer and producer[name] in assigned]
        bound = min(upstream) if upstream else count - 1
        used = {segment for name in op.inputs if name not in producer and name not in tangents
                for segment in forward_users.get(name, ()) if segment <= bound}
        if used:
            assigned[op.name] = max(used)
        elif upstream:
            assigned[op.name] = bound
    consumers: dict[str, list[str]] = {}
    for op in backward:
        for name in op.inputs:
            if name in producer:
                consumers.setdefault(producer[name], []).append(op.name)
    for op in reversed(backward):
        if op.name not in assigned:
            downstream = [assigned[name] for name in consumers.get(op.name, ()) if name in assigned]
            assigned[op.name] = max(downstream) if downstream else count - 1
    return assigned
