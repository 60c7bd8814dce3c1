"""How many tokens per step fit on one GPU? Planned without the GPU (`planner.estimate`).

For each architecture (`planner.presets`) on ``--target`` (default H100 SXM 80 GB), with
AdamW's state and bf16 autocast, the largest batch (at the preset's sequence length) whose
step fits the target's memory less `planner.estimate.DEVICE_RESERVE_BYTES`, under:

* ``plain``: keep every activation (eager autograd);
* ``every_block``: checkpoint every block (what HF's ``gradient_checkpointing_enable()`` does);
* ``every_block + chunked loss``: the same, with the loss chunked as memsched's are below,
  to show what the chunked loss alone gives;
* ``memsched <= every_block``: recompute only, predicted overhead at most every_block's;
* ``memsched <= 10 %``: recompute only, predicted overhead at most +10 %;
* ``memsched any``: recompute only, any overhead;
* ``memsched + offload``: recompute and offload over the target's host link, any overhead.

Each solve runs in a forked process for at most ``--solve-timeout`` seconds: a step with no
plan in that time counts as not fitting (refusing a budget on 7,000 ops can take minutes),
so a method's batch is one for which a plan was found. The bisection stops within
``--resolution`` of the largest fitting batch; the JSON gives the least failing batch tried
beside it. ``memsched any`` starts from the largest batch of the memsched methods before it,
and ``memsched + offload`` from ``memsched any``'s (a plan with offload allowed may offload
nothing: where the solve with the host link finds no plan, ``memsched any``'s verdict holds).

The memsched methods may also plan the step with its loss chunked (``chunked_loss=True``,
`planner.chunked_loss`: the logits are never whole), unless ``--whole-loss``: a method
with an overhead limit keeps the first of (chunked, as traced) that fits within it; the
others plan the chunked step, whose lowest peak is the lower. Each batch size is traced
once (fake tensors), walked as traced and walked again with the loss chunked (roofline
times); the search doubles the batch, then bisects. Overheads are predicted by the
roofline time model, relative to keeping everything of the step as traced (whole loss)
at the same batch.

    python experiments/max_batch.py [--presets gpt2-xl llama-3.2-3b] [--target h100-sxm]
        [--seq-len N] [--limit 1024] [--whole-loss] [--solve-timeout 120] [--resolution 0.05]

Writes experiments/results/max_batch.json and max_batch.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import sys
import time
from typing import Any

from common import RESULTS, git_revision, write_results
from planner.chunked_loss import chunk_linear_cross_entropy
from planner.estimate import (OPTIMIZER_STATE_VALUE, largest_fitting, optimizer_state_bytes, traced_step,
                              usable_bytes, walked_graph, with_resident_bytes)
from planner.presets import preset
from solvers.errors import InfeasibleBudgetError
from solvers.graph import Graph
from solvers.plan import StepKind
from solvers.portfolio import solve
from solvers.simulate import simulate
from solvers.targets import device_target

log = logging.getLogger("max_batch")

METHODS = ("plain", "every_block", "every_block + chunked loss", "memsched <= every_block", "memsched <= 10 %",
           "memsched any", "memsched + offload")


def _nominal(graph: Graph) -> Graph:
    """``graph`` with a nominal link: no solver offloads (recompute only)."""
    return dataclasses.replace(graph, transfer=dataclasses.replace(graph.transfer, source="nominal"))


class Probe:
    """One batch size: its graph, then each method's verdict (fits, overhead, peak)."""

    def __init__(self, name: str, batch_size: int, seq_len: int, target_name: str, chunked: bool,
                 solve_timeout_s: float) -> None:
        started = time.perf_counter()
        model, inputs, kwargs = preset(name).build(batch_size, seq_len)
        step = traced_step(model, inputs, target=target_name, example_kwargs=kwargs, autocast="bf16")
        state_bytes = optimizer_state_bytes(model, "adamw")

        def walked() -> Graph:
            graph = walked_graph(step, model, inputs, target=target_name, example_kwargs=kwargs, release_outputs=True)
            return with_resident_bytes(graph, OPTIMIZER_STATE_VALUE, state_bytes)
        self.graph = walked()
        self.chunked_graph = self.graph
        if chunked:
            chunk_linear_cross_entropy(step)
            self.chunked_graph = walked()
        self.usable_bytes = usable_bytes(device_target(target_name))
        self.solve_timeout_s = solve_timeout_s
        self.trace_s = time.perf_counter() - started
        self.verdicts: dict[str, dict[str, Any]] = {}

    def verdict(self, method: str, every_block_overhead: float | None) -> dict[str, Any]:
        key = f"{method}@{every_block_overhead}"
        if key not in self.verdicts:
            self.verdicts[key] = self._solve(method, every_block_overhead)
        return self.verdicts[key]

    def _solve(self, method: str, every_block_overhead: float | None) -> dict[str, Any]:
        """``method``'s verdict on the graphs it may plan (module docstring): the first that fits."""
        started = time.perf_counter()
        if method == "memsched + offload":
            verdict = self._verdicts_on({"chunked": self.chunked_graph}, method, "auto", None)
            if not verdict["fits"]:
                verdict = {**self.verdict("memsched any", every_block_overhead), "offload_solve": verdict}
            return {**verdict, "solve_s": time.perf_counter() - started}
        if method in ("plain", "every_block"):
            graphs = {"whole": self.graph}
        elif method == "every_block + chunked loss":
            graphs = {"chunked": self.chunked_graph}
        elif method in ("memsched <= every_block", "memsched <= 10 %"):
            graphs = {"chunked": self.chunked_graph, "whole": self.graph}
        else:
            graphs = {"chunked": self.chunked_graph}
        solver = {"plain": "none", "every_block": "every_block", "every_block + chunked loss": "every_block"}.get(
            method, "auto")
        limit = {"memsched <= 10 %": 0.10, "memsched <= every_block": every_block_overhead}.get(method)
        verdict = self._verdicts_on({loss: _nominal(graph) for loss, graph in graphs.items()}, method, solver, limit)
        return {**verdict, "solve_s": time.perf_counter() - started}

    def _verdicts_on(self, graphs: dict[str, Graph], method: str, solver: str, limit: float | None) -> dict[str, Any]:
        verdicts = []
        for loss, graph in graphs.items():
            verdicts.append({**_solve_within(graph, self.usable_bytes, solver, self.graph.total_time_ms, limit,
                                             self.solve_timeout_s), "loss": loss})
            if verdicts[-1]["fits"]:
                break
        return verdicts[-1 if verdicts[-1]["fits"] else 0]


