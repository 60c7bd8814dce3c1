"""The drop-in module: runs the plan's forward and backward programs inside one
`torch.autograd.Function`, on the ORIGINAL parameters and buffers.

Because the wrapped model is held as is, ``state_dict``, optimizers, ``.grad``
accumulation and ``train()/eval()`` behave as on the plain model. In eval mode or under
``torch.no_grad()`` there is no backward to plan for, so the plain forward runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Collection

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef

from runtime.step import CapturedStep, input_signature
from runtime.codegen import Programs, generate
from runtime.compiled import compile_programs
from solvers.errors import InvalidPlanError, PlanMismatchError, UnsupportedUseError, format_bytes
from solvers.graph import Graph, Phase
from solvers.plan import EAGER_BUDGET_OPTION, Plan
from solvers.simulate import simulate


class StepProgram:
    """The generated programs of one plan and how to call them."""

    def __init__(self, step: CapturedStep, graph: Graph, plan: Plan, device_type: str, *,
                 compile: bool = False, inductor_options: dict[str, Any] | None = None,
                 eager_first_call: Collection[Phase] = ()) -> None:
        self.step = step
        self.programs: Programs = generate(step, graph, plan, device_type)
        self.compiled = compile
        self.inductor_options = dict(inductor_options or {})
        if compile:                     # inductor compiles each aten run on its first call
            self.programs = compile_programs(self.programs, self.inductor_options,
                                             eager_first_call=eager_first_call)
        tensor_leaves = [leaf for leaf in step.output_leaves if leaf.is_tensor]
        self.differentiable = [leaf.differentiable for leaf in tensor_leaves]
        self.tangent = [leaf.tangent for leaf in tensor_leaves]
        # outputs the plan counts as dropped by the caller before the backward
        self.released = [index for index, name in enumerate(step.tensor_output_names())
                         if name is not None and name in graph.released_outputs]
        self.num_params = len(step.param_names)
        self.num_buffers = len(step.buffer_names)
        self.num_inputs = len(step.tensor_input_positions)
        # set by whoever measures a compiled step (`planner.compiled`): its peak, and the
        # budget the plan was solved for (below the caller's when compiling overshot)
        self.measured_peak_bytes: int | None = None
        self.solver_budget_bytes: int | None = None
        self.fit_tries = 0             # compiled steps measured to fit the budget (`planner.compiled`)

    def finish_compiling(self) -> None:
        """Wait for the compiled programs' kernels still building (``eager_first_call``:
        `runtime.compiled.CompiledProgram`); nothing when not compiled."""
        if self.compiled:
            self.programs.forward.finish_compiling()
            self.programs.backward.finish_compiling()

    @property
    def compile_count(self) -> int:
        """Runs this program has made ready: compiled by inductor, or taken from the runs
        this process compiled before (`runtime.compiled`); 0 when not compiled."""
        if not self.compiled:
            return 0
        return self.programs.forward.compile_count + self.programs.backward.compile_count


class _ScheduledStep(torch.autograd.Function):
    """forward: run the forward program, keep what the backward reads; backward: hand it
    over in a list the backward program clears, so each value dies at its last use."""

    @staticmethod
    def forward(ctx: Any, program: StepProgram, *flat_args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        programs = program.programs
        # Kernels that consult grad mode (oneDNN's RNN keeps a training workspace only when
        # it is on) must see what the trace saw; detached inputs keep autograd out of it.
        with torch.enable_grad():
            results = programs.forward(*(t.detach() for t in flat_args))
        outputs = results[:programs.num_outputs]
        # detached aliases: the same storage, but no reference cycle through the outputs' grad_fn
        ctx.handover = [t.detach() if isinstance(t, torch.Tensor) else t for t in results[programs.num_outputs:]]
        ctx.program = program
        ctx.released = _watch_released(program, outputs, ctx.handover, flat_args)
        non_differentiable = [out for out, grad in zip(outputs, program.differentiable) if not grad]
        if non_differentiable:
            ctx.mark_non_differentiable(*non_differentiable)
        # an output the backward does not start from gets None, not a materialized zero tensor
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        program: StepProgram = ctx.program
        if ctx.handover is None:
            raise UnsupportedUseError("memsched: backward ran twice through one optimized step; retain_graph=True is "
                               "not supported because saved activations are freed as the backward uses them")
        arguments = ctx.handover
        ctx.handover = None
        still_held = [index for index, storage in ctx.released if not storage.expired()]
        ctx.released = []
        if still_held:
            raise PlanMismatchError(
                f"output(s) {still_held} of the optimized {program.step.model_name or 'model'} are still referenced when "
                "the backward starts, but the plan was made with optimize(..., release_outputs=True), which counts "
                "them as dropped after the forward: keep only the loss (`loss = model(x).loss`, `del out`) before "
                "calling backward, or optimize with release_outputs=False")
        for index, (gradient, seeded) in enumerate(zip(grad_outputs, program.tangent)):
            if gradient is not None and not seeded and program.differentiable[index]:
                raise PlanMismatchError(
                    f"a gradient reached output {index} of the optimized {program.step.model_name or 'model'}, but the plan "
                    "backpropagates from its loss output(s) only; optimize(..., backward_from='all') plans a "
                    "backward from every output")
        # The traced backward expects contiguous gradients. When autograd hands over an
        # expanded one (after .sum() or .mean()), the copy is held to the end like the ones
        # autograd holds itself: the plan counts every tangent for the whole backward.
        leaves = [leaf for leaf in program.step.output_leaves if leaf.is_tensor]
        tangents = [torch.zeros(leaf.shape, dtype=leaf.dtype, device=leaf.device) if g is None else g.contiguous()
                    for g, leaf in zip(grad_outputs, leaves) if leaf.tangent]
        arguments.extend(tangents)
        gradients = program.programs.backward(arguments)
        del tangents
        step = program.step
        result: list[torch.Tensor | None] = [None] * (program.num_params + program.num_buffers + program.num_inputs)
        slots = iter(program.programs.gradient_slots)
        for position in step.grad_param_positions:
            slot = next(slots)
            result[position] = None if slot is None else gradients[slot]
        for position in step.grad_input_positions:
            slot = next(slots)
            result[program.num_params + program.num_buffers + position] = None if slot is None else gradients[slot]
        return (None, *result)


def checked_plan(graph: Graph, plan: Plan, *, compiled: bool = False) -> Plan:
    """``plan`` with its predictions replaced by `simulate`'s replay on ``graph``, which
    refuses a plan made for another graph (`PlanMismatchError`) or one that cannot run
    (`InvalidPlanError`, naming the step and the value); `InvalidPlanError` too when the
    replay peaks above the plan's own budget, or, for a plan that runs ``compiled``, above
    its `EAGER_BUDGET_OPTION` (whoever compiles it measures the caller's budget). Nothing
    runs a plan this did not accept: a saved plan may have been edited."""
    result = simulate(graph, plan)
    limit_bytes = plan.budget_bytes
    if compiled:
        limit_bytes = max(limit_bytes, int(plan.options.get(EAGER_BUDGET_OPTION, 0)))
    if result.peak_bytes > limit_bytes:
        steps = plan.steps(result.peak_phase)
        at = steps[result.peak_step_index] if 0 <= result.peak_step_index < len(steps) else "the start"
        raise InvalidPlanError(
            f"plan by {plan.solver!r} peaks at {format_bytes(result.peak_bytes)} ({result.peak_bytes} bytes) at "
            f"{result.peak_phase.value} step {result.peak_step_index} {at}, above its budget of "
            f"{format_bytes(limit_bytes)}; re-plan with optimize(model, budget, example_inputs) "
            "without plan=, or give the plan a budget it meets"
            + ("; this plan was fitted to its budget compiled: load it with compile=True"
               if not compiled and EAGER_BUDGET_OPTION in plan.options else ""))
    return replace(plan, predicted_peak_bytes=result.peak_bytes, predicted_time_ms=result.time_ms)


def _watch_released(program: StepProgram, outputs: list[torch.Tensor], handover: list[Any],
                    flat_args: tuple[torch.Tensor, ...]) -> list[tuple[int, StorageWeakRef]]:
    """A weak reference to the storage of each released output that nothing but the caller
    keeps: not saved for the backward, not shared with a held output or an argument."""
    if not program.released:
        return []
    held = [t for t in handover if isinstance(t, torch.Tensor)] + list(flat_args)
    held += [out for index, out in enumerate(outputs) if index not in program.released]
    held_storages = {t.untyped_storage().data_ptr() for t in held if t.untyped_storage().nbytes()}
    return [(index, StorageWeakRef(outputs[index].untyped_storage())) for index in program.released
            if outputs[index].untyped_storage().nbytes()
            and outputs[index].untyped_storage().data_ptr() not in held_storages]


class ScheduledModule(torch.nn.Module):
    """``model`` executing ``plan``: same parameters, same math, peak within the plan's budget.

    With ``compile=True`` the plan's programs run compiled by inductor (`runtime.compiled`).

    Attributes:
        module: the original model (its parameters are this module's parameters).
        plan: the `solvers.Plan` being executed.
        graph: the `solvers.Graph` it was made for.
    """

    def __init__(self, model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan, *,
                 compile: bool = False, program: StepProgram | None = None) -> None:
        super().__init__()
        self.module = model
        # the module runs one plan: the other plans its solver found are not kept
        self.plan = checked_plan(graph, replace(plan, runners_up=()),
                                 compiled=compile or (program is not None and program.compiled))
        self.graph = graph
        self._step = step
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # ``program``: one already built (and compiled) for this plan, re-used as is
        self._program = program or StepProgram(step, graph, plan, device.type, compile=compile)
        self._register_load_state_dict_pre_hook(_wrapped_model_keys)

    @property
    def forward_code(self) -> str:
        """The generated Python of the forward program (for inspection)."""
        return self._program.programs.forward.code

    @property
    def backward_code(self) -> str:
        return self._program.programs.backward.code

    @property
    def compile_count(self) -> int:
        """Inductor compilations of the running plan's programs so far (0 unless compiled)."""
        return self._program.compile_count

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)        # no backward to plan for
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self._check_call(leaves, spec)
        return self._run(leaves)

    # the call that plans again, named in `PlanMismatchError` (`planner.fsdp` names its own)
    replan = "optimize()"

    def _check_call(self, leaves: list[Any], spec: pytree.TreeSpec) -> None:
        """Refuse a call whose step is not the one the plan was made for."""
        step = self._step
        name = type(self.module).__name__
        if spec != step.input_spec or input_signature(leaves) != step.input_signature:
            raise PlanMismatchError(
                f"{name} was optimized for inputs {describe_signature(step.input_signature)} but got "
                f"{describe_signature(input_signature(leaves)) if spec == step.input_spec else 'another input structure'}; "
                f"call {self.replan} again with example inputs of this shape (or use drop_last=True in the DataLoader)")
        if self.module.training != step.training:
            mode = "train" if step.training else "eval"
            raise PlanMismatchError(
                f"{name} was optimized in {mode} mode but is called in {'eval' if step.training else 'train'} mode "
                f"with gradients enabled; call it in {mode} mode, under torch.no_grad() to run the plain forward, or "
                f"{self.replan} again in this mode")
        requires_grad = [p.requires_grad for _, p in self.module.named_parameters()]
        if requires_grad != step.param_requires_grad:
            changed = [n for (n, p), was in zip(self.module.named_parameters(), step.param_requires_grad)
                       if p.requires_grad != was]
            raise PlanMismatchError(
                f"{name}: parameter(s) {changed[:3] or 'added or removed'} were frozen or unfrozen since {self.replan}, "
                f"so the plan's gradients would be wrong: {self.replan} again after changing requires_grad")

    def _run(self, leaves: list[Any]) -> Any:
        """One step of the plan on the flattened inputs of an accepted call."""
        step = self._step
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        flat = [params[name] for name in step.param_names] + [buffers[name] for name in step.buffer_names]
        flat += [leaves[i] for i in step.tensor_input_positions]
        tensor_outputs = iter(_ScheduledStep.apply(self._program, *flat))
        output_leaves = [next(tensor_outputs) if leaf.is_tensor else leaf.constant for leaf in step.output_leaves]
        return pytree.tree_unflatten(output_leaves, step.output_spec)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped model's state dict, with its own keys."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def _wrapped_model_keys(state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A model holding a `ScheduledModule` (a block optimized on its own) saves the wrapped
    model's keys (`ScheduledModule.state_dict`), but loading walks into ``module``: give
    this subtree's keys that prefix, so that the model loads what it saved."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[f"{prefix}module.{key[len(prefix):]}"] = state_dict.pop(key)


def describe_signature(signature: tuple) -> str:
    parts = []
    for item in signature:
        if item[0] == "autocast":
            parts.append(f"autocast {dict(item[1])}" if item[1] else "no autocast")
        elif item[0] == "tensor":
            parts.append(f"{list(item[1])} {item[2].removeprefix('torch.')}")
        else:
            parts.append(item[1])
    return "(" + ", ".join(parts) + ")"
