"""Exact search over every plan of a tiny graph: the reference the `ilp` solver is tested against.

The plan space is `kernel.space`'s: the restriction of Checkmate's (Jain et al., MLSys
2020) that `solvers.ilp` formulates as a MILP, with its fixed-schedule offload choices
(`OffloadSpace`); here it is searched exhaustively, so the two must agree. Optimal by
construction.

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
from typing import Iterator

from solvers.errors import InfeasibleBudgetError, UnsupportedGraphError
from solvers.graph import Graph, Op
from solvers.kernel.space import (OffloadSpace, PlanSpace, assemble_plan, forward_high_water, offload_space,
                                  plan_space)
from solvers.plan import Plan

MAX_FORWARD_OPS = 10
MAX_BACKWARD_OPS = 16
MAX_DROPPABLE_STORAGES = 14
MAX_STATES = 2_000_000
MAX_SOURCES = 200_000           # keep sets times offload sets


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
