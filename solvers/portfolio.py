"""The portfolio: which algorithms run, with which limits and starts, and which plan wins; and `solve`.

The algorithms (`baselines`, `checkpoint_baselines`, `chain`, `hierarchical`,
`brute_force`, `ilp`, `offload_refine`) each search one space and know nothing of each
other; every composition of them is made here, and every limit on one of them is set here,
once. The registered solvers:

``none``, ``greedy``, ``every_block``, ``sqrt_n``, ``brute_force``
    the algorithms as they are (`baselines`: Checkmate's greedy baseline, Jain et al.,
    MLSys 2020; `checkpoint_baselines`: Chen et al. 2016; `brute_force`: exact).
``chain``
    Rotor's DP (Beaumont et al. 2019, offload after Beaumont et al. 2021; Revolve,
    Griewank & Walther 2000, on uniform chains) seeded with ``every_block``'s decisions, so
    it is never slower than ``every_block`` where that fits.
``hierarchical``
    the segment-option DP (Rockmate, Zhao et al. 2023; HiRemate, Gusak et al. 2025), seeded
    with ``every_block``'s decisions, and as more candidates: with a real host link, its
    plan refined with offloads (`offload_refine`: the earliest storages offloaded and the DP
    re-run on the memory freed, and recomputations turned into offloads); ``chain``'s plans
    over the same segments with and without the same drop options per stage, in finer
    memory units where the default ones leave it a few short (forward re-runs reach
    budgets below every option's; MONeT, Shah et al. 2021, joins the two
    levels in one ILP instead); up to `GREEDY_MAX_OPS` ops ``greedy`` (which may drop any
    storage, a segment boundary too: on graphs of few, large segments what the optimum
    does) and `hierarchical.drop_all_plan`; above, the latter only when nothing else fits.
    The plan says which registered solvers it ran (``options["solvers_run"]``), and which
    ones ``auto`` need not run beside it (``options["solvers_covered"]``: those, and
    ``greedy`` where drop-all's fallback made it unnecessary).
``ilp``
    Checkmate's MILP, started (`best_start`) from the fastest plan of `START_SOLVERS` once
    converted into its space (or from the plans the caller passes as ``starts``).
``auto`` (`solve_auto`)
    `AUTO_CANDIDATES` in order, skipping what an earlier candidate already ran, and the
    fastest plan that fits; on graphs of up to `AUTO_EXACT_MAX_OPS` ops then ``ilp`` for
    `AUTO_EXACT_TIME_S` seconds started from those plans.

In every race the fastest simulated plan wins and the first found wins ties. `solve` is
the front door: it checks the options and the lower bound, runs the named solver (or
``auto``), re-aims below the budget by what the generator states add, and fills the plan's
predictions from `simulate`. No composition is optimal; ``brute_force`` and ``ilp`` (when
it proves its gap 0) are, over their space. Cost: the sum of the candidates' costs (their
modules' docstrings), about a second per candidate at a few hundred ops.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import replace
from typing import Iterator, Mapping, Sequence

from solvers.baselines import solve_greedy, solve_none
from solvers.brute_force import solve_brute_force
from solvers.chain import solve_chain_dp
from solvers.checkpoint_baselines import solve_every_block, solve_sqrt_n
from solvers.errors import InfeasibleBudgetError, OptionError, SolverUnavailableError, UnsupportedGraphError
from solvers.graph import Graph, Phase
from solvers.hierarchical import SOLVER as HIERARCHICAL, OptionDP, drop_all_plan, option_dp
from solvers.ilp import solve_milp
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.kernel.program import plan_with_offload
from solvers.kernel.recompute import Seed, every_block_decisions
from solvers.kernel.space import PlanSpace, SpaceStart, start_runs
from solvers.offload_refine import offload_with_recompute, refine_with_offload
from solvers.plan import FALLBACK_OPTION, Decision, Plan
from solvers.registry import register, registered_solver
from solvers.simulate import simulate

log = logging.getLogger(__name__)

# -- limits ----------------------------------------------------------------------------------------

# ``greedy`` replays the whole step once per saved storage it tries (O(R) replays): about a
# second at 260 ops, 2-3 s at 480, 14-25 s at 1,400 and minutes beyond
# (experiments/results/solver_scaling.json). Up to GREEDY_MAX_OPS ops it is a candidate
# wherever one runs (`auto`'s first round, `hierarchical`, `ilp`'s starts): on the 4-block
# GPT (483 ops) at every_block's peak its plan, which may drop a block input that is cheap
# to remake, can be the fastest; above 900 ops `hierarchical` beat it at every size measured.
GREEDY_MAX_OPS = 600
# Up to GREEDY_FALLBACK_MAX_OPS ops `auto` still runs it when nothing else fits; above, never:
# on Llama-style 12 x 768 (2,849 ops) it took over 8 minutes below the other solvers' floor,
# to refuse the budget the lower bound already came within 0.2 % of.
GREEDY_FALLBACK_MAX_OPS = 1500
# Where no DP plan fits (`hierarchical`'s fallback), above this many ops ``greedy`` runs only
# if ``drop-all`` finds no plan: there ``drop-all``'s plan was the faster at each of 9
# budgets from the floor to 1.25x on the zoo GPT small and ResNet small (547-555 ops,
# compiled costs; by 6-20 % at the floor), and ``greedy`` took 1.0-1.3 s of a 1.9-2.4 s
# solve. On a 12-segment uniform chain (a few dozen ops) greedy's was 2 % faster, for
# milliseconds.
GREEDY_AFTER_DROP_ALL_MAX_OPS = 300
# What ``solver="auto"`` tries, in order; the fastest plan that fits wins (ties: first).
AUTO_CANDIDATES = ("hierarchical", "chain", "greedy", "every_block", "sqrt_n")
# Up to this many ops `auto` then runs `ilp` for AUTO_EXACT_TIME_S more seconds, started from
# the heuristics' plans (at 217 ops: U-Net at 50 %, +24.8 % -> +16.6 % predicted).
AUTO_EXACT_MAX_OPS = 250
AUTO_EXACT_TIME_S = 3.0
# Heuristics whose plans are converted into `ilp`'s start, in the order tried (the first wins ties).
START_SOLVERS = ("hierarchical", "greedy", "every_block", "chain")
# Solvers that take a warm start (``start=``: the decisions of the previous shape's plan).
WARM_STARTED = ("hierarchical", "greedy")
# `hierarchical`'s chain re-runs use ``chain``'s default resolution (200 memory units); where
# that finds no plan but its lowest peak is within CHAIN_FINE_RETRY_MARGIN of the budget,
# the DP runs again in CHAIN_FINE_RESOLUTION units: each stage's sizes round up by at most
# one unit, so a plan a few units over may fit in finer ones. On ResNet-50 (H100 estimate,
# no offload) at 1.045x its floor: 290.0 MiB over 288.8 MiB in 200 units, 287.7 MiB at
# +41.5 % in 1,000 (the fallback was drop-all at +90.9 %); the finer DP takes 0.6-1.1 s on
# the real_models graphs, twice the coarse one.
CHAIN_FINE_RESOLUTION = 1000
CHAIN_FINE_RETRY_MARGIN = 0.05
# ``torch.utils.checkpoint`` on every segment: a candidate of both segment DPs.
EVERY_BLOCK: Seed = ("every_block", every_block_decisions)


def runs_on(name: str, graph: Graph, *, fallback: bool = False) -> bool:
    """Whether solver ``name`` runs as a candidate on ``graph``: ``greedy`` up to
    `GREEDY_MAX_OPS` ops, or (``fallback``: nothing else fits) `GREEDY_FALLBACK_MAX_OPS`;
    every other solver always."""
    if name != "greedy":
        return True
    return len(graph.ops) <= (GREEDY_FALLBACK_MAX_OPS if fallback else GREEDY_MAX_OPS)


# -- chain -----------------------------------------------------------------------------------------

def solve_chain(graph: Graph, budget_bytes: int, *, resolution: int = 200, max_bisections: int = 10,
                offload: bool | None = None, every_op: bool = False, options_per_segment: int | None = None) -> Plan:
    """`chain.solve_chain_dp` (options there) with ``every_block``'s decisions as one more candidate.

    Raises:
        InfeasibleBudgetError: neither the DP's plans nor ``every_block`` fit.
        OptionError: ``resolution < 1``.
    """
    return solve_chain_dp(graph, budget_bytes, resolution=resolution, max_bisections=max_bisections,
                          offload=offload, every_op=every_op, options_per_segment=options_per_segment,
                          seeds=(EVERY_BLOCK,))


# -- hierarchical ----------------------------------------------------------------------------------

def solve_hierarchical(graph: Graph, budget_bytes: int, *, options_per_segment: int = 8,
                       resolution: int = 2000, max_bisections: int = 12, with_reruns: bool = True,
                       offload: bool | None = None, start: Mapping[str, Decision] | None = None) -> Plan:
    """Least-time plan among `hierarchical.option_dp`'s (seeded with ``every_block``) and the
    candidates of the module docstring; not optimal. With ``with_reruns``, `chain`'s Rotor
    schedules over the same segments are candidates. With ``offload`` (default: the graph's
    host link is real, `Transfer.real`), the DP's plan refined with offloads is too.
    ``start`` (decisions of a plan for a similar graph) warm-starts ``greedy``. The other
    candidates that fit are the plan's ``runners_up``, fastest first.

    Raises:
        InfeasibleBudgetError: neither the DP's plans nor the fallbacks fit the budget
            (its ``solvers_run`` names ``greedy`` where greedy ran as one and found none).
        OptionError: ``options_per_segment < 2`` or ``resolution < 1``.
    """
    dp = option_dp(graph, budget_bytes, options_per_segment=options_per_segment, resolution=resolution,
                   max_bisections=max_bisections, seeds=(EVERY_BLOCK,))
    if dp.optimal:                                   # keep-all fits: nothing else runs
        return dp.plan
    solvers_run = [EVERY_BLOCK[0]]                   # registered solvers whose plans were candidates here
    reruns = [plan for plan in (_chain_rerun(graph, budget_bytes, options, offload) for options in
                                (options_per_segment, 1)) if plan is not None] if with_reruns else []
    if with_reruns:
        solvers_run.append("chain")
    found: list[tuple[float, Plan]] = []             # (simulated time, plan); first wins ties
    if dp.plan is not None:
        found.append((dp.time_ms, dp.plan))
        if graph.transfer.real if offload is None else offload:
            found += _offload_candidates(graph, budget_bytes, dp)
    found += [(simulate(graph, rerun, check_hash=False).time_ms, rerun) for rerun in reruns]
    with_greedy = runs_on("greedy", graph)
    solvers_covered = list(solvers_run)              # ... and those whose plans need not be made
    if not found or with_greedy:
        try:
            searched, ran = _search_candidates(graph, budget_bytes, dp, as_fallback=not found, start=start)
        except InfeasibleBudgetError as error:         # nothing fits: greedy, run as auto runs it, neither
            error.solvers_run = ("greedy",) if with_greedy else ()
            raise
        if with_greedy:     # as the fallback, where drop-all's plan fit, greedy is not needed
            solvers_covered.append("greedy")
        if "greedy" in ran:
            solvers_run.append("greedy")
        found += searched
    found.sort(key=lambda item: item[0])             # stable: the first found wins ties
    plan = found[0][1]
    return replace(plan, options={**plan.options, "solvers_run": solvers_run, "solvers_covered": solvers_covered},
                   runners_up=tuple(other for _, other in found[1:]))


def _chain_rerun(graph: Graph, budget_bytes: int, options_per_segment: int, offload: bool | None) -> Plan | None:
    """`chain`'s schedule over the same segments with the same drop options per segment,
    relabelled, or None when it finds none: forward re-runs (Revolve-like) reach budgets
    below every_block's peak, where keeping or dropping storages alone has no plan. Where
    the default resolution finds none by a little, it tries `CHAIN_FINE_RESOLUTION`."""
    try:
        plan = solve_chain(graph, budget_bytes, options_per_segment=options_per_segment, offload=offload)
    except InfeasibleBudgetError as coarse:
        if coarse.least_feasible_bytes > budget_bytes * (1 + CHAIN_FINE_RETRY_MARGIN):
            return None
        try:
            plan = solve_chain(graph, budget_bytes, options_per_segment=options_per_segment, offload=offload,
                               resolution=CHAIN_FINE_RESOLUTION)
        except InfeasibleBudgetError:
            return None
    return replace(plan, solver=HIERARCHICAL, options={**plan.options, "source": f"chain/{plan.options.get('source')}"})


def _offload_candidates(graph: Graph, budget_bytes: int, dp: OptionDP) -> list[tuple[float, Plan]]:
    """Plans that offload (`offload_refine`): the DP's with the earliest storages offloaded
    and the DP re-run on the memory that frees, and the DP's plan with recomputations turned
    into offloads where the link hides them, each segment's storages tried as one change."""
    plan = dp.plan
    producer_segment = {name: segment.index for segment in dp.segments for name in segment.forward_ops}
    groups: dict[int, list[str]] = {}
    for root, decision in plan.decisions.items():
        if decision is Decision.RECOMPUTE:
            groups.setdefault(producer_segment.get(graph.value(root).producer, -1), []).append(root)
    found = []
    for source, result in (("offload+dp", offload_with_recompute(graph, budget_bytes, dp.decisions_at)),
                           ("dp, recompute->offload",
                            refine_with_offload(graph, dict(plan.decisions), budget_bytes, list(groups.values())))):
        if result is None:
            continue
        decisions, time_ms = result
        offloaded = sum(decision is Decision.OFFLOAD for decision in decisions.values())
        made = plan_with_offload(graph, decisions, HIERARCHICAL, budget_bytes)
        found.append((time_ms, replace(made, options={**plan.options, **made.options, "offloaded": offloaded,
                                                      "source": source})))
    return found


