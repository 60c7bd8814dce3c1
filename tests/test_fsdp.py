"""FSDP2 with one plan per sharded block (`planner.fsdp.optimize_blocks`): on 2 gloo ranks
the gradients are FSDP2's without memsched and each rank's measured peak stays within its
budget; single-process checks of the helper's errors and of what it leaves in the model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from planner import BudgetError, OptionError, UnsupportedModelError, optimize, zoo
from planner.api import OptimizedModule
from planner.fsdp import optimize_blocks
from solvers.errors import InfeasibleBudgetError, PlanMismatchError
from torchrun import rank_reports


def test_fsdp2_over_blocks_planned_one_by_one_keeps_its_gradients_within_each_ranks_budget(tmp_path) -> None:
    """``fully_shard`` on each optimized block and the root (gloo, 2 ranks, each its own
    batch, one SGD step then a measured one): the sharded gradients equal FSDP2's over the
    plain model, and each rank's peak (allocator events, the running block's all-gathered
    parameters included) is within the budget the plain model exceeds, and within the
    helper's prediction."""
    for report in rank_reports(Path(__file__).with_name("fsdp_worker.py"), tmp_path, timeout_s=480):
        assert "error" not in report, report
        assert report["largest_difference"] <= 1e-6 and report["loss_difference"] <= 1e-6, report
        assert report["peak"] <= report["budget"] < report["plain_peak"], report
        assert report["peak"] <= report["predicted"] <= report["budget"], report
        assert report["recomputed"] > 0, report                           # the plans drop something
        assert all(budget > params for budget, params in zip(report["block_budgets"],
                                                             report["unsharded_block_params"])), report
        assert report["names_match"] and report["state_dict_keys_match"], report
        assert report["refused_sharded"], report                          # optimize() on a sharded model


def _tiny() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    return zoo.make("gpt", size="tiny", seed=0)


def test_the_optimized_blocks_stand_in_the_model_with_its_gradients_and_state_dict() -> None:
    """Without FSDP (world_size=1) the model with its blocks replaced trains with the plain
    model's gradients; planning leaves the RNG and ``.grad`` as they were; the model saves
    and loads its state dict under its own keys."""
    model, inputs = _tiny()
    reference = copy.deepcopy(model)
    model(*inputs).backward()                        # a .grad to leave alone
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    plans = optimize_blocks(model, 2_500_000, inputs, blocks=model.blocks, world_size=1, solver="hierarchical",
                            repeats=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [type(block) for block in model.blocks] == [OptimizedModule] * 2
    assert plans.modules == list(model.blocks) and plans.predicted_peak_bytes <= plans.budget_bytes
    for module in (model, reference):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        module(*inputs).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    model.load_state_dict({name: value + 1 for name, value in reference.state_dict().items()})
    assert torch.equal(model.blocks[0].module.attn.qkv.weight, reference.blocks[0].attn.qkv.weight + 1)


def test_a_new_shape_on_an_optimized_block_is_refused_naming_optimize_blocks_or_planned() -> None:
    """By default a block refuses a shape it has no plan for and says to call
    ``optimize_blocks`` again; with ``on_new_shape="plan"`` it plans it from its own profile
    (`planner.reuse`) and trains with the plain model's gradients."""
    model, (idx, targets) = _tiny()
    shorter = (idx[:, :16].contiguous(), targets[:, :16].contiguous())
    strict = copy.deepcopy(model)
    optimize_blocks(strict, 2_500_000, (idx, targets), blocks=strict.blocks, world_size=1, repeats=1)
    with pytest.raises(PlanMismatchError, match=r"call planner\.fsdp\.optimize_blocks\(\) again"):
        strict(*shorter)
    reference = copy.deepcopy(model)
    optimize_blocks(model, 2_500_000, (idx, targets), blocks=model.blocks, world_size=1, repeats=1,
                    on_new_shape="plan")
    for module in (model, reference):
        torch.manual_seed(5)
        module(*shorter).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    assert [len(block.plans) for block in model.blocks] == [2, 2]


def test_a_rank_budget_too_small_for_the_least_plans_names_what_they_need() -> None:
    model, inputs = _tiny()
    with pytest.raises(InfeasibleBudgetError, match=r"(?s)optimize_blocks, per rank.*sharded parameters"):
        optimize_blocks(model, 200_000, inputs, blocks=model.blocks, world_size=2, solver="hierarchical", repeats=1)
    assert [type(block).__name__ for block in model.blocks] == ["GPTBlock"] * 2      # the model is left as it was


def test_optimize_blocks_refuses_what_it_cannot_plan_with_the_fix() -> None:
    model, inputs = _tiny()
    with pytest.raises(BudgetError, match="an FSDP rank's budget is bytes"):
        optimize_blocks(model, 0.5, inputs, blocks=model.blocks, world_size=2)
    with pytest.raises(OptionError, match="init_process_group first or pass world_size="):
        optimize_blocks(model, "8MiB", inputs, blocks=model.blocks)
    with pytest.raises(OptionError, match="no submodule 'layers'"):
        optimize_blocks(model, "8MiB", inputs, blocks=["layers"], world_size=2)
    with pytest.raises(OptionError, match="the root cannot be a block"):
        optimize_blocks(model, "8MiB", inputs, blocks=[model], world_size=2)
    with pytest.raises(OptionError, match="lies inside block 'blocks.0'"):
        optimize_blocks(model, "8MiB", inputs, blocks=[model.blocks[0], model.blocks[0].attn], world_size=2)

    twice = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    twice.forward = lambda x: twice[1](twice[0](twice[0](x)))
    with pytest.raises(UnsupportedModelError, match=r"block '0' ran 2 times in one forward"):
        optimize_blocks(twice, "8MiB", torch.randn(4, 8), blocks=[twice[0]], world_size=2)

    tied = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedModelError, match="blocks '0' and '1' share parameter 'weight'"):
        optimize_blocks(tied, "8MiB", torch.randn(4, 8), blocks=list(tied), world_size=2)

    optimized = zoo.make("gpt", size="tiny", seed=0)[0]
    optimized.blocks[0] = optimize(optimized.blocks[0], 0.9, torch.randn(2, 32, 64, requires_grad=True), repeats=1)
    with pytest.raises(OptionError, match="block 'blocks.0' is optimized already"):
        optimize_blocks(optimized, "8MiB", inputs, blocks=optimized.blocks, world_size=2)


def test_the_address_paired_allocator_peak_agrees_with_the_running_sum_on_one_thread() -> None:
    """Where every free is recorded (one thread, no collective), pairing the allocator's
    events by address gives `measure_allocator_peak`'s peak."""
    from planner.memory import measure_allocator_peak, measure_allocator_peak_by_address
    model, inputs = _tiny()

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(*inputs)
        loss.backward()
        return loss.detach()

    step()
    resident = list(model.parameters()) + list(inputs)
    peaks = []
    for measure in (measure_allocator_peak, measure_allocator_peak_by_address):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        peaks.append(measure(step, resident)[1])
    assert peaks[0] == peaks[1] > sum(p.numel() * 4 for p in model.parameters())
