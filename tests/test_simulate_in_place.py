"""simulate's in-place writes (``Op.reuses``): an op's output takes the storage of an input
that dies at it, as a compiled kernel writes into a dead buffer; never one that is read
later, pinned, aliased elsewhere, or of another size."""

from __future__ import annotations

from dataclasses import replace

import pytest

from solvers import Graph, Op, Phase, Plan, Value, ValueKind, simulate
from solvers.errors import UnsupportedGraphError
from solvers.plan import free, run


def chain_graph(*, reuses: tuple[str, ...] = ("a",), b_bytes: int = 1000) -> Graph:
    """x -> f -> a (1000 B) -> g -> b (in place of a where a dies) -> h -> out (4 B);
    the backward reads b (or nothing of the forward but x) to make grad_x."""
    values = (Value("x", 100, ValueKind.INPUT), Value("t", 4, ValueKind.TANGENT),
              Value("a", 1000, ValueKind.ACTIVATION, producer="f"),
              Value("b", b_bytes, ValueKind.ACTIVATION, producer="g"),
              Value("out", 4, ValueKind.ACTIVATION, producer="h"),
              Value("grad_x", 100, ValueKind.GRADIENT_WORK, producer="back"))
    ops = (Op("f", ("x",), ("a",), Phase.FORWARD, time_ms=1.0),
           Op("g", ("a",), ("b",), Phase.FORWARD, time_ms=1.0, reuses=reuses),
           Op("h", ("b",), ("out",), Phase.FORWARD, time_ms=1.0),
           Op("back", ("t", "x"), ("grad_x",), Phase.BACKWARD, time_ms=1.0))
    return Graph(ops, values, placeholders=("x", "t"), forward_outputs=("out",), gradients=("grad_x",))


def forward_high_water(graph: Graph, forward: tuple) -> list[int]:
    plan = Plan(graph.hash, "hand", 0, forward=forward, backward=(run("back"),))
    return [point.high_water_bytes for point in simulate(graph, plan).timeline if point.phase is Phase.FORWARD]


FREED_AT_G = (run("f"), run("g"), free("a"), run("h"), free("b"))


def test_an_input_that_dies_at_the_op_holds_its_output() -> None:
    # x 100; f: + a 1000 = 1100; g in place: still 1100 (without: 2100); h: + out 4
    assert forward_high_water(chain_graph(), FREED_AT_G)[:2] == [1100, 1100]
    assert forward_high_water(chain_graph(reuses=()), FREED_AT_G)[:2] == [1100, 2100]


def test_the_storage_lives_on_with_the_output() -> None:
    """After a's free the storage is b's: h runs with it and adds only its own output,
    and b's free gives it back."""
    high_water = forward_high_water(chain_graph(), FREED_AT_G)
    assert high_water[3] == 100 + 1000 + 4        # h: x, the storage (now b's), out
    plan = Plan(chain_graph().hash, "hand", 0, forward=FREED_AT_G, backward=(run("back"),))
    result = simulate(chain_graph(), plan)
    assert result.timeline[len(FREED_AT_G) - 1].bytes_in_use == 100 + 4   # x and the pinned out


@pytest.mark.parametrize("forward", [
    # the program holds a past g: freed only after h runs
    (run("f"), run("g"), run("h"), free("a"), free("b")),
    # ... and after b's free
    (run("f"), run("g"), run("h"), free("b"), free("a")),
])
def test_an_input_still_held_after_the_op_is_not_written(forward: tuple) -> None:
    assert forward_high_water(chain_graph(), forward)[1] == 2100


def test_an_input_of_another_size_is_not_written() -> None:
    assert forward_high_water(chain_graph(b_bytes=999), FREED_AT_G)[1] == 2099


def test_a_pinned_input_is_not_written() -> None:
    """The caller holds a forward output to the end: the program's free does not kill it."""
    graph = chain_graph()
    graph = replace(graph, forward_outputs=("a", "out"))
    assert forward_high_water(graph, FREED_AT_G)[1] == 2100


def test_an_input_with_a_live_view_is_not_written() -> None:
    values = chain_graph().values + (Value("a_view", 0, ValueKind.ACTIVATION, producer="v", alias_of="a"),)
    ops = list(chain_graph().ops)
    ops.insert(1, Op("v", ("a",), ("a_view",), Phase.FORWARD))
    graph = replace(chain_graph(), ops=tuple(ops), values=values)
    forward = (run("f"), run("v"), run("g"), free("a"), run("h"), free("b"), free("a_view"))
    assert forward_high_water(graph, forward)[2] == 2100
    # with the view freed before g, a is dead at g
    forward = (run("f"), run("v"), free("a_view"), run("g"), free("a"), run("h"), free("b"))
    assert forward_high_water(graph, forward)[3] == 1100


def test_reuses_round_trip_and_count_in_the_hash() -> None:
    plain, in_place = chain_graph(reuses=()), chain_graph()
    assert "reuses" not in plain.to_json()["ops"][1]
    assert Graph.from_json(in_place.to_json()) == in_place
    assert plain.hash != in_place.hash


def test_reusing_an_input_the_op_does_not_read_is_refused() -> None:
    with pytest.raises(UnsupportedGraphError, match="reuses 'x'"):
        chain_graph(reuses=("x",))
