"""A new step signature's `Graph` from a profile already measured, without running the step.

A training loop meets new shapes (the last, smaller batch; padding per bucket) and
unfrozen parameters. Profiling such a step for real runs it un-optimized, at the plain
step's peak: the memory the budget exists to avoid, and on a GPU that cannot hold the
plain step, an out-of-memory error. `reused_graph` instead

1. walks the new joint graph on fake tensors (`planner.profile.GraphBuilder`, as
   `planner.estimate` does): ops, values, sizes and aliases are what a real run records,
   and no step memory is allocated;
2. times each op from the measured profile of the same op (same node name and aten
   target) in a reference step, scaled by the ratio of the op's roofline times at the two
   shapes (`planner.roofline.op_time_ms` on figures of this kind of device, `roofline_figures`):
   only the roofline's *ratio* is trusted, the measured time carries the kernel's real
   efficiency;
3. runs *in isolation*, once, each op whose aten target held scratch in the reference
   (CPU kernels' transient memory, CUDA workspace: what only a real run sees) or that the
   reference never ran (a switch from ``eval()`` to ``train()`` brings dropout and
   batch-norm statistics): its scratch and time are measured, not guessed. It reads the
   real parameters and inputs (views of them as the op reads them) and random tensors of
   the new shapes for everything else, buffers included, since a kernel may update those
   in place without its schema saying so; an op whose schema writes an argument is never
   run. An op alone then holds its non-placeholder inputs, its outputs and its scratch,
   which every plan holds too while that op runs, so planning needs no more memory than
   the step it plans.

Where the scratch cannot be measured (another profiler is running, and profilers do not
nest), an op's reference scratch is carried over scaled up by the larger of its
bytes-moved and largest-tensor ratios, never down.

Cost: two fake-tensor walks (the reference's is cached by the caller), the isolated ops
(convolutions, batch norms and their backwards on a ResNet; attention and a few
normalisations on a transformer) and O(ops) arithmetic: about 0.1-0.3 s per walk at 600
nodes on 2 cores. Times are estimates: `experiments/new_shapes.py` compares the plans they give
with plans from a real profile of the new step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import operator
import statistics
import weakref
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from planner.capture import CapturedStep, fake_tensor
from planner.profile import FakeGraphBuilder, GraphBuilder, assemble_graph, step_arguments, target_name
from planner.roofline import bytes_moved, op_time_ms
from solvers.graph import Graph, Value, ValueKind
from solvers.targets import DEVICE_TARGETS, DeviceTarget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpShape:
    """What the fake walk learns of one op: its aten target, roofline time on this device's
    figures, the bytes it reads and writes, its largest tensor, the bytes of results it
    computes that nothing reads (`GraphBuilder` counts those as its temporary memory), and,
    when it was run in isolation, its measured time and scratch (None: not measured)."""

    target: str
    roofline_ms: float
    bytes_moved: int
    largest_tensor_bytes: int
    unread_bytes: int
    isolated_ms: float | None = None
    isolated_scratch_bytes: int | None = None


@dataclass(frozen=True)
class WalkedStep:
    """A step walked on fake tensors: its graph (sizes exact, times from the roofline) and
    each op's `OpShape`, by op name."""

    graph: Graph
    shapes: Mapping[str, OpShape]


