"""``optimize(model, budget, example_inputs)``: trace, profile, plan, and return the
drop-in module that runs the plan."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from planner.budget import resolve_budget
from planner.capture import capture
from planner.profile import profile, with_released_outputs
from runtime.module import ScheduledModule
from solvers.graph import TARGETS
from solvers.plan import Plan
from solvers.registry import solve

log = logging.getLogger(__name__)


def optimize(model: torch.nn.Module, budget: int | float | str, example_inputs: Sequence[Any] | Any,
             *, example_kwargs: Mapping[str, Any] | None = None, solver: str = "auto",
             plan: str | os.PathLike | Plan | None = None, repeats: int = 3,
             solver_options: Mapping[str, Any] | None = None, progress: bool | None = None,
             target: str | None = None, stages: int | None = None, microbatches: int = 1,
             schedule: str = "1f1b", loss_fn: Callable[..., torch.Tensor] | None = None,
             backward_from: str = "auto", release_outputs: bool = False) -> Any:
    """Return ``model`` wrapped so that one training step (forward + backward) peaks at
    most at ``budget`` with the same gradients, at the least extra time the solver finds.

    Args:
        model: any ``nn.Module``; it is not copied: the result shares its parameters.
        budget: bytes (int), a size string (``"6GiB"``, ``"800MB"``, ``"50%"``) or a float in
            (0, 1], the fraction of the un-optimized step's activation memory.
        example_inputs: the positional inputs of one step (a tuple, or one tensor); the
            plan is specialised to their shapes and dtypes.
        solver: a name from `solvers.available_solvers()`, or ``"auto"``.
        plan: a saved plan (path or `Plan`) to run instead of solving; it must have been
            made for this model and input shapes (`PlanMismatchError` otherwise).
        repeats: timing repeats per op while profiling.
        progress: show a progress bar while profiling (default: when stderr is a terminal).
        target: plan host<->device transfers for a named device profile
            (`solvers.graph.TARGETS`, e.g. ``"h100-pcie5"``) instead of the measured one (CUDA)
            or none (CPU); with a profile, solvers may offload activations to host memory.
        stages: pipeline parallelism over ``stages`` processes (one per device, started by
            ``torchrun``; every rank calls ``optimize`` alike). ``budget`` is then bytes per
            device, one value or a list with one per stage. Returns this rank's
            `planner.pipeline.PipelinedModel`, whose ``step(*inputs, target=...)`` runs a
            training step of ``microbatches`` micro-batches under ``schedule`` (``"1f1b"``
            or ``"gpipe"``) and returns the loss; ``loss_fn(output, target)`` makes the loss
            (default: the model's own scalar output, or `planner.benchmark.training_loss`).
        backward_from: which outputs the backward starts from: ``"auto"``, the scalar ones
            when the model returns its loss beside other tensors (logits), else all of them;
            ``"all"``, every differentiable output. A gradient that reaches an output the
            plan does not backpropagate from raises `PlanMismatchError` with this fix.
        release_outputs: the caller drops every output the backward does not start from
            (the logits beside a loss: ``loss = model(x, labels=y).loss``) before calling
            backward, so the plan counts them freed at the forward's end, as eager
            does for such a loop. The backward raises `PlanMismatchError` if one is still
            referenced then (the budget would not hold).

    Raises:
        UnsupportedModelError, InfeasibleBudgetError, PlanMismatchError, BudgetError.
    """
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if stages is not None:
        if example_kwargs or target is not None:
            raise ValueError("optimize(..., stages=K) takes positional tensor inputs and no target= profile")
        from planner.pipeline import optimize_pipeline
        return optimize_pipeline(model, budget, example_inputs, stages=stages, microbatches=microbatches,
                                 schedule=schedule, loss_fn=loss_fn, solver=solver, plan=plan, repeats=repeats,
                                 progress=progress, solver_options=dict(solver_options or {}))
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(sorted(TARGETS))}")
    started = time.perf_counter()
    step = capture(model, example_inputs, example_kwargs, backward_from=backward_from)
    graph = profile(step, model, example_inputs, example_kwargs, repeats=1 if plan is not None else repeats,
                    progress=progress, transfer=TARGETS[target] if target is not None else None)
    if release_outputs:
        graph = with_released_outputs(graph, step)
    log.info("traced and profiled %s in %.1f s: %d ops", graph.name, time.perf_counter() - started, len(graph.ops))
    if plan is not None:
        chosen = plan if isinstance(plan, Plan) else Plan.load(os.fspath(plan))
        chosen.check_graph(graph)
    else:
        breakdown = resolve_budget(budget, graph)
        chosen = solve(graph, breakdown.budget_bytes, solver, **dict(solver_options or {}))
    return ScheduledModule(model, step, graph, chosen)
