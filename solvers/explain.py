"""Why a plan does what it does: a summary and one row per saved storage.

`explain` is the library half of ``plan-inspect`` (after JAX's ``print_saved_residuals``):
for every activation storage the backward reads it gives the shape, dtype, size, the op
and module that produced it, the decision (keep / recompute / offload), how many times its
op runs again in the backward, whether it is alive at the peak, and a one-line reason
computed from the numbers. Every figure comes from `simulate` (the independent replay),
not from what the solver believed.

Torch-free like the rest of `solvers`: stdlib only, so a plan can be inspected anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from solvers.errors import PlanFormatError, format_bytes
from solvers.graph import Graph
from solvers.kernel.program import saved_roots
from solvers.kernel.recompute import recompute_time_ms
from solvers.plan import EAGER_BUDGET_OPTION, Decision, Plan, StepKind
from solvers.simulate import SimResult, live_roots_at, simulate

EXPLANATION_FORMAT = "memsched.explanation/1"


@dataclass(frozen=True)
class Summary:
    """Plan-level figures. Fields after ``recompute_run_count`` need the graph and are
    ``None`` when the plan file does not embed it."""

    solver: str
    graph_hash: str
    budget_bytes: int
    peak_bytes: int                 # simulated when the graph is known, else the plan's prediction
    time_ms: float
    baseline_time_ms: float         # keep-all time of the same graph
    overhead_pct: float             # (time / baseline - 1) * 100
    optimal: bool                   # optimality proved by the solver
    gap: float | None               # relative gap to the proved bound, when known
    solve_time_s: float
    keep_count: int                 # saved storages per decision
    recompute_count: int
    offload_count: int
    recomputed_op_count: int        # distinct forward ops that run again in the backward
    recompute_run_count: int        # run steps that are recomputations (an op may rerun several times)
    graph_name: str | None = None
    op_count: int | None = None
    forward_op_count: int | None = None
    backward_op_count: int | None = None
    recompute_time_ms: float | None = None
    offloaded_bytes: int | None = None
    stall_ms: float | None = None   # compute waiting for host<->device copies
    kept_saved_bytes: int | None = None        # saved storages held on the device forward -> backward
    recomputed_saved_bytes: int | None = None
    peak_phase: str | None = None
    peak_step_index: int | None = None         # index into that phase's steps; -1: before the first step
    peak_step: str | None = None               # e.g. "run(fc2_bw)"
    peak_op: str | None = None                 # the op running at the peak, when the peak step is a run
    peak_op_target: str | None = None
    peak_op_module: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def has_graph(self) -> bool:
        return self.op_count is not None


@dataclass(frozen=True)
class SavedRow:
    """One activation storage that the backward reads, and what the plan does with it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    size_bytes: int
    producer: str                   # op name
    target: str                     # e.g. "aten.mm.default"
    module: str                     # nn.Module path of the producing op
    decision: str                   # a `Decision` value
    recompute_count: int            # run steps of the producer in the backward
    recompute_time_ms: float        # recompute_count * the producer's time
    live_at_peak: bool              # its storage is on the device at the peak step
    why: str