def _search_candidates(graph: Graph, budget_bytes: int, dp: OptionDP, as_fallback: bool,
                       start: Mapping[str, Decision] | None = None) -> tuple[list[tuple[float, Plan]], list[str]]:
    """(simulated time, plan) of ``greedy`` (up to `GREEDY_MAX_OPS` ops) and
    `hierarchical.drop_all_plan`, labelled as the fallback or as candidates beside the DPs'
    plans, and the names of the two that ran. As the fallback on graphs of more than
    `GREEDY_AFTER_DROP_ALL_MAX_OPS` ops, ``greedy`` runs only where ``drop-all`` finds no plan.

    Raises:
        InfeasibleBudgetError: ``as_fallback`` and neither fits, with the lowest peak reached.
    """
    found: list[tuple[float, Plan]] = []
    failures: list[InfeasibleBudgetError] = []
    ran: list[str] = []
    names = ("greedy", "drop-all") if runs_on("greedy", graph) else ("drop-all",)
    only_if_needed = as_fallback and len(graph.ops) > GREEDY_AFTER_DROP_ALL_MAX_OPS
    for name in reversed(names) if only_if_needed else names:
        if found and only_if_needed:
            break
        ran.append(name)
        try:
            plan = _fallback(graph, budget_bytes, dp, name, start)
        except InfeasibleBudgetError as error:
            failures.append(error)
            continue
        if not as_fallback:
            plan = replace(plan, options={**{k: v for k, v in plan.options.items() if k != FALLBACK_OPTION},
                                          "source": name})
        found.append((simulate(graph, plan, check_hash=False).time_ms, plan))
    if not found and as_fallback:
        raise min(failures, key=lambda error: error.least_feasible_bytes)
    return found, ran


