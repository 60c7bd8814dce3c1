"""Do plans move with profiling noise, and does the time model predict what they cost?

For each model, ``--runs`` times: capture, profile (``--profile-repeats`` timing repeats per
op, as ``optimize`` does) and solve at the same budget, as a user calling ``optimize`` again
would. Then every plan is timed round-robin against the plain step in one process, and its
peak measured from the allocator's events (`planner.memory.measure_allocator_peak`).

Reports, per model: the spread (max - min, in points) of the chosen plans' predicted
overheads, each plan's measured overhead beside its prediction, and whether every
measured peak held its budget.

    python experiments/plan_stability.py [--models resnet50 gpt2] [--fraction 0.3 | --budget-mib M]
        [--runs 5] [--repeats 3] [--threads 1] [--keep-freed-memory]

``--fraction`` is the share of the step's activation memory (`planner.budget`); the same
budget in bytes is used for every run (resolved on the first run's graph). Writes
experiments/results/plan_stability.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from typing import Any

import torch

from common import RESULTS, device_description, git_revision, write_results
from real_models import BUILDERS, MiB, keep_freed_memory, train_step
from planner.benchmark import step_times_ms
from planner.budget import resolve_budget
from planner.capture import capture
from planner.memory import measure_allocator_peak
from planner.profile import profile, with_released_outputs
from runtime.module import ScheduledModule
from solvers.portfolio import solve

log = logging.getLogger("plan_stability")


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    workload = BUILDERS[name](False)
    model, batch = workload.model, workload.batch
    model.train()
    resident = list(model.parameters()) + list(model.buffers()) + list(batch.values())
    budget_bytes = None
    plans = []
    for run in range(args.runs):
        started = time.perf_counter()
        step = capture(model, (), batch)
        graph = with_released_outputs(profile(step, model, (), batch, repeats=args.profile_repeats,
                                              progress=False), step)
        if budget_bytes is None:
            budget_bytes = (int(args.budget_mib * MiB) if args.budget_mib is not None
                            else resolve_budget(args.fraction, graph).budget_bytes)
        plan = solve(graph, budget_bytes, "auto")
        optimize_s = time.perf_counter() - started
        predicted = plan.overhead
        recomputed = sum(1 for decision in plan.decisions.values() if decision.value == "recompute")
        log.info("%s run %d: %s plan, %d storages recomputed, predicted overhead %+.1f %% (%.0f s)", name, run,
                 plan.solver, recomputed, 100 * predicted, optimize_s)
        plans.append({"run": run, "solver": plan.solver, "recomputed_storages": recomputed,
                      "predicted_overhead": predicted, "predicted_peak_bytes": plan.predicted_peak_bytes,
                      "optimize_s": optimize_s, "module": ScheduledModule(model, step, graph, plan)})

    def timed(module: torch.nn.Module):
        def run() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            return train_step(module, batch)
        return run

    for entry in plans:
        model.zero_grad(set_to_none=True)
        _, entry["measured_peak_bytes"] = measure_allocator_peak(partial(train_step, entry["module"], batch), resident)
    model.zero_grad(set_to_none=True)
    methods = {"plain": timed(model)} | {f"run {e['run']}": timed(e.pop("module")) for e in plans}
    times = step_times_ms(methods, repeats=args.repeats, warmup=1)
    for entry in plans:
        entry["time_ms"] = times[f"run {entry['run']}"]
        entry["measured_overhead"] = entry["time_ms"] / times["plain"] - 1
        entry["within_budget"] = entry["measured_peak_bytes"] <= budget_bytes
        log.info("%s run %d: measured %+.1f %% (predicted %+.1f %%), peak %.1f MiB / budget %.1f MiB", name,
                 entry["run"], 100 * entry["measured_overhead"], 100 * entry["predicted_overhead"],
                 entry["measured_peak_bytes"] / MiB, budget_bytes / MiB)
    predicted = [e["predicted_overhead"] for e in plans]
    errors = [e["measured_overhead"] - e["predicted_overhead"] for e in plans]
    return {"model": name, "description": workload.description,
            "fraction": None if args.budget_mib is not None else args.fraction,
            "budget_bytes": budget_bytes, "plain_time_ms": times["plain"], "plans": plans,
            "predicted_spread_points": 100 * (max(predicted) - min(predicted)),
            "largest_prediction_error_points": 100 * max(abs(e) for e in errors),
            "violations": sum(not e["within_budget"] for e in plans),
            "command": " ".join(["python", "experiments/plan_stability.py", *sys.argv[1:]]),
            "git_revision": git_revision(), "device": device_description(), "threads": torch.get_num_threads(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), default=["resnet50", "gpt2"])
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--budget-mib", type=float, help="a budget in MiB instead of --fraction")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin timing rounds")
    parser.add_argument("--profile-repeats", type=int, default=3, help="timing repeats per op while profiling")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-freed-memory", action="store_true", help="as in real_models.py")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    path = RESULTS / "plan_stability.json"
    results = json.loads(path.read_text()) if path.exists() else {"models": {}}
    for name in args.models:
        results["models"][name] = entry = run_model(name, args)
        write_results("plan_stability", results)
        print(f"{name} at {entry['budget_bytes'] / MiB:.1f} MiB: predicted overhead spread {entry['predicted_spread_points']:.1f} "
              f"points over {args.runs} runs, largest |measured - predicted| "
              f"{entry['largest_prediction_error_points']:.1f} points, {entry['violations']} over budget", flush=True)
    return 0 if all(e["violations"] == 0 for e in results["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
