"""Checks shared by the end-to-end tests."""

from __future__ import annotations

from typing import Sequence

import torch

from planner.benchmark import train_step


def assert_same_training_step(scheduled: torch.nn.Module, model: torch.nn.Module, reference: torch.nn.Module,
                              inputs: Sequence, *, seed: int = 7, label: str = "") -> None:
    """One seeded `train_step` through ``scheduled`` (which wraps ``model``) and one through
    ``reference`` from the same weights: loss, every gradient and every buffer equal."""
    torch.manual_seed(seed)
    loss = train_step(scheduled, inputs)
    torch.manual_seed(seed)
    loss_reference = train_step(reference, inputs)
    torch.testing.assert_close(loss, loss_reference, msg=lambda m: f"{label} loss: {m}")
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{label} grad {name}: {m}")
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, c, msg=lambda m, name=name: f"{label} buffer {name}: {m}")


def trace_zoo(name: str, size: str = "tiny", device: str = "cpu"):
    """A zoo model, its inputs, its captured step and its profiled graph (one timing run)."""
    from planner import zoo
    from planner.capture import capture
    from planner.profile import profile

    model, inputs = zoo.make(name, size=size, seed=0, device=device)
    step = capture(model, inputs)
    return model, inputs, step, profile(step, model, inputs, repeats=1)
