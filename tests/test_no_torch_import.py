"""`solvers` plans anywhere: importing it, or any module in it, must not import torch."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import solvers
assert 'torch' not in sys.modules, 'import solvers imported torch'
for module in pkgutil.iter_modules(solvers.__path__, 'solvers.'):
    importlib.import_module(module.name)
    assert 'torch' not in sys.modules, module.name + ' imported torch'
"""


def test_solvers_do_not_import_torch() -> None:
    completed = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
