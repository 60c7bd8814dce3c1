"""Measure every op of a captured step and describe it as a torch-free `solvers.Graph`.

For each node of the joint graph, on the model's device, with its real parameters:
  * time: of ``repeats`` runs, the first (warm-up) left out, the median on CUDA
    (synchronised, CUDA-event timed) and the minimum on CPU, where a repeat pays for what
    the step in a steady state does not: page faults of memory the allocator handed back
    to the system, and other processes' load (a 24-block GPT's forward profiled at 1.3 to
    1.6x its measured steady-state time with the median, within 4 % with the minimum; a
    48-block one still at 1.4x). The repeats stop once an op's timed runs add up to
    `ENOUGH_TIMED_MS`: a run that long is not moved much by a timer tick or an
    interrupt, and such ops are most of a real-size model's step (GPT-2 small's matmuls),
    so each costs one run less;
  * bytes: the storage its outputs newly own; a view or alias owns none and points to the
    value whose storage it shares (found by storage identity, not by op name, so ops that
    alias only sometimes, like ``reshape``, are classified by what they did);
  * workspace: the high-water mark during the op beyond its outputs (on CUDA the
    allocator's statistics, on CPU its events in one profiler session, `planner.scratch`);
    outputs of a multi-output op that nothing reads count as workspace too.

Profiling does not change the model: buffers are cloned, the RNG state is restored, and
parameters are only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import statistics
import sys
import time
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from planner.capture import CapturedStep, Role, describe_tensors, is_random
from planner.errors import ModelInputError, OptionError
from planner.scratch import OpScratch
from solvers.graph import Graph, Op, Phase, Transfer, Value, ValueKind, backward_as_late_as_possible

log = logging.getLogger(__name__)
aten = torch.ops.aten

# timing repeats of one op stop once its timed runs add up to this many milliseconds
# (module docstring): on GPT-2 small (batch 2 x 256 tokens, one thread, 3 repeats asked)
# profiling took 12.4 s with this stop against 17.3 s without, and the summed op times
# moved by +3.7 % (two alternating runs each, one-off script)
ENOUGH_TIMED_MS = 5.0
_CALLER_REDUCTION_BYTES = 64   # room for the loss scalar, its seed gradient, a few partial sums

_PLACEHOLDER_KINDS = {Role.PARAMETER: ValueKind.PARAMETER, Role.BUFFER: ValueKind.BUFFER,
                      Role.INPUT: ValueKind.INPUT, Role.TANGENT: ValueKind.TANGENT}


def step_arguments(step: CapturedStep, model: torch.nn.Module, example_inputs: Sequence[Any],
                   example_kwargs: Mapping[str, Any] | None = None, *, clone_buffers: bool = False,
                   tangents: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The joint graph's flat arguments for this model and inputs."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    leaves = pytree.tree_leaves((tuple(example_inputs), dict(example_kwargs or {})))
    flat = [params[name].detach() for name in step.param_names]
    flat += [buffers[name].detach().clone() if clone_buffers else buffers[name] for name in step.buffer_names]
    flat += [leaves[i].detach() for i in step.tensor_input_positions]
    if tangents is None:
        tangents = [torch.ones(leaf.shape, dtype=leaf.dtype, device=leaf.device)
                    for leaf in step.output_leaves if leaf.tangent]
    return flat + list(tangents)


def profile(step: CapturedStep, model: torch.nn.Module, example_inputs: Sequence[Any],
            example_kwargs: Mapping[str, Any] | None = None, *, repeats: int = 3,
            transfer: Transfer | None = None, name: str = "", progress: bool | None = None) -> Graph:
    """Run the captured step once (plus at most ``repeats - 1`` timing repeats per op) and return
    its `Graph`. ``repeats=1`` gives sizes with single-shot times (enough to re-use a plan).
    ``progress`` shows a progress bar (default: when stderr is a terminal)."""
    if repeats < 1:
        raise OptionError(f"repeats must be >= 1, got {repeats}")
    arguments = step_arguments(step, model, example_inputs, example_kwargs, clone_buffers=True)
    device = next((t.device for t in arguments), torch.device("cpu"))
    # grad mode on, as when tracing (some kernels consult it); the arguments are detached
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        walk = GraphBuilder(step, device, repeats).run(arguments, progress)
    if transfer is None:
        transfer = measure_transfer(device) if device.type == "cuda" else Transfer(source="nominal (not measured)")
    return assemble_graph(walk, step, transfer=transfer, device=str(device), name=name or type(model).__name__,
                          rng_state_bytes=rng_state_bytes(device))


def assemble_graph(walk: "GraphBuilder", step: CapturedStep, *, transfer: Transfer, device: str, name: str,
                   rng_state_bytes: int) -> Graph:
    """The `Graph` of a finished walk over ``step``'s joint graph (measured or estimated)."""
    tangents = [value for value in walk.placeholders if step.roles[value] is Role.TANGENT]
    seeded = [leaf for leaf in step.output_leaves if leaf.tangent]
    returns_its_loss = len(seeded) == 1 and seeded[0].shape == ()
    # A model that returns its loss needs nothing more; otherwise the caller reduces the
    # outputs to a loss (a few scalars) and autograd seeds the backward with a scalar.
    caller_bytes = 0 if returns_its_loss else _CALLER_REDUCTION_BYTES
    return Graph(ops=backward_as_late_as_possible(walk.ops, tangents), values=tuple(walk.values),
                 placeholders=tuple(walk.placeholders), forward_outputs=tuple(walk.forward_outputs),
                 gradients=tuple(walk.gradients), transfer=transfer, device=device, name=name,
                 caller_bytes=caller_bytes, rng_state_bytes=rng_state_bytes)


