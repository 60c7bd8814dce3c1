"""plan-inspect and solvers.explain on a hand-built, torch-free graph.

The graph is a three-block MLP (fc -> gelu per block, then a sum) with the cases a "why"
must tell apart: a cheap recompute candidate, expensive matmul outputs, a storage read
through a view, a non-recomputable buffer update, and an activation that is also a model
output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planner.inspect import main
from solvers import Decision, Graph, Op, Phase, Plan, Value, ValueKind, format_bytes, simulate, solve
from solvers.explain import Explanation, explain
from solvers.kernel.program import build_program, saved_roots

MiB = 2**20
ROWS = 4096                     # batch rows: activations dominate the weights
WIDTHS = (64, 256, 128, 64)     # input width, then the width of each block
BUDGET_BYTES = 15 * MiB         # keep-all peaks at 17.2 MiB; greedy must drop something


def tensor(name: str, shape: tuple[int, ...], kind: ValueKind, producer: str | None = None,
           alias_of: str | None = None) -> Value:
    numel = 1
    for dim in shape:
        numel *= dim
    return Value(name, 0 if alias_of else 4 * numel, kind, producer=producer, alias_of=alias_of, shape=shape,
                 dtype="float32")


def tiny_mlp() -> Graph:
    """x -> [fc_i -> gelu_i] for i = 1, 2, 3 -> sum. Block 1 also updates a running
    statistic (not recomputable) that its backward reads; block 2 reads its fc output
    through a view; act3 is also returned to the caller."""
    activation, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    forward, backward = Phase.FORWARD, Phase.BACKWARD
    values = [tensor("x", (ROWS, WIDTHS[0]), ValueKind.INPUT), tensor("bn_mean", (256,), ValueKind.BUFFER),
              tensor("tangent_loss", (), ValueKind.TANGENT)]
    ops: list[Op] = []
    blocks = []
    block_input = "x"
    for i in (1, 2, 3):
        weight, fc_out, act = f"w{i}", f"fc{i}_out", f"act{i}"
        values += [tensor(weight, (WIDTHS[i - 1], WIDTHS[i]), ValueKind.PARAMETER),
                   tensor(fc_out, (ROWS, WIDTHS[i]), activation, f"fc{i}"),
                   tensor(act, (ROWS, WIDTHS[i]), activation, f"gelu{i}")]
        ops.append(Op(f"fc{i}", (block_input, weight), (fc_out,), forward, 0.3 * i, target="aten.mm.default",
                      module=f"blocks.{i}.fc"))
        gelu_input = fc_out
        if i == 2:
            values.append(tensor("fc2_view", (ROWS, WIDTHS[i]), activation, "view2", alias_of=fc_out))
            ops.append(Op("view2", (fc_out,), ("fc2_view",), forward, 0.0, target="aten.view.default",
                          module="blocks.2.fc"))
            gelu_input = "fc2_view"
        ops.append(Op(f"gelu{i}", (gelu_input,), (act,), forward, 0.04, target="aten.gelu.default",
                      module=f"blocks.{i}.act"))
        extra_reads: tuple[str, ...] = ()
        if i == 1:
            values.append(tensor("bn_stats", (256,), activation, "bn_update"))
            ops.append(Op("bn_update", (act, "bn_mean"), ("bn_stats",), forward, 0.01, recomputable=False,
                          target="aten.add_.Tensor", module="blocks.1.norm"))
            extra_reads = ("bn_stats",)
        blocks.append((i, block_input, weight, gelu_input, act, extra_reads))
        block_input = act
    values.append(tensor("loss", (), activation, "loss_sum"))
    ops.append(Op("loss_sum", ("act3",), ("loss",), forward, 0.01, target="aten.sum.default"))
    for i, block_input, weight, gelu_input, act, extra_reads in reversed(blocks):
        grad_act, grad_fc, grad_weight = f"grad_act{i}", f"grad_fc{i}", f"grad_w{i}"
        if i == 3:
            values.append(tensor(grad_act, (ROWS, WIDTHS[i]), work, "loss_sum_bw"))
            ops.append(Op("loss_sum_bw", ("tangent_loss", act), (grad_act,), backward, 0.01,
                          target="aten.expand.default"))
        values += [tensor(grad_fc, (ROWS, WIDTHS[i]), work, f"gelu{i}_bw"),
                   tensor(grad_weight, (WIDTHS[i - 1], WIDTHS[i]), work, f"fc{i}_bw_w")]
        ops.append(Op(f"gelu{i}_bw", (grad_act, gelu_input) + extra_reads, (grad_fc,), backward, 0.06,
                      target="aten.gelu_backward.default", module=f"blocks.{i}.act"))
        ops.append(Op(f"fc{i}_bw_w", (grad_fc, block_input), (grad_weight,), backward, 0.3 * i,
                      target="aten.mm.default", module=f"blocks.{i}.fc"))
        if i > 1:
            values.append(tensor(f"grad_act{i - 1}", (ROWS, WIDTHS[i - 1]), work, f"fc{i}_bw_x"))
            ops.append(Op(f"fc{i}_bw_x", (grad_fc, weight), (f"grad_act{i - 1}",), backward, 0.3 * i,
                          target="aten.mm.default", module=f"blocks.{i}.fc"))
    return Graph(ops=tuple(ops), values=tuple(values),
                 placeholders=("x", "bn_mean", "w1", "w2", "w3", "tangent_loss"),
                 forward_outputs=("loss", "act3"), gradients=("grad_w1", "grad_w2", "grad_w3"), name="tiny-mlp")


@pytest.fixture(scope="module")
def graph() -> Graph:
    return tiny_mlp()


@pytest.fixture(scope="module")
def plan(graph: Graph) -> Plan:
    plan = solve(graph, BUDGET_BYTES, "greedy")
    assert Decision.RECOMPUTE in plan.decisions.values(), "the test budget must force a recompute"
    return plan


@pytest.fixture()
def plan_path(plan: Plan, tmp_path: Path) -> str:
    path = tmp_path / "plan.json"
    plan.save(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def wide_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at $COLUMNS when set; keep the table rows on one line each."""
    monkeypatch.setenv("COLUMNS", "240")


