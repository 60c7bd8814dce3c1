"""`planner.estimate`: plans made on fake tensors with roofline times equal `optimize`'s
graphs and bytes, allocate nothing, and price ops sensibly; the presets are the published
architectures; `memsched-estimate` reports and refuses clearly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import trace_zoo
from planner.estimate import (DEVICE_RESERVE_BYTES, estimate, estimate_step, estimated_graph,
                              optimizer_state_bytes, usable_bytes)
from planner.estimate_cli import main as estimate_main
from planner.roofline import measure_cpu_target, op_time_ms
from planner.errors import OptionError
from solvers import Plan, simulate, solve
from solvers.targets import DEVICE_TARGETS, device_target

aten = torch.ops.aten


def _without_scratch(graph):
    return dataclasses.replace(graph, ops=tuple(dataclasses.replace(op, tmp_bytes=0) for op in graph.ops))


def _structure(graph):
    ops = [(op.name, op.inputs, op.outputs, op.phase, op.recomputable, op.random, op.target, op.module)
           for op in graph.ops]
    values = [(v.name, v.size_bytes, v.kind, v.producer, v.alias_of, v.shape, v.dtype) for v in graph.values]
    return ops, values, graph.placeholders, graph.forward_outputs, graph.gradients, graph.caller_bytes, \
        graph.rng_state_bytes


@pytest.mark.parametrize("name", ["mlp", "gpt", "encoder", "resnet"])
def test_the_fake_walk_gives_optimizes_graph_and_peaks(name: str) -> None:
    """Ops, values, bytes and aliases equal the profiled graph's; so does the peak of every
    plan, replayed on both. The one thing a fake walk cannot see is CPU kernels' scratch:
    the transformers' (softmax, layer norm) is never at the peak, the ResNet's
    convolutions' is, so its peaks are equal with the profiled scratch left out."""
    model, inputs, step, profiled = trace_zoo(name)
    _, estimated = estimated_graph(model, inputs, target=measure_cpu_target(repeats=2))
    assert _structure(estimated) == _structure(profiled)
    reference = _without_scratch(profiled) if name == "resnet" else profiled
    for budget in (1.0, 0.5):
        from planner.budget import resolve_budget
        plan = solve(profiled, resolve_budget(budget, profiled).budget_bytes, "auto")
        replayed = dataclasses.replace(plan, graph_hash=estimated.hash)
        assert simulate(estimated, replayed).peak_bytes == simulate(
            reference, dataclasses.replace(plan, graph_hash=reference.hash)).peak_bytes


def test_estimate_plans_the_same_step_with_roofline_times() -> None:
    """`estimate` returns a `Plan` for its own graph (roofline times) within its budget."""
    model, inputs, _, profiled = trace_zoo("gpt")
    plan = estimate(model, 0.5, inputs, target=measure_cpu_target(repeats=2))
    assert isinstance(plan, Plan) and plan.graph is not None
    assert all(op.time_ms >= 0 for op in plan.graph.ops) and plan.graph.total_time_ms > 0
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert simulate(plan.graph, plan).peak_bytes == plan.predicted_peak_bytes


