"""Transient scratch memory of CPU kernels, from the allocator's own events.

Many CPU kernels allocate and free memory inside one call: oneDNN convolutions, fused
attention, and also ops nobody lists, such as ``native_batch_norm_backward``, which on a
ResNet-50 takes a 24.5 MiB temporary beside its 24.5 MiB gradient. The storage tracker
never sees it (no tensor holds it), yet it is part of the physical peak the budget caps;
a plan for ResNet-50 at 30 % ran 0.6 MiB over its budget because of it.

`OpScratch` measures it for every op without a list of op families: one profiler session
(``profile_memory=True``) records every allocation and free; each op runs inside a named
range (`OpScratch.op`); afterwards an op's scratch is the most bytes its range held at
once beyond what it still held at its end (its new outputs). On CUDA the caching
allocator's high-water mark shows workspace directly (see `planner.profile`).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
from typing import Hashable, Iterator

import torch

from solvers.quiet import native_output_silenced

log = logging.getLogger(__name__)

_RANGE_PREFIX = "memsched::op::"


class OpScratch:
    """Scratch bytes of the ops run inside `op` ranges while the session is open.

    Use as ``with OpScratch() as session: ... with session.op(key): run(op) ...`` and read
    `scratch_bytes` after the block. When another profiler is already running (profilers
    do not nest), the session is inactive: `op` is a no-op and `scratch_bytes` is empty,
    and `active` says so.
    """

    def __init__(self) -> None:
        self.active = False
        self._profiler: torch.profiler.profile | None = None
        self._keys: dict[str, Hashable] = {}
        self._scratch: dict[Hashable, int] = {}

    def __enter__(self) -> OpScratch:
        if torch.autograd.profiler._is_profiler_enabled:
            log.debug("a profiler is already running: CPU scratch memory is not measured")
            return self
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with kineto_quiet():
            self._profiler.__enter__()
        self.active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._profiler is None:
            return
        with kineto_quiet():
            self._profiler.__exit__(*exc_info)
            events = self._profiler.profiler.kineto_results.events()
        self._profiler = None
        if exc_info[0] is None:
            self._scratch = self._measure(events)

    @contextlib.contextmanager
    def op(self, key: Hashable) -> Iterator[None]:
        """Run one op inside this range; its scratch is reported under ``key``."""
        if not self.active:
            yield
            return
        label = f"{_RANGE_PREFIX}{len(self._keys)}"
        self._keys[label] = key
        with torch.profiler.record_function(label):
            yield

    def scratch_bytes(self) -> dict[Hashable, int]:
        """``{key: bytes}`` for the ranges that held scratch (the largest, when a key ran twice)."""
        return dict(self._scratch)

    def _measure(self, events: list) -> dict[Hashable, int]:
        allocations = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
        stamps = [stamp for stamp, _ in allocations]
        live_bytes = list(itertools.accumulate(nbytes for _, nbytes in allocations))
        scratch: dict[Hashable, int] = {}
        for event in events:
            key = self._keys.get(event.name())
            if key is None:
                continue
            first = bisect.bisect_left(stamps, event.start_ns())
            last = bisect.bisect_right(stamps, event.end_ns())
            if first >= last:
                continue
            inside = live_bytes[first:last]
            held_bytes = max(inside) - inside[-1]
            if held_bytes > 0:
                scratch[key] = max(scratch.get(key, 0), held_bytes)
        return scratch


def kineto_quiet() -> contextlib.AbstractContextManager[None]:
    """The profiler's C++ backend prints a line to stderr at every start and stop,
    whatever its log level; silence file descriptor 2 for that short window only."""
    return native_output_silenced(2)
