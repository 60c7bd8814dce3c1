"""``pipeline``: split the segment chain into K contiguous stages for K devices and pick
each stage's recompute plan, minimizing the step time of M micro-batches under a named
pipeline schedule (GPipe or 1F1B), every device under its own budget.

A dynamic program over split points in the spirit of PipeDream (Narayanan et al., SOSP
2019) and of MadPipe (Beaumont, Eyraud-Dubois, Guermouche, Lambert, "MadPipe: Memory
Aware Dynamic Programming Algorithm for Pipelined Model Parallelism", IPDPS 2021), whose
stage costs come from the per-segment recompute options of `solvers.hierarchical`
instead of a fixed checkpointing policy. The baselines are torchgpipe's (Kim et al.,
"torchgpipe: On-the-fly Pipeline Parallelism for Training Giant Models", 2020) two
balancing rules, equal layers and balance by time.

The `Graph` is the joint forward+backward graph of ONE micro-batch. It is cut into the
chain of S segments of `segments.segment_chain`; segment k has forward time ``f_k``,
backward time ``g_k``, static bytes ``p_k`` (parameters and buffers its ops read,
parameters twice for their gradients), model-input bytes ``x_k`` (inputs and targets its
ops read, per micro-batch), and options o (``hierarchical.OptionCost``: ``saved_k(o)``
bytes kept to the backward, ``transient_k(o)`` bytes of working memory while it runs,
``r_k(o)`` ms of recomputation; option 0 keeps all, ``r_k(0) = 0``). ``c_i`` is the
bytes of the activation storages crossing the cut before segment i (skips counted at
every cut they pass; ``c_0 = c_S = 0``).

Memory of stage s = [a, b) on device s, M micro-batches, K stages, F_s micro-batches in
flight (GPipe: ``F_s = M``; 1F1B: ``F_s = min(M, K - s)``)::

    peak_s = static      sum(p_k + (M > 1) * w_k + M * x_k for k in [a, b))
           + receive     2M * c_a * (s > 0) + M * c_b * (s < K - 1)
           + in flight   (F_s - 1) * (saved_s + c_b)
           + working     max(saved_s, max over k in [a, b) of (sum(saved_j(o_j), a <= j < k) + transient_k(o_k)))

    saved_s = sum(saved_k(o_k) for k in [a, b))

``receive``: torch.distributed.pipelining preallocates one activation receive buffer and
one gradient receive buffer per micro-batch, the gradients of the received values of
earlier micro-batches stay alive in their pending sends (M - 1 of them), and the running
micro-batch's input is held by the stage (the segments' working memory, taken from
whole-graph replays, counts it with the segment before the cut). ``w_k``: the
gradient bytes of the segment's parameters: with several micro-batches the accumulated
``.grad`` lives beside the gradients the running micro-batch makes. Both terms were found
by measuring the ranks (`runtime.pipeline`, tests/test_pipeline_runtime.py). ``in flight``: the other micro-batches whose
backward has not run keep their saved activations and the stage's output. ``working``:
the single-device chain model of `hierarchical.choose_levels` for the micro-batch that
runs (``saved_s`` alone: the end of its forward). Differences from the brief, on the safe
side or more precise: the model inputs are counted (M micro-batches of them on the stages
that read them), and the working term includes ``saved_s``.

Time of stage s per micro-batch, and of the step::

    t_s = sum(f_k + g_k + r_k(o_k) for k in [a, b)) + (c_a + c_b) / link_bytes_per_ms
    step_time = sum(t_s) + (M - 1) * max(t_s)          bubble = step_time - M * max(t_s)

Each stage pays for what it sends: its output activations (``c_b``) forward and the
gradient of its input (``c_a``) backward, serialized with its compute. The first
micro-batch walks through every stage once (``sum t_s``) and the slowest stage works
through the other M - 1 behind it; ``bubble`` is the slowest stage's idle time. The same
formula holds for GPipe and 1F1B in this model; the schedules differ in memory (F_s).

GPipe, K = 3, M = 4, forward = backward = 1 time unit (``f``/``b`` + micro-batch)::

    s0  f1 f2 f3 f4 .  .  .  .  b4 b3 b2 b1
    s1  .  f1 f2 f3 f4 .  .  b4 b3 b2 b1 .
    s2  .  .  f1 f2 f3 f4 b4 b3 b2 b1 .  .       step = 3 * 2 + 3 * 2 = 12

1F1B runs the same number of slots but starts a micro-batch's backward as soon as it can,
so stage s never holds more than K - s micro-batches (PipeDream-Flush).

Algorithm. Bytes of the options are counted in units of ``ceil(scale / resolution)``,
``scale`` the chain's largest activation bytes (sum of every segment's largest saved bytes
plus the largest transient), rounded up (safe side); every other term is exact bytes.
The unit depends on the chain only, so more budget never gives a slower plan.

1. Stage table. For every first segment a, one pass over a, a + 1, ... keeps the Pareto
   states (saved units, working units, recompute ms, levels) after each segment; the
   cheapest state that fits device s's budget is the cost of stage [a, b) on device s,
   read from the same pass for every b and s. The keep-all plan of every stage is also
   checked in exact bytes (no recomputation costs nothing, so rounding must not forbid
   it). O(S^2 * L * P) for the passes and
   O(K * S^2 * P) for the readout, P the Pareto states of one pass (at most
   (U + 1)^2 for U = resolution, a few dozen in practice), L options per segment.
2. Split. ``sum(t_s) + (M - 1) * max(t_s)`` is not a min-max: for a cap T on the stage
   times, a DP over (stage, split point) finds the least ``sum(t_s)`` with every
   ``t_s <= T`` (ties: least max), O(K * S^2). Caps walk the Pareto front of (max, sum)
   from the top: after a solution of max T', the next cap is the largest stage cost
   below T', and the walk stops when no split is left or when its sum plus (M - 1) times
   the least possible max (a min-max DP, O(K * S^2)) cannot beat the best. O(Q * K * S^2)
   for Q points of that front (Q <= K * S^2, a handful in practice).

Optimal for this model and the discretized options: no split and no choice of the given
options whose rounded bytes fit the budgets (or, for keep-all stages, whose exact bytes
fit) has a shorter step time (with ``resolution``
at least ``scale`` the unit is one byte and the result is exactly optimal, which the tests
check against `brute_force_pipeline`). Not modelled: parameters shared by two segments of
one stage are counted twice (tied embeddings), and a segment's transient bytes come from
the single-device replay of `hierarchical.probe_costs` minus the graph's resident bytes,
so they include the gradients of later segments that the single-device backward holds;
both over-estimate the peak.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from solvers.errors import InfeasibleBudgetError, PlanFormatError, PlanMismatchError, UnsupportedGraphError
from solvers.graph import Graph, ValueKind, read_json_file, write_json_file
from solvers.hierarchical import OptionCost, probe_costs
from solvers.segment_options import SegmentOptions, segment_options
from solvers.plan import Decision
from solvers.schedule import saved_roots
from solvers.segments import Segment, boundary_roots, root_segments, segment_chain

SOLVER = "pipeline"
PIPELINE_FORMAT = "memsched.pipeline/1"
SCHEDULES = ("gpipe", "1f1b")
STAGE_PLANS = ("best", "every_block", "keep_all")
DEFAULT_LINK_BYTES_PER_MS = 10e6   # 10 GB/s


# -- the pure-data chain ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentCosts:
    """One segment of the chain: times, static bytes and recompute options (option 0 keeps
    all). ``OptionCost.need_bytes`` holds the option's *transient* bytes here: working
    memory above the resident bytes while the segment runs."""

    forward_ms: float
    backward_ms: float
    param_bytes: int                        # parameters twice (gradients), buffers once
    options: tuple[OptionCost, ...]
    model_input_bytes: int = 0              # inputs and targets its ops read, one micro-batch
    gradient_bytes: int = 0                 # its parameters' gradients (once more in .grad when M > 1)


@dataclass(frozen=True)
class PipelineChain:
    """S segments and the bytes crossing each cut: ``cut_bytes[i]`` before segment i,
    ``len(cut_bytes) == S + 1``, ``cut_bytes[S] == 0``."""

    segments: tuple[SegmentCosts, ...]
    cut_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise UnsupportedGraphError("a pipeline chain needs at least one segment")
        if len(self.cut_bytes) != len(self.segments) + 1:
            raise UnsupportedGraphError(f"cut_bytes has {len(self.cut_bytes)} entries; a chain of "
                                        f"{len(self.segments)} segments needs {len(self.segments) + 1}")
        for index, segment in enumerate(self.segments):
            if not segment.options:
                raise UnsupportedGraphError(f"segment {index} has no options; give it at least keep-all")

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def activation_scale_bytes(self) -> int:
        """Largest activation bytes any plan can hold: every segment's largest saved bytes
        plus the largest transient. The discretization unit is this over ``resolution``."""
        saved = sum(max(option.saved_bytes for option in segment.options) for segment in self.segments)
        transient = max(option.need_bytes for segment in self.segments for option in segment.options)
        return saved + transient


@dataclass(frozen=True)
class StageCost:
    """Stage ``index`` = segments [first_segment, end_segment) at option ``levels``, with
    its predicted time per micro-batch and peak (module docstring for the formulas)."""

    index: int
    first_segment: int
    end_segment: int
    levels: tuple[int, ...]
    in_flight: int                # micro-batches whose activations the stage holds at once
    budget_bytes: int
    forward_ms: float
    backward_ms: float
    recompute_ms: float
    comm_ms: float
    time_ms: float
    static_bytes: int             # parameters, gradients, buffers, model inputs
    receive_bytes: int            # preallocated receive buffers
    in_flight_bytes: int          # the other in-flight micro-batches' saved bytes and outputs
    working_bytes: int            # the running micro-batch's chain peak
    peak_bytes: int
    saved_bytes: int              # per micro-batch
    input_bytes: int              # activation bytes received per micro-batch (c_a)
    output_bytes: int             # activation bytes sent per micro-batch (c_b)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def to_json(self) -> dict[str, Any]:
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name, value in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StageCost":
        ints = ("index", "first_segment", "end_segment", "in_flight", "budget_bytes", "static_bytes",
                "receive_bytes", "in_flight_bytes", "working_bytes", "peak_bytes", "saved_bytes",
                "input_bytes", "output_bytes")
        floats = ("forward_ms", "backward_ms", "recompute_ms", "comm_ms", "time_ms")
        return cls(levels=tuple(int(level) for level in data["levels"]),
                   **{name: int(data[name]) for name in ints}, **{name: float(data[name]) for name in floats})


@dataclass(frozen=True)
class PipelineSolution:
    """A split with a plan per stage and the predicted step; ``feasible`` is False when a
    stage does not fit its budget (baselines report that instead of raising)."""

    stages: tuple[StageCost, ...]
    microbatches: int
    schedule: str
    step_time_ms: float
    bubble_ms: float
    feasible: bool

    @property
    def balance(self) -> tuple[int, ...]:
        """Segments per stage, as torchgpipe's ``balance``."""
        return tuple(stage.end_segment - stage.first_segment for stage in self.stages)


