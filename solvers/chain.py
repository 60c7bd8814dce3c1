"""``chain``: the Rotor dynamic program over the chain of segments, with multiple recomputation.

Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova, "Optimal checkpointing for heterogeneous
chains: how to train deep neural networks with limited memory" (2019): a Revolve-like
schedule where a stage's forward may run several times during the backward. Revolve
(Griewank & Walther, "Algorithm 799: revolve", ACM TOMS 2000) is the optimum for chains of
identical stages; Rotor's DP is the optimum for stages of different costs and sizes.

Stages are the segments of `kernel.segments.segment_chain`. Stage k has forward time ``uf[k]``,
backward time ``ub[k]``, input bytes ``x[k]`` (the storages produced by stage k - 1 that stage
k reads: what must be kept to run it again), ``xbar[k]`` (what a forward "with all saved"
keeps for the backward, its output ``x[k + 1]`` included), ``act[k]`` (the highest bytes
of its own storages while F(k) runs "all", by liveness inside the stage: each storage alive
from its op to its last read there, or to the end when kept; ``sweep[k]`` the same for
F(k) run "checkpoint only", keeping just ``x[k + 1]``), ``bw[k]`` (what B(k) holds besides
``x[k]``: the storages of F(k) it reads, each until its last read in B(k); the storages its
backward ops make, each until its last read in B(k) or, where an earlier stage's backward
reads it, to B(k)'s end; ``dx[k + 1]`` for the gradient it starts from; its workspace),
``dx[k]`` (what the backward of stages >= k makes that the backward of stages < k reads:
the gradient of ``x[k]``) and ``g[k]`` (the step's parameter gradients B(k) makes, alive to
the end of the step). Storages that are always kept: skip tensors (read more than one stage
after the one that makes them), outputs of ops that cannot run twice (buffer updates),
forward outputs; they are a constant. A forward output the caller drops before the
backward (``graph.released_outputs``: a language model's logits) is not: it counts in
``act`` and ``sweep`` of the stages after it (alive through the forward phase), and is no
stage's ``x`` (no backward reads it; its gradient is in ``dx``). Where no backward op reads
``x[k]``, B(k) runs without it.

DP. ``opt(s, t, m)``: least time to run the backward of stages s..t with memory ``m`` (in
slots, ``x[s]`` stored, the gradient ``dx[t + 1]`` alive, the gradients ``g`` of the
stages after t made):

    s == t:   uf[s] + ub[s]                                   F_all(s), B(s)
              ub[s] alone when B(s) reads nothing F(s) makes (a linear layer's backward
              reads its input only); the re-run is then dropped from the program
    "all":    uf[s] + opt(s + 1, t, m - x[s] - xbar[s] + x[s + 1]) + ub[s]
              B(s) needs x[s] + bw[s] + g[s] + g[s+1..t] <= m (without x[s] where
              no backward op reads it), F(s) x[s] + act[s] + dx[t + 1] <= m
    "ck" j:   uf[s..j-1] + opt(j, t, m - x[s]) + opt(s, j - 1, m - g[j..t])   s < j <= t

each option only where its transient memory fits. With one stage per op (``every_op``) the
DP's plans lie in the exact solvers' space; on a uniform chain its optimum is the MILP's
proved one, and on random chains almost always (tests/test_chain.py). The exception: the
DP builds persistent schedules only (a stored checkpoint stays until the backward of the
stages after it is done), while the MILP may free a checkpoint early and make it again from
an earlier one on the way to values the backward needs anyway. Sizes are rounded up and
the memory down to slots of ``budget / resolution`` bytes (safe side). O(L^3 * U) time and
O(L^2 * U) memory for L stages and U = resolution slots; the table for every m is built
once.

Stage options (Rockmate: Zhao, Le Hellard, Eyraud-Dubois, Gusak, Beaumont, ICML 2023, where
each block of the Rotor chain has several schedules): with ``options_per_segment > 1`` a
stage run "all" (alone or before ``opt(s + 1, ..)``) may also drop some of its own saved
storages after F(s) and recompute them inside B(s), just in time (`backward_program`, with
recomputed values carried to their last read or made again for each reader). Option o
replaces xbar, act, bw by its own (fewer storages kept; B(s)'s peak counts the recomputed
values by liveness) and adds its recomputation time to ub[s]; the drop sets are
`kernel.options.segment_options`' prefixes. Option 0 keeps everything, so the DP with
options is never worse under its model. O(L^2 * U * (L + O)) time for O options per stage.

Program. The optimal sequence starts with one forward sweep F(0)..F(L-1) (the forward
phase runs every forward op once, in order); the rest is the backward phase: F(k) runs
stage k's recomputable forward ops, B(k) its backward ops. What each phase keeps follows
from liveness (`kernel.program.insert_frees`): a value stays alive from its last definition to
its last read, so every read finds a value and a stage run "all" keeps what its backward
reads, a stage run "checkpoint only" keeps only what the next stage reads. Re-runs whose
results are never read are removed before the frees are inserted.

Offload (Beaumont, Eyraud-Dubois, Shilova, "Efficient Combination of Rematerialization
and Offloading for Training DNNs", NeurIPS 2021), when ``graph.transfer.real`` (or
``offload=True``): a checkpoint the forward phase stores may live on the host instead.
A second table covers the forward phase only, the right spine of the recursion (t = L - 1,
where every F runs in the forward phase), with one more option:

    "ck-off" j:      uf[s..j-1] + top(j, m) + opt(s, j - 1, m - g[j..]) + out(s) + max(0, h2d(x[s]) - ub[j])
                     where x[s] + x[j] + bw[j] + g[j..] <= m
    "ck-off-late" j: uf[s..j-1] + top(j, m) + opt(s, j - 1, m - g[j..]) + out(s) + h2d(x[s])
    both where the sweep F(s..j-1) fits with x[s] gone after F(s);
    out(s) = max(0, d2h(x[s]) - uf[s])

x[s] is copied to the host right after stage s - 1 makes it and freed after F(s), its
last forward reader (compute waits there for the copy); top(j, m) runs with all of m.
"ck-off" prefetches x[s] right before B(j), the last operation of top(j, m), so the copy
overlaps B(j) but B(j) runs with x[s] on the device; "ck-off-late" prefetches it right
after B(j) and waits for it. On the safe side, each copy is charged as if it started only
when the channel is sure to be free (the end of F(s - 1) for the offload: the previous
spine offload was waited for there; the prefetch's issue, the channel having finished
every earlier prefetch, each read at or before B(j)) and overlapped only F(s), resp.
B(j); copy times are summed over x[s]'s storages with the per-copy latency.
Recomputation never shortens the overlap, so `simulate`'s time is at most the DP's when
its memory model holds. Only
segment inputs are offloaded (what the DP stores), not a stage's saved activations, and
only in the forward phase (no copies of recomputed checkpoints in the backward). The
extra table costs O(L^2 * U) beside the O(L^3 * U) of the recompute-only one.

Check. The DP's memory model is approximate (gradients of parameters, workspaces, aliases),
so the plan is replayed by `simulate`; the DP's top-level memory is bisected to the
largest value whose plan fits. Decision sets the caller seeds (the portfolio seeds
``every_block``'s) are candidates too, so the result is never slower than they are when
they fit; with offload the recompute-only search runs as well and its plans are
candidates, so offloading never makes the result slower. Optimal only under the DP's
model (not proved for the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from solvers.errors import InfeasibleBudgetError, OptionError
from solvers.graph import Graph, Phase
from solvers.kernel.options import segment_options
from solvers.kernel.program import delay_frees, insert_frees, plan_from_decisions, saved_roots
from solvers.kernel.recompute import Seed
from solvers.kernel.segments import Segment, root_segments, segment_chain, segmentations
from solvers.plan import Decision, Plan, Step, StepKind, offload, prefetch, run
from solvers.simulate import simulate

SOLVER = "chain"
_INFINITY = float("inf")
_ALL = 0   # choice code: run the first stage "all"; a positive code j: checkpoint at stage j


@dataclass(frozen=True)
class Stage:
    """The DP's view of one segment; bytes are exact, the DP rounds them to slots."""

    forward_ms: float
    backward_ms: float
    input_bytes: int        # x[k]
    all_bytes: int          # xbar[k], output x[k + 1] included
    transient_bytes: int    # act[k]: the stage's activations while its forward runs
    backward_bytes: int     # bw[k]: what B(k) reads of the stage's own storages, the gradients
                            # of its input and output, backward workspace (x[k] apart)
    gradient_bytes: int = 0  # g[k]: the step's gradients its backward makes (alive to the end)
    backward_reads_own: bool = True   # B(k) reads a storage F(k) makes (else B(k) needs no F(k) first)
    input_roots: tuple[str, ...] = ()   # the storages of x[k], graph order
    sweep_bytes: int | None = None      # act of F(k) run "checkpoint only" (None: transient_bytes)
    options: tuple["StageOption", ...] = ()   # ways to run F(k) "all" with fewer storages kept
    input_gradient_bytes: int | None = None   # dx[k]: what B(k) makes that B(j < k) reads (None: x[k])
    backward_reads_input: bool = True   # a backward op reads x[k] (else it is gone when B(k) runs)


