"""Plan a training step for a device you do not have, without running it.

``estimate(model, budget, example_inputs, target="h100-sxm")`` returns a `Plan` made
without allocating the model's memory or running one real op:

* the step is captured as `optimize` captures it (`planner.capture`, already on fake
  tensors); a model built under ``torch.device("meta")`` and meta inputs work, traced as
  CPU kernels with the same shapes;
* the graph is walked on fake tensors by the same `planner.profile.GraphBuilder` that
  profiles real runs, so ops, values, bytes and aliases come out as `optimize`'s; each
  op's time is the target's roofline (`planner.roofline`) instead of a measurement;
* the optimizer's state is resident memory (`optimizer_state_bytes`), and
  ``budget="device"`` is the target's capacity less `DEVICE_RESERVE_BYTES`.

What the fake walk cannot know: CPU kernels' scratch memory and the CUDA allocator's
per-op workspace, measured by `planner.profile` and 0 here; and the CUDA attention
kernels' saved tensors, priced as CPU's fused attention saves them (a logsumexp per row
beside the output, as CUDA's flash kernel does).

Time: one trace and one fake walk, O(nodes); the solve is `solvers.solve`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from rich.console import Console
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from planner.budget import parse_budget, resolve_budget
from planner.capture import CapturedStep, capture, fake_tensor
from planner.chunked_loss import chunk_linear_cross_entropy, chunk_rows_option
from planner.errors import OptionError
from planner.profile import FakeGraphBuilder, assemble_graph, rng_state_bytes, step_arguments, with_released_outputs
from planner.roofline import op_time_ms
from runtime.chunked_loss import BACKWARD as CHUNKED_BACKWARD, FORWARD as CHUNKED_FORWARD, chunk_scratch_bytes
from solvers.errors import InfeasibleBudgetError, format_bytes
from solvers.graph import Graph, Transfer, Value, ValueKind
from solvers.plan import Plan
from solvers.portfolio import solve
from solvers.targets import DeviceTarget, device_target

log = logging.getLogger(__name__)

# What `budget="device"` leaves free on a CUDA target: the CUDA context (about 0.5 GiB,
# outside the allocator's count), cuBLAS/cuDNN workspaces and the caching allocator's
# fragmentation.
DEVICE_RESERVE_BYTES = 2 * 2**30

# Optimizer state per trainable parameter, in bytes, besides the parameter and its gradient.
# AdamW (Loshchilov and Hutter, 2019) keeps two fp32 moments; SGD with momentum one buffer.
OPTIMIZER_STATE_BYTES_PER_PARAMETER = {"adamw": 8, "adam": 8, "sgd": 0, "sgd-momentum": 4, None: 0}
OPTIMIZER_STATE_VALUE = "optimizer_state"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Where the plan's peak goes, in bytes."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int     # moments and, for 16-bit parameters, their fp32 master copy
    input_bytes: int
    activation_bytes: int          # the rest of the peak: activations, backward work, workspace
    peak_bytes: int


@dataclasses.dataclass(frozen=True)
class Estimate:
    """`estimate_step`'s answer: the plan, its graph, the target and the breakdown."""

    plan: Plan
    graph: Graph
    target: DeviceTarget
    memory: MemoryBreakdown
    budget_bytes: int
    keep_all_time_ms: float
    estimate_time_s: float

    @property
    def fits(self) -> bool:
        """The plan's predicted peak is within the target's memory less the reserve."""
        return self.plan.predicted_peak_bytes <= usable_bytes(self.target)

    def summary(self) -> str:
        m = self.memory
        return (f"{self.graph.name} on {self.target.name}: peak {format_bytes(m.peak_bytes)} "
                f"(parameters {format_bytes(m.parameter_bytes)}, gradients {format_bytes(m.gradient_bytes)}, "
                f"optimizer state {format_bytes(m.optimizer_state_bytes)}, inputs {format_bytes(m.input_bytes)}, "
                f"activations {format_bytes(m.activation_bytes)}); step {self.plan.predicted_time_ms:.1f} ms, "
                f"{self.plan.overhead:+.1%} over keeping everything; "
                f"{'fits' if self.fits else 'does not fit'} in {format_bytes(usable_bytes(self.target))} usable")


def usable_bytes(target: DeviceTarget) -> int:
    """What a step may use on ``target``: its capacity less `DEVICE_RESERVE_BYTES` (CUDA)."""
    return target.memory_bytes - (DEVICE_RESERVE_BYTES if target.device_type == "cuda" else 0)


