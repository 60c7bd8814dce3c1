"""memsched ``compile=True`` against ``torch.compile`` with its activation memory budget,
side by side in one process, on the same parameters.

Models (``--models``):

    gpt      zoo GPT, small: 4 blocks, d=256, seq 128, batch 8, vocabulary 1,024, dropout 0.1
    resnet   zoo ResNet, small
    gpt2     GPT2LMHeadModel (124 M) from its transformers config, dropout 0, batch 2 x 256
             (``loss = model(**batch).loss``; the logits are dropped before the backward and
             memsched plans with ``release_outputs=True``, as in experiments/real_models.py)

Methods:

    eager plain            the eager step (gradient reference beside compiled plain)
    compile plain          torch.compile (inductor), default partitioner budget (1.0)
    compile-<f>            torch.compile with ``torch._functorch.config.activation_memory_budget``
                           at f = 0.9, 0.7, 0.5, 0.3, 0.1 (one backend per budget, so dynamo
                           keeps them apart)
    checkpoint every block (eager)
                           the `every_block` plan (torch.utils.checkpoint on every block), eager
    memsched <budget>      memsched ``compile=True`` as `optimize` plans it (layer and batch norms
                           decomposed as inductor lowers them, pointwise ops priced as fused;
                           `planner.compiled`) and fitted (`planner.compiled.fit_compiled`) at
                           ``--budgets`` budgets from memsched's floor to 0.9 of compiled
                           plain's measured peak, and at each peak a compile budget or
                           every-block checkpointing measured, below memsched's eager floor
                           too (`planner.compiled.solve_compiled`) (one capture and profile for
                           all of them); where the floor's compiled step measures over it, the
                           floor is tried again at the least compiled peak measured, the budget
                           the error tells a caller to raise to

Every compiled method runs with ``torch._inductor.config.fallback_random = True``, so dropout
draws as eager does and gradients are comparable. Inductor's caches go to a fresh
directory (``TORCHINDUCTOR_CACHE_DIR``), so the first method to compile a graph pays its
full compile time; a later method with an identical graph (compile-0.7 after compile-0.9
when the partitions agree, a memsched budget whose run an earlier budget compiled) re-uses it.

``--keep-freed-memory`` runs with glibc's malloc thresholds fixed so that freed memory is
kept for reuse, as CUDA's caching allocator keeps it. By default glibc returns a large
freed block to the OS, and the next kernel that writes a block of that size faults in fresh
pages: 42 ms for a logits-sized 98 MiB buffer against 5.5 ms to write a warm one (1 thread).
Which method pays that depends on its free pattern, not on its kernels: on a linear head of
GPT-2's size with its loss, memsched's keep-all plan was 1.035 of compiled plain's step by
default and 0.998 with the thresholds fixed.

Peaks are measured from the allocator's events (`planner.memory.measure_allocator_peak`;
parameters, buffers, inputs and gradients included) after a warm-up step that also
compiles and checks the loss and every gradient against compiled plain's and eager's.
Times are medians of steps run round-robin (`planner.benchmark.step_times_ms`), reported as
ratios to compiled plain's. Compile time is the first step's wall time for torch.compile
(dynamo, AOTAutograd, inductor and one step), and for memsched what `optimize` does for one
budget: the capture and profile (run once here and shared by the budgets, but counted in
each), the solve, and the budget fit (inductor on each aten run, and two steps per plan
tried). Inductor is warmed up on a small unrelated function before anything is timed
(`warm_up_inductor`), so that its once-per-process start falls on no method. Compiled
plain is compiled twice more from empty caches, halfway through memsched's budgets and
after them, and ``compile_time_target`` holds each budget's ratio to the median of the
three (and to their range). Beside the
every-block target the JSON gives the least recomputation any plan needs at that peak
(`solvers.recompute_bound`).

Then each baseline that memsched was planned at the peak of is timed against that plan alone
(``--pair-repeats`` rounds of the pair, alternating which runs first), and the median of the
per-round ratios is reported with its quartiles (``head_to_head``): closer than the medians
of the long round-robin, whose noise was 1-3 points in some sessions and up to 13 in
others. So is compiled plain against memsched's plan at every-block checkpointing's peak,
the every-block target's pair (``every_block_target["paired"]``).

    python experiments/vs_torch_compile.py [--models gpt resnet gpt2] [--budgets 6] [--repeats 5]
        [--pair-repeats 20] [--threads 1] [--keep-freed-memory]

Writes experiments/results/vs_torch_compile.json (one entry per model, replacing the
entries of the models run) and vs_torch_compile.png (one Pareto panel per model), and
prints a Markdown table.
"""

