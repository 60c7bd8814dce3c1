"""Op time without running the op: a roofline over the op's FLOPs and bytes moved.

For one aten op on a `solvers.targets.DeviceTarget`:

    time_ms = launch_ms + max(FLOPs / (peak FLOP/s[dtype] x compute_efficiency),
                              bytes moved / (memory bandwidth x memory_efficiency))

(Williams, Waterman and Patterson, "Roofline", CACM 2009). FLOPs come from PyTorch's own
formulas (`torch.utils.flop_counter`: matmuls, convolutions and their backwards, attention);
CPU's fused attention kernels, which that registry does not list, are counted with its
attention formulas. Every other op is priced by the bytes it reads and writes. A view
costs nothing: it launches no kernel. Evaluation is O(number of tensor arguments) per op.

`measure_cpu_target` measures this machine's figures (a matmul and a copy benchmark), so
the model can be checked against `planner.profile`'s measured times here.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils import flop_counter

from runtime import chunked_loss
from solvers.targets import DeviceTarget

aten = torch.ops.aten

# PyTorch's FLOP registry covers the CUDA attention kernels; the CPU ones have the same maths
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default:
        lambda args: flop_counter.sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        lambda args: flop_counter.sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape,
                                                           args[3].shape),
}


def op_flops(target: Any, args: tuple, kwargs: dict, result: Any) -> int:
    """Floating-point operations of one call (a multiply-add is 2); 0 for ops that only
    move data."""
    if target in (chunked_loss.FORWARD, chunked_loss.BACKWARD):
        return chunked_loss.chunk_flops(target, args)
    if target in _CPU_ATTENTION:
        return int(_CPU_ATTENTION[target](args))
    packet = getattr(target, "overloadpacket", None)
    formula = flop_counter.flop_registry.get(packet) if packet is not None else None
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=result))


def bytes_moved(args: tuple, kwargs: dict, result: Any) -> int:
    """Bytes the op reads (every tensor argument, as viewed) and writes (every tensor result)."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def is_view(target: Any) -> bool:
    """The op returns views of its inputs and launches no kernel."""
    return isinstance(target, torch._ops.OpOverload) and target.is_view


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def op_time_ms(target: Any, args: tuple, kwargs: dict, result: Any, device: DeviceTarget) -> float:
    """The roofline time of one call on ``device`` (module docstring)."""
    if is_view(target):
        return 0.0
    if target in (chunked_loss.FORWARD, chunked_loss.BACKWARD):
        return _chunked_loss_time_ms(target, args, device)
    flops = op_flops(target, args, kwargs, result)
    compute_ms = 0.0
    if flops:
        first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                      and t.dtype.is_floating_point), None)
        peak = device.flops_for(_dtype_name(first.dtype)) if first is not None else None
        peak = peak or device.flops_for("float32")
        if peak:
            compute_ms = flops / (peak * device.compute_efficiency) * 1e3
    memory_ms = bytes_moved(args, kwargs, result) / (device.memory_bytes_per_s * device.memory_efficiency) * 1e3
    return device.launch_ms + max(compute_ms, memory_ms)


def _chunked_loss_time_ms(target: Any, args: tuple, device: DeviceTarget) -> float:
    """A chunked loss call runs its kernels one after another, each chunk's matmuls
    (compute-bound) then its upcast, log-softmax and loss (memory-bound): the sum of its
    compute and memory times, and one launch per kernel."""
    hidden = args[0] if target is chunked_loss.FORWARD else args[1]
    peak = device.flops_for(_dtype_name(hidden.dtype)) or device.flops_for("float32")
    compute_ms = chunked_loss.chunk_flops(target, args) / (peak * device.compute_efficiency) * 1e3 if peak else 0.0
    memory_ms = (chunked_loss.chunk_bytes_moved(target, args)
                 / (device.memory_bytes_per_s * device.memory_efficiency) * 1e3)
    return chunked_loss.chunk_kernels(target, args) * device.launch_ms + compute_ms + memory_ms


def measure_cpu_target(*, matmul_size: int = 1024, copy_bytes: int = 64 * 2**20, repeats: int = 5) -> DeviceTarget:
    """This machine's CPU as a target, from three benchmarks on the current torch threads:
    a ``matmul_size``-square float32 matmul (FLOP/s), a ``copy_bytes`` clone (bytes read and
    written per second), and a one-element add (the per-op floor). The fastest of
    ``repeats`` after a warm-up, as `planner.profile` times CPU ops. Efficiencies are 1:
    the figures are what the kernels reach here."""
    def fastest_s(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return min(times)

    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    matmul_flops = 2 * matmul_size**3 / fastest_s(lambda: torch.mm(a, b))
    source = torch.empty(copy_bytes // 4)
    copy_bytes_per_s = 2 * copy_bytes / fastest_s(source.clone)
    one = torch.ones(1)
    launch_ms = statistics.median(fastest_s(lambda: torch.add(one, one)) for _ in range(3)) * 1e3
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceTarget(
        name="cpu-here", device_type="cpu", memory_bytes=memory_bytes,
        flops_per_s={"float32": matmul_flops}, memory_bytes_per_s=copy_bytes_per_s,
        host_link_bytes_per_s=copy_bytes_per_s, launch_ms=launch_ms, compute_efficiency=1.0,
        memory_efficiency=1.0,
        source=f"measured here on {torch.get_num_threads()} thread(s): {matmul_size}^2 float32 matmul "
               f"{matmul_flops / 1e9:.1f} GFLOP/s, {copy_bytes >> 20} MiB clone {copy_bytes_per_s / 1e9:.1f} GB/s, "
               f"one-element add {launch_ms * 1e3:.1f} us")
