"""``hierarchical``'s search: per-segment recompute options joined by a dynamic program over the chain.

After Rockmate (Zhao, Le Hellard, Eyraud-Dubois, Gusak, Beaumont, ICML 2023) and HiRemate
(Gusak et al., ICML 2025): the step is cut into a chain of segments
(`kernel.segments.segmentations`: transformer blocks, residual stages or the blocks nested in
them, U-Net levels; both chains where they differ, each solved below), each
segment gets a few *options*, and a chain DP in the spirit of Rotor (Beaumont,
Eyraud-Dubois, Herrmann, Joly, Shilova, 2019; `solvers.chain`) picks one option per
segment. MONeT (Shah et al., ICLR 2021) also pairs local choices with a global
checkpointing schedule, in one ILP where here a DP joins them.

Options (`kernel.options`). The decisions an option makes are about the segment's own
storages: the saved roots its forward ops allocate, except the ones a later segment's
forward reads (the segment's outputs, ``crossing_in`` of the later segments), pinned ones
and ones whose op cannot run twice; those are always kept, so recomputing a segment never
reaches into another one and the options of different segments compose. The droppable
storages are ordered as `baselines.solve_greedy` orders them (bytes per millisecond of the
whole recomputation, `kernel.recompute.recompute_time_ms`), the independent ones first (a
storage whose recomputation reads no other dropped storage,
`kernel.recompute.recompute_frontier`), then the rest; every option drops a prefix of that
order: nothing (keep all), everything (checkpoint the block: what ``every_block`` does),
and up to ``options_per_segment - 2`` prefixes in between, spread evenly over the dropped
bytes. Identical blocks (same op targets, output sizes and shapes, in order) share one
order.

Costs (`kernel.options.probe_costs`): each option level is probed by one replay of the plan
with that level in every segment, giving each segment's saved bytes, need and recompute
time; the model is additive: the peak while segment k runs is
``sum(saved[j] for j < k) + need[k]``.

DP (`choose_levels`). State = bytes saved by the segments so far, in units of
``budget / resolution`` (saved and need rounded up, the budget down: safe side); minimize
the sum of ``time`` subject to ``saved so far + need[k] <= budget`` for every k; Pareto
states (bytes, time) only.

Check (`option_dp`). The chosen plan is built with `kernel.program.plan_from_decisions`
and replayed (`kernel.replay.Replays`); if the additive model was wrong and the peak
exceeds the budget, the DP's budget is bisected downwards. Decision sets the caller seeds
(the portfolio seeds ``every_block``'s) are candidates too, so the result is never slower
than they are when they fit. A last pass (`restore`) keeps dropped storages again (most
recompute time per byte first) while the replayed peak fits and the time falls.

Below every option's reach, `drop_all_plan` drops every droppable storage (the segment
boundaries last) in one or two replays, then lowers and restores: near where ``greedy``'s
lowest pass ends, in O(1) replays instead of O(R). Which of these plans, and of the other
solvers' (`chain`'s re-runs, ``greedy``), ``hierarchical`` returns is
`solvers.portfolio.solve_hierarchical`'s choice.

Complexity, for S segments, L = options_per_segment levels, R saved storages, N program
steps and U = resolution, per chain (two at most): L probes and at most ``max_bisections + 1``
checks of O(N) each, DP O(S * L * U); then one restore pass O(R * N); frontiers O(R * graph)
once per distinct block.

Not optimal: the options are a few prefixes of one heuristic order, and the additive
memory model is checked, not proved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from solvers.errors import InfeasibleBudgetError, OptionError
from solvers.graph import Graph, Phase
from solvers.kernel.options import OptionCost, SegmentOptions, option_decisions, probe_costs, segment_options
from solvers.kernel.program import plan_from_decisions, saved_roots
from solvers.kernel.recompute import Seed, droppable_roots, recompute_time_ms
from solvers.kernel.replay import Replays
from solvers.kernel.segments import Segment, segmentations
from solvers.plan import Decision, Plan, StepKind
from solvers.simulate import SimResult, live_roots_at, simulate

SOLVER = "hierarchical"
ROUNDING_BISECTIONS = 6   # DP budgets tried above the budget when none at or below it replays within it


@dataclass(frozen=True)
class OptionDP:
    """What `option_dp` found: ``plan``, the keep-all plan (``optimal``) or the DP's fastest
    restored plan, None when no DP plan or seed fits; ``time_ms`` its replayed time; the
    ``segments``, their ``options`` and probed ``costs``; ``replays``, whose
    ``lowest_peak_bytes`` is the lowest peak the search replayed."""

    plan: Plan | None
    time_ms: float | None
    segments: tuple[Segment, ...]
    options: list[SegmentOptions]
    costs: list[list[OptionCost]]
    resolution: int
    replays: Replays

    @property
    def optimal(self) -> bool:
        return self.plan is not None and self.plan.optimal

    def decisions_at(self, dp_budget_bytes: int) -> dict[str, Decision] | None:
        """The DP's decisions (unreplayed) under another budget, or None when no choice fits."""
        levels = choose_levels(self.costs, dp_budget_bytes, self.resolution)
        return None if levels is None else option_decisions(self.replays.graph, self.segments, self.options, levels)


