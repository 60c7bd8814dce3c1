"""Random-number replay for recomputed random ops (dropout masks).

The forward saves the generator state right before a random op that the plan runs again;
the recomputation runs the op under that state and restores the generator afterwards, so
it draws the same numbers and the caller's RNG stream is unchanged (as
`torch.utils.checkpoint` does with ``preserve_rng_state``).

The same three calls as custom ops (``memsched::rng_state``, ``memsched::random_fill``,
``memsched::random_fill_replay``), which `runtime.compiled` puts inside the graphs it hands
to inductor instead of cutting them there. Inductor runs a custom op as a call to its
eager kernel, so each draws what the eager program draws, but it orders calls by their
data only: two fills that read nothing of each other could swap, and two alike could be
merged. So each state save and fill takes an ``order`` tensor (empty) that the one before
it in the program returned, and returns the next: a chain of data dependencies in program
order. A replay needs no place in the chain: it draws from its own saved state and leaves
the generator as it found it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

aten = torch.ops.aten

# The in-place random fills (`runtime.step.random_fill_like`) the custom ops draw with:
# those whose arguments after the tensor are all floats, by name
COMPILABLE_FILLS: dict[str, torch._ops.OpOverload] = {
    str(op): op for op in (aten.bernoulli_.float, aten.uniform_.default, aten.normal_.default,
                           aten.exponential_.default)}


def save_rng_state(device_type: str) -> torch.Tensor:
    """The state of the default generator of ``device_type`` ("cpu" or "cuda")."""
    if device_type == "cuda":
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def run_with_rng_state(state: torch.Tensor, device_type: str, op: Callable[..., Any], args: tuple,
                       kwargs: dict) -> Any:
    """Run ``op`` with the generator set to ``state``; leave the generator as it was."""
    if device_type == "cuda":
        current = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(state)
        try:
            return op(*args, **kwargs)
        finally:
            torch.cuda.set_rng_state(current)
    current = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        return op(*args, **kwargs)
    finally:
        torch.set_rng_state(current)


@functools.cache
def replaying(op: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    """``replay(state, *args, **kwargs)``: ``op`` under a saved generator state, as a
    function an FX graph can call (FX cannot print a Python function as an argument)."""

    def replay_random(state: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return run_with_rng_state(state, device_type, op, args, kwargs)

    replay_random.op = op                      # what `runtime.compiled` reads to compile it
    replay_random.device_type = device_type
    return replay_random


# -- the same, as custom ops inductor compiles into its graphs (module docstring) -----------------

def _fill(like: torch.Tensor, fill: str, scalars: list[float], dtype: Optional[torch.dtype]) -> torch.Tensor:
    out = torch.empty_like(like, dtype=dtype)
    COMPILABLE_FILLS[fill](out, *scalars)
    return out


def _order(like: torch.Tensor | None = None) -> torch.Tensor:
    """The next link of the chain: an empty tensor (no bytes allocated)."""
    return torch.empty(0, dtype=torch.uint8) if like is None else like.new_empty(0, dtype=torch.uint8)


@torch.library.custom_op("memsched::rng_state", mutates_args=())
def rng_state_op(order: Optional[torch.Tensor], device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`save_rng_state`, after the random call that returned ``order``."""
    return save_rng_state(device_type), _order()


@rng_state_op.register_fake
def _(order: Optional[torch.Tensor], device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(_state_numel(device_type), dtype=torch.uint8), _order()


@functools.cache
def _state_numel(device_type: str) -> int:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return save_rng_state(device_type).numel()


@torch.library.custom_op("memsched::random_fill", mutates_args=())
def random_fill_op(order: Optional[torch.Tensor], like: torch.Tensor, fill: str, scalars: list[float],
                   dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """`runtime.step.random_fill_like` with ``COMPILABLE_FILLS[fill]``, after the random
    call that returned ``order``."""
    return _fill(like, fill, scalars, dtype), _order(like)


@random_fill_op.register_fake
def _(order: Optional[torch.Tensor], like: torch.Tensor, fill: str, scalars: list[float],
      dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(like, dtype=dtype), _order(like)


@torch.library.custom_op("memsched::random_fill_replay", mutates_args=())
def random_fill_replay_op(state: torch.Tensor, like: torch.Tensor, fill: str, scalars: list[float],
                          dtype: Optional[torch.dtype], device_type: str) -> torch.Tensor:
    """`random_fill_op` drawn under ``state``, the generator left as it was."""
    return run_with_rng_state(state, device_type, _fill, (like, fill, scalars, dtype), {})


@random_fill_replay_op.register_fake
def _(state: torch.Tensor, like: torch.Tensor, fill: str, scalars: list[float], dtype: Optional[torch.dtype],
      device_type: str) -> torch.Tensor:
    return torch.empty_like(like, dtype=dtype)
