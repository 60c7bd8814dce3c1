"""Measure training steps side by side: peak memory (`planner.memory`) and time ratios.

Times are wall-clock medians of steps run round-robin in one process, so that the ratio of
two methods is meaningful even on a noisy machine; quote ratios, not absolute times.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from planner.errors import UnsupportedModelError
from planner.memory import MemoryReport, measure_allocator_peak, measure_step_memory


def training_loss(output: Any) -> torch.Tensor:
    """A scalar to backpropagate from a model's output: the sum of its scalar floating-point
    outputs when it has some (a model that returns its loss, beside logits or not), else
    the sum of the means of its floating-point tensors (a reduction that saves nothing for
    its backward). The same rule as `planner.capture.loss_outputs` with ``"auto"``."""
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.requires_grad]
    if not leaves:
        raise UnsupportedModelError("training_loss: the model's output has no floating-point tensor that requires "
                                    "grad, so there is nothing to backpropagate; return a loss or logits computed "
                                    "from parameters with requires_grad=True, or pass optimize(..., loss_fn=...)")
    losses = [t for t in leaves if t.dim() == 0]
    if losses:
        return sum(losses[1:], losses[0])
    return sum(t.mean() for t in leaves)


def train_step(model: torch.nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
    """One forward + backward from fresh gradients (``.grad`` set to None first), holding
    the output through the backward as a training loop does (``out = model(x)``)."""
    for parameter in model.parameters():
        parameter.grad = None
    output = model(*inputs)
    loss = training_loss(output)
    loss.backward()
    del output
    return loss.detach()


def step_memory(model: torch.nn.Module, inputs: Sequence[Any]) -> MemoryReport:
    """Peak device memory of one `train_step`, parameters, buffers and inputs included."""
    for parameter in model.parameters():
        parameter.grad = None
    resident = list(model.parameters()) + list(model.buffers())
    resident += [t for t in pytree.tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    _, report = measure_step_memory(lambda: train_step(model, inputs), device, resident)
    return report


def allocator_step_peak(model: torch.nn.Module, inputs: Sequence[Any]) -> int:
    """Peak of one `train_step` from the allocator's own events (CPU; `measure_allocator_peak`),
    parameters, buffers and inputs included: the independent check of `step_memory`."""
    model.zero_grad(set_to_none=True)
    resident = list(model.parameters()) + list(model.buffers())
    resident += [t for t in pytree.tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)]
    _, peak_bytes = measure_allocator_peak(lambda: train_step(model, inputs), resident)
    return peak_bytes


def step_times_ms(steps: Mapping[str, Callable[[], Any]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each step, the steps run round-robin ``repeats`` times."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            synchronize()
            started = time.perf_counter()
            step()
            synchronize()
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}
