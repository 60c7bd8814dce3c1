"""``chain``: the Rotor dynamic program over the chain of segments, with multiple recomputation.

Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova, "Optimal checkpointing for heterogeneous
chains: how to train deep neural networks with limited memory" (2019): a Revolve-like
schedule where a stage's forward may run several times during the backward.

Stages are the segments of `segments.segment_chain`. Stage k has forward time ``uf[k]``,
backward time ``ub[k]``, input bytes ``x[k]`` (the storages produced by stage k - 1 that stage
k reads: what must be kept to run it again), ``xbar[k]`` (what a forward "with all saved"
keeps for the backward, its output ``x[k + 1]`` included), ``act[k]`` (its transient
activations) and ``bw[k]`` (its backward's gradients and workspace). Storages that are always
kept: skip tensors (read more than one stage after the one that makes them), outputs of
ops that cannot run twice (buffer updates), forward outputs; they are a constant.

DP. ``opt(s, t, m)``: least time to run the backward of stages s..t with memory ``m`` (in
slots, ``x[s]`` stored, the gradient of ``x[t + 1]`` alive):

    s == t:   uf[s] + ub[s]                                   F_all(s), B(s)
    "all":    uf[s] + opt(s + 1, t, m - x[s] - xbar[s] + x[s + 1]) + ub[s]
    "ck" j:   uf[s..j-1] + opt(j, t, m - x[s]) + opt(s, j - 1, m)       s < j <= t

each option only where its transient memory fits. Sizes are rounded up and the memory
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

Check. The DP's memory model is approximate (gradients of parameters, workspaces, aliases),
so the plan is replayed by `simulate`; the DP's top-level memory is bisected to the
largest value whose plan fits. ``every_block`` is a candidate too, so the result is never
slower than it when it fits. Optimal only under the DP's model (not proved for the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from solvers.baselines import plan_from_decisions
from solvers.checkpoint_baselines import checkpoint_decisions
from solvers.errors import InfeasibleBudgetError, UnsupportedGraphError
from solvers.graph import Graph, Phase
from solvers.plan import Decision, Plan, Step, StepKind, run
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
    backward_bytes: int     # bw[k]: gradients of its input and output, backward workspace


@register(SOLVER)
def solve_chain(graph: Graph, budget_bytes: int, *, resolution: int = 200, max_bisections: int = 10) -> Plan:
    """Least-time Rotor schedule over the segment chain that `simulate` fits in the budget.

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

    segments = segment_chain(graph)
    stages, constant_bytes = chain_stages(graph, segments)
    slot_bytes = max(1, -(-budget_bytes // resolution))
    table = _ChainTable(stages, slot_bytes, resolution)

    candidates: list[tuple[float, int, Plan]] = []   # (time, order of discovery, plan)
    low, high = -1, resolution + 1
    memory = max(0, (budget_bytes - constant_bytes) // slot_bytes)   # the model's own guess first
    for _ in range(max_bisections + 1):
        sequence = table.sequence(memory)
        if sequence is None:
            low = memory
        else:
            plan = program_plan(graph, segments, sequence, budget_bytes, {"dp_memory_bytes": memory * slot_bytes})
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
    stages = []
    for segment in segments:
        own = {root for root, k in producer_segment.items() if k == segment.index} - always
        saved = (own & backward_read) | inputs[segment.index + 1]
        workspace = max((graph.op(name).tmp_bytes for name in segment.backward_ops), default=0)
        stages.append(Stage(
            forward_ms=sum(graph.op(name).time_ms for name in segment.forward_ops),
            backward_ms=sum(graph.op(name).time_ms for name in segment.backward_ops),
            input_bytes=size(inputs[segment.index]), all_bytes=size(saved),
            transient_bytes=size(own) + max((graph.op(name).tmp_bytes for name in segment.forward_ops), default=0),
            backward_bytes=size(inputs[segment.index]) + size(inputs[segment.index + 1]) + workspace))
    placeholders = {graph.value(name).root for name in graph.placeholders}
    return stages, size(always) + sum(graph.value(root).size_bytes for root in placeholders) + graph.caller_bytes


class _ChainTable:
    """``cost[s][t][m]`` and ``choice[s][t][m]`` of the DP (module docstring) for every m."""

    def __init__(self, stages: list[Stage], slot_bytes: int, slots: int) -> None:
        def units(size: int) -> int:
            return -(-size // slot_bytes)

        count = len(stages)
        x = [units(stage.input_bytes) for stage in stages] + [0]
        xbar = [units(stage.all_bytes) for stage in stages]
        act = [units(stage.transient_bytes) for stage in stages]
        bw = [units(stage.backward_bytes) for stage in stages]
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
                all_need = max(x[s] + act[s] + x[t + 1], x[s] + xbar[s] + bw[s])
                # sweep_need[j]: transient of F(s)..F(j-1) run "checkpoint only" with x[s] stored
                sweep_need, running = {}, 0
                for j in range(s + 1, t + 1):
                    k = j - 1
                    running = max(running, x[s] + (x[k] if k > s else 0) + act[k] + x[t + 1])
                    sweep_need[j] = running
                for m in range(slots + 1):
                    best, best_choice = _INFINITY, -1
                    if s == t:
                        if all_need <= m:
                            best, best_choice = single, _ALL
                    else:
                        if all_need <= m:
                            rest = m - x[s] - xbar[s] + x[s + 1]
                            if rest >= 0:
                                best = single + self.cost[(s + 1, t)][rest]
                                best_choice = _ALL
                        for j in range(s + 1, t + 1):
                            if sweep_need[j] > m or m - x[s] < 0:
                                continue
                            total = (forward_prefix[j] - forward_prefix[s] + self.cost[(j, t)][m - x[s]]
                                     + self.cost[(s, j - 1)][m])
                            if total < best:
                                best, best_choice = total, j
                    cost[m], choice[m] = best, best_choice
                self.cost[(s, t)], self.choice[(s, t)] = cost, choice
        self._x, self._xbar = x, xbar

    def sequence(self, memory: int) -> list[tuple[str, int]] | None:
        """The optimal operations (``("F", k)`` or ``("B", k)``) with ``memory`` slots, or
        None when the DP finds none. Explicit stack: no recursion limit."""
        memory = min(memory, self.slots)
        if memory < 0 or self.cost[(0, self.count - 1)][memory] == _INFINITY:
            return None
        x, xbar = self._x, self._xbar
        result: list[tuple[str, int]] = []
        stack: list[tuple[str, int, int, int]] = [("solve", 0, self.count - 1, memory)]
        while stack:
            kind, s, t, m = stack.pop()
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
                stack += [("solve", s, choice - 1, m), ("solve", choice, t, m - x[s])]
        return result


# -- program -------------------------------------------------------------------------------------

def program_plan(graph: Graph, segments: tuple[Segment, ...], sequence: list[tuple[str, int]],
                 budget_bytes: int, options: dict) -> Plan:
    """The `Plan` of a DP sequence (module docstring, "Program"). O(steps + total arity)."""
    first_backward = next(index for index, (kind, _) in enumerate(sequence) if kind == "B")
    if [k for _, k in sequence[:first_backward]] != list(range(len(segments))):
        raise AssertionError(f"chain DP sequence does not start with one forward sweep: {sequence[:first_backward]}")
    forward_runs = [run(op.name) for op in graph.forward_ops]
    backward_runs: list[Step] = []
    reruns = [0] * len(segments)
    for kind, k in sequence[first_backward:]:
        if kind == "F":
            reruns[k] += 1
            backward_runs += [run(name) for name in segments[k].forward_ops if graph.op(name).recomputable]
        else:
            backward_runs += [run(name) for name in segments[k].backward_ops]
    backward_runs, needed = _drop_unread_reruns(graph, backward_runs)
    placeholders = set(graph.placeholders)
    kept = (needed - placeholders) | set(graph.forward_outputs)
    forward = insert_frees(graph, forward_runs, live_out=kept)
    backward = insert_frees(graph, backward_runs, live_out=set(graph.gradients), live_in=kept | placeholders)
    kept_roots = {graph.value(name).root for name in kept}
    decisions = {root: Decision.KEEP if root in kept_roots else Decision.RECOMPUTE for root in saved_roots(graph)}
    return Plan(graph_hash=graph.hash, solver=SOLVER, budget_bytes=budget_bytes, forward=forward,
                backward=backward, decisions=decisions,
                options={**options, "source": "dp", "segments": len(segments), "forward_reruns": reruns})


def _drop_unread_reruns(graph: Graph, steps: list[Step]) -> tuple[list[Step], set[str]]:
    """Remove forward-op runs none of whose outputs is read before being defined again;
    also return the values read before any definition (what the forward must keep).
    One reverse pass: a removed run adds no reads. O(steps + total arity)."""
    needed = set(graph.gradients)
    kept_reversed = []
    for step in reversed(steps):
        op = graph.op(step.name)
        if op.phase is Phase.FORWARD and step.kind is StepKind.RUN and not needed.intersection(op.outputs):
            continue
        needed.difference_update(op.outputs)
        needed.update(op.inputs)
        kept_reversed.append(step)
    return kept_reversed[::-1], needed
