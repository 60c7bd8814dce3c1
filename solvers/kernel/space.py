"""The exact solvers' plan space (`brute_force` searches it, `ilp` formulates it as a MILP), and the way into it.

Its plan space is the restriction of Checkmate's (Jain et al., MLSys 2020) that
`solvers.ilp` formulates as a MILP and `solvers.brute_force` enumerates, so the two are
comparable exactly::

    forward   run every forward op once, in graph order; each storage the backward reads
              is kept to the backward or freed after its last forward use;
    backward  stage t = backward op t (graph order), preceded by recomputations of forward
              ops in graph order, each at most once in the stage (a forward op may be
              recomputed again in later stages, and recomputed values may be carried
              into later stages); any value may be freed at any point.

Two rules keep `simulate`'s storage accounting physical (it counts storages by alias root,
so a recomputed storage would otherwise share the count of a stale view of the old one):

    * a forward op can be recomputed only if ``op.recomputable``, none of the storages it
      allocates is a forward output's (held by the caller, `Graph.pinned_values`) and each
      of its view outputs aliases one of its inputs' storages or a pinned one;
    * it is not recomputed while a value aliasing one of the storages it allocates is live.

Time is forward + backward + recomputations; memory is counted exactly as `simulate`
counts it (storages by root, pinned values, tangents and ``caller_bytes`` in the
backward, an op's workspace while it runs). The program frees each value right after its
last use (`kernel.program.insert_frees`), which for a given sequence of runs is the least
memory.

Offload (only when ``graph.transfer.real``, or ``offload=True``): a dropped storage r may
instead be copied to the host, on the device->host channel, right after its producer runs,
and copied back, on the host->device channel, at the start of a fixed backward stage p(r).
`OffloadSpace` fixes everything but the yes/no choice per storage, so that `simulate`'s
time of every plan of the space is exactly forward + backward + recomputation (no stall):

    * f(r): the first backward stage whose op reads a value on r; no op that reads or
      allocates r's storage is recomputed in a stage before f(r) (so r is not on the
      device between its offload and its prefetch, and not read before it is back);
    * forward: ``free(r)`` comes after op ``free_after(r)`` = the later of r's last forward
      read and the first op by whose end the copy, alone on the channel, is done; copies
      queue on the channel in producer order and each must end by the compute clock at
      its ``free``: the free never waits;
    * backward: p(r) is the latest stage whose start (backward ops only, recomputation
      left out) is at least one copy duration before the start of stage f(r); prefetches
      queue in (p, producer) order and each must end by the start of stage f(r), counting
      backward ops only. Recomputations only move later reads further from their
      prefetch (each prefetch starts at most as late as the recomputations before it
      push it), so a plan whose fixed-time queue meets the deadlines never stalls;
    * storages smaller than ``OFFLOAD_MIN_FRACTION`` of the largest droppable one, and those
      whose copies cannot hide behind compute even alone, are not candidates.

The way in: `start_runs` converts any heuristic's decisions into a plan of the space (the
MILP's warm start). `plan_space` and `offload_space` are O(ops * values) and O(ops +
values); `assemble_plan` and `start_runs` O(B * (F + E)) for B backward ops, F forward
ops and E edges, plus one simulation for `start_runs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from solvers.errors import UnsupportedGraphError
from solvers.graph import Graph, Op, Phase, ValueKind
from solvers.kernel.program import delay_frees, insert_frees, saved_roots
from solvers.plan import Decision, Plan, Step, StepKind, offload, prefetch, run
from solvers.simulate import simulate

OFFLOAD_MIN_FRACTION = 1 / 64   # of the largest droppable storage: smaller ones are never offloaded
_DEADLINE_SLACK_MS = 1e-9       # float noise allowed when a copy ends exactly at its deadline


@dataclass(frozen=True)
class PlanSpace:
    """The plan space of the exact solvers for one graph: what may be recomputed, which
    values can still be useful at each backward stage, which storages are alive
    whatever the plan does. Names only; O(ops * values) to build."""

    graph: Graph
    forward_index: Mapping[str, int]               # forward op -> position in graph order
    recomputable: frozenset[str]                   # forward ops the backward may re-run
    activations: frozenset[str]                    # values produced by forward ops
    own_roots: Mapping[str, frozenset[str]]        # forward op -> storages it allocates
    aliases: Mapping[str, tuple[str, ...]]         # storage root -> forward values on it
    useful: tuple[frozenset[str], ...]             # stage t -> activations a backward op >= t may need
    fixed_roots: tuple[frozenset[str], ...]        # stage t -> storages alive entering t, any plan
    kept_always: frozenset[str]                    # saved values every plan keeps (forced or free)
    droppable_roots: tuple[str, ...]               # saved storages a plan may drop

    def root(self, name: str) -> str:
        return self.graph.value(name).root

    def size(self, root: str) -> int:
        return self.graph.value(root).size_bytes

    def fixed_bytes(self, stage: int) -> int:
        """Bytes alive entering backward stage ``stage`` whatever the plan: resident and
        pinned storages, tangents, live backward values, ``caller_bytes``."""
        return self.graph.caller_bytes + sum(self.size(r) for r in self.fixed_roots[stage])

    def keep_set(self, dropped_roots: frozenset[str] | set[str]) -> frozenset[str]:
        """Saved values kept to the backward when ``dropped_roots`` are dropped."""
        return frozenset(name for name in self.graph.saved_candidates
                         if name in self.kept_always or self.root(name) not in dropped_roots)


def plan_space(graph: Graph) -> PlanSpace:
    forward_ops, backward_ops = graph.forward_ops, graph.backward_ops
    pinned_roots = {graph.value(name).root for name in graph.forward_outputs}
    placeholder_roots = {graph.value(name).root for name in graph.placeholders}
    activations = frozenset(name for op in forward_ops for name in op.outputs)
    own_roots = {op.name: frozenset(name for name in op.outputs if graph.value(name).alias_of is None)
                 for op in forward_ops}

    def can_recompute(op: Op) -> bool:
        if not op.recomputable or own_roots[op.name] & pinned_roots:
            return False
        input_roots = {graph.value(name).root for name in op.inputs}
        return all(graph.value(name).root in input_roots | pinned_roots | placeholder_roots
                   for name in op.outputs if graph.value(name).alias_of is not None)

    recomputable = frozenset(op.name for op in forward_ops if can_recompute(op))
    order = {value.name: i for i, value in enumerate(graph.values)}
    aliases: dict[str, list[str]] = {}
    for name in sorted(activations, key=order.__getitem__):
        aliases.setdefault(graph.value(name).root, []).append(name)

    useful: list[frozenset[str]] = []
    for stage in range(len(backward_ops) + 1):
        need = {name for op in backward_ops[stage:] for name in op.inputs if name in activations}
        stack = list(need)
        while stack:
            producer = graph.value(stack.pop()).producer
            if producer in recomputable:
                for name in graph.op(producer).inputs:
                    if name in activations and name not in need:
                        need.add(name)
                        stack.append(name)
        useful.append(frozenset(need))

    always = {graph.value(name).root for name in graph.placeholders if graph.value(name).kind is not ValueKind.TANGENT}
    always |= {graph.value(name).root for name in graph.placeholders if graph.value(name).kind is ValueKind.TANGENT}
    always |= pinned_roots
    gradients = set(graph.gradients)
    last_read = {name: stage for stage, op in enumerate(backward_ops) for name in op.inputs}
    fixed_roots: list[frozenset[str]] = []
    for stage in range(len(backward_ops)):
        roots = set(always)
        for op in backward_ops[:stage]:
            for name in op.outputs:
                if name in gradients or last_read.get(name, -1) >= stage:
                    roots.add(graph.value(name).root)
        fixed_roots.append(frozenset(roots))

    free_roots = pinned_roots | placeholder_roots
    kept_always = frozenset(
        name for name in graph.saved_candidates
        if graph.value(name).root in free_roots
        or graph.value(graph.value(name).root).producer not in recomputable)
    droppable = tuple(root for root in saved_roots(graph)
                      if not any(name in kept_always for name in aliases.get(root, ())))
    return PlanSpace(graph=graph, forward_index={op.name: i for i, op in enumerate(forward_ops)},
                     recomputable=recomputable, activations=activations, own_roots=own_roots,
                     aliases={root: tuple(names) for root, names in aliases.items()}, useful=tuple(useful),
                     fixed_roots=tuple(fixed_roots), kept_always=kept_always, droppable_roots=droppable)


@dataclass(frozen=True)
class OffloadCandidate:
    """A storage the exact solvers may offload, with its fixed schedule (module docstring)."""

    root: str
    size_bytes: int
    producer_index: int     # forward op after which the copy to the host is issued
    free_after: int         # forward op after which the device copy is freed
    prefetch_stage: int     # p(r): the copy back is issued at the start of this backward stage
    first_stage: int        # f(r): first backward stage whose op reads a value on r
    touching_ops: frozenset[str]   # forward ops that read or allocate r's storage


@dataclass(frozen=True)
class OffloadSpace:
    """The offload choices of the exact solvers for one graph: candidates in the order of
    their copies to the host, and the fixed clocks their deadlines refer to."""

    graph: Graph
    candidates: tuple[OffloadCandidate, ...]
    forward_end_ms: tuple[float, ...]     # compute clock after forward op i, no stall
    stage_start_ms: tuple[float, ...]     # clock entering backward stage t, backward ops only

    @property
    def by_root(self) -> dict[str, OffloadCandidate]:
        return {candidate.root: candidate for candidate in self.candidates}

    def prefetch_order(self) -> tuple[OffloadCandidate, ...]:
        """Order of the copies back: by prefetch stage, then producer order."""
        return tuple(sorted(self.candidates, key=lambda c: c.prefetch_stage))

    def to_host_ms(self, candidate: OffloadCandidate) -> float:
        transfer = self.graph.transfer
        return transfer.latency_ms + candidate.size_bytes / transfer.device_to_host_bytes_per_ms

    def fits(self, roots: frozenset[str] | set[str]) -> bool:
        """Whether offloading ``roots`` (candidates) meets every deadline: both copy queues
        replayed with `simulate`'s arithmetic on the fixed clocks. O(candidates)."""
        transfer = self.graph.transfer
        cursor = 0.0
        host_ready: dict[str, float] = {}
        for candidate in self.candidates:
            if candidate.root not in roots:
                continue
            start = max(self.forward_end_ms[candidate.producer_index], cursor)
            cursor = start + transfer.latency_ms + candidate.size_bytes / transfer.device_to_host_bytes_per_ms
            if cursor > self.forward_end_ms[candidate.free_after] + _DEADLINE_SLACK_MS:
                return False
            host_ready[candidate.root] = cursor
        cursor = 0.0
        for candidate in self.prefetch_order():
            if candidate.root not in roots:
                continue
            start = max(self.stage_start_ms[candidate.prefetch_stage], cursor, host_ready[candidate.root])
            cursor = start + transfer.latency_ms + candidate.size_bytes / transfer.host_to_device_bytes_per_ms
            if cursor > self.stage_start_ms[candidate.first_stage] + _DEADLINE_SLACK_MS:
                return False
        return True