def _fallback(graph: Graph, budget_bytes: int, dp: OptionDP, name: str,
              start: Mapping[str, Decision] | None = None) -> Plan:
    """``greedy``'s plan (``name="greedy"``) or `hierarchical.drop_all_plan`'s (``"drop-all"``),
    relabelled; `InfeasibleBudgetError` with the lowest peak any search reached."""
    num_segments = len(dp.segments)
    lowest_dp_bytes = dp.replays.lowest_peak_bytes
    try:
        plan = solve_greedy(graph, budget_bytes, start=start) if name == "greedy" else \
            drop_all_plan(graph, budget_bytes, dp.segments)
    except InfeasibleBudgetError as error:
        floor = least_feasible_lower_bound(graph)
        lowest = min(lowest_dp_bytes or error.least_feasible_bytes, error.least_feasible_bytes)
        raise InfeasibleBudgetError(budget_bytes, lowest,
                                    {f"lowest peak over {num_segments} segments": lowest_dp_bytes or 0,
                                     f"{name}'s lowest peak": error.least_feasible_bytes,
                                     "lower bound for any plan": floor.total}, solver=HIERARCHICAL) from error
    return replace(plan, solver=HIERARCHICAL, options={**plan.options, "segments": num_segments, FALLBACK_OPTION: name})