def _solve_within(graph: Graph, budget_bytes: int, solver: str, plain_time_ms: float, limit: float | None,
                  timeout_s: float) -> dict[str, Any]:
    """The verdict of one solve, run in a forked process for at most ``timeout_s``: fits
    (peak within the budget, overhead within ``limit`` against ``plain_time_ms``),
    overhead, peak, solver and offloads; without a plan in time, it does not fit."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        try:
            plan = solve(graph, budget_bytes, solver)
        except InfeasibleBudgetError as error:
            sender.send({"fits": False, "why": str(error).splitlines()[0]})
            return
        overhead = plan.predicted_time_ms / plain_time_ms - 1.0
        sender.send({"fits": simulate(graph, plan).peak_bytes <= budget_bytes
                     and (limit is None or overhead <= limit + 1e-9),
                     "overhead": overhead, "peak_bytes": plan.predicted_peak_bytes, "solver": plan.solver,
                     "offloads": sum(step.kind is StepKind.OFFLOAD for step in plan.forward)})

    process = context.Process(target=child, daemon=True)
    process.start()
    sender.close()
    verdict = receiver.recv() if receiver.poll(timeout_s) else None
    process.kill()
    process.join()
    return verdict if verdict is not None else {"fits": False, "why": f"no plan within {timeout_s:.0f} s of solving"}


def run_preset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    seq_len = args.seq_len or preset(name).default_seq_len
    probes: dict[int, Probe] = {}

    def probe(batch_size: int) -> Probe:
        if batch_size not in probes:
            probes[batch_size] = Probe(name, batch_size, seq_len, args.target, chunked=not args.whole_loss,
                                       solve_timeout_s=args.solve_timeout)
            log.info("%s batch %d: %d ops, traced in %.0f s", name, batch_size, len(probes[batch_size].graph.ops),
                     probes[batch_size].trace_s)
        return probes[batch_size]

    results: dict[str, Any] = {}
    every_block_overhead = None
    for method in METHODS:
        started = time.perf_counter()
        known = 0
        if method == "memsched any":
            known = max(results[m]["batch_size"] for m in ("every_block + chunked loss", "memsched <= every_block",
                                                           "memsched <= 10 %"))
        elif method == "memsched + offload":
            known = results["memsched any"]["batch_size"]
        batch = largest_fitting(lambda b: probe(b).verdict(method, every_block_overhead)["fits"], args.limit,
                                known_fitting=known, relative_gap=args.resolution)
        verdict = probe(batch).verdict(method, every_block_overhead) if batch else None
        key = f"{method}@{every_block_overhead}"
        failing = [b for b, p in probes.items() if key in p.verdicts and not p.verdicts[key]["fits"]]
        if method == "every_block" and verdict:
            every_block_overhead = verdict["overhead"]
        results[method] = {"batch_size": batch, "tokens_per_step": batch * seq_len,
                           "overhead": verdict["overhead"] if verdict else None,
                           "peak_bytes": verdict["peak_bytes"] if verdict else None,
                           "offloads": verdict["offloads"] if verdict else None,
                           "loss": verdict["loss"] if verdict else None,
                           "least_failing_batch": min(failing, default=None),
                           "search_s": time.perf_counter() - started}
        log.info("%s %s: batch %d (%d tokens), overhead %s", name, method, batch, batch * seq_len,
                 f"{verdict['overhead']:+.1%}" if verdict else "-")
    reference = results["every_block"]["tokens_per_step"] or 1
    for method in METHODS:
        results[method]["vs_every_block"] = results[method]["tokens_per_step"] / reference
    return {"preset": name, "seq_len": seq_len, "methods": results,
            "probes": {b: {"ops": len(p.graph.ops), "trace_s": p.trace_s, **{k: v for k, v in p.verdicts.items()}}
                       for b, p in sorted(probes.items())}}


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(results["presets"]), figsize=(6 * len(results["presets"]), 4), squeeze=False)
    for axis, entry in zip(axes[0], results["presets"]):
        tokens = [entry["methods"][m]["tokens_per_step"] for m in METHODS]
        axis.barh(list(METHODS), tokens)
        axis.set_title(f"{entry['preset']} (seq {entry['seq_len']}) on {results['target']}")
        axis.set_xlabel("tokens per step that fit")
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(RESULTS / "max_batch.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gpt2-xl", "llama-3.2-3b"])
    parser.add_argument("--target", default="h100-sxm")
    parser.add_argument("--seq-len", type=int, default=None, help="default: each preset's")
    parser.add_argument("--limit", type=int, default=1024, help="largest batch tried")
    parser.add_argument("--whole-loss", action="store_true", help="plan memsched's methods with the loss as traced")
    parser.add_argument("--solve-timeout", type=float, default=120, help="seconds per solve (module docstring)")
    parser.add_argument("--resolution", type=float, default=0.05,
                        help="stop bisecting within this fraction of the largest fitting batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    command = " ".join(["python", "experiments/max_batch.py", *(argv if argv is not None else sys.argv[1:])])
    revision = git_revision()
    for name in args.presets:
        entry = {**run_preset(name, args), "command": command, "git": revision, "target": args.target,
                 "memsched_chunked_loss": not args.whole_loss}
        # each preset's entry replaces its earlier one and keeps the others (presets may run apart)
        path = RESULTS / "max_batch.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        presets = [p for p in results.get("presets", []) if p["preset"] != name] + [entry]
        results = {"experiment": "max_batch", "target": args.target,
                   "target_figures": device_target(args.target).to_json(), "optimizer": "adamw", "autocast": "bf16",
                   "presets": sorted(presets, key=lambda p: p["preset"])}
        write_results("max_batch", results, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