@dataclass(frozen=True)
class StageOption:
    """Stage k run "all" while dropping ``dropped`` (some of its own saved storages) after
    F(k): B(k) recomputes them just in time (`backward_program`). The fields replace the
    stage's ``all_bytes``, ``transient_bytes`` and ``backward_bytes``; ``recompute_ms`` is
    added to its backward."""

    dropped: tuple[str, ...]
    all_bytes: int
    transient_bytes: int
    backward_bytes: int
    recompute_ms: float
    backward_program: tuple[str, ...]   # B(k)'s ops, recomputations included, in order


def solve_chain_dp(graph: Graph, budget_bytes: int, *, resolution: int = 200, max_bisections: int = 10,
                   offload: bool | None = None, every_op: bool = False, options_per_segment: int | None = None,
                   seeds: Sequence[Seed] = ()) -> Plan:
    """Least-time Rotor schedule over the segment chain that `simulate` fits in the budget;
    with ``offload`` (default: ``graph.transfer.real``) the forward phase's checkpoints may
    be offloaded (module docstring). ``every_op``: one stage per forward op
    (`kernel.segments.segment_chain`'s ``every_op``) instead of the block chains
    (`kernel.segments.segmentations`: the blocks nested in repeated units, and the outer
    units where they differ; the fastest plan over both).
    ``options_per_segment``: drop options per stage (module docstring, "Stage options";
    default 8 on the block chain, 1 (keep all only) with ``every_op``). ``seeds``: named
    decision sets over the segments, each one more candidate (``options["source"]`` its name).
    O(L^3 * U + B * (S + R)) per chain for B bisection steps of one plan and one simulation
    each (S steps, R saved storages).

    Raises:
        InfeasibleBudgetError: neither the DP's plans nor the seeds fit.
        OptionError: ``resolution < 1``.
    """
    if resolution < 1:
        raise OptionError(f"chain: resolution must be at least 1 (memory slots per budget), got {resolution}; "
                          "pass resolution >= 1 (default 200)")
    keep_all = plan_from_decisions(graph, {root: Decision.KEEP for root in saved_roots(graph)}, SOLVER,
                                   budget_bytes, optimal=True)
    lowest_peak = simulate(graph, keep_all, check_hash=False).peak_bytes
    if lowest_peak <= budget_bytes:
        return keep_all

    if options_per_segment is None:
        options_per_segment = 1 if every_op else 8
    candidates: list[tuple[float, int, Plan]] = []   # (time, order of discovery, plan)
    chains = [segment_chain(graph, every_op=True)] if every_op else segmentations(graph)
    for segments in chains:
        lowest_peak = min(lowest_peak, _chain_candidates(graph, segments, budget_bytes, resolution, max_bisections,
                                                         offload, options_per_segment, seeds, candidates))
    if not candidates:
        raise InfeasibleBudgetError(budget_bytes, lowest_peak,
                                    {f"lowest simulated peak of the chain DP over "
                                     f"{' or '.join(str(len(segments)) for segments in chains)} segments":
                                     lowest_peak}, solver=SOLVER)
    return min(candidates, key=lambda candidate: candidate[:2])[2]


