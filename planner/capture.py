"""Trace one training step (forward + backward) of an `nn.Module` into one aten-level,
functionalized FX graph: the *joint graph*.

Two passes, both on fake tensors (no real compute, no change to the model):

1. ``make_fx`` traces ``forward`` and ``torch.autograd.grad`` together, so the backward
   formulas appear as aten ops (as AOTAutograd's joint graph does).
2. ``functionalize`` re-traces that graph with views kept as views and in-place updates
   rewritten as pure ops; mutations of buffers (BatchNorm running stats) become one
   trailing ``copy_`` per buffer, which the runtime executes once in the forward.

Placeholders, in order: parameters, buffers, tensor inputs, tangents (one per
differentiable tensor output the backward starts from: see `loss_outputs`). Outputs: the tensor outputs, then the gradients of the
parameters and inputs that require grad (None where the step does not reach them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import operator
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.func import functional_call, functionalize

from planner.errors import ModelInputError, UnsupportedModelError
from runtime.step import (RERUN_TARGETS, CapturedStep, OutputLeaf, Role,  # noqa: F401 - re-exported
                          input_signature, is_random, random_fill_like)

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Functionalization turns an in-place random fill (``x.bernoulli_(p)``) into its functional
# form, which returns a contiguous tensor; on a permuted layout the same random stream then
# lands on other elements than in eager mode. These fills ignore the values of ``x``, so
# they are run the eager way: fill a fresh tensor laid out like ``x``.
_IN_PLACE_RANDOM = {
    aten.bernoulli.p: aten.bernoulli_.float,
    aten.bernoulli.Tensor: aten.bernoulli_.Tensor,
    aten.uniform.default: aten.uniform_.default,
    aten.normal_functional.default: aten.normal_.default,
    aten.exponential.default: aten.exponential_.default,
    aten.random.default: aten.random_.default,
    getattr(aten.random, "from"): getattr(aten.random_, "from"),
    aten.random.to: aten.random_.to,
}


def capture(model: torch.nn.Module, example_inputs: Sequence[Any],
            example_kwargs: Mapping[str, Any] | None = None, *, backward_from: str = "auto") -> CapturedStep:
    """Trace ``model``'s training step on ``example_inputs`` into a joint FX graph.

    ``backward_from`` says which outputs the backward starts from (`loss_outputs`):
    ``"auto"`` the scalar ones when the model returns its loss, else every differentiable
    output; ``"all"`` every differentiable output.

    The model, its parameters, buffers and the global RNG are left as they were.

    Raises:
        UnsupportedModelError: naming the submodule being run when tracing failed and
            the way out (data-dependent control flow, ``.item()``, unsupported ops).
    """
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    example_kwargs = dict(example_kwargs or {})
    input_leaves, input_spec = pytree.tree_flatten((tuple(example_inputs), example_kwargs))
    tensor_positions = [i for i, leaf in enumerate(input_leaves) if isinstance(leaf, torch.Tensor)]
    named_params = list(model.named_parameters())
    named_buffers = list(model.named_buffers())
    sharded = next((name for name, tensor in named_params + named_buffers if is_dtensor(tensor)), None)
    if sharded is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {sharded!r} is a DTensor (sharded by FSDP2's fully_shard or tensor "
            "parallelism), and memsched plans modules with plain tensors: for FSDP2, plan each block before "
            "sharding with planner.fsdp.optimize_blocks(model, budget, example_inputs, blocks=model.blocks), then "
            "fully_shard each optimized block and the root")
    param_names = [name for name, _ in named_params]
    buffer_names = [name for name, _ in named_buffers]
    params = [p for _, p in named_params]
    buffers = [b for _, b in named_buffers]
    tensor_inputs = [input_leaves[i] for i in tensor_positions]
    grad_param_positions = [i for i, p in enumerate(params) if p.requires_grad]
    grad_input_positions = [i for i, t in enumerate(tensor_inputs) if t.requires_grad]
    if not grad_param_positions and not grad_input_positions:
        raise UnsupportedModelError(f"{type(model).__name__}: no parameter or input requires grad, so there is "
                                    "no training step to optimize; call the model under torch.no_grad() instead")

    def call_model(param_values, buffer_values, tensor_values):
        leaves = list(input_leaves)
        for position, value in zip(tensor_positions, tensor_values):
            leaves[position] = value
        args, kwargs = pytree.tree_unflatten(leaves, input_spec)
        state = {**dict(zip(param_names, param_values)), **dict(zip(buffer_names, buffer_values))}
        return functional_call(model, state, args, kwargs, strict=True)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    shims = _library_shims(example_kwargs)
    with _restore_module_state(model), shims():
        output_leaves, output_spec = _infer_outputs(model, fake_mode, call_model, params, buffers, tensor_inputs)
    output_leaves = loss_outputs(output_leaves, backward_from)
    tangent_count = sum(leaf.tangent for leaf in output_leaves)
    n_params, n_buffers, n_inputs = len(params), len(buffers), len(tensor_inputs)

    def joint(*flat: torch.Tensor):
        param_values = list(flat[:n_params])
        buffer_values = list(flat[n_params:n_params + n_buffers])
        tensor_values = list(flat[n_params + n_buffers:n_params + n_buffers + n_inputs])
        tangents = list(flat[n_params + n_buffers + n_inputs:])
        param_values = [p.detach().requires_grad_(p.requires_grad) for p in param_values]
        tensor_values = [t.detach().requires_grad_(t.requires_grad) for t in tensor_values]
        with torch.enable_grad():
            outputs = pytree.tree_leaves(call_model(param_values, buffer_values, tensor_values))
            differentiable = [o for o, leaf in zip(outputs, output_leaves) if leaf.tangent]
            wrt = [param_values[i] for i in grad_param_positions] + [tensor_values[i] for i in grad_input_positions]
            grads = torch.autograd.grad(differentiable, wrt, tangents, allow_unused=True)
        return tuple(o for o in outputs if isinstance(o, torch.Tensor)) + tuple(grads)

    scopes: list[tuple[int, str]] = []
    with _restore_module_state(model), shims(), fake_mode, _tracing_errors(model, scopes):
        fake_flat = [fake_tensor(fake_mode, t) for t in params + buffers + tensor_inputs]
        fake_flat += [torch.empty(leaf.shape, dtype=leaf.dtype, device=leaf.device)
                      for leaf in output_leaves if leaf.tangent]
        autograd_graph = make_fx(joint)(*fake_flat)
        functional = make_fx(functionalize(_meta_preserving_runner(autograd_graph), remove="mutations"))(*fake_flat)
    _eliminate_dead_code(functional)
    _random_fills_in_eager_layout(functional)
    masks = _dropout_masks_in_one_byte(functional)
    modules = _module_paths(autograd_graph, functional, scopes, type(model).__name__)
    placeholders = [n for n in functional.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == n_params + n_buffers + n_inputs + tangent_count
    roles = _assign_roles(functional, n_params, n_buffers, n_inputs, num_tensor_outputs=sum(
        leaf.is_tensor for leaf in output_leaves))
    _dropout_noise_made_in_backward(functional, masks, roles, modules)
    _accumulate_gradients_in_place(functional, roles, modules)
    buffer_updates = {}
    for node in functional.graph.nodes:
        if roles.get(node.name) is Role.BUFFER_UPDATE:
            position = placeholders.index(node.args[0]) - n_params
            if not 0 <= position < n_buffers:
                what = "a parameter" if position < 0 else "its input"
                where = modules.get(node.args[1].name) if isinstance(node.args[1], fx.Node) else ""
                raise UnsupportedModelError(
                    f"cannot trace {where or type(model).__name__!r}: it modifies {what} in place, which a "
                    "training step cannot replay; clone it first (x = x.clone()) or keep the state in a buffer")
            buffer_updates[node.name] = buffer_names[position]
    log.info("captured %s: %d nodes (%d forward, %d backward)", type(model).__name__, len(functional.graph.nodes),
             sum(r is Role.FORWARD for r in roles.values()), sum(r is Role.BACKWARD for r in roles.values()))
    return CapturedStep(joint=functional, param_names=param_names, buffer_names=buffer_names,
                        input_spec=input_spec, input_leaves=input_leaves, tensor_input_positions=tensor_positions,
                        output_spec=output_spec, output_leaves=output_leaves,
                        grad_param_positions=grad_param_positions, grad_input_positions=grad_input_positions,
                        roles=roles, buffer_updates=buffer_updates, training=model.training,
                        input_signature=input_signature(input_leaves),
                        placeholder_names=[p.name for p in placeholders], modules=modules,
                        model_name=type(model).__name__, param_requires_grad=[p.requires_grad for p in params])


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Is this a ``torch.distributed.tensor.DTensor`` (an FSDP2 or tensor-parallel shard)?"""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def loss_outputs(leaves: list[OutputLeaf], backward_from: str) -> list[OutputLeaf]:
    """Mark the outputs whose gradients the traced backward takes.

    A model that returns its loss beside other tensors (``loss`` and ``logits``) is trained
    from the loss alone; a tangent for the logits would be a logits-sized placeholder and a
    logits-sized sum in the backward that eager autograd never makes, since it builds no
    gradient for an output the loss does not use. So with ``"auto"``, when some
    differentiable output is a scalar, only the scalar outputs get tangents; the others
    stay differentiable outputs, and a gradient that reaches one of them at run time is
    refused with the fix (``backward_from="all"``), never dropped.
    """
    if backward_from not in ("auto", "all"):
        raise UnsupportedModelError(f"backward_from={backward_from!r}: choose 'auto' (the scalar loss outputs when "
                                    "the model returns its loss) or 'all' (every differentiable output)")
    scalars = [leaf.differentiable and leaf.shape == () for leaf in leaves]
    only_scalars = backward_from == "auto" and any(scalars)
    return [dataclasses.replace(leaf, tangent=leaf.differentiable and (scalar or not only_scalars))
            for leaf, scalar in zip(leaves, scalars)]