class _ShapeWalk(FakeGraphBuilder):
    """`GraphBuilder` over fake tensors that records each op's `OpShape` and runs the ops
    whose target is in ``isolate`` on real tensors of the same layout."""

    activity = "planning a new shape on fake tensors"

    def __init__(self, step: CapturedStep, device: torch.device, figures: DeviceTarget,
                 real_placeholders: Mapping[str, torch.Tensor], isolate: Collection[str]) -> None:
        super().__init__(step, device)
        self.figures = figures
        self.roofline: dict[str, tuple[float, int, int]] = {}
        self.real_placeholders = real_placeholders
        self.real_owner: dict[int, str] = {}       # data_ptr of a real placeholder storage -> value
        self.fake_placeholders: dict[str, torch.Tensor] = {}
        self.isolate = isolate
        self.isolated_ms: dict[str, float] = {}
        self.isolated_workspace: dict[str, int] = {}
        # runs the isolated ops, once each: a repeat would hold a second result beside the first
        self.real = GraphBuilder(step, device, repeats=1)

    def _classify(self, name: str, tensor: Any, kind: ValueKind, producer: str | None) -> Value:
        """A placeholder holds its real tensor's whole storage, as a real profile counts it
        (an input sliced from a larger batch keeps that batch alive; a fake tensor's storage
        is only the view's)."""
        value = super()._classify(name, tensor, kind, producer)
        real = self.real_placeholders.get(name)
        if real is None or real.untyped_storage().nbytes() == 0:
            return value
        if kind in (ValueKind.PARAMETER, ValueKind.INPUT):    # never written; buffers may be (batch-norm
            self.fake_placeholders[name] = tensor               # statistics, by kernels whose schema hides it)
        owner = self.real_owner.setdefault(real.untyped_storage().data_ptr(), name)
        if owner != name:                          # views of it alias the real owner
            storage = tensor.untyped_storage()
            self.storage_owner[self._storage_key(storage)] = (weakref.ref(storage), owner)
            return dataclasses.replace(value, size_bytes=0, alias_of=owner)
        return dataclasses.replace(value, size_bytes=int(real.untyped_storage().nbytes()), alias_of=None)

    def _timed(self, name: str, target: Any, args: tuple, kwargs: dict) -> tuple[Any, float, int]:
        result = target(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
        largest = max((t.numel() * t.element_size() for t in tensors), default=0)
        roofline_ms = op_time_ms(target, args, kwargs, result, self.figures)
        self.roofline[name] = (roofline_ms, bytes_moved(args, kwargs, result), largest)
        mutates = isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable
        if target_name(target) in self.isolate and not mutates:      # never write to a real placeholder
            self._run_isolated(name, target, args, kwargs)
        return result, roofline_ms, 0

    def _real_argument(self, tensor: torch.Tensor) -> torch.Tensor:
        """The real tensor behind a fake argument: a parameter's or input's own (or the view
        of it the op reads), so that the isolated op holds no second copy of them; else a
        new random one (a buffer too: a kernel may update it in place)."""
        owner = self._owner(tensor)
        if owner is None or owner not in self.fake_placeholders:
            return _random_like(tensor)
        real, fake = self.real_placeholders[owner], self.fake_placeholders[owner]
        if self._storage_key(fake.untyped_storage()) != self._storage_key(tensor.untyped_storage()):
            return _random_like(tensor)            # a second placeholder over the same real storage
        offset = real.storage_offset() + tensor.storage_offset() - fake.storage_offset()
        return real.detach().as_strided(tuple(tensor.shape), tuple(tensor.stride()), offset)

    def _run_isolated(self, name: str, target: Any, args: tuple, kwargs: dict) -> None:
        """Run one op alone on real tensors: it holds its inputs that are not placeholders,
        its outputs and its scratch, which the step holds too whenever it runs that op."""
        with unset_fake_temporarily():
            try:
                real_args, real_kwargs = pytree.tree_map_only(torch.Tensor, self._real_argument, (args, kwargs))
                _, time_ms, workspace_bytes = self.real._timed(name, target, real_args, real_kwargs)
            except (RuntimeError, ValueError, IndexError) as error:   # random values it rejects
                log.debug("could not run %s (%s) in isolation: %s", name, target, error)
                return
        self.isolated_ms[name] = time_ms
        self.isolated_workspace[name] = workspace_bytes


def _random_like(tensor: torch.Tensor) -> torch.Tensor:
    """A real tensor of ``tensor``'s shape, strides, dtype and device: floating point
    filled from a normal distribution, the rest with zeros (valid indices and masks)."""
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) \
        if tensor.numel() else 0
    storage = torch.empty(elements, dtype=tensor.dtype, device=tensor.device)   # expanded views share elements
    storage = storage.normal_() if storage.is_floating_point() else storage.zero_()
    return storage.as_strided(tuple(tensor.shape), tuple(tensor.stride()))


