"""``optimize(..., compile=True)``: keep the budget once inductor has compiled the plan.

Inductor (PyTorch 2 / TorchInductor, Ansel et al., ASPLOS 2024) fuses each run of the
plan's aten ops (`runtime.compiled`) and plans its own buffers: it reuses a dead buffer
for a new one of another size, keeps fused temporaries and calls kernels whose workspace
the eager profile never saw. The plan's predicted peak is the eager program's, so the
compiled step is measured instead: one warm-up step (it compiles), then one step under
the allocator's own events on a CPU (`planner.memory.measure_allocator_peak`) or the
CUDA caching allocator's statistics on a GPU (`planner.memory.measure_step_memory`), with
the model's gradients, buffers and random generators put back afterwards.

If the measured peak is above the budget, the plan is solved again for the budget less
what compiling added to that plan (its measured peak less its eager prediction, mostly
independent of the plan: channels-last copies, fused temporaries) and measured again, up
to `MAX_FITS` times; then the call is refused with `CompiledBudgetError`, which gives
the least peak measured. Where no plan is left below the one that measured over (at the
solver's floor), the other plans ``auto``'s race found for the same budget
(`solvers.plan.Plan.runners_up`, no solve needed) are compiled in turn
(`_fit_an_alternative`): plans with one eager peak compile to different peaks. They come
before the solve below where the plan that measured over is a fallback of its solver's
(`FALLBACK_OPTION`), at its floor, where that solve is refused after a long search. The next
solver budget is below the failed plan's own prediction, so every try is a different
plan. Once a plan fits with more than `RAISE_STOP` of the budget to spare, a plan solved
for the budget less the fitting plan's excess is tried, below the least solver budget
that measured over, if the solver predicts it faster than the fitting plan by more than
`RAISE_GAIN` of the step; where that plan measures over, the solver budget halfway
between the two is tried, while they are more than `RAISE_STOP` apart (a bisection:
plans compile to peaks their predictions do not order); the plan solved for the most
bytes that fits is kept. That solver budget may be above the caller's: a compiled step
can measure below its prediction (inductor fuses more than `fused_backward_values`
models). Such a plan records the budget it was solved within
(`solvers.plan.EAGER_BUDGET_OPTION`) and runs only compiled.

The step a ``compile=True`` plan is solved over is inductor's granularity
(`decompose_for_inductor`): layer and batch norms are decomposed as inductor lowers them,
so a plan can keep their statistics and recompute the normalised output pointwise.

Compile-aware costs (`with_compiled_costs`): inductor fuses a pointwise op into the kernel
that consumes it, so recomputing it costs about nothing once compiled; the op's eager
time is mostly a memory round trip that the fused kernel does not make. The planner
prices every non-random pointwise op (``torch.Tag.pointwise``) at `FUSED_POINTWISE_COST`
of its eager time before solving, so that plans under ``compile=True`` recompute
pointwise chains first and keep the matmuls' and convolutions' outputs, as compile's own
partitioner does (its min-cut recomputes only "fusible" ops). Memory too: a backward
value computed inside its only reader's kernel (`fused_backward_values`) is never held,
so the graph sizes it 0 and the first plan is solved for the room the compiled backward
leaves, instead of being compiled, measured below its budget and solved again. And a
kernel inductor generates writes its output into an input of its shape that dies at it
(`in_place_inputs`, which `simulate` counts where the plan frees that input there): on the
zoo GPT small at every-block checkpointing's peak the plan recomputed about 2 points of
the step less for it (11.9 % to 10.0 % of the keep-all step, one profile).

Cost: each fit is one solve, one compilation (inductor's graph cache makes an unchanged
run cheap) and two training steps; the cost rewrite is O(ops).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from planner.benchmark import training_loss
from planner.errors import CompiledBudgetError
from planner.memory import measure_allocator_peak, measure_step_memory
from runtime.module import ScheduledModule, StepProgram, checked_plan
from runtime.step import CapturedStep, Role
from solvers.errors import InfeasibleBudgetError, format_bytes
from solvers.graph import Graph, Op, Phase, Value, ValueKind
from solvers.order import gradients_first
from solvers.plan import COMPILED_OPTION, EAGER_BUDGET_OPTION, FALLBACK_OPTION, Plan
from solvers.simulate import simulate

log = logging.getLogger(__name__)

MAX_FITS = 6      # compiled programs measured per signature and configuration before refusing
FLOOR_SOLVES = 4  # solves for the eager floor below it (`solve_compiled`)
# once a plan fits, a plan solved for more is tried only if that is more by this fraction
# of the budget: on the zoo GPT small at its floor (38.32 MiB) the compiled step measured
# 0.55 MiB (1.4 %) below the prediction, and the plan solved for that much more measured
# over, after a compilation that took the call from 26 s to 37 s
RAISE_STOP = 0.02
# ... and is compiled and measured only if the solver predicts it faster than the fitting
# plan by more than this fraction of the step: on the zoo GPT small every such try cost a
# compilation (9-38 s per budget instead of 4-27 s) for times within 1 % of before
RAISE_GAIN = 0.01
# Inductor's channels-last layouts (its default ``layout_optimization``): on the zoo ResNet
# small at half its activations they made the compiled plan 11 % faster and peak 2.1 MiB
# (4 %) higher, copies of weights and activations the eager plan never saw; so a model with
# convolutions is fitted with them first, its first plan solved for the budget less the
# convolution weights' bytes (`convolution_weight_bytes`), what the copies came to: the
# excess over the eager prediction was 0.50-1.04 of those bytes on four zoo ResNets (tiny;
# small; small with widths 48/96/192; small at batch 8; two plans each, one-off script),
# where solving for the budget first had cost every budget a second compilation
CHANNELS_LAST = {"layout_optimization": True}
# Inductor's own reordering for peak memory, which `runtime.compiled.INDUCTOR_OPTIONS` turns
# off to keep the plan's order: tried last, where no plan fits in the plan's order. It is
# rarely lower: on the zoo GPT small at memsched's floor (38.32 MiB) an earlier floor plan
# measured 1 MiB lower with it, the drop-all plan of 1bf36e6 44.8 MiB against 38.56 MiB
REORDERED = {"reorder_for_peak_memory": True}
# where no plan is left below one that measured over, the other plans for its solver
# budget are compiled (`_fit_an_alternative`) only if the caller's budget is at most this
# fraction below that solver budget: far below the floor (which `solve_compiled` solves
# for) no plan with the floor's peak fits, and each try costs a compilation. Compiling
# moved the zoo GPT small's floor plan 0.7 % above its prediction, a plan for GPT-2 small
# 1.1 % below its own (`solve_compiled`)
ALTERNATIVES_WITHIN = 0.05
# what a pointwise op costs compiled, as a fraction of its eager time (fused into its
# consumer, it reads its inputs from registers or cache instead of memory)
FUSED_POINTWISE_COST = 0.1


def with_compiled_costs(graph: Graph, step: CapturedStep) -> Graph:
    """``graph`` priced as inductor runs it:

    - its backward in `solvers.order.gradients_first`'s order (the compiled programs run
      the plan's order, so this is the order they run);
    - each non-random pointwise aten op's time times `FUSED_POINTWISE_COST`;
    - each value of `fused_backward_values` sized 0: the compiled backward computes it inside
      the kernel of its only reader and never holds it;
    - each op that inductor generates a kernel for, with the inputs it may write in place
      (`in_place_inputs`, ``Op.reuses``).

    The second and third change what the graph's hash covers, so a plan solved under
    ``compile=True`` is checked against this graph and loads only with ``compile=True``;
    `eager_sized` gives back the eager program's sizes and allocations. O(ops + values)."""
    graph = gradients_first(graph)
    targets = _op_targets(step)
    fused = fused_backward_values(graph, step)
    values = tuple(replace(value, size_bytes=0) if value.name in fused else value for value in graph.values)
    graph = replace(graph, values=values)
    ops = []
    for op in graph.ops:
        target = targets.get(op.name)
        if _fusible(op, target) and op.target not in FUSED_REDUCTIONS:
            op = replace(op, time_ms=op.time_ms * FUSED_POINTWISE_COST)
        ops.append(replace(op, reuses=in_place_inputs(graph, op, target)))
    return replace(graph, ops=tuple(ops))


