"""Checkmate-style MILP (Jain et al., MLSys 2020) over the exact solvers' plan space.

The space is `kernel.space`'s (see its docstring), the one `solvers.brute_force`
enumerates: the forward runs once and keeps or drops each saved storage; backward stage t
runs forward recomputations in graph order, each at most once per stage, then backward op t.
Checkmate's stages are all ops and its forward is part of the MILP; here the stages are
the backward ops and the forward is fixed but for its keep set, so the model is the
"frontier-advancing" Checkmate restricted to the backward.

Variables (paper symbols, inside the model builder only):

    R[t,k]     binary   forward op k is recomputed in backward stage t
    S[t,v]     binary   forward value v is live entering stage t (S[0,v]: kept by the forward)
    res[t,r]   in [0,1] storage root r is live entering stage t (>= S of each value on it)
    FREE[t,r,k] in [0,1] storage r is released right after op k of stage t
    U[t,k]     >= 0     bytes of the variable storages while op k of stage t runs

Memory is counted as `simulate` counts it: by storage root (a storage is alive while any
value on it is), with the storages alive whatever the plan does (resident and pinned
values, tangents, live backward values, ``caller_bytes``) folded into a per-stage
constant, and an op's workspace while it runs. A storage is allocated by the op that owns
it (or is live from the stage's start), and freed after the last op of the stage that
touches it (reads a value on it or produces it) unless the backward op of the stage reads
it or a value on it is carried into the next stage: Checkmate's FREE with its hazards,
linearised with one inequality per hazard (FREE only needs upper bounds, since a storage
not freed is only counted longer).

Offload (when ``graph.transfer.real``, or ``offload=True``; the space and its fixed
schedule are `solvers.kernel.space.OffloadSpace`'s): per candidate storage r

    O[r]       binary   r is copied to the host after its producer and back at the start
                        of backward stage p(r)
    D[r], H[r] >= 0     when the copy of r to the host / back ends, queued on its channel

The forward keeps none of r's values (S[0,v] + O[r] <= 1), no op reading or allocating r
is recomputed before stage f(r) (R[t,k] + O[r] <= 1), and the prefetch makes r live at
p(r) (S[p,r] >= O[r], and O[r] joins (1c)'s right-hand side there). Each channel is one
queue in fixed order, Checkmate's memory recurrence's twin for time:
D[r] >= D[prev], D[r] >= D[prev] + d(r) O[r], D[r] >= (e(r) + d(r)) O[r] (e(r): the end
of r's producer), and the deadline D[r] <= deadline(r) + M (1 - O[r]); the least D
satisfying the lower bounds is the queue's real finishing time, so the deadlines hold
exactly when the copies never make compute wait. Time is then forward + backward +
recomputation in every plan of the space (no stall), the objective needs no new term,
and `simulate` reports what the objective predicted. Memory: r adds its size to the
forward ops between its last use and ``free_after(r)`` (the copy is still running), and
counts from the start of stage p(r) like any live value. Offload adds C binaries, 2 C
continuous variables and O(C (B + F + aliases)) constraints for C candidates; storages
smaller than 1/64 of the largest droppable one, and those whose copies cannot hide behind
compute even alone, are no candidates. With no candidates (nominal transfer) the model is
the keep/recompute one exactly.

Pruning: S[t,v] exists only for values some backward op >= t may need (directly, or as
an input of a recomputation of such a value), R[t,k] only for recomputable ops with such
an output whose inputs can be live at stage t, FREE[t,r,k] only for the ops touching r.
Model size: with B backward ops, F forward ops, V forward values and E forward edges,
at most B*F binaries R, B*V binaries S, B*(E + F) continuous FREE and U, and
O(B*(E + F + V) + F*V) constraints (the pairwise hazard inequalities add, per stage and
storage, the square of the number of ops touching it, a small constant in practice);
nonzeros grow the same way. Exact for the space: every plan of it is a solution with the
same time and memory, and every solution is a plan whose simulated peak is at most the
model's.

Start: the MILP alone finds no incumbent for minutes on graphs of hundreds of ops, so
`solve_milp` takes a start, a plan of the space converted from a heuristic's plan
(`kernel.space.start_runs`: it keeps what the heuristic keeps, among the storages the space
can drop, and recomputes the rest just in time before each backward op, in graph order;
forward re-runs and offloads become recomputations). Which heuristics, and which of their
plans wins, is the portfolio's choice (`solvers.portfolio.best_start`). HiGHS starts from
the start's values of R and S; whatever the backend, it is the fallback when the MILP ends
without an incumbent or with a slower one.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from solvers.errors import InfeasibleBudgetError, SolverUnavailableError
from solvers.graph import Graph
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.kernel.milp import milp_dual_bound, milp_solver
from solvers.kernel.space import (OffloadSpace, PlanSpace, SpaceStart, assemble_plan, forward_high_water,
                                  offload_space, plan_space)
from solvers.plan import Plan, StepKind
from solvers.simulate import simulate

log = logging.getLogger(__name__)


class _Model:
    """The MILP for one graph and budget, with the variables needed to read a plan back."""

    def __init__(self, graph: Graph, budget_bytes: int, space: PlanSpace,
                 offloads: OffloadSpace | None = None) -> None:
        import pulp

        self.pulp = pulp
        self.graph, self.space, self.budget_bytes = graph, space, budget_bytes
        self.offloads = offloads
        self.problem = pulp.LpProblem("memsched_checkmate", pulp.LpMinimize)
        self.recompute: list[dict[str, Any]] = []       # stage -> op -> R var
        self.resident: list[dict[str, Any]] = []        # stage -> value -> S var or 1
        self.offload: dict[str, Any] = {}               # storage root -> O var
        self._constraints = 0
        self._build()

    # -- helpers ------------------------------------------------------------------------
    def _add(self, constraint: Any) -> None:
        self.problem += constraint, f"c{self._constraints}"
        self._constraints += 1

    def _producer_index(self, value: str) -> int:
        return self.space.forward_index[self.graph.value(value).producer]

    def _available(self, stage: int, value: str) -> list[Any]:
        """Terms whose sum is 1 when ``value`` is live for a reader in ``stage``."""
        terms = []
        if value in self.resident[stage]:
            terms.append(self.resident[stage][value])
        producer = self.graph.value(value).producer
        if producer in self.recompute[stage]:
            terms.append(self.recompute[stage][producer])
        return terms

    # -- the model ------------------------------------------------------------------------
    def _build(self) -> None:
        pulp, graph, space = self.pulp, self.graph, self.space
        forward_ops, backward_ops = graph.forward_ops, graph.backward_ops
        objective = []
        saved = set(graph.saved_candidates)
        candidates = self.offloads.candidates if self.offloads is not None else ()
        for candidate in candidates:
            self.offload[candidate.root] = self.problem.add_variable(f"O_{len(self.offload)}", cat="Binary")
        arriving = {stage: {c.root for c in candidates if c.prefetch_stage == stage}
                    for stage in range(len(backward_ops))}
        for stage, backward_op in enumerate(backward_ops):
            # S[t, v]: stage 0 = the forward's keep set; later stages what was live or recomputed before,
            # or prefetched at the start of the stage
            resident: dict[str, Any] = {}
            for name in sorted(space.useful[stage], key=self._producer_index):
                if stage == 0:
                    if name not in saved and name not in arriving[0]:
                        continue
                    resident[name] = (1 if name in space.kept_always
                                      else self.problem.add_variable(f"S_0_{len(resident)}", cat="Binary"))
                elif (name in self.resident[stage - 1] or graph.value(name).producer in self.recompute[stage - 1]
                      or name in arriving[stage]):
                    resident[name] = self.problem.add_variable(f"S_{stage}_{len(resident)}", cat="Binary")
            self.resident.append(resident)
            for root in arriving[stage]:                 # the prefetch makes r live at p(r)
                self._add(resident[root] >= self.offload[root])
                if stage == 0 and root not in saved:
                    self._add(resident[root] <= self.offload[root])
            # R[t, k]: recomputable ops with an output some backward op >= t may need
            recompute: dict[str, Any] = {}
            self.recompute.append(recompute)
            for op in forward_ops:
                if op.name not in space.recomputable or not any(n in space.useful[stage] for n in op.outputs):
                    continue
                inputs = [n for n in dict.fromkeys(op.inputs) if n in space.activations]
                if all(self._available(stage, n) for n in inputs):
                    var = self.problem.add_variable(f"R_{stage}_{space.forward_index[op.name]}", cat="Binary")
                    recompute[op.name] = var
                    objective.append(op.time_ms * var)
                    for name in inputs:          # (1d) a recomputation's inputs are live
                        self._add(var <= pulp.lpSum(self._available(stage, name)))
            for name in dict.fromkeys(backward_op.inputs):   # (1b) backward op t runs: its inputs are live
                if name in space.activations:
                    self._add(pulp.lpSum(self._available(stage, name)) >= 1)
            for op_name, var in recompute.items():   # no recomputation onto a live view of its old storage
                for root in space.own_roots[op_name]:
                    for name in space.aliases.get(root, ()):
                        if isinstance(resident.get(name), pulp.LpVariable):
                            self._add(var + resident[name] <= 1)
                        elif resident.get(name) == 1:
                            self._add(var <= 0)
            if stage > 0:                            # (1c) live entering t only if live or recomputed in t-1
                for name, var in resident.items():
                    prefetched = [self.offload[name]] if name in arriving[stage] else []
                    self._add(var <= pulp.lpSum(self._available(stage - 1, name) + prefetched))
            for candidate in candidates:             # r's storage is neither read nor remade before f(r)
                if stage < candidate.first_stage:
                    for op_name, var in recompute.items():
                        if op_name in candidate.touching_ops:
                            self._add(var + self.offload[candidate.root] <= 1)
        for candidate in candidates:                 # an offloaded storage is not kept
            for name in space.aliases.get(candidate.root, ()):
                var = self.resident[0].get(name) if self.resident else None
                if var is not None and not (name == candidate.root and candidate.prefetch_stage == 0):
                    self._add(var + self.offload[candidate.root] <= 1)
        for stage in range(len(backward_ops)):
            self._stage_memory(stage)
        self._forward_memory()
        self._transfer_queues()
        self.problem += pulp.lpSum(objective) if objective else pulp.LpAffineExpression(0)

    def _stage_memory(self, stage: int) -> None:
        """(2) running memory through stage t, Checkmate's U recurrence with FREE."""
        pulp, graph, space = self.pulp, self.graph, self.space
        backward_op = graph.backward_ops[stage]
        resident, recompute = self.resident[stage], self.recompute[stage]
        carried = self.resident[stage + 1] if stage + 1 < len(self.resident) else {}
        fixed = space.fixed_roots[stage]
        room = self.budget_bytes - space.fixed_bytes(stage)

        def variable(root: str) -> bool:
            return root not in fixed and space.size(root) > 0

        roots_resident: dict[str, list[Any]] = {}
        for name, var in resident.items():
            if variable(space.root(name)):
                roots_resident.setdefault(space.root(name), []).append(var)
        start_terms = []
        for root, vars_ in roots_resident.items():
            if len(vars_) == 1:
                start_terms.append(space.size(root) * vars_[0])
            else:
                res = self.problem.add_variable(f"res_{stage}_{len(start_terms)}", 0, 1)
                for var in vars_:
                    self._add(res >= var)
                start_terms.append(space.size(root) * res)
        start = pulp.lpSum(start_terms)
        if stage == 0:                               # the backward's first moment: all kept storages
            self._add(start <= room)

        read_by_backward = {space.root(n) for n in backward_op.inputs if n in space.activations}
        touchers: dict[str, list[str]] = {}
        for op_name in recompute:
            op = graph.op(op_name)
            roots = {space.root(n) for n in op.inputs if n in space.activations} | set(space.own_roots[op_name])
            for root in roots:
                if variable(root):
                    touchers.setdefault(root, []).append(op_name)
        frees_after: dict[str, list[tuple[int, Any]]] = {op_name: [] for op_name in recompute}
        for root, ops in touchers.items():
            if root in read_by_backward:
                continue                              # live until backward op t has run
            carries = [carried[n] for n in space.aliases.get(root, ()) if n in carried]
            for position, op_name in enumerate(ops):
                free = self.problem.add_variable(
                    f"F_{stage}_{space.forward_index[op_name]}_{len(frees_after[op_name])}", 0, 1)
                frees_after[op_name].append((space.size(root), free))
                self._add(free <= recompute[op_name])           # (3) hazards: k itself did not run,
                for later in ops[position + 1:]:                # a later toucher runs in stage t,
                    self._add(free + recompute[later] <= 1)
                for var in carries:                             # or a value on r is carried to t+1
                    self._add(free + var <= 1)

        previous = start
        for op_name, var in recompute.items():
            op = graph.op(op_name)
            new_bytes = sum(space.size(root) for root in space.own_roots[op_name] if variable(root))
            memory = self.problem.add_variable(f"U_{stage}_{space.forward_index[op_name]}", 0)
            self._add(memory == previous + new_bytes * var)
            self._add(memory + op.tmp_bytes * var <= room)
            previous = memory - pulp.lpSum(size * free for size, free in frees_after[op_name])
        input_roots = {graph.value(n).root for n in backward_op.inputs}
        new_roots = {graph.value(n).root for n in backward_op.outputs} - fixed - input_roots
        backward_bytes = sum(graph.value(root).size_bytes for root in new_roots) + backward_op.tmp_bytes
        self._add(previous <= room - backward_bytes)

    def _forward_memory(self) -> None:
        """The forward runs every op once; a kept storage stays from its last forward use
        to the end of the forward, an offloaded one to ``free_after(r)``, on top of the plan
        that keeps only what it must."""
        pulp, graph, space = self.pulp, self.graph, self.space
        steps, high_water = forward_high_water(graph, space.kept_always)
        op_high_water = [hw for step, hw in zip(steps, high_water) if step.kind is StepKind.RUN]
        candidates = self.offloads.candidates if self.offloads is not None else ()
        prefetched_first = {c.root for c in candidates if c.prefetch_stage == 0}
        keep_terms: dict[str, list[Any]] = {}
        for name, var in self.resident[0].items() if self.resident else ():
            if name not in space.kept_always:
                if name in prefetched_first:         # live entering stage 0: kept or prefetched
                    var = var - self.offload[name]
                keep_terms.setdefault(space.root(name), []).append(var)
        last_touch: dict[str, int] = {}
        for index, op in enumerate(graph.forward_ops):
            for name in op.inputs + op.outputs:
                if graph.value(name).root in keep_terms or graph.value(name).root in self.offload:
                    last_touch[graph.value(name).root] = index
        kept_roots: dict[str, Any] = {}
        for root, vars_ in keep_terms.items():
            if len(vars_) == 1:
                kept_roots[root] = vars_[0]
            else:
                kept_roots[root] = self.problem.add_variable(f"keep_{len(kept_roots)}", 0, 1)
                for var in vars_:
                    self._add(kept_roots[root] >= var)
        for index, high in enumerate(op_high_water):
            extra = [(space.size(root), var) for root, var in kept_roots.items() if last_touch[root] < index]
            extra += [(c.size_bytes, self.offload[c.root]) for c in candidates
                      if last_touch[c.root] < index <= c.free_after]
            if high + sum(size for size, _ in extra) > self.budget_bytes:
                self._add(pulp.lpSum(size * var for size, var in extra) <= self.budget_bytes - high)

    def _transfer_queues(self) -> None:
        """Both copy channels as queues whose copies must end by their deadlines (module
        docstring): exact for the fixed clocks of `OffloadSpace`."""
        if not self.offload:
            return
        offloads, transfer = self.offloads, self.graph.transfer
        # big-M per copy: how late it ends when every candidate is offloaded (the queues'
        # finishing times only grow with the offloaded set), less its deadline
        latest_host, latest_device, cursor = {}, {}, 0.0
        for c in offloads.candidates:
            cursor = max(offloads.forward_end_ms[c.producer_index], cursor) + transfer.latency_ms \
                + c.size_bytes / transfer.device_to_host_bytes_per_ms
            latest_host[c.root] = cursor
        cursor = 0.0
        for c in offloads.prefetch_order():
            cursor = max(offloads.stage_start_ms[c.prefetch_stage], cursor, latest_host[c.root]) \
                + transfer.latency_ms + c.size_bytes / transfer.host_to_device_bytes_per_ms
            latest_device[c.root] = cursor
        host_ready: dict[str, Any] = {}
        previous = None
        for c in offloads.candidates:                # device -> host, in producer order
            chosen = self.offload[c.root]
            copy_ms = transfer.latency_ms + c.size_bytes / transfer.device_to_host_bytes_per_ms
            done = self.problem.add_variable(f"D_{len(host_ready)}", 0)
            self._add(done >= (offloads.forward_end_ms[c.producer_index] + copy_ms) * chosen)
            if previous is not None:
                self._add(done >= previous)
                self._add(done >= previous + copy_ms * chosen)
            deadline = offloads.forward_end_ms[c.free_after]
            self._add(done <= deadline + max(0.0, latest_host[c.root] - deadline) * (1 - chosen))
            host_ready[c.root] = previous = done
        previous = None
        for index, c in enumerate(offloads.prefetch_order()):   # host -> device, in prefetch order
            chosen = self.offload[c.root]
            copy_ms = transfer.latency_ms + c.size_bytes / transfer.host_to_device_bytes_per_ms
            done = self.problem.add_variable(f"H_{index}", 0)
            self._add(done >= (offloads.stage_start_ms[c.prefetch_stage] + copy_ms) * chosen)
            self._add(done >= host_ready[c.root] + copy_ms * chosen - latest_host[c.root] * (1 - chosen))
            if previous is not None:
                self._add(done >= previous)
                self._add(done >= previous + copy_ms * chosen)
            deadline = offloads.stage_start_ms[c.first_stage]
            self._add(done <= deadline + max(0.0, latest_device[c.root] - deadline) * (1 - chosen))
            previous = done

    # -- reading the solution ---------------------------------------------------------------
    def size(self) -> dict[str, int]:
        variables = self.problem.variables()
        return {"variables": len(variables), "binaries": sum(1 for v in variables if v.cat == "Integer"),
                "constraints": self._constraints}

    def start_values(self, keep: frozenset[str], runs: list[str]) -> dict[Any, float]:
        """Values of the binaries R and S for the plan (keep, runs); S from the liveness
        of `insert_frees` (a value is live entering stage t if a later run reads it before
        its producer runs again)."""
        graph = self.graph
        values: dict[Any, float] = {}
        stages: list[list[str]] = [[]]
        for name in runs:
            stages[-1].append(name)
            if graph.op(name).phase.value == "backward":
                stages.append([])
        needed: set[str] = set()
        live_at_start: list[set[str]] = [set() for _ in graph.backward_ops]
        for stage in range(len(graph.backward_ops) - 1, -1, -1):
            for name in reversed(stages[stage]):
                op = graph.op(name)
                needed.difference_update(op.outputs)
                needed.update(op.inputs)
            live_at_start[stage] = set(needed)
        for var in self.offload.values():
            values[var] = 0.0
        for stage, recompute in enumerate(self.recompute):
            ran = set(stages[stage])
            for op_name, var in recompute.items():
                values[var] = 1.0 if op_name in ran else 0.0
            for name, var in self.resident[stage].items():
                if not isinstance(var, int):
                    on = name in keep if stage == 0 else name in live_at_start[stage]
                    values[var] = 1.0 if on else 0.0
        return values

    def solution(self) -> tuple[frozenset[str], list[str], frozenset[str]]:
        """(keep set, backward runs, offloaded storages) of the solved model."""
        def chosen(var: Any) -> bool:
            if isinstance(var, int):
                return var == 1
            return var.varValue is not None and var.varValue > 0.5

        offloaded = frozenset(root for root, var in self.offload.items() if chosen(var))
        keep = frozenset(name for name, var in (self.resident[0].items() if self.resident else ())
                         if chosen(var) and name not in offloaded)
        runs: list[str] = []
        for stage, backward_op in enumerate(self.graph.backward_ops):
            runs.extend(op_name for op_name, var in self.recompute[stage].items() if chosen(var))
            runs.append(backward_op.name)
        return keep, runs, offloaded


