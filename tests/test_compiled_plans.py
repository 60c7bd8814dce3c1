"""``optimize(..., compile=True)``: the plan's programs compiled by inductor.

On the tiny zoo GPT (dropout, so recomputation replays random draws) and ResNet (BatchNorm,
so re-runs and buffer updates): the loss, every gradient and every buffer are allclose to
``torch.compile``'s on the plain model (and to the eager step), the step measured from
the allocator's events peaks within the budget, and a second step of the same shape
compiles nothing. A new input shape gets its own plan and program (MLP: two runs, cheap),
a step over budget is refused with the measured figure, and the program is cut exactly
at the eager calls.

Each compiled model costs ~20 s on 2 cores with a cold inductor cache: marked slow.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

import planner.api
import planner.compiled
import runtime.compiled
import runtime.rng
from planner import optimize, zoo
from planner.benchmark import allocator_step_peak, train_step
from planner.budget import resolve_budget
from planner.errors import CompiledBudgetError, OptionError
from planner.memory import measure_allocator_peak
from runtime.compiled import CompiledProgram, forget_compiled_runs
from runtime.module import ScheduledModule, StepProgram, checked_plan
from runtime.step import random_fill_like
from solvers.errors import InfeasibleBudgetError, InvalidPlanError, PlanMismatchError
from solvers.explain import explain
from solvers.graph import Phase
from solvers.order import gradients_first
from solvers.plan import COMPILED_OPTION, EAGER_BUDGET_OPTION, FALLBACK_OPTION

SEED = 7


def _inductor_compiles() -> int:
    return counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] + \
        counters["inductor"]["fxgraph_cache_bypass"]


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _seeded_step(module: torch.nn.Module, model: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = train_step(module, inputs)
    return loss, _gradients(model)


def _assert_close_steps(actual: tuple, expected: tuple, label: str, **tolerance: float) -> None:
    loss, gradients = actual
    expected_loss, expected_gradients = expected
    torch.testing.assert_close(loss, expected_loss, msg=lambda m: f"{label} loss: {m}", **tolerance)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], msg=lambda m, n=name: f"{label} grad {n}: {m}",
                                   **tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_compiled_plan_matches_compiled_plain_within_budget(name: str) -> None:
    with torch._inductor.config.patch(fallback_random=True):    # compiled plain's dropout draws as eager does
        _compiled_plan_matches_compiled_plain_within_budget(name)


def _compiled_plan_matches_compiled_plain_within_budget(name: str) -> None:
    model, inputs = zoo.make(name, "tiny")
    plain = copy.deepcopy(model)
    compiled_plain = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    optimized = optimize(model, 0.5, inputs, compile=True, progress=False)
    budget_bytes = resolve_budget(0.5, optimized.graph).budget_bytes
    assert optimized.plan.budget_bytes == budget_bytes
    assert optimized.compile_count > 0                       # compiled while fitting the budget
    targets = [node.target for node in optimized._program.step.joint.graph.nodes]
    # layer and batch norms planned as inductor lowers them
    assert torch.ops.aten.native_layer_norm.default not in targets
    assert torch.ops.aten.native_batch_norm.default not in targets
    assert torch.ops.aten.var_mean.correction in targets
    assert model.state_dict().keys() == start.keys()
    for key, value in model.state_dict().items():            # fitting left the buffers as they were
        torch.testing.assert_close(value, start[key], msg=f"{name}: optimize changed {key}")

    reference = _seeded_step(torch.compile(compiled_plain), compiled_plain, inputs)
    ours = _seeded_step(optimized, model, inputs)
    _assert_close_steps(ours, reference, f"{name} vs compiled plain", rtol=1e-4, atol=1e-5)
    _assert_close_steps(ours, _seeded_step(plain, plain, inputs), f"{name} vs eager plain", rtol=1e-4, atol=1e-5)
    for (key, buffer), (_, expected) in zip(model.named_buffers(), compiled_plain.named_buffers()):
        torch.testing.assert_close(buffer, expected, msg=f"{name} buffer {key}")

    compiles, inductor_compiles = optimized.compile_count, _inductor_compiles()
    frames = counters["stats"]["unique_graphs"]
    peak_bytes = allocator_step_peak(optimized, inputs)        # a second step of the same shape
    assert peak_bytes <= budget_bytes, f"{name}: measured {peak_bytes} > budget {budget_bytes}"
    assert peak_bytes == optimized._program.measured_peak_bytes
    assert (optimized.compile_count, _inductor_compiles()) == (compiles, inductor_compiles), "recompiled"
    assert counters["stats"]["unique_graphs"] == frames           # and dynamo traced nothing


def test_a_second_program_of_the_same_plan_takes_its_runs_from_the_first() -> None:
    """The budget fit compiles plan after plan; the runs one compiled are not lowered and
    looked up in inductor's cache again for the next, and the step is the same."""
    model, (x,) = zoo.make("mlp", "tiny")
    forget_compiled_runs()
    optimized = optimize(model, 0.7, (x,), compile=True, progress=False)
    first = optimized._program
    assert first.compile_count == 2 and first.programs.forward.reused_count == 0
    reference = _seeded_step(optimized, model, (x,))
    again = StepProgram(first.step, optimized.graph, optimized.plan, "cpu", compile=True)
    inductor_compiles = _inductor_compiles()
    ours = _seeded_step(ScheduledModule(model, first.step, optimized.graph, optimized.plan, program=again), model, (x,))
    assert again.compile_count == 2 and _inductor_compiles() == inductor_compiles
    assert again.programs.forward.reused_count + again.programs.backward.reused_count == 2
    _assert_close_steps(ours, reference, "the same plan's second program", rtol=0, atol=0)
    forget_compiled_runs()
    third = StepProgram(first.step, optimized.graph, optimized.plan, "cpu", compile=True)
    _seeded_step(ScheduledModule(model, first.step, optimized.graph, optimized.plan, program=third), model, (x,))
    assert third.programs.forward.reused_count + third.programs.backward.reused_count == 0
    assert _inductor_compiles() == inductor_compiles + 2


def test_identical_blocks_are_compiled_once(monkeypatch) -> None:
    """With its dropout fills left eager (as fills `runtime.compiled._random_call` does not
    compile are), the tiny GPT's blocks are cut into runs at the same calls: a run of the
    second block is the first block's code, which inductor compiles once (6 runs, 5
    compiled)."""
    model, inputs = zoo.make("gpt", "tiny")
    forget_compiled_runs()
    monkeypatch.setattr(runtime.compiled, "_random_call", lambda node: None)
    optimized = optimize(model, 1.0, inputs, compile=True, progress=False)
    program = optimized._program
    assert program.fit_tries == 1 and len(program.programs.forward.eager_calls) >= 4     # a dropout or more per block
    forward = program.programs.forward
    assert forward.compile_count == forward.num_runs and forward.reused_count >= 1
    assert allocator_step_peak(optimized, inputs) <= optimized.plan.budget_bytes


