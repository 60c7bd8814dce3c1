"""memsched's torch front end: trace and profile a training step, plan it, run it.

    model = planner.optimize(model, budget="6GiB", example_inputs=(x,))

``planner.capture.capture`` and ``planner.profile.profile`` are the lower-level steps.
Every error memsched raises is a ``MemschedError``
(``except planner.MemschedError``). Names are loaded on first use (PEP 562) so that torch-free tools such as ``plan-inspect``
start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "optimize": "planner.api", "parse_budget": "planner.budget", "resolve_budget": "planner.budget",
    "BudgetError": "planner.errors", "UnsupportedModelError": "planner.errors", "OptionError": "planner.errors",
    "ModelInputError": "planner.errors", "MeasurementError": "planner.errors", "PlanFileError": "planner.errors",
    "CompiledBudgetError": "planner.errors", "MemschedError": "solvers.errors",
    "InfeasibleBudgetError": "solvers.errors", "PlanMismatchError": "solvers.errors",
    "InvalidPlanError": "solvers.errors",
    "pad_to_bucket": "planner.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")
