"""How far `hierarchical` is from the proved optimum of `ilp`, on small real traced graphs.

Target of the "Optimal solvers" issue: where `ilp` proves an optimum, `hierarchical` is
within 3 % of it in step time. The full-graph MILP proves nothing within a minute on the
zoo's small models (263+ ops), so this table uses models small enough for it: an MLP, a
one- and a two-block GPT with small dimensions, a one- and a two-block ResNet, a depth-1
U-Net, each traced and profiled on this machine (op times are this CPU's).

Budgets are fractions of the range between the least known feasible peak (the smallest
simulated peak of greedy, every_block, sqrt_n and chain at their tightest) and the keep-all
peak: ``least + f * (keep_all - least)``. Both plans are replayed by `solvers.simulate` on
the same graph, so the ratio compares like with like. `ilp` searches its own plan space
(forward once, in-stage recomputation in graph order); a hierarchical plan may lie outside
it, so a ratio below 1 is possible and not a contradiction.

    python experiments/hierarchical_vs_ilp.py [--models mlp gpt1 gpt2 resnet1 resnet2 unet1]
        [--fractions 0.9 0.7 0.5 0.3] [--ilp-time-limit 300]

Writes experiments/results/hierarchical_vs_ilp.json (with the command, git revision and
device) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch

from common import device_description, git_revision, write_results
from planner.capture import capture
from planner.profile import profile
from planner.zoo import GPT, MLP, ResNet, UNet
from solvers import Graph, simulate, solve
from solvers.errors import InfeasibleBudgetError, SolverUnavailableError
from solvers.kernel.bounds import least_feasible_lower_bound

TARGET_RATIO = 1.03


def _gpt(blocks: int) -> tuple[torch.nn.Module, tuple]:
    model = GPT(n_layer=blocks, n_head=2, d_model=32, seq_len=16, vocab_size=64, dropout=0.1)
    stream = torch.randint(64, (2, 17))
    return model, (stream[:, :-1].contiguous(), stream[:, 1:].contiguous())


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple]]] = {
    "mlp": lambda: (MLP(32, 64, 10, n_layer=4), (torch.randn(64, 32),)),
    "gpt1": lambda: _gpt(1),
    "gpt2": lambda: _gpt(2),
    "resnet1": lambda: (ResNet(widths=(8,), blocks_per_stage=1), (torch.randn(2, 3, 8, 8),)),
    "resnet2": lambda: (ResNet(widths=(8, 16), blocks_per_stage=1), (torch.randn(2, 3, 8, 8),)),
    "unet1": lambda: (UNet(base_channels=4, depth=1), (torch.randn(2, 3, 8, 8),)),
}


def least_known_feasible(graph: Graph) -> tuple[int, str]:
    """The smallest simulated peak among the heuristics' plans at their tightest, and whose."""
    floor = least_feasible_lower_bound(graph).total
    found: list[tuple[int, str]] = []
    for solver in ("greedy", "every_block", "sqrt_n", "chain"):
        try:
            found.append((simulate(graph, solve(graph, floor, solver)).peak_bytes, solver))
        except InfeasibleBudgetError as error:
            if error.least_feasible_bytes > floor:   # a peak the solver reached, not the bound
                found.append((error.least_feasible_bytes, solver))
    return min(found)