def estimate(model: torch.nn.Module, budget: int | float | str, example_inputs: Sequence[Any] | Any, *,
             target: str | DeviceTarget, example_kwargs: Mapping[str, Any] | None = None,
             optimizer: str | None = None, autocast: str | torch.dtype | None = None, solver: str = "auto",
             solver_options: Mapping[str, Any] | None = None, backward_from: str = "auto",
             release_outputs: bool = False, chunked_loss: bool | int = False, progress: bool | None = None) -> Plan:
    """A plan for ``model``'s training step on ``target``, made without running it
    (module docstring). ``budget`` is as `optimize`'s, or ``"device"``: the target's
    memory less `DEVICE_RESERVE_BYTES`. ``optimizer`` (``"adamw"``, ``"adam"``,
    ``"sgd-momentum"``, ``"sgd"`` or None) adds its state to the resident memory;
    ``autocast`` (``"bf16"``/``"fp16"``) traces the step under autocast; ``chunked_loss``
    is `planner.optimize`'s (the plan's overhead is then over keeping all of the chunked
    step, which computes the logits' matmul once more than eager). `estimate_step`
    returns the breakdown beside the plan."""
    return estimate_step(model, budget, example_inputs, target=target, example_kwargs=example_kwargs,
                         optimizer=optimizer, autocast=autocast, solver=solver, solver_options=solver_options,
                         backward_from=backward_from, release_outputs=release_outputs, chunked_loss=chunked_loss,
                         progress=progress).plan


def estimate_step(model: torch.nn.Module, budget: int | float | str, example_inputs: Sequence[Any] | Any, *,
                  target: str | DeviceTarget, example_kwargs: Mapping[str, Any] | None = None,
                  optimizer: str | None = None, autocast: str | torch.dtype | None = None, solver: str = "auto",
                  solver_options: Mapping[str, Any] | None = None, backward_from: str = "auto",
                  release_outputs: bool = False, chunked_loss: bool | int = False,
                  progress: bool | None = None) -> Estimate:
    """`estimate`, with the graph, the memory breakdown and whether it fits."""
    started = time.perf_counter()
    device = device_target(target)
    if optimizer not in OPTIMIZER_STATE_BYTES_PER_PARAMETER:
        raise OptionError(f"optimizer={optimizer!r}; choose one of "
                          f"{', '.join(repr(k) for k in OPTIMIZER_STATE_BYTES_PER_PARAMETER if k)} or None")
    if budget != "device":
        parse_budget(budget)                                   # a bad budget fails before tracing
    chunk_rows_option(chunked_loss)
    _, graph = estimated_graph(model, example_inputs, target=device, example_kwargs=example_kwargs,
                               autocast=autocast, backward_from=backward_from, release_outputs=release_outputs,
                               chunked_loss=chunked_loss, progress=progress)
    state_bytes = optimizer_state_bytes(model, optimizer)
    if state_bytes:
        graph = with_resident_bytes(graph, OPTIMIZER_STATE_VALUE, state_bytes)
    budget_bytes = usable_bytes(device) if budget == "device" else resolve_budget(budget, graph).budget_bytes
    with _phase(progress, f"memsched: solving {len(graph.ops)} ops for {format_bytes(budget_bytes)}"):
        plan = solve(graph, budget_bytes, solver, **dict(solver_options or {}))
    inputs = graph.resident_bytes((ValueKind.INPUT,))
    parameters = graph.resident_bytes((ValueKind.PARAMETER,))
    gradients = graph.gradient_bytes()
    fixed = parameters + gradients + state_bytes + inputs
    memory = MemoryBreakdown(parameter_bytes=parameters, gradient_bytes=gradients, optimizer_state_bytes=state_bytes,
                             input_bytes=inputs, activation_bytes=max(0, plan.predicted_peak_bytes - fixed),
                             peak_bytes=plan.predicted_peak_bytes)
    return Estimate(plan=plan, graph=graph, target=device, memory=memory, budget_bytes=budget_bytes,
                    keep_all_time_ms=graph.total_time_ms, estimate_time_s=time.perf_counter() - started)


def estimated_graph(model: torch.nn.Module, example_inputs: Sequence[Any] | Any, *, target: str | DeviceTarget,
                    example_kwargs: Mapping[str, Any] | None = None, autocast: str | torch.dtype | None = None,
                    backward_from: str = "auto", release_outputs: bool = False, chunked_loss: bool | int = False,
                    progress: bool | None = None) -> tuple[CapturedStep, Graph]:
    """The captured step and its `Graph` with roofline times for ``target``, from fake
    tensors only: no parameter, activation or input memory is allocated. ``chunked_loss``
    is `planner.optimize`'s (`planner.chunked_loss`)."""
    step = traced_step(model, example_inputs, target=target, example_kwargs=example_kwargs, autocast=autocast,
                       backward_from=backward_from, progress=progress)
    if chunked_loss is not False:
        chunk_linear_cross_entropy(step, chunk_rows_option(chunked_loss))
    return step, walked_graph(step, model, example_inputs, target=target, example_kwargs=example_kwargs,
                              release_outputs=release_outputs, progress=progress)