# -- ilp -------------------------------------------------------------------------------------------

def solve_ilp(graph: Graph, budget_bytes: int, *, time_limit_s: float = 60.0, backend: str = "auto",
              rel_gap: float = 0.0, warm_start: bool = True, offload: bool | None = None,
              starts: Sequence[Plan] | None = None) -> Plan:
    """`ilp.solve_milp` (options and guarantees there) started, with ``warm_start``, from
    `best_start`: the plans of `START_SOLVERS`, or ``starts`` (plans the caller already has,
    converted instead of solving again); under a second per heuristic at a few hundred ops.

    Raises:
        InfeasibleBudgetError: no plan of the MILP's space fits.
        SolverUnavailableError: no MILP backend, or neither the MILP within the time limit
            nor a start found a plan.
    """
    def start_from(space: PlanSpace) -> SpaceStart | None:
        return best_start(graph, int(budget_bytes), space, starts)

    return solve_milp(graph, budget_bytes, time_limit_s=time_limit_s, backend=backend, rel_gap=rel_gap,
                      offload=offload, start_from=start_from if warm_start else None)


def best_start(graph: Graph, budget_bytes: int, space: PlanSpace,
               starts: Sequence[Plan] | None = None) -> SpaceStart | None:
    """The fastest start (least simulated time; ties: the earlier solver) that
    `kernel.space.start_runs` converts, with and without ``carry``, from the plans of
    `START_SOLVERS` that fit ``budget_bytes`` (``greedy`` only up to `GREEDY_MAX_OPS` ops),
    or from ``starts``; None if none does. Each distinct drop set is converted once, and
    the search stops at a start that recomputes nothing."""
    def plans() -> Iterator[tuple[str, Plan]]:
        if starts is not None:
            yield from ((plan.solver, plan) for plan in starts)
            return
        for name in START_SOLVERS:
            if not runs_on(name, graph):
                continue
            try:
                yield name, solve(graph, budget_bytes, name)
            except (InfeasibleBudgetError, UnsupportedGraphError) as error:
                log.debug("ilp: no start from %s: %s", name, error)

    best: SpaceStart | None = None
    converted: set[frozenset[str]] = set()
    droppable = set(space.droppable_roots)
    for name, plan in plans():
        if best is not None and best.recompute_ms == 0:
            break                                # recomputes nothing: no start is faster
        dropped = frozenset(root for root, decision in plan.decisions.items()
                            if decision is not Decision.KEEP and root in droppable)
        if dropped in converted:
            continue
        converted.add(dropped)
        for carry in (True, False):
            found = start_runs(graph, budget_bytes, space, plan.decisions, carry)
            if found is None:
                log.debug("ilp: %s's plan (carry=%s) does not fit once converted into the MILP's space",
                          name, carry)
                continue
            keep, runs, time_ms = found
            if best is None or time_ms < best.time_ms:
                recompute_ms = sum(graph.op(op_name).time_ms for op_name in runs
                                   if graph.op(op_name).phase is Phase.FORWARD)
                best = SpaceStart(name, keep, tuple(runs), time_ms, recompute_ms)
    return best


