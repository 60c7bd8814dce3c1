"""``pipeline_cost``: the one cost model of a pipeline stage, its predicted peak bytes on
its device and its time per micro-batch, under a named schedule. The split DP
(`solvers.pipeline_split`), its stage table, the baselines, the brute-force reference and
the runtime's per-rank planning (`planner.pipeline`) all price a stage with
`StageSpec.cost`.

Schedules: GPipe (Huang et al., "GPipe: Efficient Training of Giant Neural Networks using
Pipeline Parallelism", NeurIPS 2019) runs every micro-batch's forward, then every
backward; 1F1B (PipeDream, Narayanan et al., SOSP 2019, in its flushed form
PipeDream-Flush, Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training",
ICML 2021) starts a micro-batch's backward as soon as it can, so stage s never holds more
than K - s micro-batches. Both as ``torch.distributed.pipelining`` runs them
(``ScheduleGPipe``, ``Schedule1F1B``).

The chain. The joint forward+backward graph of ONE micro-batch is cut into S segments
(`kernel.segments.segment_chain`; `solvers.pipeline_graph` builds the `PipelineChain`); segment k
has forward time ``f_k``, backward time ``g_k``, static bytes ``p_k`` (parameters and
buffers its ops read, parameters twice for their gradients), gradient bytes ``w_k`` (its
parameters'), model-input bytes ``x_k`` (inputs and targets its ops read, per
micro-batch), and options o (``kernel.options.OptionCost``: ``saved_k(o)`` bytes kept to the
backward, ``transient_k(o)`` bytes of working memory while it runs, ``r_k(o)`` ms of
recomputation; option 0 keeps all, ``r_k(0) = 0``). ``c_i`` is the bytes of the
activation storages crossing the cut before segment i (skips counted at every cut they
pass; ``c_0 = c_S = 0``).

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
whole-graph replays, counts it with the segment before the cut). ``w_k``: with several
micro-batches the accumulated ``.grad`` lives beside the gradients the running
micro-batch makes. Both terms were found by measuring the ranks (`runtime.pipeline`,
tests/test_pipeline_runtime.py). ``in flight``: the other micro-batches whose backward has
not run keep their saved activations and the stage's output. ``working``: the
single-device chain model of `hierarchical.choose_levels` for the micro-batch that runs
(`run_segment`; ``saved_s`` alone: the end of its forward). On the safe side: the model
inputs are counted (M micro-batches of them on the stages that read them), and the
working term includes ``saved_s``.

A stage planned as a model of its own (`planner.pipeline`: one rank's slice, traced and
planned with the single-device solvers) has no segments: its plan's predicted peak is the
working term and already counts its parameters, their gradients, its buffers and the
running micro-batch's input (``StageSpec.input_in_working``), and a micro-batch in flight
keeps only the stage's own outputs (values passed through live in their receive buffers:
``StageSpec.kept_output_bytes``).

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
so stage s never holds more than K - s micro-batches.

Not modelled: parameters shared by two segments of one stage are counted twice (tied
embeddings), and a segment's transient bytes come from the single-device replay of
`kernel.options.probe_costs` minus the graph's resident bytes, so they include the
gradients of later segments that the single-device backward holds; both over-estimate
the peak. Pricing one stage is O(b - a).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from solvers.errors import OptionError, UnsupportedGraphError
from solvers.kernel.options import OptionCost

SCHEDULES = ("gpipe", "1f1b")
DEFAULT_LINK_BYTES_PER_MS = 10e6   # 10 GB/s


def check_schedule(schedule: str) -> None:
    """Raise `OptionError` unless ``schedule`` is one of `SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise OptionError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def in_flight_microbatches(stage: int, num_stages: int, microbatches: int, schedule: str) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once: M for GPipe,
    min(M, K - s) for 1F1B."""
    check_schedule(schedule)
    return microbatches if schedule == "gpipe" else min(microbatches, num_stages - stage)


def step_time_ms(stage_times_ms: Sequence[float], microbatches: int) -> float:
    """``sum(t_s) + (M - 1) * max(t_s)``: the first micro-batch through every stage, the
    others behind the slowest one."""
    return sum(stage_times_ms) + (microbatches - 1) * max(stage_times_ms)


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
        plus the largest transient. The stage table's discretization unit is this over
        its ``resolution``."""
        saved = sum(max(option.saved_bytes for option in segment.options) for segment in self.segments)
        transient = max(option.need_bytes for segment in self.segments for option in segment.options)
        return saved + transient


def check_pipeline_arguments(chain: PipelineChain, budgets_bytes: Sequence[int], microbatches: int, schedule: str,
                             link_bytes_per_ms: float) -> None:
    """The checks every chain-level solver makes before it prices a stage.

    Raises:
        UnsupportedGraphError: more stages (budgets) than the chain has segments.
        OptionError: no budget, M < 1, an unknown schedule, a non-positive link bandwidth.
    """
    if len(budgets_bytes) < 1:
        raise OptionError("give one budget per stage (at least one stage)")
    if len(budgets_bytes) > chain.num_segments:
        raise UnsupportedGraphError(f"{len(budgets_bytes)} stages but the chain has only {chain.num_segments} "
                                    f"segments; use num_stages <= {chain.num_segments}")
    if microbatches < 1:
        raise OptionError(f"microbatches must be at least 1, got {microbatches}")
    check_schedule(schedule)
    if not link_bytes_per_ms > 0:
        raise OptionError(f"link_bytes_per_ms must be positive, got {link_bytes_per_ms}")


# -- the cost model --------------------------------------------------------------------------------

def run_segment(saved_bytes: int, working_bytes: int, option_saved_bytes: int, option_need_bytes: int
                ) -> tuple[int, int]:
    """The chain model of ``working``: after segments that saved ``saved_bytes`` and peaked
    at ``working_bytes``, one more segment at an option that saves ``option_saved_bytes``
    and needs ``option_need_bytes`` while it runs. Returns (saved, working) after it. Works
    in any unit (the stage table runs it on rounded units)."""
    grown = saved_bytes + option_saved_bytes
    return grown, max(working_bytes, saved_bytes + option_need_bytes, grown)


class StagePlace(NamedTuple):
    """Where a stage runs in the pipeline, as far as its cost is concerned."""

    in_flight: int      # F_s: micro-batches whose activations it holds at once
    receives: bool      # s > 0: receives activations, sends back their gradients
    sends: bool         # s < K - 1: sends activations, receives their gradients

    @classmethod
    def of(cls, stage: int, num_stages: int, microbatches: int, schedule: str) -> "StagePlace":
        return cls(in_flight_microbatches(stage, num_stages, microbatches, schedule), stage > 0,
                   stage < num_stages - 1)


class StageTerms(NamedTuple):
    """A stage's predicted peak, term by term (module docstring), and its time per micro-batch."""

    static_bytes: int             # parameters, gradients, buffers, model inputs
    receive_bytes: int            # receive buffers, pending gradient sends, the running input
    in_flight_bytes: int          # the other in-flight micro-batches' saved bytes and outputs
    working_bytes: int            # the running micro-batch's chain peak
    comm_ms: float                # sending c_b forward and c_a's gradient backward
    time_ms: float                # forward + backward + recompute + comm

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.receive_bytes + self.in_flight_bytes + self.working_bytes


@dataclass(frozen=True)
class StageSpec:
    """One stage on its device: everything its peak and time depend on besides its
    recompute plan (bytes and ms per micro-batch unless said). `cost` is the model."""

    microbatches: int               # M
    place: StagePlace
    resident_bytes: int             # sum p_k: parameters twice (their gradients), buffers once
    gradient_bytes: int             # sum w_k: once more in .grad when M > 1
    model_input_bytes: int          # sum x_k: held for all M micro-batches
    input_bytes: int                # c_a, activations received
    output_bytes: int               # c_b, activations sent
    kept_output_bytes: int          # of the outputs, what a micro-batch in flight keeps alive
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS
    input_in_working: bool = False  # the working bytes count the running micro-batch's input

    @classmethod
    def of_segments(cls, chain: PipelineChain, first: int, end: int, *, microbatches: int, place: StagePlace,
                    link_bytes_per_ms: float) -> "StageSpec":
        """Segments [first, end) of ``chain`` at ``place``. O(end - first)."""
        segments = chain.segments[first:end]
        return cls(microbatches=microbatches, place=place,
                   resident_bytes=sum(s.param_bytes for s in segments),
                   gradient_bytes=sum(s.gradient_bytes for s in segments),
                   model_input_bytes=sum(s.model_input_bytes for s in segments),
                   input_bytes=chain.cut_bytes[first], output_bytes=chain.cut_bytes[end],
                   kept_output_bytes=chain.cut_bytes[end],
                   forward_ms=sum(s.forward_ms for s in segments), backward_ms=sum(s.backward_ms for s in segments),
                   link_bytes_per_ms=link_bytes_per_ms)

    @classmethod
    def of_stage(cls, chain: PipelineChain, first: int, end: int, *, stage: int, num_stages: int, microbatches: int,
                 schedule: str, link_bytes_per_ms: float) -> "StageSpec":
        """Segments [first, end) of ``chain`` as stage ``stage`` of ``num_stages``."""
        return cls.of_segments(chain, first, end, microbatches=microbatches,
                               place=StagePlace.of(stage, num_stages, microbatches, schedule),
                               link_bytes_per_ms=link_bytes_per_ms)

    def cost(self, saved_bytes: int, working_bytes: int, recompute_ms: float = 0.0) -> StageTerms:
        """The stage's peak and time when its plan saves ``saved_bytes`` per micro-batch,
        peaks at ``working_bytes`` while one micro-batch runs and recomputes for
        ``recompute_ms`` (module docstring). O(1)."""
        microbatches, place = self.microbatches, self.place
        static = self.resident_bytes + (microbatches > 1) * self.gradient_bytes + microbatches * self.model_input_bytes
        receive = (place.receives * (2 * microbatches - self.input_in_working) * self.input_bytes
                   + place.sends * microbatches * self.output_bytes)
        held = (place.in_flight - 1) * (saved_bytes + self.kept_output_bytes)
        comm_ms = (self.input_bytes + self.output_bytes) / self.link_bytes_per_ms
        return StageTerms(static, receive, held, working_bytes, comm_ms,
                          self.forward_ms + self.backward_ms + recompute_ms + comm_ms)

    def working_headroom_bytes(self, budget_bytes: int, saved_bytes: int) -> int:
        """The most working bytes with which the stage fits ``budget_bytes`` when its plan
        saves ``saved_bytes`` per micro-batch (the working term adds to the peak as it is)."""
        return budget_bytes - self.cost(saved_bytes, 0).peak_bytes


# -- a priced stage and a priced split -------------------------------------------------------------

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


def evaluate_stage(chain: PipelineChain, first: int, end: int, levels: Sequence[int], *, stage: int,
                   num_stages: int, microbatches: int, schedule: str, budget_bytes: int,
                   link_bytes_per_ms: float = DEFAULT_LINK_BYTES_PER_MS) -> StageCost:
    """The exact time and peak of stage [first, end) at the given option levels, one per
    segment (module docstring). O(end - first).

    Raises:
        OptionError: not one level per segment of the stage.
    """
    segments = chain.segments[first:end]
    if len(levels) != len(segments):
        raise OptionError(f"stage [{first}, {end}) has {len(segments)} segments but {len(levels)} levels; "
                          "give one option level per segment")
    options = [segment.options[level] for segment, level in zip(segments, levels)]
    saved = working = 0
    for option in options:
        saved, working = run_segment(saved, working, option.saved_bytes, option.need_bytes)
    spec = StageSpec.of_stage(chain, first, end, stage=stage, num_stages=num_stages, microbatches=microbatches,
                              schedule=schedule, link_bytes_per_ms=link_bytes_per_ms)
    recompute_ms = sum(option.time_ms for option in options)
    terms = spec.cost(saved, working, recompute_ms)
    return StageCost(index=stage, first_segment=first, end_segment=end, levels=tuple(levels),
                     in_flight=spec.place.in_flight, budget_bytes=int(budget_bytes), forward_ms=spec.forward_ms,
                     backward_ms=spec.backward_ms, recompute_ms=recompute_ms, comm_ms=terms.comm_ms,
                     time_ms=terms.time_ms, static_bytes=terms.static_bytes, receive_bytes=terms.receive_bytes,
                     in_flight_bytes=terms.in_flight_bytes, working_bytes=terms.working_bytes,
                     peak_bytes=terms.peak_bytes, saved_bytes=saved, input_bytes=spec.input_bytes,
                     output_bytes=spec.output_bytes)


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

    @classmethod
    def of_stages(cls, stages: Sequence[StageCost], microbatches: int, schedule: str) -> "PipelineSolution":
        """The step time and bubble of the priced stages (module docstring)."""
        times = [stage.time_ms for stage in stages]
        step = step_time_ms(times, microbatches)
        return cls(stages=tuple(stages), microbatches=microbatches, schedule=schedule, step_time_ms=step,
                   bubble_ms=step - microbatches * max(times), feasible=all(stage.fits for stage in stages))

    @property
    def balance(self) -> tuple[int, ...]:
        """Segments per stage, as torchgpipe's ``balance``."""
        return tuple(stage.end_segment - stage.first_segment for stage in self.stages)