from __future__ import annotations

import os
import tempfile

# before torch: every compile in this process starts from empty inductor caches
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="vs_torch_compile_inductor_"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

from common import RESULTS, device_description, git_revision, label_axis, write_results  # noqa: E402
from planner import zoo  # noqa: E402
from planner.api import _StepPlanner  # noqa: E402
from planner.benchmark import step_times_ms, training_loss  # noqa: E402
from planner.capture import capture  # noqa: E402
from planner.compiled import (decompose_for_inductor, eager_sized, fit_compiled, solve_compiled,  # noqa: E402
                              with_compiled_costs)
from planner.errors import CompiledBudgetError  # noqa: E402
from planner.memory import measure_allocator_peak  # noqa: E402
from planner.profile import profile, with_released_outputs  # noqa: E402
from real_models import (KEEP_FREED_MEMORY_ENV, build_gpt2, inductor_at_budget, keep_freed_memory,  # noqa: E402
                         solvers_floor, sweep_budgets)
from runtime.compiled import forget_compiled_runs  # noqa: E402
from runtime.module import ScheduledModule  # noqa: E402
from solvers.errors import InfeasibleBudgetError  # noqa: E402
from solvers.graph import Graph  # noqa: E402
from solvers.portfolio import solve  # noqa: E402
from solvers.recompute_bound import recompute_time_lower_bound  # noqa: E402
from solvers.simulate import simulate  # noqa: E402

log = logging.getLogger("vs_torch_compile")

MiB = 2**20
COMPILE_BUDGETS = (0.9, 0.7, 0.5, 0.3, 0.1)
COMPILE_TIME_TARGET = 1.5          # memsched's compile time at most this many times compiled plain's
GRADIENT_SEED = 7
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@dataclass
class Workload:
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    released: bool          # the caller drops all outputs but the loss before backward
    description: str


def build(name: str) -> Workload:
    if name == "gpt2":
        workload = build_gpt2(small=False)
        return Workload(workload.model, (), workload.batch, True, workload.description)
    model, inputs = zoo.make(name, "small")
    description = {"gpt": "zoo GPT small: 4 x 256, seq 128, batch 8, vocabulary 1,024, dropout 0.1",
                   "resnet": "zoo ResNet small"}.get(name, f"zoo {name} small")
    return Workload(model, inputs, {}, False, description)


def step_of(module: torch.nn.Module, workload: Workload) -> Callable[[], torch.Tensor]:
    """One training step as a loop runs it, from fresh gradients."""
    def run() -> torch.Tensor:
        workload.model.zero_grad(set_to_none=True)
        output = module(*workload.args, **workload.kwargs)
        loss = training_loss(output)
        if workload.released:
            output = None
        loss.backward()
        del output
        return loss.detach()
    return run


@dataclass
class Method:
    name: str
    kind: str                                  # "eager", "compile" or "memsched"
    step: Callable[[], torch.Tensor]
    row: dict[str, Any] = field(default_factory=dict)


