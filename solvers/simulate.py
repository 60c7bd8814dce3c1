"""Independent replay of a `Plan` on its `Graph`: peak bytes, time, memory timeline.

The replay is the checker of every solver (Checkmate's schedule checker plays the same
role): it raises `InvalidPlanError` on a use before definition, a free of a dead value, a
prefetch with no host copy, or a missing output, and otherwise reports what the runtime
will see.

Memory model (storages; docs/design.md, "Memory is counted by storage"):
  * a storage is counted while any value aliasing it is alive on the device; each run of
    an op allocates new storages (a recomputed value is a second copy while a view of the
    first is still alive), a view shares the storage of the input it views;
  * parameters, buffers and inputs are alive for the whole step; tangents for the whole
    backward (autograd holds them); forward outputs and gradients from their production
    to the end of the step (the caller and autograd hold them), ``graph.released_outputs``
    to the end of the forward (the caller drops them before calling backward);
  * an op counts its inputs, its new outputs and its workspace while it runs;
  * an op with ``reuses`` (a compiled kernel that writes in place) gives its first
    storage-owning output the storage of one of those inputs, of the same size, that dies
    at this op: no value but the op's inputs holds it and the program's frees right after
    the run let go of each of them (`_dying_instance`); that output then adds no bytes;
  * ``graph.caller_bytes`` (the caller's loss reduction) are counted from the backward on;
  * an offloaded value's device storage is released by ``free`` only once its copy has
    finished (compute waits for it); a prefetch allocates when it is issued.

Time model: one compute stream and two copy channels (device->host, host->device) that
overlap compute; a read of a prefetched value waits for its copy. O(steps + sum of op
arity) time.

`live_roots_at` answers "which storages are alive at step i" by the same rules, for the
solvers and `explain` that need the set rather than its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from solvers.errors import InvalidPlanError
from solvers.graph import Graph, Op, Phase, ValueKind
from solvers.plan import Plan, StepKind


class TimelinePoint(NamedTuple):
    """Memory and clock after one step (a tuple: the searches replay thousands of steps)."""

    phase: Phase
    step_index: int       # index into the phase's steps
    bytes_in_use: int     # device bytes right after the step
    time_ms: float        # compute clock after the step
    high_water_bytes: int = 0   # the most bytes alive during the step (an op's inputs, outputs, workspace)


@dataclass(frozen=True)
class SimResult:
    peak_bytes: int
    time_ms: float                  # end-to-end step time, transfers included where they stall
    compute_ms: float               # sum of the run steps' times
    recompute_ms: float             # time of forward ops run again in the backward
    stall_ms: float                 # time compute waited for copies
    peak_phase: Phase
    peak_step_index: int
    saved_bytes: int                # device bytes held at the end of the forward beyond the pinned ones
    offloaded_bytes: int
    timeline: tuple[TimelinePoint, ...] = field(repr=False, default=())

    def excess_bytes(self, budget_bytes: int) -> int:
        """Sum over the steps of how far each one's high-water mark exceeds the budget:
        falls whenever any over-budget moment improves, even if the peak does not."""
        return sum(max(0, point.high_water_bytes - budget_bytes) for point in self.timeline)


class _Memory:
    """Reference counts per storage *instance*: every run of an op allocates fresh
    storages for the values it creates (a recomputed storage is a second allocation while
    a view of the first is alive); a view shares the instance of the input it views."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.size_of: dict[int, int] = {}       # instance -> bytes
        self.refs: dict[int, int] = {}          # instance -> references
        self.instance_of: dict[str, int] = {}   # live value name -> instance it refers to
        self.bytes_in_use = 0

    def fresh(self, size_bytes: int) -> int:
        instance = len(self.size_of)
        self.size_of[instance] = size_bytes
        return instance

    def bind(self, value_name: str, instance: int) -> None:
        """``value_name`` now refers to ``instance`` (one reference, the program's)."""
        self.instance_of[value_name] = instance
        self.acquire(value_name)

    def acquire(self, value_name: str) -> None:
        instance = self.instance_of[value_name]
        count = self.refs.get(instance, 0)
        if count == 0:
            self.bytes_in_use += self.size_of[instance]
        self.refs[instance] = count + 1

    def release_instance(self, instance: int) -> None:
        count = self.refs[instance] - 1
        if count == 0:
            del self.refs[instance]
            self.bytes_in_use -= self.size_of[instance]
        else:
            self.refs[instance] = count

    def release(self, value_name: str) -> None:
        self.release_instance(self.instance_of[value_name])

    def instances_for(self, value_names: tuple[str, ...], inputs: tuple[str, ...]) -> dict[str, int]:
        """The instance each value will refer to: a fresh one for a storage root, the
        instance of the input (or earlier output) with the same root for a view."""
        chosen: dict[str, int] = {}
        values = self.graph.value_by_name
        for name in value_names:
            value = values[name]
            if value.alias_of is None:
                chosen[name] = self.fresh(value.size_bytes)
                continue
            source = next((chosen[other] for other in chosen if values[other].root == value.root), None)
            if source is None:
                source = next((self.instance_of[other] for other in inputs
                               if other in self.instance_of and values[other].root == value.root), None)
            if source is None:   # a view of a storage the op does not read: count it anew
                source = self.fresh(values[value.root].size_bytes)
            chosen[name] = source
        return chosen

    def new_bytes(self, instances: dict[str, int]) -> int:
        """Bytes that binding these instances would add."""
        size_of, refs = self.size_of, self.refs
        return sum(size_of[i] for i in set(instances.values()) if i not in refs)


