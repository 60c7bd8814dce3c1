"""simulate counts storage instances: a re-run allocates new storages even while an
earlier instance (a kept output, a view of it) is alive, as the runtime does."""

from __future__ import annotations

from solvers import Graph, Op, Phase, Plan, Value, ValueKind, simulate
from solvers.plan import free, run


def two_output_graph() -> Graph:
    """x -> split -> (big 1000 B, small 10 B); view_small = view(small); backward reads big
    and view_small: the forward keeps view_small, drops big; the backward re-runs split."""
    values = (Value("x", 100, ValueKind.INPUT), Value("g", 4, ValueKind.TANGENT),
              Value("big", 1000, ValueKind.ACTIVATION, producer="split"),
              Value("small", 10, ValueKind.ACTIVATION, producer="split"),
              Value("view_small", 0, ValueKind.ACTIVATION, producer="view", alias_of="small"),
              Value("out", 4, ValueKind.ACTIVATION, producer="reduce"),
              Value("grad_x", 1, ValueKind.GRADIENT_WORK, producer="backward"))
    ops = (Op("split", ("x",), ("big", "small"), Phase.FORWARD, time_ms=1.0),
           Op("view", ("small",), ("view_small",), Phase.FORWARD),
           Op("reduce", ("big", "view_small"), ("out",), Phase.FORWARD, time_ms=1.0),
           Op("backward", ("g", "big", "view_small"), ("grad_x",), Phase.BACKWARD, time_ms=1.0))
    return Graph(ops, values, placeholders=("x", "g"), forward_outputs=("out",), gradients=("grad_x",))


def test_rerun_while_an_output_is_kept_counts_both_copies() -> None:
    graph = two_output_graph()
    plan = Plan(graph.hash, "hand", 0,
                forward=(run("split"), run("view"), free("small"), run("reduce"), free("big")),
                backward=(run("split"), free("small"), run("backward"), free("big"), free("view_small")))
    result = simulate(graph, plan)
    # resident x 100 + out 4; backward adds caller 0 + tangent 4 and the kept small (10, via
    # view_small): 118. Re-running split allocates big 1000 + a second small 10 while the
    # first small is alive: 1128. The backward op then holds 118 + big 1000 + grad_x 1 =
    # 1119. Counting by root name would miss the second small: peak 1119.
    assert result.peak_bytes == 1128
    assert result.recompute_ms == 1.0


def test_a_placeholder_view_listed_before_its_root_shares_its_storage() -> None:
    """A segment's sub-graph has placeholders that are views of others (a parameter's
    ``detach``); listed first, the view must still share the root's storage, not count it
    twice."""
    values = (Value("w_t", 0, ValueKind.PARAMETER, alias_of="w"), Value("w", 1000, ValueKind.PARAMETER),
              Value("x", 10, ValueKind.INPUT), Value("g", 4, ValueKind.TANGENT),
              Value("y", 10, ValueKind.ACTIVATION, producer="f"),
              Value("grad_w", 1000, ValueKind.GRADIENT_WORK, producer="b"))
    ops = (Op("f", ("x", "w_t"), ("y",), Phase.FORWARD, time_ms=1.0),
           Op("b", ("g", "x"), ("grad_w",), Phase.BACKWARD, time_ms=1.0))
    graph = Graph(ops, values, placeholders=("w_t", "w", "x", "g"), forward_outputs=("y",), gradients=("grad_w",))
    plan = Plan(graph.hash, "hand", 0, forward=(run("f"),), backward=(run("b"),))
    # w 1000 + x 10 + y 10, then the tangent 4 and grad_w 1000 in the backward
    assert simulate(graph, plan).peak_bytes == 1000 + 10 + 10 + 4 + 1000
