"""The structure stays as designed: layers only import downwards (planner -> runtime ->
solvers), late imports inside functions included, and no module imports itself back
through others (0 cycles in the import graph). Inside `solvers` the same holds for its
own layers (core -> kernel -> algorithms -> portfolio): the kernel imports only the core,
and each algorithm only the kernel and the core, so that which algorithm runs beside
which is `solvers.portfolio`'s choice alone."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"solvers": 0, "runtime": 1, "planner": 2}       # higher imports lower, never the reverse
# inside solvers: the core types (and leaf utilities that import nothing above them), the kernel, the algorithms
SOLVER_CORE = {"solvers.errors", "solvers.graph", "solvers.plan", "solvers.simulate", "solvers.quiet",
               "solvers.targets"}
ALGORITHMS = {"solvers.baselines", "solvers.checkpoint_baselines", "solvers.chain", "solvers.hierarchical",
              "solvers.brute_force", "solvers.ilp", "solvers.offload_refine", "solvers.recompute_bound"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (top level or late)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for name in candidates:
            if name.split(".")[0] not in LAYERS:
                continue
            parts = name.split(".")
            while parts and not (ROOT.joinpath(*parts).with_suffix(".py").exists() or ROOT.joinpath(*parts).is_dir()):
                parts.pop()
            if parts:
                found.add(".".join(parts))
    return found


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = module_name(path)
            graph.add_node(source)
            for target in imported_modules(path) - {source}:
                graph.add_edge(source, target)
    return graph


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    graph = import_graph()
    assert graph.number_of_nodes() > 30
    upward = sorted((source, target) for source, target in graph.edges
                    if LAYERS[target.split(".")[0]] > LAYERS[source.split(".")[0]])
    assert upward == [], f"imports from a higher layer: {upward}"


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    packages = set(LAYERS)
    # a package's __init__ re-exports its modules; a module importing its own package's
    # __init__ would close a loop through it, so those edges stay in
    cycles = [cycle for cycle in nx.simple_cycles(graph) if not set(cycle) <= packages]
    assert cycles == [], f"import cycles: {cycles[:5]}"


def solvers_imports(graph: nx.DiGraph, module: str) -> set[str]:
    return {target for target in graph.successors(module) if target.split(".")[0] == "solvers"}


def test_the_solver_core_imports_only_the_core() -> None:
    graph = import_graph()
    wrong = {module: sorted(solvers_imports(graph, module) - SOLVER_CORE) for module in SOLVER_CORE}
    assert {module: found for module, found in wrong.items() if found} == {}


def test_the_kernel_imports_only_the_core_and_itself() -> None:
    graph = import_graph()
    kernel = {node for node in graph.nodes if node.startswith("solvers.kernel")}
    assert len(kernel) >= 7
    wrong = {module: sorted(target for target in solvers_imports(graph, module)
                            if target not in SOLVER_CORE and not target.startswith("solvers.kernel"))
             for module in kernel}
    assert {module: found for module, found in wrong.items() if found} == {}


def test_each_algorithm_imports_only_the_kernel_and_the_core() -> None:
    """No algorithm runs another: hierarchical's chain, every_block and greedy candidates,
    ilp's heuristic starts and auto are `solvers.portfolio`'s."""
    graph = import_graph()
    assert ALGORITHMS <= set(graph.nodes)
    wrong = {module: sorted(target for target in solvers_imports(graph, module)
                            if target not in SOLVER_CORE and not target.startswith("solvers.kernel"))
             for module in ALGORITHMS}
    assert {module: found for module, found in wrong.items() if found} == {}


def test_only_the_portfolio_and_the_package_import_the_algorithms() -> None:
    graph = import_graph()
    importers = {source for source, target in graph.edges if target in ALGORITHMS and source not in ALGORITHMS}
    assert importers <= {"solvers.portfolio", "solvers"} | {node for node in graph.nodes
                                                            if not node.startswith("solvers")}, importers


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser finds late imports: a function-level import of planner in runtime."""
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from planner.memory import mark_host\n    return mark_host\n")
    assert imported_modules(source) == {"planner.memory"}