# -- auto ------------------------------------------------------------------------------------------

def solve_auto(graph: Graph, budget_bytes: int, *, start: Mapping[str, Decision] | None = None,
               **options: object) -> Plan:
    """Run `AUTO_CANDIDATES` and keep the plan with the least simulated time (on graphs of
    up to `AUTO_EXACT_MAX_OPS` ops, then `_refine_with_ilp`); when none fits, raise the
    `InfeasibleBudgetError` with the smallest least-feasible budget. A candidate whose plan
    lists, in ``options["solvers_run"]``, solvers it already ran as candidates of its own
    (``hierarchical`` runs chain, every_block and, on small graphs, greedy) saves auto from
    running them again, as does a refusal's ``solvers_run`` (``hierarchical`` refuses after
    ``greedy`` refused); a plan proved optimal (keep-all fits) ends the search. ``greedy``
    runs in the first round up to `GREEDY_MAX_OPS` ops, and in a second round, only when
    nothing fit, up to `GREEDY_FALLBACK_MAX_OPS`. ``start`` (a similar graph's decisions:
    the previous input shape's plan) warm-starts the candidates that take one (`WARM_STARTED`),
    and leaves out the ``ilp`` refinement: a new shape in a training loop is planned in
    about a second, not the tens of seconds the first plan may take. The plan's
    ``runners_up`` are the other plans found that fit (the candidates' and those the
    candidates found), one per schedule, in the order found; their predictions are not
    filled in."""
    best: tuple[float, Plan] | None = None
    failures: list[InfeasibleBudgetError] = []
    plans_found: list[Plan] = []
    runners_up: list[Plan] = []                      # every plan found that fits
    first = [name for name in AUTO_CANDIDATES if runs_on(name, graph)]
    tried: list[str] = []
    covered: set[str] = set()
    fallback = [name for name in AUTO_CANDIDATES if name not in first and runs_on(name, graph, fallback=True)]
    for group in (first, fallback):
        if best is not None:
            break
        for name in group:
            if name in covered:
                continue
            tried.append(name)
            try:
                warm = {"start": start} if start is not None and name in WARM_STARTED else {}
                plan = registered_solver(name)(graph, budget_bytes, **options, **warm)
            except InfeasibleBudgetError as error:
                failures.append(error)
                covered.update(error.solvers_run)      # refused there too (greedy, inside hierarchical)
                continue
            covered.update(AUTO_CANDIDATES if plan.optimal else
                           plan.options.get("solvers_covered", plan.options.get("solvers_run", ())))
            result = simulate(graph, plan)
            if result.peak_bytes <= budget_bytes:
                plans_found.append(plan)
                if best is None or result.time_ms < best[0]:
                    best = (result.time_ms, plan)
                runners_up += [replace(plan, runners_up=()), *plan.runners_up]
    if best is None:
        raise min(failures, key=lambda error: error.least_feasible_bytes)
    if len(graph.ops) <= AUTO_EXACT_MAX_OPS and best[0] > graph.total_time_ms and "offload" not in options \
            and start is None:
        best = _refine_with_ilp(graph, budget_bytes, best, plans_found, tried)
    others: dict[tuple, Plan] = {}                   # one per schedule, the best's left out
    for plan in runners_up:
        others.setdefault((plan.forward, plan.backward), plan)
    others.pop((best[1].forward, best[1].backward), None)
    return replace(best[1], options={**best[1].options, "auto_tried": tried}, runners_up=tuple(others.values()))