def offload_space(graph: Graph, space: PlanSpace, enabled: bool | None = None,
                  min_fraction: float = OFFLOAD_MIN_FRACTION) -> OffloadSpace:
    """The offload candidates of ``space`` (module docstring); none unless ``enabled`` (default:
    ``graph.transfer.real``). O(ops + values)."""
    forward_end, clock = [], 0.0
    for op in graph.forward_ops:
        clock = clock + op.time_ms
        forward_end.append(clock)
    stage_start = [clock]
    for op in graph.backward_ops:
        clock = clock + op.time_ms
        stage_start.append(clock)
    empty = OffloadSpace(graph, (), tuple(forward_end), tuple(stage_start))
    if not (graph.transfer.real if enabled is None else enabled) or not space.droppable_roots:
        return empty
    transfer = graph.transfer
    smallest = min_fraction * max(space.size(root) for root in space.droppable_roots)
    first_read: dict[str, int] = {}
    for stage, op in enumerate(graph.backward_ops):
        for name in op.inputs:
            if name in space.activations:
                first_read.setdefault(space.root(name), stage)
    last_read = {}
    for index, op in enumerate(graph.forward_ops):
        for name in op.inputs:
            last_read[name] = index
    candidates = []
    for root in space.droppable_roots:
        size = space.size(root)
        first = first_read.get(root, 0)
        if size <= 0 or size < smallest or first == 0:
            continue
        produced = space.forward_index[graph.value(root).producer]
        copied = forward_end[produced] + transfer.latency_ms + size / transfer.device_to_host_bytes_per_ms
        done = next((i for i in range(produced, len(forward_end)) if forward_end[i] >= copied), None)
        back_ms = transfer.latency_ms + size / transfer.host_to_device_bytes_per_ms
        stage = next((p for p in range(first - 1, -1, -1) if stage_start[p] + back_ms <= stage_start[first]), None)
        if done is None or stage is None or root not in space.useful[first]:
            continue
        on_root = set(space.aliases.get(root, ()))
        touching = frozenset(op.name for op in graph.forward_ops
                             if on_root.intersection(op.inputs) or root in space.own_roots[op.name])
        candidates.append(OffloadCandidate(root, size, produced, max(done, last_read.get(root, produced)), stage,
                                           first, touching))
    return OffloadSpace(graph, tuple(candidates), tuple(forward_end), tuple(stage_start))


