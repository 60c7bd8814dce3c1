"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with one memsched plan per sharded block.

Every rank, before sharding (the model unsharded on its device, as ``fully_shard`` takes it)::

    plans = optimize_blocks(model, "6GiB", (idx, targets), blocks=model.blocks)   # bytes per rank
    for block in model.blocks:            # now the blocks' OptimizedModules
        fully_shard(block)
    fully_shard(model)

Design: a plan per FSDP unit. FSDP2 all-gathers a unit's parameters in its forward pre-hook
and registers the unsharded tensors on the unit's modules, frees them (storage resized to 0)
in its forward post-hook, all-gathers them again in a pre-backward hook on the unit's outputs
and reduce-scatters their ``.grad`` in a post-backward hook. The optimized block *is* the
unit, so these hooks run around the plan: its forward reads the module's parameters at call
time (the unsharded ones) and hands them to the step's ``autograd.Function``, whose saved
tensors alias their storage as eager autograd's would (FSDP refills it before the plan's
backward runs), and the gradients it returns land in the unsharded parameters' ``.grad``,
which FSDP reduce-scatters. Neither FSDP nor the runtime changes, the collectives stay FSDP's
own, and FSDP's gradients come out. The alternative, one plan captured through the
all-gathers of the whole model, would put FSDP's collectives into the traced program and run
the blocks outside their modules, so FSDP's hooks (its whole schedule) would never fire.

