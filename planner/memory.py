"""Peak device memory of one training step (forward + backward), measured.

Two methods behind one context manager, `StepMemoryTracker`, and one result, `MemoryReport`:

* ``cuda-allocator`` (CUDA devices): the caching allocator's own statistics,
  ``torch.cuda.max_memory_allocated`` / ``memory_allocated``; the peak is absolute, so it
  includes everything already on the device (parameters, inputs, other models).
* ``storage-tracker`` (CPU, and any other device): a `TorchDispatchMode` that sees the
  outputs of every aten op run on the calling thread, the ops the autograd engine runs
  during ``.backward()`` included (on CPU the engine runs on the calling thread), and
  counts live tensor *storages*: a view shares its base's storage and is counted once.
  Every storage is keyed by its C++ ``StorageImpl`` (``untyped_storage()._cdata``) and
  watched with a weak reference to its Python object, which PyTorch keeps alive exactly
  as long as the C++ storage lives, so the bytes come back when the last tensor, view or
  autograd-saved reference lets go. The storages of the ``resident`` tensors (parameters,
  buffers, inputs) count from the start; other tensors made before tracking never count,
  even when the step writes into them in place.

Offloaded activations are host memory, never device memory: `StepMemoryTracker.mark_host`
(or the module-level `mark_host`, which reaches every active tracker) moves a storage to
the host account. On CPU the call is retroactive: the copy's bytes are taken out of the
device peak for its whole life, so marking the copy right after making it is exact.

What the storage tracker does not see: memory a kernel allocates internally and frees
before it returns (workspace) while another profiler is running (otherwise it is measured
per op, `planner.scratch`), tensors made without an aten op (``torch.from_numpy``),
ops run on other threads, and ``UntypedStorage.resize_`` called directly on a storage
(resizes done by aten ops, ``Tensor.resize_`` and ``out=`` included, are seen).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import (TorchDispatchMode, is_traceable_wrapper_subclass,
                                          is_traceable_wrapper_subclass_type)

from planner.errors import MeasurementError, UnsupportedUseError
from planner.scratch import OpScratch, kineto_quiet
from runtime import offload

__all__ = ["MemoryReport", "StepMemoryTracker", "mark_host", "measure_step_memory", "measure_allocator_peak",
           "measure_allocator_peak_by_address",
           "STORAGE_TRACKER", "CUDA_ALLOCATOR"]

_LOG = logging.getLogger(__name__)

STORAGE_TRACKER = "storage-tracker"
CUDA_ALLOCATOR = "cuda-allocator"


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one tracked region (normally one training step)."""

    peak_bytes: int        # device: max over the step of live bytes, resident tensors included
    start_bytes: int       # device bytes live when tracking started (the resident tensors)
    end_bytes: int         # device bytes live when tracking stopped
    host_peak_bytes: int   # host (offloaded) copies, counted apart and never in peak_bytes
    device: str            # "cpu", "cuda:0", ...
    method: str            # STORAGE_TRACKER or CUDA_ALLOCATOR

    @property
    def step_peak_bytes(self) -> int:
        """What the step added on top of what was live at its start, at the peak."""
        return self.peak_bytes - self.start_bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryReport:
        return cls(**{name: data[name] for name in ("peak_bytes", "start_bytes", "end_bytes",
                                                     "host_peak_bytes", "device", "method")})


# --------------------------------------------------------------------------- storages


