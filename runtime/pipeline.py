"""Pipeline stages: the captured forward cut into one module per rank, run on
``torch.distributed.pipelining``.

The joint graph's forward nodes are assigned to stages (by `solvers.pipeline`, along its
chain of segments). For each stage this module builds

* a *stage forward*: an ``nn.Module`` whose ``forward(*received)`` is the stage's slice of
  the captured aten forward, reading the ORIGINAL parameters and buffers (registered on it
  under positional names, the same objects, so gradients land in the user's model);
* the *cut*: which values cross from stage ``s - 1`` to stage ``s``: every forward value
  (or model input) defined before the cut and read at or after it, and every model output
  defined before the last stage. A value that skips a stage (a U-Net long skip, an
  attention mask) is passed through the stages in between, because a pipeline stage only
  talks to its neighbours.

A stage forward is an ordinary model: `planner.api.optimize` traces, profiles and plans it
alone (its own recompute/offload plan under its own budget), and `PipelineStageModule`
runs that plan and adds the pass-through values. Autograd sums the gradient of a
pass-through value with the stage's own contribution, so the backward of a skip is exact.

`PipelineRunner` wraps one rank's stage module in ``PipelineStage`` and a ``ScheduleGPipe``
or ``Schedule1F1B``; ``step(*inputs, target=...)`` runs one training step of ``M``
micro-batches and returns the mean micro-batch loss on every rank. Gradients are the
micro-batch gradients averaged (the schedule's ``scale_grads``), which equals the
full-batch gradient for a mean-reduced loss. A parameter read by several stages (tied
embeddings) gets its gradient summed over the ranks after the step.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree

from runtime.step import CapturedStep, Role
from solvers.errors import PlanMismatchError
from solvers.pipeline_cost import check_schedule


@dataclass(frozen=True)
class StageSlice:
    """What stage ``index`` computes and exchanges, in joint-graph node names.

    ``received``: values arriving from the previous stage (model inputs for stage 0), in
    order; ``sent``: values handed to the next stage (empty for the last stage), in order;
    ``computed``: the subset of ``sent`` (or of the model outputs, on the last stage) that
    this stage's nodes produce; the rest of ``sent`` passes through.
    """

    index: int
    nodes: tuple[str, ...]
    received: tuple[str, ...]
    sent: tuple[str, ...]
    computed: tuple[str, ...]
    params: tuple[str, ...]     # joint placeholders of parameters the stage reads
    buffers: tuple[str, ...]


def _is_detach(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.detach.default


def canonical_sources(step: CapturedStep) -> dict[str, str]:
    """Node -> the node it stands for: a ``detach`` (the trace detaches the parameters and
    inputs it differentiates, and values autograd saves) is its source, so a stage reads
    the parameter itself and autograd sees through it; every other node is itself."""
    canonical: dict[str, str] = {}
    for node in step.joint.graph.nodes:
        canonical[node.name] = canonical[node.args[0].name] if _is_detach(node) else node.name
    return canonical


def node_stages(step: CapturedStep, stage_of_op: Mapping[str, int]) -> dict[str, int]:
    """Forward node -> stage: ops from ``stage_of_op`` and an op's getitems with it;
    ``detach`` nodes have none (`canonical_sources`)."""
    result: dict[str, int] = {}
    nodes = list(step.joint.graph.nodes)
    for node in nodes:
        if (step.roles.get(node.name) not in (Role.FORWARD, Role.BUFFER_UPDATE) or node.op != "call_function"
                or _is_detach(node)):
            continue
        if node.target is operator.getitem:
            result[node.name] = result[node.args[0].name]
        elif node.name in stage_of_op:
            result[node.name] = stage_of_op[node.name]
        else:
            raise PlanMismatchError(f"forward node {node.name!r} has no stage in the pipeline plan; the plan was made "
                             "for another graph: re-plan with optimize(..., stages=K)")
    # A buffer update (the copy_ that functionalization puts at the end of the forward)
    # runs where its new value is computed, so buffer state never travels between stages.
    canonical = canonical_sources(step)
    for node in nodes:
        if step.roles.get(node.name) is Role.BUFFER_UPDATE and isinstance(node.args[1], fx.Node):
            source = canonical[node.args[1].name]
            if source in result:
                result[node.name] = result[source]
    return result


def slice_stages(step: CapturedStep, stage_of_op: Mapping[str, int], num_stages: int) -> list[StageSlice]:
    """Cut the captured forward into ``num_stages`` slices (module docstring). O(nodes + edges)."""
    stage_of = node_stages(step, stage_of_op)
    canonical = canonical_sources(step)
    nodes = list(step.joint.graph.nodes)
    inputs = [n.name for n in nodes if n.op == "placeholder" and step.roles[n.name] is Role.INPUT]
    output_node = next(n for n in reversed(nodes) if n.op == "output")
    model_outputs = [canonical[n.name] if isinstance(n, fx.Node) else None
                     for n in output_node.args[0][:step.num_tensor_outputs]]
    defined_at = {name: -1 for name in inputs}
    defined_at.update(stage_of)
    last_read: dict[str, int] = {}
    for node in nodes:
        if node.name not in stage_of:
            continue
        for source in node.all_input_nodes:
            name = canonical[source.name]
            if name in defined_at:
                last_read[name] = max(last_read.get(name, -1), stage_of[node.name])
    for name in model_outputs:
        if name is not None:
            last_read[name] = num_stages   # the last stage returns it
    order = {node.name: i for i, node in enumerate(nodes)}
    node_by_name = {node.name: node for node in nodes}

    def crossing(cut: int) -> tuple[str, ...]:
        """Values defined before stage ``cut`` and read at or after it."""
        names = [name for name, stage in defined_at.items()
                 if stage < cut and last_read.get(name, -1) >= cut]
        return tuple(sorted(names, key=order.__getitem__))

    slices = []
    for index in range(num_stages):
        own = tuple(node.name for node in nodes if stage_of.get(node.name) == index)
        received = tuple(inputs) if index == 0 else crossing(index)
        if index == num_stages - 1:
            sent = ()
            computed = tuple(dict.fromkeys(name for name in model_outputs
                                           if name is not None and stage_of.get(name) == index))
        else:
            sent = crossing(index + 1)
            computed = tuple(name for name in sent if stage_of.get(name) == index)
        reads: set[str] = set()
        for name in own:
            reads.update(canonical[source.name] for source in node_by_name[name].all_input_nodes)
        params = tuple(n.name for n in nodes if n.op == "placeholder" and step.roles[n.name] is Role.PARAMETER
                       and n.name in reads)
        buffers = tuple(n.name for n in nodes if n.op == "placeholder" and step.roles[n.name] is Role.BUFFER
                        and n.name in reads)
        slices.append(StageSlice(index, own, received, sent, computed, params, buffers))
    return slices


class StageForward(torch.nn.Module):
    """The forward of one stage as a model of its own, over the original parameters.

    ``forward(*used)`` takes the received values the stage's nodes read (`used_inputs`,
    in order) and returns the tuple of ``computed`` values.
    """

    def __init__(self, model: torch.nn.Module, step: CapturedStep, stage: StageSlice) -> None:
        super().__init__()
        names = dict(zip(step.placeholder_names, step.param_names + step.buffer_names))
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.param_names = [names[p] for p in stage.params]      # names in the user's model
        self.buffer_names = [names[b] for b in stage.buffers]
        for i, name in enumerate(self.param_names):
            self.register_parameter(f"p{i}", params[name])
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"b{i}", buffers[name])
        node_by_name = {node.name: node for node in step.joint.graph.nodes}
        canonical = canonical_sources(step)
        own = set(stage.nodes)
        read = {canonical[source.name] for name in stage.nodes for source in node_by_name[name].all_input_nodes}
        self.used_inputs = tuple(name for name in stage.received if name in read)
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        for name in stage.params + stage.buffers + self.used_inputs:
            env[name] = graph.placeholder(name)
            env[name].meta = dict(node_by_name[name].meta)
        for node in step.joint.graph.nodes:
            if node.name in own:
                env[node.name] = graph.node_copy(node, lambda source: env[canonical[source.name]])
        graph.output(tuple(env[name] for name in stage.computed))
        self.program = fx.GraphModule(torch.nn.Module(), graph, class_name=f"Stage{stage.index}Forward")
        self.stage_index = stage.index

    def forward(self, *used: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = [getattr(self, f"p{i}") for i in range(len(self.param_names))]
        buffers = [getattr(self, f"b{i}") for i in range(len(self.buffer_names))]
        return tuple(self.program(*params, *buffers, *used))


class PipelineStageModule(torch.nn.Module):
    """What ``PipelineStage`` runs on one rank: the stage forward (optimized or not) plus
    the pass-through values; the last stage returns the model's output structure."""

    def __init__(self, step: CapturedStep, stage: StageSlice, forward: StageForward, executor: torch.nn.Module,
                 is_last: bool) -> None:
        super().__init__()
        self.executor = executor   # StageForward, or the ScheduledModule running its plan
        self._received = stage.received
        self._used = [stage.received.index(name) for name in forward.used_inputs]
        computed = {name: i for i, name in enumerate(stage.computed)}
        received = {name: i for i, name in enumerate(stage.received)}
        if is_last:
            output_node = next(n for n in reversed(step.joint.graph.nodes) if n.op == "output")
            wanted = [n.name for n in output_node.args[0][:step.num_tensor_outputs]]
        else:
            wanted = list(stage.sent)
        # (from computed?, index) per output
        self._layout = [(True, computed[name]) if name in computed else (False, received[name]) for name in wanted]
        self._is_last = is_last
        self._output_leaves = step.output_leaves
        self._output_spec = step.output_spec

    def forward(self, *received: torch.Tensor) -> Any:
        computes = any(from_computed for from_computed, _ in self._layout)
        computed = self.executor(*(received[i] for i in self._used)) if computes else ()
        values = [computed[i] if from_computed else received[i] for from_computed, i in self._layout]
        if not self._is_last:
            return tuple(values)
        tensors = iter(values)
        leaves = [next(tensors) if leaf.is_tensor else leaf.constant for leaf in self._output_leaves]
        return pytree.tree_unflatten(leaves, self._output_spec)