def traced_step(model: torch.nn.Module, example_inputs: Sequence[Any] | Any, *, target: str | DeviceTarget,
                example_kwargs: Mapping[str, Any] | None = None, autocast: str | torch.dtype | None = None,
                backward_from: str = "auto", progress: bool | None = None) -> CapturedStep:
    """``model``'s step captured on fake tensors as it runs on ``target`` (`estimated_graph`'s first half)."""
    device = device_target(target)
    attention = _FusedAttentionDropout() if device.device_type == "cuda" else contextlib.nullcontext()
    with _autocast(autocast), attention, _phase(progress, f"memsched: tracing {type(model).__name__} on fake tensors"):
        return capture(model, _as_tuple(example_inputs), example_kwargs, backward_from=backward_from)


def walked_graph(step: CapturedStep, model: torch.nn.Module, example_inputs: Sequence[Any] | Any, *,
                 target: str | DeviceTarget, example_kwargs: Mapping[str, Any] | None = None,
                 release_outputs: bool = False, progress: bool | None = None) -> Graph:
    """``step``'s `Graph`, walked on fake tensors with roofline times (`estimated_graph`'s second half)."""
    device = device_target(target)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    arguments = _fake_arguments(step, model, _as_tuple(example_inputs), example_kwargs, fake_mode)
    walk = _RooflineWalk(step, device)
    with fake_mode, torch.enable_grad():
        walk.run(arguments, progress)
    # a CPU target is this machine: its transfers are nominal, as `planner.profile` has them
    transfer = device.transfer if device.device_type == "cuda" else Transfer(source="nominal (not measured)")
    graph = assemble_graph(walk, step, transfer=transfer, device=device.device_type, name=type(model).__name__,
                           rng_state_bytes=rng_state_bytes(torch.device(device.device_type)))
    if release_outputs:
        graph = with_released_outputs(graph, step)
    return graph