def option_dp(graph: Graph, budget_bytes: int, *, options_per_segment: int = 8, resolution: int = 2000,
              max_bisections: int = 12, seeds: Sequence[Seed] = ()) -> OptionDP:
    """The segment-option chain DP (module docstring) under ``budget_bytes``, checked by
    replays, with the decision sets of ``seeds`` as more candidates; the fastest that fits,
    after `restore`. Keep-all, when it fits, is returned at once (optimal).

    Raises:
        OptionError: ``options_per_segment < 2`` or ``resolution < 1``.
    """
    if options_per_segment < 2:
        raise OptionError(f"hierarchical: options_per_segment must be at least 2 (keep all, checkpoint), "
                          f"got {options_per_segment}; pass options_per_segment >= 2 (default 8)")
    if resolution < 1:
        raise OptionError(f"hierarchical: resolution must be at least 1 (memory slots per budget), got {resolution}; "
                          "pass resolution >= 1 (default 2000)")
    keep_all = {root: Decision.KEEP for root in saved_roots(graph)}
    replays = Replays(graph, budget_bytes)
    if replays.fits(keep_all):
        return OptionDP(_finish(graph, budget_bytes, keep_all, {"segments": 0}, optimal=True),
                        replays.time_ms(keep_all), (), [], [], resolution, replays)

    searches = [_search_chain(graph, segments, options_per_segment, resolution, max_bisections, seeds, replays,
                              budget_bytes) for segments in segmentations(graph)]
    candidates = [(time_ms, index, decisions) for index, search in enumerate(searches)
                  for time_ms, decisions in search.found]
    if not candidates:
        first = searches[0]
        return OptionDP(None, None, first.segments, first.options, first.costs, resolution, replays)
    _, index, decisions = min(candidates, key=lambda candidate: candidate[:2])   # first wins ties
    best = searches[index]
    decisions, restored = restore(graph, decisions, replays)
    plan = _finish(graph, budget_bytes, decisions,
                   {"segments": len(best.segments), "dp_budget_bytes": best.dp_budget_bytes, "restored": restored})
    return OptionDP(plan, replays.time_ms(decisions), best.segments, best.options, best.costs, resolution, replays)


@dataclass
class _ChainSearch:
    """One segmentation's options, probed costs, the replayed (time, decisions) pairs that
    fit, in the order found, and the largest DP budget that gave one."""

    segments: tuple[Segment, ...]
    options: list[SegmentOptions]
    costs: list[list[OptionCost]]
    found: list[tuple[float, dict[str, Decision]]]
    dp_budget_bytes: int | None = None