def _refine_with_ilp(graph: Graph, budget_bytes: int, best: tuple[float, Plan], plans_found: list[Plan],
                     tried: list[str]) -> tuple[float, Plan]:
    """`ilp` for `AUTO_EXACT_TIME_S`, started from the plans the heuristics found; its plan
    replaces ``best`` when it is faster. Its space (forward once, recomputation inside each
    backward stage) lacks the heuristics' forward re-runs, so it often is not; where it is
    (the U-Net's skip tensors, which the DPs always keep), by a lot."""
    tried.append("ilp")
    try:
        plan = solve_ilp(graph, budget_bytes, time_limit_s=AUTO_EXACT_TIME_S, starts=plans_found)
    except (InfeasibleBudgetError, SolverUnavailableError) as error:
        log.info("auto: ilp found no better plan: %s", str(error).splitlines()[0])
        return best
    result = simulate(graph, plan)
    if result.peak_bytes > budget_bytes:        # generator states the MILP does not count
        log.info("auto: ilp's plan peaks %d bytes over the budget; keeping %s's", result.peak_bytes - budget_bytes,
                 best[1].solver)
        return best
    return (result.time_ms, plan) if result.time_ms < best[0] else best


# -- the front door --------------------------------------------------------------------------------

def _check_options(solver: str, options: Mapping[str, object]) -> None:
    """`OptionError` unless the named solver takes every option (``auto``: every candidate)."""
    candidates = list(AUTO_CANDIDATES) if solver == "auto" else [solver]
    for name in candidates:
        parameters = list(inspect.signature(registered_solver(name)).parameters.values())[2:]
        if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
            continue
        unknown = sorted(set(options) - {parameter.name for parameter in parameters})
        if not unknown:
            continue
        takes = ", ".join(parameter.name for parameter in parameters) or "no options"
        where = (f"solver='auto' hands its options to every candidate ({', '.join(candidates)}), and {name!r}"
                 if solver == "auto" else f"solver {name!r}")
        raise OptionError(f"{where} takes no option {', '.join(map(repr, unknown))} (it takes {takes}); "
                          "name a solver that takes it, or drop it from the options (solver_options= in optimize)")


