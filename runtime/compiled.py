"""A generated program (`runtime.codegen`) compiled by TorchInductor, with the plan kept.

A plan's program is a straight line of aten calls and a few Python calls: generator
state saves and replays (`runtime.rng`), random fills (`runtime.step.random_fill_like`),
host copies (`runtime.offload`) and BatchNorm re-runs (`runtime.step.RERUN_TARGETS`;
in training mode compiled as ``native_batch_norm`` without running statistics).
Inductor compiles aten graphs; the Python calls carry effects it must not move (the
generator state, streams, host memory). The random calls go into the graphs as
`runtime.rng`'s custom ops, chained in program order (`_random_call`): inductor calls
their eager kernels in that order, so they draw exactly what the eager plan draws and a
recomputation's replay under the saved generator state stays exact. The program is cut at
every other Python call (host copies, random ops of other forms):

    [aten run 1] eager call [aten run 2] eager call ...   ->   one inductor graph per run

and each maximal run of aten ops is compiled with ``compile_fx_inner`` (PyTorch 2 /
TorchInductor, Ansel et al., ASPLOS 2024), the entry point ``torch.compile`` uses after
AOTAutograd, so a run fuses its pointwise chains and reductions into loops as compiled
plain does. On the zoo GPT small (dropout 0.1) the forward was cut at its dropout fills
into 10 runs while they ran eagerly; now it is one, as compiled plain's.

What the plan decided holds: a run's ops are the plan's ops (what it saves crosses into
the next run or out of the program, what it recomputes is run again, what it offloads
goes through the eager host copies). Freeing holds too: the compiled graphs take their
inputs boxed (one list they clear) and inductor frees each buffer after its last use, and
before each run this interpreter lets go of every value whose last use is in that run,
so a value dies inside the run that reads it last, as in the eager program. Such an input
that nothing else holds is donated to the run (`_donatable`), so that a kernel that reads
it last may write its output into it, as inside a run; the planner counts on those writes
(``solvers.graph.Op.reuses``). The C++ backend calls each fused node as its own kernel
(`_kernel_per_node`), and kernels that share only an input fuse only with no library call
between them (`HORIZONTAL_FUSION`), so that lifetimes stay where the plan put them.
Inductor may still allocate differently (fused temporaries, workspace), which is why the
planner measures the compiled step's peak (`planner.compiled`).

Each run compiles on its first call with the real tensors as examples (their sizes and
strides), once per `StepProgram`: a second step recompiles nothing (`compile_count`).
A run's values are named by position, so runs that compute the same thing (each of a
model's identical blocks, cut at the same eager calls) are the same code: compiled once
in the process and served to every other run and program with that code
(`COMPILED_RUNS_KEPT`);
another input signature gets another plan and program from `planner.api.OptimizedModule`'s
plan cache. Interpretation costs O(instructions) Python work per call; compiling is
O(ops) graph work plus inductor's own code generation and C++/Triton compilation.

Most of a compilation on a CPU is C++ builds: inductor generates a run's code on one
core, then builds its C++ kernels (one compiler process each) on its pool of compile
workers and waits for them. On the zoo GPT small at its floor the builds took 17.1 s of
compiler time for 36 kernels against 2.7 s of code generation, and most of each build was
loading inductor's precompiled header. Here:

- kernels are built twelve to a compiler process, as one library (`_kernels_built_in_batches`),
  and each batch is submitted to the workers as soon as it is full, not when the run's
  whole module has been generated (`_kernels_built_as_defined`): on that floor plan the
  compiler time fell to 5.9 s at six per build and the fit from 11.4 s to 6.5-6.8 s at
  twelve (one-off scripts);
- with ``eager_first_call`` (the planner's warm-up step), a program's first call does
  not wait: each run's ops execute eagerly while its kernels build and the next runs
  (the backward's, after the forward's) generate their code; the next call, or
  `CompiledProgram.finish_compiling`, waits for what is left.

On the zoo GPT small at its floor, the forward's kernels then build while the backward
generates its code, and the backward's while it defines the rest.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import operator
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Iterator

import torch
import torch.fx as fx

from runtime import rng
from runtime.codegen import Programs
from runtime.step import native_batch_norm_rerun, random_fill_like
from solvers.graph import Phase

aten = torch.ops.aten

log = logging.getLogger(__name__)

# Inductor settings that keep the plan's memory. Measured on plans at half the activation
# memory, the compiled backward's peak above the eager program's: tiny zoo ResNet +115 %
# with inductor's defaults, -0.6 % with these and `FUSION_WINDOW`; tiny GPT -3 %, +0.3 %.
INDUCTOR_OPTIONS: dict[str, Any] = {
    # random ops run eagerly anyway; any that inductor sees draws as eager does
    "fallback_random": True,
    # no channels-last copies of convolution weights and inputs: the plan never saw them
    "layout_optimization": False,
    # a pointwise result read by several kernels is stored once, not recomputed in each
    # reader (which keeps all of its inputs alive until the last reader)
    "realize_reads_threshold": 1,
    # keep the plan's order: inductor's own reordering for peak memory (on by default in
    # torch 2.13) moved the zoo GPT's one-graph backward so that it peaked 6.3 MiB (13 %)
    # above the eager program at every-block checkpointing's peak; without it, 0.05 MiB below
    "reorder_for_peak_memory": False,
}
# Kernels fuse only within this many scheduler nodes of each other in program order: a
# fusion across a longer distance moves one side's work (and the lifetimes of what it
# reads and writes) to the other side, undoing where the plan put a recomputation.
FUSION_WINDOW = 16
# Two kernels that share an input but neither reads the other's output fuse
# ("horizontally") only where no library call (a matmul, ...) comes between them: such a
# fusion runs the earlier one at the later one's place, or the later at the earlier's, and
# holds its output across what the plan put between them. On the zoo GPT small at
# every-block checkpointing's peak, a GELU recomputed for a weight gradient fused with the
# GELU backward after the next matmul held 4 MiB beside the gradient that backward writes in
# place: the plan's compiled step measured 3.00 MiB over its prediction, and on it without
# such fusions (one-off A/B of one plan). Between neighbours they stay: a batch norm
# backward's two reductions over the same gradient made the zoo ResNet small's
# near-keep-all plan 0.865 of compiled plain's step against 0.899 with no horizontal
# fusion at all (one-off round-robin, 15 rounds).
HORIZONTAL_FUSION = False
# each fused node its own kernel call (`_kernel_per_node`)
KERNEL_PER_NODE = True


@torch.library.custom_op("memsched::mask_as_float", mutates_args=())
def mask_as_float_op(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask.to(dtype)`` for a bool CPU ``mask`` (`_is_cpu_mask_conversion`), read as its
    bytes (uint8 0 and 1: the same values): ATen converts uint8 in vector loops, bool
    element by element. O(elements)."""
    return mask.view(torch.uint8).to(dtype)


