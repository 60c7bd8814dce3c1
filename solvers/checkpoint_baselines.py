"""Fixed checkpointing policies over the segment chain of `kernel.segments`: the
baselines every memory planner is compared with. Both ignore the budget when choosing
(they are policies, not optimizers) and raise `InfeasibleBudgetError` when their
simulated peak does not fit it.

``every_block``: what wrapping every block in ``torch.utils.checkpoint`` does. A
checkpointed block keeps only its inputs (here: the storages crossing into a segment,
skip tensors included, ``Segment.crossing_in``) and recomputes its forward during its
backward. Differences from torch's implementation, all in its favour or neutral: the
recomputation runs just in time for each backward op instead of the whole block at
once (`kernel.program.build_program`), values the backward never reads are not kept, storages
that cannot be recomputed (buffer updates) are kept, and the graph's forward outputs
stay (the caller holds them anyway).

``sqrt_n``: Chen et al., "Training Deep Nets with Sublinear Memory Cost" (2016), Sec. 4.1:
for a chain of L segments, keep only the storages alive across every g-th cut,
g = round(sqrt(L)), and recompute everything else (the segment boundaries inside a group
included) during the backward.
"""

from __future__ import annotations

import math

from solvers.errors import InfeasibleBudgetError
from solvers.graph import Graph
from solvers.kernel.program import plan_from_decisions
from solvers.kernel.recompute import checkpoint_decisions, every_block_decisions
from solvers.kernel.segments import Segment, boundary_roots, segment_chain
from solvers.plan import Decision, Plan
from solvers.simulate import simulate


def sqrt_n_group_size(num_segments: int) -> int:
    """Segments per recomputation group: round(sqrt(L)), at least 1."""
    return max(1, round(math.sqrt(num_segments)))


def solve_every_block(graph: Graph, budget_bytes: int) -> Plan:
    """Checkpoint every segment (``torch.utils.checkpoint`` on every block): keep only
    the storages crossing into each segment, recompute the rest in the backward.
    O(ops + edges) plus one simulation."""
    segments = segment_chain(graph)
    return _fixed_policy_plan(graph, budget_bytes, every_block_decisions(graph, segments), "every_block", segments)


def solve_sqrt_n(graph: Graph, budget_bytes: int) -> Plan:
    """Chen et al. 2016: keep the storages alive across every round(sqrt(L))-th segment
    cut, recompute the rest. O(L * (ops + edges)) plus one simulation."""
    segments = segment_chain(graph)
    group = sqrt_n_group_size(len(segments))
    keep = {root for index in range(group, len(segments), group) for root in boundary_roots(graph, segments, index)}
    return _fixed_policy_plan(graph, budget_bytes, checkpoint_decisions(graph, keep), "sqrt_n", segments)


def _fixed_policy_plan(graph: Graph, budget_bytes: int, decisions: dict[str, Decision], solver: str,
                       segments: tuple[Segment, ...]) -> Plan:
    plan = plan_from_decisions(graph, decisions, solver, budget_bytes)
    peak = simulate(graph, plan, check_hash=False).peak_bytes
    if peak > budget_bytes:
        raise InfeasibleBudgetError(budget_bytes, peak, {f"{solver} peak over {len(segments)} segments": peak},
                                    solver=solver)
    return plan