def shared_parameters(slices: Sequence[StageSlice], step: CapturedStep) -> list[str]:
    """Model parameter names read by more than one stage (tied weights), in model order."""
    names = dict(zip(step.placeholder_names, step.param_names))
    counts: dict[str, int] = {}
    for stage in slices:
        for placeholder in stage.params:
            counts[names[placeholder]] = counts.get(names[placeholder], 0) + 1
    return [name for name in step.param_names if counts.get(name, 0) > 1]


def example_stage_inputs(model: torch.nn.Module, step: CapturedStep, slices: Sequence[StageSlice],
                         microbatch: Sequence[torch.Tensor], upto: int) -> list[tuple[torch.Tensor, ...]]:
    """Real values received by stages ``0..upto`` for one micro-batch, by running the
    stage forwards in order without gradients and with the RNG restored (for profiling
    and for the receive buffers' shapes)."""
    forwards = [StageForward(model, step, stage) for stage in slices[:upto + 1]]
    received: list[tuple[torch.Tensor, ...]] = [tuple(microbatch)]
    devices = [t.device for t in microbatch if t.device.type == "cuda"]
    with torch.no_grad(), torch.random.fork_rng(devices=devices), preserved_buffers(model):
        for index in range(upto):
            module = PipelineStageModule(step, slices[index], forwards[index], forwards[index], is_last=False)
            values = module(*received[-1])
            # a pipeline stage receives floating tensors as leaves that require grad
            received.append(tuple(v.detach().requires_grad_(v.is_floating_point()) for v in values))
    return received