@mask_as_float_op.register_fake
def _(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(mask, dtype=dtype)


def _is_cpu_mask_conversion(node: fx.Node) -> bool:
    """A ``_to_copy`` of a bool CPU tensor to a floating dtype, nothing else changed: a
    dropout mask before its scale (the traced step's ``native_dropout``, forward and
    backward). Inductor's C++ kernels load bool elements one by one into a vector mask
    (``VecMask::from``): on this machine's AVX-512 a kernel that read a (8, 128, 256) mask
    took 250 us against 55 us for a float one, and the layer norm kernels of the zoo GPT
    small's forward that read its masks made the compiled forward 1.1 ms (1.3 %) slower
    than compiled plain's, which ran its dropout eagerly (one-off probe). Converted
    eagerly (`mask_as_float_op`, 13 us), the float mask is held from the conversion to its
    reader's kernel, as the plan holds the ``_to_copy`` value (an op inductor would fuse
    but the planner never priced as fused: `planner.compiled._fusible`)."""
    if node.target is not aten._to_copy.default or set(node.kwargs) != {"dtype"} or len(node.args) != 1:
        return False
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return (isinstance(source, torch.Tensor) and source.dtype is torch.bool and source.device.type == "cpu"
            and isinstance(node.kwargs["dtype"], torch.dtype) and node.kwargs["dtype"].is_floating_point)


# Runs compiled in this process, by what decides the compiled code (the run's own code,
# its inputs' sizes, strides, dtypes and devices, the inductor options): plans that the
# budget fit tries one after another share most of their runs, and inductor's FX graph
# cache serves those only after a re-lowering and a hash of each (0.24 s a run on the zoo
# GPT small: 3.6 s of a 17.6 s try at its floor, 15 of whose 20 runs an earlier try had
# compiled). Least recently used first out.
COMPILED_RUNS_KEPT = 512
_compiled_runs: "OrderedDict[tuple, _CompiledRun]" = OrderedDict()


def _compilable(node: fx.Node, current_run: set[str]) -> bool:
    """An op inductor may compile: an aten `OpOverload` without random draws, a BatchNorm
    re-run in training mode, a generator state save or a random fill of `_random_call`, or
    a ``getitem`` of a tuple result in ``current_run``."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and source.name in current_run
    if _is_training_batch_norm_rerun(node) or _random_call(node) is not None:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    return torch.Tag.nondeterministic_seeded not in node.target.tags or _draws_nothing(node)


def _is_training_batch_norm_rerun(node: fx.Node) -> bool:
    return node.target is native_batch_norm_rerun and len(node.args) == 8 and node.args[5] is True and not node.kwargs


def _rerun_as_aten(node: fx.Node) -> None:
    """A BatchNorm re-run in training mode is ``native_batch_norm`` without running
    statistics: an aten op inductor compiles (and decomposes, as it does compiled plain's
    BatchNorm), so the re-run does not cut the program."""
    if _is_training_batch_norm_rerun(node):
        x, weight, bias, _, _, training, momentum, eps = node.args
        node.target = aten.native_batch_norm.default
        node.args = (x, weight, bias, None, None, training, momentum, eps)


def _random_call(node: fx.Node) -> str | None:
    """Which of the program's random calls ``node`` is, as a custom op of `runtime.rng`
    compiles it: "save" (`rng.save_rng_state`), "fill" (`random_fill_like` with one of
    `rng.COMPILABLE_FILLS` and float arguments, its dtype the only keyword) or "replay"
    (such a fill under a saved state, `rng.replaying`); None for any other call, which
    stays eager."""
    if node.target is rng.save_rng_state:
        return "save"
    replayed = getattr(node.target, "op", None) is random_fill_like and hasattr(node.target, "device_type")
    if node.target is not random_fill_like and not replayed:
        return None
    fill_args = node.args[1:] if replayed else node.args
    if not fill_args or str(fill_args[0]) not in rng.COMPILABLE_FILLS or len(fill_args) < 2 or \
            not isinstance(fill_args[1], fx.Node) or set(node.kwargs) - {"dtype"} or \
            not all(isinstance(arg, (int, float)) and not isinstance(arg, bool) for arg in fill_args[2:]):
        return None
    return "replay" if replayed else "fill"


def _as_custom_op(graph: fx.Graph, node: fx.Node, kind: str, args: tuple, kwargs: dict,
                  order: fx.Node | None) -> tuple[fx.Node, fx.Node | None]:
    """``node`` (a `_random_call` of ``kind``, its arguments ``args`` and ``kwargs`` mapped
    into ``graph``) as `runtime.rng`'s custom op after ``order``: its value and the next
    ``order``."""
    ops = torch.ops.memsched
    if kind == "save":
        both = graph.call_function(ops.rng_state.default, (order, *args))
        return graph.call_function(operator.getitem, (both, 0)), graph.call_function(operator.getitem, (both, 1))
    fill, like, *scalars = args[1:] if kind == "replay" else args
    drawn = (like, str(fill), [float(x) for x in scalars], kwargs.get("dtype"))
    if kind == "replay":
        return graph.call_function(ops.random_fill_replay.default, (args[0], *drawn, node.target.device_type)), order
    both = graph.call_function(ops.random_fill.default, (order, *drawn))
    return graph.call_function(operator.getitem, (both, 0)), graph.call_function(operator.getitem, (both, 1))


def _draws_nothing(node: fx.Node) -> bool:
    """A seeded op called with ``dropout_p=0`` (attention without dropout) draws nothing."""
    names = [argument.name for argument in node.target._schema.arguments]
    if "dropout_p" not in names:
        return False
    index = names.index("dropout_p")
    value = node.args[index] if index < len(node.args) else node.kwargs.get("dropout_p", 0.0)
    return isinstance(value, (int, float)) and value == 0


@dataclass
class _Run:
    """One maximal run of compilable ops: its own graph and how it connects."""

    module: fx.GraphModule
    inputs: list[str]            # outer value names, in placeholder order
    outputs: list[str]           # outer value names the run defines and later code reads
    compiled: _CompiledRun | None = None
    compile_s: float = 0.0
    donated: tuple[int, ...] = ()   # inputs the compiled code may write into (`_donatable`)


class _CompiledRun:
    """A run compiled by inductor, whose C++ kernels may still be building
    (`CompiledProgram.eager_first_call`): ``pending`` holds the generated modules' globals
    until `finish` has waited for their kernels; ``output_strides`` are what the compiled
    code gives each output, as inductor reports them (`_strides_as_compiled`)."""

    def __init__(self, call: Callable[[list], Any], pending: list[tuple[Any, dict]],
                 output_strides: list[tuple[int, ...] | None] | None) -> None:
        self.call = call
        self.pending = pending
        self.output_strides = output_strides

    def finish(self) -> float:
        """Wait for the kernels still building; the seconds waited."""
        started = time.perf_counter()
        while self.pending:
            async_compile, scope = self.pending.pop()
            async_compile.wait(scope)
        return time.perf_counter() - started


@dataclass
class _Eager:
    node: fx.Node


@dataclass
class _Instruction:
    body: _Run | _Eager
    drop: list[str] = field(default_factory=list)    # values to let go of before (runs) / after (eager)


class CompiledProgram:
    """Callable like the generated GraphModule it was made from (``boxed``: one list that it
    clears, else positional arguments), running its aten runs compiled by inductor."""

    def __init__(self, graph_module: fx.GraphModule, *, boxed: bool, name: str = "program",
                 inductor_options: dict[str, Any] | None = None, eager_first_call: bool = False,
                 donatable: Collection[str] = ()) -> None:
        self.source = graph_module
        self.boxed = boxed
        # the placeholders a run may write into once dead (the backward's saved values; not
        # the tangents autograd hands over, nor parameters and inputs); the values the
        # program computes are all candidates (`_donatable`)
        self.donatable = frozenset(donatable)
        self.name = name
        self.inductor_options = dict(inductor_options or {})
        # the first call compiles each run without waiting for its C++ kernels and runs its
        # aten ops eagerly while they build (module docstring); later calls wait for them
        self.eager_first_call = eager_first_call
        self.calls = 0
        self.compile_count = 0             # runs made ready so far (one per run, once)
        self.reused_count = 0              # of them, those `_compiled_runs` served without inductor
        self.compile_s = 0.0
        self._placeholders: list[str] = []
        self._constants: dict[str, Any] = {}
        self._instructions: list[_Instruction] = []
        self._output: Any = None
        self._split(graph_module)

    # ------------------------------------------------------------------ building

    def _split(self, graph_module: fx.GraphModule) -> None:
        nodes = list(graph_module.graph.nodes)
        current_run: set[str] = set()          # names defined by the run being built
        groups: list[tuple[str, list[fx.Node]]] = []
        for node in nodes:
            if node.op == "placeholder":
                self._placeholders.append(node.name)
            elif node.op == "get_attr":
                self._constants[node.name] = _fetch_attr(graph_module, node.target)
            elif node.op == "output":
                self._output = node.args[0]
            elif _compilable(node, current_run):
                if not groups or groups[-1][0] != "run":
                    groups.append(("run", []))
                    current_run = set()
                groups[-1][1].append(node)
                current_run.add(node.name)
            else:
                groups.append(("eager", [node]))
                current_run = set()
        # where each value is read last (index into groups; len(groups) = the output)
        last_use: dict[str, int] = {}
        for index, (_, members) in enumerate(groups):
            for node in members:
                for used in node.all_input_nodes:
                    last_use[used.name] = index
        for used in _nodes_in(self._output):
            last_use[used.name] = len(groups)
        for index, (kind, members) in enumerate(groups):
            member_names = {node.name for node in members}
            if kind == "eager":
                node = members[0]
                drop = [used.name for used in node.all_input_nodes if last_use[used.name] == index]
                if node.name not in last_use:
                    drop.append(node.name)            # an effect whose result nothing reads
                self._instructions.append(_Instruction(_Eager(node), list(dict.fromkeys(drop))))
                continue
            inputs = list(dict.fromkeys(used.name for node in members for used in node.all_input_nodes
                                        if used.name not in member_names))
            outputs = [node.name for node in members if last_use.get(node.name, -1) > index]
            run = _Run(self._subgraph(graph_module, members, inputs, outputs), inputs, outputs)
            drop = [name for name in inputs if last_use[name] == index]
            self._instructions.append(_Instruction(run, drop))
        self._num_runs = sum(isinstance(i.body, _Run) for i in self._instructions)
        self._placeholder_names = frozenset(self._placeholders)

    @staticmethod
    def _subgraph(owner: fx.GraphModule, members: list[fx.Node], inputs: list[str],
                  outputs: list[str]) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        # names by position, not the step's: runs that compute the same thing (a block's
        # attention in each of a model's identical blocks, cut at the same eager
        # call) are then the same code, which `_compiled_runs` and inductor's FX graph
        # cache serve once compiled
        for index, name in enumerate(inputs):
            env[name] = graph.placeholder(f"input_{index}")
        order: fx.Node | None = None                 # the random calls' chain (`runtime.rng`)
        for index, node in enumerate(members):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: env[arg.name])
            kind = _random_call(node)
            if kind is not None:
                env[node.name], order = _as_custom_op(graph, node, kind, args, kwargs, order)
                continue
            if _is_cpu_mask_conversion(node):
                env[node.name] = graph.call_function(torch.ops.memsched.mask_as_float.default,
                                                     (args[0], kwargs["dtype"]))
                env[node.name].meta = dict(node.meta)
                continue
            copied = graph.create_node(node.op, node.target, args, kwargs, name=f"value_{index}", type_expr=node.type)
            copied.meta = dict(node.meta)
            env[node.name] = copied
            _rerun_as_aten(copied)
        graph.output(tuple(env[name] for name in outputs))
        return fx.GraphModule(owner, graph, class_name="CompiledRun")

    # ------------------------------------------------------------------ running

    def __call__(self, *args: Any) -> tuple:
        if self.boxed:
            (boxed_args,) = args
            env = dict(zip(self._placeholders, boxed_args))
            boxed_args.clear()
        else:
            env = dict(zip(self._placeholders, args))
        env.update(self._constants)
        first_call = self.calls == 0
        self.calls += 1
        for instruction in self._instructions:
            body = instruction.body
            if isinstance(body, _Eager):
                node = body.node
                call_args, call_kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n.name])
                env[node.name] = node.target(*call_args, **call_kwargs)
                # the call's arguments die here, not at the next eager call: on the zoo GPT
                # small's drop-all floor plan a dropout mask's template held through the run
                # after it put one activation (1 MiB) more than the eager program across
                # the first block's attention backward
                del call_args, call_kwargs
                for name in instruction.drop:
                    del env[name]
                continue
            inputs = [env[name] for name in body.inputs]
            for name in instruction.drop:
                del env[name]
            if body.compiled is None:
                dying = [name for name in instruction.drop if name in self.donatable or name not in self._placeholder_names]
                body.donated = _donatable(inputs, body.inputs, dying, env)
                self._compile(body, inputs, build_behind=first_call and self.eager_first_call)
            elif body.donated:
                _still_donatable(inputs, body.donated)
            compiled = body.compiled
            if compiled.pending and first_call and self.eager_first_call and compiled.output_strides is not None:
                results = _run_eagerly(body, inputs)
            else:
                if compiled.pending:
                    self.compile_s += compiled.finish()
                results = compiled.call(inputs)      # clears ``inputs``: dropped values die inside
            env.update(zip(body.outputs, results))
            del results
        return tuple(fx.node.map_arg(self._output, lambda n: env[n.name]))

    def finish_compiling(self) -> None:
        """Wait for every run's C++ kernels still building (`eager_first_call`)."""
        for instruction in self._instructions:
            if isinstance(instruction.body, _Run) and instruction.body.compiled is not None:
                self.compile_s += instruction.body.compiled.finish()

    def _compile(self, run: _Run, inputs: list, *, build_behind: bool = False) -> None:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.virtualized import V

        started = time.perf_counter()
        options = {**INDUCTOR_OPTIONS, **self.inductor_options}
        key = (run.module.code, tuple(_example_key(t) for t in inputs),
               tuple(sorted((name, repr(value)) for name, value in options.items())), run.donated)
        if key in _compiled_runs:
            _compiled_runs.move_to_end(key)
            run.compiled = _compiled_runs[key]
            run.compile_s = time.perf_counter() - started
            self.compile_s += run.compile_s
            self.compile_count += 1
            self.reused_count += 1
            return
        window = options.pop("fusion_window", FUSION_WINDOW)
        horizontal = options.pop("horizontal_fusion", HORIZONTAL_FUSION)
        per_node = options.pop("kernel_per_node", KERNEL_PER_NODE)
        choices = _choices_within(window, horizontal=horizontal, per_node=per_node, donated=run.donated)
        options["inductor_choices_class"] = choices      # part of the graph cache's key
        with inductor_config.patch(options), V.set_choices_handler(choices()):
            graph_module, examples, fake_mode = _lowered(run.module, inputs)
            # inside a tracing context whose fake mode has a shape environment, inductor's
            # FX graph cache serves a run it compiled before ("No shape env" bypasses it):
            # neighbouring plans that the budget fit tries share most of their runs
            pending: list[tuple[Any, dict]] = []
            context = torch._guards.TracingContext(fake_mode)
            if run.donated:
                # what AOTAutograd hands inductor for a backward whose saved tensors it
                # donates; inductor reads the donated indexes only, in a backward graph
                context.fw_metadata = _DonatedInputs(list(run.donated))
            with torch._guards.tracing(context), context.report_output_strides() as output_strides, \
                    _kernels_built_in_batches(), _kernels_built_as_defined(), \
                    (_kernel_per_node() if per_node else contextlib.nullcontext()), \
                    (_kernel_waits_deferred(pending) if build_behind else contextlib.nullcontext()):
                call = compile_fx_inner(graph_module, examples, is_backward=bool(run.donated))
        run.compiled = _CompiledRun(call, pending, _strides_as_compiled(output_strides, len(run.outputs)))
        _compiled_runs[key] = run.compiled
        while len(_compiled_runs) > COMPILED_RUNS_KEPT:
            _compiled_runs.popitem(last=False)
        run.compile_s = time.perf_counter() - started
        self.compile_s += run.compile_s
        self.compile_count += 1
        log.debug("compiled %s run %d/%d (%d ops) in %.2f s", self.name, self.compile_count, self._num_runs,
                  len(run.module.graph.nodes), run.compile_s)

    # ------------------------------------------------------------------ inspection

    @property
    def num_runs(self) -> int:
        """How many inductor graphs the program is cut into."""
        return self._num_runs

    @property
    def mask_conversions(self) -> int:
        """How many bool masks the runs convert eagerly (`_is_cpu_mask_conversion`)."""
        return sum(node.target is torch.ops.memsched.mask_as_float.default
                   for instruction in self._instructions if isinstance(instruction.body, _Run)
                   for node in instruction.body.module.graph.nodes)

    @property
    def eager_calls(self) -> list[str]:
        """The Python calls that stay eager, in program order."""
        return [getattr(i.body.node.target, "__name__", str(i.body.node.target))
                for i in self._instructions if isinstance(i.body, _Eager)]

    @property
    def code(self) -> str:
        """The program as runs of compiled aten ops and the eager calls between them."""
        lines = [f"# {self.name}: {self._num_runs} inductor run(s), {len(self.eager_calls)} eager call(s)"]
        for instruction in self._instructions:
            body = instruction.body
            if isinstance(body, _Eager):
                lines.append(f"{body.node.name} = {body.node.format_node()}")
            else:
                ops = [n for n in body.module.graph.nodes if n.op == "call_function"]
                lines.append(f"{', '.join(body.outputs) or '()'} = inductor_run({', '.join(body.inputs)})"
                             f"  # {len(ops)} ops")
        return "\n".join(lines)


def _run_eagerly(run: _Run, inputs: list) -> list:
    """``run``'s own aten ops, eagerly (`CompiledProgram.eager_first_call`): each value is
    let go of after its last use and ``inputs`` is cleared, as the compiled run does; an
    output whose strides differ from what the compiled run gives is copied to those strides,
    so that the runs compiled after it see the inputs they will see once it is compiled."""
    results = list(fx.Interpreter(run.module).boxed_run(inputs))
    for index, (value, strides) in enumerate(zip(results, run.compiled.output_strides)):
        if isinstance(value, torch.Tensor) and strides is not None and value.stride() != strides:
            results[index] = torch.empty_strided(value.shape, strides, dtype=value.dtype,
                                                 device=value.device).copy_(value)
    return results


@contextlib.contextmanager
def _kernel_waits_deferred(pending: list[tuple[Any, dict]]) -> Iterator[None]:
    """Inside the block, the wait that ends inductor's generated code (``async_compile.wait
    (globals())``: it blocks until the module's C++ kernels, submitted to inductor's pool
    of compile workers as the module loads, are built) records the module's globals in
    ``pending`` instead and returns; `_CompiledRun.finish` waits later."""
    from torch._inductor.async_compile import AsyncCompile

    original = AsyncCompile.wait

    def record(self: AsyncCompile, scope: dict) -> None:
        pending.append((self, scope))

    AsyncCompile.wait = record
    try:
        yield
    finally:
        AsyncCompile.wait = original


# C++ kernels built into one library: each compiler process spends most of its time on
# loading inductor's precompiled header (0.25 s of a 0.5 s kernel build on this machine;
# 0.32 s for an empty kernel), so kernels built together pay it once (`_kernels_built_in_batches`).
# The zoo GPT small's floor plan fitted (compiled and measured) in 11.4 s with a build per
# kernel, 7.3-7.6 s at 6 per build, 6.5-6.8 s at 12, 5.8-6.6 s at 24 or all of a run in one
# (2 cores, 2 compile workers; one-off script); more workers would keep busy on smaller batches
KERNELS_PER_BUILD = 12
_ENTRY = re.compile(r'extern\s+"C"\s+void\s+kernel\(')
_PREFIX_INCLUDE = "#include <torch/csrc/inductor/cpp_prefix.h>"


class _KernelBatch:
    """Up to `KERNELS_PER_BUILD` C++ kernels (inductor's ``cpp_pybinding`` sources and
    argument types) built as one Python extension, each in a namespace of its own
    (`_batched_source`); built the way inductor builds one (its compile flags, precompiled
    header and workers), or, if that fails, kernel by kernel as inductor would."""

    def __init__(self, submit: Callable[[Callable[[], Any]], Any]) -> None:
        self.kernels: list[tuple[list[str], str]] = []
        self.submit = submit
        self._load: Callable[[], Any] | None = None
        self._functions: list[Callable[..., Any]] | None = None

    @property
    def started(self) -> bool:
        return self._load is not None

    def start(self) -> None:
        """Submit the build to inductor's compile workers (once); a submission that fails
        is raised where a kernel is first needed (`function`), which then builds each."""
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        if self._load is not None:
            return
        try:
            self._load = CppPythonBindingsCodeCache.load_async(_batched_source(self.kernels), "cpu",
                                                               submit_fn=self.submit)
        except Exception as error:  # noqa: BLE001 - raised again in `function`, which falls back
            def failed(error: Exception = error) -> Any:
                raise error
            self._load = failed

    def function(self, index: int) -> Callable[..., Any]:
        """Kernel ``index``'s Python binding, waiting for the build."""
        if self._functions is None:
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            self.start()
            try:
                module = self._load()
                self._functions = [getattr(module, f"kernel_{i}") for i in range(len(self.kernels))]
            except Exception as error:  # noqa: BLE001 - inductor's own build of each kernel is the fallback
                log.warning("building %d C++ kernels together failed (%s); building them one by one",
                            len(self.kernels), str(error).splitlines()[0] if str(error) else type(error).__name__)
                self._functions = [CppPythonBindingsCodeCache.load_pybinding(argtypes, source)
                                   for argtypes, source in self.kernels]
        return self._functions[index]


@functools.cache
def _batched_kernel_class() -> type:
    """What inductor's generated module expects of ``async_compile.cpp_pybinding``: a
    future its ``async_compile.wait`` resolves, here to kernel ``index`` of ``batch``
    (a class made on first use: inductor is imported only when something compiles)."""
    from torch._inductor.codecache import CodeCacheFuture

    class BatchedKernel(CodeCacheFuture):
        def __init__(self, batch: _KernelBatch, index: int) -> None:
            self.batch = batch
            self.index = index

        def result(self, timeout: float | None = None) -> Callable[..., Any]:   # noqa: ARG002 - inductor's signature
            return self.batch.function(self.index)

    return BatchedKernel


# kernels built or building in batches, by (argument types, source): inductor's own cache
# serves a kernel once per source; this one does for kernels of a batch. Least recently
# used first out (a dropped kernel stays with the runs that hold it)
BATCHED_KERNELS_KEPT = 4096
_batched_kernels: "OrderedDict[tuple[tuple[str, ...], str], Any]" = OrderedDict()
_ARGUMENT_TYPES = {"int64_t": "PyLong_AsLongLong", "float": "PyFloat_AsDouble", "double": "PyFloat_AsDouble"}


def _batchable(argtypes: list[str], source: str) -> bool:
    """A kernel source `_batched_source` can place in a namespace: inductor's prefix
    include first, no other ``#include`` or ``#define``, one ``extern "C"`` entry named
    ``kernel``, and arguments that are pointers (tensors) or `_ARGUMENT_TYPES`."""
    lines = source.strip().splitlines()
    if not lines or lines[0].strip() != _PREFIX_INCLUDE:
        return False
    if any(line.lstrip().startswith(("#include", "#define", "#undef", "#if")) for line in lines[1:]):
        return False
    if len(_ENTRY.findall(source)) != 1 or source.count('extern "C"') != 1:
        return False
    return all(_argument_type(argtype) is not None for argtype in argtypes)


def _argument_type(argtype: str) -> str | None:
    """``argtype`` without ``const``: a pointer type, or one of `_ARGUMENT_TYPES`; None otherwise."""
    bare = argtype.replace("const ", "").strip()
    return bare if bare.endswith("*") or bare in _ARGUMENT_TYPES else None


def _batched_source(kernels: list[tuple[list[str], str]]) -> str:
    """One C++ source defining each kernel as ``memsched_kernel_<i>::kernel`` and a Python
    extension module ``kernel`` whose function ``kernel_<i>`` calls it with a tuple of
    arguments: a tensor's data pointer through the address inductor's loader puts in
    ``_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR``, an integer or a float converted. O(source)."""
    parts = [_PREFIX_INCLUDE, "#define PY_SSIZE_T_CLEAN", "#include <Python.h>", "#include <cerrno>",
             "#include <cstdint>", "#include <cstdlib>"]
    for index, (_, source) in enumerate(kernels):
        body = source.strip().split("\n", 1)[1]
        parts.append(f"namespace memsched_kernel_{index} {{\n{_ENTRY.sub('void kernel(', body)}\n}}")
    parts.append("static void* (*memsched_data_ptr)(PyObject*) = nullptr;")
    methods = []
    for index, (argtypes, _) in enumerate(kernels):
        converted = []
        for position, argtype in enumerate(argtypes):
            bare = _argument_type(argtype)
            item = f"PyTuple_GET_ITEM(args, {position})"
            if bare.endswith("*"):
                converted.append(f"static_cast<{bare}>(memsched_data_ptr({item}))")
            else:
                converted.append(f"static_cast<{bare}>({_ARGUMENT_TYPES[bare]}({item}))")
        parts.append(f"""static PyObject* call_{index}(PyObject*, PyObject* args) {{
    if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != {len(argtypes)}) {{
        PyErr_SetString(PyExc_TypeError, "kernel_{index} takes a tuple of {len(argtypes)} arguments");
        return nullptr;
    }}
    memsched_kernel_{index}::kernel({", ".join(converted)});
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
}}""")
        methods.append(f'    {{"kernel_{index}", call_{index}, METH_VARARGS, ""}},')
    parts.append("static PyMethodDef methods[] = {\n" + "\n".join(methods) + "\n    {nullptr, nullptr, 0, nullptr}};")
    parts.append("""static struct PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "kernel", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_kernel(void) {
    const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    char* end = nullptr;
    errno = 0;
    uintptr_t value = address ? std::strtoull(address, &end, 10) : 0;
    if (value == 0 || errno != 0 || end == address) {
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR is not a function's address");
        return nullptr;
    }
    memsched_data_ptr = reinterpret_cast<void* (*)(PyObject*)>(value);
    return PyModule_Create(&module_definition);
}""")
    return "\n".join(parts) + "\n"


@contextlib.contextmanager
def _kernels_built_in_batches(size: int | None = None) -> Iterator[None]:
    """Inside the block, the C++ kernels inductor defines are built ``size`` at a time, as
    one library each (`_KernelBatch`; ``size`` defaults to `KERNELS_PER_BUILD`), instead of
    one compiler process per kernel; a batch
    is submitted to inductor's compile workers once full, or when a kernel of it is first
    needed, or (what is left) when the block ends. Kernels that `_batchable` refuses, and
    every kernel where inductor compiles in its own process (one compile thread), build as
    inductor builds them. On the zoo GPT small at its floor, 36 kernels took 17.1 s of
    compiler time (``compile_file``) on 2 workers, 0.47 s each."""
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads

    original = AsyncCompile.cpp_pybinding
    size = size or KERNELS_PER_BUILD
    filling: _KernelBatch | None = None       # the batch new kernels join, until it starts building

    def cpp_pybinding(self: AsyncCompile, argtypes: list[str], source_code: str) -> Any:
        nonlocal filling
        key = (tuple(argtypes), source_code)
        if key in _batched_kernels:
            _batched_kernels.move_to_end(key)
            return _batched_kernels[key]
        if get_compile_threads() <= 1 or not _batchable(argtypes, source_code):
            return original(self, argtypes, source_code)
        if filling is None or filling.started:         # started: full, or a kernel of it was needed
            filling = _KernelBatch(self.submit)
        filling.kernels.append((list(argtypes), source_code))
        _batched_kernels[key] = future = _batched_kernel_class()(filling, len(filling.kernels) - 1)
        while len(_batched_kernels) > BATCHED_KERNELS_KEPT:
            _batched_kernels.popitem(last=False)
        if len(filling.kernels) >= size:
            filling.start()
        return future

    AsyncCompile.cpp_pybinding = cpp_pybinding
    try:
        yield
    finally:
        AsyncCompile.cpp_pybinding = original
        if filling is not None:
            filling.start()


@contextlib.contextmanager
def _kernel_per_node() -> Iterator[None]:
    """Inductor's C++ backend emits each fused node as its own kernel call, not several in
    one kernel group (as it does while no library call comes between them and their
    arguments number at most ``MAX_FUSED_KERNEL_ARGS_NUM``).

    The wrapper allocates every output of a group before the group's call and frees what
    dies inside it after, so a group holds what it reads and writes at once, across as many
    of the plan's steps as it spans. On the zoo GPT small at every-block checkpointing's
    peak, a group of the first block's layer-norm backward, dropout backward and the GELU
    recomputation before the next matmul held both the recomputed 4 MiB and the gradients
    the layer-norm backward wrote in place: the compiled step measured 1.02 MiB above its
    plan's prediction; emitted a kernel per node, it measured the prediction to the byte
    (one-off trace of the allocator's events; `with_compiled_costs` models the in-place
    writes). The uuid of `_choices_within` marks the code apart in inductor's caches."""
    from torch._inductor.codegen.cpp import CppScheduling

    saved = CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM
    CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = -1      # a flush after every node
    try:
        yield
    finally:
        CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = saved


@contextlib.contextmanager
def _kernels_built_as_defined() -> Iterator[None]:
    """Inside the block, each C++ kernel inductor generates is handed to its compile
    workers (into a batch, under `_kernels_built_in_batches`) as soon as its code is
    defined, instead of when the generated module loads after the whole graph's code
    generation: the module's own submission then finds the
    build under way in inductor's code cache (keyed by the kernel's source and argument
    types, the same expression evaluated). On the zoo GPT small's floor plan the
    backward's kernels are defined over its last second of code generation (one-off
    trace). A kernel whose early submission fails is built at load, as without this."""
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen

    original = PythonWrapperCodegen.define_kernel

    def define_kernel(self: PythonWrapperCodegen, kernel_name: str, kernel_body: str, *args: Any,
                      **kwargs: Any) -> Any:
        if kernel_body.startswith("async_compile.cpp_pybinding("):
            try:
                eval(kernel_body, {"async_compile": AsyncCompile()})  # noqa: S307 - inductor's own generated call
            except Exception as error:  # noqa: BLE001 - the module's load builds it instead
                log.debug("early build of %s failed (%s); it builds when its module loads", kernel_name, error)
        return original(self, kernel_name, kernel_body, *args, **kwargs)

    PythonWrapperCodegen.define_kernel = define_kernel
    try:
        yield
    finally:
        PythonWrapperCodegen.define_kernel = original


def _strides_as_compiled(reported: list, num_outputs: int) -> list[tuple[int, ...] | None] | None:
    """The strides inductor reported for each output of a run it compiled (what its code
    gives them: not always the traced graph's, as in channels-last layouts), None for a
    non-tensor output; None for all if it reported none (then the run is never run eagerly
    in its place)."""
    if len(reported) != num_outputs:
        return None
    return [None if strides is None else tuple(int(stride) for stride in strides) for strides in reported]


def forget_compiled_runs() -> None:
    """Empty this process's compiled runs (`COMPILED_RUNS_KEPT`) and kernels
    (`_kernels_built_in_batches`), so that the next program compiles every run and builds
    every kernel: for timing a compilation as a new process would make it."""
    _compiled_runs.clear()
    _batched_kernels.clear()


@dataclass
class _DonatedInputs:
    """The part of AOTAutograd's ``ViewAndMutationMeta`` that inductor reads for a graph
    compiled as a backward (`torch._inductor.utils.get_donated_idxs`)."""

    bw_donated_idxs: list[int]
    static_input_indices: list[int] = field(default_factory=list)
    num_mutated_inp_runtime_indices: int = 0


def _sole_reference(tensor: torch.Tensor) -> bool:
    """Whether no other tensor shares ``tensor``'s storage (a view, a detached alias, a
    caller's output): its storage's use count is this tensor's and the storage object's."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2


def _donatable(inputs: list, names: list[str], dropped: list[str], env: dict[str, Any]) -> tuple[int, ...]:
    """The inputs of a run that its compiled code may write into, as AOTAutograd donates a
    backward's saved tensors to inductor ("donated buffers"): each dies in this run (the
    interpreter let go of it before the run) and nothing else holds its storage, so
    inductor may write a kernel's output into it where the kernel is its last reader
    (``planner.compiled.in_place_inputs`` predicts where). Decided at the run's first call;
    `_still_donatable` checks each later call. O(inputs x live values)."""
    dropped_names = set(dropped)
    donated = []
    for index, (name, value) in enumerate(zip(names, inputs)):
        if name not in dropped_names or not isinstance(value, torch.Tensor) or value.is_sparse:
            continue
        if any(other is value for position, other in enumerate(inputs) if position != index) \
                or any(other is value for other in env.values()):
            continue
        if _sole_reference(value):
            donated.append(index)
    return tuple(donated)


def _still_donatable(inputs: list, donated: tuple[int, ...]) -> None:
    """Replace each donated input that something else now shares (a caller holding an
    output the plan counted released, say) by a copy, so the compiled code writes into the
    copy and the other holder's values stay as they were. O(donated inputs)."""
    for index in donated:
        if not _sole_reference(inputs[index]):
            log.debug("a donated run input is shared; the run gets a copy")
            inputs[index] = inputs[index].clone()


