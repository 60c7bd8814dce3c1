"""Pipeline splits: memsched's joint split + per-stage plans against the equal-layers split
and torchgpipe-style balance-by-time followed by checkpointing every block of each stage.

For each model, stage count K and per-device budget:

* predicted (`solvers.pipeline`, one micro-batch's profiled graph, the same cost model for
  all three): the step time of
  - ``memsched``: `solve_pipeline_chain`, the split and each stage's plan chosen together;
  - ``equal_layers``: `split_equal_layers`, each stage with memsched's best plan under its
    budget (what a user gets from equal layers plus memsched per stage);
  - ``equal_layers_every_block``: equal layers, checkpoint every block of an over-budget stage;
  - ``balance_by_time_every_block``: torchgpipe's ``balance_by_time`` (keep-all times),
    then every block of an over-budget stage checkpointed;
* measured (``--measure``): each split run on K CPU gloo ranks with
  ``python -m torch.distributed.run -m planner.pipeline_demo --plan ...`` (loss and
  gradients checked against one process, per-rank peak measured, median step time).
  The ranks share this machine's cores, so measured times rank the splits, they do not
  give a GPU's speed-up. Measured, ``memsched`` and ``equal_layers`` plan each stage with
  ``auto``; the baseline runs ``every_block`` on every stage (torch.utils.checkpoint on
  every block), while its predicted figure checkpoints only the stages over budget (in
  the baseline's favour).

    python experiments/pipeline_stages.py [--models gpt-wide-vocab unet] [--stages 2 4]
        [--measure] [--steps 5]

Writes experiments/results/pipeline_stages.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import RESULTS, device_description, git_revision, write_results
from planner.capture import capture
from planner.pipeline_demo import build_model, free_port
from planner.profile import profile
from solvers.errors import InfeasibleBudgetError
from solvers.pipeline import (evaluate_split, pipeline_chain, plan_from_solution, solve_pipeline_chain,
                              split_balance_by_time, split_equal_layers)

ROOT = Path(__file__).resolve().parent.parent
# model size, batch, micro-batches M (pipelines run with M >= 2K to keep the bubble small)
SIZES = {"gpt-wide-vocab": ("small", 16, 8), "unet": ("tiny", 8, 4)}


def least_feasible_budget(chain, stages: int, microbatches: int) -> int:
    """The least per-device budget (all devices alike) for which memsched finds a split, as
    the solver's `InfeasibleBudgetError` names it."""
    try:
        solve_pipeline_chain(chain, [1] * stages, microbatches=microbatches)
    except InfeasibleBudgetError as error:
        return error.least_feasible_bytes
    return 1


def keep_all_budget(chain, stages: int, microbatches: int) -> int:
    """The per-device budget at which memsched's unconstrained best split fits as planned:
    the largest stage peak of its solution under unlimited memory."""
    solution = solve_pipeline_chain(chain, [10**15] * stages, microbatches=microbatches)
    return max(stage.peak_bytes for stage in solution.stages)


def series(chain, stages: int, budget_bytes: int, microbatches: int) -> dict[str, dict]:
    budgets = [budget_bytes] * stages
    result: dict[str, dict] = {}
    try:
        result["memsched"] = solution_row(solve_pipeline_chain(chain, budgets, microbatches=microbatches))
    except InfeasibleBudgetError as error:
        result["memsched"] = {"feasible": False, "error": str(error).splitlines()[0]}
    equal = split_equal_layers(chain, stages)
    balanced = split_balance_by_time(chain, stages)
    for label, balance, stage_plan in (("equal_layers", equal, "best"),
                                       ("equal_layers_every_block", equal, "every_block"),
                                       ("balance_by_time_every_block", balanced, "every_block")):
        result[label] = solution_row(evaluate_split(chain, balance, budgets, microbatches=microbatches,
                                                    stage_plan=stage_plan))
    return result


def solution_row(solution) -> dict:
    return {"feasible": solution.feasible, "balance": list(solution.balance),
            "step_time_ms": solution.step_time_ms, "bubble_ms": solution.bubble_ms,
            "stage_time_ms": [stage.time_ms for stage in solution.stages],
            "stage_peak_bytes": [stage.peak_bytes for stage in solution.stages],
            "recompute_ms": [stage.recompute_ms for stage in solution.stages],
            "_solution": solution}


