"""One error hierarchy for the whole project.

Every message names the graph node or module involved and the fix, so a user can act on
it without reading the source.
"""

from __future__ import annotations


class MemschedError(Exception):
    """Base class of every error memsched raises on purpose."""


class InfeasibleBudgetError(MemschedError):
    """No plan fits the budget.

    ``least_feasible_bytes`` is the smallest budget the solver could meet (or a proved lower
    bound when the solver found none), ``breakdown`` what that figure is made of.
    ``solvers_run``: registered solvers the refusing solver ran as candidates of its own,
    which found no plan either (``auto`` does not run them again).
    """

    def __init__(self, budget_bytes: int, least_feasible_bytes: int, breakdown: dict[str, int],
                 solver: str = "", context: str = "", solvers_run: tuple[str, ...] = ()) -> None:
        self.budget_bytes = budget_bytes
        self.least_feasible_bytes = least_feasible_bytes
        self.breakdown = dict(breakdown)
        self.solver = solver
        self.context = context
        self.solvers_run = tuple(solvers_run)
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in breakdown.items())
        by = f" ({solver})" if solver else ""
        where = f"{context}: " if context else ""
        super().__init__(
            f"{where}budget {format_bytes(budget_bytes)} < least feasible {format_bytes(least_feasible_bytes)}{by}"
            f"\n  ({parts}); raise the budget to at least {least_feasible_bytes} bytes")


class UnsupportedGraphError(MemschedError):
    """The graph has a structure a solver cannot handle (a bad argument is an `OptionError`)."""


class SolverUnavailableError(MemschedError):
    """The named solver, or a backend it needs, is not installed or not registered."""


class PlanMismatchError(MemschedError):
    """A plan was made for another graph (hash mismatch) or other inputs."""


class InvalidPlanError(MemschedError):
    """A plan's program is not executable: a value used before it exists, freed twice, ..."""


class PlanFormatError(MemschedError):
    """A plan or graph file that cannot be read as memsched JSON (missing, corrupt, truncated,
    another version)."""


class OptionError(MemschedError, ValueError):
    """An argument that cannot be used as given; the message says which values it takes."""


class UnsupportedUseError(MemschedError, RuntimeError):
    """A use of memsched that it does not support (``retain_graph=True`` on an optimized
    module, a pipeline outside ``torchrun``, a memory tracker entered twice); the message
    says what to do instead."""


def format_bytes(size_bytes: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
