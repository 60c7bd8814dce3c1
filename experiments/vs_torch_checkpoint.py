"""memsched against PyTorch's own activation checkpointing, side by side in one process.

The GPT-style zoo model with ``torch.utils.checkpoint`` around every block is measured
first (peak by the project's storage tracker, time as a ratio to the plain step). memsched
then plans the plain model for a budget equal to that measured peak, with each solver,
and is measured the same way: at the same peak, which costs less time?

    python experiments/vs_torch_checkpoint.py [--size small] [--solvers auto every_block] [--steps 10]

Writes experiments/results/vs_torch_checkpoint.json.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch.utils.checkpoint import checkpoint

from common import device_description, git_revision, write_results
from planner import optimize, zoo
from planner.benchmark import step_memory, step_times_ms, train_step
from solvers.errors import InfeasibleBudgetError


class CheckpointedBlock(torch.nn.Module):
    """A block run under torch.utils.checkpoint (non-reentrant, RNG state preserved)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def checkpoint_every_block(model: torch.nn.Module) -> torch.nn.Module:
    wrapped = copy.deepcopy(model)
    wrapped.blocks = torch.nn.ModuleList(CheckpointedBlock(block) for block in wrapped.blocks)
    return wrapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--solvers", nargs="+", default=["auto", "every_block"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, inputs = zoo.make("gpt", size=args.size, seed=0)
    plain = copy.deepcopy(model)
    checkpointed = checkpoint_every_block(model)
    plain_peak = step_memory(plain, inputs).peak_bytes
    checkpoint_peak = step_memory(checkpointed, inputs).peak_bytes
    methods = {"plain": plain, "torch.utils.checkpoint every block": checkpointed}
    planned = {}
    for solver in args.solvers:
        try:
            optimized = optimize(copy.deepcopy(model), checkpoint_peak, inputs, solver=solver)
        except InfeasibleBudgetError as error:
            planned[solver] = {"infeasible": str(error).splitlines()[0]}
            continue
        label = f"memsched auto (picked {optimized.plan.solver})" if solver == "auto" else f"memsched {solver}"
        methods[label] = optimized
        planned[solver] = {"solver": optimized.plan.solver, "predicted_peak_bytes": optimized.plan.predicted_peak_bytes,
                           "predicted_overhead": optimized.plan.overhead}
    times = step_times_ms({name: (lambda m=m: train_step(m, inputs)) for name, m in methods.items()},
                          repeats=args.steps)
    rows = []
    for name, method in methods.items():
        peak = plain_peak if name == "plain" else step_memory(method, inputs).peak_bytes
        rows.append({"method": name, "measured_peak_bytes": peak, "peak_ratio": peak / plain_peak,
                     "time_ratio": times[name] / times["plain"]})
        print(f"{name:45s} peak {peak / 2**20:8.2f} MiB ({peak / plain_peak:.3f})  time x{times[name] / times['plain']:.3f}")
    results = {"command": " ".join(["python", "experiments/vs_torch_checkpoint.py", *(argv or sys.argv[1:])]),
               "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
               "model": f"zoo gpt {args.size}", "budget_bytes": checkpoint_peak, "plans": planned, "rows": rows}
    write_results("vs_torch_checkpoint", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
