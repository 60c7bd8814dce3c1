"""memsched on five real-size Hugging Face models, against plain eager, HF gradient
checkpointing, torch.utils.checkpoint around every block and torch.compile's memory budget.

Each model is built from its transformers config (random weights, no download, dropout off,
``use_cache=False`` on the decoders as in training) and trained for one step,
``loss = model(**batch).loss; loss.backward()`` (the logits dropped before the backward, as
in transformers' Trainer; memsched plans with ``release_outputs=True``):

    gpt2      GPT2LMHeadModel (124 M)                 input_ids, labels [2, 256]
    gpt2-2k   the same at [4, 512], where the loss sets the floor (not in the default list)
    bert      BertForMaskedLM (110 M)                 input_ids, labels [2, 256]
    llama     LlamaForCausalLM, 12 x 768, GQA 12/4    input_ids, labels [2, 256]
    vit       ViTForImageClassification (ViT-B/16)    pixel_values [4, 3, 224, 224], labels [4]
    resnet50  ResNetForImageClassification            pixel_values [8, 3, 224, 224], labels [8]

Methods, all on the same parameters in one process:

    plain                  the eager step
    hf-checkpointing       model.gradient_checkpointing_enable(use_reentrant=False)
    torch-checkpoint       torch.utils.checkpoint (non-reentrant) around every layer
                           (every stage of ResNet-50)
    compile-0.5, -0.1      torch.compile (inductor) with activation_memory_budget 0.5 / 0.1
                           (only with --compile: slow on a CPU)
    memsched               one plan per budget: --budgets points from memsched's floor to
                           0.9 of the plain step's measured peak, and one at the measured
                           peak of each checkpointing method, and one per --fractions
                           share of the step's activation memory (`planner.budget`)
    memsched+chunked loss  with --chunked-loss, on the language models: the step with its
                           head and cross-entropy chunked (`planner.chunked_loss`), planned
                           at its own floor, at the checkpointing methods' peaks, at the
                           --fractions budgets above (the same bytes) and at --budgets
                           points between its floor and memsched's; its overheads are
                           against the plain step as every other's

Peaks are measured from the allocator's events (`planner.memory.measure_allocator_peak`;
parameters, buffers, inputs and gradients included), after one warm-up step that also
checks the loss, every gradient and every buffer against the plain step. Times are medians
of steps run round-robin (`planner.benchmark.step_times_ms`); overheads are ratios to the
plain step of the same rounds.

    python experiments/real_models.py [--models gpt2 bert llama vit resnet50] [--repeats 3]
        [--budgets 6] [--fractions 0.2 0.3] [--compile] [--chunked-loss] [--small] [--threads 2]
        [--keep-freed-memory]

Writes experiments/results/real_models.json (real_models_small.json with --small), one
entry per model, replacing the entries of the models run and keeping the others (each
entry has its own command, git revision and device), one Pareto plot per model
(real_models_<model>.png), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from common import RESULTS, device_description, git_revision, label_axis, write_results
from planner.benchmark import step_times_ms
from planner.budget import resolve_budget
from planner.capture import capture
from planner.chunked_loss import chunk_linear_cross_entropy
from planner.errors import OptionError
from planner.memory import measure_allocator_peak
from planner.profile import profile, with_released_outputs
from runtime.module import ScheduledModule
from solvers.errors import InfeasibleBudgetError
from solvers.portfolio import solve

log = logging.getLogger("real_models")

MiB = 2**20
SEED = 0
GRADIENT_SEED = 7
COMPILE_BUDGETS = (0.5, 0.1)
# memsched's highest sweep budget, as a fraction of the plain step's measured peak
TOP_FRACTION = 0.9
# room above memsched's floor for the solvers' rounding of bytes to memory units
FLOOR_MARGIN = 1.002


# --------------------------------------------------------------------------- models


@dataclass
class Workload:
    """A model in training mode, one batch of keyword inputs and the modules a
    per-block checkpoint wraps."""

    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    blocks: list[torch.nn.Module]
    description: str


def _token_batch(vocab_size: int, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _image_batch(num_labels: int, batch: int, size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator),
            "labels": torch.randint(0, num_labels, (batch,), generator=generator)}


def build_gpt2(small: bool, batch_size: int = 2, tokens: int = 256) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel
    sizes = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64) if small else {}
    config = GPT2Config(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, use_cache=False, **sizes)
    model = GPT2LMHeadModel(config)
    tokens = 32 if small else tokens
    return Workload(model, _token_batch(config.vocab_size, batch_size, tokens), list(model.transformer.h),
                    f"GPT2LMHeadModel {config.n_layer} x {config.n_embd}, batch {batch_size} x {tokens} tokens")


def build_gpt2_2k(small: bool) -> Workload:
    """GPT-2 small at 4 x 512 tokens, where the loss's logits-sized tensors set the floor."""
    return build_gpt2(small, batch_size=4, tokens=512)