# reductions inductor decomposes into loops it fuses with the pointwise ops that read them
# (the cross-entropy backward: nll_loss_backward's scatter into a buffer of zeros, read
# once by the log-softmax backward)
FUSED_REDUCTIONS = frozenset({"aten.nll_loss_backward.default", "aten._log_softmax_backward_data.default",
                              "aten._softmax_backward_data.default"})


def fused_backward_values(graph: Graph, step: CapturedStep) -> frozenset[str]:
    """Backward values a compiled backward never holds: each is made by a fusible op
    (pointwise and not random, or one of `FUSED_REDUCTIONS`) and read by exactly one op,
    a fusible backward op and the next in the step's order, so inductor computes it inside
    that reader's kernel. A reader further on would make the kernel hold the producer's
    inputs until then instead (inductor inlines a pointwise producer into its reader): on
    GPT-2 small that put a floor plan 1.5 MiB above the prediction without that condition.

    The eager program holds such a value and its reader's result together (on the zoo GPT
    small the cross-entropy backward's 4 MiB of logits gradients, where its backward peaks),
    which is why a compiled plan measured 2.3-3.3 MiB below its eager prediction at every
    budget above the floor and was solved a second time for the room. Sized 0
    (`with_compiled_costs`), the first plan is solved for that room. Compiled steps against
    the sized-0 prediction (one plan per budget, one-off script): zoo GPT small, nine plans
    from the floor to keep-all, 0.7-1.0 MiB below at eight and 1.0 MiB above at one (where
    inductor fused a recomputed layer norm with its backward); GPT-2 small, five plans,
    0-15 MiB below; the zoo ResNet small has one such value, at no plan's peak. In the
    experiment's runs (`experiments/vs_torch_compile.py`) every budget of the three models
    then fitted at the first compilation.

    Backward values only: a forward value may be kept for the backward, which makes it a
    kernel's output. A value that reaches its reader across two compiled runs (an offload in
    between) is held after all; the measured step shows it (`fit_compiled`).
    O(ops + values)."""
    targets = _op_targets(step)
    # the op after each in the step's order, views left out
    computing = [op.name for op in graph.ops if any(not graph.value(name).alias_of for name in op.outputs)]
    following = dict(zip(computing, computing[1:]))
    kept = set(graph.gradients) | set(graph.forward_outputs)
    fused = set()
    for value in graph.values:
        if value.kind is not ValueKind.GRADIENT_WORK or value.alias_of or not value.size_bytes or value.name in kept:
            continue
        producer = graph.op(value.producer) if value.producer else None
        reading = graph.consumers.get(value.name, ())
        if producer is None or len(reading) != 1 or not _fusible(producer, targets.get(producer.name)):
            continue
        reader = graph.op(reading[0])
        if reader.name == following.get(producer.name) and reader.phase is Phase.BACKWARD \
                and _fusible(reader, targets.get(reader.name)):
            fused.add(value.name)
    return frozenset(fused)