def _storages_of(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding a tensor's data: one for a strided tensor, the components of a
    sparse one, the inner tensors' of a traceable wrapper subclass; none for a tensor
    without accessible storage (mkldnn, functional wrappers)."""
    if type(tensor) is not torch.Tensor and is_traceable_wrapper_subclass(tensor):
        attributes, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in attributes)
        return [storage for value in inner if isinstance(value, torch.Tensor) for storage in _storages_of(value)]
    layout = tensor.layout
    if layout == torch.strided:
        try:
            return [tensor.untyped_storage()]
        except (RuntimeError, NotImplementedError):   # e.g. functionalized or storage-less tensors
            _LOG.debug("no storage for a %s tensor of type %s; not counted", tensor.device, type(tensor).__name__)
            return []
    if layout == torch.sparse_coo:
        parts = [tensor._indices(), tensor._values()]
    elif layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    elif layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    else:
        _LOG.debug("layout %s has no countable storage; not counted", layout)
        return []
    return [storage for part in parts for storage in _storages_of(part)]


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Tensors in an op's arguments or results: bare, or inside tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    found: list[torch.Tensor] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return found


def _device_copy_error(device: torch.device) -> MeasurementError:
    """What `mark_host` raises for a tensor that is not in CPU memory."""
    return MeasurementError(f"mark_host: the tensor lives on {device}; a host copy lives in CPU memory "
                            "(copy it with .to('cpu') first)")


def _is_host(storage: torch.UntypedStorage) -> bool:
    return storage.device.type == "cpu"


class _StorageRef(weakref.ref):
    """Weak reference to a counted storage's Python object, with what was counted for it."""

    __slots__ = ("key", "nbytes", "first_event", "on_host")

    def __new__(cls, storage: torch.UntypedStorage, callback: Callable[[_StorageRef], None], key: int,
                nbytes: int, first_event: int, on_host: bool) -> _StorageRef:
        return super().__new__(cls, storage, callback)

    def __init__(self, storage: torch.UntypedStorage, callback: Callable[[_StorageRef], None], key: int,
                 nbytes: int, first_event: int, on_host: bool) -> None:
        super().__init__(storage, callback)
        self.key = key                  # StorageImpl address, unique while the storage lives
        self.nbytes = nbytes
        self.first_event = first_event  # index into the timelines of the first entry counting it
        self.on_host = on_host


class _StorageCounter:
    """Live bytes of the storages created since `start`, plus the resident ones.

    Byte counts are kept as two timelines (device, host) with one entry per event that
    raised the device or host total: entry 0 is the start, then one per op that allocated.
    Peaks are the timeline maxima (live bytes only grow at events). Keeping the timelines
    lets `mark_host` take a storage's bytes out of every entry since it was first counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.RLock()   # weakref callbacks can run on any thread
        self._refs: dict[int, _StorageRef] = {}
        self._release_callback = self._release
        self.device_bytes = 0
        self.host_bytes = 0
        self.device_timeline: list[int] = [0]
        self.host_timeline: list[int] = [0]
        self.device_peak = 0
        self.host_peak = 0

    # -- what counts

    def _counts_on_device(self, storage: torch.UntypedStorage) -> bool:
        found = storage.device
        return found.type == self.device.type and (self.device.index is None or found.index in (None, self.device.index))

    def _add(self, storage: torch.UntypedStorage, key: int, on_host: bool) -> None:
        """Start counting a storage, as host or device memory."""
        nbytes = storage.nbytes()
        self._refs[key] = _StorageRef(storage, self._release_callback, key, nbytes, len(self.device_timeline), on_host)
        if on_host:
            self.host_bytes += nbytes
        else:
            self.device_bytes += nbytes

    def _release(self, ref: _StorageRef) -> None:
        """Weakref callback: the storage's last reference is gone."""
        with self._lock:
            if self._refs.get(ref.key) is not ref:
                return
            del self._refs[ref.key]
            if ref.on_host:
                self.host_bytes -= ref.nbytes
            else:
                self.device_bytes -= ref.nbytes

    def record_transient(self, extra_bytes: int, at_bytes: int) -> None:
        """An op held ``extra_bytes`` of scratch on top of the ``at_bytes`` live when it
        returned (the scratch is known only after the step: the peak alone is raised)."""
        with self._lock:
            self.device_peak = max(self.device_peak, at_bytes + extra_bytes)

    def _record_event(self) -> None:
        self.device_timeline.append(self.device_bytes)
        self.host_timeline.append(self.host_bytes)
        self.device_peak = max(self.device_peak, self.device_bytes)
        self.host_peak = max(self.host_peak, self.host_bytes)

    # -- entry points

    def start(self, resident: Iterable[torch.Tensor]) -> None:
        with self._lock:
            for tensor in resident:
                for storage in _storages_of(tensor):
                    key = storage._cdata
                    if key not in self._refs and self._counts_on_device(storage):
                        self._add(storage, key, on_host=False)
            self.device_timeline = [self.device_bytes]
            self.host_timeline = [self.host_bytes]
            self.device_peak = self.device_bytes
            self.host_peak = self.host_bytes

    def stop(self) -> None:
        """Stop counting: drop the weak references, so that no callback runs any more."""
        with self._lock:
            self._refs = {}

    def record_outputs(self, outputs: Any, args: tuple, kwargs: dict) -> None:
        """Count the storages an op's outputs hold that were not counted yet and are not
        its inputs' (those are views, in-place results or pre-tracking tensors)."""
        input_keys: set[int] | None = None
        raised = False
        with self._lock:
            for tensor in _tensors_in(outputs):
                for storage in _storages_of(tensor):
                    key = storage._cdata
                    ref = self._refs.get(key)
                    if ref is not None:
                        raised |= self._refresh_size(ref, storage)
                        continue
                    if input_keys is None:
                        input_keys = {s._cdata for t in _tensors_in((args, kwargs)) for s in _storages_of(t)}
                    if key in input_keys or not self._counts_on_device(storage):
                        continue
                    self._add(storage, key, on_host=False)
                    raised = True
            if raised:
                self._record_event()

    def _refresh_size(self, ref: _StorageRef, storage: torch.UntypedStorage) -> bool:
        """Follow a resize seen on an op's output; whether it raised a total."""
        nbytes = storage.nbytes()
        grown = nbytes - ref.nbytes
        if grown == 0:
            return False
        ref.nbytes = nbytes
        if ref.on_host:
            self.host_bytes += grown
        else:
            self.device_bytes += grown
        return grown > 0

    def mark_host(self, tensor: torch.Tensor) -> None:
        with self._lock:
            for storage in _storages_of(tensor):
                if not _is_host(storage):
                    raise _device_copy_error(storage.device)
                key = storage._cdata
                ref = self._refs.get(key)
                if ref is None:                      # made before tracking: count it from now on
                    self._add(storage, key, on_host=True)
                    self._record_event()
                elif not ref.on_host:                # counted as device memory since first_event
                    ref.on_host = True
                    self.device_bytes -= ref.nbytes
                    self.host_bytes += ref.nbytes
                    for event in range(ref.first_event, len(self.device_timeline)):
                        self.device_timeline[event] -= ref.nbytes
                        self.host_timeline[event] += ref.nbytes
                    self.device_peak = max(self.device_timeline)
                    self.host_peak = max(self.host_timeline)


class _CountingMode(TorchDispatchMode):
    """Forwards every aten op's outputs to a `_StorageCounter`; changes no result. With a
    `planner.scratch.OpScratch` session, each op runs in its own range and the device
    bytes live right after it are noted, so `add_scratch` can add the op's scratch later."""

    def __init__(self, counter: _StorageCounter, scratch: OpScratch | None) -> None:
        super().__init__()
        self.counter = counter
        self.scratch = scratch
        self.bytes_after_op: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        if any(is_traceable_wrapper_subclass_type(cls) for cls in types):
            return NotImplemented      # let the subclass unwrap; its inner ops come back here
        kwargs = kwargs or {}
        if self.scratch is None or not self.scratch.active:
            outputs = func(*args, **kwargs)
            self.counter.record_outputs(outputs, args, kwargs)
            return outputs
        with self.scratch.op(len(self.bytes_after_op)):
            outputs = func(*args, **kwargs)
        self.counter.record_outputs(outputs, args, kwargs)
        self.bytes_after_op.append(self.counter.device_bytes)
        return outputs

    def add_scratch(self) -> None:
        """Raise the peak by each op's scratch on top of the bytes live when it returned."""
        if self.scratch is None:
            return
        for index, scratch_bytes in self.scratch.scratch_bytes().items():
            self.counter.record_transient(scratch_bytes, at_bytes=self.bytes_after_op[index])


# --------------------------------------------------------------------------- CUDA

_ACTIVE_CUDA_PEAKS: dict[int, list["_CudaPeak"]] = {}   # device index -> trackers, outermost first


class _CudaPeak:
    """Peak of `torch.cuda.max_memory_allocated` since `start`, robust to nesting: a tracker
    entered inside another resets the device's peak statistic, so the outer ones first fold
    the peak so far into their own maximum."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.folded_peak = 0

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        active = _ACTIVE_CUDA_PEAKS.setdefault(self.device.index, [])
        for outer in active:
            outer.fold()
        torch.cuda.reset_peak_memory_stats(self.device)
        active.append(self)
        start_bytes = torch.cuda.memory_allocated(self.device)
        self.folded_peak = start_bytes
        return start_bytes

    def fold(self) -> None:
        self.folded_peak = max(self.folded_peak, torch.cuda.max_memory_allocated(self.device))

    def peak(self) -> int:
        return max(self.folded_peak, torch.cuda.max_memory_allocated(self.device))

    def stop(self) -> None:
        torch.cuda.synchronize(self.device)
        self.fold()
        active = _ACTIVE_CUDA_PEAKS.get(self.device.index, [])
        if self in active:
            active.remove(self)


# --------------------------------------------------------------------------- public API

_ACTIVE_TRACKERS: list[StepMemoryTracker] = []


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class StepMemoryTracker:
    """Peak device memory of the code run inside ``with StepMemoryTracker(device, resident):``.

    On CUDA the caching allocator's statistics (absolute: everything on the device counts,
    ``resident`` is not needed, and the device's peak statistic is reset on entry); on any
    other device the storage tracker described in the module docstring, which counts the
    storages of ``resident`` from the start, plus (``measure_scratch``, default on, CPU) the
    transient scratch every op allocates and frees inside its call, from the allocator's
    events (`planner.scratch.OpScratch`; added to the peak when the block ends, and not
    measured when another profiler is running).
    Properties are live inside the block and frozen after it; `report` gives the result.
    A tracker is used once.
    """

    def __init__(self, device: torch.device | str, resident: Iterable[torch.Tensor] = (), *,
                 measure_scratch: bool = True) -> None:
        self.device = _normalize_device(device)
        self.measure_scratch = measure_scratch
        self.method = CUDA_ALLOCATOR if self.device.type == "cuda" else STORAGE_TRACKER
        self._resident = tuple(resident)
        self._counter: _StorageCounter | None = None
        self._mode: _CountingMode | None = None
        self._scratch: OpScratch | None = None
        self._cuda: _CudaPeak | None = None
        self._start_bytes = 0
        self._state = "new"          # new -> active -> done
        self._final: MemoryReport | None = None
        self._final_host_bytes = 0

    # -- context manager

    def __enter__(self) -> StepMemoryTracker:
        if self._state != "new":
            raise UnsupportedUseError("a StepMemoryTracker is used once; make a new one for each step")
        if self.method == CUDA_ALLOCATOR:
            self._cuda = _CudaPeak(self.device)
            self._start_bytes = self._cuda.start()
        else:
            self._counter = _StorageCounter(self.device)
            self._counter.start(self._resident)
            if self.measure_scratch and self.device.type == "cpu":
                self._scratch = OpScratch().__enter__()
            self._mode = _CountingMode(self._counter, self._scratch)
            self._mode.__enter__()
        self._resident = ()
        self._state = "active"
        _ACTIVE_TRACKERS.append(self)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:  # noqa: ANN001
        _ACTIVE_TRACKERS.remove(self)
        try:
            if self._mode is not None:
                self._mode.__exit__(exc_type, exc_value, traceback)
        finally:
            if self._scratch is not None:
                self._scratch.__exit__(exc_type, exc_value, traceback)
                self._mode.add_scratch()
            if self._cuda is not None:
                self._cuda.stop()
            self._final = self._snapshot()
            _LOG.debug("step memory on %s: %s", self.device, self._final)
            if self._counter is not None:
                self._final_host_bytes = self._counter.host_bytes
                self._counter.stop()
            self._state = "done"

    # -- live values

    def _require_started(self) -> None:
        if self._state == "new":
            raise UnsupportedUseError("the tracker has not started; use it as "
                                      "`with StepMemoryTracker(...) as tracker:`")

    @property
    def current_bytes(self) -> int:
        """Device bytes live now (at exit, once the block has ended)."""
        self._require_started()
        if self._final is not None:
            return self._final.end_bytes
        if self._cuda is not None:
            return torch.cuda.memory_allocated(self.device)
        return self._counter.device_bytes

    @property
    def peak_bytes(self) -> int:
        """Most device bytes live at once since the start, resident tensors included."""
        self._require_started()
        if self._final is not None:
            return self._final.peak_bytes
        if self._cuda is not None:
            return self._cuda.peak()
        return self._counter.device_peak

    @property
    def host_bytes(self) -> int:
        """Bytes of the host copies marked with `mark_host` and still alive (0 on CUDA)."""
        self._require_started()
        if self._final is not None:
            return self._final_host_bytes
        return 0 if self._counter is None else self._counter.host_bytes

    def mark_host(self, tensor: torch.Tensor) -> None:
        """This tensor's storage is a host (offloaded) copy: count it as host memory, never in
        the device peak, for its whole life. On CUDA a host copy is a (pinned) CPU tensor the
        allocator never sees, so this only checks that the tensor is not on a CUDA device.

        Raises:
            MeasurementError (a ValueError): the tensor is not in CPU memory.
            UnsupportedUseError (a RuntimeError): the tracker is not active.
        """
        if self._state != "active":
            raise UnsupportedUseError("mark_host is called inside the tracked block, not before or after it; "
                                      "call it within `with StepMemoryTracker(...) as tracker:`")
        if self._counter is not None:
            self._counter.mark_host(tensor)
        elif tensor.device.type == "cuda":
            raise _device_copy_error(tensor.device)

    def report(self) -> MemoryReport:
        """The measurement: final after the block, a snapshot inside it."""
        self._require_started()
        return self._final if self._final is not None else self._snapshot()

    def _snapshot(self) -> MemoryReport:
        if self._cuda is not None:
            return MemoryReport(peak_bytes=self._cuda.peak(), start_bytes=self._start_bytes,
                                end_bytes=torch.cuda.memory_allocated(self.device), host_peak_bytes=0,
                                device=str(self.device), method=self.method)
        counter = self._counter
        with counter._lock:
            return MemoryReport(peak_bytes=counter.device_peak, start_bytes=counter.device_timeline[0],
                                end_bytes=counter.device_bytes, host_peak_bytes=counter.host_peak,
                                device=str(self.device), method=self.method)


def mark_host(tensor: torch.Tensor) -> None:
    """Tell every active `StepMemoryTracker` that this tensor is a host (offloaded) copy;
    nothing when none is active. The runtime calls this on each copy it offloads
    (`runtime.offload.HOST_COPY_OBSERVERS`)."""
    for tracker in _ACTIVE_TRACKERS:
        tracker.mark_host(tensor)


offload.HOST_COPY_OBSERVERS.append(mark_host)


def measure_step_memory(step: Callable[[], object], device: torch.device | str,
                        resident: Iterable[torch.Tensor] = ()) -> tuple[object, MemoryReport]:
    """Run ``step()`` once under a `StepMemoryTracker`; its result and the memory report.

    ``resident``: the tensors live for the whole step (parameters, buffers, inputs), counted
    from the start by the storage tracker. The result stays alive, so ``end_bytes`` counts it.
    """
    with StepMemoryTracker(device, resident) as tracker:
        result = step()
    return result, tracker.report()


# --------------------------------------------------------------------------- allocator events (CPU)


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """Python's cyclic garbage collector disabled inside, as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure_allocator_peak(step: Callable[[], object], resident: Iterable[torch.Tensor] = ()) -> tuple[object, int]:
    """Run ``step()`` once under ``torch.profiler`` with ``profile_memory=True`` and return its
    result and the peak of live bytes from the allocator's own events: every allocation and
    free of the step in time order (kernel scratch, tensors made outside aten included),
    on top of the distinct storages of ``resident`` (parameters, buffers, inputs) alive at
    entry. This is the independent measurement the storage tracker is checked against.

    The result is kept alive, so what it holds counts until the end as for the tracker.
    The step must not free memory allocated before it (set ``.grad`` to None first): the
    profiler reports such a free with its size only when it saw the allocation, so its
    running sum would start below zero.

    Raises:
        MeasurementError (a ValueError): the step freed memory that an earlier profiled region
            allocated.
    """
    resident_storages = {s._cdata: s.nbytes() for t in resident for s in _storages_of(t)}
    # garbage from before the step, collected inside it, would be a free of an earlier
    # allocation: the collector is off for the step instead of run before it (a full
    # collection took 0.3 s after inductor compiled the zoo GPT small, a fifth of what
    # compile=True's fit adds to the compile). Reference counting still frees at once; only
    # a cycle made inside the step lives to its end, which counts it (a higher peak, never
    # a lower one)
    with kineto_quiet(), _collector_off(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = step()
    with kineto_quiet():
        events = profiler.profiler.kineto_results.events()
    allocations = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    live_bytes = high_water_bytes = 0
    for _, nbytes in allocations:
        live_bytes += nbytes
        high_water_bytes = max(high_water_bytes, live_bytes)
        if live_bytes < 0:
            raise MeasurementError("measure_allocator_peak: the step freed memory allocated before it (old .grad "
                                   "tensors?); free it before measuring, e.g. model.zero_grad(set_to_none=True)")
    return result, sum(resident_storages.values()) + high_water_bytes


def measure_allocator_peak_by_address(step: Callable[[], object], resident: Iterable[torch.Tensor] = ()
                                      ) -> tuple[object, int]:
    """`measure_allocator_peak` for a step with collectives on a CPU process group (gloo),
    whose communication threads free memory the calling thread allocated: gloo's
    reduce-scatter clones its input on the calling thread and the clone dies with the
    collective's work on a communication thread, where the profiler records no event, so
    the plain running sum would hold it to the end of the step (a ghost the size of the
    input per reduce-scatter). Here allocations and frees are paired by address (from the
    profiler's trace): an allocation whose free was not recorded counts until the
    collective it was made in (a ``c10d::`` op) returns; made outside one, until its
    address is allocated again, else to the end of the step. Slower than
    `measure_allocator_peak` (the trace is written and read back as JSON).

    Raises:
        MeasurementError (a ValueError): as `measure_allocator_peak`.
    """
    import json
    import os
    import tempfile

    resident_storages = {s._cdata: s.nbytes() for t in resident for s in _storages_of(t)}
    with kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = step()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        with kineto_quiet():
            profiler.export_chrome_trace(path)
        with open(path) as file:
            trace = json.load(file)["traceEvents"]
    finally:
        os.remove(path)
    collectives = sorted((event["ts"], event["ts"] + event.get("dur", 0.0)) for event in trace
                         if event.get("ph") == "X" and str(event.get("name", "")).startswith("c10d::"))
    memory = sorted((event["ts"], index, event["args"]["Bytes"], event["args"]["Addr"])
                    for index, event in enumerate(trace) if event.get("name") == "[memory]")
    open_at: dict[int, tuple[float, int]] = {}       # address -> (allocated at, bytes)
    changes: list[tuple[float, int]] = []
    end = memory[-1][0] if memory else 0.0

    def close_unrecorded(address: int, until: float) -> None:
        allocated_at, size = open_at.pop(address)
        inside = [stop for start, stop in collectives if start <= allocated_at <= stop]
        changes.append((min(inside[-1], until) if inside else until, -size))

    for time_us, _, nbytes, address in memory:
        if nbytes > 0:
            if address in open_at:             # freed where the profiler could not see it
                close_unrecorded(address, time_us)
            open_at[address] = (time_us, nbytes)
            changes.append((time_us, nbytes))
        elif address in open_at:
            open_at.pop(address)
            changes.append((time_us, nbytes))
        else:                                  # allocated before the step
            changes.append((time_us, nbytes))
    for address in list(open_at):
        allocated_at, _ = open_at[address]
        if any(start <= allocated_at <= stop for start, stop in collectives):
            close_unrecorded(address, end)
    live_bytes = high_water_bytes = 0
    for _, nbytes in sorted(changes, key=lambda change: (change[0], change[1] > 0)):
        live_bytes += nbytes
        high_water_bytes = max(high_water_bytes, live_bytes)
        if live_bytes < 0:
            raise MeasurementError("measure_allocator_peak_by_address: the step freed memory allocated before it "
                                   "(old .grad tensors?); free it before measuring, e.g. "
                                   "model.zero_grad(set_to_none=True)")
    return result, sum(resident_storages.values()) + high_water_bytes
