"""``optimize(model, budget, example_inputs, stages=K, microbatches=M)``: one rank's
pipeline stage, planned together with every other rank's.

Every rank (one process per device, started by ``torchrun``) calls `optimize_pipeline`
with the same model and the whole batch:

1. The step of ONE micro-batch is captured on every rank (fake tensors: cheap).
2. Rank 0 profiles it and runs `solvers.pipeline.solve_pipeline`: the stage split and each
   stage's predicted plan under each device's budget. The plan goes to every rank as
   JSON (never pickle) with the fingerprint of rank 0's capture; each rank compares it
   with its own (`PlanMismatchError` otherwise), so ranks never run different plans. A
   saved plan (``plan=``) is checked the same way on every rank.
3. Each rank cuts its slice out of the captured forward (`runtime.pipeline`), traces and
   profiles that slice as a model of its own and plans it with the single-device solvers
   at the largest per-micro-batch budget for which the whole stage fits its device. The
   whole stage is priced by the solver's one stage cost model
   (`solvers.pipeline_cost.StageSpec.cost`), with the stage plan's peak as its working
   term::

       plan peak + receive buffers and pending gradient sends + (in flight - 1) * (saved
       bytes of the plan + the stage's outputs) + the accumulated .grad if M > 1
       <= the device's budget

   (in flight: M for GPipe, min(M, K - s) for 1F1B). The budget is bisected because the
   saved bytes depend on the plan.
4. The stage runs on ``torch.distributed.pipelining`` (`runtime.pipeline.PipelineRunner`).

Limitations: the whole model is built on every rank and rank 0 profiles the whole
micro-batch step on its device; inputs are positional tensors split on dim 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from planner.budget import parse_budget
from planner.errors import BudgetError, ModelInputError, OptionError, UnsupportedModelError, UnsupportedUseError
from planner.capture import CapturedStep, capture
from planner.memory import MemoryReport, StepMemoryTracker
from planner.profile import profile
from runtime.module import ScheduledModule
from runtime.pipeline import (PipelineRunner, PipelineStageModule, StageForward, StageSlice, example_stage_inputs,
                              preserved_buffers, shared_parameters, slice_stages)
from solvers.errors import (InfeasibleBudgetError, InvalidPlanError, MemschedError, PlanFormatError,
                            PlanMismatchError, UnsupportedGraphError)
from solvers.graph import Graph
from solvers.pipeline import PipelinePlan, StagePlace, StageSpec, check_schedule, solve_pipeline
from solvers.plan import Plan
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.portfolio import solve
from solvers.simulate import simulate

log = logging.getLogger(__name__)

PAYLOAD_FORMAT = "memsched.pipeline-payload/1"


def capture_fingerprint(step: CapturedStep) -> str:
    """What two ranks must agree on: the captured program, the parameter names and the
    input signature (the profiled times may differ between ranks; the program may not)."""
    text = json.dumps({"code": step.joint.code, "params": step.param_names, "buffers": step.buffer_names,
                       "inputs": repr(step.input_signature)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _budgets(budget: Any, stages: int) -> list[int]:
    values = list(budget) if isinstance(budget, (list, tuple)) else [budget] * stages
    if len(values) != stages:
        raise OptionError(f"got {len(values)} per-device budgets for {stages} stages; give one budget or one per stage")
    result = []
    for value in values:
        parsed = parse_budget(value)
        if isinstance(parsed, float):
            raise BudgetError(f"pipeline budgets are bytes per device (an int or a size like '6GiB'), got "
                              f"{value!r}: a fraction of one device's activation memory means nothing across stages")
        result.append(parsed)
    return result


def _broadcast_text(text: str | None, group: Any) -> str:
    """Rank 0's string on every rank, as bytes in a tensor (gloo and NCCL alike)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    length = torch.tensor([len(text.encode()) if text is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(length, src=_global_rank(0, group), group=group)
    data = (torch.tensor(list(text.encode()), dtype=torch.uint8, device=device) if text is not None
            else torch.empty(int(length.item()), dtype=torch.uint8, device=device))
    dist.broadcast(data, src=_global_rank(0, group), group=group)
    return bytes(data.cpu().tolist()).decode()


