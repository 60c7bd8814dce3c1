"""Exact search over every plan of a tiny graph: the reference the `ilp` solver is tested against.

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

Search: every keep set of the storages that can be dropped is a source of one Dijkstra
run over states (backward stage, last forward op recomputed in the stage, set of live
forward values) with actions "recompute a forward op", "free a value", "run the
backward op"; states whose memory exceeds the budget are pruned; cost = recompute time.
A value no remaining backward op can need (directly or through recomputation) is dropped
at once. Exponential: O(2^K * S * F) for K droppable storages, S states, F forward ops.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterator, Mapping

from solvers.errors import InfeasibleBudgetError, UnsupportedGraphError
from solvers.graph import Graph, Op, ValueKind
from solvers.plan import Decision, Plan, Step, StepKind, run
from solvers.registry import register
from solvers.schedule import insert_frees, saved_roots

MAX_FORWARD_OPS = 10
MAX_BACKWARD_OPS = 16
MAX_DROPPABLE_STORAGES = 14
MAX_STATES = 2_000_000


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


def forward_high_water(graph: Graph, keep: frozenset[str] | set[str]) -> tuple[tuple[Step, ...], list[int]]:
    """Forward steps that keep ``keep`` for the backward, and each step's high-water bytes
    as `simulate` counts them (storages by root, forward outputs pinned once produced)."""
    steps = insert_frees(graph, [run(op.name) for op in graph.forward_ops], live_out=set(keep))
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
            root = graph.value(step.name).root
            refs[root] -= 1
            if refs[root] == 0:
                in_use -= graph.value(root).size_bytes
    return steps, high_water


def assemble_plan(graph: Graph, solver: str, budget_bytes: int, keep: frozenset[str] | set[str],
                  backward_runs: list[str], *, optimal: bool, gap: float | None,
                  options: Mapping[str, object] | None = None) -> Plan:
    """A plan of the space: the forward keeps ``keep``; the backward runs ``backward_runs``
    (recomputations and backward ops); every value instance is freed after its last use."""
    forward, _ = forward_high_water(graph, keep)
    backward = insert_frees(graph, [run(name) for name in backward_runs], live_out=set(graph.gradients),
                            live_in=set(keep) | set(graph.placeholders))
    kept_roots = {graph.value(name).root for name in keep}
    decisions = {root: Decision.KEEP if root in kept_roots else Decision.RECOMPUTE for root in saved_roots(graph)}
    return Plan(graph_hash=graph.hash, solver=solver, budget_bytes=budget_bytes, forward=forward,
                backward=tuple(backward), decisions=decisions, optimal=optimal, gap=gap,
                options=dict(options or {}))


class _Search:
    """The backward state graph: states ``(stage, last recomputed forward index, live mask)``."""

    def __init__(self, space: PlanSpace) -> None:
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

    def successors(self, state: tuple[int, int, int]) -> Iterator[tuple[str | None, int, float, tuple[int, int, int]]]:
        """(op run or None for a free, high-water bytes, added time, next state)."""
        stage, last, live = state
        in_use, alive = self.live_roots(stage, live)
        useful = self.useful_mask[stage]
        bits = live
        while bits:
            low = bits & -bits
            bits ^= low
            yield None, in_use, 0.0, (stage, last, live & ~low)
        for index in range(last + 1, len(self.forward_ops)):
            op = self.forward_ops[index]
            if op.name not in self.space.recomputable:
                continue
            if self.op_in[op.name] & ~live or not (self.op_out[op.name] & useful & ~live):
                continue
            if self.own_mask[op.name] & live:
                continue
            high_water = in_use + self.new_bytes(op, alive) + op.tmp_bytes
            yield op.name, high_water, op.time_ms, (stage, index, (live | self.op_out[op.name]) & useful)
        op = self.backward_ops[stage]
        if not self.op_in[op.name] & ~live:
            high_water = in_use + self.new_bytes(op, alive) + op.tmp_bytes
            next_useful = self.useful_mask[stage + 1] if stage + 1 < len(self.useful_mask) else 0
            yield op.name, high_water, 0.0, (stage + 1, -1, live & next_useful)


def _check_size(graph: Graph, space: PlanSpace) -> None:
    forward, backward = len(graph.forward_ops), len(graph.backward_ops)
    if (forward > MAX_FORWARD_OPS or backward > MAX_BACKWARD_OPS
            or len(space.droppable_roots) > MAX_DROPPABLE_STORAGES):
        raise UnsupportedGraphError(
            f"graph {graph.name!r} is too large for brute_force: {forward} forward ops (limit {MAX_FORWARD_OPS}), "
            f"{backward} backward ops (limit {MAX_BACKWARD_OPS}), {len(space.droppable_roots)} droppable storages "
            f"(limit {MAX_DROPPABLE_STORAGES}); use solver='ilp'")


def _sources(space: PlanSpace, search: _Search) -> Iterator[tuple[frozenset[str], int]]:
    """Every keep set and the peak of the forward plus the backward's first moment."""
    for count in range(len(space.droppable_roots) + 1):
        for dropped in itertools.combinations(space.droppable_roots, count):
            keep = space.keep_set(frozenset(dropped))
            _, high_water = forward_high_water(space.graph, keep)
            start_bytes, _ = search.live_roots(0, search.mask(keep)) if search.backward_ops else (0, None)
            yield keep, max(high_water + [start_bytes])


