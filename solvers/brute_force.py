"""Exact search over every plan of a tiny graph: the reference the `ilp` solver is tested against.

Its plan space is the restriction of Checkmate's (Jain et al., MLSys 2020) that `solvers.ilp`
formulates as a MILP; here it is searched exhaustively, so the two must agree.

The plan space (shared with `solvers.ilp`, so the two are comparable exactly)::

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
last use (`schedule.insert_frees`), which for a given sequence of runs is the least memory.

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

Search: every keep set of the storages that can be dropped, and every subset of the
dropped candidates whose copies meet their deadlines (offloaded), is a source of one
Dijkstra run over states (backward stage, last forward op recomputed in the stage, set of
live forward values, offloaded set) with actions "recompute a forward op", "free a value",
"prefetch the stage's offloaded storages" (first in a stage, after frees), "run the
backward op"; states whose memory exceeds the budget are pruned; cost = recompute time.
A value no remaining backward op can need (directly or through recomputation) is dropped
at once. Exponential: O(2^K * S * F) for K droppable storages, S states, F forward ops,
O(3^C * 2^(K - C) * S * F) with C offload candidates.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterator, Mapping

from solvers.errors import InfeasibleBudgetError, UnsupportedGraphError
from solvers.graph import Graph, Op, Phase, ValueKind
from solvers.plan import Decision, Plan, Step, StepKind, free, offload, prefetch, run
from solvers.registry import register
from solvers.schedule import insert_frees, saved_roots

MAX_FORWARD_OPS = 10
MAX_BACKWARD_OPS = 16
MAX_DROPPABLE_STORAGES = 14
MAX_STATES = 2_000_000
MAX_SOURCES = 200_000           # keep sets times offload sets
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


def delay_frees(steps: tuple[Step, ...], free_after: Mapping[str, str]) -> tuple[Step, ...]:
    """Move ``free(v)`` to just after ``run(free_after[v])`` (and the frees that follow it),
    unless it already comes later: an offloaded value leaves the device only once its copy
    has had time to finish. O(steps)."""
    ran: set[str] = set()
    moved: dict[str, list[str]] = {}
    result: list[Step] = []
    pending: list[str] = []
    for step in steps:
        if step.kind is StepKind.FREE and step.name in free_after and free_after[step.name] not in ran:
            moved.setdefault(free_after[step.name], []).append(step.name)
            continue
        if step.kind is not StepKind.FREE and pending:
            result.extend(free(name) for name in pending)
            pending = []
        result.append(step)
        if step.kind is StepKind.RUN:
            ran.add(step.name)
            pending = moved.pop(step.name, [])
    result.extend(free(name) for name in pending)
    if moved:
        raise UnsupportedGraphError(f"cannot free {sorted(n for names in moved.values() for n in names)} after "
                                    f"ops that never run: {sorted(moved)}")
    return tuple(result)


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


class _Search:
    """The backward state graph: states ``(stage, last recomputed forward index, live mask,
    offloaded mask)``; ``last == -2`` at the start of a stage whose prefetches are pending."""

    def __init__(self, space: PlanSpace, offloads: OffloadSpace) -> None:
        graph = self.graph = space.graph
        self.space = space
        self.forward_ops = graph.forward_ops
        self.backward_ops = graph.backward_ops
        order = {value.name: i for i, value in enumerate(graph.values)}
        names = sorted(space.activations, key=order.__getitem__)
        self.names = names
        self.bit = {name: 1 << i for i, name in enumerate(names)}
        self.root_of = [graph.value(name).root for name in names]

        def mask(values) -> int:
            return sum(self.bit[name] for name in set(values) if name in self.bit)

        self.mask = mask
        self.useful_mask = [mask(u) for u in space.useful]
        self.op_in = {op.name: mask(op.inputs) for op in graph.ops}
        self.op_out = {op.name: mask(op.outputs) for op in graph.ops}
        self.own_mask = {op.name: mask(name for root in space.own_roots[op.name]
                                       for name in space.aliases.get(root, ()))
                         for op in self.forward_ops}
        self.fixed_bytes = [space.fixed_bytes(t) for t in range(len(self.backward_ops))]
        self._memory: dict[tuple[int, int], tuple[int, frozenset[str]]] = {}
        # offload: candidate c has bit 1 << c in the offloaded mask
        self.candidates = offloads.candidates
        self.touch_mask = {op.name: sum(1 << c for c, candidate in enumerate(self.candidates)
                                        if op.name in candidate.touching_ops) for op in self.forward_ops}
        self.not_yet_read = [sum(1 << c for c, candidate in enumerate(self.candidates) if candidate.first_stage > t)
                             for t in range(len(self.backward_ops) + 1)]
        self.prefetched_at = [sum(1 << c for c, candidate in enumerate(self.candidates)
                                  if candidate.prefetch_stage == t) for t in range(len(self.backward_ops) + 1)]

    def offload_mask(self, offloaded: frozenset[str]) -> int:
        return sum(1 << c for c, candidate in enumerate(self.candidates) if candidate.root in offloaded)

    def entering(self, stage: int, offloaded: int) -> int:
        """``last`` of a state entering ``stage``: -2 while the stage's prefetches are pending."""
        return -2 if stage < len(self.prefetched_at) and self.prefetched_at[stage] & offloaded else -1

    def live_roots(self, stage: int, live: int) -> tuple[int, frozenset[str]]:
        """(bytes in use, alive roots) entering a step of ``stage`` with ``live`` forward values."""
        key = (stage, live)
        found = self._memory.get(key)
        if found is None:
            fixed = self.space.fixed_roots[stage]
            roots = {self.root_of[i] for i in range(len(self.names)) if live >> i & 1}
            extra = sum(self.space.size(root) for root in roots - fixed)
            found = (self.fixed_bytes[stage] + extra, fixed | roots)
            self._memory[key] = found
        return found

    def new_bytes(self, op: Op, alive: frozenset[str]) -> int:
        roots = {self.graph.value(name).root for name in op.outputs} - alive
        return sum(self.space.size(root) for root in roots)

    def successors(self, state: tuple[int, int, int, int]
                   ) -> Iterator[tuple[str | None, int, float, tuple[int, int, int, int]]]:
        """(op run or None for a free or a prefetch, high-water bytes, added time, next state)."""
        stage, last, live, offloaded = state
        in_use, alive = self.live_roots(stage, live)
        useful = self.useful_mask[stage]
        bits = live
        while bits:
            low = bits & -bits
            bits ^= low
            yield None, in_use, 0.0, (stage, last, live & ~low, offloaded)
        if last == -2:     # the stage's prefetches come first (after frees): nothing else yet
            arriving = [candidate.root for c, candidate in enumerate(self.candidates)
                        if self.prefetched_at[stage] & offloaded & 1 << c]
            high_water = in_use + sum(self.space.size(root) for root in arriving)
            yield None, high_water, 0.0, (stage, -1, (live | self.mask(arriving)) & useful, offloaded)
            return
        banned = offloaded & self.not_yet_read[stage]
        for index in range(last + 1, len(self.forward_ops)):
            op = self.forward_ops[index]
            if op.name not in self.space.recomputable or self.touch_mask[op.name] & banned:
                continue
            if self.op_in[op.name] & ~live or not (self.op_out[op.name] & useful & ~live):
                continue
            if self.own_mask[op.name] & live:
                continue
            high_water = in_use + self.new_bytes(op, alive) + op.tmp_bytes
            yield op.name, high_water, op.time_ms, (stage, index, (live | self.op_out[op.name]) & useful, offloaded)
        op = self.backward_ops[stage]
        if not self.op_in[op.name] & ~live:
            high_water = in_use + self.new_bytes(op, alive) + op.tmp_bytes
            next_useful = self.useful_mask[stage + 1] if stage + 1 < len(self.useful_mask) else 0
            yield op.name, high_water, 0.0, (stage + 1, self.entering(stage + 1, offloaded), live & next_useful,
                                            offloaded)


