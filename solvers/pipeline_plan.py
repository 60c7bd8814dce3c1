"""``pipeline_plan``: the plan a pipeline run executes, and its file format.

A `PipelinePlan` is the split of one graph into stages, with every stage's ops, the
keep/recompute decision of every saved storage its segments own, and the predictions of
the stage cost model (`solvers.pipeline_cost.StageCost`). JSON only, format
``memsched.pipeline/1``, with the graph embedded so that a saved plan is checked against
the model that loads it. `plan_from_solution` turns a chain-level `PipelineSolution` (from
the split DP or a baseline) into a plan, O(ops + values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from solvers.errors import PlanFormatError
from solvers.graph import Graph, read_json_file, write_json_file
from solvers.kernel.options import SegmentOptions
from solvers.kernel.program import saved_roots
from solvers.kernel.segments import Segment, root_segments
from solvers.pipeline_cost import DEFAULT_LINK_BYTES_PER_MS, SCHEDULES, PipelineSolution, StageCost
from solvers.pipeline_split import SOLVER
from solvers.plan import Decision, check_plan_graph, embedded_graph

PIPELINE_FORMAT = "memsched.pipeline/1"


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
        check_plan_graph("pipeline plan", self.graph_hash, graph,
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
        graph = embedded_graph(data, PIPELINE_FORMAT, "pipeline plan")
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