def replayed_random_ops(graph: Graph, plan: Plan) -> list[str]:
    """Random forward ops that the plan runs more than once (again in the backward, or a
    second time in the forward), in the order of their first run. Each later run must draw
    the numbers of the first, so the forward saves the generator state before the first run
    and every later run replays it (`runtime.rng`); the state is held to the end of the step."""
    counts: dict[str, int] = {}
    random_ops = graph.random_forward_ops
    if not random_ops:
        return []
    for phase in (Phase.FORWARD, Phase.BACKWARD):
        for step in plan.steps(phase):
            if step.name in random_ops and step.kind is StepKind.RUN:
                counts[step.name] = counts.get(step.name, 0) + (2 if phase is Phase.BACKWARD else 1)
    return [name for name, count in counts.items() if count > 1]


def simulate(graph: Graph, plan: Plan, *, check_hash: bool = True) -> SimResult:
    """Replay ``plan`` on ``graph``; raise `InvalidPlanError` if it cannot execute."""
    if check_hash:
        plan.check_graph(graph)
    memory = _Memory(graph)
    live: set[str] = set()            # values the program holds a reference to, on the device
    ready_at: dict[str, float] = {}   # value -> time its prefetch finishes
    host_ready_at: dict[str, float] = {}   # value -> time its host copy is complete
    offload_done_at: dict[str, float] = {}
    pinned_outputs = set(graph.forward_outputs) | set(graph.gradients)
    caller_pinned: dict[str, int] = {}   # pinned output -> the instance the caller holds
    transfer = graph.transfer
    # random ops run again (in the backward, or a second time in the forward): the forward saves
    # a generator state before the first run (held to the end of the step), and a replay holds
    # the current state while it runs
    replayed = set(replayed_random_ops(graph, plan))
    op_by_name = graph.op_by_name

    def bind_placeholders(kinds_wanted: bool) -> None:
        names = tuple(n for n in graph.placeholders if (graph.value(n).kind is ValueKind.TANGENT) == kinds_wanted)
        names = tuple(sorted(names, key=lambda n: graph.value(n).alias_of is not None))   # roots before views
        for name, instance in memory.instances_for(names, graph.placeholders).items():
            memory.bind(name, instance)   # the program's reference, which a free drops
            memory.acquire(name)          # the caller's (autograd's, for tangents) pin
            live.add(name)

    bind_placeholders(False)

    clock_ms = compute_ms = recompute_ms = stall_ms = 0.0
    d2h_free_at = h2d_free_at = 0.0
    peak_bytes = memory.bytes_in_use
    peak_phase, peak_index = Phase.FORWARD, -1
    saved_bytes = offloaded_bytes = 0
    timeline: list[TimelinePoint] = []
    ran_forward: set[str] = set()
    defined: set[str] = set()

    def fail(phase: Phase, index: int, message: str) -> InvalidPlanError:
        step = plan.steps(phase)[index]
        return InvalidPlanError(f"plan by {plan.solver!r}, {phase.value} step {index} {step}: {message}")

    for phase in (Phase.FORWARD, Phase.BACKWARD):
        if phase is Phase.BACKWARD:
            for name in graph.released_outputs:
                if name in caller_pinned:
                    memory.release_instance(caller_pinned.pop(name))   # the caller dropped it
            memory.bytes_in_use += graph.caller_bytes
            bind_placeholders(True)
        for index, step in enumerate(plan.steps(phase)):
            high_water = memory.bytes_in_use
            if step.kind is StepKind.RUN:
                op = op_by_name.get(step.name)
                if op is None:
                    raise fail(phase, index, "no such op in the graph")
                if op.phase is Phase.BACKWARD and phase is Phase.FORWARD:
                    raise fail(phase, index, "a backward op cannot run in the forward phase")
                if op.phase is Phase.FORWARD and phase is Phase.BACKWARD and not op.recomputable:
                    raise fail(phase, index, f"op {op.name!r} ({op.target}) has effects and cannot be recomputed")
                if op.phase is Phase.FORWARD and phase is Phase.FORWARD and op.name in ran_forward \
                        and not op.recomputable:
                    raise fail(phase, index, f"op {op.name!r} ({op.target}) has effects and must run once")
                start_ms = clock_ms
                for name in op.inputs:
                    if name not in live:
                        raise fail(phase, index, f"input {name!r} is not on the device")
                if ready_at:                  # prefetches under way
                    start_ms = max(start_ms, max((ready_at.get(name, 0.0) for name in op.inputs), default=0.0))
                stall_ms += start_ms - clock_ms
                rng_bytes = 0
                if op.name in replayed:
                    if phase is Phase.FORWARD and op.name not in ran_forward:
                        memory.bytes_in_use += graph.rng_state_bytes
                    else:
                        rng_bytes = graph.rng_state_bytes
                instances = memory.instances_for(op.outputs, op.inputs)
                if op.reuses:
                    _write_in_place(memory, op, instances, plan.steps(phase), index)
                high_water = memory.bytes_in_use + memory.new_bytes(instances) + op.tmp_bytes + rng_bytes
                for name in op.outputs:
                    previous = memory.instance_of.get(name) if name in live else None
                    memory.bind(name, instances[name])
                    if previous is not None:
                        memory.release_instance(previous)   # the new definition replaces the old
                    live.add(name)
                    defined.add(name)
                    ready_at.pop(name, None)
                    if name in pinned_outputs and op.phase is phase:
                        pinned_outputs.discard(name)
                        memory.acquire(name)      # the caller / autograd keeps it to the end
                        caller_pinned[name] = memory.instance_of[name]
                clock_ms = start_ms + op.time_ms
                compute_ms += op.time_ms
                if op.phase is Phase.FORWARD:
                    if phase is Phase.BACKWARD or op.name in ran_forward:
                        recompute_ms += op.time_ms
                    ran_forward.add(op.name)
            elif step.kind is StepKind.FREE:
                if step.name not in live:
                    raise fail(phase, index, "value is not on the device")
                if step.name in offload_done_at:
                    wait_until = offload_done_at.pop(step.name)
                    if wait_until > clock_ms:
                        stall_ms += wait_until - clock_ms
                        clock_ms = wait_until
                live.discard(step.name)
                memory.release(step.name)
                del memory.instance_of[step.name]
            elif step.kind is StepKind.OFFLOAD:
                if step.name not in live:
                    raise fail(phase, index, "cannot offload a value that is not on the device")
                size = graph.value(graph.value(step.name).root).size_bytes
                start_ms = max(clock_ms, d2h_free_at, ready_at.get(step.name, 0.0))
                d2h_free_at = start_ms + transfer.latency_ms + size / transfer.device_to_host_bytes_per_ms
                host_ready_at[step.name] = d2h_free_at
                offload_done_at[step.name] = d2h_free_at
                offloaded_bytes += size
            elif step.kind is StepKind.PREFETCH:
                if step.name not in host_ready_at:
                    raise fail(phase, index, "no host copy to prefetch (offload it first)")
                if step.name in live:
                    raise fail(phase, index, "value is already on the device")
                size = graph.value(graph.value(step.name).root).size_bytes
                start_ms = max(clock_ms, h2d_free_at, host_ready_at[step.name])
                h2d_free_at = start_ms + transfer.latency_ms + size / transfer.host_to_device_bytes_per_ms
                ready_at[step.name] = h2d_free_at
                memory.bind(step.name, memory.fresh(size))
                live.add(step.name)
                high_water = memory.bytes_in_use
            if high_water > peak_bytes:
                peak_bytes, peak_phase, peak_index = high_water, phase, index
            timeline.append(TimelinePoint(phase, index, memory.bytes_in_use, clock_ms, high_water))

        if phase is Phase.FORWARD:
            missing = [name for name in graph.forward_outputs if name not in defined and name not in live]
            if missing:
                raise InvalidPlanError(f"plan by {plan.solver!r}: forward never computes output(s) {missing[:5]}")
            saved_bytes = memory.bytes_in_use - _pinned_forward_bytes(graph)
    missing = [name for name in graph.gradients if name not in defined and name not in live]
    if missing:
        raise InvalidPlanError(f"plan by {plan.solver!r}: backward never computes gradient(s) {missing[:5]}")
    return SimResult(peak_bytes=peak_bytes, time_ms=clock_ms, compute_ms=compute_ms, recompute_ms=recompute_ms,
                     stall_ms=stall_ms, peak_phase=peak_phase, peak_step_index=peak_index,
                     saved_bytes=max(0, saved_bytes), offloaded_bytes=offloaded_bytes, timeline=tuple(timeline))