def build_bert(small: bool) -> Workload:
    from transformers import BertConfig, BertForMaskedLM
    sizes = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 vocab_size=1000, max_position_embeddings=64) if small else {}
    config = BertConfig(hidden_dropout_prob=0, attention_probs_dropout_prob=0, use_cache=False, **sizes)
    model = BertForMaskedLM(config)
    tokens = 32 if small else 256
    return Workload(model, _token_batch(config.vocab_size, 2, tokens), list(model.bert.encoder.layer),
                    f"BertForMaskedLM {config.num_hidden_layers} x {config.hidden_size}, batch 2 x {tokens} tokens")


def build_llama(small: bool) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM
    sizes = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64) if small else
             dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000))
    config = LlamaConfig(tie_word_embeddings=False, use_cache=False, **sizes)
    model = LlamaForCausalLM(config)
    tokens = 32 if small else 256
    return Workload(model, _token_batch(config.vocab_size, 2, tokens), list(model.model.layers),
                    f"LlamaForCausalLM {config.num_hidden_layers} x {config.hidden_size}, "
                    f"{config.num_attention_heads}/{config.num_key_value_heads} heads, batch 2 x {tokens} tokens")


def build_vit(small: bool) -> Workload:
    from transformers import ViTConfig, ViTForImageClassification
    sizes = dict(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128) if small else {}
    config = ViTConfig(hidden_dropout_prob=0, attention_probs_dropout_prob=0, **sizes)
    model = ViTForImageClassification(config)
    # transformers 5 holds the layers in vit.layers, 4.x in vit.encoder.layer
    layers = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
    return Workload(model, _image_batch(config.num_labels, 4, config.image_size), list(layers),
                    f"ViTForImageClassification {config.num_hidden_layers} x {config.hidden_size}, "
                    f"patch {config.patch_size}, batch 4 x 3 x {config.image_size}^2")


def build_resnet50(small: bool) -> Workload:
    from transformers import ResNetConfig, ResNetForImageClassification
    sizes = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]) if small else {}
    config = ResNetConfig(**sizes)
    model = ResNetForImageClassification(config)
    size = 64 if small else 224
    return Workload(model, _image_batch(config.num_labels, 8, size), list(model.resnet.encoder.stages),
                    f"ResNetForImageClassification depths {config.depths}, batch 8 x 3 x {size}^2")


BUILDERS: dict[str, Callable[[bool], Workload]] = {
    "gpt2": build_gpt2, "bert": build_bert, "llama": build_llama, "vit": build_vit, "resnet50": build_resnet50,
    "gpt2-2k": build_gpt2_2k}
DEFAULT_MODELS = ["gpt2", "bert", "llama", "vit", "resnet50"]


# --------------------------------------------------------------------------- steps and methods


