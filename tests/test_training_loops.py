"""A real training loop changes its step; the module `optimize` returns follows it with a
plan per step signature (`planner.api.OptimizedModule`) or refuses it clearly, never runs
a plan made for another step: new shapes (a smaller last batch, padding per batch), a mode
switch, parameters unfrozen after `optimize`."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from planner import optimize, pad_to_bucket, zoo
from planner.batching import bucket_length
from planner.benchmark import train_step
from planner.errors import OptionError
from planner.memory import measure_step_memory
from runtime.module import ScheduledModule
from solvers import PlanMismatchError
from helpers import assert_same_training_step

BUCKETS = (16, 32)


def variable_length_dataset(count: int = 11, vocab: int = 128, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(6, 33, (), generator=generator))
        stream = torch.randint(vocab, (length + 1,), generator=generator)
        examples.append({"idx": stream[:-1], "targets": stream[1:]})
    return examples


def collate_to_buckets(examples: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest sequence (as a plain collate would), then to a bucket."""
    longest = max(len(e["idx"]) for e in examples)
    idx = torch.stack([torch.nn.functional.pad(e["idx"], (0, longest - len(e["idx"]))) for e in examples])
    targets = torch.stack([torch.nn.functional.pad(e["targets"], (0, longest - len(e["targets"])), value=-100)
                           for e in examples])
    batch = pad_to_bucket({"idx": idx, "targets": targets}, BUCKETS, pad_values={"targets": -100})
    return batch["idx"], batch["targets"]


def test_pad_to_bucket_pads_only_the_sequence_dimension() -> None:
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long),
             "image_label": torch.tensor([1, 2])}
    padded = pad_to_bucket(batch, (4, 8, 16), pad_values={"labels": -100})
    assert padded["input_ids"].shape == (2, 8) and padded["input_ids"][:, 5:].eq(0).all()
    assert padded["labels"][:, 5:].eq(-100).all() and padded["labels"][:, :5].eq(1).all()
    assert padded["image_label"].shape == (2,)
    assert pad_to_bucket(torch.ones(3, 4, 2), (4,)).shape == (3, 4, 2)
    assert bucket_length(17, (16, 32)) == 32
    with pytest.raises(OptionError, match="longer than the largest bucket 32"):
        bucket_length(33, (16, 32))


