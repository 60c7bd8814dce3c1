"""Names for solvers: the table `solvers.solve` looks a solver up in, and `register` to add one.

Every solver has one signature, ``solver(graph, budget_bytes, **options) -> Plan`` (as
PyTorch's activation-checkpointing knapsack solvers share one over plain lists), returns
a plan whose peak fits the budget or raises `InfeasibleBudgetError`, and never mutates the
graph. The built-in solvers are registered by `solvers.portfolio`, which also decides what
``solver="auto"`` runs; this module only holds the names. O(1) per lookup.
"""

from __future__ import annotations

from typing import Callable, Protocol

from solvers.errors import OptionError, SolverUnavailableError
from solvers.graph import Graph
from solvers.plan import Plan


class Solver(Protocol):
    def __call__(self, graph: Graph, budget_bytes: int, **options: object) -> Plan: ...


_SOLVERS: dict[str, Solver] = {}


def register(name: str) -> Callable[[Solver], Solver]:
    """Decorator: make ``solver`` available as ``solve(graph, budget_bytes, name)``."""
    def add(solver: Solver) -> Solver:
        if name in _SOLVERS:
            raise OptionError(f"register: a solver named {name!r} is registered already; register yours under "
                              f"another name (taken: {', '.join(available_solvers())})")
        _SOLVERS[name] = solver
        return solver
    return add


def available_solvers() -> tuple[str, ...]:
    return tuple(sorted(_SOLVERS))


def registered_solver(name: str) -> Solver:
    """The solver registered as ``name``.

    Raises:
        SolverUnavailableError: no solver has that name; the message lists the names.
    """
    if name not in _SOLVERS:
        raise SolverUnavailableError(f"no solver named {name!r}; choose auto or one of "
                                     f"{', '.join(available_solvers())}")
    return _SOLVERS[name]