def compare(graph: Graph, budget_bytes: int, ilp_time_limit_s: float) -> dict:
    row: dict = {"budget_bytes": budget_bytes}
    started = time.perf_counter()
    try:
        ilp = solve(graph, budget_bytes, "ilp", time_limit_s=ilp_time_limit_s)
    except (InfeasibleBudgetError, SolverUnavailableError) as error:
        row["ilp"] = {"error": str(error).splitlines()[0], "solve_s": time.perf_counter() - started}
    else:
        base = graph.total_time_ms
        recompute_bound = (ilp.predicted_time_ms - base) * (1 - ilp.gap) if ilp.gap is not None else None
        row["ilp"] = {"time_ms": ilp.predicted_time_ms, "optimal": ilp.optimal, "gap": ilp.gap,
                      "bound_ms": base + recompute_bound if recompute_bound is not None else None,
                      "peak_bytes": ilp.predicted_peak_bytes, "solve_s": time.perf_counter() - started,
                      "variables": ilp.options.get("variables"), "binaries": ilp.options.get("binaries")}
    started = time.perf_counter()
    try:
        plan = solve(graph, budget_bytes, "hierarchical")
    except InfeasibleBudgetError as error:
        row["hierarchical"] = {"error": str(error).splitlines()[0], "solve_s": time.perf_counter() - started}
    else:
        result = simulate(graph, plan)
        row["hierarchical"] = {"time_ms": result.time_ms, "peak_bytes": result.peak_bytes,
                               "solve_s": time.perf_counter() - started,
                               **{key: plan.options[key] for key in ("segments", "fallback", "exact_options")
                                  if key in plan.options}}
    if "time_ms" in row["ilp"] and "time_ms" in row["hierarchical"]:
        row["ratio"] = row["hierarchical"]["time_ms"] / row["ilp"]["time_ms"]
        if row["ilp"]["bound_ms"]:
            row["ratio_to_bound"] = row["hierarchical"]["time_ms"] / row["ilp"]["bound_ms"]
    return row


def measure(name: str, fractions: list[float], ilp_time_limit_s: float) -> dict:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    graph = profile(capture(model, inputs), model, inputs, repeats=5)
    keep_all = simulate(graph, solve(graph, 10**18, "none")).peak_bytes
    least, least_by = least_known_feasible(graph)
    result = {"model": name, "ops": len(graph.ops), "forward_ops": len(graph.forward_ops),
              "backward_ops": len(graph.backward_ops), "keep_all_time_ms": graph.total_time_ms,
              "keep_all_peak_bytes": keep_all, "least_known_feasible_bytes": least, "least_known_by": least_by,
              "budgets": []}
    for fraction in fractions:
        row = {"fraction": fraction, **compare(graph, least + int(fraction * (keep_all - least)), ilp_time_limit_s)}
        result["budgets"].append(row)
        print(json.dumps({"model": name, "ops": len(graph.ops), **row}), flush=True)
    return result


def table(results: dict) -> str:
    lines = ["| model | ops | budget | ilp ms (gap) | hierarchical ms | ratio | ilp s | hierarchical s |",
             "|---|---|---|---|---|---|---|---|"]
    for model in results["models"]:
        for row in model["budgets"]:
            ilp, hierarchical = row["ilp"], row["hierarchical"]
            if "time_ms" in ilp:
                proof = "optimal" if ilp["optimal"] else f"gap {ilp['gap']:.1%}" if ilp["gap"] is not None else "no bound"
                ilp_text = f"{ilp['time_ms']:.3f} ({proof})"
            else:
                ilp_text = ilp["error"][:40]
            hier_text = f"{hierarchical['time_ms']:.3f}" if "time_ms" in hierarchical else hierarchical["error"][:40]
            ratio = f"{row['ratio']:.4f}" if "ratio" in row else "-"
            lines.append(f"| {model['model']} | {model['ops']} | {row['fraction']:.0%} ({row['budget_bytes']} B) | "
                         f"{ilp_text} | {hier_text} | {ratio} | {ilp['solve_s']:.1f} | "
                         f"{hierarchical['solve_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.9, 0.7, 0.5, 0.3])
    parser.add_argument("--ilp-time-limit", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [measure(name, args.fractions, args.ilp_time_limit) for name in args.models]
    proved = [row for model in models for row in model["budgets"]
              if row["ilp"].get("optimal") and "ratio" in row]
    results = {"command": " ".join(["python", "experiments/hierarchical_vs_ilp.py", *(argv or sys.argv[1:])]),
               "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
               "fractions": args.fractions, "ilp_time_limit_s": args.ilp_time_limit,
               "target_ratio": TARGET_RATIO, "models": models,
               "summary": {"proved_budgets": len(proved),
                           "worst_ratio": max((row["ratio"] for row in proved), default=None),
                           "within_target": all(row["ratio"] <= TARGET_RATIO for row in proved)}}
    write_results("hierarchical_vs_ilp", results)
    print(table(results))
    print(json.dumps(results["summary"]))
    return 0 if results["summary"]["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
