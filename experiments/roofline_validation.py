"""Does the roofline time model (`planner.roofline`) choose plans as good as measured times?

On this machine, with a CPU target whose figures are measured here
(`planner.roofline.measure_cpu_target`: a matmul and a copy benchmark), for each zoo model:

1. the per-op times of `planner.profile` (measured, ``--profile-repeats`` runs) and of the
   roofline (`planner.estimate.estimated_graph`, no op run) on the same graph: their
   Spearman rank correlation over the ops that run a kernel (views excluded: the roofline
   gives them 0), and the ratio of the totals;
2. at each budget, the plan `auto` chooses from profiled times and the one it chooses from
   roofline times (the same graph and bytes, only the times differ), both executed: their
   step times measured round-robin against the plain step in one process, their peaks from
   the allocator's events. The target: the roofline plan's measured overhead within 5
   points of the profiled plan's.

    python experiments/roofline_validation.py [--models gpt resnet] [--size small]
        [--fractions 0.5 0.3] [--repeats 10] [--threads 1] [--keep-freed-memory]

Writes experiments/results/roofline_validation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from functools import partial
from typing import Any

import numpy as np
import torch

from common import device_description, git_revision, write_results
from real_models import keep_freed_memory
from planner import zoo
from planner.benchmark import step_times_ms, train_step
from planner.budget import resolve_budget
from planner.capture import capture
from planner.estimate import estimated_graph
from planner.memory import measure_allocator_peak
from planner.profile import profile
from planner.roofline import measure_cpu_target
from runtime.module import ScheduledModule
from solvers.errors import InfeasibleBudgetError
from solvers.portfolio import solve
from solvers.simulate import simulate

log = logging.getLogger("roofline_validation")


def spearman(first: list[float], second: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks, ties shared)."""
    def ranks(values: list[float]) -> np.ndarray:
        array = np.asarray(values, dtype=float)
        order = array.argsort(kind="stable")
        result = np.empty(len(array))
        result[order] = np.arange(len(array), dtype=float)
        for value in np.unique(array):                     # ties share their average rank
            tied = array == value
            result[tied] = result[tied].mean()
        return result
    return float(np.corrcoef(ranks(first), ranks(second))[0, 1])


def run_model(name: str, args: argparse.Namespace, target) -> dict[str, Any]:
    model, inputs = zoo.make(name, size=args.size, seed=0)
    model.train()
    step = capture(model, inputs)
    profiled = profile(step, model, inputs, repeats=args.profile_repeats, progress=False)
    _, estimated = estimated_graph(model, inputs, target=target)
    roofline_ms = {op.name: op.time_ms for op in estimated.ops}
    # the same graph and bytes (CPU scratch included), roofline times: only the time model differs
    roofline = dataclasses.replace(profiled, ops=tuple(dataclasses.replace(op, time_ms=roofline_ms[op.name])
                                                       for op in profiled.ops))
    kernels = [op.name for op in profiled.ops if roofline_ms[op.name] > 0]
    correlation = spearman([profiled.op(n).time_ms for n in kernels], [roofline_ms[n] for n in kernels])
    log.info("%s: %d ops, %d kernels, Spearman %.3f, totals profiled %.1f ms, roofline %.1f ms", name,
             len(profiled.ops), len(kernels), correlation, profiled.total_time_ms, roofline.total_time_ms)
    resident = list(model.parameters()) + list(model.buffers()) + list(inputs)
    rows = []
    for fraction in args.fractions:
        budget_bytes = resolve_budget(fraction, profiled).budget_bytes
        try:
            from_profile = solve(profiled, budget_bytes, "auto")
            from_roofline = solve(roofline, budget_bytes, "auto")
        except InfeasibleBudgetError as error:      # the solvers' heuristics depend on the times
            log.info("%s at %.2f: %s", name, fraction, str(error).splitlines()[0])
            rows.append({"fraction": fraction, "budget_bytes": budget_bytes, "infeasible": str(error).splitlines()[0]})
            continue
        # run the roofline's choice on the profiled graph: same steps, the profile's times predict it
        runnable = dataclasses.replace(from_roofline, graph_hash=profiled.hash, graph=profiled)
        modules = {"profiled plan": ScheduledModule(model, step, profiled, from_profile),
                   "roofline plan": ScheduledModule(model, step, profiled, runnable)}

        def timed(module: torch.nn.Module):
            def run() -> torch.Tensor:
                model.zero_grad(set_to_none=True)
                return train_step(module, inputs)
            return run

        times = step_times_ms({"plain": timed(model), **{label: timed(m) for label, m in modules.items()}},
                              repeats=args.repeats)
        row: dict[str, Any] = {"fraction": fraction, "budget_bytes": budget_bytes, "plain_ms": times["plain"]}
        for label, module in modules.items():
            model.zero_grad(set_to_none=True)
            _, peak_bytes = measure_allocator_peak(partial(train_step, module, inputs), resident)
            row[label] = {"solver": module.plan.solver,
                          "predicted_overhead_profiled_times": simulate(profiled, module.plan).time_ms
                          / profiled.total_time_ms - 1,
                          "measured_ms": times[label], "measured_overhead": times[label] / times["plain"] - 1,
                          "measured_peak_bytes": peak_bytes, "within_budget": peak_bytes <= budget_bytes}
        row["roofline_minus_profiled_points"] = 100 * (row["roofline plan"]["measured_overhead"]
                                                       - row["profiled plan"]["measured_overhead"])
        row["roofline plan"]["predicted_overhead_roofline_times"] = from_roofline.overhead
        log.info("%s at %.2f: profiled plan %+.1f %%, roofline plan %+.1f %% (measured; %+.1f points)", name,
                 fraction, 100 * row["profiled plan"]["measured_overhead"],
                 100 * row["roofline plan"]["measured_overhead"], row["roofline_minus_profiled_points"])
        rows.append(row)
    return {"model": name, "size": args.size, "ops": len(profiled.ops), "kernels": len(kernels),
            "spearman": correlation, "profiled_total_ms": profiled.total_time_ms,
            "roofline_total_ms": roofline.total_time_ms, "budgets": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt", "resnet"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per plan, round-robin")
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-freed-memory", action="store_true", help="as in real_models.py")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    target = measure_cpu_target()
    log.info("target: %s", target.source)
    results = {"experiment": "roofline_validation", "git": git_revision(), "device": device_description(),
               "target": target.to_json(), "command": " ".join(["python", "experiments/roofline_validation.py",
                                                                 *(argv if argv is not None else sys.argv[1:])]),
               "models": [run_model(name, args, target) for name in args.models]}
    write_results("roofline_validation", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
