"""The library writes nothing to stdout: not itself, not a native solver behind it.

HiGHS writes its banner from C++ straight to file descriptor 1 when a process makes its
first ``Highs``, so the check runs `optimize` with the ``ilp`` solver in a fresh process
whose stdout is the descriptor ``capfd`` captures. Progress bars and logs go to stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ILP_STEP = """
import logging, sys
import pulp
from planner import optimize, zoo
from planner.benchmark import train_step

logging.basicConfig(level=logging.INFO)
assert pulp.HiGHS().available(), "the ilp solver would not use HiGHS"
model, inputs = zoo.make("mlp", size="tiny", seed=0)
optimized = optimize(model, 0.5, inputs, solver="ilp", solver_options={"time_limit_s": 2.0}, progress=True)
train_step(optimized, inputs)
print(f"planned by {optimized.plan.solver}", file=sys.stderr)
"""


def test_optimize_with_the_ilp_solver_writes_nothing_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    result = subprocess.run([sys.executable, "-c", ILP_STEP], cwd=ROOT, timeout=300)
    captured = capfd.readouterr()
    assert result.returncode == 0, captured.err
    assert "planned by ilp" in captured.err
    assert "solvers.ilp" in captured.err, "the ilp solver's log should reach stderr"
    assert captured.out == ""


def test_a_native_write_to_stdout_is_silenced_only_inside_the_block(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    from solvers.quiet import native_output_silenced

    os.write(1, b"before\n")
    with native_output_silenced(1):
        os.write(1, b"native banner\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "before\nafter\n"
