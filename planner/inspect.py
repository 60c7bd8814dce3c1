"""``plan-inspect PLAN.json``: what a saved plan does with every saved activation, and why.

    plan-inspect plan.json                 summary + the 30 largest saved storages
    plan-inspect plan.json --top 0         every saved storage
    plan-inspect plan.json --sort decision recomputed first, then offloaded, then kept
    plan-inspect plan.json --json          the same as JSON (solvers.explain.Explanation)
    plan-inspect pipeline.json             a pipeline plan: one row per stage (ops, parameters,
                                           predicted time and peak), the step and its bubble

A plan file is what `solvers.Plan.save` writes. Plans returned by `solvers.solve` embed
their graph, which the per-storage table needs; for a plan without one only the summary
the plan itself records is shown. Exit codes: 0 ok, 2 unreadable or invalid plan file
(one line on stderr naming the file and the fix).

This module imports no torch (only `solvers`, which is torch-free, and rich), so that it
starts fast and runs on machines without a GPU stack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.errors import PlanFileError
from solvers.errors import MemschedError, format_bytes
from solvers.explain import Explanation, SavedRow, Summary, explain, format_ms, short_target
from solvers.graph import GRAPH_FORMAT
from solvers.pipeline import PIPELINE_FORMAT, PipelinePlan
from solvers.plan import PLAN_FORMAT, Plan
from solvers.recompute_bound import recompute_time_lower_bound

PROG = "plan-inspect"
DEFAULT_TOP = 30
DECISION_ORDER = {"recompute": 0, "offload": 1, "keep": 2}
DECISION_STYLE = {"recompute": "yellow", "offload": "cyan", "keep": ""}
SAVE_HINT = "save the plan again with Plan.save(path) (memsched-demo --save-plan writes one)"


def load_plan(path: str) -> Plan | PipelinePlan:
    """Read a plan file (a `Plan` or a `PipelinePlan`), turning every way it can be wrong
    into a one-line `PlanFileError`."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise PlanFileError(f"{path}: no such file; pass the path of a plan JSON file written by Plan.save() "
                            "(memsched-demo --save-plan PATH writes one)") from None
    except IsADirectoryError:
        raise PlanFileError(f"{path}: is a directory; pass a plan JSON file written by Plan.save()") from None
    except UnicodeDecodeError:
        raise PlanFileError(f"{path}: not a text file; pass a plan JSON file written by Plan.save()") from None
    except OSError as error:
        raise PlanFileError(f"{path}: cannot read it ({error.strerror}); check the path and its permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PlanFileError(f"{path}: not valid JSON ({error.msg}: line {error.lineno} column {error.colno}); "
                            f"the file is corrupt or truncated, {SAVE_HINT}") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found == GRAPH_FORMAT:
        raise PlanFileError(f"{path}: this is a memsched graph, not a plan; plan it first: "
                            "solvers.solve(Graph.load(path), budget_bytes).save('plan.json')")
    if found == PIPELINE_FORMAT:
        try:
            return PipelinePlan.from_json(data)
        except (MemschedError, KeyError, TypeError, ValueError, AttributeError) as error:
            detail = str(error) if isinstance(error, MemschedError) else f"corrupt pipeline plan: {error!r}"
            raise PlanFileError(f"{path}: {_one_line(detail)}; save it again with PipelinePlan.save(path)") from None
    if found != PLAN_FORMAT:
        what = f"format {found!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise PlanFileError(f"{path}: not a memsched plan ({what}, expected format {PLAN_FORMAT!r}); "
                            "pass a file written by Plan.save()")
    try:
        return Plan.from_json(data)
    except (MemschedError, KeyError, TypeError, ValueError, AttributeError) as error:
        detail = str(error) if isinstance(error, MemschedError) else f"corrupt memsched plan: {error!r}"
        raise PlanFileError(f"{path}: {_one_line(detail)}; {SAVE_HINT}") from None


