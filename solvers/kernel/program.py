"""The plan space every solver writes in: per-storage decisions turned into a `Plan` program.

Given which saved storages are dropped (recomputed) or offloaded, `build_program` writes
the forward and backward steps the way activation checkpointing executes them:

  forward:  run every forward op in order; offload a value right after it is computed;
            free every value after its last use unless the backward keeps it.
  backward: run every backward op in order; before each, make its inputs available:
            a kept value is there, an offloaded one is prefetched one op ahead (or a copy
            time ahead, ``prefetch_by_transfer_time``), a dropped one is recomputed just in
            time from whatever is available (recursively); free every value after its
            last use.

`plan_from_decisions` and `plan_with_offload` wrap that program in a `Plan`. `insert_frees`
is the liveness pass (walk the steps in reverse, as torch.fx does) shared by every solver
that emits only run/offload/prefetch steps, and `delay_frees` holds an offloaded value on
the device until its copy has had time to end. The just-in-time schedule is the one
Checkmate (Jain et al., MLSys 2020) and Chen et al. (2016) execute; `free_intermediates`
is the Revolve-like multiple recomputation of Griewank & Walther (2000).

Each function is O(steps + total arity) unless its docstring says otherwise.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Mapping

from solvers.errors import InvalidPlanError, UnsupportedGraphError
from solvers.graph import Graph, ValueKind
from solvers.plan import Decision, Plan, Step, StepKind, free, offload, prefetch, run


def saved_roots(graph: Graph) -> tuple[str, ...]:
    """Activation storages that the backward reads (through the value or an alias of it):
    the things a keep / recompute / offload decision is about. Graph order."""
    roots = dict.fromkeys(graph.value(name).root for name in graph.saved_candidates)
    return tuple(root for root in roots if graph.value(root).kind is ValueKind.ACTIVATION)


def plan_from_decisions(graph: Graph, decisions: dict[str, Decision], solver: str, budget_bytes: int,
                        optimal: bool = False, free_intermediates: bool = False,
                        hold_for_next_op: bool = False, hold_remade: frozenset[str] = frozenset(),
                        hold_remade_from: int = 0, hold_remade_for: Mapping[str, frozenset[str]] | None = None
                        ) -> Plan:
    """The `Plan` of ``decisions`` (`build_program`), labelled with ``solver``."""
    forward, backward = build_program(graph, decisions, free_intermediates=free_intermediates,
                                      hold_for_next_op=hold_for_next_op, hold_remade=hold_remade,
                                      hold_remade_from=hold_remade_from, hold_remade_for=hold_remade_for)
    options: dict[str, object] = {"free_intermediates": True} if free_intermediates else {}
    if free_intermediates and hold_for_next_op:
        options["hold_for_next_op"] = True
    if free_intermediates and (hold_remade or hold_remade_for):
        options["hold_remade"] = len(hold_remade)
        options["hold_remade_from"] = hold_remade_from
        if hold_remade_for:
            options["hold_remade_for"] = "segment"
    return Plan(graph_hash=graph.hash, solver=solver, budget_bytes=budget_bytes, forward=forward,
                backward=backward, decisions=dict(decisions), optimal=optimal, options=options)


def plan_with_offload(graph: Graph, decisions: dict[str, Decision], solver: str, budget_bytes: int) -> Plan:
    """The `Plan` of ``decisions`` with prefetches issued a copy time ahead of their use."""
    forward, backward = build_program(graph, decisions, prefetch_by_transfer_time=True)
    return Plan(graph_hash=graph.hash, solver=solver, budget_bytes=budget_bytes, forward=forward,
                backward=backward, decisions=dict(decisions), options={"prefetch": "by transfer time"})


def decisions_for(graph: Graph, recompute: Iterable[str] = (), offloaded: Iterable[str] = ()) -> dict[str, Decision]:
    recompute, offloaded = set(recompute), set(offloaded)
    return {root: Decision.OFFLOAD if root in offloaded else Decision.RECOMPUTE if root in recompute
            else Decision.KEEP for root in saved_roots(graph)}


def build_program(graph: Graph, decisions: dict[str, Decision], *, prefetch_ahead_ops: int = 1,
                  free_intermediates: bool = False, hold_for_next_op: bool = False,
                  hold_remade: frozenset[str] = frozenset(), hold_remade_from: int = 0,
                  hold_remade_for: Mapping[str, frozenset[str]] | None = None,
                  prefetch_by_transfer_time: bool = False) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """Forward and backward steps for the given root decisions (missing roots are kept).

    A value recomputed for a backward op stays until its last backward use. With
    ``free_intermediates``, the values recomputed only on the way to it (its dropped
    ancestors) are released right after that op and recomputed again when needed: less
    memory, more time (Revolve-like multiple recomputation). With ``hold_for_next_op`` too,
    one that the next backward op reads stays for it: releasing it would recompute its
    whole chain again at once, with the gradients of both ops alive (on ResNet-50, a
    bottleneck's batch-norm backward and the convolution backward after it both read the
    block's recomputed input chain). Neither way is always lower. The values in
    ``hold_remade`` (segment boundaries) are not released that way from backward op
    ``hold_remade_from`` on: once a recomputation there remakes one it stays until its last
    backward use, so the segments before it are re-run once, not once per later segment
    (with every boundary dropped: one forward re-run in all, as Chen et al.'s sqrt(n)
    schedule re-runs it, instead of O(segments) of them). Before that op they are released
    as the others are, so that where the backward peaks (a loss's working set) they need
    not fit beside it. ``hold_remade_for`` adds, per backward op, values held once remade
    for it (from ``hold_remade_from`` on too): its own segment's forward values, which the
    segment's later backward ops read again, so a segment is re-run about once for its
    backward instead of once per op (the boundaries' hold brings it to its input).

    An offloaded storage is prefetched ``prefetch_ahead_ops`` backward ops before its first
    backward use. With ``prefetch_by_transfer_time``, instead, the copies are timed by the
    ops' profiled times on the link (`Graph.transfer`): each prefetch as late as lets it
    end before its use, the host->device copies queued on one channel; and each offloaded
    storage is freed in the forward once its device->host copy has ended rather than at
    its last use, so that compute never waits for a copy it could run beside.
    """
    dropped = {root for root, decision in decisions.items() if decision is not Decision.KEEP}
    offloaded = {root for root, decision in decisions.items() if decision is Decision.OFFLOAD}

    # forward: everything the backward reads stays, unless its storage is dropped/offloaded
    forward_runs: list[Step] = []
    for op in graph.forward_ops:
        forward_runs.append(run(op.name))
        forward_runs.extend(offload(name) for name in op.outputs if name in offloaded)
    values = graph.value_by_name
    kept_for_backward = {name for name in graph.saved_candidates if values[name].root not in dropped}
    # a kept storage keeps all its names: the storage is alive anyway, and a recomputation
    # that reads the root (not the view the backward reads) must not re-run its producer
    kept_roots = {values[name].root for name in kept_for_backward}
    kept_roots |= {root for root, decision in decisions.items() if decision is Decision.KEEP}
    read_names = graph.read_names_by_root
    kept_for_backward.update(name for root in kept_roots for name in read_names.get(root, ()))
    kept_for_backward |= _unrecomputable_sources(graph, kept_for_backward | offloaded | set(graph.placeholders),
                                                 dropped)
    forward_steps = insert_frees(graph, forward_runs, live_out=kept_for_backward)
    if prefetch_by_transfer_time and offloaded:
        forward_steps = _free_offloaded_when_copied(graph, forward_steps, offloaded)

    live = {name for name in graph.placeholders} | kept_for_backward
    on_host = set(offloaded)
    backward_ops = graph.backward_ops
    backward_core: list[Step] = []
    prefetched: set[str] = set()

    def make_available(value_name: str, intermediates: set[str]) -> None:
        """Post-order walk of the producers that must run again (explicit stack: chains
        of thousands of dropped values must not hit Python's recursion limit). Values
        computed only to feed another recomputation are added to ``intermediates``."""
        stack: list[tuple[str, bool]] = [(value_name, False)]
        while stack:
            name, inputs_ready = stack.pop()
            if name in live:
                continue
            if name in on_host:
                backward_core.append(prefetch(name))
                live.add(name)
                continue
            producer = graph.value(name).producer
            if producer is None:
                raise InvalidPlanError(f"value {name!r} is needed in the backward but nothing produces it")
            op = graph.op(producer)
            if not op.recomputable:
                raise InvalidPlanError(
                    f"value {name!r} comes from op {op.name!r} ({op.target}), which cannot be recomputed; keep it")
            if inputs_ready:
                backward_core.append(run(op.name))
                live.update(op.outputs)
                if value_name not in op.outputs:
                    intermediates.update(op.outputs)
                continue
            stack.append((name, True))
            stack.extend((inp, False) for inp in reversed(op.inputs) if inp not in live)

    issue_before = _prefetch_positions(graph, backward_ops, on_host) if prefetch_by_transfer_time and on_host else {}
    for position, op in enumerate(backward_ops):
        if prefetch_by_transfer_time:
            ahead_names = issue_before.get(position, ())
        else:
            ahead_names = [name for ahead in backward_ops[position + 1: position + 1 + prefetch_ahead_ops]
                           for name in ahead.inputs]
        for name in ahead_names:
            if name in on_host and name not in live and name not in prefetched:
                backward_core.append(prefetch(name))
                prefetched.add(name)
                live.add(name)
        intermediates: set[str] = set()
        for name in op.inputs:
            make_available(name, intermediates)
        backward_core.append(run(op.name))
        live.update(op.outputs)
        if free_intermediates:   # an offloaded value a recomputation remade stays: it is prefetched once at most
            held = set(op.inputs)
            if hold_for_next_op and position + 1 < len(backward_ops):
                held |= set(backward_ops[position + 1].inputs)
            if position >= hold_remade_from:
                held |= hold_remade
                if hold_remade_for:
                    held |= hold_remade_for.get(op.name, frozenset())
            live.difference_update(intermediates - held - on_host)
    backward_steps = insert_frees(graph, backward_core, live_out=set(graph.gradients),
                                  live_in=kept_for_backward | set(graph.placeholders))
    return forward_steps, backward_steps


def _prefetch_positions(graph: Graph, backward_ops: tuple, on_host: set[str]) -> dict[int, list[str]]:
    """``{backward op position: offloaded storages to prefetch before it}``: for each storage
    the latest op such that the ops from there to its first backward reader (through any of
    its views) take at least its copy time. O(B log B + offloaded) for B backward ops."""
    first_use: dict[str, int] = {}
    for position, op in enumerate(backward_ops):
        for name in op.inputs:
            root = graph.value(name).root
            if root in on_host:
                first_use.setdefault(root, position)
    starts_ms = [0.0]
    for op in backward_ops:
        starts_ms.append(starts_ms[-1] + op.time_ms)
    transfer = graph.transfer
    issue_before: dict[int, list[str]] = {}
    channel_free_from_ms = float("inf")     # the one host->device channel, scheduled from the end
    for root, use in sorted(first_use.items(), key=lambda item: item[1], reverse=True):
        copy_ms = transfer.latency_ms + graph.value(root).size_bytes / transfer.host_to_device_bytes_per_ms
        start_ms = min(starts_ms[use], channel_free_from_ms) - copy_ms
        channel_free_from_ms = start_ms
        position = max(0, bisect.bisect_right(starts_ms, start_ms) - 1)
        issue_before.setdefault(min(position, use), []).append(root)
    return {position: list(reversed(names)) for position, names in sorted(issue_before.items())}


def _free_offloaded_when_copied(graph: Graph, steps: tuple[Step, ...], offloaded: set[str]) -> tuple[Step, ...]:
    """Move each ``free`` of an offloaded storage to where its device->host copy has ended,
    by the ops' profiled times on the one copy channel: freeing waits for the copy
    (`runtime.offload.release_after_offload`), so an early free stalls compute while a
    late one only holds the memory as long. O(steps)."""
    transfer = graph.transfer
    clock_ms = channel_free_at_ms = 0.0
    copied_at: dict[str, float] = {}                 # offloaded value -> end of its copy
    result: list[Step] = []
    waiting: list[tuple[float, str]] = []            # (copy end, value), frees held back
    for step in steps:
        if step.kind is StepKind.FREE and step.name in offloaded and copied_at.get(step.name, 0.0) > clock_ms:
            waiting.append((copied_at[step.name], step.name))
            continue
        result.append(step)
        if step.kind is StepKind.OFFLOAD:
            channel_free_at_ms = max(clock_ms, channel_free_at_ms) + transfer.latency_ms + \
                graph.value(step.name).size_bytes / transfer.device_to_host_bytes_per_ms
            copied_at[step.name] = channel_free_at_ms
        elif step.kind is StepKind.RUN:
            clock_ms += graph.op(step.name).time_ms
            for done_ms, name in sorted(w for w in waiting if w[0] <= clock_ms):
                result.append(free(name))
            waiting = [w for w in waiting if w[0] > clock_ms]
    result.extend(free(name) for _, name in sorted(waiting))
    return tuple(result)


def _unrecomputable_sources(graph: Graph, available: set[str], dropped: set[str]) -> set[str]:
    """Values that recomputing the dropped storages would read but whose op cannot run
    again (a buffer update's result): the forward must keep them. Their own storage
    being dropped is left to `make_available` to refuse. O(forward ops + edges)."""
    stack = [name for op in graph.backward_ops for name in op.inputs
             if graph.value(name).kind is ValueKind.ACTIVATION and name not in available]
    seen: set[str] = set()
    sources: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in available:
            continue
        seen.add(name)
        op = graph.op(graph.value(name).producer)
        if op.recomputable:
            stack.extend(op.inputs)
        elif graph.value(name).root not in dropped:
            sources.add(name)
    return sources


def insert_frees(graph: Graph, steps: list[Step], live_out: set[str],
                 live_in: set[str] = frozenset()) -> tuple[Step, ...]:
    """Add ``free(v)`` right after the last use of each value instance.

    ``live_out`` values stay alive at the end of the phase. Values in ``live_in`` that the
    phase never reads and that are not live-out are freed at the start. Placeholders are
    never freed (the caller holds them). O(steps + total arity).
    """
    placeholders = set(graph.placeholders)
    op_by_name, distinct_inputs = graph.op_by_name, graph.distinct_inputs

    def defs_and_uses(step: Step) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if step.kind is StepKind.RUN:
            return op_by_name[step.name].outputs, distinct_inputs[step.name]
        if step.kind is StepKind.PREFETCH:
            return (step.name,), ()
        if step.kind is StepKind.OFFLOAD:
            return (), (step.name,)
        raise InvalidPlanError(f"insert_frees takes run/offload/prefetch steps, got {step}")

    frees_after: list[list[str]] = [[] for _ in steps]
    needed = set(live_out)
    for index in range(len(steps) - 1, -1, -1):
        defs, uses = defs_and_uses(steps[index])
        for name in defs:
            if name not in needed:
                frees_after[index].append(name)       # produced and never read
        needed.difference_update(defs)
        for name in uses:
            if name not in needed and name not in placeholders:
                frees_after[index].append(name)       # last use of this instance
                needed.add(name)
    result: list[Step] = [free(name) for name in sorted(set(live_in) - needed - placeholders)]
    for step, names in zip(steps, frees_after):
        result.append(step)
        result.extend(free(name) for name in dict.fromkeys(names))
    return tuple(result)


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