def forward_program(graph: Graph, keep: frozenset[str] | set[str], offloaded: frozenset[str] | set[str] = frozenset(),
                    offloads: OffloadSpace | None = None) -> tuple[Step, ...]:
    """The forward of the space: every op once; ``offload(r)`` right after r's producer and
    ``free(r)`` after op ``free_after(r)`` for the offloaded storages; every other value freed
    after its last use unless kept."""
    runs: list[Step] = []
    for op in graph.forward_ops:
        runs.append(run(op.name))
        runs.extend(offload(name) for name in op.outputs if name in offloaded)
    steps = insert_frees(graph, runs, live_out=set(keep))
    if not offloaded:
        return steps
    missing = set(offloaded) - set(offloads.by_root)
    if missing:
        raise UnsupportedGraphError(f"not offload candidates of graph {graph.name!r}: {sorted(missing)}")
    return delay_frees(steps, {c.root: graph.forward_ops[c.free_after].name for c in offloads.candidates
                               if c.root in offloaded})


def forward_high_water(graph: Graph, keep: frozenset[str] | set[str],
                       offloaded: frozenset[str] | set[str] = frozenset(), offloads: OffloadSpace | None = None
                       ) -> tuple[tuple[Step, ...], list[int]]:
    """Forward steps that keep ``keep`` for the backward (and offload ``offloaded``), and
    each step's high-water bytes as `simulate` counts them (storages by root, forward
    outputs pinned once produced)."""
    steps = forward_program(graph, keep, offloaded, offloads)
    refs: dict[str, int] = {}
    in_use = 0

    def acquire(name: str) -> None:
        nonlocal in_use
        root = graph.value(name).root
        if refs.get(root, 0) == 0:
            in_use += graph.value(root).size_bytes
        refs[root] = refs.get(root, 0) + 1

    for name in graph.placeholders:
        if graph.value(name).kind is not ValueKind.TANGENT:
            acquire(name)
    pinned = set(graph.forward_outputs)
    high_water = []
    for step in steps:
        if step.kind is StepKind.RUN:
            op = graph.op(step.name)
            new_roots = {graph.value(name).root for name in op.outputs} - {r for r, c in refs.items() if c}
            high_water.append(in_use + sum(graph.value(r).size_bytes for r in new_roots) + op.tmp_bytes)
            for name in op.outputs:
                acquire(name)
                if name in pinned:
                    acquire(name)
        else:
            high_water.append(in_use)
            if step.kind is StepKind.OFFLOAD:
                continue
            root = graph.value(step.name).root
            refs[root] -= 1
            if refs[root] == 0:
                in_use -= graph.value(root).size_bytes
    return steps, high_water


