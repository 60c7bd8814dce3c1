"""``optimize(model, budget, example_inputs)``: trace, profile, plan, and return the
drop-in module that runs the plan."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from planner.budget import parse_budget, resolve_budget
from planner.capture import CapturedStep, capture, input_signature
from planner.chunked_loss import chunk_linear_cross_entropy, chunk_rows_option
from planner.errors import OptionError
from planner.profile import profile, with_released_outputs
from planner.reuse import ProfileReuse
from runtime.module import ScheduledModule, describe_signature, StepProgram, checked_plan
from solvers.errors import InfeasibleBudgetError, PlanMismatchError, format_bytes
from solvers.graph import TARGETS, Graph, Transfer
from solvers.plan import COMPILED_OPTION, Plan
from solvers.portfolio import solve
from solvers.simulate import simulate

if TYPE_CHECKING:
    from planner.pipeline import PipelinedModel

log = logging.getLogger(__name__)


def optimize(model: torch.nn.Module, budget: int | float | str, example_inputs: Sequence[Any] | Any,
             *, example_kwargs: Mapping[str, Any] | None = None, solver: str = "auto",
             plan: str | os.PathLike | Plan | None = None, repeats: int = 3,
             solver_options: Mapping[str, Any] | None = None, progress: bool | None = None,
             target: str | None = None, stages: int | None = None, microbatches: int = 1,
             schedule: str = "1f1b", loss_fn: Callable[..., torch.Tensor] | None = None,
             backward_from: str = "auto", release_outputs: bool = False, on_new_shape: str = "plan",
             plan_cache_size: int = 8, compile: bool = False,
             chunked_loss: bool | int = False) -> "OptimizedModule | PipelinedModel":
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
        repeats: timing runs per op while profiling, the first a warm-up (fewer for an op
            whose timed runs already add up to `planner.profile.ENOUGH_TIMED_MS`).
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
        on_new_shape: ``"plan"``: a call whose step differs from the example's (shapes,
            dtypes, train/eval mode, frozen parameters, see `OptimizedModule`) gets its own
            plan on first use, logged; ``"error"``: it is refused with `PlanMismatchError`.
        plan_cache_size: how many plans `OptimizedModule` keeps (least recently used out).
        compile: run the plan's forward and backward programs compiled by inductor
            (`runtime.compiled`; the first step compiles), planned over the step as
            inductor lowers it (layer and batch norms decomposed, pointwise ops priced as
            fused, a backward value computed inside its only reader's kernel sized 0), so
            a plan saved without ``compile`` does not load with it, nor one fitted with it
            without it. The
            compiled step's peak is measured, and the plan re-solved for the budget less
            what compiling added while it is over, or once for more where compiling saved
            memory (such a plan runs only compiled; below the eager floor the floor plan
            is tried) (`planner.compiled`); `CompiledBudgetError` if no plan fits. With ``target=`` (offloading) it needs
            a CUDA model: on a CPU the host copies cannot be told apart from the step.
        chunked_loss: run the last linear layer and its cross-entropy a chunk of rows at a
            time (``True``, or the rows per chunk), so that no tensor the size of the
            logits is alive (`planner.chunked_loss`): a language model's loss then costs
            one chunk's memory, for one more matmul of the logits. Loss and gradients equal
            eager's to rounding, not bitwise (the sums over rows are taken in chunks). The
            model returns None for its logits (as Liger-Kernel's fused loss does), and a
            fractional budget is of the chunked step's activations.

    Raises:
        UnsupportedModelError, InfeasibleBudgetError, PlanMismatchError, BudgetError,
        InvalidPlanError (a loaded plan that cannot run or exceeds its budget), OptionError,
        CompiledBudgetError (an InfeasibleBudgetError: with compile=True, measured over the budget).
    """
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if stages is not None:
        if example_kwargs or target is not None or compile or chunked_loss:
            raise OptionError("optimize(..., stages=K) takes positional tensor inputs, no target= profile, no "
                              "compile=True and no chunked_loss")
        from planner.pipeline import optimize_pipeline
        return optimize_pipeline(model, budget, example_inputs, stages=stages, microbatches=microbatches,
                                 schedule=schedule, loss_fn=loss_fn, solver=solver, plan=plan, repeats=repeats,
                                 progress=progress, solver_options=dict(solver_options or {}))
    if target is not None and target not in TARGETS:
        raise OptionError(f"unknown target {target!r}; choose one of {', '.join(sorted(TARGETS))}")
    if compile and target is not None and next((p.device.type for p in model.parameters()), "cpu") == "cpu":
        # the host copies are the same memory as the step's: no measurement tells them apart
        raise OptionError(f"compile=True with target={target!r} on a CPU: the simulated host copies live in the "
                          "memory the compiled step is measured in, so its budget cannot be checked; drop target= "
                          "(plans without offloading) or compile on a CUDA device")
    if on_new_shape not in ("plan", "error"):
        raise OptionError(f"on_new_shape={on_new_shape!r}; choose 'plan' (plan each new input signature) or 'error'")
    if plan_cache_size < 1:
        raise OptionError(f"plan_cache_size={plan_cache_size}; keep at least 1 plan")
    parse_budget(budget)                                  # a bad budget fails before any tracing
    chunk_rows_option(chunked_loss)
    planner = _StepPlanner(budget=budget, solver=solver, repeats=repeats, solver_options=dict(solver_options or {}),
                           progress=progress, transfer=TARGETS[target] if target is not None else None,
                           backward_from=backward_from, release_outputs=release_outputs, compile=compile,
                           chunked_loss=chunked_loss)
    loaded = None
    if plan is not None:
        loaded = plan if isinstance(plan, Plan) else Plan.load(os.fspath(plan))
    step, graph, chosen = planner.plan(model, example_inputs, example_kwargs, loaded)
    program = None
    if compile:
        from planner.compiled import fit_compiled
        chosen, program = fit_compiled(planner, model, step, graph, chosen, example_inputs, example_kwargs,
                                       loaded=loaded is not None)
    return OptimizedModule(model, step, graph, chosen, planner, on_new_shape=on_new_shape,
                           plan_cache_size=plan_cache_size, program=program)


