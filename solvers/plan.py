"""A `Plan` is a program: the ordered steps that both `simulate` and the runtime execute.

    forward phase  (runs inside autograd.Function.forward)
        run(op) | free(value) | offload(value) | prefetch(value)
    backward phase (runs when the gradients of the outputs arrive)
        run(op) | free(value) | offload(value) | prefetch(value)

``run`` of a forward op in the backward phase is a recomputation; a value may be recomputed
several times. Beside the steps a plan stores the per-value decisions, the stage of every op,
its predictions, the solver, whether optimality is proved, and the hash of its graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any, Mapping

from solvers.errors import PlanFormatError, PlanMismatchError
from solvers.graph import Graph, Phase, read_json_file, write_json_file

PLAN_FORMAT = "memsched.plan/1"


class StepKind(str, Enum):
    RUN = "run"
    FREE = "free"
    OFFLOAD = "offload"
    PREFETCH = "prefetch"


class Decision(str, Enum):
    """What happens to a value that the backward reads."""

    KEEP = "keep"            # stays on the device from forward to backward
    RECOMPUTE = "recompute"  # freed in the forward, recomputed in the backward
    OFFLOAD = "offload"      # copied to host in the forward, prefetched in the backward


@dataclass(frozen=True)
class Step:
    kind: StepKind
    name: str   # op name for RUN, value name otherwise

    def to_json(self) -> list[str]:
        return [self.kind.value, self.name]

    @classmethod
    def from_json(cls, data: Any) -> "Step":
        kind, name = data
        return cls(StepKind(kind), str(name))

    def __str__(self) -> str:
        return f"{self.kind.value}({self.name})"


@lru_cache(maxsize=1 << 16)
def run(op: str) -> Step:
    """The step that runs ``op`` (one shared instance per name: the plan builders make
    hundreds of thousands of steps per search)."""
    return Step(StepKind.RUN, op)


@lru_cache(maxsize=1 << 16)
def free(value: str) -> Step:
    """The step that drops the program's reference to ``value`` (shared, as `run`'s)."""
    return Step(StepKind.FREE, value)


def offload(value: str) -> Step:
    return Step(StepKind.OFFLOAD, value)


def prefetch(value: str) -> Step:
    return Step(StepKind.PREFETCH, value)


def embedded_graph(data: Any, plan_format: str, kind: str) -> Graph | None:
    """The graph a plan file's JSON embeds (None when it embeds none), after checking that
    the JSON is a ``plan_format`` plan (``kind``: "plan", "pipeline plan", for messages).

    Raises:
        PlanFormatError: another format, or an embedded graph that is not the one the plan names.
    """
    if not isinstance(data, Mapping) or data.get("format") != plan_format:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise PlanFormatError(f"not a memsched {kind}: format {found!r}, expected {plan_format!r}")
    graph = Graph.from_json(data["graph"]) if "graph" in data else None
    if graph is not None and graph.hash != data.get("graph_hash"):
        raise PlanFormatError(f"{kind} file embeds graph {graph.hash} but names graph {data.get('graph_hash')}")
    return graph


def check_plan_graph(kind: str, plan_graph_hash: str, graph: Graph, replan: str) -> None:
    """Raise `PlanMismatchError` unless a plan (``kind``: "plan", "pipeline plan") made for
    graph ``plan_graph_hash`` meets that graph; the message says to re-plan with ``replan``."""
    if graph.hash != plan_graph_hash:
        raise PlanMismatchError(
            f"{kind} was made for graph {plan_graph_hash} but this model traces to graph {graph.hash}; "
            f"the model, its input shapes or dtypes changed since the plan was saved. Re-plan with {replan}")


# An option of a plan fitted compiled (`planner.compiled`): the budget its eager replay was
# solved within, when that is above ``budget_bytes`` because the compiled step measured
# below the eager prediction. ``budget_bytes`` is then kept by measurement, and the plan
# runs only compiled (`runtime.module.checked_plan`).
EAGER_BUDGET_OPTION = "eager_budget_bytes"
# An option of every plan fitted compiled (`planner.compiled`): it was solved over the graph
# of the compiled step (norms decomposed, fused backward values sized 0), which is not the
# eager step's, so it loads only with ``compile=True``.
COMPILED_OPTION = "compiled"
# An option of a ``hierarchical`` plan that is one of its fallbacks (``greedy``'s or the
# segments' drop-all plan, `solvers.portfolio`): none of its segment DPs' plans fit, so
# the budget is at or near the least that solver reaches, and a plan far below it is rare.
FALLBACK_OPTION = "fallback"


@dataclass(frozen=True)
class Plan:
    """An executable schedule for one `Graph`, with what was decided and predicted."""

    graph_hash: str
    solver: str
    budget_bytes: int
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    decisions: Mapping[str, Decision] = field(default_factory=dict)
    stages: Mapping[str, int] = field(default_factory=dict)   # op -> stage; absent ops are stage 0
    predicted_peak_bytes: int = 0
    predicted_time_ms: float = 0.0
    baseline_time_ms: float = 0.0        # keep-all time of the same graph, for overhead figures
    optimal: bool = False                # optimality proved by the solver
    gap: float | None = None             # relative gap to the proved bound, when known
    solve_time_s: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)
    graph: Graph | None = field(default=None, compare=False, repr=False)   # embedded for plan-inspect
    # other plans the solver found within the same budget (``hierarchical``, ``auto``),
    # predictions not filled in; not saved (`planner.compiled` compiles them where this plan
    # measures over compiled)
    runners_up: tuple["Plan", ...] = field(default=(), compare=False, repr=False)

    def steps(self, phase: Phase) -> tuple[Step, ...]:
        return self.forward if phase is Phase.FORWARD else self.backward

    @property
    def overhead(self) -> float:
        """Predicted extra time relative to keeping everything (0.12 means +12 %)."""
        if self.baseline_time_ms <= 0:
            return 0.0
        return self.predicted_time_ms / self.baseline_time_ms - 1.0

    def check_graph(self, graph: Graph) -> None:
        """Raise `PlanMismatchError` unless this plan was made for ``graph``."""
        check_plan_graph("plan", self.graph_hash, graph, "optimize(model, budget, example_inputs) without plan=")

    # -- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "graph_hash": self.graph_hash, "solver": self.solver,
                "budget_bytes": self.budget_bytes,
                "forward": [step.to_json() for step in self.forward],
                "backward": [step.to_json() for step in self.backward],
                "decisions": {name: decision.value for name, decision in sorted(self.decisions.items())},
                "stages": dict(sorted(self.stages.items())),
                "predicted_peak_bytes": self.predicted_peak_bytes, "predicted_time_ms": self.predicted_time_ms,
                "baseline_time_ms": self.baseline_time_ms, "optimal": self.optimal, "gap": self.gap,
                "solve_time_s": self.solve_time_s, "options": dict(self.options),
                **({"graph": self.graph.to_json()} if self.graph is not None else {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Plan":
        graph = embedded_graph(data, PLAN_FORMAT, "plan")
        try:
            return cls(graph=graph, graph_hash=str(data["graph_hash"]), solver=str(data["solver"]),
                       budget_bytes=int(data["budget_bytes"]),
                       forward=tuple(Step.from_json(s) for s in data["forward"]),
                       backward=tuple(Step.from_json(s) for s in data["backward"]),
                       decisions={k: Decision(v) for k, v in data.get("decisions", {}).items()},
                       stages={k: int(v) for k, v in data.get("stages", {}).items()},
                       predicted_peak_bytes=int(data.get("predicted_peak_bytes", 0)),
                       predicted_time_ms=float(data.get("predicted_time_ms", 0.0)),
                       baseline_time_ms=float(data.get("baseline_time_ms", 0.0)),
                       optimal=bool(data.get("optimal", False)), gap=data.get("gap"),
                       solve_time_s=float(data.get("solve_time_s", 0.0)), options=dict(data.get("options", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PlanFormatError(f"corrupt memsched plan: {error!r}") from error

    def save(self, path: str) -> None:
        write_json_file(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "Plan":
        return cls.from_json(read_json_file(path))