def eager_sized(graph: Graph) -> Graph:
    """``graph`` (`with_compiled_costs`) with the values it sized 0 as the eager program
    holds them (their shape's elements times their dtype's size) and no op writing in
    place, for a prediction of the same plan run eagerly:
    ``simulate(eager_sized(graph), plan, check_hash=False)``."""
    def held(value: Value) -> Value:
        if value.size_bytes or value.alias_of or value.kind is not ValueKind.GRADIENT_WORK or not value.dtype:
            return value
        itemsize = getattr(torch, value.dtype).itemsize
        return replace(value, size_bytes=math.prod(value.shape) * itemsize)
    return replace(graph, values=tuple(held(value) for value in graph.values),
                   ops=tuple(replace(op, reuses=()) if op.reuses else op for op in graph.ops))


def _op_targets(step: CapturedStep) -> dict[str, Any]:
    return {node.name: node.target for node in step.joint.graph.nodes if node.op == "call_function"}


def _fusible(op: Op, target: Any) -> bool:
    """Whether inductor fuses ``op`` with its neighbours: a non-random pointwise aten op, or
    one of `FUSED_REDUCTIONS`."""
    if op.target in FUSED_REDUCTIONS:
        return True
    return (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags and not op.random
            and torch.Tag.nondeterministic_seeded not in target.tags)


# ops inductor lowers to loops of its own (not a library call) that write one output of
# their input's shape: the row reductions and the normalisation backwards, beside the
# pointwise ops (`_fusible`)
IN_PLACE_KERNELS = frozenset({"aten._log_softmax.default", "aten._softmax.default",
                              "aten.native_layer_norm_backward.default"}) | FUSED_REDUCTIONS