def walk_step(step: CapturedStep, model: torch.nn.Module, example_inputs: Sequence[Any],
              example_kwargs: Mapping[str, Any] | None, *, name: str, reference: Graph,
              isolate: Collection[str] = (), progress: bool | None = None) -> WalkedStep:
    """``step`` walked on fake tensors made from ``model``'s tensors and the inputs, the ops
    whose aten target is in ``isolate`` also run alone on real random tensors, under forked
    generators (the step that follows draws the numbers it would have); the graph takes
    ``reference``'s device, host link and generator-state size."""
    device = torch.device(reference.device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    real = step_arguments(step, model, example_inputs, example_kwargs, tangents=())
    with fake_mode:
        arguments = [fake_tensor(fake_mode, tensor) for tensor in real]
        arguments += [torch.ones(leaf.shape, dtype=leaf.dtype, device=leaf.device) for leaf in step.output_leaves
                      if leaf.tangent]
    walk = _ShapeWalk(step, device, roofline_figures(device), dict(zip(step.placeholder_names, real)), isolate)
    measuring = walk.real.scratch if isolate and walk.real.measures_scratch else contextlib.nullcontext()
    with measuring:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), fake_mode, \
                torch.enable_grad():
            walk.run(arguments, progress)
    scratch_measured = not walk.real.measures_scratch or walk.real.scratch.active
    cpu_scratch = walk.real.scratch.scratch_bytes()
    graph = assemble_graph(walk, step, transfer=reference.transfer, device=reference.device, name=name,
                           rng_state_bytes=reference.rng_state_bytes)
    shapes = {}
    for op in graph.ops:
        isolated = op.name in walk.isolated_ms and scratch_measured
        shapes[op.name] = OpShape(
            op.target, *walk.roofline[op.name], unread_bytes=op.tmp_bytes,
            isolated_ms=walk.isolated_ms[op.name] if isolated else None,
            isolated_scratch_bytes=walk.isolated_workspace[op.name] + cpu_scratch.get(op.name, 0) if isolated else None)
    return WalkedStep(graph, shapes)


def walk_reference(step: CapturedStep, model: torch.nn.Module, graph: Graph) -> WalkedStep:
    """The reference step (profiled for real as ``graph``) walked on fake tensors of its own
    example inputs, for `reused_graph`'s ratios."""
    args, kwargs = pytree.tree_unflatten(list(step.input_leaves), step.input_spec)
    return walk_step(step, model, args, kwargs, name=graph.name, reference=graph)


def ops_to_isolate(step: CapturedStep, reference: Graph, reference_walk: WalkedStep) -> set[str]:
    """The aten targets of ``step``'s ops that `walk_step` must run alone: those that held
    scratch in the reference, and those the reference never ran."""
    measured = {op.name: op for op in reference.ops}
    with_scratch = {shape.target for name, shape in reference_walk.shapes.items()
                    if name in measured and measured[name].tmp_bytes > shape.unread_bytes}
    known = {shape.target for shape in reference_walk.shapes.values()}
    targets = {target_name(node.target) for node in step.joint.graph.nodes
               if node.op == "call_function" and node.target is not operator.getitem}
    return {target for target in targets if target in with_scratch or target not in known}