def test_dropout_is_drawn_inside_the_compiled_runs_and_replayed_exactly() -> None:
    """The tiny GPT's dropout fills, generator state saves and replays are custom ops inside
    the inductor graphs: one run a program, no eager call. A plan that recomputes masks
    (every block checkpointed) replays them exactly: the step equals the same plan's eager program to rounding (a
    mask drawn out of order or from the wrong state would differ by whole elements), and
    the generator ends where eager plain leaves it."""
    model, inputs = zoo.make("gpt", "tiny")
    optimized = optimize(model, 1.0, inputs, solver="every_block", compile=True, progress=False)
    programs = optimized._program.programs
    code = programs.forward.code + programs.backward.code
    assert (programs.forward.num_runs, programs.backward.num_runs) == (1, 1), code
    assert programs.forward.eager_calls == programs.backward.eager_calls == []
    # each block's masks, read in the forward and in the backward, converted as uint8
    assert programs.forward.mask_conversions >= 2 and programs.backward.mask_conversions >= 2, code
    replays = [node for node in programs.backward.source.graph.nodes if hasattr(node.target, "device_type")]
    assert replays, "the plan recomputes no dropout mask: nothing replayed"
    eager = ScheduledModule(model, optimized._step, optimized.graph, checked_plan(optimized.graph, optimized.plan))
    ours = _seeded_step(optimized, model, inputs)
    after_ours = torch.get_rng_state()
    expected = _seeded_step(eager, model, inputs)
    assert torch.equal(after_ours, torch.get_rng_state())
    _assert_close_steps(ours, expected, "compiled vs eager program of the plan", rtol=1e-4, atol=1e-5)


def test_a_bool_cpu_mask_is_converted_eagerly_to_the_same_values_and_strides() -> None:
    """`runtime.compiled.mask_as_float_op` gives what ``_to_copy`` gives, bit for bit and
    in the same strides (a transposed mask too); only a bool CPU tensor's conversion to a
    floating dtype, with nothing else changed, is taken for one."""
    aten = torch.ops.aten
    mask = torch.rand(6, 5, 4) > 0.3
    for source in (mask, mask.transpose(0, 2)):
        for dtype in (torch.float32, torch.bfloat16):
            expected = aten._to_copy.default(source, dtype=dtype)
            converted = torch.ops.memsched.mask_as_float.default(source, dtype)
            assert converted.dtype == dtype and converted.stride() == expected.stride()
            assert torch.equal(converted, expected)
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = mask
    y = graph.placeholder("y")
    y.meta["val"] = mask.float()
    cases = {graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32}): True,
             graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.int64}): False,
             graph.call_function(aten._to_copy.default, (y,), {"dtype": torch.float16}): False,
             graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32,
                                                               "memory_format": torch.channels_last}): False}
    for node, taken in cases.items():
        assert runtime.compiled._is_cpu_mask_conversion(node) is taken, node.format_node()


def test_random_calls_keep_their_order_inside_a_run() -> None:
    """Two fills that read nothing of each other, a state save between them and a replay
    of the second from it, in one compiled run, draw what the eager program draws, in
    program order, and leave the generator where it does."""
    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    save = runtime.rng.save_rng_state
    first = graph.call_function(random_fill_like, (aten.bernoulli_.float, x, 0.5), {"dtype": torch.bool})
    state = graph.call_function(save, ("cpu",))
    second = graph.call_function(random_fill_like, (aten.uniform_.default, x, -1.0, 1.0))
    again = graph.call_function(runtime.rng.replaying(random_fill_like, "cpu"), (state, aten.uniform_.default, x, -1.0, 1.0))
    third = graph.call_function(random_fill_like, (aten.normal_.default, x, 0.0, 1.0))
    graph.output((second, first, third, again, state))
    module = fx.GraphModule(torch.nn.Module(), graph)
    program = CompiledProgram(module, boxed=True)
    assert program.num_runs == 1 and program.eager_calls == []
    value = torch.randn(64, 64)
    torch.manual_seed(0)
    expected = module(value)
    expected_after = torch.get_rng_state()
    torch.manual_seed(0)
    actual = program([value])
    assert torch.equal(torch.get_rng_state(), expected_after)
    for a, b in zip(actual, expected):
        assert torch.equal(a, b)
    assert torch.equal(actual[0], actual[3])          # the replay draws the second fill again


def test_no_kernel_fuses_across_a_random_call(monkeypatch) -> None:
    """Inductor's fusion hook refuses two kernels on either side of a random call (a
    custom op of `runtime.rng`), so the program keeps the cuts it had when the calls ran
    eagerly: fused across one, two recomputations of a dropout mask's template were
    computed together at the first, and the zoo GPT small's floor plan measured 1 MiB
    over. Kernels between the same two calls are left to inductor's own rules."""
    from torch._inductor.choices import InductorChoices

    monkeypatch.setattr(InductorChoices, "can_fuse", staticmethod(lambda *args: True))

    def node(order: int, op: object = None) -> SimpleNamespace:
        return SimpleNamespace(min_order=order, max_order=order, node=SimpleNamespace(op_overload=op))

    replay = torch.ops.memsched.random_fill_replay.default
    nodes = [node(0), node(1), node(2, replay), node(3), node(4, torch.ops.aten.mm.default), node(5)]
    scheduler = SimpleNamespace(nodes=nodes)
    choices = runtime.compiled._choices_within(16)
    assert choices.can_fuse(scheduler, nodes[0], nodes[1], 1)
    assert not choices.can_fuse(scheduler, nodes[1], nodes[3], 1)
    assert not choices.can_fuse(scheduler, nodes[5], nodes[0], 1)
    assert choices.can_fuse(scheduler, nodes[3], nodes[5], 1)            # an aten extern kernel: no barrier
    fused = SimpleNamespace(min_order=0, max_order=1, node=None)
    assert not choices.can_fuse(scheduler, fused, nodes[3], 1)
    assert not runtime.compiled._choices_within(2).can_fuse(scheduler, nodes[0], nodes[5], 1)   # the window