def _chain_candidates(graph: Graph, segments: tuple[Segment, ...], budget_bytes: int, resolution: int,
                      max_bisections: int, offload: bool | None, options_per_segment: int, seeds: Sequence[Seed],
                      candidates: list[tuple[float, int, Plan]]) -> int:
    """The DP's plans over one segment chain (and the seeds' decision sets) that fit,
    appended to ``candidates``; returns the lowest simulated peak among those tried."""
    lowest_peak = 2**62
    drop_sets = None
    if options_per_segment > 1:
        drop_sets = [[levels.dropped(level) for level in range(1, len(levels.prefix_lengths))]
                     for levels in segment_options(graph, segments, options_per_segment)]
    stages, constant_bytes = chain_stages(graph, segments, drop_sets)
    slot_bytes = max(1, -(-budget_bytes // resolution))
    copy_ms = _copy_times(graph, stages) if (graph.transfer.real if offload is None else offload) else None
    table = _ChainTable(stages, slot_bytes, resolution, copy_ms)
    for offloading in (False, True) if table.can_offload else (False,):
        low, high = -1, resolution + 1
        memory = max(0, (budget_bytes - constant_bytes) // slot_bytes)   # the model's own guess first
        for _ in range(max_bisections + 1):
            sequence = table.sequence(memory, offloading)
            if sequence is None:
                low = memory
            else:
                options = {"dp_memory_bytes": memory * slot_bytes, **({"offload": True} if offloading else {})}
                plan = program_plan(graph, segments, sequence, budget_bytes, options, stages)
                result = simulate(graph, plan, check_hash=False)
                lowest_peak = min(lowest_peak, result.peak_bytes)
                if result.peak_bytes <= budget_bytes:
                    candidates.append((result.time_ms, len(candidates), plan))
                    low = memory
                else:
                    high = memory
            if high - low <= 1:
                break
            memory = (low + high) // 2
    for source, seed in seeds:
        seeded = plan_from_decisions(graph, seed(graph, segments), SOLVER, budget_bytes)
        result = simulate(graph, seeded, check_hash=False)
        lowest_peak = min(lowest_peak, result.peak_bytes)
        if result.peak_bytes <= budget_bytes:
            seeded = replace(seeded, options={"source": source, "segments": len(segments)})
            candidates.append((result.time_ms, len(candidates), seeded))
    return lowest_peak


# -- stages --------------------------------------------------------------------------------------

def chain_stages(graph: Graph, segments: tuple[Segment, ...],
                 drop_sets: Sequence[Sequence[tuple[str, ...]]] | None = None) -> tuple[list[Stage], int]:
    """The DP's stages and the constant bytes (resident placeholders, tangents and the
    always-kept storages of the module docstring). ``drop_sets[k]``: sets of stage k's own
    saved storages, each one `StageOption` of the stage (the others are ignored).
    Transients come from liveness inside the stage (`_forward_peak`). O(ops + edges) plus
    O(stage size) per option."""
    producer_segment = root_segments(graph, segments)
    always = {graph.value(name).root for name in graph.forward_outputs}
    always |= {graph.value(name).root for op in graph.forward_ops if not op.recomputable for name in op.outputs}
    for segment in segments:
        always |= {root for root in segment.crossing_in if producer_segment[root] < segment.index - 1}
    always &= set(producer_segment)
    backward_read = {graph.value(name).root for op in graph.backward_ops for name in op.inputs}
    released = _released_in_forward(graph, segments, producer_segment) - backward_read
    always -= released

    def size(roots: Iterable[str]) -> int:
        return sum(graph.value(root).size_bytes for root in set(roots))

    inputs = [set(segment.crossing_in) - always - released for segment in segments] + [set()]
    gradient_roots = frozenset({graph.value(name).root for name in graph.gradients} - set(producer_segment))
    gradient_producer = {root: graph.value(root).producer for root in gradient_roots}
    crossing_gradient_bytes = _crossing_gradient_bytes(graph, segments, gradient_roots)
    stages = []
    for segment in segments:
        # released outputs made before F(k) are alive while it runs in the forward phase
        released_before = size(root for root in released if producer_segment[root] < segment.index)
        segment_backward = set(segment.backward_ops)
        read_here = {graph.value(name).root for op_name in segment.backward_ops
                     for name in graph.op(op_name).inputs}
        own = {root for root, k in producer_segment.items() if k == segment.index} - always
        saved = (own & backward_read) | inputs[segment.index + 1]
        gradient_in_bytes = crossing_gradient_bytes[segment.index + 1]   # made by B(> k), read by B(<= k)
        options = []
        for dropped in (drop_sets[segment.index] if drop_sets is not None else ()):
            dropped_set = set(dropped) & saved - inputs[segment.index + 1]
            if not dropped_set:
                continue
            kept = saved - dropped_set
            forward_peak = _forward_peak(graph, segment.forward_ops, own, kept)
            programs = [backward_program(graph, segment, own - kept, carry) for carry in (True, False)]
            for program in programs[:1] if programs[0] == programs[1] else programs:
                options.append(StageOption(
                    dropped=tuple(root for root in dropped if root in dropped_set), all_bytes=size(kept),
                    transient_bytes=released_before + forward_peak,
                    backward_bytes=gradient_in_bytes + _backward_peak(graph, program, own - kept,
                                                                      (own & read_here) - dropped_set,
                                                                      gradient_roots),
                    recompute_ms=sum(graph.op(name).time_ms for name in program
                                     if graph.op(name).phase is Phase.FORWARD),
                    backward_program=tuple(program)))
        stages.append(Stage(
            forward_ms=sum(graph.op(name).time_ms for name in segment.forward_ops),
            backward_ms=sum(graph.op(name).time_ms for name in segment.backward_ops),
            input_bytes=size(inputs[segment.index]), all_bytes=size(saved),
            transient_bytes=released_before + _forward_peak(graph, segment.forward_ops, own, saved),
            backward_bytes=gradient_in_bytes + _backward_peak(graph, segment.backward_ops, set(), own & read_here,
                                                              gradient_roots),
            backward_reads_own=bool(own & read_here),
            gradient_bytes=size({root for root in gradient_roots if gradient_producer[root] in segment_backward}),
            input_roots=tuple(root for root in producer_segment if root in inputs[segment.index]),
            sweep_bytes=released_before + _forward_peak(graph, segment.forward_ops, own, inputs[segment.index + 1]),
            options=tuple(options), input_gradient_bytes=crossing_gradient_bytes[segment.index],
            backward_reads_input=bool(inputs[segment.index] & backward_read)))
    placeholders = {graph.value(name).root for name in graph.placeholders}
    return stages, size(always) + sum(graph.value(root).size_bytes for root in placeholders) + graph.caller_bytes


def _crossing_gradient_bytes(graph: Graph, segments: tuple[Segment, ...], gradient_roots: frozenset[str]) -> list[int]:
    """``dx[k]`` for k in 0..L: bytes of the storages the backward ops of stages >= k make
    and those of stages < k read (the gradient of ``x[k]``, and of skip tensors across k),
    the step's ``gradient_roots`` apart. Where a stage input is a released output (GPT-2's
    logits), ``x[k]`` is 0 but its gradient is not. O(backward ops * arity)."""
    backward_segment = {name: segment.index for segment in segments for name in segment.backward_ops}
    first_reader: dict[str, int] = {}
    for op in graph.backward_ops:
        if op.name not in backward_segment:
            continue
        for name in op.inputs:
            root = graph.value(name).root
            first_reader[root] = min(first_reader.get(root, len(segments)), backward_segment[op.name])
    crossing = [0] * (len(segments) + 1)
    for root, reader_segment in first_reader.items():
        producer = graph.value(root).producer
        if producer not in backward_segment or root in gradient_roots:
            continue
        for k in range(reader_segment + 1, backward_segment[producer] + 1):
            crossing[k] += graph.value(root).size_bytes
    return crossing


def _released_in_forward(graph: Graph, segments: tuple[Segment, ...], producer_segment: dict[str, int]) -> set[str]:
    """Roots of ``graph.released_outputs`` that the caller drops before the backward and that
    no stage but their own and the last reads in the forward: they are alive through the
    rest of the forward phase only (a constant would count them through the backward too,
    392 MiB of GPT-2's logits at 4 x 512 tokens), and never a checkpoint to re-run from."""
    last = len(segments) - 1
    forward_segment = {name: segment.index for segment in segments for name in segment.forward_ops}
    released = set()
    for name in graph.released_outputs:
        root = graph.value(name).root
        if root not in producer_segment:
            continue
        readers = {forward_segment.get(reader) for value in graph.values if value.root == root
                   for reader in graph.consumers[value.name] if graph.op(reader).phase is Phase.FORWARD}
        if readers <= {producer_segment[root], last}:
            released.add(root)
    return released


def _forward_peak(graph: Graph, forward_ops: Sequence[str], own: set[str], kept: set[str]) -> int:
    """Highest bytes of the storages ``own`` while ``forward_ops`` run in order, each alive
    from its producer to its last read among them (to the end when in ``kept``), plus the
    running op's workspace. O(ops + arity)."""
    free_at: dict[str, int] = {}
    for index, name in enumerate(forward_ops):
        op = graph.op(name)
        for value_name in op.outputs:
            if value_name in own:
                free_at[value_name] = index
        for value_name in op.inputs:
            root = graph.value(value_name).root
            if root in own:
                free_at[root] = index
    for root in kept & set(free_at):
        free_at[root] = len(forward_ops)
    leaving: dict[int, int] = {}
    for root, index in free_at.items():
        leaving[index] = leaving.get(index, 0) + graph.value(root).size_bytes
    live = peak = 0
    for index, name in enumerate(forward_ops):
        op = graph.op(name)
        live += sum(graph.value(value_name).size_bytes for value_name in op.outputs if value_name in own)
        peak = max(peak, live + op.tmp_bytes)
        live -= leaving.get(index, 0)
    return peak


def backward_program(graph: Graph, segment: Segment, missing: set[str], carry: bool = True) -> list[str]:
    """B(k) with just-in-time recomputation: before each of the segment's backward ops, the
    forward ops of the segment that make the storages in ``missing`` it reads (and, in
    turn, those their recomputation reads), in dependency order. With ``carry`` each runs
    once and its values stay until their last read; without, the values made only on the
    way to another recomputation are dropped after the backward op and made again when
    needed (less memory, more time: `kernel.program.build_program`'s ``free_intermediates``).
    Op names. O(stage ops + arity) with ``carry``, O(stage ops * arity) without."""
    defined: set[str] = set()
    program: list[str] = []
    for backward_name in segment.backward_ops:
        reads = graph.op(backward_name).inputs
        intermediates: set[str] = set()
        stack: list[tuple[str, bool]] = [(name, False) for name in reversed(reads)]
        while stack:
            name, inputs_ready = stack.pop()
            value = graph.value(name)
            if value.root not in missing or name in defined:
                continue
            producer = graph.op(value.producer)
            if inputs_ready:
                program.append(producer.name)
                defined.update(producer.outputs)
                if not set(producer.outputs) & set(reads):
                    intermediates.update(producer.outputs)
                continue
            stack.append((name, True))
            stack.extend((input_name, False) for input_name in reversed(producer.inputs))
        program.append(backward_name)
        if not carry:
            defined -= intermediates
    return program


def _backward_peak(graph: Graph, program: Sequence[str], missing: set[str], kept: set[str],
                   gradient_roots: frozenset[str] = frozenset()) -> int:
    """Highest bytes, while ``program`` runs, of the kept storages ``kept`` (alive from the
    start to their last read), of the recomputed ones (roots in ``missing``, each
    definition alive to its last read before the next) and of the storages its backward
    ops make (alive to their last read in ``program``, or to its end where an op outside
    it reads them: the gradient of the stage's input), but the step's ``gradient_roots``
    (counted as ``g``), plus the running op's workspace.
    O(program * arity + program * storages)."""
    lifetimes: list[list[int]] = []          # [root size, first step, last step]
    current: dict[str, list[int]] = {}
    in_program = set(program)
    for root in kept:
        current[root] = [graph.value(root).size_bytes, 0, -1]
        lifetimes.append(current[root])
    for index, name in enumerate(program):
        op = graph.op(name)
        for value_name in op.inputs:
            root = graph.value(value_name).root
            if root in current:
                current[root][2] = index
        for value_name in op.outputs:
            if op.phase is Phase.FORWARD:
                if value_name not in missing:
                    continue
                last = index
            else:
                if graph.value(value_name).root != value_name or value_name in gradient_roots:
                    continue
                read_outside = any(reader not in in_program for reader in graph.consumers[value_name])
                last = len(program) - 1 if read_outside else index
            current[value_name] = [graph.value(value_name).size_bytes, index, last]
            lifetimes.append(current[value_name])
    change = [0] * (len(program) + 1)
    for size_bytes, first, last in lifetimes:
        if last >= first:
            change[first] += size_bytes
            change[last + 1] -= size_bytes
    live = peak = 0
    for index, name in enumerate(program):
        live += change[index]
        peak = max(peak, live + graph.op(name).tmp_bytes)
    return peak


def _copy_times(graph: Graph, stages: list[Stage]) -> list[tuple[float, float]]:
    """(to host, to device) milliseconds of each stage's input storages, one copy each
    (latency included), back to back."""
    transfer = graph.transfer
    times = []
    for stage in stages:
        sizes = [graph.value(root).size_bytes for root in stage.input_roots]
        times.append((sum(transfer.latency_ms + size / transfer.device_to_host_bytes_per_ms for size in sizes),
                      sum(transfer.latency_ms + size / transfer.host_to_device_bytes_per_ms for size in sizes)))
    return times


class _ChainTable:
    """``cost[s][t][m]`` and ``choice[s][t][m]`` of the DP (module docstring) for every m;
    with copy times, ``top[s][m]``: the forward-phase table with the "ck-off" option."""

    def __init__(self, stages: list[Stage], slot_bytes: int, slots: int,
                 copy_ms: list[tuple[float, float]] | None = None) -> None:
        def units(size: int) -> int:
            return -(-size // slot_bytes)

        count = len(stages)
        x = [units(stage.input_bytes) for stage in stages] + [0]
        dx = [units(stage.input_bytes if stage.input_gradient_bytes is None else stage.input_gradient_bytes)
              for stage in stages] + [0]   # the gradient of x[k], alive while stages < k run
        # x[k] where B(k) runs: no later re-run reads it, so it is alive only if a backward op does
        x_at_backward = [x[k] if stage.backward_reads_input else 0 for k, stage in enumerate(stages)]
        self._x_at_backward = x_at_backward
        xbar = [units(stage.all_bytes) for stage in stages]
        act = [units(stage.transient_bytes) for stage in stages]
        sweep = [units(stage.transient_bytes if stage.sweep_bytes is None else stage.sweep_bytes)
                 for stage in stages]
        bw = [units(stage.backward_bytes) for stage in stages]
        g = [units(stage.gradient_bytes) for stage in stages]
        # ways[k]: (xbar, act, bw, extra backward ms) of running stage k "all", option 0 first
        ways = [[(xbar[k], act[k], bw[k], 0.0)]
                + [(units(o.all_bytes), units(o.transient_bytes), units(o.backward_bytes), o.recompute_ms)
                   for o in stage.options] for k, stage in enumerate(stages)]
        self._ways = ways
        grads_before = [0]                 # grads_before[k]: g[0] + ... + g[k - 1]
        for units_k in g:
            grads_before.append(grads_before[-1] + units_k)
        self._grads_before = grads_before
        forward_prefix = [0.0]
        for stage in stages:
            forward_prefix.append(forward_prefix[-1] + stage.forward_ms)
        self.slots = slots
        self.count = count
        self.cost: dict[tuple[int, int], list[float]] = {}
        self.choice: dict[tuple[int, int], list[int]] = {}
        for length in range(1, count + 1):
            for s in range(count - length + 1):
                t = s + length - 1
                cost, choice = [_INFINITY] * (slots + 1), [None] * (slots + 1)
                single = stages[s].forward_ms + stages[s].backward_ms
                # alone, F(s) runs only for what B(s) reads of it (the plan drops unread re-runs);
                # the last stage is only ever reached in the forward phase, where F runs anyway
                forward_needed = stages[s].backward_reads_own or s == count - 1
                # B(s) runs after the backward of s + 1..t made their gradients
                later_grads = grads_before[t + 1] - grads_before[s + 1]
                # per option o of running s "all": (memory it needs, what stays for s + 1..t, ms)
                all_ways = [(max(x[s] + way_act + dx[t + 1], x_at_backward[s] + way_bw + g[s] + later_grads),
                             x[s] + way_xbar - x[s + 1], single + extra_ms)
                            for way_xbar, way_act, way_bw, extra_ms in ways[s]]
                if s == t and not forward_needed:
                    all_ways = [(x_at_backward[s] + bw[s] + g[s] + later_grads, 0, stages[s].backward_ms)]
                # sweep_need[j]: transient of F(s)..F(j-1) run "checkpoint only" with x[s] stored
                sweep_need, running = {}, 0
                for j in range(s + 1, t + 1):
                    k = j - 1
                    running = max(running, x[s] + (x[k] if k > s else 0) + sweep[k] + dx[t + 1])
                    sweep_need[j] = running
                for m in range(slots + 1):
                    best, best_choice = _INFINITY, None
                    if s == t:
                        for option, (need, _, way_ms) in enumerate(all_ways):
                            if need <= m and way_ms < best:
                                best, best_choice = way_ms, _ALL - option
                    else:
                        for option, (need, held, way_ms) in enumerate(all_ways):
                            if need <= m and m - held >= 0:
                                total = way_ms + self.cost[(s + 1, t)][m - held]
                                if total < best:
                                    best, best_choice = total, _ALL - option
                        for j in range(s + 1, t + 1):
                            if sweep_need[j] > m or m - x[s] < 0:
                                continue
                            rest = m - (grads_before[t + 1] - grads_before[j])   # j..t made theirs
                            if rest < 0:
                                continue
                            total = (forward_prefix[j] - forward_prefix[s] + self.cost[(j, t)][m - x[s]]
                                     + self.cost[(s, j - 1)][rest])
                            if total < best:
                                best, best_choice = total, j
                    cost[m], choice[m] = best, best_choice
                self.cost[(s, t)], self.choice[(s, t)] = cost, choice
        self._x = x
        self.top_cost: list[list[float]] = []
        self.top_choice: list[list[int]] = []
        self.can_offload = copy_ms is not None and count > 1 and any(stage.input_roots for stage in stages)
        if self.can_offload:
            self._build_top(stages, x, sweep, bw, forward_prefix, copy_ms)

    def _build_top(self, stages: list[Stage], x: list[int], sweep: list[int], bw: list[int],
                   forward_prefix: list[float], copy_ms: list[tuple[float, float]]) -> None:
        """``top[s][m]``: stages s..L-1 from the forward phase on, with "ck-off" and
        "ck-off-late" (module docstring); choice ``kind * L + j`` with kind 0 "ck",
        1 "ck-off", 2 "ck-off-late", and 0 "all". O(L^2 * U)."""
        count, slots, last = self.count, self.slots, self.count - 1
        self.top_cost, self.top_choice = [[]] * count, [[]] * count
        self.top_cost[last], self.top_choice[last] = self.cost[(last, last)], self.choice[(last, last)]
        for s in range(last - 1, -1, -1):
            cost, choice = [_INFINITY] * (slots + 1), [None] * (slots + 1)
            single = stages[s].forward_ms + stages[s].backward_ms
            grads = self._grads_before
            after = [grads[count] - grads[k] for k in range(count + 1)]   # after[k]: g[k] + ... + g[L-1]
            g_s = grads[s + 1] - grads[s]
            all_ways = [(max(x[s] + way_act, self._x_at_backward[s] + way_bw + g_s + after[s + 1]),
                         x[s] + way_xbar - x[s + 1],
                         single + extra_ms) for way_xbar, way_act, way_bw, extra_ms in self._ways[s]]
            sweep_need, offloaded_sweep_need, running, offloaded_running = {}, {}, 0, 0
            for j in range(s + 1, last + 1):
                k = j - 1
                running = max(running, x[s] + (x[k] if k > s else 0) + sweep[k])
                offloaded_running = max(offloaded_running, x[k] + sweep[k])   # x[s] leaves after F(s)
                sweep_need[j], offloaded_sweep_need[j] = running, offloaded_running
            to_host_ms, to_device_ms = copy_ms[s]
            offload_stall_ms = max(0.0, to_host_ms - stages[s].forward_ms)
            offloadable = bool(stages[s].input_roots) and x[s] > 0
            for m in range(slots + 1):
                best, best_choice = _INFINITY, None
                for option, (need, held, way_ms) in enumerate(all_ways):
                    if need <= m and m - held >= 0:
                        total = way_ms + self.top_cost[s + 1][m - held]
                        if total < best:
                            best, best_choice = total, _ALL - option
                for j in range(s + 1, last + 1):
                    sweep_ms = forward_prefix[j] - forward_prefix[s]
                    rest = m - after[j]        # stages j..L-1 made their gradients
                    if rest < 0:
                        continue
                    if sweep_need[j] <= m and m - x[s] >= 0:
                        total = sweep_ms + self.top_cost[j][m - x[s]] + self.cost[(s, j - 1)][rest]
                        if total < best:
                            best, best_choice = total, j
                    if not offloadable or offloaded_sweep_need[j] > m:
                        continue
                    rest_ms = sweep_ms + self.top_cost[j][m] + self.cost[(s, j - 1)][rest] + offload_stall_ms
                    if x[s] + x[j] + bw[j] + after[j] <= m:      # prefetch overlaps B(j)
                        total = rest_ms + max(0.0, to_device_ms - stages[j].backward_ms)
                        if total < best:
                            best, best_choice = total, count + j
                    if rest_ms + to_device_ms < best:            # prefetch after B(j), waited for
                        best, best_choice = rest_ms + to_device_ms, 2 * count + j
                cost[m], choice[m] = best, best_choice
            self.top_cost[s], self.top_choice[s] = cost, choice

    def sequence(self, memory: int, offload: bool = False) -> list[tuple[str, int, int]] | None:
        """The optimal operations ``(kind, k, option)``: ``("F", k, 0)``, ``("B", k, o)`` (B(k)
        after F(k) was run "all" with option o of `Stage.options`, 0: keep all), and with
        ``offload`` ``("P", s, 0)``: prefetch x[s], right before B(j) for "ck-off" j, right
        after it for "ck-off-late" j; with ``memory`` slots, or None when the DP finds none.
        Explicit stack: no recursion limit."""
        memory = min(memory, self.slots)
        top = offload and self.can_offload
        first = self.top_cost[0] if top else self.cost[(0, self.count - 1)]
        if memory < 0 or first[memory] == _INFINITY:
            return None
        x = self._x
        result: list[tuple[str, int, int]] = []
        prefetch_before: dict[int, int] = {}    # B(j) -> s whose x[s] comes back before it
        prefetch_after: dict[int, int] = {}     # B(j) -> s whose x[s] comes back after it
        stack: list[tuple[str, int, int, int]] = [("top" if top else "solve", 0, self.count - 1, memory)]
        while stack:
            kind, s, t, m = stack.pop()
            if kind not in ("top", "solve"):
                result.append((kind, s, t))          # ("B", k, option, _)
                continue
            choice = self.top_choice[s][m] if kind == "top" else self.choice[(s, t)][m]
            if choice <= _ALL:
                option = _ALL - choice
                result.append(("F", s, 0))
                if s == t:
                    result.append(("B", s, option))
                else:
                    way_xbar = self._ways[s][option][0]
                    stack += [("B", s, option, 0), (kind, s + 1, t, m - x[s] - way_xbar + x[s + 1])]
            elif kind == "top":
                offload_kind, j = divmod(choice, self.count)
                result += [("F", k, 0) for k in range(s, j)]
                if offload_kind:
                    (prefetch_before if offload_kind == 1 else prefetch_after)[j] = s
                rest = m - (self._grads_before[self.count] - self._grads_before[j])
                stack += [("solve", s, j - 1, rest), ("top", j, t, m if offload_kind else m - x[s])]
            else:
                result += [("F", k, 0) for k in range(s, choice)]
                rest = m - (self._grads_before[t + 1] - self._grads_before[choice])
                stack += [("solve", s, choice - 1, rest), ("solve", choice, t, m - x[s])]
        if prefetch_before or prefetch_after:
            with_prefetches = []
            for kind, k, option in result:
                if kind == "B" and k in prefetch_before:
                    with_prefetches.append(("P", prefetch_before[k], 0))
                with_prefetches.append((kind, k, option))
                if kind == "B" and k in prefetch_after:
                    with_prefetches.append(("P", prefetch_after[k], 0))
            result = with_prefetches
        return result


# -- program -------------------------------------------------------------------------------------

def program_plan(graph: Graph, segments: tuple[Segment, ...], sequence: list[tuple[str, int, int]],
                 budget_bytes: int, options: dict, stages: list[Stage] | None = None) -> Plan:
    """The `Plan` of a DP sequence (module docstring, "Program"); ``("P", s)`` offloads the
    storages of x[s] (``stages[s].input_roots``) in the forward right after they are made,
    frees them after stage s's forward ops, and prefetches them where it stands in the
    backward. O(steps + total arity)."""
    first_backward = next(index for index, (kind, _, _) in enumerate(sequence) if kind != "F")
    if [k for _, k, _ in sequence[:first_backward]] != list(range(len(segments))):
        raise AssertionError(f"chain DP sequence does not start with one forward sweep: {sequence[:first_backward]}")
    free_after: dict[str, str] = {}       # offloaded storage -> forward op after which it leaves the device
    for kind, s, _ in sequence:
        if kind == "P":
            free_after.update((root, segments[s].forward_ops[-1]) for root in stages[s].input_roots)
    backward_runs: list[Step] = []
    reruns = [0] * len(segments)
    options_used = 0
    for kind, k, option in sequence[first_backward:]:
        if kind == "F":
            reruns[k] += 1
            backward_runs += [run(name) for name in segments[k].forward_ops if graph.op(name).recomputable]
        elif kind == "P":
            backward_runs += [prefetch(root) for root in stages[k].input_roots]
        elif option:
            options_used += 1
            backward_runs += [run(name) for name in stages[k].options[option - 1].backward_program]
        else:
            backward_runs += [run(name) for name in segments[k].backward_ops]
    backward_runs, needed = _drop_unread_reruns(graph, backward_runs)
    if needed & set(free_after):    # read before its prefetch: keep it on the device instead
        backward_runs = [step for step in backward_runs
                         if not (step.kind is StepKind.PREFETCH and step.name in needed)]
        free_after = {root: op for root, op in free_after.items() if root not in needed}
        backward_runs, needed = _drop_unread_reruns(graph, backward_runs)
    placeholders = set(graph.placeholders)
    kept = (needed - placeholders) | set(graph.forward_outputs)
    forward_runs: list[Step] = []
    for op in graph.forward_ops:
        forward_runs.append(run(op.name))
        forward_runs += [offload(name) for name in op.outputs if name in free_after]
    forward = delay_frees(insert_frees(graph, forward_runs, live_out=kept), free_after)
    backward = insert_frees(graph, backward_runs, live_out=set(graph.gradients), live_in=kept | placeholders)
    kept_roots = {graph.value(name).root for name in kept}
    decisions = {root: Decision.OFFLOAD if root in free_after else Decision.KEEP if root in kept_roots
                 else Decision.RECOMPUTE for root in saved_roots(graph)}
    return Plan(graph_hash=graph.hash, solver=SOLVER, budget_bytes=budget_bytes, forward=forward,
                backward=backward, decisions=decisions,
                options={**options, "source": "dp", "segments": len(segments), "forward_reruns": reruns,
                         **({"stage_options_used": options_used} if options_used else {}),
                         **({"offloaded": len(free_after)} if free_after else {})})


def _drop_unread_reruns(graph: Graph, steps: list[Step]) -> tuple[list[Step], set[str]]:
    """Remove forward-op runs none of whose outputs is read before being defined again;
    also return the values read before any definition (what the forward must keep).
    A prefetch defines its value. One reverse pass: a removed run adds no reads.
    O(steps + total arity)."""
    needed = set(graph.gradients)
    kept_reversed = []
    for step in reversed(steps):
        if step.kind is StepKind.PREFETCH:
            needed.discard(step.name)
            kept_reversed.append(step)
            continue
        op = graph.op(step.name)
        if op.phase is Phase.FORWARD and step.kind is StepKind.RUN and not needed.intersection(op.outputs):
            continue
        needed.difference_update(op.outputs)
        needed.update(op.inputs)
        kept_reversed.append(step)
    return kept_reversed[::-1], needed
