"""`solvers.kernel.segments.segment_chain` and the `every_block` / `sqrt_n` checkpointing
baselines: segments partition the step, their crossing sets are right, they line up with
the zoo's blocks, and the plans replay, save memory and keep every gradient exact.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given

from solvers import Graph, InfeasibleBudgetError, Op, Phase, Value, ValueKind, simulate, solve
from solvers.checkpoint_baselines import sqrt_n_group_size
from solvers.kernel.segments import Segment, boundary_roots, crossing_bytes, segment_chain, segmentations
from tests.strategies import KEEP_ALL_BUDGET_BYTES, small_graphs
from helpers import assert_same_training_step

FWD, BWD = Phase.FORWARD, Phase.BACKWARD
CHECKPOINT_SOLVERS = ("every_block", "sqrt_n")


# -- independent references ------------------------------------------------------------------

def activation_producer(graph: Graph) -> dict[str, str]:
    """Activation storage -> the forward op that allocates it."""
    return {value.name: value.producer for value in graph.values
            if value.kind is ValueKind.ACTIVATION and value.alias_of is None
            and graph.op(value.producer).phase is FWD}


def reference_crossing_in(graph: Graph, segments: tuple[Segment, ...]) -> list[set[str]]:
    """For each segment, brute force: storages allocated by an earlier segment's forward op
    and read (through any alias) by one of this segment's forward ops."""
    segment_of = {name: seg.index for seg in segments for name in seg.forward_ops}
    producer = activation_producer(graph)
    result = []
    for segment in segments:
        found = set()
        for op_name in segment.forward_ops:
            for name in graph.op(op_name).inputs:
                root = graph.value(name).root
                if root in producer and segment_of[producer[root]] < segment.index:
                    found.add(root)
        result.append(found)
    return result


def check_partition(graph: Graph, segments: tuple[Segment, ...]) -> None:
    assert [seg.index for seg in segments] == list(range(len(segments)))
    assert all(seg.forward_ops for seg in segments), "empty segment"
    assert [name for seg in segments for name in seg.forward_ops] == [op.name for op in graph.forward_ops]
    backward = [name for seg in segments for name in seg.backward_ops]
    assert sorted(backward) == sorted(op.name for op in graph.backward_ops)
    position = {op.name: i for i, op in enumerate(graph.ops)}
    for seg in segments:
        assert list(seg.backward_ops) == sorted(seg.backward_ops, key=position.get)
    for seg, expected in zip(segments, reference_crossing_in(graph, segments)):
        assert set(seg.crossing_in) == expected, f"segment {seg.index}"
        assert len(seg.crossing_in) == len(expected)
    producer = activation_producer(graph)
    segment_of = {name: seg.index for seg in segments for name in seg.forward_ops}
    for seg in segments:
        assert seg.activation_bytes == sum(graph.value(root).size_bytes for root, op in producer.items()
                                           if segment_of[op] == seg.index)
        for root in seg.output_roots:
            assert segment_of[producer[root]] == seg.index
    read_later = {root for seg in segments for root in seg.crossing_in}
    assert read_later <= {root for seg in segments for root in seg.output_roots}


# -- hand-built graphs -----------------------------------------------------------------------

def skip_chain(modules: tuple[str, ...] = ()) -> Graph:
    """x -> e0 -> e1 -> e2 -> d(e2, e0) -> out: a chain of 4 ops with a long skip e0 -> d.
    Sizes: e0 40, e1 20, e2 20, d 40, out 4; one backward op per forward op."""
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    mod = dict(zip(("f0", "f1", "f2", "f3", "loss"), modules)) if modules else {}
    sizes = {"e0": 40, "e1": 20, "e2": 20, "d": 40, "out": 4}
    forward = (("f0", ("x", "w"), "e0"), ("f1", ("e0",), "e1"), ("f2", ("e1",), "e2"),
               ("f3", ("e2", "e0"), "d"), ("loss", ("d",), "out"))
    values = [Value("w", 100, ValueKind.PARAMETER), Value("x", 10, ValueKind.INPUT), Value("t", 4, ValueKind.TANGENT)]
    ops = []
    for name, inputs, output in forward:
        values.append(Value(output, sizes[output], act, name))
        ops.append(Op(name, inputs, (output,), FWD, 1.0, module=mod.get(name, "")))
    backward = (("loss_bw", ("t", "d"), "g_d"), ("f3_bw", ("g_d", "e2", "e0"), "g_e2"),
                ("f2_bw", ("g_e2", "e1"), "g_e1"), ("f1_bw", ("g_e1", "e0"), "g_e0"),
                ("f0_bw", ("g_e0", "x"), "g_w"))
    for name, inputs, output in backward:
        values.append(Value(output, 16, work, name))
        ops.append(Op(name, inputs, (output,), BWD, 1.0))
    return Graph(ops=tuple(ops), values=tuple(values), placeholders=("w", "x", "t"), forward_outputs=("out",),
                 gradients=("g_w",), name="skip_chain")


