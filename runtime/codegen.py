"""FX code generation of a `Plan`: one GraphModule for the forward phase, one for the
backward phase, each a straight-line program of aten calls in the plan's order.

    forward(params..., buffers..., inputs...)  -> (outputs..., saved..., rng states...)
    backward([saved..., rng states..., tangents...]) -> (grads...)   # boxed: the list is cleared

Freeing is FX's own: generated code drops each variable after its last use, which is
where the plan's ``free`` steps stand (the schedule builder frees at last use). The
backward takes its inputs as one list that it clears ("boxed" calling convention), so a
saved activation dies at its last use in the backward instead of when the step ends.

A run of a forward op in the backward is a recomputation: it becomes a new FX node, and a
random op is wrapped in `runtime.rng.run_with_rng_state` with the state the forward saved.

Offload and prefetch steps call `runtime.offload` (its docstring has the semantics):

    offload(v)          host_v = offload_to_host(v)
    free(v) after it    release_after_offload(host_v)   # the storage goes once the copy ended
    prefetch(v)         v = prefetch_to_device(host_v)  # a new device tensor, bound to v
    first read of v     wait_prefetched(host_v)

A host copy the backward prefetches before making its own is handed over like a saved
value (after the saved values); the device value is handed over only if the backward
reads it before prefetching it, so an offloaded value the forward frees dies there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx
from torch.fx.graph import _BoxedCodeGen

from runtime.step import RERUN_TARGETS, CapturedStep, Role
from runtime import offload, rng
from solvers.errors import InvalidPlanError, PlanMismatchError
from solvers.graph import Graph, Phase
from solvers.plan import Plan, Step, StepKind
from solvers.simulate import replayed_random_ops


@dataclass
class Programs:
    forward: fx.GraphModule
    backward: fx.GraphModule
    num_outputs: int         # tensor outputs the forward returns first
    saved_names: list[str]   # values the forward hands to the backward (after the outputs)
    host_copy_names: list[str]   # values whose host copies the forward hands over (after the saved values)
    rng_ops: list[str]       # random ops whose generator state the forward saves (after the host copies)
    gradient_slots: list[int | None]   # for each joint gradient output: index into backward's result, or None


def generate(step: CapturedStep, graph: Graph, plan: Plan, device_type: str) -> Programs:
    """Build the forward and backward GraphModules that execute ``plan``."""
    if plan.graph_hash != graph.hash:
        raise PlanMismatchError(f"plan for graph {plan.graph_hash} cannot run graph {graph.hash}; re-plan this model")
    joint_nodes = {node.name: node for node in step.joint.graph.nodes}
    getitem_of = {}   # value name -> (producer node name, index)
    for node in step.joint.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            getitem_of[node.name] = (node.args[0].name, node.args[1])
    output_node = next(n for n in reversed(step.joint.graph.nodes) if n.op == "output")
    joint_outputs = list(output_node.args[0])
    num_outputs = step.num_tensor_outputs

    rng_ops = replayed_random_ops(graph, plan)
    saved_names = _backward_reads_from_forward(graph, plan)
    host_copy_names = _backward_host_copies_from_forward(plan)

    # -- forward ---------------------------------------------------------------------------
    forward_graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    rng_nodes: dict[str, fx.Node] = {}
    for node in step.joint.graph.nodes:
        if node.op == "placeholder" and step.roles[node.name] is not Role.TANGENT:
            env[node.name] = forward_graph.placeholder(node.name)
        elif node.op == "get_attr":
            env[node.name] = forward_graph.get_attr(node.target)
    runs_so_far: set[str] = set()
    forward_transfers = _Transfers(forward_graph, env)
    for plan_step in plan.forward:
        if plan_step.kind is not StepKind.RUN:
            forward_transfers.emit(plan_step, plan)
            continue
        forward_transfers.before_run(graph.op(plan_step.name).outputs, graph.op(plan_step.name).inputs)
        rerun = plan_step.name in runs_so_far
        if plan_step.name in rng_ops and not rerun:
            rng_nodes[plan_step.name] = forward_graph.call_function(rng.save_rng_state, (device_type,))
        _emit(forward_graph, joint_nodes[plan_step.name], env, getitem_of, graph,
              replay_state=rng_nodes.get(plan_step.name) if rerun else None, device_type=device_type, rerun=rerun)
        runs_so_far.add(plan_step.name)
    forward_results = [env[n.name] for n in joint_outputs[:num_outputs]]
    forward_results += [env[name] for name in saved_names]
    for name in host_copy_names:
        if name not in forward_transfers.host:
            raise InvalidPlanError(f"plan by {plan.solver!r} prefetches {name!r} in the backward, "
                                   "but no host copy of it was made (offload it first)")
        forward_results.append(forward_transfers.host[name])
    forward_results += [rng_nodes[name] for name in rng_ops]
    forward_graph.output(tuple(forward_results))

    # -- backward --------------------------------------------------------------------------
    backward_graph = fx.Graph()
    backward_graph.set_codegen(_BoxedCodeGen())
    env = {}
    for name in saved_names:
        env[name] = backward_graph.placeholder(name)
        # what the saved value is (dtype, device), as on the node that made it
        env[name].meta = {key: joint_nodes[name].meta[key] for key in ("val", "tensor_meta")
                          if name in joint_nodes and key in joint_nodes[name].meta}
    host_copies = {name: backward_graph.placeholder(f"host_{name}") for name in host_copy_names}
    replay_states = {name: backward_graph.placeholder(f"rng_state_{name}") for name in rng_ops}
    for node in step.joint.graph.nodes:
        if node.op == "placeholder" and step.roles[node.name] is Role.TANGENT:
            env[node.name] = backward_graph.placeholder(node.name)
        elif node.op == "get_attr":
            env[node.name] = backward_graph.get_attr(node.target)
    # a handed-over host copy may still hold its device value (kept too): the backward's free waits
    backward_transfers = _Transfers(backward_graph, env, host=host_copies,
                                    offloading={name: node for name, node in host_copies.items()
                                                if name in forward_transfers.offloading})
    for plan_step in plan.backward:
        if plan_step.kind is not StepKind.RUN:
            backward_transfers.emit(plan_step, plan)
            continue
        op = graph.op(plan_step.name)
        backward_transfers.before_run(op.outputs, op.inputs)
        state = replay_states.get(op.name) if op.phase is Phase.FORWARD else None
        _emit(backward_graph, joint_nodes[op.name], env, getitem_of, graph, replay_state=state,
              device_type=device_type, rerun=op.phase is Phase.FORWARD)
    gradient_slots: list[int | None] = []
    gradient_results: list[fx.Node] = []
    for item in joint_outputs[num_outputs:]:
        if isinstance(item, fx.Node):
            if item.name not in env:
                raise InvalidPlanError(f"plan by {plan.solver!r} never computes gradient {item.name!r}")
            gradient_slots.append(len(gradient_results))
            gradient_results.append(env[item.name])
        else:
            gradient_slots.append(None)
    backward_graph.output(tuple(gradient_results))

    forward_module = fx.GraphModule(step.joint, forward_graph, class_name="ScheduledForward")
    backward_module = fx.GraphModule(step.joint, backward_graph, class_name="ScheduledBackward")
    return Programs(forward=forward_module, backward=backward_module, num_outputs=num_outputs,
                    saved_names=saved_names, host_copy_names=host_copy_names, rng_ops=rng_ops,
                    gradient_slots=gradient_slots)


class _Transfers:
    """Emits one phase's offload / prefetch / free steps into ``target_graph``.

    ``host`` maps a value to the node of its latest host copy; ``offloading`` to those
    whose device value the copy still holds (waited for at the value's ``free``);
    ``arriving`` to those whose prefetch compute has not waited for yet (waited for right
    before the first op or offload that reads the value).
    """

    def __init__(self, target_graph: fx.Graph, env: dict[str, fx.Node], host: dict[str, fx.Node] | None = None,
                 offloading: dict[str, fx.Node] | None = None) -> None:
        self.graph = target_graph
        self.env = env
        self.host: dict[str, fx.Node] = dict(host or {})
        self.offloading: dict[str, fx.Node] = dict(offloading or {})
        self.arriving: dict[str, fx.Node] = {}

    def before_run(self, outputs: tuple[str, ...], inputs: tuple[str, ...]) -> None:
        """Wait for the prefetches of the op's inputs; a value the op defines again (the
        plan replaces its previous instance) lets its pending offload go first."""
        self._release(outputs)
        self._wait_arrival(inputs)

    def _wait_arrival(self, names: tuple[str, ...]) -> None:
        for name in dict.fromkeys(names):
            if name in self.arriving:
                self.graph.call_function(offload.wait_prefetched, (self.arriving.pop(name),))

    def _release(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name in self.offloading:
                self.graph.call_function(offload.release_after_offload, (self.offloading.pop(name),))

    def emit(self, plan_step: Step, plan: Plan) -> None:
        name = plan_step.name
        if plan_step.kind is StepKind.OFFLOAD:
            if name not in self.env:
                raise InvalidPlanError(f"plan by {plan.solver!r} offloads {name!r} before it is computed")
            self._wait_arrival((name,))
            self._release((name,))
            node = self.graph.create_node("call_function", offload.offload_to_host, (self.env[name],),
                                          name=f"host_{name}")
            self.host[name] = self.offloading[name] = node
        elif plan_step.kind is StepKind.PREFETCH:
            if name not in self.host:
                raise InvalidPlanError(f"plan by {plan.solver!r} prefetches {name!r}, which has no host copy")
            self._release((name,))
            node = self.graph.create_node("call_function", offload.prefetch_to_device, (self.host[name],), name=name)
            self.env[name] = node
            self.arriving[name] = self.host[name]
        elif plan_step.kind is StepKind.FREE:
            self._release((name,))
            self.arriving.pop(name, None)


def _emit(target_graph: fx.Graph, node: fx.Node, env: dict[str, fx.Node], getitem_of: dict[str, tuple[str, int]],
          graph: Graph, replay_state: fx.Node | None, device_type: str = "cpu", rerun: bool = False) -> None:
    """Append one run of ``node`` and bind its output values in ``env``; a ``rerun`` of an
    op with side effects on its first run uses its `RERUN_TARGETS` variant."""
    def value(arg: fx.Node) -> fx.Node:
        if arg.name not in env:
            raise InvalidPlanError(f"op {node.name!r} reads {arg.name!r}, which the plan has not made available")
        return env[arg.name]

    if replay_state is not None:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        new_node = target_graph.call_function(rng.replaying(node.target, device_type), (replay_state, *args), kwargs)
    elif rerun and node.target in RERUN_TARGETS:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        new_node = target_graph.call_function(RERUN_TARGETS[node.target], args, kwargs)
    else:
        new_node = target_graph.node_copy(node, value)
    new_node.meta = {key: node.meta[key] for key in ("val", "tensor_meta") if key in node.meta}
    outputs = graph.op(node.name).outputs
    if len(outputs) == 1 and outputs[0] == node.name:
        env[node.name] = new_node
        return
    for output_name in outputs:
        _, index = getitem_of[output_name]
        env[output_name] = target_graph.call_function(operator.getitem, (new_node, index))


def _backward_reads_from_forward(graph: Graph, plan: Plan) -> list[str]:
    """Values the backward reads before (re)defining them: the forward must hand them over."""
    defined = {name for name in graph.placeholders if graph.value(name).kind.value == "tangent"}
    needed: dict[str, None] = {}
    for plan_step in plan.backward:
        if plan_step.kind is StepKind.RUN:
            op = graph.op(plan_step.name)
            for name in op.inputs:
                if name not in defined:
                    needed.setdefault(name)
            defined.update(op.outputs)
        elif plan_step.kind is StepKind.PREFETCH:
            defined.add(plan_step.name)
        elif plan_step.kind is StepKind.OFFLOAD and plan_step.name not in defined:
            needed.setdefault(plan_step.name)        # a forward value copied out in the backward
    return list(needed)


def _backward_host_copies_from_forward(plan: Plan) -> list[str]:
    """Values the backward prefetches before offloading them itself: the forward hands
    over their host copies."""
    made: set[str] = set()
    needed: dict[str, None] = {}
    for plan_step in plan.backward:
        if plan_step.kind is StepKind.OFFLOAD:
            made.add(plan_step.name)
        elif plan_step.kind is StepKind.PREFETCH and plan_step.name not in made:
            needed.setdefault(plan_step.name)
    return list(needed)

