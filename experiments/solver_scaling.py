"""Solve time and plan quality against graph size: GPT-style models of 2 to 48 blocks and a
U-Net, at a fraction of activation memory, for each solver on the same profiled graph.

    python experiments/solver_scaling.py [--blocks 2 4 8 12 24 48] [--fraction 0.5]
        [--solvers hierarchical greedy every_block ilp] [--ilp-max-ops 400] [--ilp-time-limit 60]
        [--greedy-max-ops 1500] [--sweep-blocks 12 48] [--sweep-fractions 0.01 0.02 ... 1.0]

Plan quality is the predicted overhead (simulated time / keep-all time - 1; every plan is
replayed by `solvers.simulate`, which agrees with the measured peak, see
experiments/budget_sweep.py). `ilp` runs only on graphs up to --ilp-max-ops ops, `greedy`
(O(R) full replays) up to --greedy-max-ops. Each row also gives hierarchical's overhead at
every_block's own measured peak (``at_every_block_peak``), every_block being given the same
budget but using less of it. On the --sweep-blocks models hierarchical also runs at every
--sweep-fractions budget (``any_budget``: solve time, infeasible verdicts included, against
the targets of 10 s at 12 blocks and 60 s at 48).
Writes experiments/results/solver_scaling.json and solver_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import RESULTS, device_description, git_revision, write_results
from planner import zoo
from planner.budget import resolve_budget
from planner.capture import capture
from planner.profile import profile
from planner.zoo import GPT
from solvers import solve
from solvers.errors import InfeasibleBudgetError, SolverUnavailableError
from solvers.portfolio import GREEDY_FALLBACK_MAX_OPS


def gpt_graph(blocks: int):
    torch.manual_seed(0)
    model = GPT(n_layer=blocks, n_head=4, d_model=256, seq_len=128, vocab_size=1024, dropout=0.1)
    inputs = (torch.randint(0, 1024, (8, 128)), torch.randint(0, 1024, (8, 128)))
    return model, inputs


def measure(name: str, model: torch.nn.Module, inputs: tuple, fraction: float, solvers: list[str],
            max_ops: dict[str, int], ilp_time_limit_s: float, sweep_fractions: list[float] | None = None) -> dict:
    started = time.perf_counter()
    graph = profile(capture(model, inputs), model, inputs, repeats=3)
    row = {"model": name, "ops": len(graph.ops), "trace_and_profile_s": time.perf_counter() - started,
           "fraction": fraction, "solvers": {}}
    budget_bytes = resolve_budget(fraction, graph).budget_bytes
    for solver in solvers:
        if len(graph.ops) > max_ops.get(solver, len(graph.ops)):
            row["solvers"][solver] = {"skipped": f"more than {max_ops[solver]} ops"}
            continue
        options = {"time_limit_s": ilp_time_limit_s} if solver == "ilp" else {}
        started = time.perf_counter()
        try:
            plan = solve(graph, budget_bytes, solver, **options)
        except (InfeasibleBudgetError, SolverUnavailableError) as error:
            row["solvers"][solver] = {"error": str(error).splitlines()[0], "solve_s": time.perf_counter() - started}
            continue
        row["solvers"][solver] = {"solve_s": time.perf_counter() - started, "overhead": plan.overhead,
                                  "peak_bytes": plan.predicted_peak_bytes, "budget_bytes": budget_bytes,
                                  "optimal": plan.optimal, "gap": plan.gap, "solver": plan.solver}
    every_block = row["solvers"].get("every_block", {})
    if "peak_bytes" in every_block and "hierarchical" in solvers:
        # the same comparison at every_block's own (lower) peak: hierarchical given exactly that budget
        plan = solve(graph, every_block["peak_bytes"], "hierarchical")
        row["at_every_block_peak"] = {"budget_bytes": every_block["peak_bytes"],
                                      "hierarchical_overhead": plan.overhead,
                                      "every_block_overhead": every_block["overhead"],
                                      "ratio": plan.overhead / every_block["overhead"]}
    if sweep_fractions:
        row["any_budget"] = sweep_budgets(graph, sweep_fractions)
    print(json.dumps(row), flush=True)
    return row


def sweep_budgets(graph, fractions: list[float]) -> dict:
    """hierarchical at many budgets, down to below the least one it fits: the solve time
    target holds "at any budget", infeasible verdicts included."""
    points = []
    for fraction in sorted(fractions):
        budget_bytes = resolve_budget(fraction, graph).budget_bytes
        started = time.perf_counter()
        try:
            plan = solve(graph, budget_bytes, "hierarchical")
        except InfeasibleBudgetError as error:
            points.append({"fraction": fraction, "budget_bytes": budget_bytes, "solve_s": time.perf_counter() - started,
                           "infeasible": True, "least_feasible_bytes": error.least_feasible_bytes})
            continue
        points.append({"fraction": fraction, "budget_bytes": budget_bytes, "solve_s": time.perf_counter() - started,
                       "overhead": plan.overhead, "peak_bytes": plan.predicted_peak_bytes,
                       "source": plan.options.get("source") or plan.options.get("fallback") or "segment options"})
    return {"points": points, "max_solve_s": max(point["solve_s"] for point in points)}


def plot(results: dict) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results["rows"] if r["model"].startswith("gpt")]
    swept = [r for r in rows if "any_budget" in r]
    figure, axes = plt.subplots(1, 3 if swept else 2, figsize=(15 if swept else 10, 4))
    time_axis, quality_axis = axes[0], axes[1]
    for row in swept:
        points = row["any_budget"]["points"]
        axes[2].plot([100 * p["fraction"] for p in points], [p["solve_s"] for p in points], marker="o",
                     label=f"{row['model']} ({row['ops']} ops)")
        axes[2].scatter([100 * p["fraction"] for p in points if p.get("infeasible")],
                        [p["solve_s"] for p in points if p.get("infeasible")], marker="x", color="black", zorder=3)
    if swept:
        for seconds, label in ((10, "target, 12 blocks"), (60, "target, 48 blocks")):
            axes[2].axhline(seconds, linestyle="--", linewidth=0.8, color="grey")
            axes[2].annotate(label, (50, seconds), fontsize=7, color="grey", va="bottom", ha="center")
        axes[2].set(xlabel="budget (% of activation memory; x: infeasible)", ylabel="hierarchical solve time (s)",
                    yscale="log")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    for solver in results["solvers"]:
        points = [(r["ops"], r["solvers"][solver]) for r in rows if "solve_s" in r["solvers"].get(solver, {})
                  and "overhead" in r["solvers"][solver]]
        if not points:
            continue
        time_axis.plot([p[0] for p in points], [p[1]["solve_s"] for p in points], marker="o", label=solver)
        quality_axis.plot([p[0] for p in points], [100 * p[1]["overhead"] for p in points], marker="o", label=solver)
    time_axis.set(xlabel="ops in the joint graph", ylabel="solve time (s)", xscale="log", yscale="log")
    quality_axis.set(xlabel="ops in the joint graph", ylabel="predicted overhead (%)", xscale="log")
    for axis in (time_axis, quality_axis):
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"GPT-style models at {results['fraction']:.0%} of activation memory, {results['device']}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(RESULTS / "solver_scaling.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[2, 4, 8, 12, 24, 48])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--solvers", nargs="+", default=["hierarchical", "greedy", "every_block", "ilp"])
    parser.add_argument("--ilp-max-ops", type=int, default=400)
    parser.add_argument("--ilp-time-limit", type=float, default=60.0)
    parser.add_argument("--greedy-max-ops", type=int, default=GREEDY_FALLBACK_MAX_OPS)
    parser.add_argument("--no-unet", action="store_true")
    parser.add_argument("--sweep-blocks", nargs="*", type=int, default=[12, 48],
                        help="models on which hierarchical also runs at every --sweep-fractions budget")
    parser.add_argument("--sweep-fractions", nargs="+", type=float,
                        default=[0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads((RESULTS / "solver_scaling.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    max_ops = {"ilp": args.ilp_max_ops, "greedy": args.greedy_max_ops}
    rows = [measure(f"gpt-{blocks}", *gpt_graph(blocks), args.fraction, args.solvers, max_ops, args.ilp_time_limit,
                    args.sweep_fractions if blocks in args.sweep_blocks else None)
            for blocks in args.blocks]
    if not args.no_unet:
        rows.append(measure("unet-small", *zoo.make("unet", "small"), args.fraction, args.solvers, max_ops,
                            args.ilp_time_limit))
    results = {"command": " ".join(["python", "experiments/solver_scaling.py", *(argv or sys.argv[1:])]),
               "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
               "fraction": args.fraction, "solvers": args.solvers, "rows": rows}
    write_results("solver_scaling", results, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
