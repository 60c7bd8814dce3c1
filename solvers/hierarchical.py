"""``hierarchical``: per-segment recompute options joined by a dynamic program over the chain.

After Rockmate (Zhao, Le Hellard, Eyraud-Dubois, Gusak, Beaumont, ICML 2023) and HiRemate
(Gusak et al., ICML 2025): the step is cut into a chain of segments (`kernel.segments.segment_chain`:
transformer blocks, residual stages, U-Net levels), each segment gets a few *options*, and a
chain DP in the spirit of Rotor (Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova, 2019;
`solvers.chain`) picks one option per segment. MONeT (Shah et al., ICLR 2021) also pairs
local choices with a global checkpointing schedule, in one ILP where here a DP joins them.

Options. The decisions an option makes are about the segment's own storages: the saved
roots its forward ops allocate, except the ones a later segment's forward reads (the
segment's outputs, ``crossing_in`` of the later segments), pinned ones and ones whose op
cannot run twice; those are always kept, so recomputing a segment never reaches into
another one and the options of different segments compose. The droppable storages are
ordered as `baselines.solve_greedy` orders them (bytes per millisecond of the whole
recomputation, `kernel.recompute.recompute_time_ms`), the independent ones first (a storage whose
recomputation reads no other dropped storage, `kernel.recompute.recompute_frontier`), then the
rest; every option drops a prefix of that order:
nothing (keep all), everything (checkpoint the block: what ``every_block`` does), and up to
``options_per_segment - 2`` prefixes in between, spread evenly over the dropped bytes.
Identical blocks (same op targets, output sizes and shapes, in order) share one order.

Costs. Each option level is *probed*: the plan with that level in every segment is built and
replayed by `simulate`, and for each segment k the probe gives ``saved[k]`` (bytes of k's
storages alive at the end of the forward), ``time[k]`` (time of k's forward ops run again
in the backward) and ``need[k]`` (the highest memory while k's forward or k's backward
runs, recomputations included, minus the saved bytes of the segments before k). The model
is additive: the peak while segment k runs is ``sum(saved[j] for j < k) + need[k]``.

DP. State = bytes saved by the segments so far, in units of ``budget / resolution``
(saved and need rounded up, the budget down: safe side); minimize the sum of ``time`` subject
to ``saved so far + need[k] <= budget`` for every k; Pareto states (bytes, time) only.

Check. The chosen plan is built with `kernel.program.plan_from_decisions` and replayed; if the
additive model was wrong and the peak exceeds the budget, the DP's budget is bisected
downwards. The ``every_block`` plan is a candidate too, so the result is never slower than
it when it fits. A last pass restores dropped storages (most recompute time per byte
first) while the replayed peak fits and the time falls. The fastest candidate wins. If
nothing fits, `_drop_all_fallback` (one replay of every droppable storage recomputed, then
the restore pass; ``greedy`` too up to `GREEDY_CANDIDATE_MAX_OPS` ops, above which it takes
tens of seconds) is the fallback; `InfeasibleBudgetError` only when it fails too.

Complexity, for S segments, L = options_per_segment levels, R saved storages, N program
steps and U = resolution: L probes and at most ``max_bisections + 1`` checks of O(N) each,
DP O(S * L * U), restore pass O(R * N), frontiers O(R * graph) once per distinct block.

Re-runs. The option DP never drops a segment's outputs; `chain` (Rotor, with forward
re-runs of whole segments) does, and reaches budgets below every_block's peak. Its plan
over the same segments, with the same drop prefixes as stage options (a stage run "all"
may drop a prefix and recompute it inside its backward: Rockmate's combination), is a
candidate too (O(S^2 * U' * (S + L)) more, U' its slots), and so is its plan without stage
options (its memory model differs, so neither always wins); either is returned when it is
faster or the only one that fits.

Small graphs. Neither DP drops a segment boundary without re-running the whole segment
before it; on graphs of few, large segments (a one-block ResNet) dropping one boundary
storage is what the optimum does. Up to `GREEDY_CANDIDATE_MAX_OPS` ops ``greedy``, which
may drop any storage, and `_drop_all_fallback` are more candidates (a second or two at
most there); above, the latter only when nothing else fits.

Not optimal: the options are a few prefixes of one heuristic order, and the additive
memory model is checked, not proved.
"""