def assemble_plan(graph: Graph, solver: str, budget_bytes: int, keep: frozenset[str] | set[str],
                  backward_runs: list[str], *, optimal: bool, gap: float | None,
                  options: Mapping[str, object] | None = None, offloaded: frozenset[str] | set[str] = frozenset(),
                  offloads: OffloadSpace | None = None) -> Plan:
    """A plan of the space: the forward keeps ``keep`` and offloads ``offloaded``; the
    backward prefetches each offloaded storage at the start of its stage p(r), then runs
    ``backward_runs`` (recomputations and backward ops); every value instance is freed after
    its last use."""
    forward = forward_program(graph, keep, offloaded, offloads)
    prefetch_at: dict[int, list[str]] = {}
    for candidate in offloads.candidates if offloaded else ():
        if candidate.root in offloaded:
            prefetch_at.setdefault(candidate.prefetch_stage, []).append(candidate.root)
    steps: list[Step] = [prefetch(name) for name in prefetch_at.get(0, ())]
    stage = 0
    for name in backward_runs:
        steps.append(run(name))
        if graph.op(name).phase is Phase.BACKWARD:
            stage += 1
            steps.extend(prefetch(root) for root in prefetch_at.get(stage, ()))
    backward = insert_frees(graph, steps, live_out=set(graph.gradients), live_in=set(keep) | set(graph.placeholders))
    kept_roots = {graph.value(name).root for name in keep}
    decisions = {root: Decision.OFFLOAD if root in offloaded else Decision.KEEP if root in kept_roots
                 else Decision.RECOMPUTE for root in saved_roots(graph)}
    return Plan(graph_hash=graph.hash, solver=solver, budget_bytes=budget_bytes, forward=forward,
                backward=tuple(backward), decisions=decisions, optimal=optimal, gap=gap,
                options=dict(options or {}))