def test_crossing_bytes_counts_storages_alive_across_each_cut() -> None:
    graph = skip_chain()
    # cut before f1: e0; before f2: e0, e1; before f3: e0, e2; before loss: d
    assert crossing_bytes(graph) == [0, 40, 60, 60, 40]


def test_without_module_paths_cuts_are_local_minima_of_crossing_bytes() -> None:
    graph = skip_chain()
    segments = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1)
    check_partition(graph, segments)
    assert [seg.forward_ops for seg in segments] == [("f0",), ("f1", "f2", "f3"), ("loss",)]
    assert [seg.crossing_in for seg in segments] == [(), ("e0",), ("d",)]


def test_each_module_its_own_segment_when_nothing_is_tiny() -> None:
    graph = skip_chain(("a", "b", "c", "d", "e"))
    segments = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1)
    check_partition(graph, segments)
    assert [seg.forward_ops for seg in segments] == [("f0",), ("f1",), ("f2",), ("f3",), ("loss",)]
    assert [set(seg.crossing_in) for seg in segments] == [set(), {"e0"}, {"e1"}, {"e2", "e0"}, {"d"}]
    assert [seg.output_roots for seg in segments] == [("e0",), ("e1",), ("e2",), ("d",), ("out",)]
    # latest-segment rule: f3_bw reads e2 and e0, both read by f3 -> segment 3; f1_bw reads
    # e0 (segments 0, 1, 3) but its gradient comes from f2_bw (segment 2) -> segment 1
    backward = {name: seg.index for seg in segments for name in seg.backward_ops}
    assert backward == {"loss_bw": 4, "f3_bw": 3, "f2_bw": 2, "f1_bw": 1, "f0_bw": 0}
    # the long skip e0 is alive across every cut up to the segment that reads it
    assert boundary_roots(graph, segments, 2) == ("e0", "e1")
    assert set(boundary_roots(graph, segments, 3)) == {"e0", "e2"}
    assert boundary_roots(graph, segments, 4) == ("d",)


def test_module_paths_keep_repeated_units_whole() -> None:
    graph = skip_chain(("stem", "blocks.0.a", "blocks.0.b", "blocks.1", "head"))
    segments = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1)
    check_partition(graph, segments)
    assert [seg.forward_ops for seg in segments] == [("f0",), ("f1", "f2"), ("f3",), ("loss",)]


def nested_blocks(count: int = 3) -> Graph:
    """A stem, then ``count`` residual blocks inside one repeated unit, as Hugging Face's
    ResNet names them (``stages.0.layers.<i>.layer.<j>``), then a head: block i computes
    c = conv0(h), d = conv1(c), h' = add(d, h) and a 1-byte statistic s (a batch norm's
    running mean) that the head reads. A cut inside a block is crossed by h and c; a cut
    between blocks by h' and the statistics before it."""
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    values = [Value("w", 100, ValueKind.PARAMETER), Value("x", 10, ValueKind.INPUT), Value("t", 4, ValueKind.TANGENT),
              Value("h0", 64, act, "stem")]
    forward = [Op("stem", ("x", "w"), ("h0",), FWD, 1.0, module="stem")]
    for i in range(count):
        unit = f"stages.0.layers.{i}"
        h, c, d, s, out = f"h{i}", f"c{i}", f"d{i}", f"s{i}", f"h{i + 1}"
        values += [Value(c, 64, act, f"conv0_{i}"), Value(s, 1, act, f"conv0_{i}"), Value(d, 64, act, f"conv1_{i}"),
                   Value(out, 64, act, f"add_{i}")]
        forward += [Op(f"conv0_{i}", (h, "w"), (c, s), FWD, 1.0, module=f"{unit}.layer.0"),
                    Op(f"conv1_{i}", (c, "w"), (d,), FWD, 1.0, module=f"{unit}.layer.1"),
                    Op(f"add_{i}", (d, h), (out,), FWD, 1.0, module=unit)]
    last = f"h{count}"
    values += [Value("out", 4, act, "head"), Value("g", 16, work, "head_bw")]
    forward.append(Op("head", (last, *(f"s{i}" for i in range(count))), ("out",), FWD, 1.0, module="head"))
    backward = [Op("head_bw", ("t", last), ("g",), BWD, 1.0)]
    return Graph(ops=tuple(forward + backward), values=tuple(values), placeholders=("w", "x", "t"),
                 forward_outputs=("out",), gradients=("g",), name="nested_blocks")


