"""`Graph` and `Plan`: JSON round-trips, validation messages, the structural hash, bad files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, strategies as st

from solvers import (Decision, Graph, InfeasibleBudgetError, Op, Phase, Plan, PlanFormatError, PlanMismatchError,
                     Step, StepKind, Transfer, UnsupportedGraphError, Value, ValueKind, simulate, solve)
from strategies import KEEP_ALL_BUDGET_BYTES, budget_between, small_graphs

FWD, BWD = Phase.FORWARD, Phase.BACKWARD
ACT, WORK = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK


def tiny_parts() -> dict[str, Any]:
    """x, w -> mm -> y (a view of it: yv) -> sum -> loss; backward: grad_w = mm_bw(t, x)."""
    values = [Value("x", 64, ValueKind.INPUT, shape=(4, 4), dtype="float32"),
              Value("w", 64, ValueKind.PARAMETER, shape=(4, 4), dtype="float32"),
              Value("t", 4, ValueKind.TANGENT, shape=(), dtype="float32"),
              Value("y", 64, ACT, producer="mm", shape=(4, 4), dtype="float32"),
              Value("yv", 0, ACT, producer="view", alias_of="y", shape=(16,), dtype="float32"),
              Value("loss", 4, ACT, producer="sum", shape=(), dtype="float32"),
              Value("grad_w", 64, WORK, producer="mm_bw", shape=(4, 4), dtype="float32")]
    ops = [Op("mm", ("x", "w"), ("y",), FWD, 1.5, tmp_bytes=32, target="aten.mm.default", module="fc"),
           Op("view", ("y",), ("yv",), FWD, 0.0, target="aten.view.default"),
           Op("sum", ("yv",), ("loss",), FWD, 0.25, random=True),
           Op("mm_bw", ("t", "x"), ("grad_w",), BWD, 2.0)]
    return {"ops": ops, "values": values, "placeholders": ["x", "w", "t"], "forward_outputs": ["loss"],
            "gradients": ["grad_w"]}


def build(parts: dict[str, Any], **overrides: Any) -> Graph:
    fields = {key: tuple(value) for key, value in {**parts, **overrides}.items()
              if key in ("ops", "values", "placeholders", "forward_outputs", "gradients")}
    return Graph(**fields, transfer=overrides.get("transfer", Transfer()), name=overrides.get("name", "tiny"),
                 caller_bytes=overrides.get("caller_bytes", 0))


def tiny_graph() -> Graph:
    return build(tiny_parts())


def through_json(data: Any) -> Any:
    return json.loads(json.dumps(data))


# -- JSON round-trips -----------------------------------------------------------------------

@given(graph=small_graphs())
def test_graph_json_round_trip(graph: Graph) -> None:
    loaded = Graph.from_json(through_json(graph.to_json()))
    assert loaded == graph
    assert loaded.hash == graph.hash
    assert loaded.to_json() == graph.to_json()


@given(graph=small_graphs(), frac=st.floats(0.0, 1.2), solver=st.sampled_from(["none", "greedy"]))
def test_plan_json_round_trip_with_embedded_graph(graph: Graph, frac: float, solver: str) -> None:
    try:
        plan = solve(graph, budget_between(graph, frac), solver)
    except InfeasibleBudgetError:   # covered elsewhere; the keep-all plan always exists
        plan = solve(graph, KEEP_ALL_BUDGET_BYTES, solver)
    assert plan.graph is graph
    loaded = Plan.from_json(through_json(plan.to_json()))
    assert loaded == plan
    assert loaded.graph == graph and loaded.graph.hash == plan.graph_hash
    assert loaded.to_json() == plan.to_json()
    assert simulate(loaded.graph, loaded).peak_bytes == plan.predicted_peak_bytes

    bare = Plan.from_json(through_json(replace(plan, graph=None).to_json()))
    assert bare.graph is None and bare == plan


def test_plan_round_trip_keeps_every_field(tmp_path: Path) -> None:
    graph = tiny_graph()
    plan = Plan(graph_hash=graph.hash, solver="hand", budget_bytes=1000,
                forward=(Step(StepKind.RUN, "mm"), Step(StepKind.OFFLOAD, "y"), Step(StepKind.RUN, "view"),
                         Step(StepKind.RUN, "sum"), Step(StepKind.FREE, "yv"), Step(StepKind.FREE, "y")),
                backward=(Step(StepKind.PREFETCH, "y"), Step(StepKind.RUN, "mm_bw"), Step(StepKind.FREE, "y")),
                decisions={"y": Decision.OFFLOAD}, stages={"mm": 0, "sum": 1}, predicted_peak_bytes=321,
                predicted_time_ms=3.75, baseline_time_ms=3.75, optimal=True, gap=0.015, solve_time_s=0.5,
                options={"time_limit_s": 10.0, "backend": "highs"}, graph=graph)
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = Plan.load(str(path))
    assert loaded == plan
    assert loaded.decisions == {"y": Decision.OFFLOAD} and isinstance(loaded.decisions["y"], Decision)
    assert loaded.graph == graph
    assert loaded.overhead == 0.0

    graph_path = tmp_path / "graph.json"
    graph.save(str(graph_path))
    assert Graph.load(str(graph_path)) == graph


# -- validation ---------------------------------------------------------------------------------

def replace_value(parts: dict[str, Any], name: str, **changes: Any) -> list[Value]:
    return [replace(v, **changes) if v.name == name else v for v in parts["values"]]


def replace_op(parts: dict[str, Any], name: str, **changes: Any) -> list[Op]:
    return [replace(op, **changes) if op.name == name else op for op in parts["ops"]]


INVALID_GRAPHS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "duplicate value": (lambda p: {"values": p["values"] + [Value("y", 8, ACT, producer="mm")]},
                        "value 'y' is defined twice"),
    "duplicate op": (lambda p: {"ops": p["ops"] + [p["ops"][-1]]}, "op 'mm_bw' is defined twice"),
    "placeholder without value": (lambda p: {"placeholders": p["placeholders"] + ["bias"]},
                                  "placeholder 'bias' has no Value"),
    "activation as placeholder": (lambda p: {"placeholders": p["placeholders"] + ["y"]},
                                  "placeholder 'y' has kind"),
    "read before definition": (lambda p: {"ops": replace_op(p, "view", inputs=("loss",))},
                               "op 'view' reads 'loss' before it is defined"),
    "forward reads tangent": (lambda p: {"ops": replace_op(p, "sum", inputs=("yv", "t"))},
                              "forward op 'sum' reads backward value 't'"),
    "output without value": (lambda p: {"ops": replace_op(p, "sum", outputs=("loss", "extra"))},
                             "output 'extra' of op 'sum' has no Value produced by it"),
    "wrong producer": (lambda p: {"values": replace_value(p, "loss", producer="mm")},
                       "output 'loss' of op 'sum' has no Value produced by it"),
    "placeholder also produced": (lambda p: {"values": replace_value(p, "x", producer="sum"),
                                             "ops": replace_op(p, "sum", outputs=("loss", "x"))},
                                  "value 'x' is produced twice"),
    "never produced": (lambda p: {"values": p["values"] + [Value("orphan", 8, ACT, producer="ghost")]},
                       "value 'orphan' is never produced"),
    "alias of an alias": (lambda p: {"values": p["values"] + [Value("yvv", 0, ACT, producer="view2", alias_of="yv")],
                                     "ops": p["ops"][:2] + [Op("view2", ("yv",), ("yvv",), FWD)] + p["ops"][2:]},
                          "'yvv' aliases 'yv', which is not a root value"),
    "alias owns bytes": (lambda p: {"values": replace_value(p, "yv", size_bytes=64)},
                         "alias 'yv' must have size_bytes 0"),
    "gradient as forward output": (lambda p: {"forward_outputs": ["loss", "grad_w"]},
                                   "forward output 'grad_w' is not a forward value"),
    "unknown gradient": (lambda p: {"gradients": ["grad_w", "grad_x"]}, "gradient 'grad_x' is not a value"),
}


@pytest.mark.parametrize("case", sorted(INVALID_GRAPHS))
def test_validate_names_the_culprit(case: str) -> None:
    change, message = INVALID_GRAPHS[case]
    parts = tiny_parts()
    with pytest.raises(UnsupportedGraphError) as info:
        build(parts, **change(parts), name="bad-graph")
    assert message in str(info.value)
    assert "'bad-graph'" in str(info.value)


def test_tiny_graph_is_valid() -> None:
    graph = tiny_graph()
    assert graph.saved_candidates == ()
    assert graph.consumers["y"] == ("view",) and graph.consumers["x"] == ("mm", "mm_bw")
    assert graph.pinned_values == {"x", "w", "t", "loss", "grad_w"}


# -- the structural hash -----------------------------------------------------------------------

@given(graph=small_graphs(), scale=st.floats(0.1, 10.0))
def test_hash_ignores_timings_and_bandwidth(graph: Graph, scale: float) -> None:
    retimed = replace(graph, ops=tuple(replace(op, time_ms=op.time_ms * scale + 1.0) for op in graph.ops),
                      transfer=Transfer(1e3 * scale, 2e3 * scale, 0.5, source="measured on elsewhere"),
                      name="other name")
    assert retimed.hash == graph.hash
    assert Graph.from_json(through_json(retimed.to_json())).hash == graph.hash


STRUCTURE_CHANGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "value size": lambda p: {"values": replace_value(p, "y", size_bytes=128)},
    "value shape": lambda p: {"values": replace_value(p, "yv", shape=(2, 8))},
    "value dtype": lambda p: {"values": replace_value(p, "loss", dtype="bfloat16")},
    "op inputs": lambda p: {"ops": replace_op(p, "mm_bw", inputs=("t", "w"))},
    "op not recomputable": lambda p: {"ops": replace_op(p, "mm", recomputable=False)},
    "op random": lambda p: {"ops": replace_op(p, "mm", random=True)},
    "op target": lambda p: {"ops": replace_op(p, "mm", target="aten.addmm.default")},
    "extra forward output": lambda p: {"forward_outputs": ["loss", "y"]},
    "no gradients": lambda p: {"gradients": []},
    "caller bytes": lambda p: {"caller_bytes": 4},
    "placeholder order": lambda p: {"placeholders": ["w", "x", "t"]},
    "extra op": lambda p: {"values": p["values"] + [Value("z", 8, ACT, producer="relu")],
                           "ops": p["ops"][:3] + [Op("relu", ("y",), ("z",), FWD)] + p["ops"][3:]},
}


@pytest.mark.parametrize("case", sorted(STRUCTURE_CHANGES))
def test_hash_changes_with_structure(case: str) -> None:
    parts = tiny_parts()
    changed = build(parts, **STRUCTURE_CHANGES[case](parts))
    assert changed.hash != tiny_graph().hash
    assert len(changed.hash) == 16 and set(changed.hash) <= set("0123456789abcdef")
    assert Graph.from_json(json.loads(json.dumps(changed.to_json()))).hash == changed.hash


def test_check_graph_refuses_a_plan_for_another_graph() -> None:
    graph = tiny_graph()
    plan = solve(graph, KEEP_ALL_BUDGET_BYTES, "none")
    plan.check_graph(graph)
    plan.check_graph(Graph.from_json(through_json(graph.to_json())))
    parts = tiny_parts()
    other = build(parts, values=replace_value(parts, "x", size_bytes=128))
    with pytest.raises(PlanMismatchError) as info:
        plan.check_graph(other)
    assert graph.hash in str(info.value) and other.hash in str(info.value)
    with pytest.raises(PlanMismatchError, match="plan was made for graph"):
        simulate(other, plan)


# -- bad files ---------------------------------------------------------------------------------

def plan_json() -> dict[str, Any]:
    graph = tiny_graph()
    return through_json(solve(graph, KEEP_ALL_BUDGET_BYTES, "none").to_json())


def edited(change: Callable[[dict[str, Any]], None]) -> str:
    data = plan_json()
    change(data)
    return json.dumps(data)


def truncated_text() -> str:
    text = json.dumps(plan_json(), indent=1)
    return text[: len(text) // 2]


BAD_PLAN_FILES: dict[str, Callable[[], str | bytes]] = {
    "empty": lambda: "",
    "truncated": truncated_text,
    "binary garbage": lambda: b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80",
    "json list": lambda: "[1, 2, 3]",
    "json string": lambda: '"memsched.plan/1"',
    "a graph file": lambda: json.dumps(tiny_graph().to_json()),
    "future format": lambda: edited(lambda d: d.update(format="memsched.plan/2")),
    "no steps": lambda: edited(lambda d: d.pop("forward")),
    "unknown step kind": lambda: edited(lambda d: d["forward"].insert(0, ["jump", "mm"])),
    "step without name": lambda: edited(lambda d: d["backward"].insert(0, ["run"])),
    "steps not a list": lambda: edited(lambda d: d.update(backward=7)),
    "unknown decision": lambda: edited(lambda d: d.update(decisions={"y": "maybe"})),
    "decisions not a mapping": lambda: edited(lambda d: d.update(decisions=["y", "keep"])),
    "budget not a number": lambda: edited(lambda d: d.update(budget_bytes="lots")),
    "plan names another graph": lambda: edited(lambda d: d.update(graph_hash="0" * 16)),
    "embedded graph edited": lambda: edited(lambda d: d["graph"]["values"][0].update(size_bytes=1)),
    "embedded graph truncated": lambda: edited(lambda d: d["graph"].update(ops=d["graph"]["ops"][:2])),
    "embedded graph not a graph": lambda: edited(lambda d: d.update(graph={"ops": []})),
}


@pytest.mark.parametrize("case", sorted(BAD_PLAN_FILES))
def test_plan_load_rejects_bad_files(case: str, tmp_path: Path) -> None:
    content = BAD_PLAN_FILES[case]()
    path = tmp_path / "plan.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PlanFormatError, match="plan|graph|JSON|json|corrupt|format"):
        Plan.load(str(path))


def test_plan_load_names_the_file_when_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text(truncated_text(), encoding="utf-8")
    with pytest.raises(PlanFormatError, match="cut.json"):
        Plan.load(str(path))


@pytest.mark.parametrize("case", ["truncated", "edited", "binary garbage", "plan file"])
def test_graph_load_rejects_bad_files(case: str, tmp_path: Path) -> None:
    text = json.dumps(tiny_graph().to_json())
    data = json.loads(text)
    data["values"][0]["size_bytes"] = 1
    content: str | bytes = {"truncated": text[: len(text) // 3], "edited": json.dumps(data),
                            "binary garbage": b"\xff\xfe\x00\x80garbage",
                            "plan file": json.dumps(plan_json())}[case]
    path = tmp_path / "graph.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PlanFormatError, match="plan|graph|JSON|json|corrupt|format"):
        Graph.load(str(path))
