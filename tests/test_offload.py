"""Offload and prefetch steps execute: the step computes what the plain model computes, the
device peak is the simulated one and host copies are counted as host memory."""

from __future__ import annotations

import copy

import pytest
import torch

from planner.benchmark import step_memory
from planner.memory import StepMemoryTracker
from runtime.codegen import generate
from runtime.module import ScheduledModule
from runtime.offload import offload_to_host, prefetch_to_device, release_after_offload, wait_prefetched
from solvers import Decision, InvalidPlanError, Plan, simulate
from solvers.graph import Graph
from solvers.plan import Step, StepKind, free, offload, prefetch
from solvers.kernel.program import build_program, saved_roots
from helpers import assert_same_training_step, trace_zoo

MODELS = ("mlp", "resnet", "gpt", "unet")


def droppable_roots(graph: Graph) -> list[str]:
    """Saved storages a plan may take off the device: not pinned by the caller or autograd,
    and made by an op that may run again."""
    pinned = {graph.value(name).root for name in graph.pinned_values}
    return [root for root in saved_roots(graph)
            if root not in pinned and graph.op(graph.value(root).producer).recomputable]


def plan_for(graph: Graph, label: str, decisions: dict[str, Decision]) -> Plan:
    forward, backward = build_program(graph, decisions)
    return Plan(graph.hash, label, 2**62, forward, backward, decisions)


def offload_all_plan(graph: Graph) -> Plan:
    return plan_for(graph, "offload-all", {root: Decision.OFFLOAD for root in droppable_roots(graph)})


def mixed_plan(graph: Graph) -> Plan:
    """Every other droppable storage offloaded, the rest recomputed (dropout masks included)."""
    decisions = {root: Decision.OFFLOAD if index % 2 else Decision.RECOMPUTE
                 for index, root in enumerate(droppable_roots(graph))}
    return plan_for(graph, "mixed", decisions)


@pytest.fixture(scope="module", params=MODELS)
def traced(request):
    model, inputs, step, graph = trace_zoo(request.param)
    return request.param, model, inputs, step, graph


def run_and_compare(name: str, model, inputs, step, graph: Graph, plan: Plan):
    """Measure one step of ``plan``, then check loss, gradients and buffers against the
    plain model from the same weights and seed; the memory report."""
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, plan)
    report = step_memory(scheduled, inputs)
    model_copy.load_state_dict(model.state_dict())     # the measured step updated BatchNorm statistics
    assert_same_training_step(scheduled, model_copy, reference, inputs, label=f"{name} {plan.solver}")
    return report


def assert_peak_matches_simulation(name: str, graph: Graph, plan: Plan, measured: int) -> None:
    predicted = simulate(graph, plan).peak_bytes
    assert measured <= predicted, f"{name} {plan.solver}: measured {measured} > simulated {predicted}"
    assert predicted - measured <= 0.05 * measured, f"{name} {plan.solver}: simulated {predicted}, measured {measured}"


def test_offload_all_matches_plain_model_and_lowers_the_peak(traced) -> None:
    name, model, inputs, step, graph = traced
    plan = offload_all_plan(graph)
    assert any(s.kind is StepKind.PREFETCH for s in plan.backward), f"{name}: nothing offloaded"
    report = run_and_compare(name, model, inputs, step, graph, plan)
    assert_peak_matches_simulation(name, graph, plan, report.peak_bytes)
    assert report.host_peak_bytes > 0
    keep_all = step_memory(ScheduledModule(copy.deepcopy(model), step, graph, plan_for(graph, "keep-all", {})),
                           inputs)
    assert report.peak_bytes < keep_all.peak_bytes, f"{name}: offloading saved no device memory"


def test_mixed_recompute_and_offload_plan_matches(traced) -> None:
    name, model, inputs, step, graph = traced
    plan = mixed_plan(graph)
    decisions = set(plan.decisions.values())
    assert {Decision.OFFLOAD, Decision.RECOMPUTE} <= decisions, f"{name}: not a mixed plan"
    if name == "gpt":
        assert any(graph.op(s.name).random for s in plan.backward if s.kind is StepKind.RUN), "no dropout recomputed"
    report = run_and_compare(name, model, inputs, step, graph, plan)
    assert_peak_matches_simulation(name, graph, plan, report.peak_bytes)
    assert report.host_peak_bytes > 0