def seeded(workload: Workload, buffers: dict[str, torch.Tensor], step: Callable[[], torch.Tensor]
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of one seeded step from the saved buffers (BatchNorm)."""
    model = workload.model
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    torch.manual_seed(GRADIENT_SEED)
    loss = step()
    gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, gradients


def largest_difference(actual: tuple, expected: tuple) -> tuple[float, bool]:
    """The largest absolute difference of the loss or a gradient, and whether all are allclose."""
    pairs = [(actual[0], expected[0])] + [(g, expected[1].get(n)) for n, g in actual[1].items()]
    if actual[1].keys() != expected[1].keys():
        return float("inf"), False
    largest = max(float((a - b).abs().max()) for a, b in pairs)
    return largest, all(torch.allclose(a, b, **TOLERANCE) for a, b in pairs)


def measure(workload: Workload, resident: list[torch.Tensor], buffers: dict[str, torch.Tensor],
            references: dict[str, tuple], method: Method) -> None:
    """Warm-up step (compiles, from empty caches: `first_compile`; timed) with the gradient
    checks, then the measured step."""
    with first_compile():
        started = time.perf_counter()
        result = seeded(workload, buffers, method.step)
        method.row["first_step_s"] = time.perf_counter() - started
    for label, reference in references.items():
        largest, close = largest_difference(result, reference)
        method.row[f"max_abs_difference_vs_{label}"] = largest
        method.row[f"allclose_vs_{label}"] = close
    workload.model.zero_grad(set_to_none=True)
    _, peak = measure_allocator_peak(method.step, resident)
    workload.model.zero_grad(set_to_none=True)
    method.row.update(method=method.name, kind=method.kind, measured_peak_bytes=peak)
    log.info("  %-30s peak %8.2f MiB, first step %.1f s", method.name, peak / MiB, method.row["first_step_s"])


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    workload = build(name)
    model = workload.model
    model.train()
    log.info("%s: %s, %.1f M parameters", name, workload.description, sum(p.numel() for p in model.parameters()) / 1e6)
    resident = list(model.parameters()) + list(model.buffers())
    resident += [t for t in pytree.tree_leaves((workload.args, workload.kwargs)) if isinstance(t, torch.Tensor)]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    eager = Method("eager plain", "eager", step_of(model, workload))
    compiled = Method("compile plain", "compile", step_of(torch.compile(model), workload))
    references: dict[str, tuple] = {}
    measure(workload, resident, buffers, references, eager)
    references["eager"] = seeded(workload, buffers, eager.step)
    measure(workload, resident, buffers, references, compiled)
    references["compiled_plain"] = seeded(workload, buffers, compiled.step)
    compiled.row["compile_s"] = compiled.row["first_step_s"]
    methods = [eager, compiled]
    for fraction in COMPILE_BUDGETS:
        method = Method(f"compile-{fraction}", "compile",
                        step_of(torch.compile(model, backend=inductor_at_budget(fraction)), workload))
        method.row["activation_memory_budget"] = fraction
        measure(workload, resident, buffers, references, method)
        method.row["compile_s"] = method.row["first_step_s"]
        methods.append(method)
    compiled_peak = compiled.row["measured_peak_bytes"]

    # checkpointing every block, eager (torch.utils.checkpoint's schedule, as `every_block` plans it)
    eager_step = capture(model, workload.args, workload.kwargs)
    eager_graph = profile(eager_step, model, workload.args, workload.kwargs, progress=False)
    if workload.released:
        eager_graph = with_released_outputs(eager_graph, eager_step)
    every_block = Method("checkpoint every block (eager)", "eager",
                         step_of(ScheduledModule(model, eager_step, eager_graph,
                                                 solve(eager_graph, 2**62, "every_block")), workload))
    # memsched compile=True: what optimize() does (`planner.api._StepPlanner.plan`: layer norms
    # decomposed as inductor lowers them, pointwise ops priced as fused), with one capture
    # and profile for every budget
    started = time.perf_counter()
    step = capture(model, workload.args, workload.kwargs)
    decompose_for_inductor(step)
    capture_s = time.perf_counter() - started
    started = time.perf_counter()
    graph = profile(step, model, workload.args, workload.kwargs, progress=False)
    if workload.released:
        graph = with_released_outputs(graph, step)
    graph = with_compiled_costs(graph, step)
    profile_s = time.perf_counter() - started
    floor_bytes, bound_bytes, _ = solvers_floor(graph)
    log.info("  memsched: %d ops traced in %.1f s, profiled in %.1f s, floor %.2f MiB", len(graph.ops), capture_s,
             profile_s, floor_bytes / MiB)
    measure(workload, resident, buffers, references, every_block)
    methods.append(every_block)
    # memsched at the sweep's budgets and at every peak a baseline reached: the comparison
    # "faster at the same peak" is then measured, not read off neighbouring points
    reached = {method.row["measured_peak_bytes"] for method in methods
               if (method.kind == "compile" and method is not compiled) or method is every_block}
    budgets = sorted(set(sweep_budgets(floor_bytes, compiled_peak, args.budgets))
                     | {peak for peak in reached if peak <= compiled_peak}) if args.at_peaks else \
        sweep_budgets(floor_bytes, compiled_peak, args.budgets)
    infeasible = []
    # compiled plain's compile again in the middle of the budgets and after them: on this
    # machine it moved between 11.5 s and 17.9 s from run to run (zoo GPT), so one timing
    # at the start would set every budget's ratio by where the machine stood then
    plain_compile_s = [compiled.row["compile_s"]]
    resample_before = budgets[len(budgets) // 2]
    queue = list(budgets)
    while True:
        budget = queue.pop(0) if queue else None
        if budget in (resample_before, None):
            plain_compile_s.append(time_plain_compile(workload, buffers))
            log.info("  compile plain, compiled again: %.1f s", plain_compile_s[-1])
        if budget is None:
            break
        planner = _StepPlanner(budget=budget, solver="auto", repeats=3, solver_options={}, progress=False,
                               transfer=None, backward_from="auto", release_outputs=workload.released, compile=True)
        started = time.perf_counter()
        try:
            plan = solve_compiled(lambda budget_bytes: planner.solve(graph, budget_bytes), budget)
            solve_s = time.perf_counter() - started
            with first_compile():
                plan, program = fit_compiled(planner, model, step, graph, plan, workload.args, workload.kwargs)
        except InfeasibleBudgetError as error:     # CompiledBudgetError too: the measured peaks
            infeasible.append({"budget_bytes": budget, "error": str(error).splitlines()[0]})
            log.info("  memsched at %.2f MiB: %s", budget / MiB, str(error).splitlines()[0][:200])
            if budget == budgets[0] and isinstance(error, CompiledBudgetError) and error.least_feasible_bytes > budget:
                # the compiled step measured over at the solver's floor: the budget the error
                # tells the caller to raise to, the least compiled peak measured, is tried next
                queue.insert(0, error.least_feasible_bytes)
            continue
        fit_s = time.perf_counter() - started - solve_s
        module = ScheduledModule(model, step, graph, plan, program=program)
        method = Method(f"memsched @ {budget / MiB:.2f} MiB", "memsched", step_of(module, workload))
        inductor_s = program.programs.forward.compile_s + program.programs.backward.compile_s
        method.row.update(budget_bytes=budget, at_baseline_peak=budget in reached,
                          layouts="channels-last" if program.inductor_options.get("layout_optimization") else "plan's",
                          inductor_reorders=bool(program.inductor_options.get("reorder_for_peak_memory")),
                          fit_tries=program.fit_tries,
                          solver_budget_bytes=program.solver_budget_bytes,
                          predicted_peak_bytes=plan.predicted_peak_bytes, fit_peak_bytes=program.measured_peak_bytes,
                          eager_predicted_peak_bytes=simulate(eager_sized(graph), plan, check_hash=False).peak_bytes,
                          solver=plan.solver, predicted_overhead=plan.overhead, solve_s=solve_s, fit_s=fit_s,
                          capture_profile_s=capture_s + profile_s,
                          compile_s=capture_s + profile_s + solve_s + fit_s, inductor_s=inductor_s,
                          runs={"forward": program.programs.forward.num_runs,
                                "backward": program.programs.backward.num_runs},
                          eager_calls=len(program.programs.forward.eager_calls)
                          + len(program.programs.backward.eager_calls))
        measure(workload, resident, buffers, references, method)
        method.row["within_budget"] = method.row["measured_peak_bytes"] <= budget
        methods.append(method)

    log.info("  timing %d methods round-robin, %d repeats", len(methods), args.repeats)
    times = step_times_ms({m.name: m.step for m in methods}, repeats=args.repeats, warmup=1)
    model.zero_grad(set_to_none=True)
    for method in methods:
        method.row.update(time_ms=times[method.name], time_vs_compiled_plain=times[method.name] / times["compile plain"],
                          peak_vs_compiled_plain=method.row["measured_peak_bytes"] / compiled_peak)
    rows = [m.row for m in methods]
    head_to_head = paired_comparisons(methods, args.pair_repeats, every_block) if args.pair_repeats else []
    return {"model": name, "description": workload.description,
            "parameters": sum(p.numel() for p in model.parameters()),
            "command": " ".join(["python", "experiments/vs_torch_compile.py", *sys.argv[1:]]),
            "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "malloc_env": {name: os.environ[name] for name in KEEP_FREED_MEMORY_ENV if name in os.environ},
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "memsched_capture_s": capture_s, "memsched_profile_s": profile_s, "graph_ops": len(graph.ops),
            "memsched_floor_bytes": floor_bytes, "memsched_lower_bound_bytes": bound_bytes,
            "rows": rows, "memsched_infeasible": infeasible,
            "every_block_target": every_block_target(rows, every_block.row, head_to_head, graph),
            "compile_time_target": compile_time_target(rows, plain_compile_s),
            "compile_budget_not_monotone": not_monotone(rows), "memsched_vs_compile": dominance(rows),
            "head_to_head": head_to_head, "pair_repeats": args.pair_repeats,
            "violations": sum(1 for r in rows if r.get("within_budget") is False),
            "gradient_mismatches": [r["method"] for r in rows if r.get("allclose_vs_compiled_plain") is False]}


def time_plain_compile(workload: Workload, buffers: dict[str, torch.Tensor]) -> float:
    """Seconds of compiled plain's first step, compiled anew from empty caches (a backend
    object of its own, so dynamo compiles again instead of re-using the first one's code)."""
    from torch._inductor.compile_fx import compile_fx

    def inductor(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        return compile_fx(graph_module, example_inputs)

    step = step_of(torch.compile(workload.model, backend=inductor), workload)
    with first_compile():
        started = time.perf_counter()
        seeded(workload, buffers, step)
        return time.perf_counter() - started


def compile_time_target(rows: list[dict], plain_compile_s: list[float]) -> dict[str, Any]:
    """The compile-time target (memsched's compile <= `COMPILE_TIME_TARGET` x compiled
    plain's) against the median of compiled plain's compile timings, with each budget's
    ratio to the fastest and the slowest of them too (how far the machine's drift moves it)."""
    median_s = statistics.median(plain_compile_s)
    budgets = [{"method": row["method"], "compile_s": row["compile_s"],
                "vs_median": row["compile_s"] / median_s,
                "vs_range": [row["compile_s"] / max(plain_compile_s), row["compile_s"] / min(plain_compile_s)],
                "fit_tries": row.get("fit_tries")}
               for row in rows if row["kind"] == "memsched"]
    return {"target": COMPILE_TIME_TARGET, "compile_plain_s": plain_compile_s, "compile_plain_median_s": median_s,
            "budgets": budgets, "within": sum(1 for b in budgets if b["vs_median"] <= COMPILE_TIME_TARGET),
            "of": len(budgets)}


@contextlib.contextmanager
def first_compile() -> Iterator[None]:
    """Inductor's caches empty (a fresh cache directory, its in-memory code caches and
    memsched's compiled runs cleared), as for a process's first compile of the model: each
    method's compile time is its own, not shortened by graphs or kernels another method (or
    another memsched budget) compiled before it."""
    from torch._inductor.utils import fresh_cache

    forget_compiled_runs()
    with fresh_cache(dir=os.environ["TORCHINDUCTOR_CACHE_DIR"], delete=False):
        yield


def warm_up_inductor() -> float:
    """Compile and step a small unrelated function once, so that no timed compile pays
    inductor's once-per-process start (its imports, the C++ toolchain's checks, the first
    kernel build: 13.8 s on this machine, and 8.2 s of compiled plain's first step on the zoo
    GPT, 26.1 s cold against 17.9 s after it, one-off script). Without it the first method
    timed (compiled plain) pays it and every memsched budget after it does not. Returns
    its wall time in seconds."""
    started = time.perf_counter()
    weight = torch.randn(64, 64, requires_grad=True)
    step = torch.compile(lambda x: torch.nn.functional.gelu(x @ weight).sum())
    step(torch.randn(8, 64)).backward()
    torch._dynamo.reset()
    return time.perf_counter() - started


def every_block_target(rows: list[dict], every_block: dict, head_to_head: list[dict], graph: Graph) -> dict[str, Any]:
    """The fastest memsched point at no higher a peak than checkpointing every block, its
    step time relative to compiled plain's (the issue's target: at most 1.10) in the
    round-robin, and the plan at that peak against compiled plain in pairs. With them, the
    least recomputation any plan needs at that peak (`solvers.recompute_bound`), as a
    fraction of the keep-all step's time: by the graph's memory model (the solver's, every
    tensor allocated) and fused (inductor's external kernels' operands and results only,
    valid for the compiled step). A memsched plan at that peak runs at about compiled
    plain's speed times one plus its recomputation's fraction, so a fused bound near 0.10
    leaves the target no room."""
    within = [r for r in rows if r["kind"] == "memsched" and r["measured_peak_bytes"] <= every_block["measured_peak_bytes"]]
    best = min(within, key=lambda r: r["time_ms"], default=None)
    paired = next((pair for pair in head_to_head if pair["baseline"] == "compile plain"), None)
    return {"every_block_peak_bytes": every_block["measured_peak_bytes"],
            "every_block_time_vs_compiled_plain": every_block["time_vs_compiled_plain"],
            "memsched": None if best is None else best["method"],
            "memsched_time_vs_compiled_plain": None if best is None else best["time_vs_compiled_plain"],
            "paired": paired, "keep_all_time_ms": graph.total_time_ms,
            "recompute_lower_bound": {
                label: {**bound.to_json(), "fraction_of_keep_all": bound.time_ms / graph.total_time_ms}
                for label, bound in (("graph_memory", recompute_time_lower_bound(graph, every_block["measured_peak_bytes"])),
                                     ("fused", recompute_time_lower_bound(graph, every_block["measured_peak_bytes"],
                                                                          fused=True)))}}


def not_monotone(rows: list[dict]) -> list[str]:
    """Where a lower activation_memory_budget measured a higher peak, or ran faster."""
    budgets = sorted((r for r in rows if "activation_memory_budget" in r), key=lambda r: -r["activation_memory_budget"])
    notes = []
    for higher, lower in zip(budgets, budgets[1:]):
        if lower["measured_peak_bytes"] > higher["measured_peak_bytes"]:
            notes.append(f"budget {lower['activation_memory_budget']} peaks at {lower['measured_peak_bytes'] / MiB:.2f} "
                         f"MiB, above budget {higher['activation_memory_budget']}'s "
                         f"{higher['measured_peak_bytes'] / MiB:.2f} MiB")
    return notes


def paired_comparisons(methods: list[Method], repeats: int, every_block: Method) -> list[dict[str, Any]]:
    """Each baseline whose peak memsched was also planned at (compile's budgets, every-block
    checkpointing) timed against that memsched plan alone, and compiled plain against the
    memsched plan at every-block checkpointing's peak (the every-block target), each pair
    ``repeats`` rounds of the two steps in alternating order (A B, then B A: a drift in the
    machine's speed hits both alike), after one warm-up round. Reports the median of the
    per-round ratios memsched / baseline, their quartiles, and in how many rounds memsched
    was faster: a difference of a point is then read from paired samples, not from two
    medians of a long round-robin (where the every-block plan's time relative to compiled
    plain moved from 1.093 to 1.150 between two runs of one version)."""
    by_budget = {m.row["budget_bytes"]: m for m in methods if m.kind == "memsched" and m.row.get("at_baseline_peak")}
    pairs = []
    for baseline in methods:
        if baseline.kind == "memsched" or baseline.name in ("eager plain", "compile plain"):
            continue
        ours = by_budget.get(baseline.row["measured_peak_bytes"])
        if ours is not None:
            pairs.append((baseline, ours))
    compiled = next(m for m in methods if m.name == "compile plain")
    at_every_block = by_budget.get(every_block.row["measured_peak_bytes"])
    if at_every_block is not None:
        pairs.append((compiled, at_every_block))
    return [_paired(baseline, ours, repeats) for baseline, ours in pairs]


def _paired(baseline: Method, ours: Method, repeats: int) -> dict[str, Any]:
    """``ours`` against ``baseline`` in ``repeats`` alternating rounds (`paired_comparisons`)."""
    ratios = []
    for round_index in range(repeats + 1):
        order = (baseline, ours) if round_index % 2 == 0 else (ours, baseline)
        elapsed = {}
        for method in order:
            started = time.perf_counter()
            method.step()
            elapsed[method.name] = time.perf_counter() - started
        if round_index:
            ratios.append(elapsed[ours.name] / elapsed[baseline.name])
    quartiles = statistics.quantiles(ratios, n=4)
    result = {"baseline": baseline.name, "baseline_peak_bytes": baseline.row["measured_peak_bytes"],
              "memsched": ours.name, "memsched_peak_bytes": ours.row["measured_peak_bytes"],
              "median_time_ratio": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]],
              "rounds_memsched_faster": sum(r < 1 for r in ratios), "rounds": len(ratios)}
    log.info("  %-32s vs %s: memsched / baseline %.3f (quartiles %.3f-%.3f), faster in %d of %d rounds",
             baseline.name, ours.name, result["median_time_ratio"], quartiles[0], quartiles[2],
             result["rounds_memsched_faster"], len(ratios))
    return result


