"""Pipelined training steps on CPU ranks (gloo), started by the test with torchrun.

Each rank (tests/pipeline_worker.py, i.e. `planner.pipeline_demo`) compares its loss, its stage's gradients and buffers
with a reference that runs the same micro-batches one after the other on one process,
and measures its own peak with the storage tracker; the test reads every rank's report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner import zoo
from planner.capture import capture
from planner.profile import profile
from solvers.errors import InfeasibleBudgetError
from solvers.pipeline import evaluate_split, pipeline_chain, solve_pipeline_chain, split_equal_layers
from torchrun import rank_reports

WORKER = Path(__file__).with_name("pipeline_worker.py")
ROOT = WORKER.parent.parent


def run_ranks(tmp_path: Path, ranks: int, *arguments: str) -> list[dict]:
    reports = rank_reports(WORKER, tmp_path, *arguments, ranks=ranks, timeout_s=300)
    failures = [f"rank {r['rank']}: {r.get('traceback', r.get('error'))}" for r in reports if not r.get("ok")]
    assert not failures, "\n".join(failures)
    return reports


def assert_within_budget(reports: list[dict]) -> None:
    for report in reports:
        assert report["peak_bytes"] <= report["budget_bytes"], report
        # the runtime's prediction for the whole stage is on the safe side of the measurement
        assert report["peak_bytes"] <= report["predicted_peak_bytes"] * 1.02, report


def test_gpt_two_ranks_1f1b_equal_gradients(tmp_path):
    reports = run_ranks(tmp_path, 2, "--model", "gpt", "--budget", "3000000", "--microbatches", "2",
                        "--schedule", "1f1b")
    assert all(report["params_checked"] > 0 for report in reports)
    assert len({report["loss"] for report in reports}) == 1
    assert_within_budget(reports)


def test_unet_three_ranks_gpipe_equal_gradients_buffers_and_skips(tmp_path):
    """U-Net long skips cross stages (passed through the middle one); BatchNorm statistics
    are updated once per micro-batch, as in the reference."""
    reports = run_ranks(tmp_path, 3, "--model", "unet", "--budget", "4000000", "--microbatches", "2",
                        "--schedule", "gpipe")
    assert_within_budget(reports)


def test_passed_through_values_count_their_gradient_buffers(tmp_path):
    """A saved plan whose middle stage passes a U-Net skip through (received, sent on,
    not read): the gradient of that skip comes back into a receive buffer per micro-batch,
    which the stage's prediction must count (it did not: 434,384 B measured against
    420,624 predicted). The split is fixed here; planned afresh it follows the timings."""
    plan = Path(__file__).with_name("data") / "unet_tiny_3_stages_gpipe.plan.json"
    reports = run_ranks(tmp_path, 3, "--model", "unet", "--budget", "4000000", "--microbatches", "2",
                        "--schedule", "gpipe", "--plan", str(plan))
    assert reports[1]["segments"] == [2, 5]
    assert_within_budget(reports)


def _gpt_microbatch_chain(microbatches: int):
    model, inputs = zoo.make("gpt", "tiny")
    microbatch = tuple(t.tensor_split(microbatches)[0] for t in inputs)
    step = capture(model, microbatch)
    chain, _, _ = pipeline_chain(profile(step, model, microbatch, repeats=1))
    return chain


def test_budget_the_equal_layers_split_cannot_meet_without_recompute_is_met(tmp_path):
    microbatches, stages = 2, 2
    chain = _gpt_microbatch_chain(microbatches)

    equal = split_equal_layers(chain, stages)
    keep_all = evaluate_split(chain, equal, [10**12] * stages, microbatches=microbatches, stage_plan="keep_all")
    equal_needs = max(stage.peak_bytes for stage in keep_all.stages)
    with pytest.raises(InfeasibleBudgetError) as raised:   # the least budget a joint plan needs
        solve_pipeline_chain(chain, [1] * stages, microbatches=microbatches)
    high = raised.value.least_feasible_bytes
    assert high < equal_needs * 0.97, "the model leaves no room between the joint plan and the equal split"
    budget = (high + equal_needs) // 2
    reports = run_ranks(tmp_path, stages, "--model", "gpt", "--budget", str(budget), "--microbatches",
                        str(microbatches), "--schedule", "1f1b")
    assert_within_budget(reports)
    assert all(report["budget_bytes"] == budget for report in reports)


def test_pipeline_arguments_are_checked_before_any_process_group():
    from planner import optimize

    model, inputs = zoo.make("gpt", "tiny")
    with pytest.raises(ValueError, match="1F1B schedule needs at least as many micro-batches"):
        optimize(model, 10**7, inputs, stages=4, microbatches=2, schedule="1f1b")
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        optimize(model, 10**7, inputs, stages=2, microbatches=2, schedule="zigzag")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torchrun"):
            optimize(model, 10**7, inputs, stages=2, microbatches=2)


@pytest.mark.parametrize("case, error", [("infeasible", "InfeasibleBudgetError"), ("mismatch", "PlanMismatchError"),
                                         ("model_fails", "ModelInputError")])
def test_a_rank_that_fails_while_planning_fails_every_rank(tmp_path, case, error):
    """Rank 0's planning refuses the budget, rank 1 traces another step, or the model
    fails on rank 1's inputs: every rank raises the same MemschedError naming the failing
    rank, and none is left waiting in a collective (the run ends within its timeout)."""
    worker = WORKER.with_name("pipeline_failure_worker.py")
    reports = rank_reports(worker, tmp_path, "--case", case, timeout_s=240)
    assert [r["error"] for r in reports] == [error, error], reports
    failing_rank = 0 if case == "infeasible" else 1
    other = reports[1 - failing_rank]
    assert f"rank {failing_rank} failed while" in other["message"], other