def _as_tuple(example_inputs: Sequence[Any] | Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        return (example_inputs,)
    return tuple(example_inputs)


def optimizer_state_bytes(model: torch.nn.Module, optimizer: str | None) -> int:
    """Bytes the optimizer keeps for ``model``'s trainable parameters
    (`OPTIMIZER_STATE_BYTES_PER_PARAMETER`), plus an fp32 master copy of every parameter
    stored in 16 bits (mixed-precision training updates fp32 weights). With
    ``torch.autocast`` the parameters stay fp32 and are themselves the master copy."""
    per_parameter = OPTIMIZER_STATE_BYTES_PER_PARAMETER[optimizer]
    if optimizer is None:
        return 0
    total = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            master = 4 if parameter.dtype in (torch.bfloat16, torch.float16) else 0
            total += parameter.numel() * (per_parameter + master)
    return total


def with_resident_bytes(graph: Graph, name: str, size_bytes: int) -> Graph:
    """``graph`` with one more placeholder of ``size_bytes``, alive for the whole step (the
    optimizer's state, which lives between steps as the parameters do)."""
    if name in graph.value_by_name:
        raise OptionError(f"graph {graph.name!r} already has a value named {name!r}")
    value = Value(name, size_bytes, ValueKind.BUFFER)
    return dataclasses.replace(graph, values=graph.values + (value,), placeholders=graph.placeholders + (name,))


class _RooflineWalk(FakeGraphBuilder):
    """`FakeGraphBuilder` with times from the roofline of ``device``."""

    activity = "estimating"

    def __init__(self, step: CapturedStep, device: DeviceTarget) -> None:
        super().__init__(step, torch.device("cpu"))
        self.target_device = device

    def _timed(self, name: str, target: Any, args: tuple, kwargs: dict) -> tuple[Any, float, int]:
        result = target(*args, **kwargs)
        scratch_bytes = chunk_scratch_bytes(target, args) if target in (CHUNKED_FORWARD, CHUNKED_BACKWARD) else 0
        return result, op_time_ms(target, args, kwargs, result, self.target_device), scratch_bytes


def _fake_arguments(step: CapturedStep, model: torch.nn.Module, example_inputs: Sequence[Any],
                    example_kwargs: Mapping[str, Any] | None, fake_mode: FakeTensorMode) -> list[torch.Tensor]:
    """The joint graph's arguments (`planner.profile.step_arguments`) as fake tensors."""
    with fake_mode:
        tangents = [torch.ones(leaf.shape, dtype=leaf.dtype, device="cpu") for leaf in step.output_leaves
                    if leaf.tangent]
    real = step_arguments(step, model, example_inputs, example_kwargs, tangents=())
    return [fake_tensor(fake_mode, tensor) for tensor in real] + tangents


class _FusedAttentionDropout(TorchFunctionMode):
    """Trace ``scaled_dot_product_attention`` with dropout as CUDA runs it. CUDA's fused
    kernels (flash, memory-efficient) draw the dropout mask inside the kernel and redraw it
    in the backward from a seed, saving what they save without dropout; CPU's fused kernel
    takes no dropout, so the CPU trace would fall back to the math kernel and save the
    probability matrix and its mask, (batch x heads x seq x seq) each. The trace therefore
    sees ``dropout_p=0``: the same saved memory as CUDA, the mask's time left out."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) > 4:                         # (query, key, value, attn_mask, dropout_p, ...)
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


def _phase(progress: bool | None, text: str) -> contextlib.AbstractContextManager:
    """A spinner on stderr naming the phase (when ``progress``, or stderr is a terminal)."""
    if not (sys.stderr.isatty() if progress is None else progress):
        return contextlib.nullcontext()
    return Console(stderr=True).status(text)


@contextlib.contextmanager
def _autocast(autocast: str | torch.dtype | None) -> Iterator[None]:
    if autocast is None:
        yield
        return
    dtype = autocast if isinstance(autocast, torch.dtype) else _AUTOCAST_DTYPES.get(str(autocast).lower())
    if dtype not in (torch.bfloat16, torch.float16):
        raise OptionError(f"autocast={autocast!r}; choose 'bf16', 'fp16' or None")
    with torch.autocast("cpu", dtype=dtype):
        yield


@dataclasses.dataclass(frozen=True)
class BatchProbe:
    """One size tried by `largest_batch`: whether a plan fits, and at what overhead."""

    batch_size: int
    fits: bool
    peak_bytes: int | None
    overhead: float | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    batch_size: int                   # the largest that fits; 0 when even the smallest does not
    estimate: Estimate | None         # at that size
    probes: tuple[BatchProbe, ...]


def largest_batch(build: Callable[[int], tuple[torch.nn.Module, tuple, dict]], *, target: str | DeviceTarget,
                  budget: int | float | str = "device", max_overhead: float | None = None, limit: int = 1 << 14,
                  **estimate_options: Any) -> BatchSearch:
    """The largest ``batch_size`` for which ``build(batch_size)`` -> (model, inputs, kwargs)
    has a plan within ``budget`` whose predicted overhead is at most ``max_overhead``
    (None: any). Doubling from 1, then bisection: O(log limit) estimates, each a trace, a
    fake walk and a solve. Assumes that what does not fit at one size does not fit above it."""
    probes: list[BatchProbe] = []
    found: dict[int, Estimate] = {}

    def fits(batch_size: int) -> bool:
        model, inputs, kwargs = build(batch_size)
        try:
            result = estimate_step(model, budget, inputs, target=target, example_kwargs=kwargs, **estimate_options)
        except InfeasibleBudgetError as error:
            probes.append(BatchProbe(batch_size, False, None, None, str(error).splitlines()[0]))
            return False
        ok = max_overhead is None or result.plan.overhead <= max_overhead + 1e-12
        probes.append(BatchProbe(batch_size, ok, result.plan.predicted_peak_bytes, result.plan.overhead,
                                 "" if ok else f"overhead {result.plan.overhead:+.1%} > {max_overhead:+.1%}"))
        log.info("memsched: batch %d %s (%s)", batch_size, "fits" if ok else "does not fit", probes[-1].reason)
        if ok:
            found[batch_size] = result
        return ok

    batch_size = largest_fitting(fits, limit)
    return BatchSearch(batch_size=batch_size, estimate=found.get(batch_size), probes=tuple(probes))


def largest_fitting(fits: Callable[[int], bool], limit: int, *, known_fitting: int = 0,
                    relative_gap: float = 0.0) -> int:
    """The largest size in [0, ``limit``] for which ``fits`` holds, assuming it holds up to
    some size and not above: doubling from ``known_fitting`` (a size known to fit; 0: from
    1), then bisection, O(log limit) calls. With ``relative_gap``, the bisection stops once
    the largest fitting size and the least failing one are within that fraction of the
    former: the result is then a size that fits, not necessarily the largest."""
    low, high = known_fitting, max(1, 2 * known_fitting)   # low fits (0 trivially), high is the next to try
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > max(1, int(low * relative_gap)):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
