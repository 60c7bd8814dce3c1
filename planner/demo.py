"""``memsched-demo``: optimize a built-in model at a budget and measure what it did.

Prints the plain step's measured peak, the budget, the optimized step's measured and
predicted peaks, the measured time overhead (round-robin medians, same process), and
checks that loss and every gradient equal the plain model's.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from planner import zoo
from planner.api import optimize
from planner.benchmark import step_memory, step_times_ms, train_step
from solvers.errors import MemschedError, format_bytes


def _command_line_budget(text: str) -> int | float | str:
    """``--budget``: a number is a fraction (with a point) or bytes, anything else a size string."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memsched-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt", choices=sorted(zoo.ZOO), help="built-in model (default gpt)")
    parser.add_argument("--size", default="small", choices=["tiny", "small"], help="model size (default small)")
    parser.add_argument("--budget", default="0.5",
                        help="bytes, a size like 60MiB, or a fraction of activation memory (default 0.5)")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--save-plan", metavar="PATH", help="write the plan (JSON) for plan-inspect")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, inputs = zoo.make(args.model, size=args.size, seed=0)
    plain = copy.deepcopy(model)
    plain_memory = step_memory(plain, inputs)
    started = time.perf_counter()
    try:
        optimized = optimize(model, _command_line_budget(args.budget), inputs, solver=args.solver)
    except MemschedError as error:
        console.print(f"[red]{type(error).__name__}[/red]: {error}")
        return 1
    planning_s = time.perf_counter() - started
    plan = optimized.plan
    if args.save_plan:
        plan.save(args.save_plan)
    optimized_memory = step_memory(optimized, inputs)

    torch.manual_seed(1)
    loss_plain = train_step(plain, inputs)
    torch.manual_seed(1)
    loss_optimized = train_step(optimized, inputs)
    mismatched = [name for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters())
                  if not torch.allclose(p.grad, q.grad, rtol=1.3e-6, atol=1e-5)]
    times = step_times_ms({"plain": lambda: train_step(plain, inputs),
                           "optimized": lambda: train_step(optimized, inputs)}, repeats=args.steps)

    table = Table(title=f"memsched on {args.model} ({args.size}), {sum(p.numel() for p in model.parameters()):,} "
                        f"parameters, {torch.get_num_threads()} CPU thread(s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    predicted_error = plan.predicted_peak_bytes / optimized_memory.peak_bytes - 1
    rows = [
        ("plain step peak (measured)", format_bytes(plain_memory.peak_bytes)),
        ("budget", f"{format_bytes(plan.budget_bytes)} ({args.budget})"),
        ("optimized step peak (measured)", format_bytes(optimized_memory.peak_bytes)),
        ("optimized step peak (predicted)", f"{format_bytes(plan.predicted_peak_bytes)} ({predicted_error:+.1%})"),
        ("peak <= budget", "yes" if optimized_memory.peak_bytes <= plan.budget_bytes else "NO"),
        ("time overhead (measured, median of round-robin steps)", f"{times['optimized'] / times['plain'] - 1:+.1%}"),
        ("time overhead (predicted)", f"{plan.overhead:+.1%}"),
        ("solver / planning time", f"{plan.solver} / {planning_s:.1f} s"),
        ("loss plain / optimized", f"{loss_plain.item():.6f} / {loss_optimized.item():.6f}"),
        ("gradients equal", "yes" if not mismatched else f"NO: {mismatched[:3]}"),
        ("memory measured by", optimized_memory.method),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    ok = optimized_memory.peak_bytes <= plan.budget_bytes and not mismatched
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
