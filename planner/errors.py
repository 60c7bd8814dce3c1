"""Errors of the torch-facing front end; they join the hierarchy in `solvers.errors`."""

from solvers.errors import MemschedError, OptionError, UnsupportedUseError  # noqa: F401 - re-exported


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