def in_flight_microbatches(stage: int, num_stages: int, microbatches: int, schedule: str) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once: M for GPipe,
    min(M, K - s) for 1F1B."""
    _check_schedule(schedule)
    return microbatches if schedule == "gpipe" else min(microbatches, num_stages - stage)


def step_time_ms(stage_times_ms: Sequence[float], microbatches: int) -> float:
    """``sum(t_s) + (M - 1) * max(t_s)``: the first micro-batch through every stage, the
    others behind the slowest one."""
    return sum(stage_times_ms) + (microbatches - 1) * max(stage_times_ms)


def evaluate_stage(chain: PipelineChain, first: int, end: int, levels: Sequence[int], *, stage: int,
                   num_stages: int, microbatches: int, schedule: str, budget_bytes: int,
                   link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS) -> StageCost:
    """The exact time and peak of one stage at the given option levels (module docstring)."""
    segments = chain.segments[first:end]
    if len(levels) != len(segments):
        raise ValueError(f"stage [{first}, {end}) has {len(segments)} segments but {len(levels)} levels")
    options = [segment.options[level] for segment, level in zip(segments, levels)]
    in_flight = in_flight_microbatches(stage, num_stages, microbatches, schedule)
    input_bytes = chain.cut_bytes[first]
    output_bytes = chain.cut_bytes[end]
    saved = sum(option.saved_bytes for option in options)
    working, before = saved, 0
    for option in options:
        working = max(working, before + option.need_bytes)
        before += option.saved_bytes
    static = _static(segments, microbatches)
    receive = _receive(input_bytes, output_bytes, stage, num_stages, microbatches)
    held = (in_flight - 1) * (saved + output_bytes)
    forward_ms = sum(s.forward_ms for s in segments)
    backward_ms = sum(s.backward_ms for s in segments)
    recompute_ms = sum(option.time_ms for option in options)
    comm_ms = (input_bytes + output_bytes) / link_bytes_per_ms
    return StageCost(index=stage, first_segment=first, end_segment=end, levels=tuple(levels), in_flight=in_flight,
                     budget_bytes=int(budget_bytes), forward_ms=forward_ms, backward_ms=backward_ms,
                     recompute_ms=recompute_ms, comm_ms=comm_ms,
                     time_ms=forward_ms + backward_ms + recompute_ms + comm_ms,
                     static_bytes=static, receive_bytes=receive, in_flight_bytes=held, working_bytes=working,
                     peak_bytes=static + receive + held + working, saved_bytes=saved, input_bytes=input_bytes,
                     output_bytes=output_bytes)


def _solution(stages: Sequence[StageCost], microbatches: int, schedule: str) -> PipelineSolution:
    times = [stage.time_ms for stage in stages]
    step = step_time_ms(times, microbatches)
    return PipelineSolution(stages=tuple(stages), microbatches=microbatches, schedule=schedule, step_time_ms=step,
                            bubble_ms=step - microbatches * max(times),
                            feasible=all(stage.fits for stage in stages))


# -- the stage table -------------------------------------------------------------------------------

State = tuple[int, int, float, tuple[int, ...]]   # saved units, working units, recompute ms, levels


class _StageTable:
    """Pareto states of every stage [a, b) (module docstring, step 1), and their readout:
    ``best[s][a][b]`` = (time ms, levels) of the fastest plan of stage [a, b) that fits
    device s, or None; ``closest[s][a][b]`` = (least estimated peak minus the budget, levels).
    Beside the states, the keep-all plan of each stage is checked in exact bytes, so a
    stage that fits without recomputation never pays for the rounding."""

    def __init__(self, chain: PipelineChain, budgets_bytes: Sequence[int], microbatches: int, schedule: str,
                 link_bytes_per_ms: float, resolution: int, prune: bool = True) -> None:
        self.chain, self.budgets = chain, list(budgets_bytes)
        self.microbatches, self.schedule, self.link = microbatches, schedule, link_bytes_per_ms
        count, stages = chain.num_segments, len(self.budgets)
        self.unit = max(1, -(-chain.activation_scale_bytes() // resolution))
        limit = max(self.budgets) if prune else None
        self.best: list[list[list[tuple[float, tuple[int, ...]] | None]]] = [
            [[None] * (count + 1) for _ in range(count + 1)] for _ in range(stages)]
        self.closest: list[list[list[tuple[int, tuple[int, ...]] | None]]] = [
            [[None] * (count + 1) for _ in range(count + 1)] for _ in range(stages)]
        for first in range(count):
            keep_saved = keep_working = 0     # the keep-all plan of [first, end), exact bytes
            passes = self._pass(first, limit)
            for end in range(first + 1, count + 1):
                option = chain.segments[end - 1].options[0]
                keep_working = max(keep_working, keep_saved + option.need_bytes, keep_saved + option.saved_bytes)
                keep_saved += option.saved_bytes
                states = passes[end - first - 1] if end - first - 1 < len(passes) else []
                for stage in range(max(0, stages - 1 - (count - end)), min(first, stages - 1) + 1):
                    if (stage == 0) != (first == 0) or (stage == stages - 1) != (end == count):
                        continue
                    self._read(stage, first, end, states, keep_saved, keep_working)

    def _static_bytes(self, first: int, end: int) -> int:
        return _static(self.chain.segments[first:end], self.microbatches)

    def _pass(self, first: int, limit: int | None) -> list[list[State]]:
        """States after each segment from ``first`` on; stops when none is left under
        ``limit`` (the peak with one micro-batch in flight, a lower bound of every
        device's peak)."""
        unit, chain = self.unit, self.chain
        receive_in = _receive(chain.cut_bytes[first], 0, int(first > 0), 2, self.microbatches)
        states: list[State] = [(0, 0, 0.0, ())]
        result = []
        for end in range(first + 1, chain.num_segments + 1):
            base = self._static_bytes(first, end) + receive_in
            following = []
            for saved, working, recompute_ms, levels in states:
                for level, option in enumerate(chain.segments[end - 1].options):
                    grown = saved + -(-option.saved_bytes // unit)
                    peak = max(working, saved + -(-option.need_bytes // unit), grown)
                    if limit is not None and base + peak * unit > limit:
                        continue
                    following.append((grown, peak, recompute_ms + option.time_ms, levels + (level,)))
            states = _pareto(following)
            if not states:
                break
            result.append(states)
        return result

    def _read(self, stage: int, first: int, end: int, states: list[State], keep_saved: int,
              keep_working: int) -> None:
        chain, stages, microbatches = self.chain, len(self.budgets), self.microbatches
        in_flight = in_flight_microbatches(stage, stages, microbatches, self.schedule)
        output = chain.cut_bytes[end]
        fixed = self._static_bytes(first, end) + _receive(chain.cut_bytes[first], output, stage, stages, microbatches)
        base_ms = (sum(s.forward_ms + s.backward_ms for s in chain.segments[first:end])
                   + (chain.cut_bytes[first] + output) / self.link)
        budget = self.budgets[stage]
        keep_all = (0,) * (end - first)
        keep_peak = fixed + (in_flight - 1) * (keep_saved + output) + keep_working
        best = (0.0, keep_all) if keep_peak <= budget else None
        closest = (keep_peak - budget, keep_all)
        for saved, working, recompute_ms, levels in states:
            peak = fixed + (in_flight - 1) * (saved * self.unit + output) + working * self.unit
            if peak <= budget and (best is None or recompute_ms < best[0]):
                best = (recompute_ms, levels)
            if peak - budget < closest[0]:
                closest = (peak - budget, levels)
        if best is not None:
            self.best[stage][first][end] = (base_ms + best[0], best[1])
        self.closest[stage][first][end] = closest


def _pareto(states: list[State]) -> list[State]:
    """The states no other state beats in saved units, working units and time at once.
    Sorted by saved units; a staircase of (working, least time) over the kept ones answers
    "is this one dominated" by bisection. O(n log n) plus the staircase updates."""
    states.sort(key=lambda state: (state[0], state[1], state[2]))
    kept = []
    stair_working: list[int] = []    # ascending
    stair_time: list[float] = []     # strictly descending
    for state in states:
        _, working, time_ms, _ = state
        position = _bisect_right(stair_working, working)
        if position > 0 and stair_time[position - 1] <= time_ms:
            continue
        kept.append(state)
        stop = position
        while stop < len(stair_working) and stair_time[stop] >= time_ms:
            stop += 1
        stair_working[position:stop] = [working]
        stair_time[position:stop] = [time_ms]
    return kept


def _bisect_right(values: list[int], x: int) -> int:
    low, high = 0, len(values)
    while low < high:
        middle = (low + high) // 2
        if x < values[middle]:
            high = middle
        else:
            low = middle + 1
    return low


# -- the split DP ------------------------------------------------------------------------------------

def _least_sum_split(table: list[list[list[float | None]]], count: int, cap: float
                     ) -> tuple[float, float, tuple[int, ...]] | None:
    """The split (stage end points) with the least sum of stage costs, every cost <= cap;
    ties: least max. (sum, max, ends) or None. O(K * S^2)."""
    stages = len(table)
    # best[b] after stage s: (sum, max, ends) of stages 0..s covering segments [0, b)
    best: list[tuple[float, float, tuple[int, ...]] | None] = [None] * (count + 1)
    for end in range(1, count + 1):
        cost = table[0][0][end]
        if cost is not None and cost <= cap:
            best[end] = (cost, cost, (end,))
    for stage in range(1, stages):
        following: list[tuple[float, float, tuple[int, ...]] | None] = [None] * (count + 1)
        for end in range(stage + 1, count + 1):
            for first in range(stage, end):
                previous, cost = best[first], table[stage][first][end]
                if previous is None or cost is None or cost > cap:
                    continue
                candidate = (previous[0] + cost, max(previous[1], cost), previous[2] + (end,))
                if following[end] is None or candidate[:2] < following[end][:2]:
                    following[end] = candidate
        best = following
    return best[count]


def _least_max_split(table: list[list[list[float | None]]], count: int) -> float | None:
    """The least possible max stage cost over all splits (torchgpipe's objective). O(K * S^2)."""
    stages = len(table)
    best: list[float | None] = [table[0][0][end] for end in range(count + 1)]
    best[0] = None
    for stage in range(1, stages):
        following: list[float | None] = [None] * (count + 1)
        for end in range(stage + 1, count + 1):
            for first in range(stage, end):
                cost = table[stage][first][end]
                if best[first] is None or cost is None:
                    continue
                candidate = max(best[first], cost)
                if following[end] is None or candidate < following[end]:
                    following[end] = candidate
        best = following
    return best[count]


def _best_split(table: list[list[list[float | None]]], count: int, microbatches: int
                ) -> tuple[int, ...] | None:
    """Ends of the split minimizing ``sum + (M - 1) * max`` (module docstring, step 2)."""
    floor = _least_max_split(table, count)
    if floor is None:
        return None
    caps = sorted({cost for per_stage in table for row in per_stage for cost in row if cost is not None})
    best: tuple[float, tuple[int, ...]] | None = None
    cap = caps[-1]
    while True:
        found = _least_sum_split(table, count, cap)
        if found is None:
            break
        total, highest, ends = found
        objective = total + (microbatches - 1) * highest
        if best is None or objective < best[0]:
            best = (objective, ends)
        if microbatches == 1 or total + (microbatches - 1) * floor >= best[0]:
            break
        below = _bisect_left(caps, highest)
        if below == 0:
            break
        cap = caps[below - 1]
    return None if best is None else best[1]


def _bisect_left(values: list[float], x: float) -> int:
    low, high = 0, len(values)
    while low < high:
        middle = (low + high) // 2
        if values[middle] < x:
            low = middle + 1
        else:
            high = middle
    return low


def _check_arguments(chain: PipelineChain, budgets_bytes: Sequence[int], microbatches: int, schedule: str,
                     link_bytes_per_ms: float) -> None:
    if len(budgets_bytes) < 1:
        raise ValueError("give one budget per stage (at least one stage)")
    if len(budgets_bytes) > chain.num_segments:
        raise UnsupportedGraphError(f"{len(budgets_bytes)} stages but the chain has only {chain.num_segments} "
                                    f"segments; use num_stages <= {chain.num_segments}")
    if microbatches < 1:
        raise ValueError(f"microbatches must be at least 1, got {microbatches}")
    _check_schedule(schedule)
    if not link_bytes_per_ms > 0:
        raise ValueError(f"link_bytes_per_ms must be positive, got {link_bytes_per_ms}")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def solve_pipeline_chain(chain: PipelineChain, budgets_bytes: Sequence[int], *, microbatches: int,
                         schedule: str = "1f1b", link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS,
                         resolution: int = 400) -> PipelineSolution:
    """The split into ``len(budgets_bytes)`` stages and the option per segment with the
    least step time whose stage peaks fit the budgets (module docstring: model, algorithm,
    complexity, optimality). Predictions are exact bytes of the chosen options.

    Raises:
        InfeasibleBudgetError: no split fits; it names the device that is furthest over
            its budget in the closest split and the budget it needs (every other device
            needing at most the same number of extra bytes).
        UnsupportedGraphError / ValueError: more stages than segments, M < 1, an unknown
            schedule, a non-positive link bandwidth or resolution.
    """
    _check_arguments(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms)
    if resolution < 1:
        raise ValueError(f"resolution must be at least 1, got {resolution}")
    stages = len(budgets_bytes)
    table = _StageTable(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution)
    times = [[[None if entry is None else entry[0] for entry in row] for row in per_stage]
             for per_stage in table.best]
    ends = _best_split(times, chain.num_segments, microbatches)
    if ends is None:
        raise _infeasible(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution)
    firsts = (0,) + ends[:-1]
    costs = [evaluate_stage(chain, first, end, table.best[stage][first][end][1], stage=stage, num_stages=stages,
                            microbatches=microbatches, schedule=schedule, budget_bytes=budgets_bytes[stage],
                            link_bytes_per_ms=link_bytes_per_ms)
             for stage, (first, end) in enumerate(zip(firsts, ends))]
    return _solution(costs, microbatches, schedule)


def _infeasible(chain: PipelineChain, budgets_bytes: Sequence[int], microbatches: int, schedule: str,
                link_bytes_per_ms: float, resolution: int) -> InfeasibleBudgetError:
    """The split whose worst stage is the least over its budget (a min-max DP over the
    unpruned table), as an error naming that stage's device and breakdown."""
    table = _StageTable(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution, prune=False)
    excess = [[[None if entry is None else float(entry[0]) for entry in row] for row in per_stage]
              for per_stage in table.closest]
    count, stages = chain.num_segments, len(budgets_bytes)
    # the same min-max DP, remembering the split
    best: list[tuple[float, tuple[int, ...]] | None] = [
        None if excess[0][0][end] is None else (excess[0][0][end], (end,)) for end in range(count + 1)]
    for stage in range(1, stages):
        following: list[tuple[float, tuple[int, ...]] | None] = [None] * (count + 1)
        for end in range(stage + 1, count + 1):
            for first in range(stage, end):
                cost = excess[stage][first][end]
                if best[first] is None or cost is None:
                    continue
                candidate = (max(best[first][0], cost), best[first][1] + (end,))
                if following[end] is None or candidate[0] < following[end][0]:
                    following[end] = candidate
        best = following
    over, ends = best[count]
    firsts = (0,) + ends[:-1]
    worst = max(range(stages), key=lambda s: (excess[s][firsts[s]][ends[s]], -s))
    cost = evaluate_stage(chain, firsts[worst], ends[worst], table.closest[worst][firsts[worst]][ends[worst]][1],
                          stage=worst, num_stages=stages, microbatches=microbatches, schedule=schedule,
                          budget_bytes=budgets_bytes[worst], link_bytes_per_ms=link_bytes_per_ms)
    return InfeasibleBudgetError(
        int(budgets_bytes[worst]), int(budgets_bytes[worst] + over),
        {f"stage {worst} static (parameters, gradients, inputs)": cost.static_bytes,
         "receive buffers": cost.receive_bytes, f"{cost.in_flight - 1} other micro-batches in flight":
         cost.in_flight_bytes, "working": cost.working_bytes, "extra bytes every device needs": int(over)},
        solver=f"{SOLVER}, device {worst} of {stages}, balance {tuple(e - f for f, e in zip(firsts, ends))}")


# -- reference and baselines -----------------------------------------------------------------------

def _balances(count: int, stages: int):
    """Every way to give each of ``stages`` stages at least one of ``count`` segments."""
    for cuts in itertools.combinations(range(1, count), stages - 1):
        bounds = (0,) + cuts + (count,)
        yield tuple(end - first for first, end in zip(bounds, bounds[1:]))


def brute_force_pipeline(chain: PipelineChain, budgets_bytes: Sequence[int], *, microbatches: int,
                         schedule: str = "1f1b",
                         link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS) -> PipelineSolution:
    """Every split times every option of every segment, exact bytes: the reference of
    the tests. O(C(S-1, K-1) * prod(L_k) * S); for S <= 6 segments.

    Raises:
        InfeasibleBudgetError: nothing fits; ``least_feasible_bytes - budget_bytes`` is the
            least number of extra bytes that, given to every device, makes a plan fit.
    """
    _check_arguments(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms)
    stages = len(budgets_bytes)
    best: tuple[float, PipelineSolution] | None = None
    closest: tuple[int, int] | None = None     # (max over stages of peak - budget, device)
    for balance in _balances(chain.num_segments, stages):
        ends = tuple(itertools.accumulate(balance))
        firsts = (0,) + ends[:-1]
        for levels in itertools.product(*(range(len(segment.options)) for segment in chain.segments)):
            costs = [evaluate_stage(chain, first, end, levels[first:end], stage=stage, num_stages=stages,
                                    microbatches=microbatches, schedule=schedule,
                                    budget_bytes=budgets_bytes[stage], link_bytes_per_ms=link_bytes_per_ms)
                     for stage, (first, end) in enumerate(zip(firsts, ends))]
            over = max((cost.peak_bytes - cost.budget_bytes, -cost.index) for cost in costs)
            if closest is None or over < closest:
                closest = over
            if over[0] <= 0:
                solution = _solution(costs, microbatches, schedule)
                if best is None or solution.step_time_ms < best[0]:
                    best = (solution.step_time_ms, solution)
    if best is None:
        assert closest is not None
        over_bytes, device = closest[0], -closest[1]
        return_error = InfeasibleBudgetError(int(budgets_bytes[device]), int(budgets_bytes[device] + over_bytes),
                                             {"extra bytes every device needs": over_bytes},
                                             solver=f"brute_force_pipeline, device {device}")
        raise return_error
    return best[1]


def split_equal_layers(chain: PipelineChain, num_stages: int) -> tuple[int, ...]:
    """torchgpipe's naive balance: S // K segments per stage, the S % K left over going
    one each to the first stages. Raises ValueError when K < 1 or K > S."""
    count = chain.num_segments
    if not 1 <= num_stages <= count:
        raise ValueError(f"num_stages must be between 1 and the {count} segments, got {num_stages}")
    base, extra = divmod(count, num_stages)
    return tuple(base + (stage < extra) for stage in range(num_stages))


def split_balance_by_time(chain: PipelineChain, num_stages: int) -> tuple[int, ...]:
    """torchgpipe's ``balance_by_time`` objective: the contiguous split minimizing the
    largest per-stage forward + backward time, everything kept, no transfers. torchgpipe
    solves it with a block-partition heuristic; this is the exact min-max DP, O(K * S^2),
    ties to the earliest cuts. Raises ValueError when K < 1 or K > S."""
    count = chain.num_segments
    if not 1 <= num_stages <= count:
        raise ValueError(f"num_stages must be between 1 and the {count} segments, got {num_stages}")
    prefix = [0.0]
    for segment in chain.segments:
        prefix.append(prefix[-1] + segment.forward_ms + segment.backward_ms)
    best: list[tuple[float, tuple[int, ...]] | None] = [None] + [(prefix[end], (end,)) for end in range(1, count + 1)]
    for stage in range(1, num_stages):
        following: list[tuple[float, tuple[int, ...]] | None] = [None] * (count + 1)
        for end in range(stage + 1, count + 1):
            for first in range(stage, end):
                if best[first] is None:
                    continue
                candidate = (max(best[first][0], prefix[end] - prefix[first]), best[first][1] + (end,))
                if following[end] is None or candidate[0] < following[end][0]:
                    following[end] = candidate
        best = following
    ends = best[count][1]
    return tuple(end - first for first, end in zip((0,) + ends[:-1], ends))


def evaluate_split(chain: PipelineChain, balance: Sequence[int], budgets_bytes: Sequence[int], *, microbatches: int,
                   schedule: str = "1f1b", stage_plan: str = "best",
                   link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS, resolution: int = 400) -> PipelineSolution:
    """A given split (segments per stage) under the same model, each stage's plan chosen by
    ``stage_plan``: ``"best"`` the fastest discretized option choice that fits (the
    closest to fitting when none does), ``"keep_all"`` option 0 everywhere,
    ``"every_block"`` keep-all where the stage fits with it and otherwise every segment
    of the stage at its last option (``torch.utils.checkpoint`` on every block). A stage
    over its budget gives ``feasible=False``; nothing raises for that."""
    _check_arguments(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms)
    if stage_plan not in STAGE_PLANS:
        raise ValueError(f"unknown stage_plan {stage_plan!r}; choose one of {', '.join(STAGE_PLANS)}")
    stages = len(budgets_bytes)
    if len(balance) != stages or any(size < 1 for size in balance) or sum(balance) != chain.num_segments:
        raise ValueError(f"balance {tuple(balance)} must give each of the {stages} stages at least one segment "
                         f"and cover the {chain.num_segments} segments")
    ends = tuple(itertools.accumulate(balance))
    firsts = (0,) + ends[:-1]
    table = (_StageTable(chain, budgets_bytes, microbatches, schedule, link_bytes_per_ms, resolution, prune=False)
             if stage_plan == "best" else None)
    costs = []
    for stage, (first, end) in enumerate(zip(firsts, ends)):
        def cost(levels: Sequence[int]) -> StageCost:
            return evaluate_stage(chain, first, end, levels, stage=stage, num_stages=stages,
                                  microbatches=microbatches, schedule=schedule,
                                  budget_bytes=budgets_bytes[stage], link_bytes_per_ms=link_bytes_per_ms)
        keep_all = cost([0] * (end - first))
        if stage_plan == "keep_all" or (stage_plan == "every_block" and keep_all.fits):
            costs.append(keep_all)
        elif stage_plan == "every_block":
            costs.append(cost([len(segment.options) - 1 for segment in chain.segments[first:end]]))
        else:
            entry = table.best[stage][first][end] or table.closest[stage][first][end]
            costs.append(cost(entry[1]))
    return _solution(costs, microbatches, schedule)


# -- the graph layer -----------------------------------------------------------------------------

def pipeline_chain(graph: Graph, *, options_per_segment: int = 8
                   ) -> tuple[PipelineChain, tuple[Segment, ...], list[SegmentOptions]]:
    """The graph's segment chain as a `PipelineChain`, with the segments and their options.

    Options and their costs come from `hierarchical.segment_options` and one
    `hierarchical.probe_costs` (L replays of the whole graph); an option's transient bytes
    are its probed need minus the graph's resident bytes (parameters, buffers, inputs),
    at least 0. ``param_bytes``: the parameter storages a segment's ops read, twice (the
    gradient), and its buffers once; ``model_input_bytes``: the input storages they read.
    ``cut_bytes`` from `segments.boundary_roots`. O(L * N + S * (ops + edges)).
    """
    if options_per_segment < 2:
        raise UnsupportedGraphError(f"options_per_segment must be at least 2 (keep all, checkpoint), "
                                    f"got {options_per_segment}")
    segments = segment_chain(graph)
    options = segment_options(graph, segments, options_per_segment)
    costs = probe_costs(graph, segments, options)
    resident = graph.resident_bytes()
    weights = {ValueKind.PARAMETER: 2, ValueKind.BUFFER: 1}
    chain_segments = []
    for segment, segment_costs in zip(segments, costs):
        names = segment.forward_ops + segment.backward_ops
        # an op that only makes views (the trace's detach of every parameter, at the very
        # start) does not make its segment hold the parameter: the ops reading the view do
        roots = dict.fromkeys(graph.value(value).root for name in names if not _only_views(graph, name)
                              for value in graph.op(name).inputs)
        placeholders = [graph.value(root) for root in roots if graph.value(root).kind.is_placeholder]
        chain_segments.append(SegmentCosts(
            forward_ms=sum(graph.op(name).time_ms for name in segment.forward_ops),
            backward_ms=sum(graph.op(name).time_ms for name in segment.backward_ops),
            param_bytes=sum(weights.get(value.kind, 0) * value.size_bytes for value in placeholders),
            gradient_bytes=sum(value.size_bytes for value in placeholders if value.kind is ValueKind.PARAMETER),
            model_input_bytes=sum(value.size_bytes for value in placeholders if value.kind is ValueKind.INPUT),
            options=tuple(OptionCost(cost.saved_bytes, max(0, cost.need_bytes - resident), cost.time_ms)
                          for cost in segment_costs)))
    cuts = [0] + [sum(graph.value(root).size_bytes for root in boundary_roots(graph, segments, index))
                  for index in range(1, len(segments))] + [0]
    return PipelineChain(tuple(chain_segments), tuple(cuts)), segments, options


def _static(segments: Sequence[SegmentCosts], microbatches: int) -> int:
    """Parameters, their gradients (and the accumulated ``.grad`` beside the next
    micro-batch's when M > 1), buffers, and the model inputs of M micro-batches."""
    return sum(s.param_bytes + (microbatches > 1) * s.gradient_bytes + microbatches * s.model_input_bytes
               for s in segments)


def _receive(input_bytes: int, output_bytes: int, stage: int, num_stages: int, microbatches: int) -> int:
    """The receive buffers torch preallocates (one activation and one gradient buffer per
    micro-batch), the input gradients of earlier micro-batches waiting in their sends, and
    the running micro-batch's input as the stage's forward holds it."""
    first, last = stage == 0, stage == num_stages - 1
    return (microbatches * input_bytes * (not first) + microbatches * output_bytes * (not last)
            + microbatches * input_bytes * (not first))


def _only_views(graph: Graph, op_name: str) -> bool:
    """Whether every output of the op is a view or alias (no storage of its own)."""
    outputs = graph.op(op_name).outputs
    return bool(outputs) and all(graph.value(name).alias_of is not None for name in outputs)


def solve_pipeline(graph: Graph, budgets_bytes: Sequence[int] | int, *, num_stages: int, microbatches: int,
                   schedule: str = "1f1b", link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS,
                   options_per_segment: int = 8, resolution: int = 400) -> PipelinePlan:
    """Split ``graph`` (one micro-batch's joint step) into ``num_stages`` pipeline stages
    and choose every stage's recompute plan: the least predicted step time for
    ``microbatches`` micro-batches under ``schedule`` ("gpipe" or "1f1b") with every
    device's peak within its budget (one int for all devices, or one per stage). Module
    docstring: model, complexity, optimality.

    Raises:
        InfeasibleBudgetError: no split fits; names the device and the budget it needs.
        UnsupportedGraphError: more stages than the graph has segments.
        ValueError: num_stages or microbatches < 1, unknown schedule, wrong budget count.
    """
    started = time.perf_counter()
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if isinstance(budgets_bytes, int):
        budgets = [budgets_bytes] * num_stages
    else:
        budgets = [int(budget) for budget in budgets_bytes]
        if len(budgets) != num_stages:
            raise ValueError(f"{len(budgets)} budgets for {num_stages} stages; give one budget per stage "
                             "or a single int for all of them")
    if microbatches < 1:
        raise ValueError(f"microbatches must be at least 1, got {microbatches}")
    _check_schedule(schedule)
    chain, segments, options = pipeline_chain(graph, options_per_segment=options_per_segment)
    if num_stages > chain.num_segments:
        raise UnsupportedGraphError(f"graph {graph.name!r} cuts into {chain.num_segments} segments, too few for "
                                    f"{num_stages} stages; use num_stages <= {chain.num_segments}")
    solution = solve_pipeline_chain(chain, budgets, microbatches=microbatches, schedule=schedule,
                                    link_bytes_per_ms=link_bytes_per_ms, resolution=resolution)
    return plan_from_solution(graph, segments, options, solution, budgets, link_bytes_per_ms=link_bytes_per_ms,
                              solve_time_s=time.perf_counter() - started,
                              settings={"options_per_segment": options_per_segment, "resolution": resolution,
                                       "segments": chain.num_segments})


# -- the plan --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StagePlan:
    """One stage: its ops, the decision for every saved storage its segments own, and its
    predicted cost (``cost.levels``: the option level per segment)."""

    index: int
    forward_ops: tuple[str, ...]
    backward_ops: tuple[str, ...]
    decisions: Mapping[str, Decision]
    cost: StageCost

    @property
    def first_segment(self) -> int:
        return self.cost.first_segment

    @property
    def end_segment(self) -> int:
        return self.cost.end_segment

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "forward_ops": list(self.forward_ops), "backward_ops": list(self.backward_ops),
                "decisions": {root: decision.value for root, decision in sorted(self.decisions.items())},
                "cost": self.cost.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StagePlan":
        return cls(index=int(data["index"]), forward_ops=tuple(str(n) for n in data["forward_ops"]),
                   backward_ops=tuple(str(n) for n in data["backward_ops"]),
                   decisions={str(root): Decision(value) for root, value in data["decisions"].items()},
                   cost=StageCost.from_json(data["cost"]))


@dataclass(frozen=True)
class PipelinePlan:
    """A pipeline split of one graph: per stage its ops, decisions and predictions, and the
    predicted step. JSON only (format ``memsched.pipeline/1``)."""

    graph_hash: str
    num_stages: int
    microbatches: int
    schedule: str
    link_bytes_per_ms: float
    budgets_bytes: tuple[int, ...]
    stages: tuple[StagePlan, ...]
    predicted_step_time_ms: float
    bubble_ms: float
    feasible: bool = True
    solve_time_s: float = 0.0
    solver: str = SOLVER
    options: Mapping[str, Any] = field(default_factory=dict)
    graph: Graph | None = field(default=None, compare=False, repr=False)

    def stage_of_op(self) -> dict[str, int]:
        """Op name -> stage index, forward and backward ops."""
        return {name: stage.index for stage in self.stages for name in stage.forward_ops + stage.backward_ops}

    @property
    def decisions(self) -> dict[str, Decision]:
        """Every stage's decisions in one mapping (roots are owned by one stage each)."""
        return {root: decision for stage in self.stages for root, decision in stage.decisions.items()}

    def check_graph(self, graph: Graph) -> None:
        """Raise `PlanMismatchError` unless this plan was made for ``graph``."""
        if graph.hash != self.graph_hash:
            raise PlanMismatchError(
                f"pipeline plan was made for graph {self.graph_hash} but this model traces to graph {graph.hash}; "
                "the model, its input shapes or dtypes changed since the plan was saved. Re-plan with "
                "solve_pipeline(graph, budgets_bytes, num_stages=..., microbatches=...)")

    def to_json(self) -> dict[str, Any]:
        return {"format": PIPELINE_FORMAT, "graph_hash": self.graph_hash, "solver": self.solver,
                "num_stages": self.num_stages, "microbatches": self.microbatches, "schedule": self.schedule,
                "link_bytes_per_ms": self.link_bytes_per_ms, "budgets_bytes": list(self.budgets_bytes),
                "stages": [stage.to_json() for stage in self.stages],
                "predicted_step_time_ms": self.predicted_step_time_ms, "bubble_ms": self.bubble_ms,
                "feasible": self.feasible, "solve_time_s": self.solve_time_s, "options": dict(self.options),
                **({"graph": self.graph.to_json()} if self.graph is not None else {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PipelinePlan":
        if not isinstance(data, Mapping) or data.get("format") != PIPELINE_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise PlanFormatError(f"not a memsched pipeline plan: format {found!r}, expected {PIPELINE_FORMAT!r}")
        graph = Graph.from_json(data["graph"]) if "graph" in data else None
        if graph is not None and graph.hash != data.get("graph_hash"):
            raise PlanFormatError(f"pipeline plan embeds graph {graph.hash} but names graph {data.get('graph_hash')}")
        try:
            plan = cls(graph=graph, graph_hash=str(data["graph_hash"]), solver=str(data["solver"]),
                       num_stages=int(data["num_stages"]), microbatches=int(data["microbatches"]),
                       schedule=str(data["schedule"]), link_bytes_per_ms=float(data["link_bytes_per_ms"]),
                       budgets_bytes=tuple(int(b) for b in data["budgets_bytes"]),
                       stages=tuple(StagePlan.from_json(stage) for stage in data["stages"]),
                       predicted_step_time_ms=float(data["predicted_step_time_ms"]),
                       bubble_ms=float(data["bubble_ms"]), feasible=bool(data.get("feasible", True)),
                       solve_time_s=float(data.get("solve_time_s", 0.0)), options=dict(data.get("options", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PlanFormatError(f"corrupt memsched pipeline plan: {error!r}") from error
        if plan.schedule not in SCHEDULES or len(plan.stages) != plan.num_stages or \
                len(plan.budgets_bytes) != plan.num_stages or \
                [stage.index for stage in plan.stages] != list(range(plan.num_stages)):
            raise PlanFormatError(f"corrupt memsched pipeline plan: {len(plan.stages)} stages, "
                                  f"{len(plan.budgets_bytes)} budgets and schedule {plan.schedule!r} "
                                  f"for num_stages {plan.num_stages}")
        return plan

    def save(self, path: str) -> None:
        write_json_file(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "PipelinePlan":
        return cls.from_json(read_json_file(path))


def plan_from_solution(graph: Graph, segments: tuple[Segment, ...], options: list[SegmentOptions],
                       solution: PipelineSolution, budgets_bytes: Sequence[int], *,
                       link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS, solve_time_s: float = 0.0,
                       settings: Mapping[str, Any] | None = None) -> PipelinePlan:
    """The `PipelinePlan` of a chain solution (from `solve_pipeline_chain` or a baseline's
    `evaluate_split` on ``pipeline_chain(graph)``): every saved storage a stage's segments
    own is recomputed when its segment's option drops it, kept otherwise. The graph is
    embedded. O(ops + values)."""
    owner = root_segments(graph, segments)
    stages = []
    for cost in solution.stages:
        dropped = {root for segment, level in zip(range(cost.first_segment, cost.end_segment), cost.levels)
                   for root in options[segment].dropped(level)}
        decisions = {root: Decision.RECOMPUTE if root in dropped else Decision.KEEP for root in saved_roots(graph)
                     if cost.first_segment <= owner.get(root, -1) < cost.end_segment}
        own = segments[cost.first_segment:cost.end_segment]
        stages.append(StagePlan(index=cost.index, forward_ops=tuple(n for s in own for n in s.forward_ops),
                                backward_ops=tuple(n for s in own for n in s.backward_ops),
                                decisions=decisions, cost=cost))
    return PipelinePlan(graph_hash=graph.hash, num_stages=len(stages), microbatches=solution.microbatches,
                        schedule=solution.schedule, link_bytes_per_ms=link_bytes_per_ms,
                        budgets_bytes=tuple(int(b) for b in budgets_bytes), stages=tuple(stages),
                        predicted_step_time_ms=solution.step_time_ms, bubble_ms=solution.bubble_ms,
                        feasible=solution.feasible, solve_time_s=solve_time_s, options=dict(settings or {}),
                        graph=graph)