def test_an_epoch_of_variable_shapes_is_planned_per_bucket_within_budget(caplog) -> None:
    """11 sequences of 6-32 tokens in batches of 3 (the last has 2), padded to buckets of 16
    and 32 tokens: every step has the plain model's loss and gradients, and every call,
    planning a new shape included, peaks within the budget in bytes (a new shape is
    planned on fake tensors from the first profile, never run un-optimized)."""
    torch.manual_seed(0)
    model, _ = zoo.make("gpt", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    loader = DataLoader(variable_length_dataset(), batch_size=3, collate_fn=collate_to_buckets)
    batches = list(loader)
    largest = max(batches, key=lambda b: b[0].numel())
    probe = optimize(copy.deepcopy(model), 0.6, largest, repeats=1)
    budget_bytes = probe.plan.budget_bytes                    # a budget in bytes keeps its meaning
    optimized = optimize(model, budget_bytes, batches[0], repeats=1)
    resident = list(model.parameters()) + list(model.buffers())
    with caplog.at_level(logging.INFO, logger="planner.api"):
        for number, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            _, report = measure_step_memory(lambda: train_step(optimized, batch), "cpu", resident + list(batch))
            assert report.peak_bytes <= budget_bytes, f"batch {number} {batch[0].shape}: {report.peak_bytes} B"
            assert optimized.plan.budget_bytes == budget_bytes
            model.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            assert_same_training_step(optimized, model, reference, batch, seed=number, label=f"batch {number}")
    signatures = {tuple(tuple(t.shape) for t in batch) for batch in batches}
    assert len(optimized.plans) == len(signatures) <= 4
    messages = [record.message for record in caplog.records]
    assert sum("new plan for GPT" in message for message in messages) == len(signatures) - 1
    assert sum("sized on fake tensors from the first profile" in message for message in messages) == \
        len(signatures) - 1


def test_prepare_plans_a_bucket_without_running_it() -> None:
    torch.manual_seed(0)
    model, (idx, targets) = zoo.make("gpt", size="tiny", seed=0)
    optimized = optimize(model, 0.6, (idx, targets), repeats=1)
    shorter = (idx[:, :16].contiguous(), targets[:, :16].contiguous())
    plan = optimized.prepare(*shorter)
    assert len(optimized.plans) == 2 and plan.graph_hash != optimized.plans[0].graph_hash
    assert optimized.prepare(*shorter) is plan                # found, not planned again
    assert all(p.grad is None for p in model.parameters())    # nothing ran


def test_a_new_shape_is_planned_on_first_use_or_refused_on_request() -> None:
    torch.manual_seed(0)
    model, (idx, targets) = zoo.make("gpt", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    optimized = optimize(model, 0.8, (idx, targets), repeats=1)
    shorter = (idx[:, :24].contiguous(), targets[:, :24].contiguous())
    assert_same_training_step(optimized, model, reference, shorter, label="new shape")
    assert len(optimized.plans) == 2 and optimized._step.input_signature[1][1] == (2, 24)
    strict = optimize(copy.deepcopy(model), 0.8, (idx, targets), repeats=1, on_new_shape="error")
    with pytest.raises(PlanMismatchError, match=r"optimized for inputs .*\[2, 32\].* but got .*\[2, 24\]"):
        strict(*shorter)
    with pytest.raises(OptionError, match="on_new_shape"):
        optimize(model, 0.6, (idx, targets), on_new_shape="ignore")


def test_eval_at_optimize_then_train_runs_a_training_plan() -> None:
    """Optimized in eval mode, trained in train mode: the step gets a plan traced in train
    mode (dropout on, replayed exactly), never the plain forward over the budget."""
    torch.manual_seed(0)
    model, inputs = zoo.make("gpt", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    model.eval()
    optimized = optimize(model, 0.6, inputs, repeats=1)
    assert not optimized._step.training and len(optimized.plans) == 1
    optimized.train()
    reference.train()
    assert_same_training_step(optimized, model, reference, inputs, label="train after eval")
    assert len(optimized.plans) == 2 and optimized._step.training
    model.zero_grad(set_to_none=True)
    resident = list(model.parameters()) + list(model.buffers()) + list(inputs)
    _, report = measure_step_memory(lambda: train_step(optimized, inputs), "cpu", resident)
    assert report.peak_bytes <= optimized.plan.budget_bytes
    optimized.eval()
    with torch.no_grad():                                    # validation: the plain forward
        torch.testing.assert_close(optimized(*inputs), reference.eval()(*inputs))
    assert len(optimized.plans) == 2


def test_unfreezing_after_optimize_gives_the_unfrozen_parameters_their_gradients() -> None:
    torch.manual_seed(0)
    model, inputs = zoo.make("gpt", size="tiny", seed=0)
    for parameter in model.blocks[0].parameters():
        parameter.requires_grad_(False)
    reference = copy.deepcopy(model)
    optimized = optimize(model, 0.7, inputs, repeats=1)
    assert_same_training_step(optimized, model, reference, inputs, label="frozen")
    assert all(p.grad is None for p in model.blocks[0].parameters())
    for parameter in list(model.blocks[0].parameters()) + list(reference.blocks[0].parameters()):
        parameter.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    assert_same_training_step(optimized, model, reference, inputs, label="unfrozen")
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_the_runtime_module_alone_refuses_a_mode_or_freezing_change() -> None:
    """`ScheduledModule` (one plan) never runs a plan made for another mode or another set
    of trainable parameters: it says what changed and what to do."""
    model, inputs = zoo.make("gpt", size="tiny", seed=0)
    optimized = optimize(model, 1.0, inputs, repeats=1)
    single = ScheduledModule(model, optimized._step, optimized.graph, optimized.plan)
    single.eval()
    with pytest.raises(PlanMismatchError, match="optimized in train mode but is called in eval mode"):
        single(*inputs)
    single.train()
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(PlanMismatchError, match=r"\['lm_head.weight'\] were frozen or unfrozen"):
        single(*inputs)


def test_inputs_the_model_itself_rejects_are_reported_as_such(capfd) -> None:
    """A shape or dtype the model does not take is the inputs' fault, not a tracing limit:
    `ModelInputError` names the submodule and the inputs, and nothing else reaches stderr."""
    from planner import ModelInputError
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ModelInputError, match=r"'0' \(Linear\) fails on the example inputs \(\[4, 10\] float32\)"):
        optimize(model, 0.5, (torch.randn(4, 10),))
    with pytest.raises(ModelInputError, match=r"'0' fails on the example inputs \(\[4, 16\] int64\) in aten.addmm"):
        optimize(model, 0.5, (torch.randint(0, 3, (4, 16)),))
    assert capfd.readouterr().err == ""


def test_ddp_over_an_optimized_module_averages_the_plain_gradients(tmp_path) -> None:
    """DistributedDataParallel (gloo, 2 ranks, each its own batch) over the optimized
    module gives every rank the gradients DDP over the plain model gives."""
    from pathlib import Path

    from torchrun import rank_reports
    for report in rank_reports(Path(__file__).with_name("ddp_worker.py"), tmp_path, timeout_s=240):
        assert report["ok"], report
        assert report["recomputed"] > 0, report                   # the plan drops something


def test_torch_compile_over_an_optimized_module_keeps_its_plan_and_gradients() -> None:
    torch.manual_seed(0)
    model, inputs = zoo.make("gpt", size="tiny", seed=0)
    reference = copy.deepcopy(model)
    optimized = optimize(model, 0.7, inputs, repeats=1)
    compiled = torch.compile(optimized, backend="aot_eager")
    torch.manual_seed(3)
    compiled(*inputs).backward()
    torch.manual_seed(3)
    reference(*inputs).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert len(optimized.plans) == 1                           # the same plan ran, none was added