def in_place_inputs(graph: Graph, op: Op, target: Any) -> tuple[str, ...]:
    """The inputs whose storage inductor may write ``op``'s output into (``Op.reuses``):
    where ``op`` is a loop inductor generates (`_fusible`, `IN_PLACE_KERNELS`) and the input
    is the whole of its storage, with the output's shape and dtype. Inductor writes a
    kernel's output into such a buffer when the kernel is its last reader ("inplace
    buffers"), and into a compiled run's input when the runtime donates it
    (`runtime.compiled`); `simulate` counts it where the plan frees the input at ``op``.

    On the zoo GPT small at every-block checkpointing's peak (47.5 MiB), the GELU and
    layer-norm backwards written into the gradients they read, and the log-softmax into the
    logits, are where the step peaked. O(op arity)."""
    if not (_fusible(op, target) or op.target in IN_PLACE_KERNELS) or op.random:
        return ()
    outputs = [graph.value(name) for name in op.outputs]
    owner = next((value for value in outputs if value.alias_of is None and value.size_bytes), None)
    if owner is None:
        return ()
    chosen = []
    for name in dict.fromkeys(op.inputs):
        value = graph.value(name)
        root = graph.value(value.root)
        if root.kind.is_placeholder or root.size_bytes != owner.size_bytes:
            continue
        if value.shape == owner.shape and value.dtype == owner.dtype and _in_storage_order(graph, value):
            chosen.append(name)
    return tuple(chosen)


# views that keep a contiguous storage's elements in their order (a reshape, not a transpose)
ORDER_KEEPING_VIEWS = frozenset({"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
                                 "aten.detach.default", "aten.alias.default", "aten.squeeze.dim",
                                 "aten.unsqueeze.default"})


def _in_storage_order(graph: Graph, value: Value) -> bool:
    """Whether ``value`` is its root or reaches it through `ORDER_KEEPING_VIEWS` only."""
    while value.alias_of is not None:
        producer = graph.op(value.producer) if value.producer else None
        if producer is None or producer.target not in ORDER_KEEPING_VIEWS:
            return False
        value = graph.value(producer.inputs[0])
    return True


# forward ops a ``compile=True`` plan sees decomposed as inductor lowers them
# (`decompose_for_inductor`)
DECOMPOSED_FOR_INDUCTOR = (torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_batch_norm.default)