def _source_count(space: PlanSpace, offloads: OffloadSpace) -> int:
    """Keep sets times offload subsets: 3 choices per candidate, 2 per other droppable storage."""
    candidates = len(offloads.candidates)
    return 3 ** candidates * 2 ** (len(space.droppable_roots) - candidates)


def _check_size(graph: Graph, space: PlanSpace, offloads: OffloadSpace) -> None:
    forward, backward = len(graph.forward_ops), len(graph.backward_ops)
    if (forward > MAX_FORWARD_OPS or backward > MAX_BACKWARD_OPS
            or len(space.droppable_roots) > MAX_DROPPABLE_STORAGES
            or _source_count(space, offloads) > MAX_SOURCES):
        raise UnsupportedGraphError(
            f"graph {graph.name!r} is too large for brute_force: {forward} forward ops (limit {MAX_FORWARD_OPS}), "
            f"{backward} backward ops (limit {MAX_BACKWARD_OPS}), {len(space.droppable_roots)} droppable storages "
            f"(limit {MAX_DROPPABLE_STORAGES}), {len(offloads.candidates)} offload candidates "
            f"({_source_count(space, offloads)} keep/offload sets, limit {MAX_SOURCES}); use solver='ilp'")


def _sources(space: PlanSpace, offloads: OffloadSpace
             ) -> Iterator[tuple[frozenset[str], frozenset[str], list[int]]]:
    """Every keep set, every subset of its dropped candidates whose copies meet their
    deadlines, and the forward's high-water marks."""
    candidates = [candidate.root for candidate in offloads.candidates]
    for count in range(len(space.droppable_roots) + 1):
        for dropped in itertools.combinations(space.droppable_roots, count):
            keep = space.keep_set(frozenset(dropped))
            movable = [root for root in candidates if root in dropped]
            for size in range(len(movable) + 1):
                for chosen in itertools.combinations(movable, size):
                    offloaded = frozenset(chosen)
                    if offloaded and not offloads.fits(offloaded):
                        continue
                    _, high_water = forward_high_water(space.graph, keep, offloaded, offloads)
                    yield keep, offloaded, high_water


