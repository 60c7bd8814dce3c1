"""``chain``: the Rotor dynamic program over the chain of segments, with multiple recomputation.

Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova, "Optimal checkpointing for heterogeneous
chains: how to train deep neural networks with limited memory" (2019): a Revolve-like
schedule where a stage's forward may run several times during the backward.

Stages are the segments of `segments.segment_chain`. Stage k has forward time ``uf[k]``,
backward time ``ub[k]``, input bytes ``x[k]`` (the storages produced by stage k - 1 that stage
k reads: what must be kept to run it again), ``xbar[k]`` (what a forward "with all saved"
keeps for the backward, its output ``x[k + 1]`` included), ``act[k]`` (its transient
activations), ``bw[k]`` (what B(k) holds besides ``x[k]``: the storages of F(k) it reads,
the gradients of its input and output, its workspace) and ``g[k]`` (the step's parameter
gradients B(k) makes, alive to the end of the step). Storages that are always kept: skip
tensors (read more than one stage after the one that makes them), outputs of ops that
cannot run twice (buffer updates), forward outputs; they are a constant.

DP. ``opt(s, t, m)``: least time to run the backward of stages s..t with memory ``m`` (in
slots, ``x[s]`` stored, the gradient of ``x[t + 1]`` alive, the gradients ``g`` of the
stages after t made):

    s == t:   uf[s] + ub[s]                                   F_all(s), B(s)
              ub[s] alone when B(s) reads nothing F(s) makes (a linear layer's backward
              reads its input only); the re-run is then dropped from the program
    "all":    uf[s] + opt(s + 1, t, m - x[s] - xbar[s] + x[s + 1]) + ub[s]
              B(s) needs x[s] + bw[s] + g[s] + g[s+1..t] <= m
    "ck" j:   uf[s..j-1] + opt(j, t, m - x[s]) + opt(s, j - 1, m - g[j..t])   s < j <= t

each option only where its transient memory fits. With one stage per op (``every_op``) the
DP's plans lie in the exact solvers' space; on a uniform chain its optimum is the MILP's
proved one, on some random chains it is still above it (the model is coarser than
`simulate`; tests/test_chain.py). Sizes are rounded up and the memory
down to slots of ``budget / resolution`` bytes (safe side). O(L^3 * U) time and
O(L^2 * U) memory for L stages and U = resolution slots; the table for every m is built
once.

Program. The optimal sequence starts with one forward sweep F(0)..F(L-1) (the forward
phase runs every forward op once, in order); the rest is the backward phase: F(k) runs
stage k's recomputable forward ops, B(k) its backward ops. What each phase keeps follows
from liveness (`schedule.insert_frees`): a value stays alive from its last definition to
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
largest value whose plan fits. ``every_block`` is a candidate too, so the result is never
slower than it when it fits; with offload the recompute-only search runs as well and its
plans are candidates, so offloading never makes the result slower. Optimal only under the
DP's model (not proved for the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from solvers.baselines import plan_from_decisions
from solvers.brute_force import delay_frees
from solvers.checkpoint_baselines import checkpoint_decisions
from solvers.errors import InfeasibleBudgetError, UnsupportedGraphError
from solvers.graph import Graph, Phase
from solvers.plan import Decision, Plan, Step, StepKind, offload, prefetch, run
from solvers.registry import register
from solvers.schedule import insert_frees, saved_roots
from solvers.segments import Segment, root_segments, segment_chain
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


@register(SOLVER)
def solve_chain(graph: Graph, budget_bytes: int, *, resolution: int = 200, max_bisections: int = 10,
                offload: bool | None = None, every_op: bool = False) -> Plan:
    """Least-time Rotor schedule over the segment chain that `simulate` fits in the budget;
    with ``offload`` (default: ``graph.transfer.real``) the forward phase's checkpoints may
    be offloaded (module docstring). ``every_op``: one stage per forward op
    (`segments.segment_chain`'s ``every_op``) instead of the block chain.
    O(L^3 * U + B * (S + R)) for B bisection steps of one plan and one simulation each
    (S steps, R saved storages).

    Raises:
        InfeasibleBudgetError: neither the DP's plans nor ``every_block`` fit.
        UnsupportedGraphError: ``resolution < 1``.
    """
    if resolution < 1:
        raise UnsupportedGraphError(f"resolution must be at least 1, got {resolution}")
    keep_all = plan_from_decisions(graph, {root: Decision.KEEP for root in saved_roots(graph)}, SOLVER,
                                   budget_bytes, optimal=True)
    lowest_peak = simulate(graph, keep_all, check_hash=False).peak_bytes
    if lowest_peak <= budget_bytes:
        return keep_all

    segments = segment_chain(graph, every_op=every_op)
    stages, constant_bytes = chain_stages(graph, segments)
    slot_bytes = max(1, -(-budget_bytes // resolution))
    copy_ms = _copy_times(graph, stages) if (graph.transfer.real if offload is None else offload) else None
    table = _ChainTable(stages, slot_bytes, resolution, copy_ms)

    candidates: list[tuple[float, int, Plan]] = []   # (time, order of discovery, plan)
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

    every_block_keep = {root for segment in segments for root in segment.crossing_in}
    every_block = plan_from_decisions(graph, checkpoint_decisions(graph, every_block_keep), SOLVER, budget_bytes)
    result = simulate(graph, every_block, check_hash=False)
    lowest_peak = min(lowest_peak, result.peak_bytes)
    if result.peak_bytes <= budget_bytes:
        every_block = replace(every_block, options={"source": "every_block", "segments": len(segments)})
        candidates.append((result.time_ms, len(candidates), every_block))
    if not candidates:
        raise InfeasibleBudgetError(budget_bytes, lowest_peak,
                                    {f"lowest simulated peak of the chain DP over {len(segments)} segments":
                                     lowest_peak}, solver=SOLVER)
    return min(candidates, key=lambda candidate: candidate[:2])[2]


# -- stages --------------------------------------------------------------------------------------

def chain_stages(graph: Graph, segments: tuple[Segment, ...]) -> tuple[list[Stage], int]:
    """The DP's stages and the constant bytes (resident placeholders, tangents and the
    always-kept storages of the module docstring). O(ops + edges)."""
    producer_segment = root_segments(graph, segments)
    always = {graph.value(name).root for name in graph.forward_outputs}
    always |= {graph.value(name).root for op in graph.forward_ops if not op.recomputable for name in op.outputs}
    for segment in segments:
        always |= {root for root in segment.crossing_in if producer_segment[root] < segment.index - 1}
    always &= set(producer_segment)

    def size(roots: set[str]) -> int:
        return sum(graph.value(root).size_bytes for root in roots)

    inputs = [set(segment.crossing_in) - always for segment in segments] + [set()]
    backward_read = {graph.value(name).root for op in graph.backward_ops for name in op.inputs}
    gradient_roots = {graph.value(name).root for name in graph.gradients} - set(producer_segment)
    gradient_producer = {root: graph.value(root).producer for root in gradient_roots}
    stages = []
    for segment in segments:
        segment_backward = set(segment.backward_ops)
        read_here = {graph.value(name).root for op_name in segment.backward_ops
                     for name in graph.op(op_name).inputs}
        own = {root for root, k in producer_segment.items() if k == segment.index} - always
        saved = (own & backward_read) | inputs[segment.index + 1]
        workspace = max((graph.op(name).tmp_bytes for name in segment.backward_ops), default=0)
        stages.append(Stage(
            forward_ms=sum(graph.op(name).time_ms for name in segment.forward_ops),
            backward_ms=sum(graph.op(name).time_ms for name in segment.backward_ops),
            input_bytes=size(inputs[segment.index]), all_bytes=size(saved),
            transient_bytes=size(own) + max((graph.op(name).tmp_bytes for name in segment.forward_ops), default=0),
            backward_bytes=(size(own & read_here) + size(inputs[segment.index])
                            + size(inputs[segment.index + 1]) + workspace),
            backward_reads_own=bool(own & read_here),
            gradient_bytes=size({root for root in gradient_roots if gradient_producer[root] in segment_backward}),
            input_roots=tuple(root for root in producer_segment if root in inputs[segment.index])))
    placeholders = {graph.value(name).root for name in graph.placeholders}
    return stages, size(always) + sum(graph.value(root).size_bytes for root in placeholders) + graph.caller_bytes


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
        xbar = [units(stage.all_bytes) for stage in stages]
        act = [units(stage.transient_bytes) for stage in stages]
        bw = [units(stage.backward_bytes) for stage in stages]
        g = [units(stage.gradient_bytes) for stage in stages]
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
                cost, choice = [_INFINITY] * (slots + 1), [-1] * (slots + 1)
                single = stages[s].forward_ms + stages[s].backward_ms
                # alone, F(s) runs only for what B(s) reads of it (the plan drops unread re-runs);
                # the last stage is only ever reached in the forward phase, where F runs anyway
                forward_needed = stages[s].backward_reads_own or s == count - 1
                last_ms = single if forward_needed else stages[s].backward_ms
                # B(s) runs after the backward of s + 1..t made their gradients
                later_grads = grads_before[t + 1] - grads_before[s + 1]
                backward_need = x[s] + bw[s] + g[s] + later_grads
                all_need = max(x[s] + act[s] + x[t + 1], backward_need)
                last_need = all_need if forward_needed else backward_need
                # sweep_need[j]: transient of F(s)..F(j-1) run "checkpoint only" with x[s] stored
                sweep_need, running = {}, 0
                for j in range(s + 1, t + 1):
                    k = j - 1
                    running = max(running, x[s] + (x[k] if k > s else 0) + act[k] + x[t + 1])
                    sweep_need[j] = running
                for m in range(slots + 1):
                    best, best_choice = _INFINITY, -1
                    if s == t:
                        if last_need <= m:
                            best, best_choice = last_ms, _ALL
                    else:
                        if all_need <= m:
                            rest = m - x[s] - xbar[s] + x[s + 1]
                            if rest >= 0:
                                best = single + self.cost[(s + 1, t)][rest]
                                best_choice = _ALL
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
        self._x, self._xbar = x, xbar
        self.top_cost: list[list[float]] = []
        self.top_choice: list[list[int]] = []
        self.can_offload = copy_ms is not None and count > 1 and any(stage.input_roots for stage in stages)
        if self.can_offload:
            self._build_top(stages, x, xbar, act, bw, forward_prefix, copy_ms)

    def _build_top(self, stages: list[Stage], x: list[int], xbar: list[int], act: list[int], bw: list[int],
                   forward_prefix: list[float], copy_ms: list[tuple[float, float]]) -> None:
        """``top[s][m]``: stages s..L-1 from the forward phase on, with "ck-off" and
        "ck-off-late" (module docstring); choice ``kind * L + j`` with kind 0 "ck",
        1 "ck-off", 2 "ck-off-late", and 0 "all". O(L^2 * U)."""
        count, slots, last = self.count, self.slots, self.count - 1
        self.top_cost, self.top_choice = [[]] * count, [[]] * count
        self.top_cost[last], self.top_choice[last] = self.cost[(last, last)], self.choice[(last, last)]
        for s in range(last - 1, -1, -1):
            cost, choice = [_INFINITY] * (slots + 1), [-1] * (slots + 1)
            single = stages[s].forward_ms + stages[s].backward_ms
            grads = self._grads_before
            after = [grads[count] - grads[k] for k in range(count + 1)]   # after[k]: g[k] + ... + g[L-1]
            g_s = grads[s + 1] - grads[s]
            all_need = max(x[s] + act[s], x[s] + bw[s] + g_s + after[s + 1])
            sweep_need, offloaded_sweep_need, running, offloaded_running = {}, {}, 0, 0
            for j in range(s + 1, last + 1):
                k = j - 1
                running = max(running, x[s] + (x[k] if k > s else 0) + act[k])
                offloaded_running = max(offloaded_running, x[k] + act[k])   # x[s] leaves after F(s)
                sweep_need[j], offloaded_sweep_need[j] = running, offloaded_running
            to_host_ms, to_device_ms = copy_ms[s]
            offload_stall_ms = max(0.0, to_host_ms - stages[s].forward_ms)
            offloadable = bool(stages[s].input_roots) and x[s] > 0
            for m in range(slots + 1):
                best, best_choice = _INFINITY, -1
                if all_need <= m:
                    rest = m - x[s] - xbar[s] + x[s + 1]
                    if rest >= 0:
                        best, best_choice = single + self.top_cost[s + 1][rest], _ALL
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

    def sequence(self, memory: int, offload: bool = False) -> list[tuple[str, int]] | None:
        """The optimal operations (``("F", k)``, ``("B", k)``, and with ``offload``
        ``("P", s)``: prefetch x[s], right before B(j) for "ck-off" j, right after it for
        "ck-off-late" j) with ``memory`` slots, or None when the DP finds none. Explicit
        stack: no recursion limit."""
        memory = min(memory, self.slots)
        top = offload and self.can_offload
        first = self.top_cost[0] if top else self.cost[(0, self.count - 1)]
        if memory < 0 or first[memory] == _INFINITY:
            return None
        x, xbar = self._x, self._xbar
        result: list[tuple[str, int]] = []
        prefetch_before: dict[int, int] = {}    # B(j) -> s whose x[s] comes back before it
        prefetch_after: dict[int, int] = {}     # B(j) -> s whose x[s] comes back after it
        stack: list[tuple[str, int, int, int]] = [("top" if top else "solve", 0, self.count - 1, memory)]
        while stack:
            kind, s, t, m = stack.pop()
            if kind == "top":
                choice = self.top_choice[s][m]
                if s == t:
                    result += [("F", s), ("B", s)]
                elif choice == _ALL:
                    result.append(("F", s))
                    stack += [("B", s, s, 0), ("top", s + 1, t, m - x[s] - xbar[s] + x[s + 1])]
                else:
                    kind, j = divmod(choice, self.count)
                    result += [("F", k) for k in range(s, j)]
                    if kind:
                        (prefetch_before if kind == 1 else prefetch_after)[j] = s
                    rest = m - (self._grads_before[self.count] - self._grads_before[j])
                    stack += [("solve", s, j - 1, rest), ("top", j, t, m if kind else m - x[s])]
                continue
            if kind != "solve":
                result.append((kind, s))
                continue
            choice = self.choice[(s, t)][m]
            if s == t:
                result += [("F", s), ("B", s)]
            elif choice == _ALL:
                result.append(("F", s))
                stack += [("B", s, s, 0), ("solve", s + 1, t, m - x[s] - xbar[s] + x[s + 1])]
            else:
                result += [("F", k) for k in range(s, choice)]
                rest = m - (self._grads_before[t + 1] - self._grads_before[choice])
                stack += [("solve", s, choice - 1, rest), ("solve", choice, t, m - x[s])]
        if prefetch_before or prefetch_after:
            with_prefetches = []
            for kind, k in result:
                if kind == "B" and k in prefetch_before:
                    with_prefetches.append(("P", prefetch_before[k]))
                with_prefetches.append((kind, k))
                if kind == "B" and k in prefetch_after:
                    with_prefetches.append(("P", prefetch_after[k]))
            result = with_prefetches
        return result


# -- program -------------------------------------------------------------------------------------

def program_plan(graph: Graph, segments: tuple[Segment, ...], sequence: list[tuple[str, int]],
                 budget_bytes: int, options: dict, stages: list[Stage] | None = None) -> Plan:
    """The `Plan` of a DP sequence (module docstring, "Program"); ``("P", s)`` offloads the
    storages of x[s] (``stages[s].input_roots``) in the forward right after they are made,
    frees them after stage s's forward ops, and prefetches them where it stands in the
    backward. O(steps + total arity)."""
    first_backward = next(index for index, (kind, _) in enumerate(sequence) if kind != "F")
    if [k for _, k in sequence[:first_backward]] != list(range(len(segments))):
        raise AssertionError(f"chain DP sequence does not start with one forward sweep: {sequence[:first_backward]}")
    free_after: dict[str, str] = {}       # offloaded storage -> forward op after which it leaves the device
    for kind, s in sequence:
        if kind == "P":
            free_after.update((root, segments[s].forward_ops[-1]) for root in stages[s].input_roots)
    backward_runs: list[Step] = []
    reruns = [0] * len(segments)
    for kind, k in sequence[first_backward:]:
        if kind == "F":
            reruns[k] += 1
            backward_runs += [run(name) for name in segments[k].forward_ops if graph.op(name).recomputable]
        elif kind == "P":
            backward_runs += [prefetch(root) for root in stages[k].input_roots]
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