Budget: bytes per rank, peak of one training step as the CPU allocator sees it (or CUDA's),
FSDP's all-gathered parameters of the running block, its communication buffers and the
sharded parameters and gradients included. Each block gets its own plan budget, which
covers the block's step *with its unsharded parameters and their unsharded gradients*
(the plan counts them as resident, as FSDP holds them while the block runs). How the rank
budget is split:

1. One calibration step of the unsharded model, each block running memsched's keep-all plan
   (nothing recomputed), is measured from the allocator's events, with a mark where each
   block's forward and backward begin and end. It gives, for every stretch between marks,
   the most bytes live, and which blocks held saved activations then.
2. For a fraction ``f`` of activation memory (the fraction budget of `optimize`), every
   block is planned at ``f`` of its own activations (at least at its least feasible
   budget). The rank's peak is predicted stretch by stretch: the calibration's bytes, plus
   the plan's change of each block's saved bytes where it holds them and of its forward or
   backward peak where it runs (from `simulate`), with all blocks' parameters replaced by
   FSDP's: every unit's local shard, the root's parameters unsharded the whole step, and
   while a block runs its unsharded parameters plus FSDP's buffers beside them (forward:
   its all-gather output, which FSDP keeps until the next unit's all-gather; backward: the
   previous block's prefetched all-gather output and the last reduce-scatter input, or,
   while a unit reduce-scatters, its input, gloo's clone of it and the sharded output),
   each bounded by the largest unit's size padded to the world size.
3. ``f`` goes down from 1 in steps of 0.1, then halves the last step twice; the first ``f``
   (largest, fastest) whose predicted peak fits the budget wins; none fitting raises
   `InfeasibleBudgetError` with what the least plans still need.

Assumed FSDP2 settings: ``fully_shard`` on each block and on the root, default
``reshard_after_forward`` (True; the root keeps its parameters unsharded, FSDP's default),
implicit prefetching, no mixed precision or CPU offload, every rank's batch of the example's
shapes. Each rank plans for its own budget (plans may differ between ranks; FSDP's
collectives do not depend on them). Parameters shared between two units are refused.

Limits: planning runs one step of the unsharded model on the device (a model that fits
only sharded needs a plan captured through the all-gathers, which this is not). The FSDP
terms bound FSDP2's buffers as this torch version allocates them; the activation terms are
`simulate`'s changes from the keep-all plan, checked against the allocator on 2 gloo ranks
(tests/test_fsdp.py), not proved. A block's backward is marked finished when its inputs'
and parameters' gradients are in: an input the root also reads later marks it late.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from planner.api import OptimizedModule, _StepPlanner
from planner.budget import parse_budget, resolve_budget
from planner.capture import CapturedStep, capture, is_dtensor
from planner.errors import BudgetError, OptionError, UnsupportedModelError
from planner.memory import _storages_of, measure_allocator_peak_by_address
from planner.pipeline import _agreed
from planner.profile import profile
from planner.reuse import ProfileReuse
from planner.scratch import kineto_quiet
from runtime.module import ScheduledModule
from runtime.pipeline import preserved_buffers
from solvers.errors import InfeasibleBudgetError, format_bytes
from solvers.graph import Graph, Phase
from solvers.plan import Plan
from solvers.portfolio import solve
from solvers.simulate import simulate

__all__ = ["BlockPlan", "ShardedPlans", "optimize_blocks", "rank_step_peak"]

log = logging.getLogger(__name__)

_MARK = "memsched::fsdp::"
_COARSE_STEP = 0.1
_REFINEMENTS = 2


@dataclass(frozen=True)
class BlockPlan:
    """One block's plan and what the rank budget gave it."""

    name: str                      # the block's qualified name in the model
    module: OptimizedModule        # what now stands in the model at ``name``
    budget_bytes: int              # the plan's own budget: the block's step, unsharded parameters included
    unsharded_param_bytes: int     # what FSDP all-gathers for it (padded to the world size)
    saved_bytes: int               # held from its forward to its backward (simulate)
    keep_all_saved_bytes: int      # the same without a plan

    @property
    def plan(self) -> Plan:
        return self.module.plan


@dataclass(frozen=True)
class ShardedPlans:
    """What `optimize_blocks` did: one `BlockPlan` per block, and the rank's budget split."""

    budget_bytes: int
    predicted_peak_bytes: int      # the rank's step, FSDP2 as assumed (module docstring)
    fraction: float                # of each block's activation memory its plan was given
    world_size: int
    blocks: list[BlockPlan]
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def modules(self) -> list[OptimizedModule]:
        """The optimized blocks, to ``fully_shard`` one by one."""
        return [block.module for block in self.blocks]

    @property
    def recomputed(self) -> int:
        """How many values the plans recompute in all."""
        return sum(decision.value == "recompute" for block in self.blocks
                   for decision in block.plan.decisions.values())


# --------------------------------------------------------------------------- sizes


def _padded_bytes(parameters: Iterable[torch.Tensor], world_size: int) -> int:
    """Bytes FSDP2 all-gathers for these parameters: dim 0 padded to a multiple of the world size."""
    total = 0
    for parameter in parameters:
        rows = parameter.shape[0] if parameter.dim() else 1
        rest = parameter.numel() // rows if rows else 0
        total += math.ceil(rows / world_size) * world_size * rest * parameter.element_size()
    return total


def _bytes(parameters: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class _Stretch:
    """The time between two marks of the calibration step."""

    high_water_bytes: int
    held: frozenset[int]           # blocks whose saved activations are alive
    forward_of: int | None         # the block whose forward runs
    backward_of: int | None        # the block whose backward runs
    backward: bool                 # the backward has begun


def _mark(name: str) -> None:
    with torch.profiler.record_function(_MARK + name):
        pass


class _Marks:
    """Hooks that mark where each block's forward and backward begin and end."""

    def __init__(self, blocks: Sequence[torch.nn.Module]) -> None:
        self.handles: list[Any] = []
        self.pending: dict[int, int] = {}
        self.started: set[int] = set()
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_forward(index), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post_forward(index)))
            for parameter in block.parameters():
                if parameter.requires_grad:
                    self.handles.append(parameter.register_post_accumulate_grad_hook(self._done(index)))

    def _pre_forward(self, index: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            _mark(f"fwd_start:{index}")
            waiting = sum(p.requires_grad for p in module.parameters())
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    self.handles.append(leaf.register_hook(self._done(index)))
                    waiting += 1
            self.pending[index] = waiting
        return hook

    def _post_forward(self, index: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            _mark(f"fwd_end:{index}")
            for leaf in pytree.tree_leaves(output):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    self.handles.append(leaf.register_hook(self._backward_starts(index)))
        return hook

    def _backward_starts(self, index: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            if index not in self.started:
                self.started.add(index)
                _mark(f"bwd_start:{index}")
        return hook

    def _done(self, index: int) -> Callable:
        def hook(*_: Any) -> None:
            self.pending[index] = self.pending.get(index, 0) - 1
            if self.pending[index] == 0:
                _mark(f"bwd_end:{index}")
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _stretches(step: Callable[[], Any], resident: Sequence[torch.Tensor], device: torch.device) -> list[_Stretch]:
    """Run ``step`` under the profiler and cut the timeline of ``device``'s allocator at the marks."""
    resident_bytes = sum({s._cdata: s.nbytes() for t in resident for s in _storages_of(t)
                          if s.device.type == device.type}.values())
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    with kineto_quiet(), torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
    with kineto_quiet():
        events = profiler.profiler.kineto_results.events()
    timeline = sorted([(event.start_ns(), 1, event.nbytes(), "") for event in events
                       if event.name() == "[memory]" and event.device_type() == kind]
                      + [(event.start_ns(), 0, 0, event.name()[len(_MARK):]) for event in events
                         if event.name().startswith(_MARK)])
    stretches: list[_Stretch] = []
    held: set[int] = set()
    forward_of = backward_of = None
    backward = False
    live = high = resident_bytes
    for _, kind, nbytes, mark in timeline:
        if kind == 1:
            live += nbytes
            high = max(high, live)
            continue
        stretches.append(_Stretch(high, frozenset(held), forward_of, backward_of, backward))
        high = live
        what, _, number = mark.partition(":")
        index = int(number) if number else None
        if what == "fwd_start":
            forward_of = index
        elif what == "fwd_end":
            forward_of = None
            held.add(index)
        elif what == "backward":
            backward = True
        elif what == "bwd_start":
            held.discard(index)
            backward_of = index
        elif what == "bwd_end" and backward_of == index:
            backward_of = None
    stretches.append(_Stretch(high, frozenset(held), forward_of, backward_of, backward))
    return stretches


@contextlib.contextmanager
def _calibrating(model: torch.nn.Module) -> Iterator[None]:
    """Leave no trace of a calibration run: RNG, buffers and ``.grad`` as they were."""
    grads = [(p, p.grad) for p in model.parameters()]
    for parameter, _ in grads:
        parameter.grad = None
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices), preserved_buffers(model):
            yield
    finally:
        for parameter, grad in grads:
            parameter.grad = grad


def _replaced(model: torch.nn.Module, names: Sequence[str], modules: Sequence[torch.nn.Module]) -> None:
    for name, module in zip(names, modules):
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, module)


# --------------------------------------------------------------------------- planning


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    step: CapturedStep | None = None
    graph: Graph | None = None
    keep: tuple[int, int, int] = (0, 0, 0)          # keep-all plan: saved, forward peak, backward peak
    plans: dict[int, Plan] = field(default_factory=dict)


def _phase_figures(graph: Graph, plan: Plan) -> tuple[int, int, int]:
    """Saved bytes, forward high water and backward high water of a plan (simulate)."""
    result = simulate(graph, plan)
    forward = max((p.high_water_bytes for p in result.timeline if p.phase is Phase.FORWARD), default=0)
    backward = max((p.high_water_bytes for p in result.timeline if p.phase is Phase.BACKWARD), default=0)
    return result.saved_bytes, forward, backward


def _resolve_blocks(model: torch.nn.Module, blocks: Any) -> list[tuple[str, torch.nn.Module]]:
    names = {module: name for name, module in model.named_modules()}
    if isinstance(blocks, (str, torch.nn.Module)) and not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)):
        blocks = [blocks]
    resolved = []
    for block in blocks:
        if isinstance(block, str):
            try:
                block = model.get_submodule(block)
            except AttributeError:
                raise OptionError(f"optimize_blocks: the model has no submodule {block!r}; pass the blocks to shard "
                                  "(modules of the model or their qualified names, e.g. blocks=model.blocks)") from None
        if not isinstance(block, torch.nn.Module) or block not in names:
            raise OptionError(f"optimize_blocks: {type(block).__name__} is not a submodule of the model; pass the "
                              "blocks to shard as modules of the model or their names (blocks=model.blocks)")
        if block is model:
            raise OptionError("optimize_blocks: the root cannot be a block (FSDP's root unit keeps its parameters "
                              "unsharded); pass its blocks, e.g. blocks=model.blocks")
        if isinstance(block, ScheduledModule):
            raise OptionError(f"optimize_blocks: block {names[block]!r} is optimized already; pass the plain "
                              "blocks of a model that optimize has not wrapped")
        resolved.append((names[block], block))
    if not resolved:
        raise OptionError("optimize_blocks: no blocks given; pass the modules FSDP shards one by one "
                          "(blocks=model.blocks)")
    for name, _ in resolved:
        for other, _ in resolved:
            if other != name and other.startswith(name + "."):
                raise OptionError(f"optimize_blocks: block {other!r} lies inside block {name!r}; pass blocks "
                                  "that do not nest (the units FSDP shards one by one)")
    return resolved