def _dijkstra(space: PlanSpace, offloads: OffloadSpace, budget_bytes: int | None
              ) -> tuple[float, frozenset[str], frozenset[str], list[str], int] | None:
    """Least recompute time (``budget_bytes`` given) or least peak (None): (key, keep set,
    offloaded set, backward runs, peak) of the best plan, or None when no plan fits."""
    search = _Search(space, offloads)
    final_stage = len(search.backward_ops)
    counter = itertools.count()
    heap: list = []
    best: dict[tuple[int, int, int, int], float] = {}
    parent: dict[tuple[int, int, int, int], tuple] = {}
    for keep, offloaded, high_water in _sources(space, offloads):
        start_bytes, _ = search.live_roots(0, search.mask(keep)) if search.backward_ops else (0, None)
        peak = max(high_water + [start_bytes])
        if budget_bytes is not None and peak > budget_bytes:
            continue
        mask = search.offload_mask(offloaded)
        state = (0, search.entering(0, mask), search.mask(keep) & search.useful_mask[0], mask)
        key = 0.0 if budget_bytes is not None else float(peak)
        if key < best.get(state, float("inf")):
            best[state] = key
            parent[state] = ("source", keep, offloaded, peak)
            heapq.heappush(heap, (key, next(counter), state))
    while heap:
        key, _, state = heapq.heappop(heap)
        if key > best[state]:
            continue
        if state[0] == final_stage:
            runs: list[str] = []
            peak = 0 if budget_bytes is not None else int(key)
            while parent[state][0] != "source":
                previous, action, step_peak = parent[state]
                if action is not None:
                    runs.append(action)
                peak = max(peak, step_peak)
                state = previous
            _, keep, offloaded, source_peak = parent[state]
            runs.reverse()
            return key, keep, offloaded, runs, max(peak, source_peak)
        if len(best) > MAX_STATES:
            raise UnsupportedGraphError(f"brute_force explored over {MAX_STATES} states on graph "
                                        f"{space.graph.name!r}; use solver='ilp'")
        for action, high_water, cost, following in search.successors(state):
            if budget_bytes is not None:
                if high_water > budget_bytes:
                    continue
                new_key = key + cost
            else:
                new_key = float(max(key, high_water))
            if new_key < best.get(following, float("inf")):
                best[following] = new_key
                parent[following] = (state, action, high_water)
                heapq.heappush(heap, (new_key, next(counter), following))
    return None


def least_feasible_plan(graph: Graph, *, offload: bool | None = None) -> tuple[int, Plan]:
    """The smallest peak any plan of the space reaches, and a plan reaching it (offload as
    in `solve_brute_force`)."""
    space = plan_space(graph)
    offloads = offload_space(graph, space, offload)
    _check_size(graph, space, offloads)
    found = _dijkstra(space, offloads, None)
    if found is None:
        raise UnsupportedGraphError(f"graph {graph.name!r}: no plan of the space computes the backward "
                                    "(a value the backward reads can neither be kept nor recomputed)")
    peak, keep, offloaded, runs, _ = found
    return int(peak), assemble_plan(graph, "brute_force", int(peak), keep, runs, optimal=False, gap=None,
                                    offloaded=offloaded, offloads=offloads)


@register("brute_force")
def solve_brute_force(graph: Graph, budget_bytes: int, *, offload: bool | None = None) -> Plan:
    """Least-time plan of the exact solvers' space under ``budget_bytes``, by exhaustive
    search (module docstring); optimal by construction. ``offload`` (default:
    ``graph.transfer.real``) adds the offload choices of `OffloadSpace`.

    Raises:
        UnsupportedGraphError: more than 10 forward ops, 16 backward ops, 14 droppable
            storages or 200,000 keep/offload sets (or the search outgrows 2 million states).
        InfeasibleBudgetError: no plan of the space fits; ``least_feasible_bytes`` is the
            smallest peak any plan of the space reaches.
    """
    space = plan_space(graph)
    offloads = offload_space(graph, space, offload)
    _check_size(graph, space, offloads)
    found = _dijkstra(space, offloads, int(budget_bytes))
    if found is None:
        least, _ = least_feasible_plan(graph, offload=offload)
        kind = "keep/recompute/offload" if offloads.candidates else "keep/recompute"
        raise InfeasibleBudgetError(int(budget_bytes), least, {f"least peak of any {kind} plan": least},
                                    solver="brute_force")
    _, keep, offloaded, runs, _ = found
    return assemble_plan(graph, "brute_force", int(budget_bytes), keep, runs, optimal=True, gap=0.0,
                         offloaded=offloaded, offloads=offloads)
