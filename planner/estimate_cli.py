"""``memsched-estimate``: will this model train on that GPU, at what batch, how slowly?

    memsched-estimate gpt2-xl --target h100-sxm --batch 8 --autocast bf16
    memsched-estimate llama-3.2-3b --target h100-sxm --autocast bf16 --max-batch --max-overhead 0.1
    memsched-estimate mypkg.models:build --seq 512 --target l4 --budget 20GiB --save-plan plan.json

MODEL is a preset (`planner.presets`: gpt2, gpt2-xl, llama-3.2-1b, llama-3.2-3b, llama-2-7b,
vit-h-14) or ``module:function``, a function of ``(batch_size, seq_len)`` returning
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``; build the model
under ``torch.device("meta")`` to plan one larger than this machine. Nothing runs on a
real tensor (`planner.estimate`). The report goes to stdout (``--json`` for JSON), progress
to stderr. Exit codes: 0 fits, 1 does not fit, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from planner.errors import OptionError
from planner.estimate import (OPTIMIZER_STATE_BYTES_PER_PARAMETER, Estimate, estimate_step, largest_batch,
                              usable_bytes)
from planner.presets import PRESETS, preset
from solvers.errors import InfeasibleBudgetError, MemschedError, format_bytes
from solvers.targets import DEVICE_TARGETS, device_target

PROG = "memsched-estimate"


def resolve_builder(spec: str) -> tuple[Any, int | None]:
    """``(build(batch_size, seq_len), default seq_len)`` for a preset name or ``module:function``."""
    if spec in PRESETS:
        chosen = preset(spec)
        return chosen.build, chosen.default_seq_len
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise OptionError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise OptionError(f"cannot load builder {spec!r}: {error}") from error

    def build(batch_size: int, seq_len: int) -> tuple[Any, tuple, dict]:
        built = function(batch_size, seq_len)
        if not isinstance(built, tuple) or len(built) not in (2, 3):
            raise OptionError(f"builder {spec!r} returned {type(built).__name__}; return (model, example_inputs) "
                              "or (model, example_inputs, example_kwargs)")
        model, inputs, kwargs = (*built, {}) if len(built) == 2 else built
        return model, inputs if isinstance(inputs, (tuple, list)) else (inputs,), dict(kwargs or {})
    return build, None


def _budget_argument(text: str) -> str | float:
    """A plain number is a fraction of activation memory (`planner.budget.parse_budget`
    refuses one outside (0, 1] with the fix); anything else is passed on as written."""
    try:
        return float(text)
    except ValueError:
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or module:function")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (image side for ViT); "
                        "default: the preset's")
    parser.add_argument("--target", default="h100-sxm", help=f"one of {', '.join(DEVICE_TARGETS)}")
    parser.add_argument("--optimizer", default="adamw",
                        choices=[k for k in OPTIMIZER_STATE_BYTES_PER_PARAMETER if k] + ["none"])
    parser.add_argument("--autocast", default="none", choices=["bf16", "fp16", "none"])
    parser.add_argument("--budget", default="device",
                        help="'device' (the target's memory less a reserve), a size such as '40GiB', or a fraction")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--chunked-loss", action="store_true",
                        help="run the head and its cross-entropy in chunks of rows, so that the logits are never "
                             "whole (planner.chunked_loss); overheads are then over keeping all of that step")
    parser.add_argument("--max-batch", action="store_true", help="also find the largest batch that fits")
    parser.add_argument("--max-overhead", type=float, default=None,
                        help="with --max-batch: the largest predicted overhead allowed (0.1 = +10 %%)")
    parser.add_argument("--batch-limit", type=int, default=4096, help="with --max-batch: the largest batch tried")
    parser.add_argument("--save-plan", default=None, help="write the plan (with its graph) for plan-inspect")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    return parser


def _report(result: Estimate) -> dict[str, Any]:
    m = result.memory
    return {"model": result.graph.name, "target": result.target.name, "ops": len(result.graph.ops),
            "budget_bytes": result.budget_bytes, "usable_bytes": usable_bytes(result.target),
            "peak_bytes": m.peak_bytes, "parameter_bytes": m.parameter_bytes, "gradient_bytes": m.gradient_bytes,
            "optimizer_state_bytes": m.optimizer_state_bytes, "input_bytes": m.input_bytes,
            "activation_bytes": m.activation_bytes, "step_time_ms": result.plan.predicted_time_ms,
            "keep_all_time_ms": result.keep_all_time_ms, "overhead": result.plan.overhead,
            "solver": result.plan.solver, "fits": result.fits, "estimate_time_s": result.estimate_time_s}


def _print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{report['model']} on {report['target']} ({report['ops']} ops, {report['solver']})")
    table.add_column("")
    table.add_column("", justify="right")
    for label, key in (("parameters", "parameter_bytes"), ("gradients", "gradient_bytes"),
                       ("optimizer state", "optimizer_state_bytes"), ("inputs", "input_bytes"),
                       ("activations (at the peak)", "activation_bytes"), ("peak", "peak_bytes"),
                       ("budget", "budget_bytes"), ("usable on the target", "usable_bytes")):
        table.add_row(label, format_bytes(report[key]))
    kept = "keeping all, loss chunked" if report.get("chunked_loss") else "keeping all"
    table.add_row("step time", f"{report['step_time_ms']:.1f} ms ({report['overhead']:+.1%} over {kept})")
    table.add_row("fits", "yes" if report["fits"] else "no")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    progress = False if args.no_progress else None
    options = dict(target=args.target, optimizer=None if args.optimizer == "none" else args.optimizer,
                   autocast=None if args.autocast == "none" else args.autocast, solver=args.solver,
                   chunked_loss=args.chunked_loss, progress=progress)
    budget: Any = args.budget
    try:
        device_target(args.target)
        budget = _budget_argument(budget)
        build, default_seq = resolve_builder(args.model)
        seq_len = args.seq or default_seq
        if seq_len is None:
            raise OptionError(f"give --seq for builder {args.model!r}")
        model, inputs, kwargs = build(args.batch, seq_len)
        output: dict[str, Any] = {"batch_size": args.batch, "seq_len": seq_len, "chunked_loss": args.chunked_loss}
        try:
            result = estimate_step(model, budget, inputs, example_kwargs=kwargs, **options)
            output.update(_report(result))
        except InfeasibleBudgetError as error:
            result = None
            output.update({"fits": False, "why": str(error)})
        if args.max_batch:
            search = largest_batch(functools.partial(build, seq_len=seq_len), budget=budget,
                                   max_overhead=args.max_overhead, limit=args.batch_limit, **options)
            output["largest_batch"] = {"batch_size": search.batch_size, "tokens_per_step": search.batch_size * seq_len,
                                       "max_overhead": args.max_overhead,
                                       "overhead": search.estimate.plan.overhead if search.estimate else None,
                                       "probes": [probe.__dict__ for probe in search.probes]}
        if args.save_plan and result is not None:
            result.plan.save(args.save_plan)
    except MemschedError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(output, indent=1))
    else:
        if result is not None:
            _print_report(output, console)
        else:
            console.print(f"batch {args.batch} x {seq_len} does not fit: {output['why']}")
        if args.max_batch:
            found = output["largest_batch"]
            limit = "" if args.max_overhead is None else f" at <= {args.max_overhead:+.0%} overhead"
            console.print(f"largest batch that fits{limit}: {found['batch_size']} "
                          f"({found['tokens_per_step']} tokens per step)")
        if args.save_plan and result is not None:
            console.print(f"plan written to {args.save_plan} (plan-inspect {args.save_plan})")
    return 0 if output.get("fits") else 1


if __name__ == "__main__":
    sys.exit(main())
