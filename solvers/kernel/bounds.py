"""The least budget any plan could meet: the floor every solver, and `solve`'s front door, checks against.

`least_feasible_lower_bound` is resident bytes plus the larger of the biggest single-op
working set and what must be alive when the step ends; no keep/recompute/offload plan
(Checkmate's space, Jain et al. 2020, or any other) peaks lower, so a budget below it is
refused before any search runs, and the searches quote it when they fail. O(ops + values).
"""

from __future__ import annotations

from solvers.graph import Graph, Phase, ValueKind


class LowerBound:
    """A budget no plan can beat, and what it is made of."""

    def __init__(self, breakdown: dict[str, int]) -> None:
        self.breakdown = breakdown
        self.total = breakdown["parameters+buffers+inputs"] + max(
            breakdown["largest op working set"], breakdown["outputs+gradients+tangents at the end"])


def least_feasible_lower_bound(graph: Graph) -> LowerBound:
    """Resident bytes plus the larger of the biggest single-op working set (its inputs,
    outputs and workspace, with the tangents during the backward) and what must be alive
    when the step ends. Valid for every solver; O(ops + values)."""
    resident_kinds = (ValueKind.PARAMETER, ValueKind.BUFFER, ValueKind.INPUT)
    resident_roots = {graph.value(n).root for n in graph.placeholders if graph.value(n).kind in resident_kinds}
    tangent_roots = {graph.value(n).root for n in graph.placeholders
                     if graph.value(n).kind is ValueKind.TANGENT} - resident_roots

    def size(roots: set[str]) -> int:
        return sum(graph.value(root).size_bytes for root in roots)

    working = 0
    for op in graph.ops:
        roots = {graph.value(n).root for n in op.inputs + op.outputs} - resident_roots
        caller = 0
        if op.phase is Phase.BACKWARD:
            roots |= tangent_roots
            caller = graph.caller_bytes
        working = max(working, size(roots) + op.tmp_bytes + caller)
    held_outputs = tuple(n for n in graph.forward_outputs if n not in graph.released_outputs)
    end_roots = {graph.value(n).root for n in held_outputs + graph.gradients} | tangent_roots
    return LowerBound({"parameters+buffers+inputs": size(resident_roots),
                       "largest op working set": working,
                       "outputs+gradients+tangents at the end": size(end_roots - resident_roots) + graph.caller_bytes})