def train_step(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward + backward keeping only the loss, as transformers' Trainer does (its
    ``compute_loss`` drops the other outputs before ``backward``): the logits are freed
    after the forward in every method. memsched plans for it (``release_outputs=True``)."""
    loss = module(**batch).loss
    loss.backward()
    return loss.detach()


@contextlib.contextmanager
def checkpointed_forwards(blocks: list[torch.nn.Module]) -> Iterator[None]:
    """Run every block's forward under non-reentrant ``torch.utils.checkpoint`` (keyword
    arguments pass through) while inside; the class's forward comes back on exit."""
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextlib.contextmanager
def hf_gradient_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """transformers' own checkpointing, non-reentrant, while inside (``activation_checkpointing_*``
    from transformers 5, ``gradient_checkpointing_*`` before). Enabling it on a text model
    also hooks the input embeddings (``enable_input_require_grads``), which disabling leaves
    in place; the hook is removed here, so that hooks do not pile up (and torch.compile's
    guards, which count them, keep holding)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()


def inductor_at_budget(fraction: float) -> Callable:
    """Inductor with ``activation_memory_budget=fraction`` for the partition of every graph it
    compiles. A backend object of its own per budget: dynamo keeps the compiled code of two
    budgets apart (its guards match the backend), so both run in one round-robin."""
    from torch._inductor.compile_fx import compile_fx

    def backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        with torch._functorch.config.patch(activation_memory_budget=fraction):
            return compile_fx(graph_module, example_inputs)
    return backend


@dataclass
class Method:
    name: str
    step: Callable[[], torch.Tensor]        # one training step; gradients set to None before
    plan: Any = None                        # memsched's Plan
    budget_bytes: int | None = None         # memsched's budget
    budget_source: str = ""                 # "sweep", the method whose peak it matches, or "N% of activations"
    row: dict[str, Any] = field(default_factory=dict)


class Snapshot:
    """The loss, gradients and buffers after one seeded step from the same buffers."""

    def __init__(self, model: torch.nn.Module, buffers: dict[str, torch.Tensor], step: Callable[[], torch.Tensor]):
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        model.zero_grad(set_to_none=True)
        torch.manual_seed(GRADIENT_SEED)
        self.loss = step()
        self.gradients = {name: None if p.grad is None else p.grad.detach().clone()
                          for name, p in model.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.zero_grad(set_to_none=True)

    def mismatches(self, reference: Snapshot) -> tuple[str | None, str | None]:
        """The first difference from ``reference`` in the loss or a gradient, and the first in
        a buffer (assert_close's messages), or None."""
        gradients = [("loss", self.loss, reference.loss)]
        gradients += [(f"grad {name}", g, reference.gradients[name]) for name, g in self.gradients.items()]
        buffers = [(f"buffer {name}", b, reference.buffers[name]) for name, b in self.buffers.items()]
        return _first_difference(gradients), _first_difference(buffers)


def _first_difference(pairs: list[tuple[str, Any, Any]]) -> str | None:
    for label, actual, expected in pairs:
        try:
            torch.testing.assert_close(actual, expected)
        except AssertionError as error:
            return f"{label}: {' '.join(str(error).split())}"
    return None


def measure(model: torch.nn.Module, resident: list[torch.Tensor], buffers: dict[str, torch.Tensor],
            reference: Snapshot, method: Method) -> None:
    """Warm-up step with the equality check, then the measured one; fills ``method.row``."""
    started = time.perf_counter()
    gradient_mismatch, buffer_mismatch = Snapshot(model, buffers, method.step).mismatches(reference)
    warmup_s = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    _, peak = measure_allocator_peak(method.step, resident)
    model.zero_grad(set_to_none=True)
    method.row.update(method=method.name, measured_peak_bytes=peak, same_gradients=gradient_mismatch is None,
                      same_buffers=buffer_mismatch is None, first_warmup_s=warmup_s)
    for kind, mismatch in (("gradient", gradient_mismatch), ("buffer", buffer_mismatch)):
        if mismatch is not None:
            method.row[f"{kind}_mismatch"] = mismatch
            log.warning("%s: %s differs from the plain step's: %s", method.name, kind, mismatch[:300])
    if method.plan is not None:
        method.row.update(budget_bytes=method.budget_bytes, budget_source=method.budget_source,
                          solver=method.plan.solver, predicted_peak_bytes=method.plan.predicted_peak_bytes,
                          predicted_overhead=method.plan.overhead, solve_s=method.plan.solve_time_s,
                          within_budget=peak <= method.budget_bytes)
    log.info("  %-28s peak %9.1f MiB%s", method.name, peak / MiB,
             "" if method.plan is None else f" (budget {method.budget_bytes / MiB:.2f}, predicted "
                                            f"{method.plan.predicted_peak_bytes / MiB:.2f} MiB)")


# --------------------------------------------------------------------------- one model


def sweep_budgets(low: int, plain_peak_bytes: int, count: int) -> list[int]:
    """``count`` budgets from ``low`` (the solvers' floor) to `TOP_FRACTION` of the plain peak,
    or to the plain peak where the floor is above that fraction (BERT, Llama)."""
    high = int(TOP_FRACTION * plain_peak_bytes)
    if high <= low:
        high = max(low, plain_peak_bytes)
    if count == 1:
        return [low]
    return sorted({low + (high - low) * i // (count - 1) for i in range(count)})


def solvers_floor(graph: Any) -> tuple[int, int, dict[str, int]]:
    """The least budget the auto solvers meet (with `FLOOR_MARGIN`), the proved lower bound
    below it, and what the bound is made of."""
    try:
        solve(graph, 1, "auto")
        raise AssertionError("a 1-byte budget was feasible")
    except InfeasibleBudgetError as error:
        bound_bytes, breakdown = error.least_feasible_bytes, error.breakdown
    budget_bytes = int(bound_bytes * FLOOR_MARGIN)
    while True:
        try:
            solve(graph, budget_bytes, "auto")
            return budget_bytes, bound_bytes, breakdown
        except InfeasibleBudgetError as error:
            if error.least_feasible_bytes <= budget_bytes:
                raise
            log.info("  no plan at %.2f MiB; the solvers' least feasible is %.2f MiB", budget_bytes / MiB,
                     error.least_feasible_bytes / MiB)
            budget_bytes = int(error.least_feasible_bytes * FLOOR_MARGIN)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(SEED)
    workload = BUILDERS[name](args.small)
    model, batch = workload.model, workload.batch
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    log.info("%s: %s, %.1f M parameters", name, workload.description, parameters / 1e6)
    resident = list(model.parameters()) + list(model.buffers()) + list(batch.values())
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def plain_step() -> torch.Tensor:
        return train_step(model, batch)

    def hf_step() -> torch.Tensor:
        with hf_gradient_checkpointing(model):
            return train_step(model, batch)

    def block_step() -> torch.Tensor:
        with checkpointed_forwards(workload.blocks):
            return train_step(model, batch)

    hf_supported = getattr(model, "supports_gradient_checkpointing", False)
    if hf_supported:
        # once on and off before anything is measured or compiled: it leaves per-layer
        # attributes behind, which torch.compile's guards would otherwise see change
        with hf_gradient_checkpointing(model):
            pass
    reference = Snapshot(model, buffers, plain_step)
    plain = Method("plain", plain_step)
    methods = [plain]
    skipped: dict[str, str] = {}
    if hf_supported:
        methods.append(Method("hf-checkpointing", hf_step))
    else:
        skipped["hf-checkpointing"] = f"not supported: {type(model).__name__}.supports_gradient_checkpointing is False"
    methods.append(Method(f"torch-checkpoint ({len(workload.blocks)} blocks)", block_step))
    for fraction in COMPILE_BUDGETS:
        label = f"compile-{fraction}"
        if not args.compile:
            skipped[label] = "not run (pass --compile)"
            continue
        compiled = torch.compile(model, backend=inductor_at_budget(fraction))
        methods.append(Method(label, partial(train_step, compiled, batch)))
    for method in methods:
        started = time.perf_counter()
        measure(model, resident, buffers, reference, method)
        if method.name.startswith("compile"):
            method.row["compile_s"] = method.row["first_warmup_s"]
            log.info("  %s compiled and ran its first step in %.0f s", method.name, time.perf_counter() - started)
    plain_peak = plain.row["measured_peak_bytes"]

    # memsched: what optimize() does, with one capture and profile for every budget
    started = time.perf_counter()
    step = capture(model, (), batch)
    capture_s = time.perf_counter() - started
    started = time.perf_counter()
    graph = with_released_outputs(profile(step, model, (), batch, progress=False), step)
    profile_s = time.perf_counter() - started
    log.info("  memsched traced %d ops in %.1f s, profiled in %.1f s", len(graph.ops), capture_s, profile_s)
    floor_bytes, bound_bytes, bound_breakdown = solvers_floor(graph)
    log.info("  memsched floor %.2f MiB (lower bound %.2f MiB)", floor_bytes / MiB, bound_bytes / MiB)
    targets = [(budget, "sweep") for budget in sweep_budgets(floor_bytes, plain_peak, args.budgets)]
    targets += [(m.row["measured_peak_bytes"], m.name) for m in methods if m is not plain]
    targets += [(resolve_budget(fraction, graph).budget_bytes, f"{fraction:.0%} of activations")
                for fraction in args.fractions]
    infeasible = []
    solve_wall_s = {}
    for index, (budget, source) in enumerate(targets):
        started = time.perf_counter()
        try:
            plan = solve(graph, budget, "auto")
        except InfeasibleBudgetError as error:
            infeasible.append({"budget_bytes": budget, "budget_source": source,
                               "error": str(error).splitlines()[0]})
            log.info("  memsched at %.2f MiB (%s): infeasible", budget / MiB, source)
            continue
        solved_s = time.perf_counter() - started
        scheduled = ScheduledModule(model, step, graph, plan)
        build_s = time.perf_counter() - started - solved_s
        label = f"memsched @ {budget / MiB:.2f} MiB" + (
            "" if source == "sweep" else f" ({source})" if source.endswith("of activations") else f" (= {source} peak)")
        if label in solve_wall_s:          # two budgets within 0.005 MiB (tiny models)
            label += f" [{index}]"
        solve_wall_s[label] = {"solve_s": solved_s, "build_s": build_s}
        methods.append(Method(label, partial(train_step, scheduled, batch), plan, budget, source))
    chunked = {}
    if args.chunked_loss:
        chunked = chunked_loss_methods(model, batch, graph, floor_bytes, methods, targets, skipped)
        solve_wall_s.update({label: times for label, (_, times) in chunked.items()})
        methods += [method for method, _ in chunked.values()]
    for method in methods:
        if method.plan is not None:
            measure(model, resident, buffers, reference, method)
            method.row.update(solve_wall_s[method.name])
            if method.name in chunked:
                method.row.update(chunked_loss=True,
                                  predicted_overhead=method.plan.predicted_time_ms / graph.total_time_ms - 1)

    log.info("  timing %d methods round-robin, %d repeats", len(methods), args.repeats)

    def timed(method: Method) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            return method.step()
        return run

    times = step_times_ms({m.name: timed(m) for m in methods}, repeats=args.repeats, warmup=1)
    for method in methods:
        method.row.update(time_ms=times[method.name], measured_overhead=times[method.name] / times["plain"] - 1,
                          peak_ratio=method.row["measured_peak_bytes"] / plain_peak)
    model.zero_grad(set_to_none=True)

    rows = [m.row for m in methods]
    memsched_rows = [r for r in rows if "budget_bytes" in r]
    middle = sorted((r for r in memsched_rows if r["budget_source"] == "sweep"), key=lambda r: r["budget_bytes"])
    middle = middle[len(middle) // 2] if middle else None
    optimize_s = None if middle is None else {
        "capture_s": capture_s, "profile_s": profile_s, "solve_s": middle["solve_s"], "build_s": middle["build_s"],
        "total_s": capture_s + profile_s + middle["solve_s"] + middle["build_s"], "at_budget_bytes": middle["budget_bytes"]}
    for row in rows:
        log.info("  %-34s %9.1f MiB  x%.3f  overhead %+6.1f %%%s", row["method"], row["measured_peak_bytes"] / MiB,
                 row["peak_ratio"], 100 * row["measured_overhead"],
                 f" (predicted {100 * row['predicted_overhead']:+.1f} %)" if "predicted_overhead" in row else "")
    result = {"model": name, "description": workload.description, "parameters": parameters,
              "inputs": {k: list(v.shape) for k, v in batch.items()},
              "command": " ".join(["python", "experiments/real_models.py", *sys.argv[1:]]),
              "git_revision": git_revision(), "device": device_description(), "torch": torch.__version__,
              "transformers": _transformers_version(), "repeats": args.repeats,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
              "malloc_env": {name: os.environ[name] for name in KEEP_FREED_MEMORY_ENV if name in os.environ},
              "plain_peak_bytes": plain_peak, "memsched_floor_bytes": floor_bytes,
              "memsched_lower_bound_bytes": bound_bytes, "memsched_lower_bound_breakdown": bound_breakdown, "graph_ops": len(graph.ops),
              "optimize_s": optimize_s, "rows": rows, "skipped": skipped, "memsched_infeasible": infeasible,
              "violations": sum(1 for r in memsched_rows if not r["within_budget"]),
              "gradient_mismatches": sum(1 for r in rows if not r["same_gradients"]),
              "buffer_mismatches": sum(1 for r in rows if not r["same_buffers"])}
    return result


def chunked_loss_methods(model: torch.nn.Module, batch: dict[str, torch.Tensor], graph: Any, floor_bytes: int,
                         methods: list[Method], targets: list[tuple[int, str]],
                         skipped: dict[str, str]) -> dict[str, tuple[Method, dict[str, float]]]:
    """memsched with the loss chunked (module docstring): its methods by label, each with its
    solve and build times. A model whose step has no linear + cross-entropy region is
    noted in ``skipped``."""
    step = capture(model, (), batch)
    try:
        chunk_linear_cross_entropy(step)
    except OptionError as error:
        skipped["memsched+chunked loss"] = str(error)
        return {}
    chunked_graph = with_released_outputs(profile(step, model, (), batch, progress=False), step)
    chunked_floor, _, _ = solvers_floor(chunked_graph)
    log.info("  memsched+chunked loss: floor %.2f MiB", chunked_floor / MiB)
    budgets = [(chunked_floor, "floor")]
    budgets += [(budget, source) for budget, source in targets if source != "sweep"]
    budgets += [(chunked_floor + (floor_bytes - chunked_floor) * share // 3, "sweep") for share in (1, 2)
                if floor_bytes > chunked_floor]
    found: dict[str, tuple[Method, dict[str, float]]] = {}
    for budget, source in budgets:
        started = time.perf_counter()
        try:
            plan = solve(chunked_graph, budget, "auto")
        except InfeasibleBudgetError as error:
            log.info("  memsched+chunked loss at %.2f MiB (%s): infeasible: %s", budget / MiB, source,
                     str(error).splitlines()[0])
            continue
        solved_s = time.perf_counter() - started
        scheduled = ScheduledModule(model, step, chunked_graph, plan)
        label = f"memsched+chunked loss @ {budget / MiB:.2f} MiB" + (
            "" if source == "sweep" else f" ({source})" if source in ("floor",) or source.endswith("of activations")
            else f" (= {source} peak)")
        found[label] = (Method(label, partial(train_step, scheduled, batch), plan, budget, source),
                        {"solve_s": solved_s, "build_s": time.perf_counter() - started - solved_s})
    return found


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


# --------------------------------------------------------------------------- output


def plot(results: dict[str, Any], stem: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = {"plain": "o", "hf-checkpointing": "s", "torch-checkpoint": "D", "compile-0.5": "^", "compile-0.1": "v"}
    for name, entry in results["models"].items():
        figure, axis = plt.subplots(figsize=(6, 4))
        sweep = sorted((r for r in entry["rows"] if r.get("budget_source") == "sweep" and not r.get("chunked_loss")),
                       key=lambda r: r["measured_peak_bytes"])
        chunked = sorted((r for r in entry["rows"] if r.get("chunked_loss")), key=lambda r: r["measured_peak_bytes"])
        if chunked:
            axis.plot([r["measured_peak_bytes"] / MiB for r in chunked],
                      [100 * r["measured_overhead"] for r in chunked], marker="P", color="C2",
                      label="memsched, loss chunked")
        axis.plot([r["measured_peak_bytes"] / MiB for r in sweep], [100 * r["measured_overhead"] for r in sweep],
                  marker=".", color="C3", label="memsched (budget sweep)")
        axis.plot([r["measured_peak_bytes"] / MiB for r in sweep], [100 * r["predicted_overhead"] for r in sweep],
                  linestyle="--", color="C3", alpha=0.5, label="memsched, predicted overhead")
        for row in entry["rows"]:
            x, y = row["measured_peak_bytes"] / MiB, 100 * row["measured_overhead"]
            if row.get("budget_source") == "sweep" or row.get("chunked_loss"):
                continue
            if "budget_bytes" in row:
                axis.plot(x, y, marker="*", markersize=11, color="C3", linestyle="none")
                source = row["budget_source"]
                text = f"memsched at {source}" if source.endswith("of activations") else \
                    f"memsched at {source.split(' (')[0]} peak"
                axis.annotate(text, (x, y), fontsize=7,
                              xytext=(4, 4), textcoords="offset points")
                continue
            kind = row["method"].split(" (")[0]
            axis.plot(x, y, marker=markers.get(kind, "x"), markersize=8, linestyle="none", label=row["method"])
        label_axis(axis, entry, "measured peak (MiB)", "measured time overhead vs plain (%)")
        figure.tight_layout()
        figure.savefig(RESULTS / f"{stem}_{name}.png", dpi=120)
        plt.close(figure)


def markdown_table(results: dict[str, Any], names: list[str]) -> str:
    lines = ["| model | method | measured peak (MiB) | vs plain | overhead measured / predicted |",
             "|---|---|---:|---:|---:|"]
    for name in names:
        entry = results["models"][name]
        for row in entry["rows"]:
            predicted = f" / {100 * row['predicted_overhead']:+.1f} %" if "predicted_overhead" in row else ""
            flags = ("" if row["same_gradients"] else " **(gradients differ)**") + (
                "" if row["same_buffers"] else " (buffers differ)") + (
                " **(over budget)**" if row.get("within_budget") is False else "")
            lines.append(f"| {name} | {row['method']}{flags} | {row['measured_peak_bytes'] / MiB:.1f} | "
                         f"{row['peak_ratio']:.2f} | {100 * row['measured_overhead']:+.1f} %{predicted} |")
        for method, why in entry["skipped"].items():
            lines.append(f"| {name} | {method} | {why} | | |")
    return "\n".join(lines)


KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(10**11),
                         "MALLOC_TOP_PAD_": str(2**30)}


def keep_freed_memory() -> None:
    """Run again with glibc's thresholds fixed (they are read at start-up): blocks come
    from the heap and freed heap is kept for reuse, not returned to the OS. By default the
    thresholds move with the free pattern, so one method's memory-bound kernels fault in
    fresh pages on every step while another's reuse warm ones (GPT-2 small, 1 thread:
    plain 5,141 ms and memsched 4,730 ms by default, 4,554 and 4,638 ms with these settings;
    results/real_models_gpt2_default_malloc.json against results/real_models.json).
    """
    if all(os.environ.get(name) == value for name, value in KEEP_FREED_MEMORY_ENV.items()):
        return
    os.environ.update(KEEP_FREED_MEMORY_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), default=DEFAULT_MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=int, default=6)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.2, 0.3],
                        help="also plan at these shares of the step's activation memory (memsched's fraction budgets)")
    parser.add_argument("--compile", action="store_true", help="also run torch.compile (slow on CPU)")
    parser.add_argument("--chunked-loss", action="store_true",
                        help="also plan the language models with their loss chunked (planner.chunked_loss)")
    parser.add_argument("--small", action="store_true", help="tiny configs, for a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse instead of returning it to the OS (mallopt), so "
                             "that no method's times carry page faults another method's free pattern avoids")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()          # returns once the settings are in effect
    if args.budgets < 1:
        parser.error("--budgets must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    stem = "real_models_small" if args.small else "real_models"
    path = RESULTS / f"{stem}.json"
    results = json.loads(path.read_text()) if path.exists() else {"models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args)
        results.update(command=results["models"][name]["command"], git_revision=git_revision(),
                       device=device_description())
        write_results(stem, results, lambda saved: plot(saved, stem))
        gc.collect()
        torch._dynamo.reset()
    print(markdown_table(results, args.models), flush=True)
    violations = sum(results["models"][name]["violations"] for name in args.models)
    mismatches = sum(results["models"][name]["gradient_mismatches"] for name in args.models)
    return 0 if violations == 0 and mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