@contextlib.contextmanager
def preserved_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Run example forwards without leaving a trace in the buffers (BatchNorm statistics)."""
    saved = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class PipelineRunner:
    """One rank's stage on ``torch.distributed.pipelining``: ``step`` runs one training step."""

    def __init__(self, stage_module: PipelineStageModule, stage_index: int, num_stages: int,
                 microbatches: int, schedule: str, device: torch.device, loss_fn: Callable[..., torch.Tensor],
                 example_inputs: tuple[torch.Tensor, ...], example_outputs: tuple[torch.Tensor, ...],
                 shared_params: Sequence[torch.nn.Parameter] = (), group: Any = None) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        check_schedule(schedule)
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.microbatches = microbatches
        self.module = stage_module
        self.device = device
        self.group = group
        self._shared = list(shared_params)
        self.stage = PipelineStage(stage_module, stage_index, num_stages, device,
                                   input_args=example_inputs, output_args=example_outputs, group=group)
        schedule_class = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = schedule_class(self.stage, microbatches, loss_fn=loss_fn)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def receive_buffers(self) -> list[torch.Tensor]:
        """The activation and gradient receive buffers ``PipelineStage`` preallocates (one
        per micro-batch), for memory accounting; empty before the first step."""
        buffers = []
        for infos in list(self.stage.args_recv_info.values()) + list(self.stage.grad_recv_info.values()):
            for info in infos:
                buffer = getattr(info, "buffer", None)
                if isinstance(buffer, torch.Tensor):
                    buffers.append(buffer)
        return buffers

    def step(self, *inputs: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """One training step over ``inputs`` (the whole batch, split into micro-batches on
        dim 0); every rank calls it, the first with the inputs and the last with the
        target (others may pass them too: they are ignored). Returns the mean micro-batch
        loss on every rank."""
        losses: list[torch.Tensor] = []
        args = inputs if self.is_first else ()
        if self.is_last:
            if target is None:   # the model returns its own loss: the schedule still splits a target
                target = torch.zeros(self.microbatches, device=self.device)
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.step(*args)
        loss = (torch.stack([l.detach() for l in losses]).mean() if losses
                else torch.zeros((), device=self.device))
        self._reduce_shared()
        dist.broadcast(loss, src=dist.get_global_rank(self.group, self.num_stages - 1)
                       if self.group is not None else self.num_stages - 1, group=self.group)
        return loss

    def _reduce_shared(self) -> None:
        """Sum the gradients of parameters several stages read (tied weights)."""
        for param in self._shared:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad, group=self.group)
            if param.grad is not None:
                param.grad = grad