def _search_chain(graph: Graph, segments: tuple[Segment, ...], options_per_segment: int, resolution: int,
                  max_bisections: int, seeds: Sequence[Seed], replays: Replays, budget_bytes: int) -> _ChainSearch:
    """The DP over one segmentation: its budget bisected downwards while its plan's replay
    does not fit, then, if none did, upwards by at most its rounding (`ROUNDING_BISECTIONS`
    tries); the seeds' decision sets are candidates too."""
    options = segment_options(graph, segments, options_per_segment)
    search = _ChainSearch(segments, options, probe_costs(graph, segments, options), [])

    def fits_at(dp_budget: int) -> bool | None:
        """None: the DP has no choice under ``dp_budget``; else whether its choice replays
        within the budget (recorded when it does)."""
        levels = choose_levels(search.costs, dp_budget, resolution)
        if levels is None:
            return None
        decisions = option_decisions(graph, segments, options, levels)
        if not replays.fits(decisions):
            return False
        search.found.append((replays.time_ms(decisions), decisions))
        search.dp_budget_bytes = max(search.dp_budget_bytes or 0, dp_budget)
        return True

    low, high = 0, budget_bytes
    dp_budget = budget_bytes
    for _ in range(max_bisections + 1):
        fits = fits_at(dp_budget)
        if fits and dp_budget == budget_bytes:
            break
        if fits is False:
            high = dp_budget
        else:
            low = dp_budget
        if high - low <= max(1, budget_bytes // resolution):
            break
        dp_budget = (low + high) // 2
    if search.dp_budget_bytes is None:
        # the DP rounds every segment's bytes up to whole units: at a budget with less slack
        # than that (a budget at the floor of the parameters and all their gradients), it
        # finds nothing, while its choice at a budget a little above may replay within this
        # one. Bisect the DP's budget between the budget and the budget plus that rounding.
        low, high = budget_bytes, budget_bytes + 2 * len(segments) * max(1, budget_bytes // resolution)
        for _ in range(ROUNDING_BISECTIONS):
            dp_budget = (low + high) // 2
            if fits_at(dp_budget) is False:
                high = dp_budget
            else:
                low = dp_budget
    for _, seed in seeds:
        decisions = seed(graph, segments)
        if replays.fits(decisions):
            search.found.append((replays.time_ms(decisions), decisions))
    return search


# -- the DP ------------------------------------------------------------------------------------

def choose_levels(costs: list[list[OptionCost]], budget_bytes: int, resolution: int) -> list[int] | None:
    """The option per segment that minimizes the summed time subject to, for every k,
    ``sum(saved of segments before k) + need[k] <= budget``; None when no choice fits.
    Bytes in units of ``budget / resolution``, rounded to the safe side. States: Pareto
    front of (units saved so far, time). O(S * L * resolution)."""
    unit = max(1, budget_bytes // resolution)
    capacity = budget_bytes // unit

    def units(size: int) -> int:
        return -(-size // unit)

    # states: units saved so far -> (time, levels chosen)
    states: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for segment_costs in costs:
        following: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (time_ms, levels) in sorted(states.items()):
            for level, cost in enumerate(segment_costs):
                saved_after = used + units(cost.saved_bytes)
                if used + units(cost.need_bytes) > capacity or saved_after > capacity:
                    continue
                candidate = (time_ms + cost.time_ms, levels + (level,))
                if saved_after not in following or candidate[0] < following[saved_after][0]:
                    following[saved_after] = candidate
        states, best_time = {}, None
        for used in sorted(following):   # keep the Pareto front: more bytes only for less time
            time_ms, levels = following[used]
            if best_time is None or time_ms < best_time:
                states[used] = (time_ms, levels)
                best_time = time_ms
        if not states:
            return None
    _, best = min(states.items(), key=lambda item: (item[1][0], item[0]))
    return list(best[1])


# -- restore, drop all ------------------------------------------------------------------

RESTORE_REPLAYS = 48   # replays the keep-again pass may spend on storages that might not fit
LOWER_REPLAYS = 128   # replays `_keep_while_peak_falls` may spend lowering the all-dropped peak
LOWER_REPLAY_OPS = 100_000   # ... and ops replayed in all, so that large graphs get fewer trials
DROP_BOUNDARY_ROUNDS = 8   # replays `drop_all_plan` may spend dropping boundaries alive at the peak


def restore(graph: Graph, decisions: dict[str, Decision], replays: Replays) -> tuple[dict[str, Decision], int]:
    """Keep dropped storages again, most recompute time per byte first, while the replayed
    peak fits and the time falls; returns the decisions (which fit if ``decisions`` did)
    and how many storages were kept again.

    A first pass trusts that keeping a storage raises the peak by at most its size and keeps
    it without a replay while the peak plus that size fits; the others get at most
    `RESTORE_REPLAYS` replays. The result is replayed. If the bound failed (the schedule
    builder may order recomputations differently once a storage is kept), the longest
    prefix of what the first pass kept that still fits and is no slower is found by
    bisection, and a second pass replays every further trial from there (before, it started
    again from nothing: on ResNet-50 that kept 2 storages where the bound had kept 161, and
    a larger budget gave a 2.1x slower plan); if that does not fit either the decisions come
    back unchanged. O(R + RESTORE_REPLAYS + log R) replays' worth of work."""
    def value_of_keeping(root: str) -> float:
        return recompute_time_ms(graph, root) / (graph.value(root).size_bytes + 1)

    dropped = [root for root, decision in decisions.items() if decision is Decision.RECOMPUTE]
    order = sorted(dropped, key=value_of_keeping, reverse=True)
    trusted, restored = _restore_pass(graph, decisions, replays, order, trust_size_bound=True)
    if replays.fits(trusted):
        return trusted, restored
    kept_on_trust = [root for root in order if trusted[root] is Decision.KEEP]
    prefix = _longest_fitting_prefix(decisions, kept_on_trust, replays)
    start = {**decisions, **dict.fromkeys(kept_on_trust[:prefix], Decision.KEEP)}
    rest = [root for root in order if start[root] is Decision.RECOMPUTE]
    restored_decisions, restored = _restore_pass(graph, start, replays, rest, trust_size_bound=False)
    if replays.fits(restored_decisions):
        return restored_decisions, prefix + restored
    return dict(decisions), 0


def _longest_fitting_prefix(decisions: dict[str, Decision], order: list[str], replays: Replays) -> int:
    """The largest k such that keeping ``order[:k]`` fits and is no slower than
    ``decisions`` (which fit), by bisection: O(log len(order)) replays, exact where a longer
    prefix never fits when a shorter one does not."""
    start_time_ms = replays.time_ms(decisions)
    low, high = 0, max(0, len(order) - 1)   # low fits (nothing kept); all of ``order`` did not
    while low < high:
        middle = (low + high + 1) // 2
        peak_bytes, time_ms = replays.measure({**decisions, **dict.fromkeys(order[:middle], Decision.KEEP)})
        if peak_bytes <= replays.budget_bytes and time_ms <= start_time_ms:
            low = middle
        else:
            high = middle - 1
    return low


def _restore_pass(graph: Graph, decisions: dict[str, Decision], replays: Replays, order: list[str],
                  trust_size_bound: bool) -> tuple[dict[str, Decision], int]:
    """One pass of `restore` over the dropped storages in ``order``."""
    decisions = dict(decisions)
    peak, current = replays.measure(decisions)
    restored = trials = 0
    for root in order:
        size_bytes = graph.value(root).size_bytes
        decisions[root] = Decision.KEEP
        if trust_size_bound and peak + size_bytes <= replays.budget_bytes:
            peak += size_bytes            # an upper bound if the bound holds; replayed at the end
            restored += 1
            continue
        if trials >= RESTORE_REPLAYS:
            decisions[root] = Decision.RECOMPUTE
            continue
        trials += 1
        trial_peak, trial_time = replays.measure(decisions)
        if trial_peak <= replays.budget_bytes and trial_time < current:
            peak, current = trial_peak, trial_time
            restored += 1
        else:
            decisions[root] = Decision.RECOMPUTE
    return decisions, restored


def drop_all_plan(graph: Graph, budget_bytes: int, segments: Sequence[Segment]) -> Plan:
    """Near where ``greedy``'s lowest pass ends, in a few replays instead of O(R): every
    storage greedy may drop is dropped and recomputed (the ``segments``' boundaries kept
    first, so that recomputations stay inside a segment; while that does not fit, the
    boundaries alive at the replay's peak are dropped too), the values made only on the way
    to another recomputation freed at once and made again when needed
    (``free_intermediates``, the pass that reaches lowest). Six ways of doing that are
    replayed: those the next backward op reads held for it or not (``hold_for_next_op``:
    neither is always lower), each releasing everything else, or holding the boundaries
    once a recomputation remakes them (``hold_remade``: the segments before a dropped
    boundary re-run once in the backward, not once per later segment), or those and what a
    backward op's own segment remakes for it (``hold_remade_for``: the segment re-runs
    about once for its backward ops, not once per op). Held values are held from the
    backward op after the replay's peak on while holding them from the start does not fit
    (``hold_remade_from``). On GPT-2 at 4 x 512 tokens, whose loss leaves room for no
    boundary beside it, the floor plan's predicted step (H100 roofline times) fell from
    17.9x the plain step's to 2.3x by holding boundaries and to 1.5x by holding both, and
    its solve from 58 s to under 15 s. For each ``hold_for_next_op``, the fitting way with the
    fastest replay is taken. If no way fits, `_keep_while_peak_falls` keeps storages again
    where that lowers the peak (a drop can raise it; greedy would undo it), from the way
    that starts lowest. `restore` then keeps storages again while the time falls, for each
    way taken; the faster plan wins. O(12 * DROP_BOUNDARY_ROUNDS + LOWER_REPLAYS +
    2 * RESTORE_REPLAYS) replays; not always as low as greedy.

    Raises:
        InfeasibleBudgetError: the plan does not fit, with its peak.
    """
    droppable = set(droppable_roots(graph))
    boundaries = {root for segment in segments for root in segment.crossing_in}
    own_values = {}
    for segment in segments:
        made = frozenset(name for op in segment.forward_ops for name in graph.op(op).outputs)
        own_values.update(dict.fromkeys(segment.backward_ops, made))
    held = frozenset(boundaries)
    ways = [Way(hold_for_next_op, *holding) for holding in ((), (held,), (held, own_values))
            for hold_for_next_op in (False, True)]
    starts = [_all_dropped(graph, budget_bytes, boundaries & droppable, droppable, way) for way in ways]
    fitting = [start for start in starts if start[2].peak_bytes <= budget_bytes]
    taken = [min(candidates, key=lambda start: start[2].time_ms) for candidates in
             ([start for start in fitting if start[0].hold_for_next_op is hold] for hold in (False, True)) if candidates]
    found: list[tuple[float, Plan]] = []
    for way, decisions, result in taken or [min(starts, key=lambda start: start[2].peak_bytes)]:
        replays = Replays(graph, budget_bytes, free_intermediates=True, **way.program_options())
        if result.peak_bytes > budget_bytes:
            decisions, peak_bytes = _keep_while_peak_falls(graph, decisions, replays)
            if peak_bytes > budget_bytes:
                raise InfeasibleBudgetError(budget_bytes, peak_bytes,
                                            {"every droppable storage recomputed": result.peak_bytes,
                                             "then kept again where the peak fell": peak_bytes}, solver=SOLVER)
        decisions, restored = restore(graph, decisions, replays)
        plan = plan_from_decisions(graph, decisions, SOLVER, budget_bytes, free_intermediates=True,
                                   **way.program_options())
        found.append((replays.time_ms(decisions), replace(plan, options={**plan.options, "restored": restored})))
    return min(found, key=lambda item: item[0])[1]     # first wins ties: without holding for the next op


@dataclass(frozen=True)
class Way:
    """How `drop_all_plan`'s program releases what recomputations make
    (`kernel.program.build_program`'s options of the same names)."""

    hold_for_next_op: bool
    hold_remade: frozenset[str] = frozenset()
    hold_remade_for: Mapping[str, frozenset[str]] | None = None
    hold_remade_from: int = 0

    def program_options(self) -> dict:
        return {"hold_for_next_op": self.hold_for_next_op, "hold_remade": self.hold_remade,
                "hold_remade_for": self.hold_remade_for, "hold_remade_from": self.hold_remade_from}

    def held_roots(self, graph: Graph) -> set[str]:
        names = set(self.hold_remade).union(*(self.hold_remade_for or {}).values())
        return {graph.value(name).root for name in names}


def _all_dropped(graph: Graph, budget_bytes: int, kept: set[str], droppable: set[str], way: Way
                 ) -> tuple[Way, dict[str, Decision], SimResult]:
    """Every droppable storage recomputed but the segment boundaries ``kept``, while that
    does not fit (`DROP_BOUNDARY_ROUNDS` rounds at most each): where a value held since a
    recomputation remade it is alive at the replay's peak, values are held from the
    backward op after the peak on; else the kept boundaries alive at the peak are dropped
    (all of them where none is). Returns the way (its ``hold_remade_from`` moved), the
    decisions and their replay."""
    kept = set(kept)
    held_roots = way.held_roots(graph)
    for _ in range(2 * DROP_BOUNDARY_ROUNDS + 1):
        decisions = {root: Decision.RECOMPUTE if root in droppable and root not in kept else Decision.KEEP
                     for root in saved_roots(graph)}
        plan = plan_from_decisions(graph, decisions, SOLVER, budget_bytes, free_intermediates=True,
                                   **way.program_options())
        result = simulate(graph, plan, check_hash=False)
        if result.peak_bytes <= budget_bytes:
            break
        at_peak = live_roots_at(graph, plan, result.peak_phase, result.peak_step_index)
        position = _backward_op_position(graph, plan, result) if at_peak & held_roots - kept else -1
        if position >= way.hold_remade_from:
            way = replace(way, hold_remade_from=position + 1)
        elif kept:
            kept -= (at_peak & kept) or kept         # none of them at the peak: drop them all
        else:
            break
    return way, decisions, result


def _backward_op_position(graph: Graph, plan: Plan, result: SimResult) -> int:
    """The position in ``graph.backward_ops`` of the op whose run (or whose inputs'
    recomputation) makes ``result``'s peak; -1 when the peak is in the forward."""
    if result.peak_phase is not Phase.BACKWARD:
        return -1
    return sum(1 for step in plan.backward[:result.peak_step_index]
               if step.kind is StepKind.RUN and graph.op(step.name).phase is Phase.BACKWARD)


def _keep_while_peak_falls(graph: Graph, decisions: dict[str, Decision],
                           replays: Replays) -> tuple[dict[str, Decision], int]:
    """Keep dropped storages again, one trial replay each, where that lowers the replayed
    peak, until it fits: recomputing everything is not the lowest point when a
    recomputation makes large values beside a small one, or runs a long chain where much
    is alive (greedy keeps such storages). Most recompute time per byte first; at most
    `LOWER_REPLAYS` trials, fewer on large graphs (`LOWER_REPLAY_OPS` ops replayed in all:
    a replay of a 2,849-op graph takes over a second). Returns the decisions and their
    peak. O(min(LOWER_REPLAYS, LOWER_REPLAY_OPS / ops)) replays."""
    decisions = dict(decisions)
    peak_bytes = replays.measure(decisions)[0]
    dropped = [root for root, decision in decisions.items() if decision is Decision.RECOMPUTE]
    dropped.sort(key=lambda root: recompute_time_ms(graph, root) / (graph.value(root).size_bytes + 1), reverse=True)
    trials = min(LOWER_REPLAYS, max(1, LOWER_REPLAY_OPS // max(1, len(graph.ops))))
    for root in dropped[:trials]:
        if peak_bytes <= replays.budget_bytes:
            break
        decisions[root] = Decision.KEEP
        trial_peak_bytes = replays.measure(decisions)[0]
        if trial_peak_bytes < peak_bytes:
            peak_bytes = trial_peak_bytes
        else:
            decisions[root] = Decision.RECOMPUTE
    return decisions, peak_bytes


def _finish(graph: Graph, budget_bytes: int, decisions: dict[str, Decision], options: dict,
            optimal: bool = False) -> Plan:
    plan = plan_from_decisions(graph, decisions, SOLVER, budget_bytes, optimal=optimal)
    return replace(plan, options={**plan.options, **options})
