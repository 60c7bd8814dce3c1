"""The ``chain`` solver (Rotor DP): the MILP's optimum on a uniform chain with one stage per
op and never better than it on random chains, every plan replays within its budget,
keep-all when it fits, never slower than ``every_block``, multiple recomputation at small
budgets, and gradients equal to the plain model's end to end."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import InfeasibleBudgetError, Graph, Op, Phase, Value, ValueKind, simulate, solve
from tests.strategies import budget_between, chain_graphs, keep_all_peak_bytes
from helpers import assert_same_training_step, trace_zoo


def uniform_chain(length: int, activation_bytes: int = 1000, weight_bytes: int = 10) -> Graph:
    """``a_i = f_i(a_{i-1}, w_i)`` with equal sizes and times, backward in reverse."""
    values = [Value("a0", activation_bytes, ValueKind.INPUT)]
    ops = []
    for i in range(1, length + 1):
        values += [Value(f"w{i}", weight_bytes, ValueKind.PARAMETER),
                   Value(f"a{i}", activation_bytes, ValueKind.ACTIVATION, producer=f"f{i}")]
        ops.append(Op(f"f{i}", (f"a{i - 1}", f"w{i}"), (f"a{i}",), Phase.FORWARD, 1.0))
    values.append(Value(f"grad_a{length}", activation_bytes, ValueKind.TANGENT))
    for i in range(length, 0, -1):
        outputs = (f"grad_w{i}",) + ((f"grad_a{i - 1}",) if i > 1 else ())
        values.append(Value(f"grad_w{i}", weight_bytes, ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        if i > 1:
            values.append(Value(f"grad_a{i - 1}", activation_bytes, ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        ops.append(Op(f"b{i}", (f"grad_a{i}", f"a{i - 1}", f"w{i}"), outputs, Phase.BACKWARD, 2.0))
    placeholders = ("a0",) + tuple(f"w{i}" for i in range(1, length + 1)) + (f"grad_a{length}",)
    return Graph(ops=tuple(ops), values=tuple(values), placeholders=placeholders,
                 forward_outputs=(f"a{length}",), gradients=tuple(f"grad_w{i}" for i in range(1, length + 1)),
                 name=f"uniform{length}")


def time_or_none(graph: Graph, budget_bytes: int, solver: str, **options) -> float | None:
    try:
        plan = solve(graph, budget_bytes, solver, **options)
    except InfeasibleBudgetError:
        return None
    assert simulate(graph, plan).peak_bytes <= budget_bytes
    return plan.predicted_time_ms


def check_chain_plan(graph: Graph, budget_bytes: int):
    """Solve with chain; when it fits, assert the replay fits and every_block is not faster."""
    try:
        plan = solve(graph, budget_bytes, "chain")
    except InfeasibleBudgetError:
        return None
    assert simulate(graph, plan).peak_bytes <= budget_bytes
    every_block = time_or_none(graph, budget_bytes, "every_block")
    if every_block is not None:
        assert plan.predicted_time_ms <= every_block + 1e-9
    return plan


def test_keep_all_when_it_fits() -> None:
    graph = uniform_chain(10)
    peak = keep_all_peak_bytes(graph)
    for budget in (peak, 2 * peak):
        plan = solve(graph, budget, "chain")
        assert plan.overhead == 0.0
        assert plan.predicted_peak_bytes <= budget


def test_uniform_chain_every_budget_fits_and_recomputes_several_times() -> None:
    graph = uniform_chain(12)
    peak = keep_all_peak_bytes(graph)
    fitted, multiple = 0, []
    for budget in range(peak, peak // 6, -peak // 40):
        plan = check_chain_plan(graph, budget)
        if plan is None:
            continue
        fitted += 1
        if plan.options.get("source") == "dp" and max(plan.options["forward_reruns"]) >= 2:
            multiple.append(budget)
    assert fitted >= 10
    # Revolve-like multiple recomputation: some stage's forward re-run twice, and it fits
    assert multiple, "no budget made chain re-run a stage's forward more than once"
    # below every_block's peak there is still a chain schedule (sqrt-like memory)
    every_block_peak = simulate(graph, solve(graph, 10 * peak, "every_block")).peak_bytes
    assert check_chain_plan(graph, every_block_peak - 1000) is not None


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8).flatmap(chain_graphs), st.floats(0.3, 1.0))
def test_random_chains_fit_and_beat_every_block(graph: Graph, fraction: float) -> None:
    peak = keep_all_peak_bytes(graph)
    check_chain_plan(graph, int(peak * fraction))


def test_chain_equals_ilp_on_a_uniform_chain() -> None:
    """One stage per op: on a uniform chain the Rotor DP's optimum is the MILP's proved one
    at every budget (same time, same feasibility), from keep-all down to a third of it."""
    graph = uniform_chain(8)
    peak = keep_all_peak_bytes(graph)
    for budget in range(peak, peak // 3, -peak // 30):
        chain = time_or_none(graph, budget, "chain", every_op=True, resolution=4000)
        ilp = time_or_none(graph, budget, "ilp")
        assert chain == (None if ilp is None else pytest.approx(ilp, abs=1e-9)), budget


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8).flatmap(chain_graphs), st.floats(0.0, 1.0))
def test_chain_never_beats_ilp_on_chains(graph: Graph, fraction: float) -> None:
    """On random chains, one stage per op, the DP's plans lie in the MILP's space: never
    faster than its proved optimum, never feasible where it proved none is. Equal almost
    always (400 random chains in a row in one probe); the exception is below."""
    budget = budget_between(graph, fraction)
    chain = time_or_none(graph, budget, "chain", every_op=True, resolution=2000)
    ilp = time_or_none(graph, budget, "ilp")
    if ilp is None:
        assert chain is None, f"chain found a plan ({chain} ms) where the MILP proved none fits {budget} B"
    elif chain is not None:
        assert chain >= ilp - 1e-9


def checkpoint_freed_early_chain() -> Graph:
    """Six layers where the MILP's optimum at 344 B frees a checkpoint early (below)."""
    sizes = {"a0": 16, "a1": 16, "a2": 16, "a3": 16, "a4": 32, "a5": 64, "a6": 32}
    values = [Value("a0", 16, ValueKind.INPUT)]
    ops = []
    for i in range(1, 7):
        values += [Value(f"w{i}", 16, ValueKind.PARAMETER),
                   Value(f"a{i}", sizes[f"a{i}"], ValueKind.ACTIVATION, producer=f"f{i}")]
        ops.append(Op(f"f{i}", (f"a{i - 1}", f"w{i}"), (f"a{i}",), Phase.FORWARD, 0.25))
    values.append(Value("grad_a6", 32, ValueKind.TANGENT))
    for i in range(6, 0, -1):
        values.append(Value(f"grad_w{i}", 16, ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        if i > 1:
            values.append(Value(f"grad_a{i - 1}", sizes[f"a{i - 1}"], ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        ops.append(Op(f"b{i}", (f"grad_a{i}", f"a{i - 1}", f"w{i}"),
                      (f"grad_w{i}",) + ((f"grad_a{i - 1}",) if i > 1 else ()), Phase.BACKWARD, 0.25))
    return Graph(ops=tuple(ops), values=tuple(values),
                 placeholders=("a0",) + tuple(f"w{i}" for i in range(1, 7)) + ("grad_a6",), forward_outputs=("a6",),
                 gradients=tuple(f"grad_w{i}" for i in range(1, 7)), name="chain6")


def test_a_non_persistent_schedule_beats_the_chain_dp() -> None:
    """Where `chain` and the MILP differ (found by hypothesis): Rotor's DP only builds
    *persistent* schedules, where a checkpoint stays stored until the backward of the
    stages after it is done. The MILP frees checkpoint a3 once a4 is made from it and
    makes a3 again from the input, on the way to a1 and a2, which the backward needs anyway:
    0.75 ms less recomputation. A DP over non-persistent schedules would close the gap."""
    graph = checkpoint_freed_early_chain()
    budget = 344
    ilp = solve(graph, budget, "ilp")
    assert ilp.optimal and ilp.predicted_time_ms == 4.0
    runs = [step.name for step in ilp.backward if step.kind.value == "run"]
    assert runs.index("f4") < runs.index("b5") < runs.index("f1")      # a3 -> a4, b5, then a3 again from a0
    assert time_or_none(graph, budget, "chain", every_op=True, resolution=2000) == 4.75


@pytest.fixture(scope="module", params=("gpt", "resnet"))
def tiny(request):
    return (request.param, *trace_zoo(request.param))


def test_zoo_tiny_plans_fit(tiny) -> None:
    from planner.budget import resolve_budget
    name, _, _, _, graph = tiny
    solved = 0
    for fraction in (1.0, 0.8, 0.7, 0.6):
        budget = resolve_budget(fraction, graph).budget_bytes
        plan = check_chain_plan(graph, budget)
        if plan is not None:
            solved += 1
            if fraction == 1.0:
                assert plan.overhead == 0.0
    assert solved >= 3, f"{name}: chain fitted only {solved} budgets"


def test_gpt_tiny_end_to_end_gradients(tiny) -> None:
    from planner.budget import resolve_budget
    from runtime.module import ScheduledModule
    name, model, inputs, step, graph = tiny
    plan = None
    for fraction in (0.6, 0.7, 0.8, 0.9):          # the lowest budget chain's re-runs-only plans reach
        try:
            plan = solve(graph, resolve_budget(fraction, graph).budget_bytes, "chain", options_per_segment=1)
            break
        except InfeasibleBudgetError:
            continue
    assert plan is not None, f"{name}: chain with re-runs only fits no budget below 0.9 of the activations"
    assert plan.options.get("source") == "dp" and sum(plan.options["forward_reruns"]) >= 1
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, plan)
    assert_same_training_step(scheduled, model_copy, reference, inputs, label=f"{name}")


# -- stage options: a stage run "all" that drops some of its storages ----------------------------

def test_backward_program_recomputes_just_in_time_with_and_without_carry() -> None:
    """One stage f1 f2 f3 whose a1, a2 are dropped: B reads a2 first (b3), then a1 (b2).
    Carried, f1 and f2 run once before b3; without carry a1, made only on the way to a2,
    is dropped after b3 and made again before b2. B's peak counts the gradients its ops
    make, to their last read there or to its end where a later stage reads them."""
    from solvers.chain import _backward_peak, backward_program
    from solvers.kernel.segments import Segment
    graph = uniform_chain(3)
    stage = Segment(index=0, forward_ops=("f1", "f2", "f3"), backward_ops=("b3", "b2", "b1"), crossing_in=(),
                    output_roots=("a3",), activation_bytes=3000)
    missing = {"a1", "a2"}
    carried = backward_program(graph, stage, missing)
    assert carried == ["f1", "f2", "b3", "b2", "b1"]
    assert backward_program(graph, stage, missing, carry=False) == ["f1", "f2", "b3", "f1", "b2", "b1"]
    assert backward_program(graph, stage, set()) == ["b3", "b2", "b1"]
    gradient_roots = frozenset(graph.gradients)      # counted as g, not here
    # a1, a2 and the gradient b3 makes for a2 while b3 runs
    assert _backward_peak(graph, carried, missing, set(), gradient_roots) == 3000
    assert _backward_peak(graph, ["b3", "b2", "b1"], set(), {"a1", "a2"}, gradient_roots) == 3000
    assert _backward_peak(graph, ["b1"], set(), {"a1", "a2"}, gradient_roots) == 0   # neither is read
    assert _backward_peak(graph, ["b3"], set(), {"a2"}, gradient_roots | {"grad_a2"}) == 1000


def test_stage_options_fit_reach_lower_and_keep_gradients(tiny) -> None:
    """With drop options per stage, chain's plans replay within the budget, reach a lower
    budget than the stages run "all" with everything kept, and a plan that uses an option
    (recomputation inside B(k), after forward re-runs) trains with the plain model's
    gradients."""
    from planner.budget import resolve_budget
    from runtime.module import ScheduledModule
    from solvers.portfolio import solve_chain
    name, model, inputs, step, graph = tiny

    def lowest(options_per_segment: int) -> int:
        """The least budget (to 1/64 of the keep-all peak) at which chain finds a plan."""
        low, high = resolve_budget(0.01, graph).budget_bytes // 2, resolve_budget(1.0, graph).budget_bytes
        while high - low > high // 64:
            middle = (low + high) // 2
            try:
                solve_chain(graph, middle, options_per_segment=options_per_segment)
                high = middle
            except InfeasibleBudgetError:
                low = middle
        return high

    assert lowest(8) < lowest(1), name
    used = None
    for fraction in (0.8, 0.6, 0.4, 0.2):
        budget = resolve_budget(fraction, graph).budget_bytes
        try:
            plan = solve_chain(graph, budget, options_per_segment=8)
        except InfeasibleBudgetError:
            continue
        assert simulate(graph, plan).peak_bytes <= budget
        if plan.options.get("stage_options_used") and used is None:
            used = plan
    assert used is not None, f"{name}: no plan used a stage option"
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, used)
    assert_same_training_step(scheduled, model_copy, reference, inputs, label=f"{name} with stage options")


def test_the_dp_never_counts_less_than_a_released_loss_holds() -> None:
    """A language model whose loss is its peak and whose logits the caller drops
    (`release_outputs`): the logits are alive in the forward only, never a constant, and
    the loss's backward holds its log-softmax and two logits-sized gradients, the last of
    which the head's backward reads (``dx``). No plan the DP's table gives for a memory m
    replays above the constant plus m; before, the logits counted as a constant and the
    loss's gradients not at all, and plans replayed up to a logits tensor above (GPT-2 at
    4 x 512 tokens: its chain DP stopped 72 MiB above the floor)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from planner.estimate import estimated_graph
    from solvers import chain, least_feasible_lower_bound
    from solvers.kernel.options import segment_options
    from solvers.kernel.segments import segmentations

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=16384, n_positions=256,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 16384, (4, 256))
    _, graph = estimated_graph(model, (), target="h100-sxm", example_kwargs={"input_ids": ids, "labels": ids},
                               release_outputs=True, progress=False)
    logits_bytes = 4 * 256 * 16384 * 4
    segments = segmentations(graph)[0]
    drop_sets = [[levels.dropped(level) for level in range(1, len(levels.prefix_lengths))]
                 for levels in segment_options(graph, segments, 8)]
    stages, constant_bytes = chain.chain_stages(graph, segments, drop_sets)
    loss = stages[-1]
    assert loss.input_bytes == 0 and not loss.backward_reads_input
    assert loss.input_gradient_bytes == logits_bytes and loss.backward_bytes >= 3 * logits_bytes
    assert constant_bytes < logits_bytes
    budget_bytes = int(least_feasible_lower_bound(graph).total * 1.2)
    slot_bytes = -(-budget_bytes // 200)
    table = chain._ChainTable(stages, slot_bytes, 200)
    replayed = 0
    for memory in range(0, 201, 5):
        sequence = table.sequence(memory, False)
        if sequence is None:
            continue
        plan = chain.program_plan(graph, segments, sequence, budget_bytes, {}, stages)
        assert simulate(graph, plan, check_hash=False).peak_bytes <= constant_bytes + memory * slot_bytes, memory
        replayed += 1
    assert replayed >= 5
