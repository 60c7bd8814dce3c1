"""A saved plan is replayed by `simulate` before anything runs it (`runtime.module.checked_plan`):
an edited plan that cannot run or that peaks above its budget is refused with
`InvalidPlanError` naming the step; one that the replay accepts runs with the plain model's
gradients within its budget."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import optimize
from planner.budget import resolve_budget
from planner.memory import measure_step_memory
from runtime.module import ScheduledModule
from solvers import InvalidPlanError, MemschedError, Plan, simulate, solve
from solvers.plan import Decision, Step, StepKind
from helpers import assert_same_training_step, trace_zoo

EDITS = ("drop", "duplicate", "swap", "move", "rename", "retype", "flip_decision", "budget")


@pytest.fixture(scope="module")
def traced():
    model, inputs, step, graph = trace_zoo("gpt")
    plan = solve(graph, resolve_budget(0.7, graph).budget_bytes, "auto")
    return model, inputs, step, graph, plan


def edit(plan: Plan, graph, data: st.DataObject) -> Plan:
    """One random edit of the plan, as a hand-edited JSON file would carry."""
    kind = data.draw(st.sampled_from(EDITS), label="edit")
    phase = data.draw(st.sampled_from(("forward", "backward")), label="phase")
    steps = list(getattr(plan, phase))
    index = data.draw(st.integers(0, len(steps) - 1), label="index")
    other = data.draw(st.integers(0, len(steps) - 1), label="other")
    if kind == "drop":
        del steps[index]
    elif kind == "duplicate":
        steps.insert(other, steps[index])
    elif kind == "swap":
        steps[index], steps[other] = steps[other], steps[index]
    elif kind == "move":
        steps.insert(other, steps.pop(index))
    elif kind == "rename":
        names = sorted(graph.op_by_name) if steps[index].kind is StepKind.RUN else sorted(graph.value_by_name)
        steps[index] = Step(steps[index].kind, data.draw(st.sampled_from(names + ["no_such_name"]), label="name"))
    elif kind == "retype":
        steps[index] = Step(data.draw(st.sampled_from(list(StepKind)), label="kind"), steps[index].name)
    elif kind == "flip_decision" and plan.decisions:
        root = data.draw(st.sampled_from(sorted(plan.decisions)), label="root")
        decisions = dict(plan.decisions)
        decisions[root] = data.draw(st.sampled_from(list(Decision)), label="decision")
        return replace(plan, decisions=decisions)
    elif kind == "budget":
        return replace(plan, budget_bytes=data.draw(st.integers(1, 2 * plan.budget_bytes), label="budget"))
    edited = replace(plan, **{phase: tuple(steps)})
    return Plan.from_json(json.loads(json.dumps(edited.to_json())))      # as loaded from a file


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_no_edited_plan_runs_unless_the_replay_accepts_it(traced, data) -> None:
    """1,000 random edits: each is either refused with a MemschedError before it runs, or
    the replay accepts it within its budget (then the module is built, ready to run)."""
    model, inputs, step, graph, plan = traced
    edited = edit(plan, graph, data)
    try:
        accepted = simulate(graph, edited)
    except MemschedError:
        accepted = None
    if accepted is None or accepted.peak_bytes > edited.budget_bytes:
        with pytest.raises(InvalidPlanError, match=r"plan by '[^']*'(, (forward|backward) step \d+|: (forward|backward) never| peaks at)"):
            ScheduledModule(model, step, graph, edited)
    else:
        scheduled = ScheduledModule(model, step, graph, edited)
        assert scheduled.plan.predicted_peak_bytes == accepted.peak_bytes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_accepted_edits_train_exactly_within_their_budget(traced, data) -> None:
    """An edit the replay accepts (a step moved to where it still runs, a free repeated
    late) trains with the plain model's gradients, its tracked peak within the budget."""
    model, inputs, step, graph, plan = traced
    edited = edit(plan, graph, data)
    try:
        scheduled_plan = ScheduledModule(model, step, graph, edited).plan
    except MemschedError:
        return
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, scheduled_plan)
    assert_same_training_step(scheduled, model_copy, reference, inputs, label="edited plan")
    model_copy.zero_grad(set_to_none=True)
    resident = list(model_copy.parameters()) + list(model_copy.buffers()) + list(inputs)
    _, report = measure_step_memory(lambda: scheduled(*inputs).sum().backward() if not isinstance(
        scheduled(*inputs), torch.Tensor) or scheduled(*inputs).dim() else scheduled(*inputs).backward(),
        "cpu", resident)
    assert report.peak_bytes <= scheduled_plan.budget_bytes


def test_the_issue_edits_are_refused_with_the_step(traced, tmp_path) -> None:
    """The two edits from the report: every backward recomputation removed (it would run
    over the budget), and one backward run step deleted (a bare KeyError before)."""
    model, inputs, step, graph, plan = traced
    forward_ops = {op.name for op in graph.forward_ops}
    recomputations = [s for s in plan.backward if s.kind is StepKind.RUN and s.name in forward_ops]
    assert recomputations, "the plan recomputes nothing; lower the budget of the fixture"
    no_recompute = replace(plan, backward=tuple(s for s in plan.backward if s not in recomputations))
    path = tmp_path / "edited.plan.json"
    no_recompute.save(str(path))
    with pytest.raises(InvalidPlanError, match=r"backward step \d+ .*(not on the device|above its budget)"):
        optimize(copy.deepcopy(model), 0.5, inputs, plan=path, repeats=1)
    first_backward_op = next(i for i, s in enumerate(plan.backward) if s.kind is StepKind.RUN
                             and s.name not in forward_ops)
    one_deleted = replace(plan, backward=plan.backward[:first_backward_op] + plan.backward[first_backward_op + 1:])
    with pytest.raises(InvalidPlanError, match=r"backward step \d+"):
        ScheduledModule(model, step, graph, one_deleted)
    over = replace(plan, budget_bytes=plan.predicted_peak_bytes - 1)
    with pytest.raises(InvalidPlanError, match="above its budget"):
        ScheduledModule(model, step, graph, over)


def test_a_random_op_run_twice_in_the_forward_draws_the_same_numbers(traced) -> None:
    """A hand-edited plan that runs a dropout mask twice in the forward (an edit CI's
    hypothesis run found): the second run replays the first's generator state, so the loss
    and gradients stay the plain model's and the generator advances as in the plain step."""
    model, inputs, step, graph, plan = traced
    index = next(i for i, s in enumerate(plan.forward) if s.kind is StepKind.RUN and graph.op(s.name).random)
    twice = replace(plan, forward=plan.forward[:index] + (plan.forward[index],) + plan.forward[index:])
    accepted = simulate(graph, twice)
    assert accepted.peak_bytes >= simulate(graph, plan).peak_bytes
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, replace(twice, budget_bytes=accepted.peak_bytes))
    assert_same_training_step(scheduled, model_copy, reference, inputs, label="random op run twice")
