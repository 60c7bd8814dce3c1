"""A training loop's new shapes: planned from the first profile, or profiled by running them?

For each zoo model, `optimize` plans one reference shape (profiled for real). Then, for
each new shape (shorter sequences, the smaller last batch, a larger batch) and budget
(a fraction of each new step's activations), two ways to plan it:

- **reuse** (what `OptimizedModule` does): trace, size the step on fake tensors with op
  times carried over from the reference profile and scratch measured on isolated ops
  (`planner.reuse`), and solve warm-started from the reference's plan;
- **profile** (what it did before): trace, run the un-optimized step once to profile it,
  and solve from scratch.

Recorded per case: planning wall time; the peak of the planning call itself from the
allocator's events (reuse runs no un-optimized step; profile does); both plans' overhead and
peak simulated on a third, independent profile of the new step (``--truth-repeats`` timing
runs per op), against its budget; and the reuse plan's step peak measured from allocator
events.

    python experiments/new_shapes.py [--models gpt resnet] [--fractions 0.3 0.5 0.7]
        [--threads 1]

Writes experiments/results/new_shapes.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import device_description, git_revision, write_results
from planner import optimize, zoo
from planner.benchmark import train_step
from planner.budget import resolve_budget
from planner.capture import capture
from planner.memory import measure_allocator_peak
from planner.profile import profile
from solvers.errors import InfeasibleBudgetError
from solvers.portfolio import solve
from solvers.simulate import simulate


def new_shapes(name: str, inputs: tuple) -> dict[str, tuple]:
    """Shorter sequences for the GPT; the smaller last batch and a larger one for the ResNet."""
    if name == "gpt":
        idx, targets = inputs
        return {f"seq {n}": (idx[:, :n].contiguous(), targets[:, :n].contiguous()) for n in (96, 64, 32)}
    (images,) = inputs
    return {"batch 24": (images[:24].clone(),), "batch 16": (images[:16].clone(),),
            "batch 48": (torch.cat([images, images[:16]]),)}


def case(model: torch.nn.Module, optimized, new: tuple, fraction: float, truth_repeats: int) -> dict:
    resident = list(model.parameters()) + list(model.buffers()) + list(new)
    started = time.perf_counter()
    reuse_plan = optimized.prepare(*new)
    reuse_s = time.perf_counter() - started
    started = time.perf_counter()
    step = capture(model, new)
    graph = profile(step, model, new, repeats=1)
    budget_bytes = resolve_budget(fraction, graph).budget_bytes
    profile_plan = solve(graph, budget_bytes)
    profile_s = time.perf_counter() - started
    # the planning calls' own peaks (the planner directly: its result is not cached)
    for parameter in model.parameters():
        parameter.grad = None
    _, reuse_planning_peak = measure_allocator_peak(
        lambda: optimized._planner.plan(model, new, None, start=optimized.plan), resident)
    _, profile_planning_peak = measure_allocator_peak(lambda: profile(step, model, new, repeats=1), resident)
    truth = profile(step, model, new, repeats=truth_repeats)
    row = {"budget_bytes": budget_bytes, "reuse_plan_s": reuse_s, "profile_plan_s": profile_s,
           "reuse_planning_peak_bytes": reuse_planning_peak, "profile_planning_peak_bytes": profile_planning_peak}
    for label, plan in (("reuse", reuse_plan), ("profile", profile_plan)):
        result = simulate(truth, plan, check_hash=False)
        row[f"{label}_overhead"] = result.time_ms / truth.total_time_ms - 1
        row[f"{label}_peak_on_truth_bytes"] = result.peak_bytes
        row[f"{label}_source"] = plan.options.get("source", plan.solver)
    for parameter in model.parameters():
        parameter.grad = None
    _, row["reuse_step_peak_bytes"] = measure_allocator_peak(lambda: train_step(optimized, new), resident)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt", "resnet"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--truth-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": "python experiments/new_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "git": git_revision(), "device": device_description(), "torch": torch.__version__, "models": {}}
    for name in args.models:
        rows = []
        for fraction in args.fractions:
            torch.manual_seed(0)
            model, inputs = zoo.make(name, size=args.size, seed=0)
            try:
                optimized = optimize(model, fraction, inputs)
            except InfeasibleBudgetError as error:
                print(f"{name} at {fraction}: {str(error).splitlines()[0]}", file=sys.stderr)
                continue
            for label, new in new_shapes(name, inputs).items():
                try:
                    row = case(model, optimized, new, fraction, args.truth_repeats)
                except InfeasibleBudgetError as error:
                    print(f"{name} {label} at {fraction}: {str(error).splitlines()[0]}", file=sys.stderr)
                    continue
                row.update(shape=label, fraction=fraction)
                rows.append(row)
                print(f"{name} {label} at {fraction}: plan {row['reuse_plan_s']:.2f} s (profile {row['profile_plan_s']:.2f} s); "
                      f"overhead {row['reuse_overhead']:+.3f} ({row['profile_overhead']:+.3f}); planning peak "
                      f"{row['reuse_planning_peak_bytes'] / 2**20:.1f} MiB ({row['profile_planning_peak_bytes'] / 2**20:.1f}) "
                      f"of budget {row['budget_bytes'] / 2**20:.1f}; step peak {row['reuse_step_peak_bytes'] / 2**20:.1f}, "
                      f"on truth {row['reuse_peak_on_truth_bytes'] / 2**20:.1f}", flush=True)
        results["models"][name] = rows
    write_results("new_shapes", results)


if __name__ == "__main__":
    main()
