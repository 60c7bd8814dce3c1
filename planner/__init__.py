"""memsched's torch front end: trace and profile a training step, plan it, run it.

    model = planner.optimize(model, budget="6GiB", example_inputs=(x,))
"""

from planner.api import optimize
from planner.budget import parse_budget, resolve_budget
from planner.capture import capture
from planner.errors import BudgetError, UnsupportedModelError
from planner.profile import profile

__all__ = ["BudgetError", "UnsupportedModelError", "capture", "optimize", "parse_budget", "profile",
           "resolve_budget"]
