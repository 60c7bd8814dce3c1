"""Silence what native libraries write straight to a file descriptor, around them only.

Some C/C++ code behind memsched writes to the process's descriptors whatever its log
settings: HiGHS its banner to stdout when the first ``Highs`` is made (`solvers.ilp`),
torch's profiler backend a line to stderr at each start and stop (`planner.scratch`).
memsched prints nothing to stdout, so these writes go to the null device.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def native_output_silenced(fd: int) -> Iterator[None]:
    """File descriptor ``fd`` (1: stdout, 2: stderr) points at the null device inside the
    block; Python's buffered output on it is flushed first, C stdio's before it comes back.
    Process-wide while it lasts, other threads' writes included: keep the block short."""
    stream = sys.stdout if fd == 1 else sys.stderr
    if stream is not None:
        stream.flush()
    saved_fd = os.dup(fd)
    null_fd = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null_fd, fd)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            ctypes.CDLL(None).fflush(None)        # no C library handle on some platforms: nothing buffered to lose
        os.dup2(saved_fd, fd)
        os.close(saved_fd)
        os.close(null_fd)
