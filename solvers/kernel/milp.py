"""The MILP backend every MILP of the solvers runs on: HiGHS through highspy (``auto`` or
``highs``), else pulp's bundled CBC (``auto`` or ``cbc``), one thread, silent."""

from __future__ import annotations

import functools
import math
from typing import Any

from solvers.errors import SolverUnavailableError
from solvers.quiet import native_output_silenced


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS writes its banner ("Running HiGHS ... Copyright ... licence terms") from C++ straight
    to stdout when the process makes its first ``Highs``, before pulp can turn ``output_flag``
    off, and never again: make that first one here with stdout silenced, once per process."""
    import highspy

    with native_output_silenced(1):
        highspy.Highs()


def milp_solver(name: str, time_limit_s: float, rel_gap: float, *, who: str) -> Any:
    """A pulp solver for backend ``name`` ("auto", "highs" or "cbc"); ``who`` names the
    caller in the error.

    Raises:
        SolverUnavailableError: the backend is not installed.
    """
    import pulp

    if name in ("auto", "highs") and pulp.HiGHS().available():
        _silence_highs_banner()
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=rel_gap, threads=1)
    if name in ("auto", "cbc") and pulp.PULP_CBC_CMD().available():
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=rel_gap)
    raise SolverUnavailableError(f"{who}: MILP backend {name!r} is not available; install highspy "
                                 "(pip install highspy) or use pulp's bundled CBC with backend='cbc'")


def milp_dual_bound(problem: Any) -> float | None:
    """The best bound HiGHS proved for a solved pulp ``problem``; None without a finite one
    (CBC, or HiGHS stopped before bounding)."""
    solver_model = getattr(problem, "solverModel", None)
    if solver_model is None or not hasattr(solver_model, "getInfo"):
        return None
    dual = float(solver_model.getInfo().mip_dual_bound)
    return dual if math.isfinite(dual) else None