def reused_graph(new: WalkedStep, reference: Graph, reference_walk: WalkedStep) -> Graph:
    """``new``'s graph with times and scratch from ``reference`` and the isolated runs
    (module docstring)."""
    measured = {op.name: op for op in reference.ops}
    ratios: dict[str, list[float]] = {}          # measured / roofline per target
    scratch_per_byte: dict[str, float] = {}      # measured scratch / largest tensor per target
    for name, shape in reference_walk.shapes.items():
        op = measured.get(name)
        if op is None:
            continue
        if shape.roofline_ms > 0:
            ratios.setdefault(shape.target, []).append(op.time_ms / shape.roofline_ms)
        scratch = max(0, op.tmp_bytes - shape.unread_bytes)
        if scratch and shape.largest_tensor_bytes:
            scratch_per_byte[shape.target] = max(scratch_per_byte.get(shape.target, 0.0),
                                                 scratch / shape.largest_tensor_bytes)
    every_ratio = [ratio for values in ratios.values() for ratio in values]
    overall = statistics.median(every_ratio) if every_ratio else 1.0
    ops = []
    for op in new.graph.ops:
        shape = new.shapes[op.name]
        was = reference_walk.shapes.get(op.name)
        before = measured.get(op.name)
        matched = was is not None and before is not None and was.target == shape.target
        if matched:
            time_ms = before.time_ms * (shape.roofline_ms / was.roofline_ms if was.roofline_ms > 0 else 1.0)
        elif shape.isolated_ms is not None:
            time_ms = shape.isolated_ms
        else:
            per_target = ratios.get(shape.target)
            time_ms = shape.roofline_ms * (statistics.median(per_target) if per_target else overall)
        if shape.isolated_scratch_bytes is not None:
            scratch = shape.isolated_scratch_bytes
        elif matched:
            growth = max(1.0, _ratio(shape.bytes_moved, was.bytes_moved),
                         _ratio(shape.largest_tensor_bytes, was.largest_tensor_bytes))
            scratch = math.ceil(max(0, before.tmp_bytes - was.unread_bytes) * growth)
        else:
            scratch = math.ceil(scratch_per_byte.get(shape.target, 0.0) * shape.largest_tensor_bytes)
        ops.append(dataclasses.replace(op, time_ms=time_ms, tmp_bytes=op.tmp_bytes + scratch))
    return dataclasses.replace(new.graph, ops=tuple(ops))


def _ratio(new: int, old: int) -> float:
    return new / old if old > 0 else 1.0


# A two-core CPU's balance, as `planner.roofline.measure_cpu_target` found it on the machine
# this was built on (171 GFLOP/s float32 matmul, 6.5 GB/s clone, 1.4 us per op). Only ratios of
# one op's roofline at two shapes are used, so a CPU's figures matter little; measuring them
# in a training loop would allocate benchmark buffers beside the step and draw from its RNG.
NOMINAL_CPU = DeviceTarget(name="nominal-cpu", device_type="cpu", memory_bytes=0,
                           flops_per_s={"float32": 171e9}, memory_bytes_per_s=6.5e9, host_link_bytes_per_s=6.5e9,
                           launch_ms=0.0014, compute_efficiency=1.0, memory_efficiency=1.0,
                           source="measure_cpu_target() on a 2-core build machine")


def roofline_figures(device: torch.device) -> DeviceTarget:
    """Figures whose roofline *ratios* stand for this device's: `NOMINAL_CPU`, or the named
    GPU closest to the one here (H100 SXM when none matches)."""
    if device.type == "cpu":
        return NOMINAL_CPU
    name = torch.cuda.get_device_name(device).lower() if torch.cuda.is_available() else ""
    for key, words in (("h200", ("h200",)), ("h100-pcie", ("h100", "pcie")), ("h100-sxm", ("h100",)),
                       ("a100-40gb", ("a100", "40gb")), ("a100-80gb", ("a100",)), ("l4", ("l4",)),
                       ("rtx-4090", ("4090",))):
        if all(word in name for word in words):
            return DEVICE_TARGETS[key]
    return DEVICE_TARGETS["h100-sxm"]


class ProfileReuse:
    """The step `optimize` profiled for real, to plan later signatures of the same model
    from (`reused_graph`); its fake walk is made on first use and kept."""

    def __init__(self, step: CapturedStep, graph: Graph) -> None:
        self.step = step
        self.graph = graph
        self._walk: WalkedStep | None = None

    def graph_for(self, step: CapturedStep, model: torch.nn.Module, example_inputs: Sequence[Any],
                  example_kwargs: Mapping[str, Any] | None, progress: bool | None = None) -> Graph:
        """``step``'s graph for these inputs, without running the step (module docstring).
        The generators' states are as they were (`walk_step` forks them)."""
        if self._walk is None:
            self._walk = walk_reference(self.step, model, self.graph)
        isolate = ops_to_isolate(step, self.graph, self._walk)
        walked = walk_step(step, model, example_inputs, example_kwargs, name=self.graph.name,
                           reference=self.graph, isolate=isolate, progress=progress)
        return reused_graph(walked, self.graph, self._walk)
