"""``torchrun --nproc-per-node K -m planner.pipeline_demo``: a built-in model pipelined
over K ranks under a per-device budget, checked against one process.

Every rank builds the same zoo model, plans with ``optimize(..., stages=K)``, runs one
warm-up step (the receive buffers and BatchNorm statistics settle), then one measured
step, and compares its loss, its stage's gradients and buffers with a reference running
the same micro-batches one after the other on an untouched copy (each loss divided by M,
the scaling of ``torch.distributed.pipelining``). Dropout is switched off: micro-batches
draw other masks than one batch would. Rank 0 prints one row per stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from planner import zoo
from planner.benchmark import training_loss


def reference_step(model: torch.nn.Module, inputs: tuple, microbatches: int) -> torch.Tensor:
    """The micro-batches one after the other, each loss scaled by 1/M; returns the loss."""
    total = torch.zeros(())
    for index in range(microbatches):
        chunk = tuple(t.tensor_split(microbatches)[index] for t in inputs)
        loss = training_loss(model(*chunk)) / microbatches
        loss.backward()
        total += loss.detach()
    return total


def build_model(model_name: str, size: str, batch: int = 0) -> tuple[torch.nn.Module, tuple]:
    """A zoo model without dropout (``model_name`` may also be ``experiments``' custom
    ``gpt-wide-vocab``), its batch repeated to ``batch`` rows when given."""
    if model_name == "gpt-wide-vocab":
        model, inputs = unbalanced_gpt(size)
    else:
        model, inputs = zoo.make(model_name, size)
    if batch:
        inputs = tuple(t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1))) for t in inputs)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, inputs


def unbalanced_gpt(size: str = "tiny") -> tuple[torch.nn.Module, tuple]:
    """A GPT-style model whose embedding and LM head dwarf a block (a large vocabulary),
    the case where equal layers per stage leave the first and last stage overloaded."""
    config = {"tiny": dict(n_layer=8, n_head=2, d_model=64, seq_len=32, vocab_size=8192, batch=8),
              "small": dict(n_layer=16, n_head=4, d_model=128, seq_len=64, vocab_size=16384, batch=8)}[size]
    batch = config.pop("batch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = zoo.GPT(**config, dropout=0.0)
        stream = torch.randint(config["vocab_size"], (batch, config["seq_len"] + 1))
    return model, (stream[:, :-1].contiguous(), stream[:, 1:].contiguous())


def run_rank(model_name: str, size: str, budget: int | list[int], microbatches: int, schedule: str,
             batch: int = 0, *, plan: str | None = None, solver: str = "auto", timed_steps: int = 0
             ) -> dict[str, Any]:
    """Plan (or load ``plan``), run and check this rank's stage (module docstring), then
    time ``timed_steps`` steps; a JSON-able report. Raises AssertionError when the loss, a
    gradient or a buffer differs from the reference."""
    from planner.api import optimize

    rank = dist.get_rank()
    model, inputs = build_model(model_name, size, batch)
    reference = copy.deepcopy(model)
    pipelined = optimize(model, budget, inputs, stages=dist.get_world_size(), microbatches=microbatches,
                         schedule=schedule, repeats=1, progress=False, plan=plan, solver=solver)
    pipelined.step(*inputs)
    reference_step(reference, inputs, microbatches)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    loss, report = pipelined.measure_step(*inputs)
    expected = reference_step(reference, inputs, microbatches)
    torch.testing.assert_close(loss, expected, msg=lambda m: f"rank {rank} loss: {m}")
    stage_params = {id(p) for p in pipelined.parameters()}
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if id(p) in stage_params:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"rank {rank} grad {name}: {m}")
            checked += 1
    stage_buffers = {id(b) for b in pipelined.module.buffers()}
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        if id(b) in stage_buffers:
            torch.testing.assert_close(b, c, msg=lambda m, name=name: f"rank {rank} buffer {name}: {m}")
    step_ms = None
    if timed_steps:
        times = []
        for _ in range(timed_steps):
            dist.barrier()
            started = time.perf_counter()
            pipelined.step(*inputs)
            dist.barrier()
            times.append((time.perf_counter() - started) * 1000)
        step_ms = sorted(times)[len(times) // 2]
    stage = pipelined.stage
    solver_stage = pipelined.plan.stages[rank].cost
    return {"rank": rank, "ok": True, "loss": float(loss), "params_checked": checked,
            "peak_bytes": report.peak_bytes, "budget_bytes": stage.budget_bytes,
            "predicted_peak_bytes": stage.predicted_peak_bytes, "split_predicted_peak_bytes": solver_stage.peak_bytes,
            "segments": [solver_stage.first_segment, solver_stage.end_segment],
            "stage_solver": stage.plan.solver, "stage_overhead": stage.plan.overhead,
            "recomputed": sum(d.value == "recompute" for d in stage.plan.decisions.values()),
            "predicted_step_time_ms": pipelined.plan.predicted_step_time_ms, "measured_step_ms": step_ms}


def free_port() -> int:
    """A TCP port free on this host now, for ``torchrun --master-port``."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-able ``value``, on every rank (sent as bytes, never pickled)."""
    data = json.dumps(value).encode()
    length = torch.tensor([len(data)], dtype=torch.int64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(t.item() for t in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    received = [torch.zeros(longest, dtype=torch.uint8) for _ in lengths]
    dist.all_gather(received, padded)
    return [json.loads(bytes(t[:int(n.item())].tolist()).decode()) for t, n in zip(received, lengths)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planner.pipeline_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt", choices=sorted(zoo.ZOO) + ["gpt-wide-vocab"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--budget", type=int, nargs="+", default=[64 * 2**20],
                        help="bytes per device: one for all, or one per stage (default 64 MiB)")
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    parser.add_argument("--batch", type=int, default=0, help="repeat the zoo batch to this size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default 1)")
    parser.add_argument("--json", metavar="PATH", help="rank r writes its report to PATH.rank<r>.json")
    parser.add_argument("--plan", metavar="PATH", help="run this saved pipeline plan instead of solving")
    parser.add_argument("--solver", default="auto", help="the single-device solver of each stage (default auto)")
    parser.add_argument("--steps", type=int, default=0, help="time this many steps after the check (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        report = run_rank(args.model, args.size, args.budget if len(args.budget) > 1 else args.budget[0],
                          args.microbatches, args.schedule, args.batch, plan=args.plan, solver=args.solver,
                          timed_steps=args.steps)
    except Exception as error:   # the other ranks may wait in a collective: report and leave at once
        report = {"rank": rank, "ok": False, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
        print(f"rank {rank} failed:\n{report['traceback']}", file=sys.stderr, flush=True)
    if args.json:
        with open(f"{args.json}.rank{rank}.json", "w", encoding="utf-8") as file:
            json.dump(report, file)
    if not report["ok"]:
        os._exit(1)   # torchrun stops the other ranks
    reports = gather_json(report)
    if rank == 0:
        _print(reports)
    dist.destroy_process_group()
    return 0 if all(r.get("ok") and r["peak_bytes"] <= r["budget_bytes"] for r in reports) else 1


def _print(reports: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from solvers.errors import format_bytes

    table = Table(title="memsched pipeline: one row per stage (rank)")
    for column in ("rank", "segments", "peak measured", "peak predicted", "budget", "recomputed",
                   "stage overhead", "loss & gradients"):
        table.add_column(column, justify="right")
    for report in reports:
        if not report.get("ok"):
            table.add_row(str(report["rank"]), "", "", "", "", "", "", f"FAILED: {report['error'][:80]}")
            continue
        table.add_row(str(report["rank"]), f"{report['segments'][0]}..{report['segments'][1] - 1}",
                      format_bytes(report["peak_bytes"]), format_bytes(report["predicted_peak_bytes"]),
                      format_bytes(report["budget_bytes"]), str(report["recomputed"]),
                      f"{report['stage_overhead']:+.1%}", "equal")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