def _check_unsharded(model: torch.nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if is_dtensor(parameter):
            raise UnsupportedModelError(
                f"optimize_blocks: parameter {name!r} is a DTensor, so the model is sharded already; plan before "
                "sharding: call optimize_blocks on the unsharded model, then fully_shard each optimized block "
                "and the root")


def _check_sharing(model: torch.nn.Module, resolved: list[tuple[str, torch.nn.Module]]) -> None:
    owner: dict[int, str] = {}
    for name, block in resolved:
        for parameter in block.parameters():
            owner[id(parameter)] = name
    seen: dict[int, str] = {}
    for name, block in resolved:
        for parameter_name, parameter in block.named_parameters(remove_duplicate=False):
            if id(parameter) in seen and seen[id(parameter)] != name:
                raise UnsupportedModelError(
                    f"optimize_blocks: blocks {seen[id(parameter)]!r} and {name!r} share parameter "
                    f"{parameter_name!r}; FSDP shards a shared parameter once, in one unit: make the sharing "
                    "blocks one block (a module holding both), or untie the parameter")
            seen[id(parameter)] = name
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):
        block_name = owner.get(id(parameter))
        if block_name is not None and not parameter_name.startswith(block_name + "."):
            raise UnsupportedModelError(
                f"optimize_blocks: parameter {parameter_name!r} of the root is also a parameter of block "
                f"{block_name!r}; a block's plan owns its parameters: untie it, or leave that block unsharded "
                "with the root")