def test_nested_cuts_split_a_repeated_unit_between_its_blocks_only() -> None:
    graph = nested_blocks(3)
    outer = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1)
    assert [seg.forward_ops for seg in outer] == [
        ("stem",), tuple(op.name for op in graph.forward_ops[1:-1]), ("head",)]
    nested = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1, nested_cuts=True)
    check_partition(graph, nested)
    assert [seg.forward_ops for seg in nested] == [("stem",)] + [
        (f"conv0_{i}", f"conv1_{i}", f"add_{i}") for i in range(3)] + [("head",)]
    fine, coarse = segmentations(graph)      # default knobs merge the small stem and head
    assert len(fine) > len(coarse)
    segment_of = {name: seg.index for seg in fine for name in seg.forward_ops}
    assert all(segment_of[f"conv0_{i}"] == segment_of[f"conv1_{i}"] == segment_of[f"add_{i}"] for i in range(3))
    plain = skip_chain(("a", "b", "c", "d", "e"))
    assert len(segmentations(plain)) == 1


def test_knobs_merge_small_segments_and_cap_the_count() -> None:
    graph = skip_chain(("a", "b", "c", "d", "e"))
    merged = segment_chain(graph, min_segment_bytes=50, min_segment_ops=1)
    check_partition(graph, merged)
    assert all(seg.activation_bytes >= 50 for seg in merged)
    for cap in (1, 2, 3):
        capped = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1, max_segments=cap)
        check_partition(graph, capped)
        assert len(capped) == cap
    assert len(segment_chain(graph, min_segment_ops=100)) == 1


def test_segment_json_round_trips_and_is_deterministic() -> None:
    graph = skip_chain(("a", "b", "c", "d", "e"))
    segments = segment_chain(graph, min_segment_bytes=0, min_segment_ops=1)
    assert tuple(Segment.from_json(seg.to_json()) for seg in segments) == segments
    assert segment_chain(graph, min_segment_bytes=0, min_segment_ops=1) == segments


@given(graph=small_graphs(max_forward_ops=10))
def test_random_graphs_partition_and_checkpoint_plans_replay(graph: Graph) -> None:
    for knobs in ({}, {"min_segment_bytes": 0, "min_segment_ops": 1}, {"max_segments": 2}):
        check_partition(graph, segment_chain(graph, **knobs))
    for solver in CHECKPOINT_SOLVERS:
        plan = solve(graph, KEEP_ALL_BUDGET_BYTES, solver)
        peak = simulate(graph, plan).peak_bytes
        assert plan.predicted_peak_bytes == peak
        with pytest.raises(InfeasibleBudgetError) as error:
            solve(graph, peak - 1, solver)
        assert error.value.least_feasible_bytes <= peak


def test_sqrt_n_group_size() -> None:
    assert [sqrt_n_group_size(n) for n in (1, 2, 4, 7, 9, 16, 100)] == [1, 1, 2, 3, 3, 4, 10]


# -- the zoo ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_graphs():
    """Capture and profile each model once (about a second each on a CPU)."""
    from planner import zoo
    from planner.capture import capture
    from planner.profile import profile

    graphs = {}
    for name, size in (("gpt", "small"), ("gpt", "tiny"), ("resnet", "tiny"), ("unet", "tiny"), ("mlp", "tiny")):
        model, inputs = zoo.make(name, size=size, seed=0)
        step = capture(model, inputs)
        graphs[name, size] = (model, inputs, step, profile(step, model, inputs, repeats=1))
    return graphs


def unit_of(module: str, container: str, depth: int) -> str | None:
    """``blocks.2.attn.qkv`` -> ``blocks.2`` for container ``blocks`` and depth 2."""
    parts = module.split(".")
    return ".".join(parts[:depth]) if parts[0] == container and len(parts) >= depth else None


