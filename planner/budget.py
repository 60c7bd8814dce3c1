"""Read a user's budget: bytes, a size string, or a fraction of activation memory.

A float in (0, 1] is that fraction of the un-optimized step's activation memory, i.e. of
(keep-all peak - parameters - buffers - inputs - gradients), on top of those fixed bytes;
what the budget covers is in docs/design.md, "The budget".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from planner.errors import BudgetError
from solvers.graph import Graph
from solvers.portfolio import solve
from solvers.simulate import simulate

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class BudgetBreakdown:
    budget_bytes: int
    fixed_bytes: int              # parameters + buffers + inputs + gradients
    keep_all_peak_bytes: int      # the un-optimized step's peak
    activation_bytes: int         # keep_all_peak_bytes - fixed_bytes
    fraction: float | None        # of activation memory, when the user gave one


def parse_budget(budget: int | float | str) -> int | float:
    """Bytes (int) for sizes, a float in (0, 1] for fractions; `BudgetError` otherwise."""
    if isinstance(budget, bool):
        raise BudgetError(f"budget {budget!r} is a bool; pass bytes (int), a size like '6GiB', or a fraction in (0, 1]")
    if isinstance(budget, int):
        if budget <= 0:
            raise BudgetError(f"budget {budget} bytes must be positive")
        return budget
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise BudgetError(f"budget {budget!r} as a float must be a fraction in (0, 1] of activation memory; "
                              "pass an int for bytes or a string like '6GiB'")
        return budget
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise BudgetError(f"cannot read budget {budget!r}: write a percentage such as '50%'") from None
            return parse_budget(percent / 100.0)
        match = _SIZE.match(text)
        if not match or (match.group(2) and match.group(2).lower() not in _UNITS):
            raise BudgetError(f"cannot read budget {budget!r}; write bytes with a unit such as '6GiB', '800MB', "
                              "'512MiB', or a percentage such as '50%'")
        if not match.group(2):
            raise BudgetError(f"budget {budget!r} has no unit, so it could be bytes or a fraction: write "
                              f"'{match.group(1)}B' for bytes, a percentage such as '50%', or pass a number "
                              "(an int for bytes, a float in (0, 1] for a fraction of activation memory)")
        size_bytes = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
        if size_bytes <= 0:
            raise BudgetError(f"budget {budget!r} must be positive")
        return size_bytes
    raise BudgetError(f"budget must be int bytes, a size string or a fraction, got {type(budget).__name__}")


def resolve_budget(budget: int | float | str, graph: Graph) -> BudgetBreakdown:
    """The budget in bytes for this graph, and the figures it was derived from."""
    parsed = parse_budget(budget)
    keep_all = simulate(graph, solve(graph, 2**62, "none")).peak_bytes
    fixed = graph.resident_bytes() + graph.gradient_bytes()
    activation = max(0, keep_all - fixed)
    if isinstance(parsed, float):
        return BudgetBreakdown(fixed + int(parsed * activation), fixed, keep_all, activation, parsed)
    return BudgetBreakdown(parsed, fixed, keep_all, activation, None)