def dominance(rows: list[dict]) -> list[dict]:
    """For each torch.compile point, the fastest memsched point at no higher a peak."""
    memsched = [r for r in rows if r["kind"] == "memsched"]
    result = []
    for row in rows:
        if row["kind"] != "compile":
            continue
        within = [m for m in memsched if m["measured_peak_bytes"] <= row["measured_peak_bytes"]]
        best = min(within, key=lambda m: m["time_ms"], default=None)
        result.append({"compile": row["method"], "compile_peak_bytes": row["measured_peak_bytes"],
                       "compile_time_ms": row["time_ms"], "memsched": None if best is None else best["method"],
                       "memsched_time_ms": None if best is None else best["time_ms"],
                       "memsched_faster": None if best is None else best["time_ms"] < row["time_ms"]})
    return result


def plot(results: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = list(results["models"].values())
    figure, axes = plt.subplots(1, len(entries), figsize=(5.5 * len(entries), 4.2), squeeze=False)
    for axis, entry in zip(axes[0], entries):
        rows = entry["rows"]
        for kind, color, label in (("compile", "C0", "torch.compile, activation_memory_budget"),
                                   ("memsched", "C3", "memsched compile=True")):
            points = sorted((r for r in rows if r["kind"] == kind and r["method"] != "compile plain"),
                            key=lambda r: r["measured_peak_bytes"])
            axis.plot([r["measured_peak_bytes"] / MiB for r in points], [r["time_vs_compiled_plain"] for r in points],
                      marker="o", color=color, label=label)
            for r in points:
                if kind == "compile":
                    axis.annotate(str(r["activation_memory_budget"]), (r["measured_peak_bytes"] / MiB,
                                  r["time_vs_compiled_plain"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for method, marker, color in (("compile plain", "*", "k"), ("eager plain", "s", "C7"),
                                      ("checkpoint every block (eager)", "D", "C3")):
            row = next((r for r in rows if r["method"] == method), None)
            if row is None:                      # results written before that baseline existed
                continue
            axis.plot(row["measured_peak_bytes"] / MiB, row["time_vs_compiled_plain"], marker=marker, markersize=10,
                      linestyle="none", color=color, label=method)
        label_axis(axis, entry, "measured peak (MiB, allocator events)", "step time / compiled plain's")
    figure.tight_layout()
    figure.savefig(RESULTS / "vs_torch_compile.png", dpi=120)
    plt.close(figure)


def markdown_table(results: dict[str, Any], names: list[str]) -> str:
    lines = ["| model | method | peak (MiB) | peak / compiled plain | time / compiled plain | compile (s) | "
             "max abs grad diff vs compiled plain / eager |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        for row in results["models"][name]["rows"]:
            flags = ("" if row.get("allclose_vs_compiled_plain", True) else " (gradients differ)") + (
                " **(over budget)**" if row.get("within_budget") is False else "")
            compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else ""
            lines.append(f"| {name} | {row['method']}{flags} | {row['measured_peak_bytes'] / MiB:.2f} | "
                         f"{row['peak_vs_compiled_plain']:.3f} | {row['time_vs_compiled_plain']:.3f} | {compile_s} | "
                         f"{row.get('max_abs_difference_vs_compiled_plain', 0):.1e} / "
                         f"{row.get('max_abs_difference_vs_eager', 0):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["gpt", "resnet", "gpt2"], default=["gpt", "resnet"])
    parser.add_argument("--budgets", type=int, default=6)
    parser.add_argument("--no-at-peaks", dest="at_peaks", action="store_false",
                        help="plan memsched at the sweep's budgets only, not also at each peak a baseline reached")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pair-repeats", type=int, default=20,
                        help="rounds of each baseline against memsched at its peak, timed in pairs (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse (as CUDA's caching allocator does) instead of "
                             "returning it to the OS, so that no method's kernels fault in fresh pages that "
                             "another method's free pattern reuses (experiments/real_models.py)")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()          # returns once the settings are in effect
    if args.pair_repeats == 1:
        parser.error("--pair-repeats: 0 (no paired timing) or at least 2 (quartiles need two rounds)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch._inductor.config.fallback_random = True
    # compiled plain, five compile budgets and compiled plain twice more: eight compilations
    # of the model's forward, dynamo's default limit before it falls back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    path = RESULTS / "vs_torch_compile.json"
    results = json.loads(path.read_text()) if path.exists() else {"models": {}}
    warmup_s = warm_up_inductor()
    log.info("inductor warmed up in %.1f s (a small function compiled, not timed against anything)", warmup_s)
    for name in args.models:
        results["models"][name] = run_model(name, args)
        results["models"][name]["inductor_warmup_s"] = warmup_s
        target = results["models"][name]["compile_time_target"]
        log.info("%s: compile time within %.1fx of compiled plain's (median of %s s) at %d of %d budgets", name,
                 COMPILE_TIME_TARGET, ", ".join(f"{s:.1f}" for s in target["compile_plain_s"]),
                 target["within"], target["of"])
        results.update(git_revision=git_revision(), device=device_description(),
                       inductor_cache_dir=os.environ["TORCHINDUCTOR_CACHE_DIR"])
        write_results("vs_torch_compile", results, plot)
        gc.collect()
        torch._dynamo.reset()
    print(markdown_table(results, args.models), flush=True)
    violations = sum(results["models"][name]["violations"] for name in args.models)
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