def _example_key(value: Any) -> Any:
    """What of a run's input its compiled code depends on."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, str(value.device), value.requires_grad)
    return (type(value).__name__, repr(value))


def _choices_within(window: int | None, *, horizontal: bool = True, per_node: bool = True,
                    donated: tuple[int, ...] = ()):
    """A factory of inductor heuristics that fuse only kernels at most ``window`` kernels
    apart in program order (any distance for None), and none across a random call of
    `runtime.rng` (`_random_barriers`); without ``horizontal``, two kernels neither of which
    reads what the other writes (`_reads_from`) only with no library call between them
    (`_library_calls`)."""
    from torch._inductor.choices import InductorChoices

    class WithinWindow(InductorChoices):
        @staticmethod
        def can_fuse(scheduler, node1, node2, shared_data_score):  # noqa: ANN001, ANN205 - inductor's hook
            first, last = min(node1.min_order, node2.min_order), max(node1.max_order, node2.max_order)
            if window is not None and max(abs(node1.min_order - node2.max_order),
                                          abs(node2.min_order - node1.max_order)) > window:
                return False
            if not horizontal and not (_reads_from(node2, node1) or _reads_from(node1, node2)) \
                    and _any_between(_library_calls(scheduler), first, last):
                return False           # a horizontal fusion only where no library call comes between
            if _any_between(_random_barriers(scheduler), first, last):
                return False
            return InductorChoices.can_fuse(scheduler, node1, node2, shared_data_score)

        def uuid(self) -> str:
            # the donated inputs too: inductor's graph cache does not key on them
            return (f"memsched-fusion-window-{window}-random-barriers" + ("-kernel-per-node" if per_node else "")
                    + ("" if horizontal else "-no-horizontal-across-calls")
                    + (f"-donated-{'-'.join(map(str, donated))}" if donated else ""))

    return WithinWindow


def _library_calls(scheduler: Any) -> list[int]:
    """The program orders of ``scheduler``'s library calls (matmuls, convolutions,
    attention, fallbacks: `ExternKernelSchedulerNode`), sorted; computed once per
    scheduler."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    return _orders_of(scheduler, "_memsched_library_calls", lambda node: isinstance(node, ExternKernelSchedulerNode))