def decompose_for_inductor(step: CapturedStep) -> int:
    """Replace each forward op of `DECOMPOSED_FOR_INDUCTOR` in ``step``'s joint graph by
    inductor's own decomposition of it, in place; returns how many.

    A plan decides what to keep and recompute per op of the graph it is given. Layer norm is
    one op there (``native_layer_norm``: statistics, then normalisation, scale and shift),
    so recomputing its output re-runs the reduction over the row. Inductor lowers it as
    ``var_mean`` and four pointwise ops and fuses the pointwise ones into their consumer;
    ``torch.compile``'s partitioner therefore keeps the mean and reciprocal deviation
    (which the backward reads anyway) and recomputes the normalised output for almost
    nothing. Given the same decomposed ops, with their pointwise ones priced as fused
    (`with_compiled_costs`), the solver can make that choice too. The compiled step then
    computes what compiled plain computes (the same decomposition), not eager's bits, which
    is why this is for ``compile=True`` only. The backward op (``native_layer_norm_backward``)
    is kept: it reads the decomposition's mean and reciprocal deviation. Batch norm in the
    same way: its running statistics' in-place update becomes the decomposition's ``copy_``
    into the buffer, a buffer update that runs once in the forward (never recomputed),
    and a recomputed output is the normalisation from the kept statistics, not a re-run
    (`runtime.step.native_batch_norm_rerun`) that reduces the batch again. O(nodes).
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    table = select_decomp_table()
    graph = step.joint.graph
    buffers = dict(zip(step.placeholder_names[len(step.param_names):], step.buffer_names))
    decomposed = 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in DECOMPOSED_FOR_INDUCTOR
                and node.target in table and step.roles.get(node.name) is Role.FORWARD):
            continue
        readers = list(node.users)
        if not all(reader.target is operator.getitem for reader in readers):
            continue
        arguments = node.all_input_nodes
        decomposition = table[node.target]

        def traced(*tensors: torch.Tensor, node: fx.Node = node, arguments: list = arguments,
                   decomposition: Any = decomposition) -> tuple:
            values = dict(zip(arguments, tensors))
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            return tuple(decomposition(*args, **kwargs))

        examples = [argument.meta["val"] for argument in arguments]
        with examples[0].fake_mode:
            inner = make_fx(traced)(*examples)
        placeholder_of = dict(zip((n for n in inner.graph.nodes if n.op == "placeholder"), arguments))
        mutated = [placeholder_of.get(n.args[0]) for n in inner.graph.nodes if n.target is torch.ops.aten.copy_.default]
        if any(argument is None or argument.name not in buffers for argument in mutated):
            continue                      # it would write something other than a buffer: left whole
        values: dict[fx.Node, Any] = {}
        placeholders = iter(arguments)
        outputs: tuple = ()
        with graph.inserting_before(node):
            for inner_node in inner.graph.nodes:
                if inner_node.op == "placeholder":
                    values[inner_node] = next(placeholders)
                elif inner_node.op == "output":
                    outputs = tuple(fx.node.map_arg(inner_node.args[0], values.__getitem__))
                else:
                    new = graph.node_copy(inner_node, values.__getitem__)
                    new.meta = {key: inner_node.meta[key] for key in ("val", "tensor_meta") if key in inner_node.meta}
                    step.roles[new.name] = Role.FORWARD
                    step.modules[new.name] = step.modules.get(node.name, "")
                    values[inner_node] = new
                    if new.target is torch.ops.aten.copy_.default:       # a running statistic's update
                        step.roles[new.name] = Role.BUFFER_UPDATE
                        step.buffer_updates[new.name] = buffers[new.args[0].name]
        for reader in readers:
            reader.replace_all_uses_with(outputs[reader.args[1]])
            graph.erase_node(reader)
        graph.erase_node(node)
        for erased in (*readers, node):
            step.roles.pop(erased.name, None)
            step.modules.pop(erased.name, None)
        decomposed += 1
    graph.lint()
    step.joint.recompile()
    return decomposed


class Solves(Protocol):
    """What re-solves a graph for another budget, the way the first plan was solved
    (`planner.api`'s step planner; warm-started from ``start``, a plan for a nearby
    budget), and offers other plans for the same budget."""

    def solve(self, graph: Graph, budget_bytes: int, start: Plan | None = None) -> Plan: ...

    def alternatives(self, graph: Graph, budget_bytes: int, first: Plan) -> Iterator[Plan]:
        """Other plans than ``first`` for ``budget_bytes`` (those the solvers found beside
        it), to compile where ``first`` measures over and no plan is left below it."""
        ...


def solve_compiled(solve_for: Callable[[int], Plan], budget_bytes: int) -> Plan:
    """The plan `fit_compiled` starts from: ``solve_for(budget_bytes)``, or, below the least
    budget the solver can meet for the eager step, the plan for that least budget,
    answering for ``budget_bytes`` (`EAGER_BUDGET_OPTION`), since a compiled step may
    measure below its eager prediction (GPT-2 small, 2 x 256 tokens: a plan solved for
    1,119.53 MiB measured 1,107.15 MiB compiled, its cross-entropy backward fused).

    Raises:
        InfeasibleBudgetError: the solver's, where it finds no plan at its least budget either.
    """
    try:
        return solve_for(budget_bytes)
    except InfeasibleBudgetError as error:
        refusal = error
    # the least feasible budget may be a lower bound no plan meets: its refusal names a
    # higher one, up to `FLOOR_SOLVES` times
    floor_bytes = refusal.least_feasible_bytes
    for _ in range(FLOOR_SOLVES):
        if budget_bytes >= floor_bytes:
            break
        try:
            floor_plan = solve_for(floor_bytes)
        except InfeasibleBudgetError as error:
            if error.least_feasible_bytes <= floor_bytes:
                break
            floor_bytes = error.least_feasible_bytes
            continue
        log.info("memsched compile: %s is below the eager floor %s; fitting the floor plan compiled",
                 format_bytes(budget_bytes), format_bytes(floor_bytes))
        return replace(floor_plan, budget_bytes=budget_bytes,
                       options={**floor_plan.options, EAGER_BUDGET_OPTION: floor_plan.budget_bytes})
    raise refusal


def fit_compiled(planner: Solves, model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
                 inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, *,
                 loaded: bool = False) -> tuple[Plan, StepProgram]:
    """The plan (``plan`` or one solved for another budget) whose compiled step measures
    within ``plan.budget_bytes``, and its compiled program (``measured_peak_bytes`` set).
    ``plan`` may be solved above that budget (`solve_compiled`).
    On a graph with convolutions, `CHANNELS_LAST` is fitted first, from a plan solved for
    the convolution weights' bytes less (skipped where the solver finds none, and without a
    solve where ``plan`` is a fallback at its solver's floor, `FALLBACK_OPTION`), and the
    plan's own layouts only where that finds no plan; `REORDERED` is the last resort. Under
    each, where no plan is left below one that measured over, the other plans found for its
    solver budget are compiled (`Solves.alternatives`). A ``loaded`` plan is run as given
    (its own layouts): refused if its compiled step is over its budget. The plan returned
    carries `COMPILED_OPTION`: loaded without ``compile=True`` it is refused with that fix.

    Raises:
        CompiledBudgetError: no plan tried measures within the budget (the error of the
            configuration that came closest).
    """
    configurations = [CHANNELS_LAST, {}] if not loaded and _has_convolutions(graph) else [{}]
    if not loaded:
        configurations.append(REORDERED)
    budget_bytes = plan.budget_bytes
    # a plan solved above the budget (`solve_compiled` below the eager floor) starts there
    solver_bytes = max(budget_bytes, int(plan.options.get(EAGER_BUDGET_OPTION, 0)))
    failures: list[CompiledBudgetError] = []
    for options in configurations:
        start, start_bytes = plan, solver_bytes
        if options is CHANNELS_LAST:       # room for the copies of the weights (`CHANNELS_LAST`)
            if FALLBACK_OPTION in plan.options:
                # a fallback plan is at its solver's floor (as in `_fit`): a solve for less
                # would most likely be refused, after a search through every candidate
                log.info("memsched compile: the plan is at its solver's floor, with no room for channels-last "
                         "copies of the convolution weights; fitting in the plan's layouts")
                continue
            start_bytes = solver_bytes - convolution_weight_bytes(graph)
            try:
                start = planner.solve(graph, start_bytes, start=plan)
            except InfeasibleBudgetError as error:
                log.info("memsched compile: no plan leaves room for channels-last copies of the convolution "
                         "weights (%s); fitting in the plan's layouts", str(error).splitlines()[0])
                continue
        try:
            fitted, program = _fit(planner, model, step, graph, start, inputs, kwargs, budget_bytes=budget_bytes,
                                   solver_bytes=start_bytes, loaded=loaded, inductor_options=options)
            program.fit_tries += sum(len(error.tried) for error in failures)
            return fitted, program
        except CompiledBudgetError as error:
            log.info("memsched compile: %s", str(error).splitlines()[0])
            failures.append(error)
    raise min(failures, key=lambda error: error.least_feasible_bytes)


def _has_convolutions(graph: Graph) -> bool:
    return any(op.target.startswith("aten.convolution") for op in graph.ops)


def convolution_weight_bytes(graph: Graph) -> int:
    """Bytes of the distinct weights the forward convolutions read (their second input)."""
    weights = {graph.value(op.inputs[1]).root for op in graph.ops
               if op.target.startswith("aten.convolution") and op.phase is Phase.FORWARD and len(op.inputs) > 1}
    return sum(graph.value(name).size_bytes for name in weights)


def _fit(planner: Solves, model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
         inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, *, budget_bytes: int, solver_bytes: int,
         loaded: bool, inductor_options: dict[str, Any]) -> tuple[Plan, StepProgram]:
    """`fit_compiled` under one inductor configuration (module docstring), from ``plan``
    solved for ``solver_bytes``."""
    tried: list[tuple[int, int]] = []               # (solver budget, measured peak) per fit
    internal_bytes = solver_bytes
    best: tuple[int, Plan, StepProgram] | None = None   # the fitting plan solved for the most bytes
    failed_above: int | None = None                  # the least solver budget that measured over
    first_checked: Plan | None = None
    # the other plans for ``solver_bytes`` than the first (`_fit_an_alternative`), tried once
    alternatives_allowed = not loaded and budget_bytes >= (1 - ALTERNATIVES_WITHIN) * solver_bytes
    alternatives_tried = False
    for _ in range(1 if loaded else MAX_FITS):
        checked, program = _compiled_and_measured(model, step, graph, plan, inputs, kwargs,
                                                   inductor_options, budget_bytes)
        first_checked = first_checked or checked
        peak_bytes = program.measured_peak_bytes
        tried.append((internal_bytes, peak_bytes))
        log.info("memsched compile (%s): plan solved for %d bytes predicts %d (eager); the compiled step measures %d; "
                 "budget %d", inductor_options or "plan layouts", internal_bytes, checked.predicted_peak_bytes,
                 peak_bytes, budget_bytes)
        # what compiling added to this plan's peak; the next plan is solved for the budget less it
        excess_bytes = peak_bytes - checked.predicted_peak_bytes
        target_bytes = budget_bytes - excess_bytes
        fits = peak_bytes <= budget_bytes
        if fits:
            program.solver_budget_bytes = internal_bytes
            if best is None or internal_bytes > best[0]:
                best = (internal_bytes, checked, program)
            # raise only below a solver budget that measured over, and only by more than
            # `RAISE_STOP`; above the caller's budget where the compiled step measured below
            # the eager prediction (fused temporaries the eager program holds)
            if failed_above is not None:
                target_bytes = min(target_bytes, failed_above - 1)
            if target_bytes - best[0] <= RAISE_STOP * budget_bytes:
                break
            if not _may_gain(best[1], graph):
                log.info("memsched compile: the fitting plan is within %.0f %% of the keep-all step; not raised",
                         100 * RAISE_GAIN)
                break
        else:
            failed_above = internal_bytes if failed_above is None else min(failed_above, internal_bytes)
            if best is not None:        # an upward try failed: halfway to it, while more than `RAISE_STOP`
                target_bytes = (best[0] + failed_above) // 2
                if target_bytes - best[0] <= RAISE_STOP * budget_bytes:
                    break
            elif not alternatives_tried and FALLBACK_OPTION in checked.options and alternatives_allowed:
                # a fallback plan is at its solver's floor: solving below it would most
                # likely be refused, after a search through every candidate (on the zoo
                # GPT small at memsched's floor 18 s, 8 s since auto stopped re-running
                # greedy after hierarchical refused), so the other plans come first
                alternatives_tried = True
                best = _fit_an_alternative(planner, model, step, graph, first_checked, inputs, kwargs, tried,
                                           budget_bytes=budget_bytes, solver_bytes=solver_bytes,
                                           inductor_options=inductor_options)
                if best is not None:
                    break
        # after a failure this is below the failed plan's own prediction (its excess is
        # positive), so the next plan differs
        internal_bytes = target_bytes
        try:
            # warm-started from the plan just measured: 1.4 s against 2.9 s on the zoo GPT
            # small, within 0.3 % of the cold solve's predicted step (one-off script)
            plan = planner.solve(graph, internal_bytes, start=checked)
        except InfeasibleBudgetError as error:
            log.info("memsched compile: no plan at %s: %s", format_bytes(internal_bytes), str(error).splitlines()[0])
            if best is None and not alternatives_tried and alternatives_allowed:
                best = _fit_an_alternative(planner, model, step, graph, first_checked, inputs, kwargs, tried,
                                           budget_bytes=budget_bytes, solver_bytes=solver_bytes,
                                           inductor_options=inductor_options)
            break
        if best is not None and internal_bytes > best[0] and \
                not _predicted_faster(checked_plan(graph, plan, compiled=True), best[1]):
            log.info("memsched compile: the plan for %s is not predicted faster by %.0f %%; kept the fitting one",
                     format_bytes(internal_bytes), 100 * RAISE_GAIN)
            break
    if best is None:
        raise CompiledBudgetError(budget_bytes, tried, loaded=loaded)
    solver_bytes, fitted, program = best
    program.fit_tries = len(tried)
    # the plan answers for the caller's budget, which its compiled step measured within; a
    # plan solved above it records the budget its eager replay keeps (`checked_plan`)
    options = {**fitted.options, COMPILED_OPTION: True}
    options.pop(EAGER_BUDGET_OPTION, None)
    if solver_bytes > budget_bytes:
        options[EAGER_BUDGET_OPTION] = solver_bytes
    return replace(fitted, budget_bytes=budget_bytes, options=options, runners_up=()), program


def _fit_an_alternative(planner: Solves, model: torch.nn.Module, step: CapturedStep, graph: Graph, first: Plan,
                        inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, tried: list[tuple[int, int]], *,
                        budget_bytes: int, solver_bytes: int, inductor_options: dict[str, Any]
                        ) -> tuple[int, Plan, StepProgram] | None:
    """Where ``first`` (checked, solved for ``solver_bytes``) measured over the budget and
    the solver has no plan below it, the first of ``planner.alternatives`` for
    ``solver_bytes`` whose compiled step measures within the budget, within `MAX_FITS`
    compilations in all (``tried`` grows by each). Plans at the same eager peak compile
    differently: on the zoo GPT small at memsched's floor (38.32 MiB), the segment DP's
    drop-all plan measures 38.54 MiB compiled (inductor fuses the first block's second
    layer-norm backward with the recomputation before it and the dropout backward after
    it into one kernel, which holds its inputs and results together: 0.98 MiB above the
    eager program there), ``greedy``'s plan for the same budget 37.77 MiB."""
    for plan in planner.alternatives(graph, solver_bytes, first):
        if len(tried) >= MAX_FITS:
            return None
        checked, program = _compiled_and_measured(model, step, graph, plan, inputs, kwargs,
                                                   inductor_options, budget_bytes)
        peak_bytes = program.measured_peak_bytes
        tried.append((solver_bytes, peak_bytes))
        log.info("memsched compile: %s's plan for %d bytes measures %d compiled; budget %d", plan.solver,
                 solver_bytes, peak_bytes, budget_bytes)
        if peak_bytes <= budget_bytes:
            program.solver_budget_bytes = solver_bytes
            return solver_bytes, checked, program
    return None


