"""Named accelerators to plan for without owning one: capacity, peak arithmetic per dtype,
memory bandwidth, host link and kernel-launch floor (torch-free data; `planner.roofline`
turns an op's FLOPs and bytes into time with them, `planner.estimate` plans with them).

Figures are the vendors' published dense (no structured sparsity) peaks; the sources are
named per target. Real kernels reach a fraction of a peak: ``compute_efficiency`` and
``memory_efficiency`` are those fractions, taken as typical large-GEMM and streaming-copy
results (about 0.7 of tensor-core peak for cuBLAS GEMMs, 0.8 of HBM bandwidth for a copy).
The host link is the practical pinned-copy bandwidth per direction, below the bus's
nominal figure (PCIe 5 x16: 64 GB/s nominal, about 50 GB/s measured).

The roofline model is Williams, Waterman and Patterson, "Roofline: an insightful visual
performance model for multicore architectures", CACM 2009.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from solvers.errors import OptionError
from solvers.graph import Transfer

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class DeviceTarget:
    """One accelerator's figures. FLOP/s are keyed by dtype name as `solvers.Value.dtype`
    spells it (``"float32"``, ``"bfloat16"``, ...); a dtype not listed is priced by bytes moved."""

    name: str
    device_type: str                       # "cuda" or "cpu": which kernels the step traces to
    memory_bytes: int
    flops_per_s: Mapping[str, float]
    memory_bytes_per_s: float
    host_link_bytes_per_s: float
    launch_ms: float = 0.005               # per kernel: launch and the smallest kernel's time
    compute_efficiency: float = 0.7
    memory_efficiency: float = 0.8
    host_link_latency_ms: float = 0.01
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def transfer(self) -> Transfer:
        """The host link as the solvers price offload (`solvers.graph.Transfer`)."""
        bytes_per_ms = self.host_link_bytes_per_s / 1e3
        return Transfer(bytes_per_ms, bytes_per_ms, self.host_link_latency_ms, f"target {self.name}")

    def flops_for(self, dtype: str) -> float | None:
        """Peak FLOP/s for arithmetic in ``dtype``, or None (priced by bytes moved)."""
        return self.flops_per_s.get(dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "device_type": self.device_type, "memory_bytes": self.memory_bytes,
                "flops_per_s": dict(self.flops_per_s), "memory_bytes_per_s": self.memory_bytes_per_s,
                "host_link_bytes_per_s": self.host_link_bytes_per_s, "launch_ms": self.launch_ms,
                "compute_efficiency": self.compute_efficiency, "memory_efficiency": self.memory_efficiency,
                "source": self.source}


def _gpu(name: str, memory_mib: int, fp32_tflops: float, bf16_tflops: float, hbm_gb_per_s: float,
         host_link_gb_per_s: float, source: str, fp64_tflops: float | None = None) -> DeviceTarget:
    flops = {"float32": fp32_tflops * TERA, "bfloat16": bf16_tflops * TERA, "float16": bf16_tflops * TERA}
    if fp64_tflops is not None:
        flops["float64"] = fp64_tflops * TERA
    return DeviceTarget(name=name, device_type="cuda", memory_bytes=memory_mib * 2**20, flops_per_s=flops,
                        memory_bytes_per_s=hbm_gb_per_s * GIGA, host_link_bytes_per_s=host_link_gb_per_s * GIGA,
                        source=source)


# Memory is the total the driver reports (nvidia-smi), a little below the marketed size.
# float32 matmuls run on the FP32 units: PyTorch leaves TF32 off for matmuls by default.
DEVICE_TARGETS: dict[str, DeviceTarget] = {target.name: target for target in (
    _gpu("h100-sxm", 81_559, 67, 989, 3350, 50, fp64_tflops=34,
         source="NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB: FP32 67 TFLOPS, BF16 1,979 TFLOPS with "
                "sparsity = 989 dense, HBM3 3.35 TB/s); PCIe 5 x16 host link"),
    _gpu("h100-pcie", 81_559, 51, 756, 2000, 50, fp64_tflops=26,
         source="NVIDIA H100 PCIe product brief (80 GB HBM2e 2.0 TB/s, FP32 51 TFLOPS, BF16 1,513 TFLOPS with "
                "sparsity = 756 dense); PCIe 5 x16"),
    _gpu("h200", 143_771, 67, 989, 4800, 50, fp64_tflops=34,
         source="NVIDIA H200 Tensor Core GPU datasheet (SXM 141 GB HBM3e 4.8 TB/s, FP32 67 TFLOPS, BF16 1,979 "
                "TFLOPS with sparsity = 989 dense); PCIe 5 x16"),
    _gpu("a100-40gb", 40_536, 19.5, 312, 1555, 25, fp64_tflops=9.7,
         source="NVIDIA A100 Tensor Core GPU datasheet (40 GB HBM2 1,555 GB/s, FP32 19.5 TFLOPS, BF16 312 "
                "TFLOPS dense); PCIe 4 x16"),
    _gpu("a100-80gb", 81_920, 19.5, 312, 2039, 25, fp64_tflops=9.7,
         source="NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM HBM2e 2,039 GB/s, FP32 19.5 TFLOPS, BF16 312 "
                "TFLOPS dense); PCIe 4 x16"),
    _gpu("l4", 23_034, 30.3, 121, 300, 25,
         source="NVIDIA L4 Tensor Core GPU datasheet (24 GB GDDR6 300 GB/s, FP32 30.3 TFLOPS, BF16 242 TFLOPS "
                "with sparsity = 121 dense); PCIe 4 x16"),
    _gpu("rtx-4090", 24_564, 82.6, 165.2, 1008, 25,
         source="NVIDIA Ada Lovelace GPU architecture whitepaper (RTX 4090: 24 GB GDDR6X 1,008 GB/s, FP32 82.6 "
                "TFLOPS, BF16 tensor 165.2 TFLOPS with FP32 accumulate); PCIe 4 x16"),
)}


# the transfer-only names `optimize(target=...)` takes (`solvers.graph.TARGETS`) that name a device
ALIASES = {"h100-pcie5": "h100-pcie", "h100-pcie4": "h100-pcie", "a100-pcie4": "a100-80gb"}


def device_target(name: str | DeviceTarget) -> DeviceTarget:
    """The named target (or ``name`` itself when it is one); `OptionError` listing the names."""
    if isinstance(name, DeviceTarget):
        return name
    name = ALIASES.get(name, name)
    if name not in DEVICE_TARGETS:
        raise OptionError(f"unknown target {name!r}; choose one of {', '.join(sorted(DEVICE_TARGETS))}, "
                          "or pass a solvers.targets.DeviceTarget (planner.roofline.measure_cpu_target() "
                          "measures this machine's CPU)")
    return DEVICE_TARGETS[name]


def with_efficiency(target: DeviceTarget, *, compute: float | None = None, memory: float | None = None) -> DeviceTarget:
    """``target`` with other achievable fractions of its peaks."""
    return replace(target, compute_efficiency=target.compute_efficiency if compute is None else compute,
                   memory_efficiency=target.memory_efficiency if memory is None else memory)
