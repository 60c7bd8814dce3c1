"""One signature, one registry: ``solve(graph, budget_bytes, solver=..., **options) -> Plan``.

Every solver returns a plan whose predictions come from `simulate` (never from the
solver's own model), and whose peak fits the budget; otherwise it raises
`InfeasibleBudgetError`. Solvers never mutate the graph.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import replace
from typing import Callable, Mapping, Protocol

from solvers.errors import InfeasibleBudgetError, OptionError, SolverUnavailableError
from solvers.graph import Graph
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.plan import Plan
from solvers.simulate import simulate

log = logging.getLogger(__name__)


class Solver(Protocol):
    def __call__(self, graph: Graph, budget_bytes: int, **options: object) -> Plan: ...


_SOLVERS: dict[str, Solver] = {}


def register(name: str) -> Callable[[Solver], Solver]:
    def add(solver: Solver) -> Solver:
        if name in _SOLVERS:
            raise OptionError(f"register: a solver named {name!r} is registered already; register yours under "
                              f"another name (taken: {', '.join(available_solvers())})")
        _SOLVERS[name] = solver
        return solver
    return add


def available_solvers() -> tuple[str, ...]:
    return tuple(sorted(_SOLVERS))


# What ``solver="auto"`` tries, in order; the fastest plan that fits wins (ties: first).
AUTO_CANDIDATES = ("hierarchical", "chain", "greedy", "every_block", "sqrt_n")
# Above this many ops a solver is tried only when the others found nothing: greedy's
# O(R) full replays take ~1 s at 260 ops, ~3 s at 480, ~25 s at 1,400 and minutes beyond,
# and above 900 ops `hierarchical` beat it at every size measured
# (experiments/results/solver_scaling.json).
AUTO_MAX_OPS = {"greedy": 600}
# Above this many ops a solver is never tried, even when nothing else fits: greedy took
# over 8 minutes on Llama-style 12 x 768 (2,849 ops) below the other solvers' floor, to
# refuse the budget the lower bound already came within 0.2 % of.
AUTO_NEVER_ABOVE_OPS = {"greedy": 1500}
# Up to this many ops `auto` then runs `ilp` for AUTO_EXACT_TIME_S more seconds, started from
# the heuristics' plans (at 217 ops: U-Net at 50 %, +24.8 % -> +16.6 % predicted).
AUTO_EXACT_MAX_OPS = 250
AUTO_EXACT_TIME_S = 3.0


def _solve_auto(graph: Graph, budget_bytes: int, **options: object) -> Plan:
    """Run the registered candidates and keep the plan with the least simulated time (on
    graphs of up to `AUTO_EXACT_MAX_OPS` ops, then `_refine_with_ilp`); when none fits,
    raise the `InfeasibleBudgetError` with the smallest least-feasible budget. A candidate
    whose plan lists, in ``options["solvers_run"]``, solvers it already ran as candidates of
    its own (``hierarchical`` runs chain, every_block and, on small graphs, greedy) saves
    auto from running them again; a plan proved optimal (keep-all fits) ends the search."""
    best: tuple[float, Plan] | None = None
    failures: list[InfeasibleBudgetError] = []
    plans_found: list[Plan] = []
    registered = [name for name in AUTO_CANDIDATES if name in _SOLVERS]
    first = [name for name in registered if len(graph.ops) <= AUTO_MAX_OPS.get(name, len(graph.ops))]
    tried: list[str] = []
    covered: set[str] = set()
    fallback = [name for name in registered if name not in first
                and len(graph.ops) <= AUTO_NEVER_ABOVE_OPS.get(name, len(graph.ops))]
    for group in (first, fallback):
        if best is not None:
            break
        for name in group:
            if name in covered:
                continue
            tried.append(name)
            try:
                plan = _SOLVERS[name](graph, budget_bytes, **options)
            except InfeasibleBudgetError as error:
                failures.append(error)
                continue
            covered.update(registered if plan.optimal else plan.options.get("solvers_run", ()))
            result = simulate(graph, plan)
            if result.peak_bytes <= budget_bytes:
                plans_found.append(plan)
                if best is None or result.time_ms < best[0]:
                    best = (result.time_ms, plan)
    if best is None:
        raise min(failures, key=lambda error: error.least_feasible_bytes)
    if ("ilp" in _SOLVERS and len(graph.ops) <= AUTO_EXACT_MAX_OPS and best[0] > graph.total_time_ms
            and "offload" not in options):
        best = _refine_with_ilp(graph, budget_bytes, best, plans_found, tried)
    return replace(best[1], options={**best[1].options, "auto_tried": tried})


def _refine_with_ilp(graph: Graph, budget_bytes: int, best: tuple[float, Plan], plans_found: list[Plan],
                     tried: list[str]) -> tuple[float, Plan]:
    """`ilp` for `AUTO_EXACT_TIME_S`, started from the plans the heuristics found; its plan
    replaces ``best`` when it is faster. Its space (forward once, recomputation inside each
    backward stage) lacks the heuristics' forward re-runs, so it often is not; where it is
    (the U-Net's skip tensors, which the DPs always keep), by a lot."""
    tried.append("ilp")
    try:
        plan = _SOLVERS["ilp"](graph, budget_bytes, time_limit_s=AUTO_EXACT_TIME_S, starts=plans_found)
    except (InfeasibleBudgetError, SolverUnavailableError) as error:
        log.info("auto: ilp found no better plan: %s", str(error).splitlines()[0])
        return best
    result = simulate(graph, plan)
    if result.peak_bytes > budget_bytes:        # generator states the MILP does not count
        log.info("auto: ilp's plan peaks %d bytes over the budget; keeping %s's", result.peak_bytes - budget_bytes,
                 best[1].solver)
        return best
    return (result.time_ms, plan) if result.time_ms < best[0] else best


def _check_options(solver: str, options: Mapping[str, object]) -> None:
    """`OptionError` unless the named solver takes every option (``auto``: every candidate)."""
    candidates = [name for name in AUTO_CANDIDATES if name in _SOLVERS] if solver == "auto" else [solver]
    for name in candidates:
        parameters = list(inspect.signature(_SOLVERS[name]).parameters.values())[2:]
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


def solve(graph: Graph, budget_bytes: int, solver: str = "auto", **options: object) -> Plan:
    """Plan ``graph`` under ``budget_bytes`` with the named solver; predictions filled in
    by `simulate`. Raises `InfeasibleBudgetError` (budget too small),
    `SolverUnavailableError` (unknown name) or `OptionError` (an option the solver does not take)."""
    if solver != "auto" and solver not in _SOLVERS:
        raise SolverUnavailableError(f"no solver named {solver!r}; choose auto or one of "
                                     f"{', '.join(available_solvers())}")
    _check_options(solver, options)
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
        plan = _solve_auto(graph, target_bytes, **options) if solver == "auto" else _SOLVERS[solver](
            graph, target_bytes, **options)
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
