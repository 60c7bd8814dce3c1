"""Random-number replay for recomputed random ops (dropout masks).

The forward saves the generator state right before a random op that the plan runs again;
the recomputation runs the op under that state and restores the generator afterwards, so
it draws the same numbers and the caller's RNG stream is unchanged (as
`torch.utils.checkpoint` does with ``preserve_rng_state``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch


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

    return replay_random
