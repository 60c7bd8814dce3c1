"""One error hierarchy: every error memsched raises on purpose is a `MemschedError`, and
its message names the argument, module or file and the fix.

A user mistake at each layer raises a `MemschedError` subclass (those that replaced a
builtin exception also stay that builtin, so ``except ValueError`` keeps working); every
exception class the three layers define subclasses `MemschedError`; and no module of
theirs raises a bare ``ValueError``/``TypeError``/``KeyError``/``RuntimeError``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Callable

import pytest

from solvers import (Graph, InfeasibleBudgetError, MemschedError, Op, OptionError, Phase, Plan, PlanFormatError,
                     SolverUnavailableError, UnsupportedGraphError, UnsupportedUseError, Value, ValueKind, solve)

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("solvers", "runtime", "planner")
BARE_BUILTINS = {"ValueError", "TypeError", "KeyError", "RuntimeError"}


def two_op_graph() -> Graph:
    """x -> relu -> (sum) with its backward: the least graph every solver plans."""
    values = (Value("w", 64, ValueKind.PARAMETER), Value("x", 256, ValueKind.INPUT),
              Value("h", 256, ValueKind.ACTIVATION, producer="mul"),
              Value("y", 256, ValueKind.ACTIVATION, producer="relu"),
              Value("tangent_y", 256, ValueKind.TANGENT),
              Value("grad_h", 256, ValueKind.GRADIENT_WORK, producer="relu_backward"),
              Value("grad_w", 64, ValueKind.GRADIENT_WORK, producer="mul_backward"))
    ops = (Op("mul", ("x", "w"), ("h",), Phase.FORWARD, 1.0),
           Op("relu", ("h",), ("y",), Phase.FORWARD, 1.0),
           Op("relu_backward", ("tangent_y", "y"), ("grad_h",), Phase.BACKWARD, 1.0),
           Op("mul_backward", ("grad_h", "x"), ("grad_w",), Phase.BACKWARD, 1.0))
    return Graph(ops=ops, values=values, placeholders=("w", "x", "tangent_y"), forward_outputs=("y",),
                 gradients=("grad_w",), name="two_op")


def mistakes() -> dict[str, tuple[Callable[[], object], type[MemschedError], str]]:
    """name -> (the mistake, the error it raises, a pattern its message matches: the fix)."""
    from planner import zoo
    from planner.budget import parse_budget
    from planner.errors import BudgetError, PlanFileError
    from planner.inspect import load_plan
    from planner.memory import StepMemoryTracker
    from solvers.portfolio import solve_hierarchical

    graph = two_op_graph()

    def tracker_twice() -> None:
        tracker = StepMemoryTracker("cpu")
        with tracker:
            pass
        with tracker:
            pass

    return {
        "budget typo": (lambda: parse_budget("6 GB!"), BudgetError, r"write bytes with a unit such as '6GiB'"),
        "budget below the floor": (lambda: solve(graph, 1), InfeasibleBudgetError, r"raise the budget to at least"),
        "unknown solver": (lambda: solve(graph, 10**9, "rotor"), SolverUnavailableError, r"choose auto or one of"),
        "budget as text to solve": (lambda: solve(graph, "6GiB"), OptionError, r"with planner.parse_budget"),
        "missing plan to load": (lambda: Plan.load(str(ROOT / "no-such-plan.json")), PlanFormatError,
                                 r"no-such-plan.json: cannot read it .*; pass the path of a file written by Plan.save"),
        "option the solver lacks": (lambda: solve(graph, 10**9, "chain", time_limit_s=3.0), OptionError,
                                    r"solver 'chain' takes no option 'time_limit_s' \(it takes resolution,"),
        "solver argument out of range": (lambda: solve_hierarchical(graph, 10**9, options_per_segment=1),
                                         OptionError, r"pass options_per_segment >= 2"),
        "unknown zoo model": (lambda: zoo.make("vgg"), OptionError, r"choose one of \['encoder', 'gpt'"),
        "tracker reused": (tracker_twice, UnsupportedUseError, r"make a new one for each step"),
        "missing plan file": (lambda: load_plan(str(ROOT / "no-such-plan.json")), PlanFileError,
                              r"no such file; pass the path of a plan JSON file written by Plan.save\(\)"),
    }


@pytest.mark.parametrize("name", sorted(mistakes()))
def test_user_mistakes_raise_memsched_errors_naming_the_fix(name: str) -> None:
    mistake, error_type, fix = mistakes()[name]
    with pytest.raises(error_type, match=fix) as info:
        mistake()
    assert isinstance(info.value, MemschedError)


def test_bad_arguments_are_option_errors_not_graph_errors() -> None:
    """A bad argument is the caller's to fix (`OptionError`, also a ValueError), never a
    graph the solver cannot handle."""
    with pytest.raises(OptionError) as info:
        solve(two_op_graph(), 10**9, "chain", resolution=0)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, UnsupportedGraphError)
    assert "pass resolution >= 1" in str(info.value)


def layer_modules() -> list[str]:
    return [f"{layer}.{module.name}" for layer in LAYERS
            for module in pkgutil.iter_modules([str(ROOT / layer)])]


def test_every_exception_class_of_the_layers_is_a_memsched_error() -> None:
    defined = []
    for name in layer_modules():
        module = importlib.import_module(name)
        defined += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                    if issubclass(cls, BaseException) and cls.__module__ == name]
    assert len(defined) >= 14, [cls.__name__ for cls in defined]
    outside = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in defined if not issubclass(cls, MemschedError))
    assert outside == [], f"exception classes outside the MemschedError hierarchy: {outside}"


def test_no_layer_raises_a_bare_builtin_error() -> None:
    """Each ``raise ValueError(...)`` and the like in planner/, runtime/, solvers/ (assertions
    and ``raise AttributeError`` in a module ``__getattr__`` are not user errors)."""
    found = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                raised = node.exc.func if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) else None
                if isinstance(raised, ast.Name) and raised.id in BARE_BUILTINS:
                    found.append(f"{layer}/{path.name}:{node.lineno} {raised.id}")
    assert found == [], found