def _compiled_and_measured(model: torch.nn.Module, step: CapturedStep, graph: Graph, plan: Plan,
                           inputs: Sequence[Any], kwargs: Mapping[str, Any] | None,
                           inductor_options: dict[str, Any], budget_bytes: int) -> tuple[Plan, StepProgram]:
    """``plan`` checked (`checked_plan`) and its compiled program, whose
    ``measured_peak_bytes`` is set (`measure_compiled_peak`).

    The warm-up step runs each compiled run's ops eagerly while its kernels build
    (``eager_first_call``, `runtime.compiled`) in each phase where the plan's eager program
    keeps ``budget_bytes`` (`eager_phases_within`); elsewhere it waits for its kernels: a
    plan may be solved for what only the compiled step keeps (`fused_backward_values`, or
    above the caller's budget)."""
    checked = checked_plan(graph, plan, compiled=True)
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    program = StepProgram(step, graph, checked, device_type, compile=True, inductor_options=inductor_options,
                          eager_first_call=eager_phases_within(graph, checked, budget_bytes))
    program.measured_peak_bytes = measure_compiled_peak(model, step, graph, checked, program, inputs, kwargs,
                                                        released=bool(graph.released_outputs))
    return checked, program


def eager_phases_within(graph: Graph, plan: Plan, budget_bytes: int) -> frozenset[Phase]:
    """The phases in which ``plan`` run eagerly on ``graph`` (`with_compiled_costs`, so
    `eager_sized`) stays within ``budget_bytes``: the forward holds no value of
    `fused_backward_values`, so where the backward's fused values take the eager program
    over, the forward may still run eagerly while its kernels build. O(plan steps)."""
    timeline = simulate(eager_sized(graph), plan, check_hash=False).timeline
    return frozenset(phase for phase in Phase
                     if max((point.high_water_bytes for point in timeline if point.phase is phase), default=0)
                     <= budget_bytes)


