"""memsched's torch-free core: the step `Graph`, the `Plan` program, `simulate`, solvers.

Nothing here imports torch, so plans can be made and checked anywhere. The solvers, behind
one `solve(graph, budget_bytes, solver)`: ``none`` and ``greedy`` (Checkmate's greedy
baseline, Jain et al. 2020), ``every_block`` and ``sqrt_n`` (Chen et al. 2016), ``chain``
(Rotor, Beaumont et al. 2019, with offload after Beaumont et al. 2021), ``hierarchical``
(after Rockmate, Zhao et al. 2023), ``ilp`` (Checkmate's MILP), ``brute_force`` (exact, tiny
graphs) and `solve_pipeline` (stages over devices). The contract between `Graph`, `Plan`
and `simulate` is in docs/design.md; inside, the core types sit below the solver kernel
(`solvers.kernel`), the kernel below the algorithms, and `solvers.portfolio` on top decides
which algorithms run and which plan wins.
"""

from solvers.errors import (InfeasibleBudgetError, InvalidPlanError, MemschedError, OptionError, PlanFormatError,
                            PlanMismatchError, SolverUnavailableError, UnsupportedGraphError, UnsupportedUseError,
                            format_bytes)
from solvers.graph import Graph, Op, Phase, Transfer, Value, ValueKind
from solvers.plan import Decision, Plan, Step, StepKind
from solvers.kernel.bounds import least_feasible_lower_bound
from solvers.portfolio import solve  # registers the built-in solvers
from solvers.registry import available_solvers, register
from solvers.simulate import SimResult, simulate
from solvers.pipeline import PipelinePlan, solve_pipeline

__all__ = [
    "Decision", "Graph", "InfeasibleBudgetError", "InvalidPlanError", "MemschedError", "Op", "OptionError", "Phase",
    "Plan", "PlanFormatError", "PlanMismatchError", "SimResult", "SolverUnavailableError", "Step", "StepKind",
    "Transfer", "UnsupportedGraphError", "UnsupportedUseError", "Value", "ValueKind", "available_solvers",
    "format_bytes", "least_feasible_lower_bound", "register", "simulate", "solve", "PipelinePlan", "solve_pipeline",
]