def _reads_from(reader: Any, writer: Any) -> bool:
    """Whether scheduler node ``reader`` reads a buffer that ``writer`` writes."""
    written = writer.get_buffer_names()
    return any(dependency.name in written for dependency in reader.read_writes.reads)


def _random_barriers(scheduler: Any) -> list[int]:
    """The program orders of the random calls (`runtime.rng`'s custom ops) among
    ``scheduler``'s nodes, sorted; computed once per scheduler.

    No kernel fuses across one, so the program keeps the cuts it had when these calls
    ran eagerly between runs. Fused across them, the zoo GPT small's floor plan measured
    39.55 MiB compiled, against 38.54 MiB cut, 37.80 MiB with these barriers and 38.28 MiB
    predicted: where the plan recomputes a dropout mask twice, for two backward ops far
    apart, inductor fused the two recomputations of its template (the same kernels on the
    same inputs) into one kernel at the first, so both were live together (one-off line
    trace of the generated code)."""
    random_ops = {torch.ops.memsched.random_fill.default, torch.ops.memsched.rng_state.default,
                  torch.ops.memsched.random_fill_replay.default}
    return _orders_of(scheduler, "_memsched_random_barriers",
                      lambda node: getattr(getattr(node, "node", None), "op_overload", None) in random_ops)