def _dual_bound_gap(problem: Any, objective: float) -> float | None:
    """HiGHS' relative gap |objective - dual bound| / |objective| (0 when they are equal)
    for a solution of MILP objective ``objective``; None without a finite dual bound
    (CBC, or HiGHS stopped before bounding)."""
    dual = milp_dual_bound(problem)
    if dual is None:
        return None
    if abs(objective - dual) <= 1e-9 * max(1.0, abs(objective)):
        return 0.0
    return abs(objective - dual) / abs(objective) if objective != 0 else None


def _stale_solution(highs: Any) -> bool:
    """Whether HiGHS' column values disagree with the objective it reports. With a start
    handed to ``setSolution`` (HiGHS 1.16 through highspy), a model that presolve solves
    can come back with the start's values and the optimum's objective."""
    solution = highs.getSolution()
    if not solution.value_valid:
        return False
    costs = highs.getLp().col_cost_
    value = sum(cost * column for cost, column in zip(costs, solution.col_value))
    reported = highs.getInfo().objective_function_value
    return abs(value - reported) > 1e-6 * max(1.0, abs(reported))


def _backend(name: str, time_limit_s: float, rel_gap: float, start: dict[Any, float] | None = None) -> Any:
    """`milp_solver`'s backend, handing HiGHS ``start`` (variable -> value) before it runs."""
    import pulp

    solver = milp_solver(name, time_limit_s, rel_gap, who="ilp")
    if not start or not isinstance(solver, pulp.HiGHS):
        return solver
    run_highs = solver.callSolver

    def call_with_start(problem: Any) -> None:
        """Hand HiGHS the start's binaries; it completes the continuous ones. A
        variable in no constraint and not in the objective (a recomputation of a 0 ms
        op nothing needs) is not in the model pulp builds and has no index: skipped."""
        import numpy as np

        known = [(var.index, value) for var, value in start.items() if getattr(var, "index", None) is not None]
        indices = np.array([index for index, _ in known], dtype=np.int32)
        highs = problem.solverModel
        highs.setSolution(len(indices), indices, np.array([v for _, v in known], dtype=float))
        run_highs(problem)
        if _stale_solution(highs):
            log.warning("ilp: HiGHS returned the start's values with another objective; solving again "
                        "without the start")
            highs.clearSolver()
            run_highs(problem)

    solver.callSolver = call_with_start
    return solver