def measure(model_name: str, size: str, batch: int, microbatches: int, stages: int, budget_bytes: int,
            plan_path: str, solver: str, steps: int) -> dict:
    """Run a saved pipeline plan on ``stages`` gloo ranks; every rank's report."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        report = os.path.join(directory, "report")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={stages}",
                   f"--master-port={port}", "-m", "planner.pipeline_demo", "--model", model_name, "--size", size,
                   "--batch", str(batch), "--budget", str(budget_bytes), "--microbatches", str(microbatches),
                   "--plan", plan_path, "--solver", solver, "--steps", str(steps), "--json", report]
        finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        reports = []
        for rank in range(stages):
            path = f"{report}.rank{rank}.json"
            if os.path.exists(path):
                with open(path, encoding="utf-8") as file:
                    reports.append(json.load(file))
        if len(reports) < stages:   # a failing rank wrote its report and stopped the others
            failed = [r for r in reports if not r.get("ok")]
            return {"ok": False, "error": failed[0]["error"] if failed else finished.stderr[-2000:]}
    if not all(r.get("ok") for r in reports):
        return {"ok": False, "error": next(r["error"] for r in reports if not r.get("ok"))}
    return {"ok": True, "step_ms": max(r["measured_step_ms"] for r in reports),
            "peak_bytes": [r["peak_bytes"] for r in reports],
            "within_budget": all(r["peak_bytes"] <= r["budget_bytes"] for r in reports),
            "recomputed": [r["recomputed"] for r in reports]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt-wide-vocab", "unet"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--measure", action="store_true", help="run every split on CPU gloo ranks")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "pipeline_stages.json").read_text()))
        return
    torch.set_num_threads(1)
    rows = []
    for model_name in args.models:
        size, batch, microbatches = SIZES[model_name]
        model, inputs = build_model(model_name, size, batch)
        microbatch = tuple(t.tensor_split(microbatches)[0] for t in inputs)
        step = capture(model, microbatch)
        graph = profile(step, model, microbatch, repeats=5, progress=False)
        chain, segments, options = pipeline_chain(graph)
        for stages in args.stages:
            if stages > chain.num_segments:
                continue
            low, high = least_feasible_budget(chain, stages, microbatches), keep_all_budget(chain, stages, microbatches)
            # roomy: 3 % above memsched's keep-all split, so that the ranks' exact stage plans
            # (each stage re-planned on its own graph) are not cut to the byte
            roomy = int(high * 1.03)
            for label, budget_bytes in (("roomy", roomy), ("tight", (low + high) // 2 if high > low else low)):
                row = {"model": model_name, "size": size, "batch": batch, "microbatches": microbatches,
                       "stages": stages, "budget": label, "budget_bytes": budget_bytes,
                       "segments": chain.num_segments, "series": series(chain, stages, budget_bytes, microbatches)}
                if args.measure:
                    for name, solver in (("memsched", "auto"), ("equal_layers", "auto"),
                                         ("balance_by_time_every_block", "every_block")):
                        entry = row["series"][name]
                        if not entry.get("feasible") or "_solution" not in entry:
                            continue
                        plan = plan_from_solution(graph, segments, options, entry["_solution"],
                                                  [budget_bytes] * stages)
                        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
                            plan_path = file.name
                        plan.save(plan_path)
                        entry["measured"] = measure(model_name, size, batch, microbatches, stages, budget_bytes,
                                                    plan_path, solver, args.steps)
                        os.unlink(plan_path)
                for entry in row["series"].values():
                    entry.pop("_solution", None)
                rows.append(row)
                print(summary_line(row), flush=True)
    write_results("pipeline_stages", {"revision": git_revision(), "device": device_description(),
                                      "command": " ".join(sys.argv), "rows": rows}, plot)


def summary_line(row: dict) -> str:
    parts = [f"{row['model']} K={row['stages']} {row['budget']} ({row['budget_bytes'] / 2**20:.2f} MiB):"]
    memsched = row["series"]["memsched"].get("step_time_ms")
    for name, entry in row["series"].items():
        if not entry.get("feasible"):
            parts.append(f"{name} infeasible")
            continue
        text = f"{name} {entry['step_time_ms']:.1f} ms {entry['balance']}"
        if memsched and name != "memsched":
            text += f" (memsched x{memsched / entry['step_time_ms']:.2f})"
        if "measured" in entry:
            measured = entry["measured"]
            text += f" measured {measured['step_ms']:.0f} ms" if measured.get("ok") else " measured FAILED"
        parts.append(text)
    return "\n  ".join(parts)


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = ("memsched", "equal_layers", "equal_layers_every_block", "balance_by_time_every_block")
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, kind in zip(axes, ("predicted", "measured")):
        labels = [f"{r['model']}\nK={r['stages']} {r['budget']}" for r in rows]
        width = 0.2
        for index, name in enumerate(names):
            values = []
            for r in rows:
                entry = r["series"].get(name, {})
                memsched = r["series"]["memsched"]
                if kind == "predicted":
                    ok = entry.get("feasible") and memsched.get("feasible")
                    values.append(entry["step_time_ms"] / memsched["step_time_ms"] if ok else 0)
                else:
                    m, base = entry.get("measured", {}), memsched.get("measured", {})
                    values.append(m["step_ms"] / base["step_ms"] if m.get("ok") and base.get("ok") else 0)
            axis.bar([i + index * width for i in range(len(rows))], values, width, label=name)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + 1.5 * width for i in range(len(rows))], labels, fontsize=7)
        axis.set_ylabel(f"{kind} step time / memsched's (0 = infeasible or not run)")
        axis.set_title(f"{kind} step time relative to memsched")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "pipeline_stages.png", dpi=120)


if __name__ == "__main__":
    main()
