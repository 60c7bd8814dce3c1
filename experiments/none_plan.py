"""memsched with nothing dropped (``solver="none"``) against the plain eager step, on the
five real-size models of `real_models.py`: the invariant that memsched never uses more
memory than eager when it drops nothing (docs/design.md, invariant 6), measured from the
allocator's events.

Each model trains one step as in `real_models.py` (the loss only; memsched with
``release_outputs=True``); peaks from `planner.memory.measure_allocator_peak` (parameters,
buffers and inputs included), after a warm-up step; memsched's prediction beside them.

    python experiments/none_plan.py [--models gpt2 bert llama vit resnet50] [--threads 1]

Writes experiments/results/none_plan.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch

from common import device_description, git_revision, write_results
from real_models import BUILDERS, MiB, train_step
from planner import optimize
from planner.memory import measure_allocator_peak


def peak_bytes(module: torch.nn.Module, model: torch.nn.Module, batch: dict, resident: list) -> int:
    train_step(module, batch)                          # warm-up: lazy initialisation
    model.zero_grad(set_to_none=True)
    _, measured = measure_allocator_peak(partial(train_step, module, batch), resident)
    model.zero_grad(set_to_none=True)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python", "experiments/none_plan.py", *sys.argv[1:]]),
               "git_revision": git_revision(), "device": device_description(),
               "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}}
    worst = 0.0
    for name in args.models:
        torch.manual_seed(0)
        workload = BUILDERS[name](False)
        model, batch = workload.model, workload.batch
        model.train()
        resident = list(model.parameters()) + list(model.buffers()) + list(batch.values())
        eager_bytes = peak_bytes(model, model, batch, resident)
        optimized = optimize(model, 1.0, (), example_kwargs=batch, solver="none", release_outputs=True,
                             repeats=1, progress=False)
        none_bytes = peak_bytes(optimized, model, batch, resident)
        results["models"][name] = {"description": workload.description, "eager_peak_bytes": eager_bytes,
                                   "none_plan_peak_bytes": none_bytes,
                                   "none_plan_predicted_bytes": optimized.plan.predicted_peak_bytes,
                                   "ratio": none_bytes / eager_bytes}
        worst = max(worst, none_bytes / eager_bytes)
        print(f"{name:9s} eager {eager_bytes / MiB:8.1f} MiB   memsched none {none_bytes / MiB:8.1f} MiB "
              f"(predicted {optimized.plan.predicted_peak_bytes / MiB:.1f})   x{none_bytes / eager_bytes:.3f}",
              flush=True)
        write_results("none_plan", results)
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
