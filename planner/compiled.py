"""``optimize(..., compile=True)``: keep the budget once inductor has compiled the plan.

Inductor (PyTorch 2 / TorchInductor, Ansel et al., ASPLOS 2024) fuses each run of the
plan's aten ops (`runtime.compiled`) and plans its own buffers: it reuses a dead buffer
for a new one of another size, keeps fused temporaries and calls kernels whose workspace
the eager profile never saw. The plan's predicted peak is the eager program's, so the
compiled step is measured instead: one warm-up step (it compiles), then one step under
the allocator's own events on a CPU (`planner.memory.measure_allocator_peak`) or the
CUDA caching allocator's statistics on a GPU (`planner.memory.measure_step_memory`), with
the model's gradients, buffers and random generators put back afterwards.

If the measured peak is above the budget, the plan is solved again for a budget lowered
by the overshoot (the compiled step's excess over the eager plan's prediction is mostly
independent of the plan) and measured again, up to `MAX_FITS` times; then the call is
refused with `CompiledBudgetError`, which gives the least peak measured. When a lower plan
measured no lower (the compiled peak sits where that plan changed nothing), the next
budget is lowered by twice the last step. Once a lowered plan fits, the tries left bisect
between it and the least budget that measured over, and the plan solved for the most bytes
that fits is kept: a step down by the whole excess can cross into plans with much more
recomputation.

Compile-aware costs (`with_compiled_costs`): inductor fuses a pointwise op into the kernel
that consumes it, so recomputing it costs about nothing once compiled; the op's eager
time is mostly a memory round trip that the fused kernel does not make. The planner
prices every non-random pointwise op (``torch.Tag.pointwise``) at `FUSED_POINTWISE_COST`
of its eager time before solving, so that plans under ``compile=True`` recompute
pointwise chains first and keep the matmuls' and convolutions' outputs, as compile's own
partitioner does (its min-cut recomputes only "fusible" ops).

Cost: each fit is one solve, one compilation (inductor's graph cache makes an unchanged
run cheap) and two training steps; the cost rewrite is O(ops).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
import torch.utils._pytree as pytree

from planner.benchmark import training_loss
from planner.errors import CompiledBudgetError
from planner.memory import measure_allocator_peak, measure_step_memory
from runtime.module import ScheduledModule, StepProgram, checked_plan
from runtime.step import CapturedStep
from solvers.errors import InfeasibleBudgetError, format_bytes
from solvers.graph import Graph
from solvers.plan import Plan

log = logging.getLogger(__name__)

MAX_FITS = 6      # compiled programs measured per signature and configuration before refusing
# once a lowered plan fits, bisect between it and the least budget that measured over while
# their gap is more than this fraction of the budget (within MAX_FITS)
BISECTION_STOP = 0.01
# Inductor's channels-last layouts (its default ``layout_optimization``): on the zoo ResNet
# small at half its activations they made the compiled plan 11 % faster and peak 2.1 MiB
# (4 %) higher, copies of weights and activations the eager plan never saw; so a model with
# convolutions is fitted with them first, the fit lowering the plan by what they add
# (`fit_compiled`)
CHANNELS_LAST = {"layout_optimization": True}
# what a pointwise op costs compiled, as a fraction of its eager time (fused into its
# consumer, it reads its inputs from registers or cache instead of memory)
FUSED_POINTWISE_COST = 0.1


def with_compiled_costs(graph: Graph, step: CapturedStep) -> Graph:
    """``graph`` with each non-random pointwise aten op priced as fused: its time times
    `FUSED_POINTWISE_COST`. The structure (and so the hash plans are checked against) is
    unchanged."""
    targets = {node.name: node.target for node in step.joint.graph.nodes if node.op == "call_function"}
    ops = []
    for op in graph.ops:
        target = targets.get(op.name)
        if (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags and not op.random
                and torch.Tag.nondeterministic_seeded not in target.tags):
            op = replace(op, time_ms=op.time_ms * FUSED_POINTWISE_COST)
        ops.append(op)
    return replace(graph, ops=tuple(ops))


class Solves(Protocol):
    """What re-solves a graph for a lower budget, the way the first plan was solved
    (`planner.api`'s step planner)."""

    def solve(self, graph: Graph, budget_bytes: int) -> Plan: ...


def fit_compiled(planner: Solves, model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
                 inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, *,
                 loaded: bool = False) -> tuple[Plan, StepProgram]:
    """The plan (``plan`` or one solved for a lower budget) whose compiled step measures
    within ``plan.budget_bytes``, and its compiled program (``measured_peak_bytes`` set).
    On a graph with convolutions, `CHANNELS_LAST` is fitted first and the plan's own
    layouts only where that finds no plan. A ``loaded`` plan is run as given (its own
    layouts): refused if its compiled step is over its budget.

    Raises:
        CompiledBudgetError: no plan tried measures within the budget (the error of the
            configuration that came closest).
    """
    configurations = [CHANNELS_LAST, {}] if not loaded and _has_convolutions(graph) else [{}]
    failures: list[CompiledBudgetError] = []
    for options in configurations:
        try:
            return _fit(planner, model, step, graph, plan, inputs, kwargs, loaded=loaded, inductor_options=options)
        except CompiledBudgetError as error:
            log.info("memsched compile: %s", str(error).splitlines()[0])
            failures.append(error)
    raise min(failures, key=lambda error: error.least_feasible_bytes)


def _has_convolutions(graph: Graph) -> bool:
    return any(op.target.startswith("aten.convolution") for op in graph.ops)


def _fit(planner: Solves, model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
         inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, *, loaded: bool,
         inductor_options: dict[str, Any]) -> tuple[Plan, StepProgram]:
    """`fit_compiled` under one inductor configuration (module docstring)."""
    budget_bytes = plan.budget_bytes
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    tried: list[tuple[int, int]] = []               # (solver budget, measured peak) per fit
    internal_bytes = budget_bytes
    best: tuple[int, Plan, StepProgram] | None = None   # the fitting plan solved for the most bytes
    failed_above: int | None = None                  # the least solver budget above it that measured over
    for _ in range(1 if loaded else MAX_FITS):
        checked = checked_plan(graph, plan)
        program = StepProgram(step, graph, checked, device_type, compile=True, inductor_options=inductor_options)
        peak_bytes = measure_compiled_peak(model, step, graph, checked, program, inputs, kwargs,
                                           released=bool(graph.released_outputs))
        program.measured_peak_bytes = peak_bytes
        tried.append((internal_bytes, peak_bytes))
        log.info("memsched compile (%s): plan solved for %d bytes predicts %d (eager); the compiled step measures %d; "
                 "budget %d", inductor_options or "plan layouts", internal_bytes, checked.predicted_peak_bytes,
                 peak_bytes, budget_bytes)
        if peak_bytes <= budget_bytes:
            program.solver_budget_bytes = internal_bytes
            if best is None or internal_bytes > best[0]:
                best = (internal_bytes, checked, program)
        else:                                        # the lowest failure yet, or above every fit
            failed_above = internal_bytes
        if best is not None:
            # a plan fits: search upward, between it and the least budget that measured over,
            # while that gap is over `BISECTION_STOP` of the budget (a lower budget may have
            # forced much more recomputation than the excess needed)
            if failed_above is None or failed_above - best[0] <= BISECTION_STOP * budget_bytes:
                break
            internal_bytes = (best[0] + failed_above) // 2
        else:
            # lower the solver's budget by the excess; when a lower plan measured no lower (the
            # compiled peak sits where that plan changed nothing), by twice the last step instead
            step_bytes = peak_bytes - budget_bytes
            if len(tried) > 1 and peak_bytes >= tried[-2][1]:
                step_bytes = max(step_bytes, 2 * (tried[-2][0] - internal_bytes))
            internal_bytes -= step_bytes
        try:
            plan = planner.solve(graph, internal_bytes)
        except InfeasibleBudgetError as error:
            log.info("memsched compile: no plan at %s: %s", format_bytes(internal_bytes), str(error).splitlines()[0])
            break
    if best is None:
        raise CompiledBudgetError(budget_bytes, tried, loaded=loaded)
    # the plan answers for the caller's budget: its prediction is below the lower one
    return replace(best[1], budget_bytes=budget_bytes), best[2]


@contextlib.contextmanager
def _model_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Gradients, buffers and the random generators as they were, after the block."""
    gradients = {parameter: parameter.grad for parameter in model.parameters()}
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, gradient in gradients.items():
            parameter.grad = gradient


def _step(module: torch.nn.Module, inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, released: bool) -> None:
    """One forward and backward, as a training loop runs it: the output is held through
    the backward, or only the loss when the plan counts the other outputs released."""
    output = module(*inputs, **dict(kwargs or {}))
    loss = training_loss(output)
    if released:
        output = None
    loss.backward()
    del output, loss


def measure_compiled_peak(model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
                          program: StepProgram, inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, *,
                          released: bool = False) -> int:
    """Peak bytes of one training step through ``program``, parameters, buffers, inputs
    and gradients included, measured after a warm-up step that compiles it; the model's
    gradients, buffers and generators are left as they were."""
    module = ScheduledModule(model, step, graph, plan, program=program)
    resident = list(model.parameters()) + list(model.buffers())
    resident += [t for t in pytree.tree_leaves((list(inputs), dict(kwargs or {}))) if isinstance(t, torch.Tensor)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with _model_state_kept(model):
        for parameter in model.parameters():
            parameter.grad = None
        _step(module, inputs, kwargs, released)                   # compiles every run
        for parameter in model.parameters():
            parameter.grad = None
        if device.type == "cuda":
            _, report = measure_step_memory(lambda: _step(module, inputs, kwargs, released), device, resident)
            return report.peak_bytes
        _, peak_bytes = measure_allocator_peak(lambda: _step(module, inputs, kwargs, released), resident)
        return peak_bytes