@dataclass
class _StepPlanner:
    """How `optimize` was asked to plan, to plan a new input signature the same way."""

    budget: int | float | str
    solver: str
    repeats: int
    solver_options: dict[str, Any]
    progress: bool | None
    transfer: Transfer | None
    backward_from: str
    release_outputs: bool
    compile: bool = False
    chunked_loss: bool | int = False
    reuse: ProfileReuse | None = None            # the first step's real profile, for later signatures

    def plan(self, model: torch.nn.Module, inputs: Sequence[Any], kwargs: Mapping[str, Any] | None,
             loaded: Plan | None = None, start: Plan | None = None) -> tuple[CapturedStep, Graph, Plan]:
        """Trace, profile and solve one step (or check ``loaded`` against it). The budget
        keeps its meaning: bytes stay bytes, a fraction is of this step's activations.
        The first step is profiled by running it; every later signature is planned from
        that profile on fake tensors (`planner.reuse`), so planning it never holds the
        un-optimized step's memory, and solved from ``start`` (the previous signature's
        plan) as a warm start (`solvers.portfolio.solve`)."""
        started = time.perf_counter()
        step = capture(model, inputs, kwargs, backward_from=self.backward_from)
        if self.chunked_loss is not False:
            chunk_linear_cross_entropy(step, chunk_rows_option(self.chunked_loss))
        if self.compile:                  # layer and batch norms as inductor lowers them
            from planner.compiled import decompose_for_inductor
            decompose_for_inductor(step)
        if self.reuse is not None:
            graph = self.reuse.graph_for(step, model, inputs, kwargs, self.progress)
        else:
            graph = profile(step, model, inputs, kwargs, repeats=1 if loaded is not None else self.repeats,
                            progress=self.progress, transfer=self.transfer)
            self.reuse = ProfileReuse(step, graph)
        if self.release_outputs:
            graph = with_released_outputs(graph, step)
        if self.compile:                  # pointwise ops priced as inductor fuses them
            from planner.compiled import with_compiled_costs
            graph = with_compiled_costs(graph, step)
        log.info("traced and %s %s in %.1f s: %d ops", "profiled" if self.reuse.step is step else
                 "sized on fake tensors from the first profile", graph.name, time.perf_counter() - started,
                 len(graph.ops))
        if loaded is not None:
            if loaded.options.get(COMPILED_OPTION) and not self.compile and loaded.graph_hash != graph.hash:
                raise PlanMismatchError(
                    f"plan was solved for the compiled step (graph {loaded.graph_hash}: norms decomposed, fused "
                    f"values sized 0), not for this eager step (graph {graph.hash}); load it with "
                    "optimize(model, budget, example_inputs, plan=..., compile=True), or re-plan without plan=")
            loaded.check_graph(graph)
            return step, graph, loaded
        breakdown = resolve_budget(self.budget, graph)
        if self.compile:                  # below the eager floor, the floor plan may fit compiled
            from planner.compiled import solve_compiled
            return step, graph, solve_compiled(lambda budget_bytes: self.solve(graph, budget_bytes, start),
                                               breakdown.budget_bytes)
        return step, graph, self.solve(graph, breakdown.budget_bytes, start)

    def solve(self, graph: Graph, budget_bytes: int, start: Plan | None = None) -> Plan:
        return solve(graph, budget_bytes, self.solver, start=start.decisions if start is not None else None,
                     **self.solver_options)

    def alternatives(self, graph: Graph, budget_bytes: int, first: Plan) -> Iterator[Plan]:
        """The plans the solvers found beside ``first`` (``runners_up``: every other plan
        ``auto``'s race found, so none is solved again) that fit ``budget_bytes``, fastest
        predicted first, for `planner.compiled.fit_compiled` where ``first`` measures over
        compiled. None for a named solver or one given options: the caller chose it."""
        if self.solver != "auto" or self.solver_options:
            return
        found = []
        for plan in first.runners_up:
            result = simulate(graph, plan)
            if result.peak_bytes <= budget_bytes:
                found.append(replace(plan, predicted_peak_bytes=result.peak_bytes, predicted_time_ms=result.time_ms,
                                     baseline_time_ms=graph.total_time_ms, budget_bytes=budget_bytes, graph=graph))
        yield from sorted(found, key=lambda plan: plan.predicted_time_ms)