def inspect_plan(path: str) -> Explanation:
    """Load ``path`` and explain it on its embedded graph (summary only when it has none)."""
    plan = load_plan(path)
    if isinstance(plan, PipelinePlan):
        raise PlanFileError(f"{path}: a pipeline plan; inspect it with plan-inspect (render_pipeline)")
    try:
        return explain(plan.graph, plan)
    except MemschedError as error:
        raise PlanFileError(f"{path}: the plan does not replay on its embedded graph ({_one_line(str(error))}); "
                            "re-plan with solvers.solve() and save it again") from None


def sort_rows(rows: Sequence[SavedRow], key: str) -> list[SavedRow]:
    """Rows by ``size`` (largest first), ``name``, or ``decision`` (recompute, offload, keep;
    largest first within each)."""
    if key == "name":
        return sorted(rows, key=lambda row: row.name)
    if key == "decision":
        return sorted(rows, key=lambda row: (DECISION_ORDER.get(row.decision, len(DECISION_ORDER)), -row.size_bytes))
    return sorted(rows, key=lambda row: -row.size_bytes)


# -- rendering ---------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _percent(fraction: float) -> str:
    return f"{fraction:.1%}"


def _solve_time(solve_time_s: float) -> str:
    return f"{solve_time_s:.2f} s" if solve_time_s >= 0.1 else format_ms(solve_time_s * 1000)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def summary_lines(summary: Summary, row_count: int) -> list[tuple[str, str]]:
    """(label, text) pairs of the summary block."""
    if summary.optimal:
        optimality = "proved optimal"
    elif summary.gap is not None:
        optimality = f"optimality not proved (gap {_percent(summary.gap)})"
    else:
        optimality = "optimality not proved"
    lines = [("plan", f"solver {summary.solver}, {optimality}, solved in {_solve_time(summary.solve_time_s)}")]
    graph = f"hash {summary.graph_hash}"
    if summary.has_graph:
        name = f"{summary.graph_name} " if summary.graph_name else ""
        graph = (f"{name}{graph}, {summary.op_count} ops ({summary.forward_op_count} forward, "
                 f"{summary.backward_op_count} backward), {_plural(row_count, 'saved storage')}")
    lines.append(("graph", graph))
    lines.append(("budget", f"{format_bytes(summary.budget_bytes)} ({summary.budget_bytes} bytes)"))
    peak = f"{format_bytes(summary.peak_bytes)}"
    if summary.budget_bytes > 0:
        peak += f" ({_percent(summary.peak_bytes / summary.budget_bytes)} of the budget)"
    if summary.peak_phase is not None:
        if summary.peak_step_index is not None and summary.peak_step_index >= 0:
            peak += f", {summary.peak_phase} step {summary.peak_step_index}: "
            if summary.peak_op is not None:
                where = " @ ".join(part for part in (short_target(summary.peak_op_target or ""),
                                                     summary.peak_op_module) if part)
                peak += f"{summary.peak_op} running" + (f" ({where})" if where else "")
            else:
                peak += f"{summary.peak_step}"
        else:
            peak += ", before the first step (resident memory only)"
    lines.append(("peak", peak))
    lines.append(("time", f"{format_ms(summary.time_ms)}, keep-all {format_ms(summary.baseline_time_ms)}, "
                          f"overhead {summary.overhead_pct:+.2f}%"))
    recompute = f"{_plural(summary.recompute_count, 'saved storage')}"
    if summary.recomputed_saved_bytes is not None:
        recompute += f" ({format_bytes(summary.recomputed_saved_bytes)})"
    recompute += f"; {_plural(summary.recomputed_op_count, 'op')} rerun in the backward"
    details = [_plural(summary.recompute_run_count, "run")]
    if summary.recompute_time_ms is not None:
        details.append(format_ms(summary.recompute_time_ms))
    recompute += f" ({', '.join(details)})"
    lines.append(("recompute", recompute))
    offload = _plural(summary.offload_count, "saved storage")
    if summary.offloaded_bytes is not None:
        offload += f", {format_bytes(summary.offloaded_bytes)} copied to host"
    if summary.stall_ms:
        offload += f", compute waits {format_ms(summary.stall_ms)} for copies"
    lines.append(("offload", offload))
    keep = _plural(summary.keep_count, "saved storage")
    if summary.kept_saved_bytes is not None:
        keep += f" ({format_bytes(summary.kept_saved_bytes)})"
    lines.append(("keep", keep))
    return lines