def solve(graph: Graph, budget_bytes: int, solver: str = "auto", *, start: Mapping[str, Decision] | None = None,
          **options: object) -> Plan:
    """Plan ``graph`` under ``budget_bytes`` with the named solver; predictions filled in
    by `simulate`. ``start``: decisions (root name -> `Decision`) of a plan for a similar
    graph, which ``auto`` and the solvers in `WARM_STARTED` begin from; others ignore it. Raises `InfeasibleBudgetError` (budget too small),
    `SolverUnavailableError` (unknown name) or `OptionError` (an option the solver does not take)."""
    run = solve_auto if solver == "auto" else registered_solver(solver)
    _check_options(solver, options)
    if start is not None and (solver == "auto" or solver in WARM_STARTED):
        options = {**options, "start": dict(start)}
    try:
        budget_bytes = int(budget_bytes)
    except (TypeError, ValueError):
        raise OptionError(f"solve: budget_bytes={budget_bytes!r} is not a number of bytes; pass an int, or read "
                          "a size such as '6GiB' with planner.parse_budget") from None
    floor = least_feasible_lower_bound(graph)
    if budget_bytes < floor.total:
        raise InfeasibleBudgetError(budget_bytes, floor.total, floor.breakdown, solver="lower bound, any solver")
    started = time.perf_counter()
    target_bytes = budget_bytes
    for _ in range(4):
        plan = run(graph, target_bytes, **options)
        result = simulate(graph, plan)
        # the solvers' own memory models leave out the generator states saved for replays
        # (Graph.rng_state_bytes, a few KiB on CPU): aim lower by what they added
        excess_bytes = result.peak_bytes - budget_bytes
        if excess_bytes <= 0 or not graph.rng_state_bytes or excess_bytes > 64 * graph.rng_state_bytes:
            break
        target_bytes -= excess_bytes
    name = plan.solver
    elapsed_s = time.perf_counter() - started
    if result.peak_bytes > budget_bytes:
        raise AssertionError(f"solver {name!r} returned a plan with simulated peak {result.peak_bytes} "
                             f"> budget {budget_bytes}: a solver bug")
    log.info("solver %s: peak %d / budget %d bytes, time %.3f ms, solved in %.2f s",
             name, result.peak_bytes, budget_bytes, result.time_ms, elapsed_s)
    return replace(plan, predicted_peak_bytes=result.peak_bytes, predicted_time_ms=result.time_ms,
                   baseline_time_ms=graph.total_time_ms, solve_time_s=elapsed_s, budget_bytes=budget_bytes,
                   graph=graph)


for _name, _solver in (("none", solve_none), ("greedy", solve_greedy), ("every_block", solve_every_block),
                       ("sqrt_n", solve_sqrt_n), ("chain", solve_chain), ("hierarchical", solve_hierarchical),
                       ("brute_force", solve_brute_force), ("ilp", solve_ilp)):
    register(_name)(_solver)
