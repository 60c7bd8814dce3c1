"""Errors of the torch-facing front end; they join the hierarchy in `solvers.errors`."""

from solvers.errors import (InfeasibleBudgetError, MemschedError, OptionError,  # noqa: F401 - re-exported
                            UnsupportedUseError, format_bytes)


class UnsupportedModelError(MemschedError):
    """The model cannot be traced into a training-step graph; the message names the
    submodule and the way out."""


class BudgetError(MemschedError, ValueError):
    """A budget that cannot be read (``"6 GB"`` typo, negative, fraction outside (0, 1])."""


class ModelInputError(MemschedError, ValueError):
    """The model itself fails on the example inputs (a shape or dtype it does not take);
    the message names the submodule, the op and the inputs."""


class MeasurementError(MemschedError, ValueError):
    """A memory measurement that cannot be taken as asked (a host copy that lives on the
    device, a step that frees memory allocated before it); the message says how to measure."""


class PlanFileError(MemschedError):
    """A plan file that ``plan-inspect`` cannot inspect (missing, unreadable, not a plan);
    the message is one line naming the file and the fix."""


class CompiledBudgetError(InfeasibleBudgetError):
    """``optimize(..., compile=True)``: every plan tried, once compiled by inductor, measured
    above the budget. ``least_feasible_bytes`` is the least peak measured; ``tried`` the
    (solver budget, measured peak) of each plan tried."""

    def __init__(self, budget_bytes: int, tried: list[tuple[int, int]], *, loaded: bool = False) -> None:
        least = min(peak for _, peak in tried)
        super().__init__(budget_bytes, least, {"least measured compiled peak": least}, solver="compiled")
        self.tried = list(tried)
        attempts = "; ".join(f"planned for {format_bytes(budget)}: measured {format_bytes(peak)}"
                             for budget, peak in tried)
        fix = ("re-plan without plan= so that memsched can lower its internal budget, raise the budget, "
               if loaded else f"raise the budget to at least {least} bytes, ")
        self.args = (f"compiled step over budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) at every plan "
                     f"tried ({attempts}); {fix}or optimize with compile=False (the eager plan keeps it)",)