def render_summary(console: Console, path: str, explanation: Explanation) -> None:
    lines = [("file", path)] + summary_lines(explanation.summary, len(explanation.rows))
    width = max(len(label) for label, _ in lines) + 2
    for label, text in lines:
        console.print(Text.assemble((label.ljust(width), "bold"), text))
    for warning in explanation.summary.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    if not explanation.has_graph:
        console.print(Text(f"{path} has no embedded graph, so the per-storage table, the recompute time and the "
                           "op at the peak are not shown; save the Plan that solvers.solve() returns (it embeds "
                           "the graph) to see them."))


def _op_label(row: SavedRow) -> str:
    """``addmm_2`` for an op named after its target, ``bn_update (add_.Tensor)`` otherwise."""
    target = short_target(row.target)
    if not target or row.producer.startswith(target.split(".")[0]):
        return row.producer
    return f"{row.producer} ({target})"


def render_table(console: Console, rows: Sequence[SavedRow], total: int, sort_key: str) -> None:
    order = {"size": "largest first", "name": "by name", "decision": "by decision"}[sort_key]
    shown = f"{len(rows)} of {total}" if len(rows) < total else f"{total}"
    console.print(Text(f"saved storages ({shown}), {order}", style="bold"))
    table = Table()
    for header, justify in (("value", "left"), ("size", "right"), ("shape", "left"), ("decision", "left"),
                            ("reruns", "right"), ("at peak", "center"), ("op", "left"), ("module", "left"),
                            ("why", "left")):
        table.add_column(header, justify=justify, overflow="fold")
    for row in rows:
        shape = "x".join(str(dim) for dim in row.shape) or "scalar"
        table.add_row(Text(row.name), Text(format_bytes(row.size_bytes)), Text(f"{shape} {row.dtype}".strip()),
                      Text(row.decision, style=DECISION_STYLE.get(row.decision, "")),
                      Text(str(row.recompute_count) if row.recompute_count else ""),
                      Text("yes" if row.live_at_peak else ""), Text(_op_label(row)), Text(row.module), Text(row.why))
    console.print(table)
    if len(rows) < total:
        console.print(Text(f"... {total - len(rows)} more; --top 0 shows all"))