def solve_milp(graph: Graph, budget_bytes: int, *, time_limit_s: float = 60.0, backend: str = "auto",
               rel_gap: float = 0.0, offload: bool | None = None,
               start_from: Callable[[PlanSpace], SpaceStart | None] | None = None) -> Plan:
    """Least-time keep/recompute/offload plan of the exact solvers' space under ``budget_bytes``.

    MILP after Checkmate (Jain et al., MLSys 2020), see the module docstring; pulp with
    HiGHS (``backend="highs"``), CBC as fallback (``"cbc"``). ``offload`` (default:
    ``graph.transfer.real``) adds the offload choices; without them the model is the
    keep/recompute one. When ``time_limit_s`` (the MILP's alone) runs out the best
    incumbent is returned with ``optimal=False`` and its proved relative ``gap`` (HiGHS'
    ``mip_gap``; None from CBC).

    ``start_from(space)``, when given, returns the start (module docstring; the time it
    takes is ``options["start_time_s"]``), which is handed to HiGHS, and returned instead
    of the MILP's incumbent when the MILP ends without one or with a slower one
    (simulated time): then ``gap`` is the start's,
    |objective - dual bound| / |objective| on the recomputation time, None without a
    finite dual bound (CBC, or HiGHS stopped before bounding), and ``optimal``
    holds when that gap is 0 (the dual bound proves the start optimal).
    ``options["warm_start"]`` names the heuristic the start came from (False: none fits,
    or no ``start_from``), ``options["incumbent"]`` what was returned (``"milp"`` or
    ``"start:<heuristic>"``). The plan is replayed by `simulate` before it is returned.
    Optimal over the space (module docstring) when ``optimal``; NP-hard in general,
    seconds for graphs of a few hundred ops.

    Raises:
        InfeasibleBudgetError: the MILP is infeasible (no plan of the space fits).
        SolverUnavailableError: no MILP backend, or neither the MILP within the time limit
            nor a start found a plan.
    """
    import pulp

    budget_bytes = int(budget_bytes)
    started = time.perf_counter()
    space = plan_space(graph)
    offloads = offload_space(graph, space, offload)
    model = _Model(graph, budget_bytes, space, offloads if offloads.candidates else None)
    plans = "keep/recompute/offload" if offloads.candidates else "keep/recompute"
    built = time.perf_counter()
    start = start_from(space) if start_from is not None and graph.backward_ops else None
    started_milp = time.perf_counter()
    hint = model.start_values(start.keep, list(start.runs)) if start is not None else None
    model.problem.solve(_backend(backend, time_limit_s, rel_gap, hint))
    solved = time.perf_counter()
    size = model.size()
    log.info("ilp: %d variables (%d binary), %d constraints; built in %.2f s, start (%s) in %.2f s, "
             "solved in %.2f s", size["variables"], size["binaries"], size["constraints"], built - started,
             start.solver if start is not None else "none", started_milp - built, solved - started_milp)
    status = model.problem.sol_status
    if status == pulp.LpSolutionInfeasible or model.problem.status == pulp.LpStatusInfeasible:
        floor = least_feasible_lower_bound(graph)
        raise InfeasibleBudgetError(budget_bytes, floor.total,
                                    {**floor.breakdown, f"ilp: no {plans} plan fits": budget_bytes},
                                    solver="ilp (least feasible is at least the lower bound)")
    options = {"time_limit_s": time_limit_s, "backend": backend, **size,
               "warm_start": start.solver if start is not None else False,
               **({"offload_candidates": len(offloads.candidates)} if offloads.candidates else {}),
               "build_time_s": round(built - started, 3), "start_time_s": round(started_milp - built, 3),
               "milp_time_s": round(solved - started_milp, 3)}
    plan: Plan | None = None
    if status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        optimal = status == pulp.LpSolutionOptimal
        gap: float | None = 0.0 if optimal else None
        solver_model = getattr(model.problem, "solverModel", None)
        if not optimal and solver_model is not None and hasattr(solver_model, "getInfo"):
            gap = float(solver_model.getInfo().mip_gap)
        keep, runs, offloaded = model.solution()
        plan = assemble_plan(graph, "ilp", budget_bytes, keep, runs, optimal=optimal, gap=gap,
                             options={**options, "incumbent": "milp"}, offloaded=offloaded, offloads=offloads)
        result = simulate(graph, plan)
        # the MILP does not count the generator states saved for replayed random ops
        # (`Graph.rng_state_bytes`): `portfolio.solve` re-aims below the budget by that excess
        rng_allowance_bytes = 64 * graph.rng_state_bytes
        if result.peak_bytes > budget_bytes + rng_allowance_bytes:
            raise AssertionError(f"ilp: simulated peak {result.peak_bytes} > budget {budget_bytes}: "
                                 "the MILP's memory model undercounts (a solver bug)")
        if start is not None and start.time_ms < result.time_ms * (1 - 1e-9):
            log.info("ilp: the MILP's incumbent (%.3f ms) is slower than %s's start (%.3f ms); returning the start",
                     result.time_ms, start.solver, start.time_ms)
            plan = None
    elif start is None:
        why = "warm_start=False" if start_from is None else "no heuristic start fits"
        raise SolverUnavailableError(
            f"ilp: no plan found within time_limit_s={time_limit_s} ({pulp.LpStatus[model.problem.status]}) "
            f"and {why}; raise time_limit_s or use solver='auto'")
    if plan is None:
        log.info("ilp: returning %s's start (%.3f ms)", start.solver, start.time_ms)
        start_gap = _dual_bound_gap(model.problem, start.recompute_ms)
        plan = assemble_plan(graph, "ilp", budget_bytes, start.keep, list(start.runs), optimal=start_gap == 0.0,
                             gap=start_gap, options={**options, "incumbent": f"start:{start.solver}"})
        result = simulate(graph, plan)
        if result.peak_bytes > budget_bytes:
            raise AssertionError(f"ilp: simulated peak {result.peak_bytes} of {start.solver}'s start > budget "
                                 f"{budget_bytes} (a solver bug)")
    return plan