def test_kernels_sharing_only_an_input_fuse_only_with_no_library_call_between(monkeypatch) -> None:
    """Without horizontal fusion (`HORIZONTAL_FUSION`), two kernels neither of which reads
    the other's output fuse only where no library call (a matmul) comes between them: fused
    across one, a GELU recomputed before a matmul ran after it, beside the matmul's output.
    A kernel and the one that reads its output fuse across it as before."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    monkeypatch.setattr(InductorChoices, "can_fuse", staticmethod(lambda *args: True))

    def kernel(order: int, writes: str, reads: tuple[str, ...]) -> SimpleNamespace:
        return SimpleNamespace(min_order=order, max_order=order, node=None,
                               get_buffer_names=lambda: {writes},
                               read_writes=SimpleNamespace(reads=[SimpleNamespace(name=n) for n in reads]))

    matmul = ExternKernelSchedulerNode.__new__(ExternKernelSchedulerNode)
    matmul.min_order = matmul.max_order = 2
    matmul.node = None
    recomputed = kernel(0, "gelu", ("up",))
    neighbour = kernel(1, "other", ("up",))
    backward = kernel(3, "gelu_grad", ("up", "mm_out"))
    reader = kernel(4, "sum", ("gelu",))
    scheduler = SimpleNamespace(nodes=[recomputed, neighbour, matmul, backward, reader])
    choices = runtime.compiled._choices_within(16, horizontal=False)
    assert choices.can_fuse(scheduler, recomputed, neighbour, 1)          # neighbours
    assert not choices.can_fuse(scheduler, recomputed, backward, 1)       # the matmul between
    assert choices.can_fuse(scheduler, recomputed, reader, 1)             # reads what it writes
    assert runtime.compiled._choices_within(16, horizontal=True).can_fuse(scheduler, recomputed, backward, 1)


def test_new_shape_gets_its_own_compiled_plan() -> None:
    model, (x,) = zoo.make("mlp", "tiny")
    optimized = optimize(model, 0.7, (x,), compile=True, progress=False)
    first = optimized._program
    train_step(optimized, (x,))
    assert optimized._program is first and first.compile_count == 2 and first.compiled
    smaller = x[: x.shape[0] // 2].clone()      # its own storage: a view would count all of x
    train_step(optimized, (smaller,))
    assert len(optimized.plans) == 2 and optimized._program is not first and optimized._program.compile_count > 0
    assert allocator_step_peak(optimized, (smaller,)) <= optimized.plan.budget_bytes
    train_step(optimized, (x,))                         # the first plan again: nothing compiles
    assert optimized._program is first and first.compile_count == 2


def test_over_budget_is_refused_with_the_measured_peak(monkeypatch) -> None:
    """Every compiled step measures 1 MiB over the budget: the plan is re-solved lower
    and, when that cannot fit, the error names the least peak measured."""
    model, inputs = zoo.make("mlp", "tiny")
    measured = []

    def over_budget(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        measured.append(plan.budget_bytes)
        return plan.budget_bytes + 2**20 + len(measured)

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", over_budget)
    with pytest.raises(CompiledBudgetError) as raised:
        optimize(model, 0.8, inputs, compile=True, progress=False)
    error = raised.value
    assert isinstance(error, InfeasibleBudgetError)
    assert len(measured) >= 1 and error.least_feasible_bytes == min(peak for _, peak in error.tried)
    assert str(error.least_feasible_bytes) in str(error) and "compile=False" in str(error)


def test_fit_solves_again_for_the_budget_less_the_plans_excess(monkeypatch) -> None:
    """Compiling adds a fixed 32 KiB to every plan: the first plan, which its prediction
    fills to within that of the budget, measures over it; the second is solved for the
    budget less those 32 KiB, fits, and is kept: two measurements, no upward try past the
    one that failed."""
    model, inputs = zoo.make("gpt", "tiny")
    excess_bytes = 2**15
    predicted = []

    def with_excess(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        predicted.append(plan.predicted_peak_bytes)
        return plan.predicted_peak_bytes + excess_bytes

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", with_excess)
    optimized = optimize(model, 0.8, inputs, compile=True, progress=False)
    budget_bytes = optimized.plan.budget_bytes
    assert predicted[0] + excess_bytes > budget_bytes, "the first plan must measure over for this test to mean much"
    assert len(predicted) == 2 and optimized._program.fit_tries == 2
    assert optimized._program.solver_budget_bytes == budget_bytes - excess_bytes
    assert optimized._program.measured_peak_bytes == predicted[1] + excess_bytes <= budget_bytes


def test_fit_solves_above_the_budget_where_compiling_measures_below(monkeypatch) -> None:
    """Every compiled step measures a tenth of the budget below its eager prediction: the
    plan is solved again for that much more than the budget, kept (its compiled step fits),
    and records the budget its eager replay was solved within; it runs only compiled."""
    model, inputs = zoo.make("gpt", "tiny")
    predicted = []
    eager_first_calls = []
    within = []              # whether the eager program of each plan keeps the caller's budget
    budgets = []
    slack = {}

    def below(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        predicted.append(plan.predicted_peak_bytes)
        programs = program.programs
        eager_first_calls.append(programs.forward.eager_first_call and programs.backward.eager_first_call)
        budgets.append(plan.budget_bytes)
        within.append(planner.compiled.eager_phases_within(graph, plan, budgets[0]) == frozenset(Phase))
        slack.setdefault("bytes", plan.budget_bytes // 10)
        return plan.predicted_peak_bytes - slack["bytes"]

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", below)
    # the gate on the predicted gain reads profiled times, which move under load
    monkeypatch.setattr(planner.compiled, "_predicted_faster", lambda candidate, fitting: True)
    monkeypatch.setattr(planner.compiled, "_may_gain", lambda fitting, graph: True)
    optimized = optimize(model, 0.6, inputs, compile=True, progress=False)
    plan = optimized.plan
    assert len(predicted) == 2 and optimized._program.fit_tries == 2
    assert plan.options[EAGER_BUDGET_OPTION] == optimized._program.solver_budget_bytes > plan.budget_bytes
    assert plan.options[COMPILED_OPTION] is True
    assert predicted[1] > plan.budget_bytes, "the second plan must use the room above the budget"
    # the warm-up step runs a plan eagerly while its kernels build only where its eager
    # program keeps the budget (not the second plan's, solved above it)
    assert eager_first_calls == within and within[1] is False
    assert optimized._program.measured_peak_bytes == predicted[1] - slack["bytes"] <= plan.budget_bytes
    train_step(optimized, inputs)
    with pytest.raises(InvalidPlanError, match="compile=True"):
        ScheduledModule(model, optimized._step, optimized.graph, plan)
    with pytest.raises(InvalidPlanError):
        checked_plan(optimized.graph, replace(plan, options={}), compiled=True)
    (warning,) = explain(optimized.graph, plan).summary.warnings
    assert "fitted compiled" in warning and "compile=True" in warning


def test_a_plan_near_the_keep_all_step_is_not_raised(monkeypatch) -> None:
    """A fitting plan predicted within `RAISE_GAIN` of the keep-all step cannot be beaten
    by that much, so no plan for more memory is solved; one further from it may be."""
    model, inputs = zoo.make("gpt", "tiny")
    solves = []

    def below(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        return plan.predicted_peak_bytes - plan.budget_bytes // 10      # room to raise into

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", below)
    solve = planner.api._StepPlanner.solve
    monkeypatch.setattr(planner.api._StepPlanner, "solve", lambda *a, **k: solves.append(a[2]) or solve(*a, **k))
    monkeypatch.setattr(planner.compiled, "_may_gain", lambda fitting, graph: False)
    optimized = optimize(model, 0.6, inputs, compile=True, progress=False)
    assert len(solves) == 1 and optimized._program.fit_tries == 1
    graph, plan = optimized.graph, optimized.plan
    step_ms = graph.total_time_ms
    gain = planner.compiled.RAISE_GAIN
    near = replace(plan, predicted_time_ms=step_ms * (1 + gain / 2), baseline_time_ms=step_ms)
    far = replace(plan, predicted_time_ms=step_ms * (1 + 2 * gain), baseline_time_ms=step_ms)
    monkeypatch.undo()
    assert not planner.compiled._may_gain(near, graph) and planner.compiled._may_gain(far, graph)


def test_where_the_raised_plan_measures_over_the_fit_bisects_towards_it(monkeypatch) -> None:
    """Plans solved for up to half the spare room above the budget measure a tenth of the
    budget below their prediction; plans solved for more measure over. The first raise
    (the whole spare room) fails, and the solver budget halfway between it and the plan
    that fits is tried next, and kept where it fits: the kept plan is solved above the
    budget, below the raise that failed."""
    model, inputs = zoo.make("gpt", "tiny")
    tries = []

    def over_above_half(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        budget_bytes = tries[0] if tries else plan.budget_bytes
        tries.append(plan.budget_bytes)
        slack_bytes = budget_bytes // 10
        if plan.budget_bytes <= budget_bytes + slack_bytes // 2:
            return plan.predicted_peak_bytes - slack_bytes
        return budget_bytes + 1

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", over_above_half)
    monkeypatch.setattr(planner.compiled, "_predicted_faster", lambda candidate, fitting: True)
    monkeypatch.setattr(planner.compiled, "_may_gain", lambda fitting, graph: True)
    optimized = optimize(model, 0.6, inputs, compile=True, progress=False)
    budget_bytes = optimized.plan.budget_bytes
    solver_bytes = optimized._program.solver_budget_bytes
    first_failed = next(bytes_ for bytes_ in tries if bytes_ > budget_bytes + budget_bytes // 20)
    assert tries[0] == budget_bytes and len(tries) >= 3
    assert budget_bytes < solver_bytes < first_failed
    assert solver_bytes in tries[tries.index(first_failed) + 1:]
    assert optimized._program.measured_peak_bytes <= budget_bytes


def test_below_the_eager_floor_the_floor_plan_is_fitted_compiled(monkeypatch) -> None:
    """A budget below the least the solver meets for the eager step is not refused before
    compiling: the floor plan is compiled and measured, and kept where it fits."""
    model, inputs = zoo.make("gpt", "tiny")
    slack_bytes = 2**13

    def below(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        return plan.predicted_peak_bytes - slack_bytes

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", below)
    with pytest.raises(CompiledBudgetError) as raised:      # far below: the floor plan measures over
        optimize(model, 2**10, inputs, compile=True, progress=False)
    ((floor_bytes, measured_bytes),) = raised.value.tried
    assert measured_bytes > 2**10
    budget_bytes = floor_bytes - slack_bytes // 2
    optimized = optimize(model, budget_bytes, inputs, compile=True, progress=False)
    plan = optimized.plan
    assert plan.budget_bytes == budget_bytes < plan.predicted_peak_bytes
    assert plan.options[EAGER_BUDGET_OPTION] >= floor_bytes
    assert optimized._program.measured_peak_bytes <= budget_bytes
    train_step(optimized, inputs)


def test_where_no_plan_is_left_below_one_that_measures_over_another_solvers_plan_is_compiled(monkeypatch) -> None:
    """Compiling adds 1 MiB to the first plan (the tiny GPT's whole step is about that), so
    no plan is left for the budget less its excess: the other plans ``auto`` races for the
    same budget are compiled in turn, and the first that measures within it is kept. A
    solver the caller named gets no alternatives."""
    model, inputs = zoo.make("gpt", "tiny")
    measured = []

    def first_plan_over(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        measured.append(plan)
        first = measured[0]
        same = (plan.forward, plan.backward, plan.decisions) == (first.forward, first.backward, first.decisions)
        return plan.predicted_peak_bytes + (2**20 if same else 0)

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", first_plan_over)
    optimized = optimize(model, 0.5, inputs, compile=True, progress=False)
    first, kept = measured[0], optimized.plan
    assert len(measured) == 2 and optimized._program.fit_tries == 2
    assert optimized._program.solver_budget_bytes == kept.budget_bytes
    assert (kept.forward, kept.backward, kept.decisions) != (first.forward, first.backward, first.decisions)
    assert optimized._program.measured_peak_bytes == kept.predicted_peak_bytes <= kept.budget_bytes
    measured.clear()
    with pytest.raises(CompiledBudgetError):
        optimize(model, 0.5, inputs, compile=True, progress=False, solver="hierarchical")
    assert all(plan.solver == "hierarchical" for plan in measured)


def test_a_fallback_plan_that_measures_over_has_the_other_plans_compiled_before_any_solve_below(
        monkeypatch) -> None:
    """Where the plan that measures over is a fallback of its solver's (at its floor), the
    plans the solvers found beside it for its budget (``runners_up``) are compiled before
    any solve below it, and without solving again."""
    model, inputs = zoo.make("gpt", "tiny")
    measured, solved = [], []
    solve = planner.api.solve

    def counted(graph, budget_bytes, solver="auto", **options):
        solved.append((solver, budget_bytes))
        plan = solve(graph, budget_bytes, solver, **options)
        return replace(plan, options={**plan.options, FALLBACK_OPTION: "drop-all"}) if len(solved) == 1 else plan

    def first_plan_over(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        measured.append(plan)
        return plan.predicted_peak_bytes + (2**20 if len(measured) == 1 else 0)

    monkeypatch.setattr(planner.api, "solve", counted)
    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", first_plan_over)
    optimized = optimize(model, 0.5, inputs, compile=True, progress=False)
    first, kept = measured
    assert solved == [("auto", kept.budget_bytes)], "nothing is solved after the first plan"
    assert first.runners_up and (kept.forward, kept.backward) != (first.forward, first.backward)
    assert optimized._program.measured_peak_bytes == kept.predicted_peak_bytes <= kept.budget_bytes
    assert not optimized.plan.runners_up


def test_channels_last_starts_with_room_for_the_weights_copies(monkeypatch) -> None:
    """On a model with convolutions the first compiled plan, in channels-last layouts, is
    solved for the budget less the convolution weights' bytes, so it fits at the first try
    where the copies come to less; where no plan leaves that room (at the floor),
    channels-last is not tried and the plan's own layouts are."""
    model, inputs = zoo.make("resnet", "tiny")
    tried = []

    def copies_added(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        layouts = program.inductor_options.get("layout_optimization", False)
        tried.append((layouts, plan.predicted_peak_bytes))
        return plan.predicted_peak_bytes + (planner.compiled.convolution_weight_bytes(graph) * 3 // 4 if layouts else 0)

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", copies_added)
    monkeypatch.setattr(planner.compiled, "_predicted_faster", lambda candidate, fitting: False)   # no raise
    optimized = optimize(model, 0.7, inputs, compile=True, progress=False)
    weight_bytes = planner.compiled.convolution_weight_bytes(optimized.graph)
    assert weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 4)
    ((layouts, predicted_bytes),) = tried
    assert layouts and predicted_bytes <= optimized.plan.budget_bytes - weight_bytes
    assert optimized._program.fit_tries == 1 and optimized._program.measured_peak_bytes <= optimized.plan.budget_bytes
    tried.clear()
    with pytest.raises(CompiledBudgetError) as raised:        # far below: the floor plan measures over
        optimize(model, 2**10, inputs, compile=True, progress=False)
    ((floor_bytes, _),) = raised.value.tried      # far below: no other solver's plan is compiled
    assert tried and not any(layouts for layouts, _ in tried)
    tried.clear()
    floor = optimize(model, floor_bytes, inputs, compile=True, progress=False)
    assert [layouts for layouts, _ in tried] == [False] and floor._program.fit_tries == 1


def test_simulated_offload_on_a_cpu_is_refused() -> None:
    model, inputs = zoo.make("mlp", "tiny")
    with pytest.raises(OptionError, match="target="):
        optimize(model, 0.5, inputs, compile=True, target="h100-pcie5", progress=False)


def _cut_at_a_random_fill() -> fx.GraphModule:
    """``relu(x * x + random_(x * x)), x * x``: two aten runs around an eager random fill."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, x))
    noise = graph.call_function(random_fill_like, (torch.ops.aten.random_.default, y))
    z = graph.call_function(torch.ops.aten.add.Tensor, (y, noise))
    w = graph.call_function(torch.ops.aten.relu.default, (z,))
    graph.output((w, y))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_program_is_cut_at_eager_calls_and_computes_the_same() -> None:
    """aten runs compile; a random fill inductor is not given (``random_``: integer
    arguments) stays an eager call between two runs, in order."""
    module = _cut_at_a_random_fill()
    program = CompiledProgram(module, boxed=True)
    assert program.num_runs == 2 and program.eager_calls == ["random_fill_like"]
    value = torch.randn(4, 8)
    torch.manual_seed(0)
    expected = module(value)
    torch.manual_seed(0)
    arguments = [value]
    actual = program(arguments)
    assert arguments == [] and program.compile_count == 2          # boxed: the list is cleared
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b)


def _pointwise_between_matmuls() -> fx.GraphModule:
    """x -> sin -> mm -> cos -> mm -> exp -> mm -> relu: four pointwise kernels that no
    fusion joins (the matmuls are library calls between them)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    weight = graph.placeholder("weight")
    value = x
    for op in (torch.ops.aten.sin.default, torch.ops.aten.cos.default, torch.ops.aten.exp.default):
        value = graph.call_function(torch.ops.aten.mm.default, (graph.call_function(op, (value,)), weight))
    graph.output((graph.call_function(torch.ops.aten.relu.default, (value,)),))
    return fx.GraphModule(torch.nn.Module(), graph)


def _built_fresh(module: fx.GraphModule, arguments: list) -> tuple:
    from torch._inductor.utils import fresh_cache

    forget_compiled_runs()
    with fresh_cache():
        return CompiledProgram(module, boxed=False)(*arguments)


def test_kernels_build_together_as_one_library_and_compute_the_same(monkeypatch) -> None:
    """Inductor's C++ kernels build `KERNELS_PER_BUILD` to a compiler process: four
    kernels at two per build are two libraries, and the run computes what eager does."""
    monkeypatch.setattr(runtime.compiled, "KERNELS_PER_BUILD", 2)
    built = []
    start = runtime.compiled._KernelBatch.start

    def recorded(batch: runtime.compiled._KernelBatch) -> None:
        if not batch.started:
            built.append(len(batch.kernels))
        start(batch)

    monkeypatch.setattr(runtime.compiled._KernelBatch, "start", recorded)
    module = _pointwise_between_matmuls()
    arguments = [torch.randn(8, 16), torch.randn(16, 16) / 4]
    (actual,) = _built_fresh(module, arguments)
    torch.testing.assert_close(actual, module(*arguments)[0])
    assert built == [2, 2]


def _refused_source(kernels: list) -> str:
    raise ValueError("no source")


@pytest.mark.parametrize("source", [lambda kernels: "#error not C++\n", _refused_source],
                         ids=["compiler error", "no source"])
def test_kernels_whose_batch_fails_to_build_are_built_one_by_one(monkeypatch, caplog, source) -> None:
    """A batch the compiler refuses, or that cannot be submitted, is built kernel by
    kernel, as inductor builds them, with a warning; the run computes the same."""
    monkeypatch.setattr(runtime.compiled, "_batched_source", source)
    module = _pointwise_between_matmuls()
    arguments = [torch.randn(8, 16), torch.randn(16, 16) / 4]
    with caplog.at_level("WARNING", logger="runtime.compiled"):
        (actual,) = _built_fresh(module, arguments)
    torch.testing.assert_close(actual, module(*arguments)[0])
    assert "building them one by one" in caplog.text


def test_a_kernel_source_outside_the_batched_form_is_not_batched() -> None:
    """Only a source of one ``extern "C"`` entry after inductor's prefix include, with
    pointer, integer or float arguments, goes into a batch."""
    batchable = runtime.compiled._batchable
    kernel = '#include <torch/csrc/inductor/cpp_prefix.h>\nextern "C"  void  kernel(float* out) { out[0] = 1; }\n'
    assert batchable(["float*"], kernel)
    assert not batchable(["float*"], kernel.replace("prefix.h>", "prefix.h>\n#include <vector>"))
    assert not batchable(["float*"], kernel + 'extern "C" void other(float* out) {}\n')
    assert not batchable(["at::Tensor"], kernel)


def test_a_first_call_runs_eagerly_while_the_kernels_build() -> None:
    """With ``eager_first_call``, the first call compiles each run without waiting for its
    kernels and computes every run's ops eagerly, drawing what the compiled program draws;
    the second call waits for the kernels and runs them, compiling nothing again."""
    module = _cut_at_a_random_fill()
    forget_compiled_runs()
    program = CompiledProgram(module, boxed=True, eager_first_call=True)
    runs = [instruction.body for instruction in program._instructions
            if isinstance(instruction.body, runtime.compiled._Run)]
    value = torch.randn(4, 8)
    torch.manual_seed(0)
    expected = module(value)
    for call in range(2):
        torch.manual_seed(0)
        arguments = [value]
        actual = program(arguments)
        assert arguments == [] and program.compile_count == 2
        # after the first call the kernels' modules wait to be finished; after the second, none does
        assert all(bool(run.compiled.pending) == (call == 0) for run in runs)
        for a, b in zip(actual, expected):
            torch.testing.assert_close(a, b)
    finished = CompiledProgram(module, boxed=True, eager_first_call=True)
    finished([value])
    finished.finish_compiling()
    assert not any(run.compiled.pending for run in runs)


def test_an_eager_first_call_gives_each_output_the_compiled_runs_strides() -> None:
    """A run computed eagerly hands on each output with the strides its compiled code
    gives it, so that the runs compiled after it are compiled for the inputs they will get."""
    graph = fx.Graph()
    x = graph.placeholder("input_0")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    graph.output((y, x))
    run = runtime.compiled._Run(fx.GraphModule(torch.nn.Module(), graph), ["x"], ["y", "x"])
    run.compiled = runtime.compiled._CompiledRun(lambda inputs: None, [], [(1, 4), None])
    value = torch.randn(4, 8)
    arguments = [value]
    doubled, same = runtime.compiled._run_eagerly(run, arguments)
    assert arguments == [] and same is value
    assert doubled.stride() == (1, 4) and torch.equal(doubled, value * 2)


def test_an_eager_first_call_hands_on_the_layout_the_compiled_run_gives() -> None:
    """In channels-last layouts inductor's convolution returns a layout the eager one does
    not: the first call, run eagerly, hands the next run its input in the compiled layout,
    so that run is compiled for what the compiled first run gives it on the next call
    (it asserted a stride mismatch on the zoo ResNet small at 37.30 MiB when the layout
    was taken from the traced graph)."""
    aten = torch.ops.aten
    graph = fx.Graph()
    x, weight = graph.placeholder("x"), graph.placeholder("weight")
    y = graph.call_function(aten.convolution.default, (x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    noise = graph.call_function(random_fill_like, (aten.random_.default, x))      # an eager call: a cut
    graph.output((graph.call_function(aten.relu.default, (y,)), noise))
    module = fx.GraphModule(torch.nn.Module(), graph)
    forget_compiled_runs()
    program = CompiledProgram(module, boxed=True, eager_first_call=True, inductor_options={"layout_optimization": True})
    value, kernel = torch.randn(8, 64, 8, 8), torch.randn(64, 64, 3, 3)
    torch.manual_seed(0)
    expected = module(value, kernel)
    for _ in range(2):
        torch.manual_seed(0)
        actual = program([value, kernel])
        for a, b in zip(actual, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    first_run = next(i.body for i in program._instructions if isinstance(i.body, runtime.compiled._Run))
    assert first_run.compiled.output_strides == [(4096, 1, 512, 64)]      # channels-last, not eager's


def test_an_eager_calls_arguments_die_at_the_call_not_in_the_run_after_it() -> None:
    """A random op's template whose last use is the op dies there, as in the eager program,
    not at the next eager call (the interpreter's reference to the call's arguments is let
    go of after the call)."""
    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    template = graph.call_function(aten.mul.Tensor, (x, 2.0))
    noise = graph.call_function(random_fill_like, (aten.random_.default, template))
    product = graph.call_function(aten.mm.default, (noise, noise))
    graph.output((product,))
    module = fx.GraphModule(torch.nn.Module(), graph)
    program = CompiledProgram(module, boxed=True)
    assert program.num_runs == 2 and program.eager_calls == ["random_fill_like"]
    value = torch.randn(512, 512)
    block_bytes = value.untyped_storage().nbytes()
    program([value])                                               # compiles
    _, peak_bytes = measure_allocator_peak(lambda: program([value]), [value])
    # two blocks live at the call (template and noise) and in the run after it (noise and
    # the product); three if the template outlived the call
    assert peak_bytes - block_bytes <= 2.5 * block_bytes, \
        f"{(peak_bytes - block_bytes) / block_bytes:.2f} blocks held above the input"


def test_cross_entropy_backward_fuses_without_a_buffer_of_zeros() -> None:
    """The cross-entropy backward scatters into a logits-sized buffer of zeros; inductor's
    joint-graph passes, which the program applies to each run as torch.compile applies
    them to its joint graph, make that a ``where`` fused into the softmax backward, so the
    compiled run holds one logits-sized buffer (its result), not two."""
    aten = torch.ops.aten
    graph = fx.Graph()
    grad_loss, log_probs, target = (graph.placeholder(name) for name in ("grad_loss", "log_probs", "target"))
    total_weight = graph.placeholder("total_weight")
    grad_log_probs = graph.call_function(aten.nll_loss_backward.default,
                                         (grad_loss, log_probs, target, None, 1, -100, total_weight))
    grad_logits = graph.call_function(aten._log_softmax_backward_data.default,
                                      (grad_log_probs, log_probs, 1, torch.float32))
    graph.output((grad_logits,))
    module = fx.GraphModule(torch.nn.Module(), graph)
    program = CompiledProgram(module, boxed=True)
    tokens, vocabulary = 256, 4096
    logits_bytes = tokens * vocabulary * 4
    inputs = [torch.tensor(1.0), torch.randn(tokens, vocabulary).log_softmax(1),
              torch.randint(0, vocabulary, (tokens,)), torch.tensor(float(tokens))]
    expected = module(*inputs)
    program(list(inputs))                                          # compiles
    actual, peak_bytes = measure_allocator_peak(lambda: program(list(inputs)), inputs)
    torch.testing.assert_close(actual[0], expected[0])
    resident_bytes = sum(t.untyped_storage().nbytes() for t in inputs)
    assert peak_bytes - resident_bytes < 1.5 * logits_bytes, \
        f"{(peak_bytes - resident_bytes) / logits_bytes:.2f} logits-sized buffers held"


def _compiled_gpt_graph() -> tuple:
    """The tiny zoo GPT's step as ``compile=True`` plans it, its eager graph and its sizes."""
    from planner.capture import capture
    from planner.profile import profile

    model, inputs = zoo.make("gpt", "tiny")
    step = capture(model, inputs)
    planner.compiled.decompose_for_inductor(step)
    graph = profile(step, model, inputs, repeats=1, progress=False)
    return step, graph, planner.compiled.with_compiled_costs(graph, step)


def test_a_backward_value_computed_inside_its_readers_kernel_is_sized_zero() -> None:
    """The cross-entropy backward's logits-sized gradient is read once, by the log-softmax
    backward right after it, which inductor fuses it into: the compiled graph sizes it 0, so
    that moment of the step is predicted one logits-sized buffer lower, and nothing of the
    forward is sized 0 (a forward value may be kept for the backward, a kernel's output).
    `eager_sized` gives the eager graph back."""
    from solvers.graph import Phase, ValueKind
    from solvers.portfolio import solve
    from solvers.simulate import simulate

    step, traced, compiled = _compiled_gpt_graph()
    graph = gradients_first(traced)              # the order the compiled graph has
    fused = planner.compiled.fused_backward_values(graph, step)
    (cross_entropy,) = [op for op in graph.ops if op.target == "aten.nll_loss_backward.default"]
    (logits_gradient,) = cross_entropy.outputs
    assert logits_gradient in fused
    assert all(graph.value(name).kind is ValueKind.GRADIENT_WORK for name in fused)
    assert {value.name for value in compiled.values if value.size_bytes != graph.value(value.name).size_bytes} == fused
    assert compiled.hash != graph.hash
    assert planner.compiled.eager_sized(compiled).hash == graph.hash

    plan = solve(compiled, 2**40, "none")
    backward = [str(s) for s in plan.steps(Phase.BACKWARD)]
    at = backward.index("run(_log_softmax_backward_data)")

    def high_water(g) -> int:
        return next(point.high_water_bytes for point in simulate(g, plan, check_hash=False).timeline
                    if point.phase is Phase.BACKWARD and point.step_index == at)
    # and the log-softmax backward writes its result into the saved log-softmax, which dies
    # there (`in_place_inputs`): one more logits-sized buffer less
    not_in_place = replace(compiled, ops=tuple(replace(op, reuses=()) for op in compiled.ops))
    assert high_water(planner.compiled.eager_sized(compiled)) - high_water(not_in_place) == \
        graph.value(logits_gradient).size_bytes
    assert high_water(not_in_place) - high_water(compiled) == graph.value(logits_gradient).size_bytes


def test_weight_gradients_run_before_input_gradients_and_lower_the_compiled_graphs_floor(monkeypatch) -> None:
    """`solvers.order.gradients_first`: in each MLP's backward the down projection's
    weight-gradient matmul runs before its input-gradient matmul (autograd runs them the
    other way round), every op still follows what it reads, the forward is unchanged; the
    compiled graph (`with_compiled_costs`) is in that order, where the solvers reach no
    higher a floor nor keep-all peak than in the traced order; and a plan in that order
    gives the plain model's gradients."""
    from solvers.portfolio import solve

    step, traced, compiled = _compiled_gpt_graph()
    reordered = gradients_first(traced)
    assert [op.name for op in reordered.forward_ops] == [op.name for op in traced.forward_ops]
    made = set()
    for op in reordered.ops:
        assert all(name in made or reordered.value(name).producer is None for name in op.inputs), op.name
        made.update(op.outputs)
    traced_order = [op.name for op in traced.backward_ops]
    new_order = [op.name for op in reordered.backward_ops]
    gradient_roots = {traced.value(name).root for name in traced.gradients}
    swapped = 0
    for op in traced.backward_ops:
        if op.target != "aten.mm.default" or not set(op.outputs) & gradient_roots:
            continue
        sibling = traced_order[traced_order.index(op.name) - 2]    # mm(dY, W), t(dY), mm(t(dY), X)
        if traced.op(sibling).target == "aten.mm.default" and not set(traced.op(sibling).outputs) & gradient_roots:
            assert new_order.index(op.name) < new_order.index(sibling), (op.name, sibling)
            swapped += 1
    assert swapped >= 2                                             # one per block at least
    assert [op.name for op in compiled.ops] == [op.name for op in reordered.ops]

    monkeypatch.setattr(planner.compiled, "gradients_first", lambda graph: graph)
    in_traced_order = planner.compiled.with_compiled_costs(traced, step)
    monkeypatch.undo()

    def floor(graph) -> int:
        with pytest.raises(InfeasibleBudgetError) as refused:
            solve(graph, 1, "auto")
        return refused.value.least_feasible_bytes
    assert floor(compiled) <= floor(in_traced_order)
    keep_all = solve(compiled, 2**40, "none")
    assert keep_all.predicted_peak_bytes <= solve(in_traced_order, 2**40, "none").predicted_peak_bytes
    model, inputs = zoo.make("gpt", "tiny")
    plain = _seeded_step(model, model, inputs)
    ours = _seeded_step(ScheduledModule(model, step, compiled, checked_plan(compiled, keep_all)), model, inputs)
    _assert_close_steps(ours, plain, "gradients first vs plain", rtol=1e-5, atol=1e-6)


def test_the_warm_up_runs_eagerly_only_the_phases_whose_eager_program_keeps_the_budget() -> None:
    """`eager_phases_within` reads the eager program's peak per phase: with the budget
    between the forward's and the backward's eager peaks, only the forward's first call
    runs eagerly (`runtime.compiled.compile_programs`)."""
    from runtime.codegen import generate
    from runtime.compiled import compile_programs
    from solvers.graph import Phase
    from solvers.portfolio import solve
    from solvers.simulate import simulate

    step, graph, compiled = _compiled_gpt_graph()
    plan = solve(compiled, 2**40, "none")
    timeline = simulate(planner.compiled.eager_sized(compiled), plan, check_hash=False).timeline
    forward_bytes, backward_bytes = (max(p.high_water_bytes for p in timeline if p.phase is phase)
                                     for phase in (Phase.FORWARD, Phase.BACKWARD))
    assert forward_bytes < backward_bytes
    phases = planner.compiled.eager_phases_within
    assert phases(compiled, plan, backward_bytes) == {Phase.FORWARD, Phase.BACKWARD}
    assert phases(compiled, plan, backward_bytes - 1) == {Phase.FORWARD}
    assert phases(compiled, plan, forward_bytes - 1) == frozenset()
    programs = compile_programs(generate(step, compiled, plan, "cpu"), eager_first_call={Phase.FORWARD})
    assert programs.forward.eager_first_call and not programs.backward.eager_first_call


def test_a_plan_fitted_compiled_loaded_without_compile_is_refused_with_the_fix() -> None:
    """A plan the fit returns (`COMPILED_OPTION`) was solved over the compiled step's graph,
    not the eager one: loaded without ``compile=True`` it is refused, saying to load it with
    ``compile=True``, not that the model changed."""
    from solvers.portfolio import solve

    _, _, compiled = _compiled_gpt_graph()
    plan = replace(solve(compiled, 2**40, "none"), options={COMPILED_OPTION: True})
    model, inputs = zoo.make("gpt", "tiny")
    with pytest.raises(PlanMismatchError, match=r"plan=\.\.\., compile=True"):
        optimize(model, 2**40, inputs, plan=plan, progress=False)


def test_a_fallback_plan_is_fitted_in_its_own_layouts_without_a_solve_for_less(monkeypatch) -> None:
    """A fallback plan is at its solver's floor: on a model with convolutions no plan is
    solved for the channels-last copies' room below it (that search would end refused), and
    the plan is fitted in its own layouts."""
    from planner.capture import capture
    from planner.profile import profile
    from solvers.portfolio import solve

    model, inputs = zoo.make("resnet", "tiny")
    step = capture(model, inputs)
    planner.compiled.decompose_for_inductor(step)
    graph = planner.compiled.with_compiled_costs(profile(step, model, inputs, repeats=1, progress=False), step)
    plan = solve(graph, 2**40, "none")
    plan = replace(plan, options={**plan.options, FALLBACK_OPTION: "greedy"})
    layouts = []

    def as_predicted(model, step, graph, plan, program, inputs, kwargs, *, released=False):
        layouts.append(program.inductor_options.get("layout_optimization", False))
        return plan.predicted_peak_bytes

    def no_solve(graph, budget_bytes, start=None):
        raise AssertionError(f"solved for {budget_bytes} bytes below a fallback plan")

    monkeypatch.setattr(planner.compiled, "measure_compiled_peak", as_predicted)
    monkeypatch.setattr(planner.compiled, "_may_gain", lambda fitting, graph: False)     # no raise
    stub = SimpleNamespace(solve=no_solve, alternatives=lambda graph, budget_bytes, first: iter(()))
    fitted, program = planner.compiled.fit_compiled(stub, model, step, graph, plan, inputs, None)
    assert layouts == [False] and program.fit_tries == 1 and fitted.options[COMPILED_OPTION] is True


def _sin_then_cos(donatable: tuple[str, ...]) -> CompiledProgram:
    """A boxed program of one run: ``cos(sin(saved))``, one pointwise kernel that is the
    last reader of its input ``saved``."""
    aten = torch.ops.aten
    graph = fx.Graph()
    saved = graph.placeholder("saved")
    value = graph.call_function(aten.sin.default, (saved,))
    graph.output((graph.call_function(aten.cos.default, (value,)),))
    return CompiledProgram(fx.GraphModule(torch.nn.Module(), graph), boxed=True, donatable=donatable)


def test_a_dead_saved_value_is_donated_and_written_in_place() -> None:
    """A placeholder the program may donate (a backward's saved value) whose last reader is
    a run's kernel holds that kernel's output: the step allocates one block (the input),
    not two. Not donatable (a tangent, a parameter), it is read and a new block written."""
    forget_compiled_runs()
    for donatable, blocks in ((("saved",), 1), ((), 2)):
        program = _sin_then_cos(donatable)
        program([torch.randn(256, 256)])                           # compiles
        (run,) = [i.body for i in program._instructions]
        assert run.donated == ((0,) if donatable else ())
        _, peak_bytes = measure_allocator_peak(lambda: program([torch.randn(256, 256)]))
        assert peak_bytes == blocks * 256 * 256 * 4
        torch.manual_seed(0)
        expected = torch.randn(256, 256).sin().cos()
        torch.manual_seed(0)
        (result,) = program([torch.randn(256, 256)])
        torch.testing.assert_close(result, expected)


def test_a_donated_input_that_something_else_holds_is_copied_not_overwritten() -> None:
    """A run compiled with a donated input, called when another tensor shares that input's
    storage (a caller kept an alias), gets a copy: the caller's values are unchanged and
    the result is what eager computes."""
    forget_compiled_runs()
    program = _sin_then_cos(("saved",))
    program([torch.randn(64, 64)])                                 # compiles, donating
    (run,) = [i.body for i in program._instructions]
    assert run.donated == (0,)
    saved = torch.randn(64, 64)
    kept = saved.view(64, 64)                                      # shares the storage
    before = kept.clone()
    (result,) = program([saved])
    torch.testing.assert_close(kept, before, rtol=0, atol=0)
    torch.testing.assert_close(result, before.sin().cos())


def _cos_then_sin() -> fx.GraphModule:
    """One run of two independent pointwise kernels: ``cos(y)`` (the last reader of ``y``),
    then ``sin(x)``; both results are the program's."""
    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    cosine = graph.call_function(aten.cos.default, (y,))
    graph.output((cosine, graph.call_function(aten.sin.default, (x,))))
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("per_node", [True, False])
def test_each_kernel_is_called_on_its_own_so_a_dead_input_goes_before_the_next_output(monkeypatch,
                                                                                       per_node: bool) -> None:
    """``y`` dies at the first kernel: called on its own, it is freed before the second
    kernel's output is allocated (three blocks at most: x, y or sin, cos). Emitted as one
    kernel group, as inductor's C++ backend does by default, both outputs are allocated
    before the group runs and ``y`` is freed after it: four."""
    from torch._inductor.utils import fresh_cache

    if not per_node:
        monkeypatch.setattr(runtime.compiled, "_kernel_per_node", contextlib.nullcontext)
    forget_compiled_runs()
    with fresh_cache():
        program = CompiledProgram(_cos_then_sin(), boxed=True)
        program([torch.randn(256, 256), torch.randn(256, 256)])       # compiles
    results, peak_bytes = measure_allocator_peak(lambda: program([torch.randn(256, 256), torch.randn(256, 256)]))
    assert peak_bytes == (3 if per_node else 4) * 256 * 256 * 4


def test_kernels_inductor_generates_may_write_into_an_input_of_their_shape() -> None:
    """The compiled graph marks the GELU and layer-norm backwards (into the gradient they
    read), the log-softmax (into the logits) and its backward (into the saved log-softmax)
    as writing in place; no matmul, random op or placeholder; a transposed input never.
    `eager_sized` clears every mark: the eager program allocates each output."""
    step, graph, compiled = _compiled_gpt_graph()
    by_target: dict[str, list] = {}
    for op in compiled.ops:
        by_target.setdefault(op.target, []).append(op)

    def reads(op, name: str) -> str:
        value = compiled.value(name)
        return compiled.value(value.root).producer or ""

    for target, reader in (("aten.gelu_backward.default", "mm"), ("aten.native_layer_norm_backward.default", "mm"),
                           ("aten._log_softmax.default", "mm"),
                           ("aten._log_softmax_backward_data.default", "_log_softmax")):
        for op in by_target[target]:
            assert op.reuses, f"{op.name} ({target}) writes nothing in place"
            assert any(reads(op, name).startswith(reader) for name in op.reuses), (op.name, op.reuses)
    for op in compiled.ops:
        if op.target.startswith(("aten.mm", "aten.addmm", "aten.bmm")) or op.random:
            assert not op.reuses, op.name
        for name in op.reuses:
            value = compiled.value(name)
            assert not compiled.value(value.root).kind.is_placeholder
            assert planner.compiled._in_storage_order(compiled, value)
    assert not any(op.reuses for op in planner.compiled.eager_sized(compiled).ops)
    assert planner.compiled.eager_sized(compiled).hash == gradients_first(graph).hash