def _make_console() -> Console:
    """Rich console on stdout; wide when piped (rich would wrap at 80 columns)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)
    return console


def pipeline_rows(plan: PipelinePlan) -> list[dict[str, Any]]:
    """One dict per stage: what `render_pipeline` shows and ``--json`` prints."""
    rows = []
    for stage in plan.stages:
        cost = stage.cost
        rows.append({"stage": stage.index, "segments": [cost.first_segment, cost.end_segment],
                     "forward_ops": len(stage.forward_ops), "backward_ops": len(stage.backward_ops),
                     "static_bytes": cost.static_bytes, "in_flight": cost.in_flight,
                     "recomputed": sum(d.value == "recompute" for d in stage.decisions.values()),
                     "offloaded": sum(d.value == "offload" for d in stage.decisions.values()),
                     "forward_ms": cost.forward_ms, "backward_ms": cost.backward_ms,
                     "recompute_ms": cost.recompute_ms, "comm_ms": cost.comm_ms, "time_ms": cost.time_ms,
                     "peak_bytes": cost.peak_bytes, "budget_bytes": cost.budget_bytes})
    return rows


def render_pipeline(console: Console, path: str, plan: PipelinePlan) -> None:
    """Summary lines and the per-stage table of a pipeline plan."""
    lines = [("file", path), ("stages", f"{plan.num_stages}, {plan.microbatches} micro-batches, "
                                        f"schedule {plan.schedule.upper()}"),
             ("step", f"{format_ms(plan.predicted_step_time_ms)} predicted, bubble {format_ms(plan.bubble_ms)}"),
             ("solver", f"{plan.solver} in {_solve_time(plan.solve_time_s)}"),
             ("graph", plan.graph_hash)]
    width = max(len(label) for label, _ in lines) + 2
    for label, text in lines:
        console.print(Text.assemble((label.ljust(width), "bold"), text))
    if not plan.feasible:
        console.print(Text("warning: a stage does not fit its budget", style="yellow"))
    table = Table(title="stages (time per micro-batch)")
    for column in ("stage", "segments", "ops fwd/bwd", "params+grads", "in flight", "recomputed",
                   "forward", "backward", "recompute", "transfer", "time", "peak", "budget"):
        table.add_column(column, justify="left" if column == "segments" else "right")
    for row in pipeline_rows(plan):
        over = row["peak_bytes"] > row["budget_bytes"]
        table.add_row(str(row["stage"]), f"{row['segments'][0]}..{row['segments'][1] - 1}",
                      f"{row['forward_ops']}/{row['backward_ops']}", format_bytes(row["static_bytes"]),
                      str(row["in_flight"]), str(row["recomputed"]), format_ms(row["forward_ms"]),
                      format_ms(row["backward_ms"]), format_ms(row["recompute_ms"]), format_ms(row["comm_ms"]),
                      format_ms(row["time_ms"]), Text(format_bytes(row["peak_bytes"]), style="red" if over else ""),
                      format_bytes(row["budget_bytes"]))
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Show what a saved memsched plan does with every saved activation, and why.",
        epilog="Exit status: 0 ok, 2 unreadable or invalid plan file.")
    parser.add_argument("plan", metavar="PLAN.json", help="a plan file written by Plan.save()")
    parser.add_argument("--top", type=int, metavar="N", default=None,
                        help=f"show the N first rows (default {DEFAULT_TOP} in the table, all in --json; 0: all)")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")
    parser.add_argument("--sort", choices=("size", "name", "decision"), default="size",
                        help="row order: size (largest first, default), name, or decision "
                             "(recompute, offload, keep)")
    parser.add_argument("--bound", action="store_true",
                        help="also bound the recomputation any plan needs at this budget (solvers.recompute_bound: "
                             "a small MILP per tight moment of the backward), to see how far this plan is from it")
    return parser


def bound_line(plan: Plan, recompute_time_ms: float | None) -> tuple[str, dict[str, Any] | None]:
    """The ``--bound`` line and its JSON: the least recomputation any plan without offload
    needs at ``plan``'s budget (`solvers.recompute_bound`), beside this plan's."""
    if plan.graph is None:
        return "not shown: the plan file has no embedded graph", None
    bound = recompute_time_lower_bound(plan.graph, plan.budget_bytes)
    ours = f"; this plan recomputes {format_ms(recompute_time_ms)}" if recompute_time_ms is not None else ""
    return (f"no plan without offload recomputes less than {format_ms(bound.time_ms)} at this budget"
            f"{f' (the moment of {bound.at_op})' if bound.at_op else ''}{ours}"), bound.to_json()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``plan-inspect``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 0:
        parser.error(f"--top must be 0 (all) or a positive number of rows, got {args.top}")
    try:
        loaded = load_plan(args.plan)
        if isinstance(loaded, PipelinePlan):
            if args.json:
                print(json.dumps({"summary": {key: value for key, value in loaded.to_json().items()
                                              if key not in ("stages", "graph")},
                                  "stages": pipeline_rows(loaded)}, indent=1))
            else:
                render_pipeline(_make_console(), args.plan, loaded)
            return 0
        explanation = inspect_plan(args.plan)
        bound = bound_line(loaded, explanation.summary.recompute_time_ms) if args.bound else None
    except PlanFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    rows = sort_rows(explanation.rows, args.sort)
    top = DEFAULT_TOP if args.top is None and not args.json else args.top
    if top:
        rows = rows[:top]
    try:
        if args.json:
            data: dict[str, Any] = Explanation(explanation.summary, tuple(rows)).to_json()
            data["total_rows"] = len(explanation.rows)
            if bound is not None:
                data["recompute_lower_bound"] = bound[1]
            print(json.dumps(data, indent=1))
            return 0
        console = _make_console()
        render_summary(console, args.plan, explanation)
        if bound is not None:
            console.print(Text.assemble(("bound".ljust(11), "bold"), bound[0]))
        if explanation.has_graph:
            console.print()
            render_table(console, rows, len(explanation.rows), args.sort)
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away: stop quietly, as other Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
