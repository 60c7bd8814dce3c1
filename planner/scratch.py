"""Transient scratch memory of CPU kernels (oneDNN convolutions, fused attention, RNNs).

Such kernels allocate and free workspace inside one call: the storage tracker never sees
it (no tensor holds it), yet it is part of the physical peak the budget caps. A 3x3
convolution on a 32x32x32x32 input takes 8 MiB of scratch for an 8 MiB output. This
module measures it with the PyTorch profiler's memory timeline, for the op families that
use scratch on CPU only, since a profiled call costs ~0.1 s. On CUDA the allocator's
high-water mark shows workspace directly (see `planner.profile`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

_SCRATCH_FAMILIES = ("convolution", "mkldnn", "flash_attention", "efficient_attention", "rnn", "lstm", "gru")


def uses_cpu_scratch(target: Any) -> bool:
    """Is ``target`` an op family whose CPU kernels allocate scratch inside the call?"""
    name = getattr(target, "__name__", "") or ""
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        name = packet.__name__
    return any(family in name for family in _SCRATCH_FAMILIES)


def measure_scratch(op: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, int]:
    """Run ``op`` once; return its result and the bytes it held beyond its new outputs at
    its high-water mark. 0 (and a plain call) when a profiler is already running or the
    profiler's memory timeline is unavailable in this torch."""
    if torch.autograd.profiler._is_profiler_enabled:
        return op(*args, **kwargs), 0
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
    except ImportError as error:
        log.warning("CPU scratch memory not measured: %s", error)
        return op(*args, **kwargs), 0
    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as profiler:
        result = op(*args, **kwargs)
    with _kineto_quiet():
        timeline = profiler._memory_profile().timeline
    live_bytes = high_water_bytes = 0
    for _, action, _, size_bytes in timeline:
        if action == Action.CREATE:
            live_bytes += size_bytes
        elif action == Action.DESTROY:
            live_bytes -= size_bytes
        high_water_bytes = max(high_water_bytes, live_bytes)
    input_storages = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
    output_bytes = sum(t.untyped_storage().nbytes() for t in _tensors(result)
                       if t.untyped_storage().data_ptr() not in input_storages)
    return result, max(0, high_water_bytes - output_bytes)


@contextlib.contextmanager
def _kineto_quiet() -> Iterator[None]:
    """The profiler's C++ backend prints a line to stderr at every start and stop,
    whatever its log level; silence file descriptor 2 for that short window only."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