@contextlib.contextmanager
def _agreed(phase: str, rank: int, group: Any) -> Iterator[None]:
    """Run a phase that may fail on some ranks only, then agree over every rank (one
    all-gather): if any failed, every rank raises the first failing rank's error, the same
    `MemschedError` class with the rank and phase added to its message (an error that is
    not a `MemschedError`, such as the model's own, becomes `PipelineRankError`)."""
    failure: tuple[str, str] | None = None
    try:
        yield
    except Exception as error:  # noqa: BLE001 - every rank raises it below
        failure = (type(error).__name__, str(error))
        local_error: Exception | None = error
    else:
        local_error = None
    failures: list[tuple[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(failures, failure, group=group)
    failed = [(index, item) for index, item in enumerate(failures) if item is not None]
    if not failed:
        return
    failed_rank, (name, message) = failed[0]
    if failed_rank == rank and isinstance(local_error, MemschedError):
        raise local_error
    error_class = _MEMSCHED_ERRORS.get(name, PipelineRankError)
    text = f"rank {failed_rank} failed while {phase}: {message}" if error_class is not PipelineRankError \
        else f"rank {failed_rank} failed while {phase}: {name}: {message}"
    raised = error_class.__new__(error_class)
    Exception.__init__(raised, text)
    raise raised from (local_error if failed_rank == rank else None)


class PipelineRankError(MemschedError):
    """A rank of a pipeline failed while planning with an error of its own (the model's,
    say); every rank raises this, naming the rank, the phase and the error."""


_MEMSCHED_ERRORS = {cls.__name__: cls for cls in (InfeasibleBudgetError, PlanMismatchError, InvalidPlanError,
                                                 PlanFormatError, UnsupportedGraphError, OptionError, BudgetError,
                                                 UnsupportedModelError, ModelInputError, UnsupportedUseError)}


def _global_rank(group_rank: int, group: Any) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def _init_distributed() -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UnsupportedUseError("optimize(..., stages=K) runs one process per stage: launch with "
                           "`torchrun --nproc-per-node K your_script.py`, or call "
                           "torch.distributed.init_process_group first")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@dataclass
class StageInfo:
    """What this rank runs and what was predicted and planned for it."""

    index: int
    budget_bytes: int
    microbatch_budget_bytes: int    # the budget the stage's own plan was solved for
    in_flight: int
    received_bytes: int
    sent_bytes: int
    saved_bytes: int                # per micro-batch, from the stage plan's replay
    predicted_peak_bytes: int       # the whole stage: plan peak + buffers + in-flight micro-batches
    plan: Plan
    graph: Graph


class PipelinedModel:
    """This rank's stage of a model planned for pipeline parallelism.

    Attributes:
        plan: the `solvers.pipeline.PipelinePlan` every rank runs.
        stage: `StageInfo` of this rank (its own recompute/offload plan and predictions).
        module: the stage's ``nn.Module`` (its parameters are the user's model's).
        runner: the `runtime.pipeline.PipelineRunner`.
    """

    def __init__(self, model: torch.nn.Module, plan: PipelinePlan, stage: StageInfo, module: PipelineStageModule,
                 runner: PipelineRunner, step: CapturedStep) -> None:
        self.model = model
        self.plan = plan
        self.stage = stage
        self.module = module
        self.runner = runner
        self._step = step

    @property
    def rank(self) -> int:
        return self.stage.index

    def step(self, *inputs: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """One training step (forward and backward of every micro-batch); the gradients
        of this stage's parameters accumulate in ``.grad``. Returns the loss (the mean of
        the micro-batch losses) on every rank."""
        return self.runner.step(*inputs, target=target)

    def measure_step(self, *inputs: torch.Tensor, target: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, MemoryReport]:
        """`step` under this rank's memory tracker. Counted from the start: the stage's
        parameters and buffers, the receive buffers (after a first step made them) and
        the inputs; the gradients count when they are made, so call ``zero_grad(set_to_none=True)``
        before measuring."""
        resident = list(self.module.parameters()) + list(self.module.buffers()) + self.runner.receive_buffers()
        resident += [t for t in inputs if isinstance(t, torch.Tensor)]
        if target is not None:
            resident.append(target)
        with StepMemoryTracker(self.runner.device, resident) as tracker:
            loss = self.step(*inputs, target=target)
        return loss, tracker.report()

    def parameters(self):
        return self.module.parameters()


def optimize_pipeline(model: torch.nn.Module, budget: Any, example_inputs: Sequence[torch.Tensor], *,
                      stages: int, microbatches: int, schedule: str = "1f1b",
                      loss_fn: Callable[..., torch.Tensor] | None = None, solver: str = "auto",
                      plan: str | os.PathLike | PipelinePlan | None = None, repeats: int = 3,
                      progress: bool | None = None, group: Any = None,
                      solver_options: dict[str, Any] | None = None) -> PipelinedModel:
    """See `planner.api.optimize` (``stages=``) and the module docstring."""
    schedule = schedule.lower()
    check_schedule(schedule)
    if stages < 1 or microbatches < 1:
        raise OptionError(f"stages and microbatches must be at least 1, got {stages} and {microbatches}")
    if schedule == "1f1b" and microbatches < stages:
        raise OptionError(f"the 1F1B schedule needs at least as many micro-batches as stages: microbatches="
                         f"{microbatches} < stages={stages}; raise microbatches or use schedule='gpipe'")
    budgets = _budgets(budget, stages)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise OptionError("a pipelined model takes positional tensor inputs only (split on dim 0 into micro-batches)")
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if batch % microbatches or any(t.dim() == 0 or t.shape[0] != batch for t in inputs):
        raise OptionError(f"every input must have the same batch size on dim 0, divisible by microbatches="
                         f"{microbatches}; got shapes {[tuple(t.shape) for t in inputs]}")
    microbatch = tuple(t.tensor_split(microbatches)[0] for t in inputs)
    _init_distributed()
    world = dist.get_world_size(group)
    if world != stages:
        raise OptionError(f"stages={stages} but {world} processes run: start one process per stage "
                         f"(torchrun --nproc-per-node {stages})")
    rank = dist.get_rank(group)
    started = time.perf_counter()
    # Each phase below that can fail on some ranks only ends in `_agreed`, a collective every
    # rank reaches: a failure on one rank is raised on all of them, none waits forever.
    with _agreed("tracing the model", rank, group):
        step = capture(model, microbatch)
        fingerprint = capture_fingerprint(step)

    text = None
    with _agreed("planning the pipeline", rank, group):
        if rank == 0:
            graph = profile(step, model, microbatch, repeats=1 if plan is not None else repeats, progress=progress)
            if plan is not None:
                chosen = plan if isinstance(plan, PipelinePlan) else PipelinePlan.load(os.fspath(plan))
                chosen.check_graph(graph)
            else:
                chosen = solve_pipeline(graph, budgets, num_stages=stages, microbatches=microbatches,
                                        schedule=schedule)
            text = json.dumps({"format": PAYLOAD_FORMAT, "fingerprint": fingerprint, "plan": chosen.to_json()})
    payload = json.loads(_broadcast_text(text, group))
    with _agreed("planning its stage", rank, group):
        if payload.get("fingerprint") != fingerprint:
            raise PlanMismatchError(f"rank {rank} traced the model to {fingerprint} but rank 0 planned for "
                                    f"{payload.get('fingerprint')}: every rank must build the same model with the "
                                    "same input shapes before optimize(..., stages=K)")
        pipeline_plan = PipelinePlan.from_json(payload["plan"])
        if plan is not None and rank != 0:
            local = plan if isinstance(plan, PipelinePlan) else PipelinePlan.load(os.fspath(plan))
            if local.to_json() != pipeline_plan.to_json():
                raise PlanMismatchError(f"rank {rank} was given another pipeline plan than rank 0; pass the same file")
        if (pipeline_plan.num_stages, pipeline_plan.microbatches) != (stages, microbatches):
            raise PlanMismatchError(f"the pipeline plan is for {pipeline_plan.num_stages} stages and "
                                    f"{pipeline_plan.microbatches} micro-batches, not {stages} and {microbatches}")

        slices = slice_stages(step, pipeline_plan.stage_of_op(), stages)
        received = example_stage_inputs(model, step, slices, microbatch, rank)[rank]
        forward = StageForward(model, step, slices[rank])
        info, executor = _plan_stage(forward, slices[rank], received, budgets[rank], rank, stages, microbatches,
                                     schedule, solver, repeats, solver_options)
        module = PipelineStageModule(step, slices[rank], forward, executor, is_last=rank == stages - 1)
        with torch.no_grad(), torch.random.fork_rng(devices=[t.device for t in received
                                                             if t.device.type == "cuda"]), \
                preserved_buffers(model):
            outputs = module(*received)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    example_outputs = tuple(o.detach().requires_grad_(o.is_floating_point()) for o in outputs
                            if isinstance(o, torch.Tensor))
    params = dict(model.named_parameters())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    runner = PipelineRunner(module, rank, stages, microbatches, schedule, device,
                            loss_fn or _own_loss, received, example_outputs,
                            [params[name] for name in shared_parameters(slices, step)], group=group)
    log.info("rank %d: stage %d planned in %.1f s (predicted peak %d B of %d B)", rank, rank,
             time.perf_counter() - started, info.predicted_peak_bytes, info.budget_bytes)
    return PipelinedModel(model, pipeline_plan, info, module, runner, step)


def _own_loss(output: Any, target: Any = None) -> torch.Tensor:
    """The default loss: the model returns its loss (a scalar) or what `training_loss` reduces."""
    from planner.benchmark import training_loss
    return training_loss(output)


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() if t.is_contiguous() else t.numel() * t.element_size() for t in tensors)


def _plan_stage(forward: StageForward, stage: StageSlice, received: tuple[torch.Tensor, ...], budget_bytes: int,
                rank: int, stages: int, microbatches: int, schedule: str, solver: str, repeats: int,
                solver_options: dict[str, Any] | None) -> tuple[StageInfo, torch.nn.Module]:
    """Trace, profile and plan the stage's forward at the largest per-micro-batch budget
    for which the whole stage fits (module docstring, step 3), the whole stage priced by
    the solver's stage cost model (`solvers.pipeline_cost.StageSpec.cost`). O(log(budget))
    solves."""
    used = tuple(received[stage.received.index(name)] for name in forward.used_inputs)
    step = capture(forward, used)
    graph = profile(step, forward, used, repeats=repeats, progress=False)
    place = StagePlace.of(rank, stages, microbatches, schedule)
    received_bytes = _nbytes(received) if rank > 0 else 0
    output_bytes = sum(graph.value(graph.value(v).root).size_bytes for v in set(graph.forward_outputs))
    # values passed through (a U-Net skip) are sent too, and their gradients come back into
    # receive buffers of their size, one per micro-batch
    passed_bytes = _nbytes([received[stage.received.index(name)] for name in stage.sent
                            if name not in stage.computed])
    sent_bytes = output_bytes + passed_bytes if rank < stages - 1 else 0
    # The stage plan's peak is the working term: it counts the parameters, their gradients,
    # the buffers and the running micro-batch's input, so none of them is added again; with
    # several micro-batches the gradients accumulated in .grad stay beside those it makes.
    spec = StageSpec(microbatches=microbatches, place=place, resident_bytes=0,
                     gradient_bytes=sum(p.numel() * p.element_size() for p in forward.parameters() if p.requires_grad),
                     model_input_bytes=0, input_bytes=received_bytes, output_bytes=sent_bytes,
                     kept_output_bytes=output_bytes, input_in_working=True)
    fixed = spec.cost(saved_bytes=0, working_bytes=0)
    buffers = fixed.static_bytes + fixed.receive_bytes

    def whole(plan: Plan) -> tuple[int, int]:
        saved = simulate(graph, plan).saved_bytes
        return spec.cost(saved, plan.predicted_peak_bytes).peak_bytes, saved

    floor = least_feasible_lower_bound(graph).total
    high = budget_bytes - buffers

    def attempt(candidate: int) -> tuple[str, tuple[Plan, int, int, int] | None]:
        try:
            plan = solve(graph, candidate, solver, **dict(solver_options or {}))
        except InfeasibleBudgetError:
            return "too small", None
        total, saved = whole(plan)
        return ("fits", (plan, candidate, total, saved)) if total <= budget_bytes else ("too large", None)

    best = None
    if high >= floor:
        status, best = attempt(high)
        low, top = floor, high   # the answer lies in [low, top)
        for _ in range(8 if best is None else 0):
            if top - low <= max(1, high // 256):
                break
            middle = (low + top) // 2
            status, found = attempt(middle)
            if found is not None:
                best, low = found, middle
            elif status == "too small":
                low = middle + 1
            else:
                top = middle
    if best is None:
        raise InfeasibleBudgetError(budget_bytes, floor + buffers,
                                    {"least one-micro-batch step": floor, "receive buffers": buffers},
                                    solver=f"pipeline stage {rank}")
    plan, microbatch_budget, total, saved = best
    executor = ScheduledModule(forward, step, graph, plan)
    info = StageInfo(index=rank, budget_bytes=budget_bytes, microbatch_budget_bytes=microbatch_budget,
                     in_flight=place.in_flight, received_bytes=received_bytes, sent_bytes=sent_bytes, saved_bytes=saved,
                     predicted_peak_bytes=total, plan=plan, graph=graph)
    return info, executor