def refetch_before_every_read(graph: Graph, plan: Plan) -> Plan:
    """The backward lets go of each prefetched value between its reads and brings it back
    before the next one: alternately from the forward's host copy (``free, prefetch``) and
    from a new host copy made in the backward (``offload, free, prefetch``)."""
    backward: list[Step] = []
    read_since_prefetch: set[str] = set()
    on_host = {s.name for s in plan.backward if s.kind is StepKind.PREFETCH}
    turns = 0
    for plan_step in plan.backward:
        if plan_step.kind is StepKind.PREFETCH:
            read_since_prefetch.discard(plan_step.name)
        elif plan_step.kind is StepKind.RUN:
            for name in dict.fromkeys(graph.op(plan_step.name).inputs):
                if name not in on_host:
                    continue
                if name in read_since_prefetch:
                    backward += ([offload(name)] if turns % 2 else []) + [free(name), prefetch(name)]
                    turns += 1
                read_since_prefetch.add(name)
        backward.append(plan_step)
    assert turns >= 2, "no value is read twice in the backward"
    return Plan(graph.hash, "refetch", plan.budget_bytes, plan.forward, tuple(backward), plan.decisions)


def test_values_offloaded_and_prefetched_several_times() -> None:
    model, inputs, step, graph = trace_zoo("gpt")
    plan = refetch_before_every_read(graph, offload_all_plan(graph))
    report = run_and_compare("gpt", model, inputs, step, graph, plan)
    assert_peak_matches_simulation("gpt", graph, plan, report.peak_bytes)


def test_forward_hands_over_host_copies_not_the_offloaded_device_values() -> None:
    model, inputs, step, graph = trace_zoo("mlp")
    plan = offload_all_plan(graph)
    programs = generate(step, graph, plan, "cpu")
    offloaded = {s.name for s in plan.forward if s.kind is StepKind.OFFLOAD}
    assert offloaded and set(programs.host_copy_names) == offloaded
    assert not offloaded & set(programs.saved_names)
    assert "offload_to_host" in programs.forward.code and "prefetch_to_device" in programs.backward.code


def test_prefetch_without_a_host_copy_is_refused() -> None:
    model, inputs, step, graph = trace_zoo("mlp")
    plan = offload_all_plan(graph)
    no_offloads = tuple(s for s in plan.forward if s.kind is not StepKind.OFFLOAD)
    broken = Plan(graph.hash, "broken", plan.budget_bytes, no_offloads, plan.backward, plan.decisions)
    with pytest.raises(InvalidPlanError, match="host copy"):
        generate(step, graph, broken, "cpu")


def test_host_copy_keeps_layout_and_counts_as_host_memory() -> None:
    source = torch.randn(6, 4).t()                # not contiguous
    with StepMemoryTracker("cpu", [source]) as tracker:
        host = offload_to_host(source)
        release_after_offload(host)
        assert tracker.host_bytes == source.untyped_storage().nbytes()
        back = prefetch_to_device(host)
        wait_prefetched(host)
    report = tracker.report()
    assert report.host_peak_bytes == source.untyped_storage().nbytes()
    assert report.peak_bytes == report.start_bytes + back.untyped_storage().nbytes()   # the copy is not device memory
    assert host.tensor.stride() == source.stride() == back.stride()
    assert back.untyped_storage().data_ptr() not in (source.untyped_storage().data_ptr(),
                                                     host.tensor.untyped_storage().data_ptr())
    assert torch.equal(back, source)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_cuda_matches_and_fits_the_simulated_peak() -> None:
    model, inputs, step, graph = trace_zoo("gpt", device="cuda")
    for plan in (offload_all_plan(graph), mixed_plan(graph), refetch_before_every_read(graph, offload_all_plan(graph))):
        report = run_and_compare("gpt-cuda", model, inputs, step, graph, plan)
        predicted = simulate(graph, plan).peak_bytes
        assert abs(report.peak_bytes - predicted) <= 0.05 * report.peak_bytes, (plan.solver, predicted, report)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_are_ordered_by_events() -> None:
    device = torch.device("cuda")
    for _ in range(3):                            # pinned buffers come back from the pool
        source = torch.randn(1024, 256, device=device).t()
        host = offload_to_host(source)
        expected = source.clone()
        del source
        release_after_offload(host)
        torch.cuda._sleep(1_000_000)              # keep compute busy: copies must not race it
        back = prefetch_to_device(host)
        wait_prefetched(host)
        assert host.tensor.is_pinned() and back.stride() == expected.stride()
        torch.testing.assert_close(back * 1, expected)