from __future__ import annotations

from dataclasses import replace

from solvers.baselines import solve_greedy
from solvers.chain import solve_chain
from solvers.errors import InfeasibleBudgetError, OptionError
from solvers.graph import Graph
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.kernel.options import OptionCost, option_decisions, probe_costs, segment_options
from solvers.kernel.program import plan_from_decisions, plan_with_offload, saved_roots
from solvers.kernel.recompute import droppable_roots, every_block_decisions, recompute_time_ms
from solvers.kernel.replay import Replays
from solvers.kernel.segments import Segment, segment_chain
from solvers.offload_refine import offload_with_recompute, refine_with_offload
from solvers.plan import Decision, Plan
from solvers.registry import register
from solvers.simulate import live_roots_at, simulate

SOLVER = "hierarchical"
# Up to this many ops ``greedy`` (O(R) full replays: about a second at 260 ops, 2-3 s at
# 480, 14-25 s at 1,400) is one more candidate; above, only the fallback when nothing else
# fits. 600 as `registry.AUTO_MAX_OPS`: on the 4-block GPT (483 ops) at every_block's peak
# greedy's plan, which may drop a block input that is cheap to remake, can be the fastest.
GREEDY_CANDIDATE_MAX_OPS = 600


@register(SOLVER)
def solve_hierarchical(graph: Graph, budget_bytes: int, *, options_per_segment: int = 8,
                       resolution: int = 2000, max_bisections: int = 12, with_reruns: bool = True,
                       offload: bool | None = None) -> Plan:
    """Least-time plan found by the segment-option chain DP (module docstring); not optimal.
    With ``with_reruns``, `chain`'s Rotor schedule over the same segments is a candidate too.
    With ``offload`` (default: the graph's host link is real, `Transfer.real`), the DP's plan
    with recomputations turned into offloads (`offload_refine`) is a candidate too.

    Raises:
        InfeasibleBudgetError: neither the DP's plans nor ``greedy`` fit the budget.
        OptionError: ``options_per_segment < 2`` or ``resolution < 1``.
    """
    if options_per_segment < 2:
        raise OptionError(f"hierarchical: options_per_segment must be at least 2 (keep all, checkpoint), "
                          f"got {options_per_segment}; pass options_per_segment >= 2 (default 8)")
    if resolution < 1:
        raise OptionError(f"hierarchical: resolution must be at least 1 (memory slots per budget), got {resolution}; "
                          "pass resolution >= 1 (default 2000)")
    keep_all = {root: Decision.KEEP for root in saved_roots(graph)}
    checker = Replays(graph, budget_bytes)
    if checker.fits(keep_all):
        return _finish(graph, budget_bytes, keep_all, {"segments": 0}, optimal=True)

    segments = segment_chain(graph)
    options = segment_options(graph, segments, options_per_segment)
    costs = probe_costs(graph, segments, options)

    candidates: list[tuple[float, dict[str, Decision]]] = []
    dp_budget_found = None
    low, high = 0, budget_bytes
    dp_budget = budget_bytes
    for _ in range(max_bisections + 1):
        levels = choose_levels(costs, dp_budget, resolution)
        if levels is None:
            low = dp_budget
        else:
            decisions = option_decisions(graph, segments, options, levels)
            if checker.fits(decisions):
                candidates.append((checker.time_ms(decisions), decisions))
                dp_budget_found = dp_budget if dp_budget_found is None else max(dp_budget_found, dp_budget)
                if dp_budget == budget_bytes:
                    break
                low = dp_budget
            else:
                high = dp_budget
        if high - low <= max(1, budget_bytes // resolution):
            break
        dp_budget = (low + high) // 2

    every_block = every_block_decisions(graph, segments)
    if checker.fits(every_block):
        candidates.append((checker.time_ms(every_block), every_block))
    solvers_run = ["every_block"]     # registered solvers whose plans were candidates here
    reruns = [plan for plan in (_chain_plan(graph, budget_bytes, options, offload) for options in
                                (options_per_segment, 1)) if plan is not None] if with_reruns else []
    if with_reruns:
        solvers_run.append("chain")
    found: list[tuple[float, Plan]] = []             # (simulated time, plan); first wins ties
    if candidates:
        _, decisions = min(candidates, key=lambda candidate: candidate[0])   # first wins ties: the DP's
        decisions, restored = _restore(graph, decisions, checker)
        found.append((checker.time_ms(decisions), _finish(
            graph, budget_bytes, decisions,
            {"segments": len(segments), "dp_budget_bytes": dp_budget_found, "restored": restored})))
    if candidates and (graph.transfer.real if offload is None else offload):
        def recompute_decisions(dp_budget_bytes: int) -> dict[str, Decision] | None:
            levels = choose_levels(costs, dp_budget_bytes, resolution)
            return None if levels is None else option_decisions(graph, segments, options, levels)
        found += _offload_candidates(graph, budget_bytes, found[0][1], segments, recompute_decisions)
    found += [(simulate(graph, rerun, check_hash=False).time_ms, rerun) for rerun in reruns]
    if not found or len(graph.ops) <= GREEDY_CANDIDATE_MAX_OPS:
        found += _search_candidates(graph, budget_bytes, checker, segments, as_fallback=not found)
        if len(graph.ops) <= GREEDY_CANDIDATE_MAX_OPS:
            solvers_run.append("greedy")
    plan = min(found, key=lambda item: item[0])[1]
    return replace(plan, options={**plan.options, "solvers_run": solvers_run})


def _search_candidates(graph: Graph, budget_bytes: int, checker: Replays, segments: tuple[Segment, ...],
                       as_fallback: bool) -> list[tuple[float, Plan]]:
    """(simulated time, plan) of ``greedy`` (up to `GREEDY_CANDIDATE_MAX_OPS` ops) and
    `_drop_all_fallback`, labelled as the fallback or as candidates beside the DPs' plans.

    Raises:
        InfeasibleBudgetError: ``as_fallback`` and neither fits, with the lowest peak reached.
    """
    found: list[tuple[float, Plan]] = []
    failures: list[InfeasibleBudgetError] = []
    small = len(graph.ops) <= GREEDY_CANDIDATE_MAX_OPS
    for name in ("greedy", "drop-all") if small else ("drop-all",):
        try:
            plan = _fallback(graph, budget_bytes, checker, segments, name)
        except InfeasibleBudgetError as error:
            failures.append(error)
            continue
        if not as_fallback:
            plan = replace(plan, options={**{k: v for k, v in plan.options.items() if k != "fallback"},
                                          "source": name})
        found.append((simulate(graph, plan, check_hash=False).time_ms, plan))
    if not found and as_fallback:
        raise min(failures, key=lambda error: error.least_feasible_bytes)
    return found


def _offload_candidates(graph: Graph, budget_bytes: int, plan: Plan, segments: tuple[Segment, ...],
                        recompute_decisions) -> list[tuple[float, Plan]]:
    """Plans that offload (`offload_refine`): the DP's with the earliest storages offloaded
    and the DP re-run on the memory that frees, and the DP's plan with recomputations turned
    into offloads where the link hides them, each segment's storages tried as one change."""
    producer_segment = {name: segment.index for segment in segments for name in segment.forward_ops}
    groups: dict[int, list[str]] = {}
    for root, decision in plan.decisions.items():
        if decision is Decision.RECOMPUTE:
            groups.setdefault(producer_segment.get(graph.value(root).producer, -1), []).append(root)
    found = []
    for source, result in (("offload+dp", offload_with_recompute(graph, budget_bytes, recompute_decisions)),
                           ("dp, recompute->offload",
                            refine_with_offload(graph, dict(plan.decisions), budget_bytes, list(groups.values())))):
        if result is None:
            continue
        decisions, time_ms = result
        offloaded = sum(decision is Decision.OFFLOAD for decision in decisions.values())
        made = plan_with_offload(graph, decisions, SOLVER, budget_bytes)
        found.append((time_ms, replace(made, options={**plan.options, **made.options, "offloaded": offloaded,
                                                      "source": source})))
    return found


def _chain_plan(graph: Graph, budget_bytes: int, options_per_segment: int, offload: bool | None = None) -> Plan | None:
    """`chain`'s schedule over the same segments with the same drop options per segment,
    relabelled, or None when it finds none: forward re-runs (Revolve-like) reach budgets
    below every_block's peak, where keeping or dropping storages alone has no plan."""
    try:
        plan = solve_chain(graph, budget_bytes, options_per_segment=options_per_segment, offload=offload)
    except InfeasibleBudgetError:
        return None
    return replace(plan, solver=SOLVER, options={**plan.options, "source": f"chain/{plan.options.get('source')}"})


# -- chain DP ------------------------------------------------------------------------------------

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


# -- check, restore, fallback ------------------------------------------------------------------

RESTORE_REPLAYS = 48   # replays the keep-again pass may spend on storages that might not fit
LOWER_REPLAYS = 128   # replays `_keep_while_peak_falls` may spend lowering the all-dropped peak
LOWER_REPLAY_OPS = 100_000   # ... and ops replayed in all, so that large graphs get fewer trials
DROP_BOUNDARY_ROUNDS = 8   # replays `_drop_all_fallback` may spend dropping boundaries alive at the peak


def _restore(graph: Graph, decisions: dict[str, Decision], checker: Replays) -> tuple[dict[str, Decision], int]:
    """Keep dropped storages again, most recompute time per byte first, while the replayed
    peak fits and the time falls; returns the decisions (which fit if ``decisions`` did)
    and how many storages were kept again.

    A first pass trusts that keeping a storage raises the peak by at most its size and keeps
    it without a replay while the peak plus that size fits; the others get at most
    `RESTORE_REPLAYS` replays. The result is replayed; if the bound failed (the schedule
    builder may order recomputations differently once a storage is kept), a second pass
    replays every trial instead, and if that does not fit either the decisions come back
    unchanged. O(R + RESTORE_REPLAYS) replays' worth of work per pass."""
    def value_of_keeping(root: str) -> float:
        return recompute_time_ms(graph, root) / (graph.value(root).size_bytes + 1)

    dropped = [root for root, decision in decisions.items() if decision is Decision.RECOMPUTE]
    order = sorted(dropped, key=value_of_keeping, reverse=True)
    for trust_size_bound in (True, False):
        restored_decisions, restored = _restore_pass(graph, decisions, checker, order, trust_size_bound)
        if checker.fits(restored_decisions):
            return restored_decisions, restored
    return dict(decisions), 0


def _restore_pass(graph: Graph, decisions: dict[str, Decision], checker: Replays, order: list[str],
                  trust_size_bound: bool) -> tuple[dict[str, Decision], int]:
    """One pass of `_restore` over the dropped storages in ``order``."""
    decisions = dict(decisions)
    peak, current = checker.measure(decisions)
    restored = replays = 0
    for root in order:
        size_bytes = graph.value(root).size_bytes
        decisions[root] = Decision.KEEP
        if trust_size_bound and peak + size_bytes <= checker.budget_bytes:
            peak += size_bytes            # an upper bound if the bound holds; replayed at the end
            restored += 1
            continue
        if replays >= RESTORE_REPLAYS:
            decisions[root] = Decision.RECOMPUTE
            continue
        replays += 1
        trial_peak, trial_time = checker.measure(decisions)
        if trial_peak <= checker.budget_bytes and trial_time < current:
            peak, current = trial_peak, trial_time
            restored += 1
        else:
            decisions[root] = Decision.RECOMPUTE
    return decisions, restored


def _fallback(graph: Graph, budget_bytes: int, checker: Replays, segments: tuple[Segment, ...],
              name: str) -> Plan:
    """``greedy``'s plan (``name="greedy"``) or `_drop_all_fallback`'s (``"drop-all"``),
    relabelled; `InfeasibleBudgetError` with the lowest peak any search reached."""
    num_segments = len(segments)
    boundaries = {root for segment in segments for root in segment.crossing_in}
    try:
        plan = (solve_greedy(graph, budget_bytes) if name == "greedy"
                else _drop_all_fallback(graph, budget_bytes, boundaries))
    except InfeasibleBudgetError as error:
        floor = least_feasible_lower_bound(graph)
        lowest = min(checker.lowest_peak_bytes or error.least_feasible_bytes, error.least_feasible_bytes)
        raise InfeasibleBudgetError(budget_bytes, lowest,
                                    {f"lowest peak over {num_segments} segments": checker.lowest_peak_bytes or 0,
                                     f"{name}'s lowest peak": error.least_feasible_bytes,
                                     "lower bound for any plan": floor.total}, solver=SOLVER) from error
    return replace(plan, solver=SOLVER, options={**plan.options, "segments": num_segments, "fallback": name})


def _drop_all_fallback(graph: Graph, budget_bytes: int, boundaries: set[str]) -> Plan:
    """Near where ``greedy``'s lowest pass ends, in one or two replays instead of O(R): every
    storage greedy may drop is dropped and recomputed (the segment ``boundaries`` kept
    first, so that recomputations stay inside a segment; while that does not fit, the
    boundaries alive at the replay's peak are dropped too, `DROP_BOUNDARY_ROUNDS` rounds at
    most), the values made only on the way to another
    recomputation freed at once and made again when needed (``free_intermediates``, the
    pass that reaches lowest). If it does not fit, `_keep_while_peak_falls` keeps storages
    again where that lowers the peak (a drop can raise it; greedy would undo it). If that
    fits, `_restore` keeps storages again while the time falls.
    O(LOWER_REPLAYS + RESTORE_REPLAYS) replays; not always as low as greedy.

    Raises:
        InfeasibleBudgetError: the all-dropped plan does not fit, with its peak.
    """
    droppable = set(droppable_roots(graph))
    checker = Replays(graph, budget_bytes, free_intermediates=True)
    kept = set(boundaries) & set(droppable)
    for _ in range(DROP_BOUNDARY_ROUNDS + 1):
        decisions = {root: Decision.RECOMPUTE if root in droppable and root not in kept else Decision.KEEP
                     for root in saved_roots(graph)}
        plan = plan_from_decisions(graph, decisions, SOLVER, budget_bytes, free_intermediates=True)
        result = simulate(graph, plan, check_hash=False)
        if result.peak_bytes <= budget_bytes or not kept:
            break
        at_peak = live_roots_at(graph, plan, result.peak_phase, result.peak_step_index) & kept
        kept -= at_peak or kept                  # none of them at the peak: drop them all
    if result.peak_bytes > budget_bytes:
        decisions, peak_bytes = _keep_while_peak_falls(graph, decisions, checker)
        if peak_bytes > budget_bytes:
            raise InfeasibleBudgetError(budget_bytes, peak_bytes,
                                        {"every droppable storage recomputed": result.peak_bytes,
                                         "then kept again where the peak fell": peak_bytes}, solver=SOLVER)
    decisions, restored = _restore(graph, decisions, checker)
    plan = plan_from_decisions(graph, decisions, SOLVER, budget_bytes, free_intermediates=True)
    return replace(plan, options={**plan.options, "restored": restored})


def _keep_while_peak_falls(graph: Graph, decisions: dict[str, Decision],
                           checker: Replays) -> tuple[dict[str, Decision], int]:
    """Keep dropped storages again, one trial replay each, where that lowers the replayed
    peak, until it fits: recomputing everything is not the lowest point when a
    recomputation makes large values beside a small one, or runs a long chain where much
    is alive (greedy keeps such storages). Most recompute time per byte first; at most
    `LOWER_REPLAYS` trials, fewer on large graphs (`LOWER_REPLAY_OPS` ops replayed in all:
    a replay of a 2,849-op graph takes over a second). Returns the decisions and their
    peak. O(min(LOWER_REPLAYS, LOWER_REPLAY_OPS / ops)) replays."""
    decisions = dict(decisions)
    peak_bytes = checker.measure(decisions)[0]
    dropped = [root for root, decision in decisions.items() if decision is Decision.RECOMPUTE]
    dropped.sort(key=lambda root: recompute_time_ms(graph, root) / (graph.value(root).size_bytes + 1), reverse=True)
    trials = min(LOWER_REPLAYS, max(1, LOWER_REPLAY_OPS // max(1, len(graph.ops))))
    for root in dropped[:trials]:
        if peak_bytes <= checker.budget_bytes:
            break
        decisions[root] = Decision.KEEP
        trial_peak_bytes = checker.measure(decisions)[0]
        if trial_peak_bytes < peak_bytes:
            peak_bytes = trial_peak_bytes
        else:
            decisions[root] = Decision.RECOMPUTE
    return decisions, peak_bytes


def _finish(graph: Graph, budget_bytes: int, decisions: dict[str, Decision], options: dict,
            optimal: bool = False) -> Plan:
    plan = plan_from_decisions(graph, decisions, SOLVER, budget_bytes, optimal=optimal)
    return replace(plan, options={**plan.options, **options})