def assert_units_whole(graph: Graph, segments: tuple[Segment, ...], container: str, depth: int) -> set[str]:
    """Every unit's recomputable forward ops (not the buffer updates the trace defers to
    the end of the forward) lie in one segment, and no segment holds two units."""
    units: dict[str, set[int]] = {}
    for seg in segments:
        for name in seg.forward_ops:
            op = graph.op(name)
            unit = unit_of(op.module, container, depth)
            if unit is not None and op.recomputable:
                units.setdefault(unit, set()).add(seg.index)
    for unit, where in units.items():
        assert len(where) == 1, f"{unit} is split over segments {sorted(where)}"
    holders = [next(iter(where)) for where in units.values()]
    assert len(holders) == len(set(holders)), f"a segment holds several of {sorted(units)}"
    return set(units)


@pytest.mark.parametrize("name, size, container, depth, count_units", [
    ("gpt", "small", "blocks", 2, lambda model: len(model.blocks)),
    ("gpt", "tiny", "blocks", 2, lambda model: len(model.blocks)),
    ("resnet", "tiny", "stages", 3, lambda model: sum(len(stage) for stage in model.stages)),
    ("unet", "tiny", "encoders", 2, lambda model: len(model.encoders)),
    ("unet", "tiny", "decoders", 2, lambda model: len(model.decoders)),
    ("mlp", "tiny", "blocks", 2, lambda model: len(model.blocks)),
])
def test_zoo_segments_line_up_with_blocks(zoo_graphs, name, size, container, depth, count_units) -> None:
    model, _, _, graph = zoo_graphs[name, size]
    units = count_units(model)
    segments = segment_chain(graph)
    check_partition(graph, segments)
    assert len(segments) >= units >= 2
    assert len(assert_units_whole(graph, segments, container, depth)) == units


def test_unet_long_skips_are_recorded(zoo_graphs) -> None:
    graph = zoo_graphs["unet", "tiny"][3]
    segments = segment_chain(graph)
    segment_of = {name: seg.index for seg in segments for name in seg.forward_ops}
    producer = activation_producer(graph)
    skips = [(seg.index, root) for seg in segments for root in seg.crossing_in
             if seg.index - segment_of[producer[root]] >= 2 and graph.value(root).size_bytes >= 4096]
    assert len(skips) >= 2, "both encoder levels' feature maps skip to the decoder"
    for reader, root in skips:
        for index in range(segment_of[producer[root]] + 1, reader + 1):
            assert root in boundary_roots(graph, segments, index)


@pytest.mark.parametrize("key", [("gpt", "small"), ("gpt", "tiny"), ("resnet", "tiny"), ("unet", "tiny")])
def test_checkpoint_plans_replay_below_keep_all(zoo_graphs, key) -> None:
    graph = zoo_graphs[key][3]
    keep_all = simulate(graph, solve(graph, KEEP_ALL_BUDGET_BYTES, "none"))
    for solver in CHECKPOINT_SOLVERS:
        plan = solve(graph, keep_all.peak_bytes, solver)
        result = simulate(graph, plan)
        assert result.peak_bytes < keep_all.peak_bytes, f"{key} {solver}"
        assert result.saved_bytes < keep_all.saved_bytes
        assert result.recompute_ms > 0
        with pytest.raises(InfeasibleBudgetError) as error:
            solve(graph, result.peak_bytes - 1, solver)
        assert error.value.least_feasible_bytes == result.peak_bytes


def test_every_block_keeps_only_the_boundaries(zoo_graphs) -> None:
    graph = zoo_graphs["gpt", "small"][3]
    plan = solve(graph, KEEP_ALL_BUDGET_BYTES, "every_block")
    boundaries = {root for seg in segment_chain(graph) for root in seg.crossing_in}
    pinned = {graph.value(name).root for name in graph.pinned_values}
    kept = {root for root, decision in plan.decisions.items() if decision.value == "keep"}
    unrecomputable = {root for root in kept if not graph.op(graph.value(root).producer).recomputable}
    assert kept - boundaries - pinned - unrecomputable == set()


def test_every_block_plan_gives_the_plain_models_gradients(zoo_graphs) -> None:
    from runtime.module import ScheduledModule

    model, inputs, step, graph = zoo_graphs["gpt", "tiny"]
    plan = solve(graph, KEEP_ALL_BUDGET_BYTES, "every_block")
    assert plan.decisions and any(decision.value == "recompute" for decision in plan.decisions.values())
    model_copy, reference = copy.deepcopy(model), copy.deepcopy(model)
    scheduled = ScheduledModule(model_copy, step, graph, plan)
    assert_same_training_step(scheduled, model_copy, reference, inputs)
