"""Measured peak, predicted peak and time overhead of memsched across budgets, on the
built-in models, side by side with the plain step in the same process.

    python experiments/budget_sweep.py [--models gpt resnet unet] [--size small]
        [--fractions 1.0 0.7 0.5 0.4] [--solver auto] [--steps 10]

Writes experiments/results/budget_sweep.json (with the command, git revision, device and
torch version) and budget_sweep.png (plotted from that JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, device_description, git_revision, write_results
from planner import optimize, zoo
from planner.benchmark import step_memory, step_times_ms, train_step
from solvers.errors import InfeasibleBudgetError

def sweep(model_name: str, size: str, fractions: list[float], solver: str, steps: int) -> list[dict]:
    rows = []
    model, inputs = zoo.make(model_name, size=size, seed=0)
    plain = copy.deepcopy(model)
    plain_peak = step_memory(plain, inputs).peak_bytes
    for fraction in fractions:
        candidate = copy.deepcopy(model)
        started = time.perf_counter()
        try:
            optimized = optimize(candidate, fraction, inputs, solver=solver)
        except InfeasibleBudgetError as error:
            rows.append({"model": model_name, "fraction": fraction, "infeasible": str(error).splitlines()[0]})
            continue
        planning_s = time.perf_counter() - started
        measured = step_memory(optimized, inputs).peak_bytes
        times = step_times_ms({"plain": lambda: train_step(plain, inputs),
                               "optimized": lambda: train_step(optimized, inputs)}, repeats=steps)
        plan = optimized.plan
        rows.append({"model": model_name, "size": size, "fraction": fraction, "solver": plan.solver,
                     "budget_bytes": plan.budget_bytes, "plain_peak_bytes": plain_peak,
                     "measured_peak_bytes": measured, "predicted_peak_bytes": plan.predicted_peak_bytes,
                     "within_budget": measured <= plan.budget_bytes,
                     "prediction_error": plan.predicted_peak_bytes / measured - 1,
                     "measured_overhead": times["optimized"] / times["plain"] - 1,
                     "predicted_overhead": plan.overhead, "planning_s": planning_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    for model_name in dict.fromkeys(row["model"] for row in results["rows"]):
        rows = [r for r in results["rows"] if r["model"] == model_name and "measured_peak_bytes" in r]
        axis.plot([r["measured_peak_bytes"] / r["plain_peak_bytes"] for r in rows],
                  [100 * r["measured_overhead"] for r in rows], marker="o", label=model_name)
    axis.set_xlabel("measured peak / plain peak")
    axis.set_ylabel("measured time overhead (%)")
    axis.set_title(f"memsched, solver={results.get('solver', 'auto')} (picked per point), {results['device']}",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt", "resnet", "unet"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.7, 0.5, 0.4])
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in sweep(name, args.size, args.fractions, args.solver, args.steps)]
    results = {"command": " ".join(["python", "experiments/budget_sweep.py", *(argv or sys.argv[1:])]),
               "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
               "solver": args.solver, "rows": rows}
    write_results("budget_sweep", results, lambda saved: plot(saved, RESULTS / "budget_sweep.png"))
    return 0 if all(row.get("within_budget", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
