"""A lower bound on the recomputation any plan needs to fit a budget: how far a plan is from
the best one possible, and a proof where a time target is out of reach.

At the moment backward op b runs, a plan holds at least: the resident values (parameters,
buffers, inputs, the outputs the caller holds), the tangents and ``caller_bytes``, b's
operands, results and workspace, the backward values produced before b and read after it
(and the gradients produced so far), and a set S of forward values. Every forward value
that a backward op after b reads is in S or is recomputed after b from S and the resident
values, so each forward op of that recomputation's closure runs at least once more. Hence

    recomputation time >= min over S with bytes(S) <= budget - held(b) of
                          the least time of forward ops whose re-runs regenerate,
                          from S, every forward value read after b,

a covering knapsack, solved as a small MILP for each of the ``moments`` backward ops with
the most bytes to shed (held(b) plus the forward values read after b, less the budget);
the bound is the largest. Any subset of moments gives a valid bound, so the selection
only decides how tight it is. Like Checkmate's MILP (Jain et al., MLSys 2020) it assumes
the backward ops run in the graph's order, as every memsched solver runs them, and no
offloading (an offloaded value is held by neither side of the knapsack); forward re-runs
(Rotor's, Beaumont et al. 2019, and the DPs' here) are recomputation like any other, so the
bound holds for them.

``fused`` bounds a plan compiled by inductor, where a pointwise value read once is fused
into its reader and never allocated: only moments at ops inductor calls as external
kernels (`EXTERNAL_KERNELS`: matmuls, convolutions, attention, whose operands and results
are real buffers) count, and of the backward values held across b only those such a
kernel produced, and the gradients. The bound is then lower, and valid for the compiled
step too, in-place writes included (``Op.reuses``: the output of a kernel inductor
generates shares a storage that dies at it; no moment or storage the fused bound counts
is such an output). Without ``fused``, the bound is for the eager program.

Cost: O(ops + values) per moment to build, then one MILP of at most F + V binaries and
O(E) covering rows (F forward ops, V forward storages, E forward edges), which HiGHS
solves in well under a second on GPT-sized graphs; a moment whose MILP stops at
``time_limit_s`` contributes HiGHS' dual bound, still a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from solvers.errors import SolverUnavailableError
from solvers.graph import Graph, Op, Phase, ValueKind
from solvers.kernel.milp import milp_dual_bound, milp_solver

# op targets inductor calls as external kernels (their operands and results are buffers)
EXTERNAL_KERNELS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "aten.convolution",
                    "aten._scaled_dot_product", "aten._flash_attention", "aten._efficient_attention",
                    "aten.cudnn_")


@dataclass(frozen=True)
class RecomputeBound:
    """No plan of the space (module docstring) re-runs less than ``time_ms`` of forward ops
    under ``budget_bytes``; ``at_op`` is the backward op whose moment gives it."""

    time_ms: float
    budget_bytes: int
    at_op: str | None
    moments: int          # backward ops whose MILP was solved
    fused: bool

    def to_json(self) -> dict[str, object]:
        return {"time_ms": self.time_ms, "budget_bytes": self.budget_bytes, "at_op": self.at_op,
                "moments": self.moments, "fused": self.fused}


def is_external_kernel(op: Op) -> bool:
    return op.target.startswith(EXTERNAL_KERNELS)


def recompute_time_lower_bound(graph: Graph, budget_bytes: int, *, moments: int = 8, fused: bool = False,
                               time_limit_s: float = 10.0) -> RecomputeBound:
    """The largest of the per-moment bounds (module docstring) over the ``moments``
    backward ops with the most bytes to shed; ``time_ms`` is ``math.inf`` where even
    holding no forward value exceeds the budget at some moment.

    Raises:
        SolverUnavailableError: no MILP backend (HiGHS through highspy, or CBC).
    """
    value = graph.value_by_name
    ops = graph.op_by_name
    backward = [op for op in graph.ops if op.phase is Phase.BACKWARD]
    forward = [op for op in graph.ops if op.phase is Phase.FORWARD]

    def root(name: str) -> str:
        return value[name].root

    def produced_in(name: str) -> Phase | None:
        producer = value[name].producer
        return None if producer is None else ops[producer].phase

    resident_kinds = (ValueKind.PARAMETER, ValueKind.BUFFER, ValueKind.INPUT, ValueKind.TANGENT)
    always = {root(n) for n in graph.placeholders if value[n].kind in resident_kinds}
    always |= {root(n) for n in graph.forward_outputs if n not in graph.released_outputs}
    always_bytes = sum(value[r].size_bytes for r in always) + graph.caller_bytes
    # forward storages a plan may hold or drop (held outputs are counted in ``always``)
    forward_roots = {v.root for v in graph.values if produced_in(v.root) is Phase.FORWARD} - always
    gradient_roots = {root(n) for n in graph.gradients}

    last_read: dict[str, int] = {}
    for index, op in enumerate(backward):
        for name in op.inputs:
            last_read[root(name)] = index
    first_made: dict[str, int] = {}
    for index, op in enumerate(backward):
        for name in op.outputs:
            if produced_in(root(name)) is Phase.BACKWARD:
                first_made.setdefault(root(name), index)

    def held_across(index: int) -> set[str]:
        """Backward storages made before backward op ``index`` and alive through it."""
        held = set()
        for r, made in first_made.items():
            if made < index and (r in gradient_roots or last_read.get(r, -1) > index):
                if not fused or r in gradient_roots or is_external_kernel(ops[value[r].producer]):
                    held.add(r)
        return held

    candidates = []
    for index, op in enumerate(backward):
        if fused and not is_external_kernel(op):
            continue
        fixed = ({root(n) for n in op.inputs + op.outputs} | held_across(index)) - always
        read_after = {r for r in forward_roots if last_read.get(r, -1) > index} - fixed
        fixed_bytes = always_bytes + op.tmp_bytes + sum(value[r].size_bytes for r in fixed)
        shed_bytes = fixed_bytes + sum(value[r].size_bytes for r in read_after) - budget_bytes
        if shed_bytes > 0:
            candidates.append((shed_bytes, index, fixed, read_after, fixed_bytes))
    candidates.sort(key=lambda c: -c[0])
    best_ms, at_op, count = 0.0, None, 0
    for count, (_, index, fixed, read_after, fixed_bytes) in enumerate(candidates[:moments], start=1):
        time_ms = math.inf if fixed_bytes > budget_bytes else _least_recomputation_ms(
            graph, forward, forward_roots, fixed, read_after, budget_bytes - fixed_bytes, time_limit_s)
        if time_ms > best_ms:
            best_ms, at_op = time_ms, backward[index].name
        if time_ms == math.inf:
            break
    return RecomputeBound(best_ms, budget_bytes, at_op, count, fused)


def _least_recomputation_ms(graph: Graph, forward: list[Op], forward_roots: set[str], fixed: set[str],
                            read_after: set[str], room_bytes: int, time_limit_s: float) -> float:
    """The covering knapsack of one moment: keep[r] (forward storage r is held) and run[k]
    (forward op k re-runs after the moment), minimising the re-run time."""
    import pulp

    value = graph.value_by_name
    problem = pulp.LpProblem("recompute_bound", pulp.LpMinimize)
    free = sorted(forward_roots - fixed)
    keep = {r: problem.add_variable(f"keep_{i}", cat="Binary") for i, r in enumerate(free)}
    run = {op.name: problem.add_variable(f"run_{i}", cat="Binary") for i, op in enumerate(forward)}
    problem += pulp.lpSum(run[op.name] * op.time_ms for op in forward)

    def available(r: str) -> pulp.LpAffineExpression:
        return keep[r] + run[value[r].producer]

    for r in read_after:
        problem += available(r) >= 1
    for op in forward:
        if not op.recomputable:
            problem += run[op.name] == 0
            continue
        for r in {value[n].root for n in op.inputs}:
            if r in keep and value[r].producer != op.name:
                problem += available(r) >= run[op.name]
    problem += pulp.lpSum(keep[r] * value[r].size_bytes for r in free) <= room_bytes
    try:
        problem.solve(milp_solver("auto", time_limit_s, 0.0, who="recompute bound"))
    except pulp.PulpSolverError as error:
        raise SolverUnavailableError(f"recompute bound: the MILP backend failed: {error}") from None
    if problem.sol_status == pulp.LpSolutionInfeasible:
        return math.inf
    if problem.sol_status == pulp.LpSolutionOptimal:
        return pulp.value(problem.objective) or 0.0
    return milp_dual_bound(problem) or 0.0