def _write_in_place(memory: _Memory, op: Op, instances: dict[str, int], steps: tuple, index: int) -> None:
    """Give ``op``'s first storage-owning output (in ``instances``) the storage of an input
    of ``op.reuses`` that dies at this run (`_dying_instance`), if one does. O(op arity +
    the frees after the run)."""
    values = memory.graph.value_by_name
    owner = next((name for name in op.outputs if values[name].alias_of is None and values[name].size_bytes), None)
    if owner is None:
        return
    size_bytes = memory.size_of[instances[owner]]
    for name in op.reuses:
        instance = _dying_instance(memory, name, steps, index)
        if instance is not None and memory.size_of[instance] == size_bytes \
                and instance not in (instances[other] for other in op.outputs):
            instances[owner] = instance
            return


def _dying_instance(memory: _Memory, name: str, steps: tuple, index: int) -> int | None:
    """The storage instance ``name`` refers to, if every reference to it is let go of by
    the ``free`` steps that directly follow step ``index`` (a pin by the caller is a
    reference no free lets go of); else None."""
    instance = memory.instance_of.get(name)
    if instance is None:
        return None
    released = 0
    for position in range(index + 1, len(steps)):
        step = steps[position]
        if step.kind is not StepKind.FREE:
            break
        if memory.instance_of.get(step.name) == instance:
            released += 1
    return instance if released == memory.refs.get(instance, 0) else None


