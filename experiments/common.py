"""What every experiment records beside its figures: where results go, the git revision
and the device they were measured on."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def label_axis(axis, entry: dict, xlabel: str, ylabel: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Axis labels, the model's description, device and torch version as the title, a grid
    and the legend: the frame every per-model panel shares."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(f"{entry['description']}\n{entry['device']}, torch {entry['torch']}", fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def write_results(name: str, results: dict, plot: Callable[[dict], None] | None = None) -> None:
    """``results/<name>.json``, then the plot drawn from it (skipped without matplotlib)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    if plot is None:
        return
    try:
        plot(results)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[experiments]')", file=sys.stderr)