def _may_gain(fitting: Plan, graph: Graph) -> bool:
    """Whether any plan may be predicted faster than ``fitting`` by more than `RAISE_GAIN`
    (`_predicted_faster`): none is faster than keeping everything (each op once,
    ``graph.total_time_ms``), so a plan within that of it is not raised, and no solve is
    spent on finding so (on the zoo GPT small at 69.3 MiB, 3.4 s of a 24 s call)."""
    return _gains_enough(graph.total_time_ms, fitting)


def _predicted_faster(candidate: Plan, fitting: Plan) -> bool:
    """Whether ``candidate`` is predicted faster than ``fitting`` by more than `RAISE_GAIN`
    of the step (its keep-all time), so that compiling and measuring it may pay."""
    return _gains_enough(candidate.predicted_time_ms, fitting)


def _gains_enough(time_ms: float, fitting: Plan) -> bool:
    step_ms = fitting.baseline_time_ms or fitting.predicted_time_ms
    return fitting.predicted_time_ms - time_ms > RAISE_GAIN * step_ms


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
        program.finish_compiling()
        for parameter in model.parameters():
            parameter.grad = None
        if device.type == "cuda":
            _, report = measure_step_memory(lambda: _step(module, inputs, kwargs, released), device, resident)
            return report.peak_bytes
        _, peak_bytes = measure_allocator_peak(lambda: _step(module, inputs, kwargs, released), resident)
        return peak_bytes