def table_rows(text: str) -> dict[str, list[str]]:
    """Value name -> the cells of its first table line, in table order."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0] and cells[0] != "value":
            rows[cells[0]] = cells
    return rows


def test_table_shows_the_summary_and_every_decision(graph: Graph, plan: Plan, plan_path: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main([plan_path]) == 0
    out = capsys.readouterr().out
    sim = simulate(graph, plan)
    assert f"budget     {format_bytes(BUDGET_BYTES)} ({BUDGET_BYTES} bytes)" in out
    assert f"peak       {format_bytes(sim.peak_bytes)} ({sim.peak_bytes / BUDGET_BYTES:.1%} of the budget)" in out
    assert f"overhead {(sim.time_ms / graph.total_time_ms - 1) * 100:+.2f}%" in out
    assert "solver greedy, optimality not proved" in out
    assert f"tiny-mlp hash {graph.hash}, 18 ops (9 forward, 9 backward), 7 saved storages" in out
    peak_op = graph.op(plan.steps(sim.peak_phase)[sim.peak_step_index].name)
    assert f"{sim.peak_phase.value} step {sim.peak_step_index}: {peak_op.name} running (" in out
    assert f"@ {peak_op.module})" in out
    assert "recompute  1 saved storage (4.00 MiB); 1 op rerun in the backward (1 run, 0.04 ms)" in out

    rows = table_rows(out)
    assert list(rows) == ["fc1_out", "act1", "act2", "fc2_out", "fc3_out", "act3", "bn_stats"]   # largest first
    assert set(rows) == set(saved_roots(graph))
    for name, cells in rows.items():
        assert cells[3] == plan.decisions[name].value, name
    assert rows["act1"][1:5] == ["4.00 MiB", "4096x256 float32", "recompute", "1"]
    assert rows["act1"][6:8] == ["gelu1", "blocks.1.act"]
    assert rows["bn_stats"][6] == "bn_update (add_.Tensor)"
    assert rows["act1"][8].startswith("recompute: frees 4.00 MiB for 0.04 ms (100.00 MiB per ms), among the cheapest")
    assert rows["act3"][8] == "keep: also a model output (the caller holds it)"
    assert rows["bn_stats"][8].startswith("keep: output of a non-recomputable op (add_.Tensor")
    assert rows["fc1_out"][8].startswith("keep: recomputing would cost 0.3 ms for 4.00 MiB")
    assert rows["fc1_out"][5] == "yes" and rows["act1"][5] == ""     # what the peak is made of


def test_json_matches_the_plan(graph: Graph, plan: Plan, plan_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([plan_path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {row["name"]: row["decision"] for row in data["rows"]} == \
        {name: decision.value for name, decision in plan.decisions.items()}
    summary = data["summary"]
    assert summary["budget_bytes"] == BUDGET_BYTES
    assert summary["peak_bytes"] == plan.predicted_peak_bytes
    assert summary["recompute_time_ms"] == pytest.approx(0.04)
    assert summary["graph_hash"] == graph.hash and summary["op_count"] == 18
    assert Explanation.from_json(data) == explain(graph, plan)


def test_bound_sits_below_the_plans_recomputation(plan_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--bound``: the least recomputation any plan needs at the budget. At 15 MiB (keep-all
    peaks at 17.2 MiB) greedy's plan re-runs gelu1 (0.04 ms), and no plan can do less."""
    assert main([plan_path, "--bound", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recompute_lower_bound"]["time_ms"] == pytest.approx(data["summary"]["recompute_time_ms"])
    assert main([plan_path, "--bound"]) == 0
    assert "bound      no plan without offload recomputes less than 0.04 ms at this budget" in capsys.readouterr().out


def test_sort_and_top(plan_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([plan_path, "--sort", "decision", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert list(table_rows(out)) == ["act1", "fc1_out"]
    assert "saved storages (2 of 7), by decision" in out and "5 more; --top 0 shows all" in out
    assert main([plan_path, "--sort", "name", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in data["rows"]] == ["act1", "act2", "act3"] and data["total_rows"] == 7


def test_plan_without_graph_shows_what_the_plan_records(plan: Plan, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bare.json"
    dataclasses.replace(plan, graph=None).save(str(path))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "has no embedded graph" in out
    assert f"budget     {format_bytes(BUDGET_BYTES)}" in out and f"hash {plan.graph_hash}" in out
    assert "recompute  1 saved storage; 1 op rerun in the backward (1 run)" in out
    assert "│" not in out                                    # no table without a graph


def test_offload_and_keep_all_reasons(graph: Graph) -> None:
    decisions = {root: Decision.KEEP for root in saved_roots(graph)} | {"fc1_out": Decision.OFFLOAD}
    forward, backward = build_program(graph, decisions)
    plan = Plan(graph.hash, "by-hand", BUDGET_BYTES * 2, forward, backward, decisions)
    rows = {row.name: row for row in explain(graph, plan).rows}
    assert rows["fc1_out"].why.startswith("offload: 4.00 MiB copied to host")
    assert explain(graph, plan).summary.offloaded_bytes == 4 * MiB

    keep_all = solve(graph, 2**40, "greedy")
    summary = explain(graph, keep_all).summary
    assert summary.optimal and summary.overhead_pct == 0 and summary.recompute_run_count == 0
    assert explain(graph, keep_all).rows[0].why.startswith("keep: the budget is met with every saved value kept")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"format": "memsched.plan/1", "solver": ', "not valid JSON"),
    ('[1, 2]', "not a memsched plan (a JSON list"),
    ('{"format": "memsched.graph/1"}', "this is a memsched graph, not a plan"),
    ('{"format": "memsched.plan/1"}', "corrupt memsched plan"),
])
def test_bad_files_exit_2_with_one_line(content: str | None, message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"plan-inspect: error: {path}: {message}")
    assert "Plan.save" in lines[0] or "solvers.solve" in lines[0]


def test_library_and_cli_modules_do_not_import_torch() -> None:
    """solvers.explain and planner/inspect.py itself stay torch-free (loaded by path, so the
    check does not go through planner/__init__)."""
    code = ("import importlib.util, sys\n"
            "import solvers.explain\n"
            "spec = importlib.util.spec_from_file_location('plan_inspect_cli', 'planner/inspect.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_console_script_runs(plan_path: str) -> None:
    script = shutil.which("plan-inspect") or str(Path(sys.executable).with_name("plan-inspect"))
    assert Path(script).exists(), "plan-inspect is not installed; run pip install -e .[test]"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "PLAN.json" in result.stdout
    result = subprocess.run([script, plan_path, "--top", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "saved storages (1 of 7)" in result.stdout, result.stderr