def fake_tensor(fake_mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a fake tensor of ``fake_mode`` (no data is read or allocated). A tensor on
    the meta device (a model built under ``torch.device("meta")``, `planner.estimate`) becomes
    a CPU fake tensor of its shape, strides and dtype, so the step traces to CPU's kernels,
    as it would with real weights on the CPU."""
    if tensor.device.type != "meta":
        return fake_mode.from_tensor(tensor)
    with fake_mode:
        fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device="cpu")
    return fake.requires_grad_(tensor.requires_grad)


def _meta_preserving_runner(graph_module: fx.GraphModule):
    """Run an FX graph node by node so that the re-trace keeps each node's module path."""

    def run(*args: Any) -> Any:
        with torch.fx.traceback.preserve_node_meta():
            return fx.Interpreter(graph_module).run(*args)

    return run


def _infer_outputs(model, fake_mode, call_model, params, buffers, tensor_inputs):
    """Run the model once on fake tensors to learn its output structure."""
    with fake_mode, _tracing_errors(model, inputs=tensor_inputs):
        fake_params = [fake_tensor(fake_mode, p) for p in params]
        fake_buffers = [fake_tensor(fake_mode, b) for b in buffers]
        fake_inputs = [fake_tensor(fake_mode, t) for t in tensor_inputs]
        with torch.enable_grad():
            fake_params = [p.detach().requires_grad_(p.requires_grad) for p in fake_params]
            fake_inputs = [t.detach().requires_grad_(t.requires_grad) for t in fake_inputs]
            output = call_model(fake_params, fake_buffers, fake_inputs)
    _register_dataclasses(output)
    leaves, spec = pytree.tree_flatten(output)
    result = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            result.append(OutputLeaf(is_tensor=True, differentiable=leaf.requires_grad and leaf.dtype.is_floating_point,
                                     shape=tuple(leaf.shape), dtype=leaf.dtype, device=leaf.device))
        else:
            result.append(OutputLeaf(is_tensor=False, constant=leaf))
    if not any(leaf.differentiable for leaf in result):
        raise UnsupportedModelError(f"{type(model).__name__}: no output depends on a parameter that requires grad; "
                                    "nothing to differentiate")
    return result, spec


def _register_dataclasses(output: Any) -> None:
    """Let pytree flatten dataclass outputs (e.g. a ModelOutput-like dataclass)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        cls = type(output)
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_dataclass(cls)
        for item in dataclasses.fields(output):
            _register_dataclasses(getattr(output, item.name))
    elif isinstance(output, (list, tuple)):
        for item in output:
            _register_dataclasses(item)
    elif isinstance(output, dict):
        for item in output.values():
            _register_dataclasses(item)


def _module_paths(autograd_graph: fx.GraphModule, functional: fx.GraphModule,
                  scopes: list[tuple[int, str]], root_label: str) -> dict[str, str]:
    """Module path of every node of the functional graph: forward nodes from the scope
    that was running when pass 1 created them, backward nodes from the forward values
    they read ("backward of <module>")."""
    first_pass: dict[str, str] = {}
    scope_index, current = 0, ""
    for index, node in enumerate(autograd_graph.graph.nodes):
        while scope_index < len(scopes) and scopes[scope_index][0] <= index:
            current = scopes[scope_index][1]
            scope_index += 1
        first_pass[node.name] = current
    paths: dict[str, str] = {}
    for node in functional.graph.nodes:
        sources = node.meta.get("from_node") or []
        path = first_pass.get(sources[-1].name, "") if sources else ""
        if not path and node.op == "call_function":   # backward: the deepest module among its inputs
            candidates = [paths[arg.name] for arg in node.all_input_nodes if paths.get(arg.name)]
            path = max(candidates, key=lambda p: (p != root_label, p.count(".")), default="")
        paths[node.name] = path
    return paths


def _random_fills_in_eager_layout(graph_module: fx.GraphModule) -> None:
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target in _IN_PLACE_RANDOM:
            node.args = (_IN_PLACE_RANDOM[node.target], *node.args)
            node.target = random_fill_like
    graph_module.recompile()


def _dropout_masks_in_one_byte(graph_module: fx.GraphModule) -> list[fx.Node]:
    """Draw each dropout mask as a bool tensor and convert it to the floating dtype after.

    On a CPU, eager dropout is ``noise = empty_like(x).bernoulli_(1 - p)`` in ``x``'s dtype,
    then ``noise / (1 - p)`` and ``x * noise``: the mask is 4 bytes an element in float32, and
    a plan can only keep it that size or replay the draw. The same ``bernoulli_`` into a bool
    tensor draws the same elements from the same generator state and leaves the generator
    where the float draw leaves it (`_bool_draw_matches` checks this for each shape, dtype
    and device), so ``_to_copy(mask_bool) / (1 - p)`` is bitwise eager's noise. A plan can
    then keep the 1-byte mask and recompute the cheap conversion and division, which is what
    CUDA's ``native_dropout`` saves and what ``torch.compile``'s partitioner keeps. On the zoo
    GPT small (9 masks of 1 MiB) that is 6.75 MiB a plan may keep for a quarter of the bytes.

    A fill whose floating ``like`` comes from an ``empty_like`` read by nothing else is
    drawn like that ``empty_like``'s input, so the float buffer is never allocated. O(nodes)
    plus one pair of draws per distinct mask signature. Returns the masks.
    """
    graph = graph_module.graph
    masks: list[fx.Node] = []
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is random_fill_like and not node.kwargs
                and len(node.args) == 3 and node.args[0] is aten.bernoulli_.float
                and isinstance(node.args[2], (int, float)) and isinstance(node.args[1], fx.Node)):
            continue
        value = node.meta.get("val")
        probability = float(node.args[2])
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or \
                not _bool_draw_matches(tuple(value.shape), tuple(value.stride()), value.dtype, value.device, probability):
            continue
        like = node.args[1]
        source = like
        if (like.op == "call_function" and like.target is aten.empty_like.default and not like.kwargs
                and len(like.args) == 1 and isinstance(like.args[0], fx.Node) and len(like.users) == 1):
            source = like.args[0]
        with graph.inserting_after(node):
            as_float = graph.call_function(aten._to_copy.default, (node,), {"dtype": value.dtype})
        node.replace_all_uses_with(as_float, delete_user_cb=lambda user: user is not as_float)
        node.args = (aten.bernoulli_.float, source, probability)
        node.kwargs = {"dtype": torch.bool}
        with value.fake_mode:
            node.meta["val"] = torch.empty_like(source.meta["val"], dtype=torch.bool)
            as_float.meta["val"] = aten._to_copy.default(node.meta["val"], dtype=value.dtype)
        for new in (node, as_float):
            new.meta["tensor_meta"] = _extract_tensor_metadata(new.meta["val"])
        for key in ("from_node", "seq_nr"):
            if key in node.meta:
                as_float.meta[key] = node.meta[key]
        if source is not like and not like.users:
            graph.erase_node(like)
        masks.append(node)
    graph_module.recompile()
    return masks


def _dropout_noise_made_in_backward(graph_module: fx.GraphModule, masks: list[fx.Node], roles: dict[str, Role],
                                    modules: dict[str, str]) -> int:
    """Have the backward read each one-byte mask (`_dropout_masks_in_one_byte`) instead of
    the float noise made from it: the noise's conversion and scaling (``_to_copy``, then a
    pointwise op by a constant, ``div(noise, 1 - p)``) are made again in the backward, before
    their first backward reader. Returns how many noises.

    The solvers decide about the values the backward reads; a forward value read only by
    forward ops cannot be kept to make a recomputation cheap. So without this the backward
    reads the float noise and a plan keeps it (4 bytes an element) or replays the draw (an
    eager random fill). With it, what a plan keeps is the mask (1 byte), and the backward
    pays two pointwise passes over it, which inductor fuses into the gradient's kernel, as
    CUDA's ``native_dropout`` backward and ``torch.compile``'s partitioner do. The values
    are bitwise those of the forward's noise. O(nodes).
    """
    graph = graph_module.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    made = 0
    for mask in masks:
        (as_float,) = mask.users
        chain = [as_float]
        (scaled,) = as_float.users if len(as_float.users) == 1 else (None,)
        if scaled is not None and scaled.op == "call_function" and isinstance(scaled.target, torch._ops.OpOverload) \
                and torch.Tag.pointwise in scaled.target.tags and scaled.all_input_nodes == [as_float] \
                and roles.get(scaled.name) is Role.FORWARD:
            chain.append(scaled)
        noise = chain[-1]
        readers = sorted((user for user in noise.users if roles.get(user.name) is Role.BACKWARD), key=order.__getitem__)
        if not readers or roles.get(noise.name) is not Role.FORWARD:
            continue
        copies: dict[fx.Node, fx.Node] = {mask: mask}
        with graph.inserting_before(readers[0]):
            for node in chain:
                copy = graph.node_copy(node, lambda argument: copies.get(argument, argument))
                copy.meta = {key: node.meta[key] for key in ("val", "tensor_meta") if key in node.meta}
                copies[node] = copy
                roles[copy.name] = Role.BACKWARD
                modules[copy.name] = modules.get(node.name, "")
        for reader in readers:
            reader.replace_input_with(noise, copies[noise])
        made += 1
    graph_module.recompile()
    return made


# the most elements `_bool_draw_matches` draws: a larger mask is checked on a flat one of
# this many (an estimate traces batches whose masks would take gigabytes)
BOOL_DRAW_CHECK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=None)
def _bool_draw_matches(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                       probability: float) -> bool:
    """Does ``bernoulli_(probability)`` draw the same elements into a bool tensor as into one
    of ``dtype`` from the same generator state, and leave the generator in the same state?
    Checked on a generator of its own (the caller's random state is untouched), with the
    mask's shape and strides up to `BOOL_DRAW_CHECK_ELEMENTS` elements, else on a flat
    tensor of that many (the same kernel, dtype and device; on a CPU the draw of each
    element depends only on the generator's seed and the element's index). A device this
    process cannot draw on (a GPU traced for an estimate on a CPU machine, ``meta``)
    answers no: its masks stay in their floating dtype, as eager draws them."""
    if device.type == "meta" or (device.type == "cuda" and not torch.cuda.is_available()):
        return False
    if math.prod(shape) > BOOL_DRAW_CHECK_ELEMENTS:
        shape, stride = (BOOL_DRAW_CHECK_ELEMENTS,), (1,)
    draws = []
    try:
        for draw_dtype in (dtype, torch.bool):
            generator = torch.Generator(device=device).manual_seed(0x5EED)
            out = torch.empty_strided(shape, stride, dtype=draw_dtype, device=device)
            out.bernoulli_(probability, generator=generator)
            draws.append((out.to(dtype), generator.get_state()))
    except RuntimeError:                  # no generator or kernel for this device here
        return False
    (floating, state), (boolean, bool_state) = draws
    return torch.equal(floating, boolean) and torch.equal(state, bool_state)


def _accumulate_gradients_in_place(graph_module: fx.GraphModule, roles: dict[str, Role],
                                   modules: dict[str, str]) -> int:
    """Turn ``add(a, b)`` of the backward into ``add_(a, b)`` where nothing reads ``a``'s
    storage after it, and ``add(a, embedding_dense_backward(g, ids, ...))`` into
    ``index_put_(a, [ids], g, accumulate=True)``; returns how many sums were rewritten.

    Functionalization writes every gradient sum out of place: a value used twice in the
    forward (a residual stream, a weight tied between the embedding and the output layer)
    gets ``add(grad_1, grad_2)``, three tensors of that size alive at once. Eager autograd
    sums into the buffer that holds the first gradient (its input buffer accumulates in
    place when it holds the only reference), so two. For a tied 50k x 768 embedding that
    is 147 MiB more than eager at the end of the backward.

    ``a`` qualifies when it is made in the backward and every node sharing its storage (its
    views, its base) is read only by those views and this add: then no step of any plan can
    read the storage after the add, however the solver orders the backward, and backward
    ops are never recomputed. The operand written into is the one laid out as the
    out-of-place result (same shape, dtype and strides), so every later op sees the tensor
    it saw when traced; IEEE addition is commutative, so the sum is bit-identical.

    A tied embedding's second gradient is a vocabulary-sized buffer of zeros with the
    rows of the tokens seen added in (``embedding_dense_backward``), which eager autograd
    allocates too: at the end of the backward, beside every other gradient, it is the
    step's peak (GPT-2 small: 147 MiB of 1,098 MiB with every block checkpointed). Added
    straight into the first gradient's rows (`_embedding_rows_added_in_place`), no such
    buffer exists: one tokens x width input instead. The sum is the same up to the order
    in which a repeated token's rows are added (each row into the running sum, where
    eager adds their total), so gradients are equal to rounding, not bitwise.
    """
    nodes = list(graph_module.graph.nodes)
    sharing: dict[int, list[fx.Node]] = {}
    for node in nodes:
        key = _storage_key(node)
        if key is not None:
            sharing.setdefault(key, []).append(node)

    def writable_into(operand: Any, add: fx.Node) -> bool:
        if not isinstance(operand, fx.Node) or roles.get(operand.name) is not Role.BACKWARD:
            return False
        value, result = operand.meta.get("val"), add.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(result, torch.Tensor):
            return False
        if (value.shape, value.dtype, value.stride()) != (result.shape, result.dtype, result.stride()):
            return False
        group = sharing.get(_storage_key(operand), [operand])
        return all(roles.get(member.name) is Role.BACKWARD and member.op == "call_function"
                   and all(user is add or user in group for user in member.users) for member in group)

    rewritten = 0
    for node in nodes:
        if node.op != "call_function" or node.target is not aten.add.Tensor or roles.get(node.name) is not Role.BACKWARD:
            continue
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        first, second = node.args
        if _embedding_rows_added_in_place(node, roles, modules, writable_into):
            rewritten += 1
            continue
        if writable_into(first, node):
            node.target = aten.add_.Tensor
        elif writable_into(second, node):
            node.args, node.target = (second, first), aten.add_.Tensor
        else:
            continue
        rewritten += 1
    graph_module.recompile()
    return rewritten


def _embedding_rows_added_in_place(add: fx.Node, roles: dict[str, Role], modules: dict[str, str],
                                   writable_into: Callable[[Any, fx.Node], bool]) -> bool:
    """Rewrite ``add`` (one operand an ``embedding_dense_backward`` read by nothing else,
    the other writable in place) as ``index_put_(other, [ids.reshape(-1)], rows,
    accumulate=True)``, where ``rows`` is the incoming gradient as one row per token, a
    row of ``padding_idx`` zeroed as the dense backward skips it; whether it did. A
    backward scaled by frequency is left as it is. O(1) nodes."""
    for dense, other in (add.args, tuple(reversed(add.args))):
        if (isinstance(dense, fx.Node) and dense.target is aten.embedding_dense_backward.default
                and len(dense.users) == 1 and writable_into(other, add)):
            break
    else:
        return False
    arguments = dict(zip(("grad_output", "indices", "num_weights", "padding_idx", "scale_grad_by_freq"), dense.args))
    arguments.update(dense.kwargs)
    gradient, indices = arguments["grad_output"], arguments["indices"]
    if arguments["scale_grad_by_freq"] or not all(isinstance(n, fx.Node) for n in (gradient, indices)):
        return False
    width = gradient.meta["val"].shape[-1]
    graph = add.graph
    made = []
    with graph.inserting_before(add), gradient.meta["val"].fake_mode:
        flat_indices = graph.call_function(aten.reshape.default, (indices, [-1]))
        rows = graph.call_function(aten.reshape.default, (gradient, [-1, width]))
        flat_indices.meta["val"] = aten.reshape.default(indices.meta["val"], [-1])
        rows.meta["val"] = aten.reshape.default(gradient.meta["val"], [-1, width])
        made += [flat_indices, rows]
        if arguments["padding_idx"] >= 0:      # the padding token's rows add nothing
            kept = graph.call_function(aten.ne.Scalar, (flat_indices, arguments["padding_idx"]))
            kept_rows = graph.call_function(aten.unsqueeze.default, (kept, -1))
            masked = graph.call_function(aten.where.ScalarOther, (kept_rows, rows, 0.0))
            kept.meta["val"] = aten.ne.Scalar(flat_indices.meta["val"], arguments["padding_idx"])
            kept_rows.meta["val"] = aten.unsqueeze.default(kept.meta["val"], -1)
            masked.meta["val"] = aten.where.ScalarOther(kept_rows.meta["val"], rows.meta["val"], 0.0)
            made += [kept, kept_rows, masked]
            rows = masked
    for new in made:
        new.meta["tensor_meta"] = _extract_tensor_metadata(new.meta["val"])
        roles[new.name] = Role.BACKWARD
        modules[new.name] = modules.get(dense.name, "")
    add.target = aten.index_put_.default
    add.args = (other, [flat_indices], rows, True)
    graph.erase_node(dense)
    roles.pop(dense.name, None)
    modules.pop(dense.name, None)
    return True


def _storage_key(node: fx.Node) -> int | None:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _eliminate_dead_code(graph_module: fx.GraphModule) -> None:
    """Drop unused pure nodes; keep the buffer updates (``copy_``)."""
    graph_module.graph.eliminate_dead_code(
        is_impure_node=lambda node: node.is_impure() or (node.op == "call_function"
                                                          and node.target is aten.copy_.default))
    graph_module.recompile()


def _assign_roles(graph_module: fx.GraphModule, n_params: int, n_buffers: int, n_inputs: int,
                  num_tensor_outputs: int) -> dict[str, Role]:
    """Placeholders by position; forward = what the forward outputs and the buffer
    updates depend on; every other op belongs to the backward."""
    roles: dict[str, Role] = {}
    nodes = list(graph_module.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        if index < n_params:
            roles[node.name] = Role.PARAMETER
        elif index < n_params + n_buffers:
            roles[node.name] = Role.BUFFER
        elif index < n_params + n_buffers + n_inputs:
            roles[node.name] = Role.INPUT
        else:
            roles[node.name] = Role.TANGENT
    output_node = next(n for n in reversed(nodes) if n.op == "output")
    forward_roots = [n for n in output_node.args[0][:num_tensor_outputs] if isinstance(n, fx.Node)]
    updates = [n for n in nodes if n.op == "call_function" and n.target is aten.copy_.default]
    for node in updates:
        roles[node.name] = Role.BUFFER_UPDATE
    stack = forward_roots + [arg for n in updates for arg in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node.name in roles:
            continue
        roles[node.name] = Role.FORWARD
        stack.extend(node.all_input_nodes)
    for node in nodes:
        if node.op == "call_function" and node.name not in roles:
            roles[node.name] = Role.BACKWARD
    for node in nodes:   # an output of a multi-output op belongs to that op's phase
        if node.op == "call_function" and node.target is operator.getitem:
            roles[node.name] = roles[node.args[0].name]
    roles[output_node.name] = Role.OUTPUT
    return roles


@contextlib.contextmanager
def _restore_module_state(model: torch.nn.Module) -> Iterator[None]:
    """Tracing must leave the model and the RNG exactly as they were."""
    rng_state = torch.get_rng_state()
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        torch.set_rng_state(rng_state)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers and buffer.device.type != "meta" and not torch.equal(buffer, buffers[name]):
                    buffer.copy_(buffers[name])


def _library_shims(example_kwargs: Mapping[str, Any]) -> Callable[[], contextlib.AbstractContextManager]:
    """Context managers that make a model library trace the program it runs eagerly.

    transformers checks ``position_ids`` for packed sequences with a data-dependent test it
    skips under tracing (fake tensors), and then materializes the causal mask instead of
    SDPA's ``is_causal``, which with grouped-query attention also repeats k and v into
    copies that SDPA saves: 2.5 MiB more per Llama layer than eager. When the caller passes
    no ``position_ids``, the model makes them with ``arange``, never packed, so the test
    is known to find no packing (eager's answer for every input of the signature)."""
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None or example_kwargs.get("position_ids") is not None \
            or not hasattr(masking, "find_packed_sequence_indices"):
        return contextlib.nullcontext

    @contextlib.contextmanager
    def no_packed_sequences() -> Iterator[None]:
        original = masking.find_packed_sequence_indices
        masking.find_packed_sequence_indices = lambda position_ids: None
        try:
            yield
        finally:
            masking.find_packed_sequence_indices = original
    return no_packed_sequences


@contextlib.contextmanager
def _tracing_errors(model: torch.nn.Module, scopes: list[tuple[int, str]] | None = None,
                    inputs: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
    """Turn a tracing failure into `UnsupportedModelError` naming the submodule that was
    running and the way out. With ``inputs``, the block runs the model's plain forward (on
    fake tensors): an error there other than a data-dependent one is the model's own on
    these inputs, `ModelInputError` naming them. With ``scopes``, also record ``(graph
    length, module path)`` each time the running submodule changes, so traced nodes can be
    attributed. Fake-tensor kernels' own error logs are silenced (the error says it all)."""
    stack: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def note() -> None:
        mode = get_proxy_mode()
        if scopes is not None and mode is not None:
            scopes.append((len(mode.tracer.graph.nodes), stack[-1] if stack else ""))

    def enter(module, _args):
        stack.append(names.get(module, type(module).__name__) or type(model).__name__)
        note()

    def leave(module, _args, _output):
        if stack:
            stack.pop()
        note()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_tensor_log.level
    fake_tensor_log.setLevel(logging.CRITICAL)
    try:
        yield
    except UnsupportedModelError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the module and the fix
        where = stack[-1] if stack else type(model).__name__
        module_type = type(dict(model.named_modules()).get(where, model)).__name__
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        lowered = (type(error).__name__ + text).lower()
        data_dependent = ("datadependent" in lowered or "data-dependent" in lowered or "data dependent" in lowered
                          or "item()" in lowered or "guard" in lowered or "dynamicoutputshape" in lowered)
        if inputs is not None and not data_dependent:
            raise ModelInputError(
                f"{where!r} ({module_type}) fails on the example inputs {describe_tensors(inputs)}: "
                f"{type(error).__name__}: {text}; the model raises this itself, so give example inputs with the "
                "shapes and dtypes of a training batch") from error
        if data_dependent:
            fix = ("data-dependent control flow or a tensor read on the host (.item(), .tolist(), `if x.sum() > 0`); "
                   "use torch.where / masking instead")
        else:
            fix = "an op or Python construct that cannot be traced to aten ops"
        raise UnsupportedModelError(f"cannot trace {where!r} ({type(error).__name__}: {text}); "
                                    f"cause: {fix}") from error
    finally:
        fake_tensor_log.setLevel(level)
        for handle in handles:
            handle.remove()


def describe_tensors(tensors: Sequence[torch.Tensor]) -> str:
    """``([4, 16] int64, [4] float32)``: the shapes and dtypes an error message names."""
    return "(" + ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors) + ")"
