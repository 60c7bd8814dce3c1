"""What runtime executes: a captured training step, the joint graph and how to call it.

`planner.capture` traces a model into a `CapturedStep`; the runtime (`runtime.codegen`,
`runtime.module`, `runtime.pipeline`) turns the joint graph and a plan into programs. The
description lives here, below both, so that layers only import downwards. Also here: the
callables the joint graph's nodes may target beyond aten (`random_fill_like`, the re-run
variants in `RERUN_TARGETS`), since the runtime runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

aten = torch.ops.aten


def random_fill_like(in_place_op: torch._ops.OpOverload, like: torch.Tensor, *args: Any,
                     dtype: torch.dtype | None = None, **kwargs: Any) -> torch.Tensor:
    """``in_place_op(torch.empty_like(like, dtype=dtype), *args)``: a random fill with
    eager's layout (``like``'s dtype unless ``dtype`` is given)."""
    out = torch.empty_like(like, dtype=dtype)
    in_place_op(out, *args, **kwargs)
    return out


def is_random(target: Any, args: tuple = (), kwargs: dict | None = None) -> bool:
    """Does this call draw random numbers (so a recomputation must replay them)? An
    attention kernel called with ``dropout_p == 0`` draws none, although its target is
    tagged random: replaying it would only hold a generator state to the end of the step
    (5,056 B each on CPU; on a Llama step, what kept memsched above HF checkpointing's peak)."""
    if target is random_fill_like:
        return True
    if torch.Tag.nondeterministic_seeded not in getattr(target, "tags", ()):
        return False
    schema = getattr(target, "_schema", None)
    for position, argument in enumerate(schema.arguments if schema is not None else ()):
        if argument.name == "dropout_p":
            if kwargs and "dropout_p" in kwargs:
                value = kwargs["dropout_p"]
            else:
                value = args[position] if position < len(args) else argument.default_value
            return not (isinstance(value, (int, float)) and value == 0)
    return True


def native_batch_norm_rerun(x: torch.Tensor, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                            training: bool, momentum: float, eps: float) -> tuple[torch.Tensor, ...]:
    """A re-run of ``native_batch_norm``: in training mode the output depends on the batch
    statistics only, so the running statistics are left out and not updated a second time."""
    if training:
        running_mean = running_var = None
    return aten.native_batch_norm.default(x, weight, bias, running_mean, running_var, training, momentum, eps)


# How to run an op again (a recomputation) when that differs from its first run. BatchNorm
# stays eager's fused kernel, which updates its running statistics in place: exact
# gradients and buffers, where a decomposition into primitives is off by rounding that
# BatchNorm's backward amplifies.
RERUN_TARGETS: dict[Any, Callable[..., Any]] = {aten.native_batch_norm.default: native_batch_norm_rerun}


class Role(str, Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    TANGENT = "tangent"
    FORWARD = "forward"
    BACKWARD = "backward"
    BUFFER_UPDATE = "buffer_update"   # the trailing copy_ into a buffer (runs in the forward)
    OUTPUT = "output"


@dataclass(frozen=True)
class OutputLeaf:
    """One leaf of the model's (pytree-flattened) output."""

    is_tensor: bool
    differentiable: bool = False    # requires grad in the plain model
    tangent: bool = False           # the traced backward takes its gradient (a tangent placeholder)
    constant: Any = None            # the value of a non-tensor leaf
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None


@dataclass
class CapturedStep:
    """The joint graph and everything needed to call it with a model's live tensors."""

    joint: fx.GraphModule
    param_names: list[str]            # model parameters, in placeholder order
    buffer_names: list[str]
    input_spec: pytree.TreeSpec       # of (args, kwargs)
    input_leaves: list[Any]           # example leaves; tensors are replaced at call time
    tensor_input_positions: list[int]  # leaf indices that are tensors
    output_spec: pytree.TreeSpec
    output_leaves: list[OutputLeaf]
    grad_param_positions: list[int]   # indices into param_names that get a gradient
    grad_input_positions: list[int]   # indices into the tensor inputs that get a gradient
    roles: dict[str, Role]            # node name -> role
    buffer_updates: dict[str, str]    # copy_ node name -> buffer name
    training: bool
    input_signature: tuple            # shapes/dtypes/devices the graph is specialised for
    placeholder_names: list[str] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)   # node name -> nn.Module path ("" = top level)
    model_name: str = ""             # the traced model's class name, for messages
    param_requires_grad: list[bool] = field(default_factory=list)   # per parameter, when traced

    @property
    def num_tensor_outputs(self) -> int:
        return sum(leaf.is_tensor for leaf in self.output_leaves)

    def tensor_output_names(self) -> list[str | None]:
        """The joint graph's node name of each tensor output (None where it returns no node)."""
        output_node = next(node for node in self.joint.graph.nodes if node.op == "output")
        return [node.name if isinstance(node, fx.Node) else None
                for node in output_node.args[0][:self.num_tensor_outputs]]

    def outputs_without_tangent(self) -> tuple[str, ...]:
        """Tensor outputs the backward does not start from (the logits beside a loss), by
        node name, less those also returned where it does: what a caller that keeps only
        the loss drops before calling backward."""
        tensor_leaves = [leaf for leaf in self.output_leaves if leaf.is_tensor]
        names = self.tensor_output_names()
        seeded = {name for name, leaf in zip(names, tensor_leaves) if leaf.tangent}
        return tuple(dict.fromkeys(name for name, leaf in zip(names, tensor_leaves)
                                   if name is not None and not leaf.tangent and name not in seeded))


def input_signature(leaves: Sequence[Any]) -> tuple:
    """What a traced graph is specialised for: each tensor's shape, dtype, device,
    requires_grad; each other leaf's value; the autocast state (it changes every dtype)."""
    signature: list[tuple] = [("autocast", _autocast_state())]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            signature.append(("tensor", tuple(leaf.shape), str(leaf.dtype), str(leaf.device), leaf.requires_grad))
        else:
            signature.append(("const", repr(leaf)))
    return tuple(signature)


def _autocast_state() -> tuple:
    return tuple((device, str(torch.get_autocast_dtype(device))) for device in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device))