def _dijkstra(space: PlanSpace, budget_bytes: int | None) -> tuple[float, frozenset[str], list[str], int] | None:
    """Least recompute time (``budget_bytes`` given) or least peak (None): (key, keep set,
    backward runs, peak) of the best plan, or None when no plan fits."""
    search = _Search(space)
    final_stage = len(search.backward_ops)
    counter = itertools.count()
    heap: list = []
    best: dict[tuple[int, int, int], float] = {}
    parent: dict[tuple[int, int, int], tuple] = {}
    for keep, peak in _sources(space, search):
        if budget_bytes is not None and peak > budget_bytes:
            continue
        state = (0, -1, search.mask(keep) & search.useful_mask[0])
        key = 0.0 if budget_bytes is not None else float(peak)
        if key < best.get(state, float("inf")):
            best[state] = key
            parent[state] = ("source", keep, peak)
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
            _, keep, source_peak = parent[state]
            runs.reverse()
            return key, keep, runs, max(peak, source_peak)
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


def least_feasible_plan(graph: Graph) -> tuple[int, Plan]:
    """The smallest peak any plan of the space reaches, and a plan reaching it."""
    space = plan_space(graph)
    _check_size(graph, space)
    found = _dijkstra(space, None)
    if found is None:
        raise UnsupportedGraphError(f"graph {graph.name!r}: no plan of the space computes the backward "
                                    "(a value the backward reads can neither be kept nor recomputed)")
    peak, keep, runs, _ = found
    return int(peak), assemble_plan(graph, "brute_force", int(peak), keep, runs, optimal=False, gap=None)


@register("brute_force")
def solve_brute_force(graph: Graph, budget_bytes: int) -> Plan:
    """Least-time plan of the exact solvers' space under ``budget_bytes``, by exhaustive
    search (module docstring); optimal by construction.

    Raises:
        UnsupportedGraphError: more than 10 forward ops, 16 backward ops or 14 droppable
            storages (or the search outgrows 2 million states).
        InfeasibleBudgetError: no plan of the space fits; ``least_feasible_bytes`` is the
            smallest peak any plan of the space reaches.
    """
    space = plan_space(graph)
    _check_size(graph, space)
    found = _dijkstra(space, int(budget_bytes))
    if found is None:
        least, _ = least_feasible_plan(graph)
        raise InfeasibleBudgetError(int(budget_bytes), least, {"least peak of any keep/recompute plan": least},
                                    solver="brute_force")
    _, keep, runs, _ = found
    return assemble_plan(graph, "brute_force", int(budget_bytes), keep, runs, optimal=True, gap=0.0)