def test_a_meta_model_is_planned_without_allocating() -> None:
    """A 3.2 GB model (805 M float32 parameters) built on the meta device: the planning
    process's peak resident memory grows by a small fraction of it."""
    script = textwrap.dedent("""
        import resource, torch
        from planner.estimate import estimate_step
        with torch.device("meta"):
            model = torch.nn.Sequential(*[torch.nn.Linear(8192, 8192) for _ in range(12)])
            x = torch.zeros(64, 8192)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = estimate_step(model, "device", (x,), target="h100-sxm", optimizer="adamw")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(sum(p.numel() * 4 for p in model.parameters()), after - before, result.memory.peak_bytes)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model_bytes, grown_bytes, peak_bytes = map(int, done.stdout.split())
    assert model_bytes > 3 * 10**9
    assert grown_bytes < 0.05 * model_bytes, f"resident memory grew {grown_bytes} B planning a {model_bytes} B model"
    assert peak_bytes >= 4 * model_bytes      # parameters, gradients, two AdamW moments


@pytest.mark.parametrize("target", sorted(DEVICE_TARGETS))
def test_roofline_times_are_positive_and_monotone_in_flops(target: str) -> None:
    device = device_target(target)
    times = []
    for size in (16, 64, 256, 1024, 4096):
        a = torch.empty(size, size, device="meta")
        times.append(op_time_ms(aten.mm.default, (a, a), {}, torch.empty(size, size, device="meta"), device))
    assert all(t > 0 for t in times)
    assert times == sorted(times) and times[-1] > times[0]
    half = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    assert op_time_ms(aten.mm.default, (half, half), {}, half, device) < times[-1]   # tensor cores
    x = torch.empty(64, 64, device="meta")
    assert op_time_ms(aten.t.default, (x,), {}, x.t(), device) == 0.0                 # a view runs no kernel


def test_optimizer_state_and_the_device_budget() -> None:
    """AdamW keeps two fp32 moments per trainable parameter, plus an fp32 master copy of
    16-bit parameters; the state is resident in the plan; ``"device"`` is the target's
    memory less the reserve."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    count = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(model, "adamw") == 8 * count
    model[0].requires_grad_(False)
    assert optimizer_state_bytes(model, "sgd-momentum") == 4 * (model[1].weight.numel() + model[1].bias.numel())
    model.requires_grad_(True)
    assert optimizer_state_bytes(model.to(torch.bfloat16), "adamw") == 12 * count
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(32, 64)
    plain = estimate_step(model, "device", (x,), target="l4")
    adamw = estimate_step(model, "device", (x,), target="l4", optimizer="adamw")
    assert adamw.memory.peak_bytes - plain.memory.peak_bytes == 8 * count == adamw.memory.optimizer_state_bytes
    assert adamw.budget_bytes == usable_bytes(DEVICE_TARGETS["l4"]) == DEVICE_TARGETS["l4"].memory_bytes - \
        DEVICE_RESERVE_BYTES
    assert adamw.fits
    with pytest.raises(OptionError, match="adamw"):
        estimate_step(model, "device", (x,), target="l4", optimizer="lion")
    with pytest.raises(OptionError, match="h100-sxm"):
        estimate_step(model, "device", (x,), target="h100")


def test_a_cuda_target_traces_attention_dropout_as_the_fused_kernel() -> None:
    """CPU's fused attention takes no dropout, so a CPU trace saves the probabilities and
    their mask; CUDA's fused kernels save neither, and a CUDA target is traced that way."""
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True).sum()

    x = torch.randn(2, 64, 32)
    _, on_cpu = estimated_graph(Attention(), (x,), target=measure_cpu_target(repeats=2))
    _, on_cuda = estimated_graph(Attention(), (x,), target="h100-sxm")
    cpu_targets = {op.target for op in on_cpu.ops}
    cuda_targets = {op.target for op in on_cuda.ops}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in cuda_targets
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" not in cpu_targets
    assert on_cuda.resident_bytes() == on_cpu.resident_bytes()
    assert simulate(on_cuda, solve(on_cuda, 2**62, "none")).peak_bytes < \
        simulate(on_cpu, solve(on_cpu, 2**62, "none")).peak_bytes - 2 * 2 * 2 * 64 * 64 * 4
    assert on_cuda.device == "cuda" and on_cuda.rng_state_bytes == 0 and on_cuda.transfer.real


def test_presets_have_their_published_parameter_counts() -> None:
    pytest.importorskip("transformers")
    from planner.presets import PRESETS
    for name, preset in PRESETS.items():
        model, inputs, kwargs = preset.build(1, 224 if name.startswith("vit") else 8)
        count = sum(p.numel() for p in model.parameters())
        assert all(p.device.type == "meta" for p in model.parameters())
        assert abs(count / preset.published_parameters - 1) < 0.001, (name, count)


def test_the_cli_reports_saves_a_plan_and_finds_the_largest_batch(tmp_path, capsys) -> None:
    plan_path = tmp_path / "plan.json"
    code = estimate_main(["estimate_builders:tiny_gpt", "--seq", "32", "--batch", "2", "--target", "h100-sxm",
                          "--budget", "3MiB", "--max-batch", "--batch-limit", "12", "--save-plan", str(plan_path), "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] and report["peak_bytes"] <= 3 * 2**20
    assert report["parameter_bytes"] + report["gradient_bytes"] + report["optimizer_state_bytes"] \
        + report["input_bytes"] + report["activation_bytes"] == report["peak_bytes"]
    largest = report["largest_batch"]
    assert largest["batch_size"] >= 2
    probes = {probe["batch_size"]: probe["fits"] for probe in largest["probes"]}
    assert probes[largest["batch_size"]] and not probes.get(largest["batch_size"] + 1, False)
    assert Plan.load(str(plan_path)).graph is not None
    from planner.inspect import main as inspect_main
    assert inspect_main([str(plan_path), "--top", "3"]) == 0


def test_the_cli_refuses_bad_arguments_with_the_fix(capsys) -> None:
    assert estimate_main(["estimate_builders:tiny_gpt", "--seq", "32", "--target", "tpu"]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert estimate_main(["no_such_preset"]) == 2
    assert "preset" in capsys.readouterr().err
    assert estimate_main(["estimate_builders:tiny_gpt", "--seq", "32", "--budget", "1KiB", "--no-progress"]) == 1
    assert "does not fit" in capsys.readouterr().out
