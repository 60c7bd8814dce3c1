"""Offload and prefetch: the host copies behind a plan's ``offload`` / ``prefetch`` steps.

The plans come from the solvers that weigh offloading against recomputation (``greedy``,
``ilp``, ``brute_force``, and ``chain`` after Beaumont, Eyraud-Dubois, Shilova, "Efficient
Combination of Rematerialization and Offloading for Training DNNs", NeurIPS 2021); this
module only moves the bytes.

The generated programs (`runtime.codegen`) call four functions, in this pattern:

    host_v = offload_to_host(v)          # offload(v): start the device->host copy
    ...                                  # v's last use in the phase
    release_after_offload(host_v)        # free(v): the device storage goes once the copy ended
    ...
    v = prefetch_to_device(host_v)       # prefetch(v): allocate on the device, start the copy
    wait_prefetched(host_v)              # before the first op that reads v
    ... = op(v)

Semantics (those of `solvers.simulate`):

* ``offload_to_host(v)`` copies ``v`` into a new host tensor of the same shape and dtype
  (and strides, when ``v`` is dense), held by the returned `HostCopy`. The copy reads ``v`` as the compute stream
  left it when the call was made.
* ``release_after_offload(copy)``: the plan frees ``v``; its device storage is released
  only once the copy finished (compute waits for it), never while it is still being read.
* ``prefetch_to_device(copy)`` allocates a fresh device tensor (counted from that moment)
  and starts the host->device copy; ``wait_prefetched(copy)`` makes compute wait for it, so
  ``v`` is read only after its copy ended. A host copy may be prefetched any number of
  times; each prefetch makes a new device tensor.

On the CPU (the device is the CPU) every copy is synchronous and the waits do nothing;
the host copy is reported to the memory tracker (`planner.memory.mark_host`), which then
counts it as host memory, never as device memory.

On CUDA, per device, one stream copies device->host and one copies host->device, so
transfers in both directions overlap compute and each other (the two copy channels of
the simulator). Host copies live in pinned buffers that a small pool, keyed by dtype and
element count, hands out again across steps. Ordering is by CUDA events, never by a
host synchronization:

* an offload's stream first waits for the compute stream (the value is produced), copies
  with ``non_blocking=True`` and records an event; the `HostCopy` keeps the device tensor
  referenced until ``release_after_offload``, which makes the compute stream wait for that
  event before the last reference goes. The device tensor is also ``record_stream``-ed on
  the copy stream, so that the caching allocator never reuses its block before the copy
  ended even when the `HostCopy` is dropped early;
* a prefetch allocates on the compute stream (the block belongs to it, as every other
  activation's), the copy stream waits for the compute stream (the block may have been
  freed just before by queued kernels) and for the offload's event, copies, records an
  event and ``record_stream``-s the new tensor; ``wait_prefetched`` makes the compute
  stream wait for that event;
* a pinned buffer goes back to the pool with an event recorded after its last copy; the
  next copy stream that takes it waits for that event first.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Callable

import torch

__all__ = ["HostCopy", "offload_to_host", "release_after_offload", "prefetch_to_device", "wait_prefetched"]


class HostCopy:
    """A host copy of one device tensor, made by `offload_to_host`.

    Attributes:
        tensor: the host (CPU, pinned on CUDA) tensor with the copied data.
        device: the device the value came from and is prefetched back to by default.
    """

    __slots__ = ("tensor", "device", "_source", "_offloaded", "_prefetched", "_buffer", "_pool_key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, device: torch.device) -> None:
        self.tensor = tensor
        self.device = device
        self._source: torch.Tensor | None = None          # the device tensor until its copy is waited for
        self._offloaded: Any = None                       # event: the device->host copy ended
        self._prefetched: Any = None                      # event: the latest host->device copy ended
        self._buffer: torch.Tensor | None = None          # the pooled pinned buffer behind ``tensor``
        self._pool_key: tuple[torch.dtype, int] | None = None

    @property
    def nbytes(self) -> int:
        return self.tensor.untyped_storage().nbytes()

    def __repr__(self) -> str:
        return (f"HostCopy({list(self.tensor.shape)} {str(self.tensor.dtype).removeprefix('torch.')} "
                f"from {self.device})")

    def __del__(self) -> None:
        if self._buffer is not None and self._pool_key is not None and _PINNED_POOL is not None:   # not at exit
            last_copy = self._prefetched if self._prefetched is not None else self._offloaded
            _PINNED_POOL.give_back(self._pool_key, self._buffer, last_copy)
            self._buffer = None


# Called with each CPU host copy made (`planner.memory` registers its trackers' mark_host,
# so that a copy standing for host memory is not counted as device memory). A hook keeps
# the runtime from importing the layer above it.
HOST_COPY_OBSERVERS: list[Callable[[torch.Tensor], None]] = []


# --------------------------------------------------------------------------- entry points


def offload_to_host(tensor: torch.Tensor) -> HostCopy:
    """Start copying ``tensor`` to host memory; the copy has its shape, dtype and, when
    ``tensor`` is dense, its strides.

    On CPU the copy is made now and marked as host memory for the active memory trackers.
    """
    if tensor.device.type == "cuda":
        return _offload_cuda(tensor)
    host = torch.empty_like(tensor, memory_format=torch.preserve_format)
    host.copy_(tensor)
    for observer in HOST_COPY_OBSERVERS:
        observer(host)
    return HostCopy(host, tensor.device)


def release_after_offload(host_copy: HostCopy) -> None:
    """The plan frees the offloaded value: compute waits for its device->host copy, then
    the host copy lets go of the device tensor (the caller's reference is gone already)."""
    if host_copy._source is not None:
        torch.cuda.current_stream(host_copy.device).wait_event(host_copy._offloaded)
        host_copy._source = None


def prefetch_to_device(host_copy: HostCopy, device: torch.device | str | None = None) -> torch.Tensor:
    """A new device tensor (on ``device``, default the value's own) that receives the host
    copy; read it only after `wait_prefetched` (a no-op on CPU, where the copy is made now)."""
    target = host_copy.device if device is None else torch.device(device)
    if target.type == "cuda":
        return _prefetch_cuda(host_copy, target)
    tensor = torch.empty_like(host_copy.tensor, device=target, memory_format=torch.preserve_format)
    tensor.copy_(host_copy.tensor)
    return tensor


def wait_prefetched(host_copy: HostCopy) -> None:
    """Compute waits for the latest prefetch of ``host_copy`` (no-op on CPU)."""
    if host_copy._prefetched is not None:
        torch.cuda.current_stream(host_copy.device).wait_event(host_copy._prefetched)


# --------------------------------------------------------------------------- CUDA


class _CopyStreams:
    """One device->host and one host->device stream per CUDA device, made on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[tuple[int, str], torch.cuda.Stream] = {}

    def get(self, device: torch.device, direction: str) -> torch.cuda.Stream:
        key = (device.index if device.index is not None else torch.cuda.current_device(), direction)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = torch.cuda.Stream(device=key[0])
            return stream


class _PinnedPool:
    """Pinned host buffers kept across steps, keyed by (dtype, element count), each with
    the event after which its last copy ended (``None``: no copy pending)."""

    def __init__(self, max_per_key: int = 64) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[torch.dtype, int], list[tuple[torch.Tensor, Any]]] = defaultdict(list)
        self.max_per_key = max_per_key

    def take(self, key: tuple[torch.dtype, int], stream: torch.cuda.Stream) -> torch.Tensor:
        """A buffer that ``stream`` may write once its queued work runs."""
        with self._lock:
            entries = self._free.get(key)
            entry = entries.pop() if entries else None
        if entry is None:
            dtype, numel = key
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        buffer, last_copy = entry
        if last_copy is not None:
            stream.wait_event(last_copy)
        return buffer

    def give_back(self, key: tuple[torch.dtype, int], buffer: torch.Tensor, last_copy: Any) -> None:
        with self._lock:
            entries = self._free[key]
            if len(entries) < self.max_per_key:
                entries.append((buffer, last_copy))

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_STREAMS = _CopyStreams()
_PINNED_POOL = _PinnedPool()


def _is_dense(tensor: torch.Tensor) -> bool:
    """The tensor's elements fill exactly ``numel`` consecutive slots of its storage."""
    if any(stride == 0 for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        return False
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 0)
    return tensor.numel() == 0 or span == tensor.numel()


def _host_view(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``buffer`` (flat, ``like.numel()`` elements) seen with ``like``'s shape and, when
    ``like`` is dense, its strides."""
    if _is_dense(like):
        return buffer.as_strided(like.shape, like.stride())
    return buffer.view(like.shape)


def _offload_cuda(tensor: torch.Tensor) -> HostCopy:
    compute = torch.cuda.current_stream(tensor.device)
    copier = _STREAMS.get(tensor.device, "d2h")
    key = (tensor.dtype, tensor.numel())
    buffer = _PINNED_POOL.take(key, copier)
    host = _host_view(buffer, tensor)
    copier.wait_stream(compute)                    # the value is produced
    with torch.cuda.stream(copier):
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copier)
    tensor.record_stream(copier)                   # its block is not reused before the copy ended
    copy = HostCopy(host, tensor.device)
    copy._source, copy._offloaded, copy._buffer, copy._pool_key = tensor, done, buffer, key
    return copy


def _prefetch_cuda(host_copy: HostCopy, device: torch.device) -> torch.Tensor:
    compute = torch.cuda.current_stream(device)
    copier = _STREAMS.get(device, "h2d")
    host = host_copy.tensor
    tensor = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)   # on compute
    copier.wait_stream(compute)                    # the block may be in use by queued kernels until now
    if host_copy._offloaded is not None:
        copier.wait_event(host_copy._offloaded)    # the host copy is complete
    with torch.cuda.stream(copier):
        tensor.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copier)
    tensor.record_stream(copier)
    host_copy._prefetched = done
    return tensor
