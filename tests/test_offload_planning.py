"""Solvers choose offload only where copies overlap compute: with a real transfer profile
(measured on CUDA, or a named target), never with the nominal CPU figure."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from planner import optimize, zoo
from planner.benchmark import step_memory, train_step
from planner.budget import resolve_budget
from planner.capture import capture
from planner.profile import profile
from solvers import Decision, solve
from solvers.graph import TARGETS


@pytest.fixture(scope="module")
def gpt_graph():
    model, inputs = zoo.make("gpt", size="tiny", seed=0)
    return profile(capture(model, inputs), model, inputs, repeats=1)


def test_nominal_transfer_never_offloads(gpt_graph) -> None:
    assert not gpt_graph.transfer.real
    plan = solve(gpt_graph, resolve_budget(0.4, gpt_graph).budget_bytes, "greedy")
    assert Decision.OFFLOAD not in plan.decisions.values()


def test_a_target_profile_makes_offload_pay(gpt_graph) -> None:
    budget = resolve_budget(0.4, gpt_graph).budget_bytes
    recompute_only = solve(gpt_graph, budget, "greedy")
    targeted = dataclasses.replace(gpt_graph, transfer=TARGETS["h100-pcie5"])
    with_offload = solve(targeted, budget, "greedy")
    assert Decision.OFFLOAD in with_offload.decisions.values()
    assert with_offload.predicted_peak_bytes <= budget
    assert with_offload.overhead < recompute_only.overhead


def test_offload_plan_for_a_target_trains_exactly_on_this_machine() -> None:
    model, inputs = zoo.make("gpt", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    scheduled = optimize(model, 0.4, inputs, repeats=1, target="h100-pcie5", solver="greedy")
    assert Decision.OFFLOAD in scheduled.plan.decisions.values()
    report = step_memory(scheduled, inputs)
    assert report.peak_bytes <= scheduled.plan.budget_bytes and report.host_peak_bytes > 0
    model.load_state_dict(reference.state_dict())
    torch.manual_seed(4)
    loss = train_step(scheduled, inputs)
    torch.manual_seed(4)
    torch.testing.assert_close(loss, train_step(reference, inputs))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_unknown_target_lists_the_known_ones() -> None:
    model, inputs = zoo.make("mlp", size="tiny", seed=0)
    with pytest.raises(ValueError, match="h100-pcie5"):
        optimize(model, 0.5, inputs, target="tpu-v9")
