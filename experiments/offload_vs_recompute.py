"""Recompute-only against recompute+offload plans, from 100 % of activation memory down to
the least feasible budget, on the GPT-style and U-Net models: the best plan of every solver
(``auto``) and the chain DP alone (Rotor, and with offloaded checkpoints as in Beaumont et
al., NeurIPS 2021).

Both plans are made for the same profiled graph; the offload plans use a named transfer
profile (default H100 on PCIe 5), so the overheads are predicted by `solvers.simulate`
(copies overlap compute on their own channels). On a CUDA machine, pass --target measured
to use the bandwidth measured there.

Caveat for figures made on a CPU: the op times are the CPU's, orders of magnitude slower
than the target GPU's, so copies hide behind compute far more easily than they would on
that GPU. Such figures show the planner choosing offload; the benefit itself must be
measured on the GPU.

    python experiments/offload_vs_recompute.py [--models gpt unet gpt12] [--size small]
        [--fractions 1.0 0.7 0.5 0.4 0.3 0.25 0.2 0.15 0.1] [--target h100-pcie5] [--output NAME]

Writes experiments/results/offload_vs_recompute.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from common import RESULTS, device_description, git_revision, write_results
from planner import zoo
from planner.budget import resolve_budget
from planner.capture import capture
from planner.profile import measure_transfer, profile
from solvers import Decision, solve
from solvers.errors import InfeasibleBudgetError
from solvers.graph import TARGETS


# (label, solver, offload allowed): the best of every solver, and the chain DP alone
SERIES = (("recompute_only", "auto", False), ("recompute_offload", "auto", True),
          ("chain_recompute_only", "chain", False), ("chain_offload", "chain", True))


def _model(name: str, size: str) -> tuple[torch.nn.Module, tuple]:
    """A zoo model, or ``gpt12``: the small GPT with 12 blocks (1,363 ops), where `auto`
    runs `hierarchical` (the graph size at which offload used to disappear)."""
    if name != "gpt12":
        return zoo.make(name, size=size, seed=0)
    torch.manual_seed(0)
    model = zoo.GPT(n_layer=12, n_head=4, d_model=256, seq_len=128, vocab_size=1024, dropout=0.1)
    idx = torch.randint(1024, (8, 128))
    return model, (idx, idx)


def overheads(graph, fraction: float) -> dict:
    budget_bytes = resolve_budget(fraction, graph).budget_bytes
    row: dict = {"fraction": fraction, "budget_bytes": budget_bytes}
    for label, solver, offload in SERIES:
        planned = graph if offload else dataclasses.replace(
            graph, transfer=dataclasses.replace(graph.transfer, source="nominal (offload off)"))
        try:
            plan = solve(planned, budget_bytes, solver)
        except InfeasibleBudgetError as error:
            row[label] = {"infeasible": error.least_feasible_bytes}
            continue
        row[label] = {"overhead": plan.overhead, "solver": plan.solver,
                      "offloaded": sum(d is Decision.OFFLOAD for d in plan.decisions.values()),
                      "recomputed": sum(d is Decision.RECOMPUTE for d in plan.decisions.values())}
    return row


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(results["models"]), figsize=(5 * len(results["models"]), 4), squeeze=False)
    for axis, (name, rows) in zip(axes[0], results["models"].items()):
        for label, _, _ in SERIES:
            points = [(r["fraction"], r[label]["overhead"]) for r in rows if "overhead" in r.get(label, {})]
            axis.plot([100 * p[0] for p in points], [100 * p[1] for p in points], marker="o",
                      label=label.replace("_", " "))
        axis.set(title=name, xlabel="budget (% of activation memory)", ylabel="predicted overhead (%)")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"transfers: {results['transfer']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(RESULTS / "offload_vs_recompute.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt", "unet"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--fractions", nargs="+", type=float,
                        default=[1.0, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1])
    parser.add_argument("--target", default="h100-pcie5", help=f"one of {sorted(TARGETS)} or 'measured' (CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="offload_vs_recompute", help="results/<output>.json (the plot only "
                        "for the default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python", "experiments/offload_vs_recompute.py", *(argv or sys.argv[1:])]),
               "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
               "models": {}}
    for name in args.models:
        model, inputs = _model(name, args.size)
        device = next(model.parameters()).device
        transfer = measure_transfer(device) if args.target == "measured" else TARGETS[args.target]
        graph = profile(capture(model, inputs), model, inputs, repeats=3, transfer=transfer)
        results["transfer"] = transfer.source
        results["models"][name] = [overheads(graph, fraction) for fraction in args.fractions]
        for row in results["models"][name]:
            print(name, json.dumps(row), flush=True)
    write_results(args.output, results, plot if args.output == "offload_vs_recompute" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