def optimize_blocks(model: torch.nn.Module, budget: int | str, example_inputs: Sequence[Any] | Any, *,
                    blocks: Any, world_size: int | None = None, example_kwargs: Mapping[str, Any] | None = None,
                    loss_fn: Callable[[Any], torch.Tensor] | None = None, solver: str = "auto", repeats: int = 3,
                    solver_options: Mapping[str, Any] | None = None, progress: bool | None = None,
                    on_new_shape: str = "error") -> ShardedPlans:
    """Plan each of ``blocks`` so that one FSDP2 training step peaks at most at ``budget``
    on this rank, and put the optimized blocks in their places in ``model`` (module docstring).

    Call it on every rank on the unsharded model, then ``fully_shard`` each block (now an
    `planner.api.OptimizedModule`) and the root. Gradients are FSDP2's without memsched.

    Args:
        model: the whole model, unsharded, on its device, in training mode.
        budget: bytes per rank (an int or a size such as ``"6GiB"``): the peak of one step on
            this rank, FSDP's all-gathered parameters and buffers included.
        example_inputs: the positional inputs of one step on this rank (this rank's batch).
        blocks: the modules FSDP shards one by one (``model.blocks``), or their names.
        world_size: ranks the blocks are sharded over (default: the process group's size).
        loss_fn: makes the loss from the model's output in the calibration step (default
            `planner.benchmark.training_loss`: the model's own scalar loss, else the mean).
        solver, repeats, solver_options, progress: as for `planner.api.optimize`.
        on_new_shape: what an optimized block does with inputs of other shapes: ``"error"``
            (default: `PlanMismatchError`; the rank budget was split for these shapes) or
            ``"plan"`` (plan them at the block's budget in bytes).

    Raises:
        BudgetError: a budget that is not bytes. OptionError: bad ``blocks`` or no world size.
        UnsupportedModelError: the model is sharded already, a block does not run exactly once
            per step, or units share a parameter. InfeasibleBudgetError: the least plans do
            not fit, with what they need.
    """
    started = time.perf_counter()
    parsed = parse_budget(budget)
    if isinstance(parsed, float):
        raise BudgetError(f"optimize_blocks: budget {budget!r} is a fraction; an FSDP rank's budget is bytes (an int "
                          "or a size such as '6GiB'): the peak of one step on this rank, sharded parameters included")
    if on_new_shape not in ("plan", "error"):
        raise OptionError(f"on_new_shape={on_new_shape!r}; choose 'error' or 'plan'")
    if world_size is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise OptionError("optimize_blocks: no process group to read the world size from; call "
                              "torch.distributed.init_process_group first or pass world_size=")
        world_size = torch.distributed.get_world_size()
    if world_size < 1:
        raise OptionError(f"optimize_blocks: world_size={world_size}; pass the number of ranks sharding the blocks")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # a failure on one rank is raised on every rank (one all-gather), so that none goes on to
    # shard and waits forever in FSDP's first all-gather
    with _agreed("planning its blocks", torch.distributed.get_rank(), None) if distributed else contextlib.nullcontext():
        return _optimize_blocks(model, int(parsed), example_inputs, blocks, world_size, example_kwargs, loss_fn,
                                solver, repeats, solver_options, progress, on_new_shape, started)