def _orders_of(scheduler: Any, attribute: str, chosen: Callable[[Any], bool]) -> list[int]:
    """The sorted program orders of ``scheduler``'s nodes that ``chosen`` picks, kept on the
    scheduler under ``attribute`` (one scheduler compiles one run). O(nodes) once."""
    orders = getattr(scheduler, attribute, None)
    if orders is None:
        orders = sorted(node.min_order for node in scheduler.nodes if chosen(node))
        setattr(scheduler, attribute, orders)
    return orders


def _any_between(orders: list[int], first: int, last: int) -> bool:
    """Whether a sorted ``orders`` holds one strictly between ``first`` and ``last``."""
    return bisect.bisect_right(orders, first) < bisect.bisect_left(orders, last)


def _lowered(module: fx.GraphModule, inputs: list) -> tuple[fx.GraphModule, list, Any]:
    """``module`` retraced the way AOTAutograd hands graphs to inductor: on fake tensors
    of static shapes (under a shape environment, as AOTAutograd's), functionalized (an
    in-place update of an input becomes a trailing ``copy_``, which inductor writes in
    place), with inductor's decompositions, then rewritten by the passes ``torch.compile``
    runs on its joint graph before partitioning; the fake mode too.

    The joint-graph passes are pattern rewrites that keep what a graph computes, so they
    apply to a run as to a joint graph. One of them matters to memory: the cross-entropy
    backward (``nll_loss_backward``) scatters into a logits-sized buffer of zeros, which
    the pass turns into a pointwise ``where`` that fuses into the softmax backward.
    Measured on a linear head of GPT-2's size with its loss (512 tokens, vocabulary
    50,257), keep-all plan: the compiled step peaked at 444.7 MiB without the passes,
    395.6 MiB with them, as compiled plain does."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.joint_graph import joint_graph_passes
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.func import functionalize

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    examples = [fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t for t in inputs]
    with fake_mode:
        traced = make_fx(functionalize(module, remove="mutations"), decomposition_table=select_decomp_table())(
            *examples)
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
        traced = joint_graph_passes(traced, device)
    return traced, examples, fake_mode


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _nodes_in(structure: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(structure, lambda n: found.append(n) or n)
    return found


def compile_programs(programs: Programs, inductor_options: dict[str, Any] | None = None, *,
                     eager_first_call: Collection[Phase] = ()) -> Programs:
    """``programs`` with the forward (positional) and backward (boxed) programs compiled;
    nothing compiles before the first call. ``eager_first_call``: the phases whose program
    runs its first call eagerly (`CompiledProgram.eager_first_call`)."""
    return replace(programs,
                   forward=CompiledProgram(programs.forward, boxed=False, name="forward",
                                           inductor_options=inductor_options,
                                           eager_first_call=Phase.FORWARD in eager_first_call),
                   backward=CompiledProgram(programs.backward, boxed=True, name="backward",
                                            inductor_options=inductor_options,
                                            eager_first_call=Phase.BACKWARD in eager_first_call,
                                            donatable=programs.saved_names))


__all__ = ["CompiledProgram", "compile_programs", "forget_compiled_runs"]