def live_roots_at(graph: Graph, plan: Plan, phase: Phase, step_index: int, *,
                  during_step: bool = True) -> frozenset[str]:
    """The storages (alias roots) alive at step ``step_index`` of ``phase`` by `simulate`'s
    accounting: the non-tangent placeholders throughout, the tangents from the backward
    on, forward outputs and gradients from their production to the end (the caller and
    autograd hold them; ``released_outputs`` until the backward starts), and every value
    the program holds (made by a run or a prefetch, until its free). ``during_step``: what
    the step's high-water mark counts (its free not yet done; `SimResult.peak_step_index`
    with `SimResult.peak_phase` gives the storages behind the peak); else right after the
    step. Empty for ``step_index < 0`` (before the first step). O(steps + sum of op arity)."""
    if step_index < 0:
        return frozenset()
    live = {name for name in graph.placeholders if graph.value(name).kind is not ValueKind.TANGENT}
    pinned = set(graph.forward_outputs) | set(graph.gradients)
    held: set[str] = set()        # pinned values the caller holds, produced in their own phase
    for current in (Phase.FORWARD, Phase.BACKWARD):
        if current is Phase.BACKWARD:
            held.difference_update(graph.released_outputs)
            live.update(name for name in graph.placeholders if graph.value(name).kind is ValueKind.TANGENT)
        for index, step in enumerate(plan.steps(current)):
            at_step = current is phase and index == step_index
            if step.kind is StepKind.RUN:
                op = graph.op(step.name)
                live.update(op.outputs)
                if op.phase is current:
                    held.update(name for name in op.outputs if name in pinned)
            elif step.kind is StepKind.PREFETCH:
                live.add(step.name)
            elif step.kind is StepKind.FREE and not (at_step and during_step):
                live.discard(step.name)
            if at_step:
                return frozenset(graph.value(name).root for name in live | held)
    return frozenset()


def _pinned_forward_bytes(graph: Graph) -> int:
    """Bytes pinned at the end of the forward: parameters, buffers, inputs, outputs."""
    roots = {graph.value(name).root for name in graph.placeholders
             if graph.value(name).kind is not ValueKind.TANGENT}
    roots |= {graph.value(name).root for name in graph.forward_outputs}
    return sum(graph.value(root).size_bytes for root in roots)