def _optimize_blocks(model: torch.nn.Module, parsed: int, example_inputs: Any, blocks: Any, world_size: int,
                     example_kwargs: Mapping[str, Any] | None, loss_fn: Callable[[Any], torch.Tensor] | None,
                     solver: str, repeats: int, solver_options: Mapping[str, Any] | None, progress: bool | None,
                     on_new_shape: str, started: float) -> ShardedPlans:
    _check_unsharded(model)
    resolved = _resolve_blocks(model, blocks)
    _check_sharing(model, resolved)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) or not isinstance(
        example_inputs, (tuple, list)) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if loss_fn is None:
        from planner.benchmark import training_loss
        loss_fn = training_loss

    # 1. each block's example inputs, as the model hands them over, and its graph
    found = _block_inputs(model, [block for _, block in resolved], inputs, kwargs)
    work = [_Block(name, block, *found[index]) for index, (name, block) in enumerate(resolved)]
    for block in work:
        block.step = capture(block.module, block.args, block.kwargs)
        block.graph = profile(block.step, block.module, block.args, block.kwargs, repeats=repeats, progress=progress)
        keep_all = solve(block.graph, 2**62, "none")
        block.keep = _phase_figures(block.graph, keep_all)
        block.plans[keep_all.budget_bytes] = keep_all

    # 2. the calibration step, each block running its keep-all plan
    keep_modules = [ScheduledModule(block.module, block.step, block.graph, next(iter(block.plans.values())))
                    for block in work]
    names = [block.name for block in work]
    stretches = _calibrate(model, names, [block.module for block in work], keep_modules, inputs, kwargs, loss_fn)

    # 3. FSDP's parameters in place of the unsharded ones
    block_params = [{id(p): p for p in block.module.parameters()} for block in work]
    in_blocks = {key for params in block_params for key in params}
    root_params = [p for p in model.parameters() if id(p) not in in_blocks]
    padded = [_padded_bytes(params.values(), world_size) for params in block_params]
    root_padded = _padded_bytes(root_params, world_size)
    local = (sum(padded) + root_padded) // world_size
    largest = max(padded)
    base = local - sum(_bytes(params.values()) for params in block_params) + root_padded - _bytes(root_params)
    # FSDP2's buffers beside the running unit's unsharded parameters, at their most (module docstring):
    # forward, the running block's all-gather output (the root's while block 0 gathers); backward,
    # the next block's prefetched all-gather output and the last reduce-scatter input, or while a
    # unit reduce-scatters, its input, gloo's clone of it and the sharded output
    extra = {"forward": max(2 * largest, root_padded + largest),
             "backward": max(3 * largest + largest // world_size, 2 * root_padded + root_padded // world_size)}

    def predict(plans: list[Plan]) -> tuple[int, dict[str, int]]:
        figures = [_phase_figures(block.graph, plan) for block, plan in zip(work, plans)]
        saved = [f[0] - block.keep[0] for f, block in zip(figures, work)]
        forward = [f[1] - block.keep[1] for f, block in zip(figures, work)]
        backward = [f[2] - block.keep[2] for f, block in zip(figures, work)]
        peak, at = -1, None
        for stretch in stretches:
            value = stretch.high_water_bytes + sum(saved[j] for j in stretch.held) + base
            if stretch.forward_of is not None:
                value += forward[stretch.forward_of]
            if stretch.backward_of is not None:
                value += backward[stretch.backward_of]
            value += extra["backward" if stretch.backward else "forward"]
            if value > peak:
                peak, at = value, stretch
        held = sum(figures[j][0] for j in at.held)
        return peak, {"sharded parameters (local shards)": local,
                      "saved by the blocks' plans at the peak": held,
                      "FSDP all-gather and reduce-scatter buffers (bound)": extra[
                          "backward" if at.backward else "forward"],
                      "the rest of the step at the peak (root, running block)": peak - local - held - extra[
                          "backward" if at.backward else "forward"]}

    def plans_at(fraction: float) -> list[Plan]:
        chosen = []
        for block in work:
            budget_bytes = resolve_budget(fraction, block.graph).budget_bytes
            plan = _solve_cached(block, budget_bytes, solver, solver_options)
            chosen.append(plan)
        return chosen

    tried: dict[float, tuple[int, list[Plan], dict[str, int]]] = {}

    def attempt(fraction: float) -> bool:
        plans = plans_at(fraction)
        peak, breakdown = predict(plans)
        tried[fraction] = (peak, plans, breakdown)
        log.info("optimize_blocks: fraction %.3f: predicted rank peak %s of %s", fraction, format_bytes(peak),
                 format_bytes(parsed))
        return peak <= parsed

    fraction, previous = 1.0, None
    while not attempt(fraction):
        budgets = [plan.budget_bytes for plan in tried[fraction][1]]
        lower = round(fraction - _COARSE_STEP, 6)
        if lower <= 0 or budgets == previous:      # every block at its least plan already
            break
        fraction, previous = lower, budgets
    else:
        step = _COARSE_STEP
        for _ in range(_REFINEMENTS if fraction < 1.0 else 0):
            step /= 2
            if attempt(round(fraction + step, 6)):
                fraction = round(fraction + step, 6)
    fitting = [f for f, (peak, _, _) in tried.items() if peak <= parsed]
    if not fitting:
        least = min(tried.values(), key=lambda entry: entry[0])
        raise InfeasibleBudgetError(int(parsed), least[0], least[2], solver="optimize_blocks, per rank")
    fraction = max(fitting)
    peak, plans, breakdown = tried[fraction]

    # 4. the optimized blocks in their places
    results = []
    for block, plan in zip(work, plans):
        planner = _StepPlanner(budget=plan.budget_bytes, solver=solver, repeats=repeats,
                               solver_options=dict(solver_options or {}), progress=progress, transfer=None,
                               backward_from="auto", release_outputs=False,
                               reuse=ProfileReuse(block.step, block.graph))
        optimized = OptimizedModule(block.module, block.step, block.graph, plan, planner, on_new_shape=on_new_shape)
        optimized.replan = "planner.fsdp.optimize_blocks()"
        saved = _phase_figures(block.graph, plan)[0]
        results.append(BlockPlan(block.name, optimized, plan.budget_bytes,
                                 _padded_bytes(block.module.parameters(), world_size), saved, block.keep[0]))
    _replaced(model, names, [result.module for result in results])
    log.info("optimize_blocks: %d blocks planned in %.1f s at %.3f of their activations; predicted rank peak %s of "
             "%s", len(results), time.perf_counter() - started, fraction, format_bytes(peak), format_bytes(parsed))
    return ShardedPlans(budget_bytes=int(parsed), predicted_peak_bytes=peak, fraction=fraction, world_size=world_size,
                        blocks=results, breakdown=breakdown)


def _solve_cached(block: _Block, budget_bytes: int, solver: str, solver_options: Mapping[str, Any] | None) -> Plan:
    """The block's plan at this budget, or at its least feasible budget when this one is
    below it (a block never gets less than its least plan)."""
    asked, tries = budget_bytes, 0
    while budget_bytes not in block.plans:
        try:
            block.plans[budget_bytes] = solve(block.graph, budget_bytes, solver, **dict(solver_options or {}))
        except InfeasibleBudgetError as error:
            tries += 1
            if tries > 4:          # a solver that keeps moving its floor: give its last word
                raise
            # the least feasible budget is a lower bound for some solvers: try it, then higher
            budget_bytes = max(error.least_feasible_bytes, budget_bytes + 1)
    block.plans[asked] = block.plans[budget_bytes]
    return block.plans[asked]


def _block_inputs(model: torch.nn.Module, blocks: Sequence[torch.nn.Module], inputs: tuple, kwargs: dict
                  ) -> list[tuple[tuple, dict]]:
    """Each block's positional and keyword inputs in one forward of the plain model (detached,
    ``requires_grad`` as the model hands them over); `UnsupportedModelError` unless each
    block runs exactly once."""
    found: dict[int, list[tuple[tuple, dict]]] = {index: [] for index in range(len(blocks))}

    def keep(value: Any) -> Any:
        return value.detach().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) else value

    def recorder(index: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            found[index].append((pytree.tree_map(keep, tuple(args)), pytree.tree_map(keep, dict(kw))))
        return hook

    handles = [block.register_forward_pre_hook(recorder(index), with_kwargs=True) for index, block in enumerate(blocks)]
    try:
        with _calibrating(model), torch.enable_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    names = {module: name for name, module in model.named_modules()}
    for index, calls in found.items():
        if len(calls) != 1:
            raise UnsupportedModelError(
                f"optimize_blocks: block {names[blocks[index]]!r} ran {len(calls)} times in one forward; FSDP "
                "gathers a unit's parameters once per call and each plan is for one call: pass blocks the model "
                "calls exactly once per step")
    return [found[index][0] for index in range(len(blocks))]


def _calibrate(model: torch.nn.Module, names: Sequence[str], plain: Sequence[torch.nn.Module],
               keep_modules: Sequence[torch.nn.Module], inputs: tuple, kwargs: dict,
               loss_fn: Callable[[Any], torch.Tensor]) -> list[_Stretch]:
    """The calibration step (module docstring, 1.), the blocks running keep-all plans."""
    resident = list(model.parameters()) + list(model.buffers())
    resident += [t for t in pytree.tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor)]
    marks = _Marks(keep_modules)
    _replaced(model, names, keep_modules)

    def step() -> None:
        output = model(*inputs, **kwargs)
        loss = loss_fn(output)
        _mark("backward")
        loss.backward()
        del output, loss

    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with _calibrating(model):
            return _stretches(step, resident, device)
    finally:
        _replaced(model, names, plain)
        marks.remove()


# --------------------------------------------------------------------------- measuring


def rank_step_peak(model: torch.nn.Module, example_inputs: Sequence[Any] | Any, *,
                   example_kwargs: Mapping[str, Any] | None = None,
                   loss_fn: Callable[[Any], torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """One training step of a sharded model (``.grad`` set to None first) and its peak on
    this rank, from the CPU allocator's events: the local shards of the parameters (DTensors),
    the buffers and the inputs from the start, and everything the step allocates, FSDP's
    all-gathers and gloo's copies included (`planner.memory.measure_allocator_peak_by_address`,
    which counts the frees gloo's threads make). Run one step before: FSDP2 allocates some
    state lazily in the first. Returns the loss and the peak."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) or not isinstance(
        example_inputs, (tuple, list)) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if loss_fn is None:
        from planner.benchmark import training_loss
        loss_fn = training_loss
    model.zero_grad(set_to_none=True)
    resident = list(model.parameters()) + list(model.buffers())
    resident += [t for t in pytree.tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor)]

    def step() -> torch.Tensor:
        output = model(*inputs, **kwargs)
        loss = loss_fn(output)
        loss.backward()
        return loss.detach()

    return measure_allocator_peak_by_address(step, resident)