@dataclass(frozen=True)
class Explanation:
    """What ``plan-inspect`` shows; rows sorted by size, largest first (empty without a graph)."""

    summary: Summary
    rows: tuple[SavedRow, ...] = field(default=())

    @property
    def has_graph(self) -> bool:
        return self.summary.has_graph

    def to_json(self) -> dict[str, Any]:
        summary = asdict(self.summary)
        summary["warnings"] = list(self.summary.warnings)
        rows = []
        for row in self.rows:
            data = asdict(row)
            data["shape"] = list(row.shape)
            rows.append(data)
        return {"format": EXPLANATION_FORMAT, "has_graph": self.has_graph, "summary": summary, "rows": rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Explanation":
        if not isinstance(data, Mapping) or data.get("format") != EXPLANATION_FORMAT:
            raise PlanFormatError(f"not a memsched explanation (expected format {EXPLANATION_FORMAT!r})")
        try:
            summary = Summary(**{**data["summary"], "warnings": tuple(data["summary"].get("warnings", ()))})
            rows = tuple(SavedRow(**{**row, "shape": tuple(row["shape"])}) for row in data["rows"])
        except (KeyError, TypeError) as error:
            raise PlanFormatError(f"corrupt memsched explanation: {error!r}") from error
        return cls(summary=summary, rows=rows)


# -- formatting helpers (shared with the CLI) -----------------------------------------------
def format_ms(time_ms: float) -> str:
    """Milliseconds with about three significant digits: ``0.12 ms``, ``1.2 ms``, ``1234 ms``."""
    if time_ms >= 100:
        return f"{time_ms:.0f} ms"
    return f"{time_ms:.3g} ms"


def format_rate(bytes_per_ms: float) -> str:
    """Bytes freed per millisecond of recomputation: ``33.33 MiB per ms``."""
    if math.isinf(bytes_per_ms):
        return "free (no compute)"
    return f"{format_bytes(bytes_per_ms)} per ms"


def short_target(target: str) -> str:
    """``aten.mm.default`` -> ``mm``; other targets unchanged."""
    if target.startswith("aten."):
        target = target[len("aten."):]
    if target.endswith(".default"):
        target = target[: -len(".default")]
    return target


# -- the explanation ----------------------------------------------------------------------
def explain(graph: Graph | None, plan: Plan) -> Explanation:
    """Summary and per-saved-storage rows for ``plan`` on ``graph``.

    ``graph`` may be None (a plan saved without its graph): then only the summary that the
    plan alone allows is filled in and there are no rows. Raises `PlanMismatchError` if the
    plan was made for another graph and `InvalidPlanError` if it does not replay.
    O(steps + sum of op arity + R log R) for R saved storages.
    """
    forward_runs = {step.name for step in plan.forward if step.kind is StepKind.RUN}
    recompute_runs = [step.name for step in plan.backward if step.kind is StepKind.RUN and step.name in forward_runs]
    counts = {decision: sum(1 for d in plan.decisions.values() if d is decision) for decision in Decision}
    overhead_pct = plan.overhead * 100.0
    if graph is None:
        return Explanation(Summary(
            solver=plan.solver, graph_hash=plan.graph_hash, budget_bytes=plan.budget_bytes,
            peak_bytes=plan.predicted_peak_bytes, time_ms=plan.predicted_time_ms,
            baseline_time_ms=plan.baseline_time_ms, overhead_pct=overhead_pct, optimal=plan.optimal, gap=plan.gap,
            solve_time_s=plan.solve_time_s, keep_count=counts[Decision.KEEP],
            recompute_count=counts[Decision.RECOMPUTE], offload_count=counts[Decision.OFFLOAD],
            recomputed_op_count=len(set(recompute_runs)), recompute_run_count=len(recompute_runs)))

    sim = simulate(graph, plan)
    baseline_time_ms = plan.baseline_time_ms or graph.total_time_ms
    overhead_pct = (sim.time_ms / baseline_time_ms - 1.0) * 100.0 if baseline_time_ms > 0 else 0.0
    warnings = _prediction_warnings(plan, sim)
    live_roots_at_peak = live_roots_at(graph, plan, sim.peak_phase, sim.peak_step_index, during_step=False)
    rows = _saved_rows(graph, plan, sim, live_roots_at_peak)
    decisions = {row.name: row.decision for row in rows}

    peak_step = peak_op = peak_target = peak_module = None
    if sim.peak_step_index >= 0:
        step = plan.steps(sim.peak_phase)[sim.peak_step_index]
        peak_step = str(step)
        if step.kind is StepKind.RUN:
            op = graph.op(step.name)
            peak_op, peak_target, peak_module = op.name, op.target, op.module
    summary = Summary(
        solver=plan.solver, graph_hash=graph.hash, budget_bytes=plan.budget_bytes, peak_bytes=sim.peak_bytes,
        time_ms=sim.time_ms, baseline_time_ms=baseline_time_ms, overhead_pct=overhead_pct, optimal=plan.optimal,
        gap=plan.gap, solve_time_s=plan.solve_time_s,
        keep_count=sum(1 for d in decisions.values() if d == Decision.KEEP.value),
        recompute_count=sum(1 for d in decisions.values() if d == Decision.RECOMPUTE.value),
        offload_count=sum(1 for d in decisions.values() if d == Decision.OFFLOAD.value),
        recomputed_op_count=len(set(recompute_runs)), recompute_run_count=len(recompute_runs),
        graph_name=graph.name, op_count=len(graph.ops), forward_op_count=len(graph.forward_ops),
        backward_op_count=len(graph.backward_ops), recompute_time_ms=sim.recompute_ms,
        offloaded_bytes=sim.offloaded_bytes, stall_ms=sim.stall_ms,
        kept_saved_bytes=sum(r.size_bytes for r in rows if r.decision == Decision.KEEP.value),
        recomputed_saved_bytes=sum(r.size_bytes for r in rows if r.decision == Decision.RECOMPUTE.value),
        peak_phase=sim.peak_phase.value, peak_step_index=sim.peak_step_index, peak_step=peak_step,
        peak_op=peak_op, peak_op_target=peak_target, peak_op_module=peak_module, warnings=warnings)
    return Explanation(summary=summary, rows=rows)


def _prediction_warnings(plan: Plan, sim: SimResult) -> tuple[str, ...]:
    """Disagreements between what the plan file records and the replay (an edited file,
    or a plan made by a solver that skipped `solvers.solve`)."""
    warnings = []
    if plan.predicted_peak_bytes and plan.predicted_peak_bytes != sim.peak_bytes:
        warnings.append(f"the plan records a peak of {format_bytes(plan.predicted_peak_bytes)} but its replay "
                        f"gives {format_bytes(sim.peak_bytes)}; the figures shown are the replay's")
    if plan.predicted_time_ms and not math.isclose(plan.predicted_time_ms, sim.time_ms, rel_tol=1e-6, abs_tol=1e-9):
        warnings.append(f"the plan records a time of {format_ms(plan.predicted_time_ms)} but its replay gives "
                        f"{format_ms(sim.time_ms)}; the figures shown are the replay's")
    eager_budget_bytes = int(plan.options.get(EAGER_BUDGET_OPTION, 0))
    if sim.peak_bytes > plan.budget_bytes and sim.peak_bytes <= eager_budget_bytes:
        warnings.append(f"the replayed (eager) peak {format_bytes(sim.peak_bytes)} is above the budget "
                        f"{format_bytes(plan.budget_bytes)}: the plan was fitted compiled, solved within "
                        f"{format_bytes(eager_budget_bytes)}, and its compiled step measured within the budget; "
                        "it runs only with compile=True")
    elif sim.peak_bytes > plan.budget_bytes:
        warnings.append(f"the replayed peak {format_bytes(sim.peak_bytes)} exceeds the budget "
                        f"{format_bytes(plan.budget_bytes)}; re-plan with solvers.solve")
    return tuple(warnings)


def _saved_rows(graph: Graph, plan: Plan, sim: SimResult, live_roots_at_peak: frozenset[str]) -> tuple[SavedRow, ...]:
    roots = saved_roots(graph)
    order = {root: index for index, root in enumerate(roots)}
    pinned_roots = {graph.value(name).root for name in graph.pinned_values}
    output_roots = {graph.value(name).root for name in graph.forward_outputs}
    backward_runs: dict[str, int] = {}
    for step in plan.backward:
        if step.kind is StepKind.RUN:
            backward_runs[step.name] = backward_runs.get(step.name, 0) + 1

    # what a recompute decision could be about: droppable storages, best bytes per ms first
    candidates = [root for root in roots if root not in pinned_roots and graph.value(root).size_bytes > 0
                  and graph.op(graph.value(root).producer).recomputable]
    # the whole recomputation, as the solvers score it (a dropout mask's random fill included)
    alone_ms = {root: recompute_time_ms(graph, root) for root in candidates}

    def rate(root: str) -> float:
        """Bytes a recomputation frees per millisecond it costs."""
        time_ms = alone_ms.get(root, graph.op(graph.value(root).producer).time_ms)
        return graph.value(root).size_bytes / time_ms if time_ms > 0 else math.inf

    candidates.sort(key=lambda root: (-rate(root), order[root]))
    rank = {root: position + 1 for position, root in enumerate(candidates)}
    decision_of = {root: plan.decisions.get(root, Decision.KEEP) for root in roots}
    recomputed_rates = [rate(root) for root in roots if decision_of[root] is Decision.RECOMPUTE]
    window_ms = _offload_windows_ms(graph, plan)
    nothing_dropped = all(decision is Decision.KEEP for decision in decision_of.values())

    rows = []
    for root in roots:
        value = graph.value(root)
        op = graph.op(value.producer)
        decision = decision_of[root]
        count = backward_runs.get(op.name, 0)
        live = root in live_roots_at_peak
        if decision is Decision.RECOMPUTE:
            why = _why_recompute(value.size_bytes, alone_ms.get(root, op.time_ms), rate(root), rank.get(root),
                                 len(candidates), count)
        elif decision is Decision.OFFLOAD:
            why = _why_offload(graph, value.size_bytes, *window_ms.get(root, (0.0, 0.0)), sim.stall_ms)
        elif root in output_roots:
            why = "keep: also a model output (the caller holds it)"
        elif root in pinned_roots:
            why = "keep: also a gradient of the step (autograd holds it)"
        elif not op.recomputable:
            why = f"keep: output of a non-recomputable op ({short_target(op.target) or op.name}, its effects run once)"
        elif value.size_bytes == 0:
            why = "keep: owns no device storage (0 B)"
        elif nothing_dropped and sim.peak_bytes <= plan.budget_bytes:
            why = (f"keep: the budget is met with every saved value kept "
                   f"(peak {format_bytes(sim.peak_bytes)} <= {format_bytes(plan.budget_bytes)})")
        else:
            why = (f"keep: recomputing would cost {format_ms(alone_ms[root])} for {format_bytes(value.size_bytes)} "
                   f"({format_rate(rate(root))}, rank {rank[root]} of {len(candidates)})")
            if not live:
                why += "; not live at the peak, so dropping it cannot lower the peak"
            elif recomputed_rates and rate(root) < min(recomputed_rates):
                why += "; costlier per byte than every recomputed value, budget met without it"
            else:
                why += "; budget met without it"
        rows.append(SavedRow(name=root, shape=value.shape, dtype=value.dtype, size_bytes=value.size_bytes,
                             producer=op.name, target=op.target, module=op.module, decision=decision.value,
                             recompute_count=count, recompute_time_ms=count * op.time_ms, live_at_peak=live,
                             why=why))
    rows.sort(key=lambda row: (-row.size_bytes, order[row.name]))
    return tuple(rows)


def _why_recompute(size_bytes: int, time_ms: float, bytes_per_ms: float, rank: int | None, candidates: int,
                   count: int) -> str:
    why = f"recompute: frees {format_bytes(size_bytes)} for {format_ms(time_ms)} ({format_rate(bytes_per_ms)})"
    if rank is not None:
        if rank <= max(1, math.ceil(candidates / 3)):
            why += ", among the cheapest per byte"
        else:
            why += f", rank {rank} of {candidates} by bytes per ms"
    if count > 1:
        why += f"; its op runs {count}x in the backward"
    return why


def _why_offload(graph: Graph, size_bytes: int, forward_window_ms: float, backward_window_ms: float,
                 stall_ms: float) -> str:
    transfer = graph.transfer
    to_host_ms = transfer.latency_ms + size_bytes / transfer.device_to_host_bytes_per_ms
    to_device_ms = transfer.latency_ms + size_bytes / transfer.host_to_device_bytes_per_ms
    hidden = forward_window_ms >= to_host_ms and backward_window_ms >= to_device_ms
    why = (f"offload: {format_bytes(size_bytes)} copied to host ({format_ms(to_host_ms)}) and back "
           f"({format_ms(to_device_ms)})")
    if hidden:
        return why + f", hidden behind {format_ms(forward_window_ms + backward_window_ms)} of compute"
    why += (f", overlapping {format_ms(forward_window_ms)} of forward and {format_ms(backward_window_ms)} "
            f"of backward compute")
    return why + (f"; the plan stalls {format_ms(stall_ms)} in all waiting for copies" if stall_ms > 0 else "")


def _offload_windows_ms(graph: Graph, plan: Plan) -> dict[str, tuple[float, float]]:
    """Per offloaded value: compute time between its offload and its free in the forward,
    and between its (first) prefetch and the first backward op that reads it."""
    forward_ms: dict[str, float] = {}
    open_since: dict[str, float] = {}
    clock_ms = 0.0
    for step in plan.forward:
        if step.kind is StepKind.RUN:
            clock_ms += graph.op(step.name).time_ms
        elif step.kind is StepKind.OFFLOAD:
            open_since[step.name] = clock_ms
        elif step.kind is StepKind.FREE and step.name in open_since:
            forward_ms[step.name] = clock_ms - open_since.pop(step.name)
    backward_ms: dict[str, float] = {}
    open_since.clear()
    clock_ms = 0.0
    for step in plan.backward:
        if step.kind is StepKind.PREFETCH and step.name not in backward_ms:
            open_since.setdefault(step.name, clock_ms)
        elif step.kind is StepKind.RUN:
            op = graph.op(step.name)
            for name in op.inputs:
                if name in open_since:
                    backward_ms[name] = clock_ms - open_since.pop(name)
            clock_ms += op.time_ms
    roots: dict[str, tuple[float, float]] = {}
    for name in set(forward_ms) | set(backward_ms):
        roots[graph.value(name).root] = (forward_ms.get(name, 0.0), backward_ms.get(name, 0.0))
    return roots