@dataclass(frozen=True)
class SpaceStart:
    """A plan of the space (keep set, backward runs) that fits the budget, converted from
    the plan of the heuristic ``solver``; ``time_ms`` is its simulated time and
    ``recompute_ms`` its MILP objective (the forward ops it recomputes)."""

    solver: str
    keep: frozenset[str]
    runs: tuple[str, ...]
    time_ms: float
    recompute_ms: float


def start_runs(graph: Graph, budget_bytes: int, space: PlanSpace, decisions: Mapping[str, Decision],
               carry: bool = True) -> tuple[frozenset[str], list[str], float] | None:
    """A plan of the space with the storages ``decisions`` does not keep dropped (those
    the space can drop): before each backward op, the recomputations its missing inputs
    need, in graph order. Recomputed values are carried to later stages that may need
    them with ``carry``, else freed after their stage and recomputed again (greedy's
    ``free_intermediates``). A value on the storage of an op to recompute (another output
    of a multi-output op, or a view) is neither kept nor carried into that stage, as the
    space requires; the recomputation makes it again. Returns (keep set, backward runs,
    simulated time in ms), or None if the plan does not fit ``budget_bytes`` or would
    recompute an op the space cannot. O(B * (F + E)) for B backward ops, F forward ops
    and E edges, plus one simulation."""
    dropped = {root for root, decision in decisions.items() if decision is not Decision.KEEP}
    keep = set(space.keep_set(dropped & set(space.droppable_roots)))
    live, runs = set(keep), []
    for stage, backward_op in enumerate(graph.backward_ops):
        while True:
            chosen: set[str] = set()
            stack = [n for n in backward_op.inputs if n in space.activations and n not in live]
            while stack:
                producer = graph.value(stack.pop()).producer
                if producer not in space.recomputable:
                    return None
                if producer not in chosen:
                    chosen.add(producer)
                    stack.extend(n for n in graph.op(producer).inputs if n in space.activations and n not in live)
            remade = {root for op_name in chosen for root in space.own_roots[op_name]}
            stale = {n for n in live if space.root(n) in remade}
            if not stale:
                break
            if stage == 0:
                if stale & space.kept_always:
                    return None
                keep -= stale
            live -= stale                        # then recompute what of it stage t reads
        for op_name in sorted(chosen, key=space.forward_index.__getitem__):
            if carry:
                live.update(graph.op(op_name).outputs)
            runs.append(op_name)
        runs.append(backward_op.name)
        live &= space.useful[stage + 1]
    plan = assemble_plan(graph, "ilp", budget_bytes, keep, runs, optimal=False, gap=None)
    result = simulate(graph, plan)
    return (frozenset(keep), runs, result.time_ms) if result.peak_bytes <= budget_bytes else None