def with_released_outputs(graph: Graph, step: CapturedStep) -> Graph:
    """``graph`` for a caller that drops every output but the loss before calling backward
    (`CapturedStep.outputs_without_tangent`): `Graph.released_outputs`."""
    released = tuple(name for name in step.outputs_without_tangent() if name in graph.forward_outputs)
    return dataclasses.replace(graph, released_outputs=released)


def rng_state_bytes(device: torch.device) -> int:
    """Device bytes of one generator state the runtime saves (`runtime.rng`): on CPU a
    5,056 B CPU tensor made outside the dispatcher (no aten op shows it); on CUDA the
    state lives in host memory and costs the device nothing."""
    return torch.get_rng_state().untyped_storage().nbytes() if device.type == "cpu" else 0


def measure_transfer(device: torch.device, size_bytes: int = 64 * 2**20, repeats: int = 5) -> Transfer:
    """Pinned host<->device copy bandwidth on ``device`` (CUDA), median of ``repeats`` copies
    of ``size_bytes``, timed with CUDA events; latency from a 4 KiB copy."""

    def median_ms(source: torch.Tensor, destination: torch.Tensor) -> float:
        times_ms = []
        for _ in range(repeats + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            destination.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        return statistics.median(times_ms[1:])

    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    latency_ms = median_ms(host[:4096], on_device[:4096])
    to_device_ms, to_host_ms = median_ms(host, on_device), median_ms(on_device, host)
    return Transfer(host_to_device_bytes_per_ms=size_bytes / max(to_device_ms - latency_ms, 1e-6),
                    device_to_host_bytes_per_ms=size_bytes / max(to_host_ms - latency_ms, 1e-6),
                    latency_ms=latency_ms, source=f"measured on {torch.cuda.get_device_name(device)}")


class GraphBuilder:
    """Executes the joint graph node by node, recording sizes, aliases and times."""

    activity = "profiling"

    def __init__(self, step: CapturedStep, device: torch.device, repeats: int) -> None:
        self.step = step
        self.device = device
        self.repeats = repeats
        self.ops: list[Op] = []
        self.values: list[Value] = []
        self.placeholders: list[str] = []
        self.forward_outputs: list[str] = []
        self.gradients: list[str] = []
        self.storage_owner: dict[int, tuple[weakref.ref, str]] = {}   # data_ptr -> (storage, root value)
        self.root_of: dict[str, str] = {}
        self.scratch = OpScratch()   # CPU kernels' scratch, measured on each op's first run
        self.measures_scratch = device.type == "cpu"
        # placeholders the step updates in place: an op reading them must not be re-run
        # after the update, or it would see the new value
        self.updated_in_place = {node.args[0].name for node in step.joint.graph.nodes
                                 if step.roles.get(node.name) is Role.BUFFER_UPDATE}

    # -- storage identity ----------------------------------------------------------------
    @staticmethod
    def _storage_key(storage: torch.UntypedStorage) -> int:
        return storage.data_ptr()

    def _owner(self, tensor: torch.Tensor) -> str | None:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return None
        entry = self.storage_owner.get(self._storage_key(storage))
        if entry is not None and entry[0]() is storage:
            return entry[1]
        return None

    def _describe(self, name: str, tensor: Any, kind: ValueKind, producer: str | None) -> Value:
        value = self._classify(name, tensor, kind, producer)
        self.root_of[name] = value.root
        return value

    def _classify(self, name: str, tensor: Any, kind: ValueKind, producer: str | None) -> Value:
        if not isinstance(tensor, torch.Tensor):
            return Value(name, 0, kind, producer=producer)
        owner = self._owner(tensor)
        storage = tensor.untyped_storage()
        shape, dtype = tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        if owner is not None:
            return Value(name, 0, kind, producer=producer, alias_of=owner, shape=shape, dtype=dtype)
        if storage.nbytes() > 0:
            self.storage_owner[self._storage_key(storage)] = (weakref.ref(storage), name)
        return Value(name, int(storage.nbytes()), kind, producer=producer, shape=shape, dtype=dtype)

    # -- timing --------------------------------------------------------------------------
    def _timed(self, name: str, target: Any, args: tuple, kwargs: dict) -> tuple[Any, float, int]:
        """Result of the first run, time in ms (module docstring), workspace bytes (CUDA only;
        on CPU the first run's scratch is measured by `self.scratch` under ``name``)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            base_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        with self.scratch.op(name):
            result = target(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(self.device)
        times_ms = [(time.perf_counter() - started) * 1e3]
        workspace_bytes = 0
        if cuda:
            high_water = torch.cuda.max_memory_allocated(self.device) - base_bytes
            workspace_bytes = max(0, high_water - (torch.cuda.memory_allocated(self.device) - base_bytes))
        # an in-place op (a gradient summed into its buffer) is timed again on copies, so
        # the repeats leave the value the step goes on with as its first run made it
        mutates = isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable
        for _ in range(self.repeats - 1):
            if mutates:
                args = (args[0].clone(), *args[1:])
            if cuda:
                start_event = torch.cuda.Event(enable_timing=True)
                end_event = torch.cuda.Event(enable_timing=True)
                start_event.record()
                target(*args, **kwargs)
                end_event.record()
                end_event.synchronize()
                times_ms.append(start_event.elapsed_time(end_event))
            else:
                started = time.perf_counter()
                target(*args, **kwargs)
                times_ms.append((time.perf_counter() - started) * 1e3)
            if sum(times_ms[1:]) >= ENOUGH_TIMED_MS:
                break
        if len(times_ms) > 1:
            times_ms = times_ms[1:]   # the first run pays for warm-up
        return result, (statistics.median(times_ms) if cuda else min(times_ms)), workspace_bytes

    # -- the walk ------------------------------------------------------------------------
    def run(self, arguments: list[torch.Tensor], progress: bool | None = None) -> "GraphBuilder":
        nodes = list(self.step.joint.graph.nodes)
        if progress is None:
            progress = sys.stderr.isatty()
        bar = Progress(TextColumn(f"memsched: {self.activity} {{task.total}} nodes"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not progress)
        remaining_users = {node: len(node.users) for node in nodes}
        env: dict[str, Any] = {}
        argument_iter = iter(arguments)

        def release(node: fx.Node) -> None:
            for source in node.all_input_nodes:
                remaining_users[source] -= 1
                if remaining_users[source] == 0 and source.op != "placeholder":
                    env.pop(source.name, None)

        with bar, (self.scratch if self.measures_scratch else contextlib.nullcontext()):
            task = bar.add_task("profile", total=len(nodes))
            for node in nodes:
                self._visit(node, env, argument_iter, release)
                bar.advance(task)
        scratch_bytes = self.scratch.scratch_bytes()
        self.ops = [dataclasses.replace(op, tmp_bytes=op.tmp_bytes + scratch_bytes[op.name])
                    if op.name in scratch_bytes else op for op in self.ops]
        return self

    def _visit(self, node: fx.Node, env: dict[str, Any], argument_iter: Iterator[torch.Tensor],
               release: Callable[[fx.Node], None]) -> None:
        step, role = self.step, self.step.roles.get(node.name)
        if node.op == "placeholder":
            env[node.name] = next(argument_iter)
            self.values.append(self._describe(node.name, env[node.name], _PLACEHOLDER_KINDS[role], None))
            self.placeholders.append(node.name)
        elif node.op == "get_attr":
            env[node.name] = getattr(step.joint, node.target)
            self.values.append(self._describe(node.name, env[node.name], ValueKind.BUFFER, None))
            self.placeholders.append(node.name)
        elif node.op == "call_function" and node.target is not operator.getitem:   # getitems: with their producer
            self._run_op(node, role, env)
            release(node)
        elif node.op == "output":
            outputs = node.args[0]
            tensor_outputs = outputs[:step.num_tensor_outputs]
            self.forward_outputs = list(dict.fromkeys(o.name for o in tensor_outputs if isinstance(o, fx.Node)))
            self.gradients = list(dict.fromkeys(g.name for g in outputs[step.num_tensor_outputs:]
                                                if isinstance(g, fx.Node)))

    def _run_op(self, node: fx.Node, role: Role, env: dict[str, Any]) -> None:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n.name])
        try:
            result, time_ms, workspace_bytes = self._timed(node.name, node.target, args, kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            # the traced kernels' shape and dtype rules are looser than the real ones
            # (a Long input into a Float matmul traces): the model fails on these inputs
            where = self.step.modules.get(node.name, "") or self.step.model_name or "the model"
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            inputs = [leaf for leaf in self.step.input_leaves if isinstance(leaf, torch.Tensor)]
            raise ModelInputError(
                f"{where!r} fails on the example inputs {describe_tensors(inputs)} in {node.target} "
                f"({node.name}): {type(error).__name__}: {text}; give example inputs with the shapes and dtypes of a training "
                "batch") from error
        phase = Phase.BACKWARD if role is Role.BACKWARD else Phase.FORWARD
        kind = ValueKind.GRADIENT_WORK if phase is Phase.BACKWARD else ValueKind.ACTIVATION
        getitems = {user.args[1]: user for user in node.users if user.target is operator.getitem}
        outputs: list[str] = []
        if isinstance(result, (tuple, list)):
            for index, item in enumerate(result):
                if index in getitems:
                    user = getitems[index]
                    env[user.name] = item
                    self.values.append(self._describe(user.name, item, kind, node.name))
                    outputs.append(user.name)
                elif isinstance(item, torch.Tensor) and self._owner(item) is None:
                    workspace_bytes += item.untyped_storage().nbytes()   # computed, never read
        else:
            env[node.name] = result
            self.values.append(self._describe(node.name, result, kind, node.name))
            outputs.append(node.name)
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes))
        self.ops.append(Op(name=node.name, inputs=inputs, outputs=tuple(outputs), phase=phase, time_ms=time_ms,
                           tmp_bytes=int(workspace_bytes),
                           recomputable=role is not Role.BUFFER_UPDATE
                           and not any(self.root_of.get(name) in self.updated_in_place for name in inputs),
                           random=is_random(node.target, node.args, node.kwargs), target=target_name(node.target),
                           module=self.step.modules.get(node.name, "")))


class FakeGraphBuilder(GraphBuilder):
    """`GraphBuilder` over fake tensors (`planner.estimate`, `planner.reuse`): sizes and
    aliases as a real run has them, no scratch measured (nothing really runs). Fake storages
    have no address, so storage identity is the storage object's. Subclasses time ops."""

    def __init__(self, step: CapturedStep, device: torch.device) -> None:
        super().__init__(step, device, repeats=1)
        self.measures_scratch = False

    @staticmethod
    def _storage_key(storage: torch.UntypedStorage) -> int:
        return storage._cdata


def target_name(target: Any) -> str:
    """How `solvers.Op.target` names an FX node's target (``"aten.mm.default"``)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))