class OptimizedModule(ScheduledModule):
    """What `optimize` returns: a `ScheduledModule` that plans each new step signature.

    A training loop changes its step: the last batch is smaller, sequences are padded to
    each batch's longest, the module goes from ``eval()`` to ``train()``, parameters are
    unfrozen. Each signature (input structure, shapes, dtypes, ``requires_grad``, autocast,
    train/eval mode, which parameters require grad) gets its own plan, traced, profiled
    (on fake tensors, from the first profile: `planner.reuse`) and solved on first use
    and kept in a least-recently-used cache of
    ``plan_cache_size`` plans; ``on_new_shape="error"`` refuses a new signature with
    `PlanMismatchError` instead. ``plan``, ``graph`` and the generated code are those of
    the signature that ran last; ``plans`` holds every cached one. Under
    ``torch.no_grad()`` the plain forward runs (no backward, nothing to plan).
    """

    def __init__(self, model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
                 planner: _StepPlanner, *, on_new_shape: str = "plan", plan_cache_size: int = 8,
                 program: StepProgram | None = None) -> None:
        super().__init__(model, step, graph, plan, compile=planner.compile, program=program)
        self._planner = planner
        self.on_new_shape = on_new_shape
        self.plan_cache_size = plan_cache_size
        self._cache: OrderedDict[tuple, tuple[CapturedStep, Graph, Plan, Any]] = OrderedDict()
        self._cache[self._key_of_step(step)] = (step, self.graph, self.plan, self._program)

    @property
    def plans(self) -> list[Plan]:
        """The cached plans, least recently used first."""
        return [entry[2] for entry in self._cache.values()]

    @staticmethod
    def _key_of_step(step: CapturedStep) -> tuple:
        return (step.input_spec, step.input_signature, step.training, tuple(step.param_requires_grad))

    def _key_of_call(self, leaves: list[Any], spec: pytree.TreeSpec) -> tuple:
        return (spec, input_signature(leaves), self.module.training,
                tuple(p.requires_grad for p in self.module.parameters()))

    def prepare(self, *args: Any, **kwargs: Any) -> Plan:
        """Make (or find) the plan for a step on these inputs without running the step
        (a loop can plan its bucket shapes, `planner.batching.pad_to_bucket`, before
        training, so that no step waits for planning)."""
        key = self._key_of_call(*pytree.tree_flatten((tuple(args), dict(kwargs))))
        return (self._cache.get(key) or self._plan_new(key, args, kwargs))[2]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = self._key_of_call(leaves, spec)
        entry = self._cache.get(key)
        if entry is None and self.on_new_shape == "plan":
            entry = self._plan_new(key, args, kwargs)
        if entry is None:
            self._check_call(leaves, spec)          # refuses the signature, saying what changed
        self._cache.move_to_end(key)
        self._step, self.graph, self.plan, self._program = entry
        return self._run(leaves)                    # the key is the step's: nothing to check again

    def _plan_new(self, key: tuple, args: tuple, kwargs: dict) -> tuple[CapturedStep, Graph, Plan, Any]:
        started = time.perf_counter()
        try:
            step, graph, plan = self._planner.plan(self.module, args, kwargs, start=self.plan)
        except InfeasibleBudgetError as error:
            budget = self._planner.budget
            why = (f"; the budget {budget!r} is a fraction of each step's own activations: give optimize() a larger "
                   "one, or bytes to keep one limit for every shape") if isinstance(parse_budget(budget), float) else ""
            raise InfeasibleBudgetError(
                error.budget_bytes, error.least_feasible_bytes, error.breakdown, solver=error.solver,
                context=f"planning a new step of {type(self.module).__name__} "
                        f"{describe_signature(key[1])} in {'train' if key[2] else 'eval'} mode{why}") from error
        if self._planner.compile:
            from planner.compiled import fit_compiled
            checked, program = fit_compiled(self._planner, self.module, step, graph, plan, args, kwargs)
        else:
            checked = checked_plan(graph, replace(plan, runners_up=()))     # the cache keeps one plan
            program = StepProgram(step, graph, checked, self._device_type())
        entry = (step, graph, checked, program)
        self._cache[key] = entry
        while len(self._cache) > self.plan_cache_size:
            self._cache.popitem(last=False)
        log.info("memsched: new plan for %s %s in %.1f s (%s, predicted peak %s, %d plan(s) cached)",
                 type(self.module).__name__, describe_signature(key[1]), time.perf_counter() - started, plan.solver,
                 format_bytes(entry[2].predicted_peak_bytes), len(self._cache))
        return entry

    def _device_type(self) -> str:
        return next((p.device.type for p in self.module.parameters()), "cpu")
