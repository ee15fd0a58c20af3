"""The package's import graph: every module imports, and module-level imports form no cycle.

A cycle works or breaks by import order (the half-initialised module problem) and says two modules are one; the
job layer's rule "jobs and evaluation never import an engine" is checked here too. Edges are the imports a module
runs when it is imported (module level, ``if TYPE_CHECKING:`` blocks excluded); imports inside functions are
deliberate lazy loads and not edges.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "facepipe"
ENGINES = {"facepipe.engine.local", "facepipe.engine.ray_engine"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _runs_at_import(tree: ast.Module) -> list[ast.stmt]:
    """Top-level statements and those nested in top-level if/try/with blocks, except ``if TYPE_CHECKING:``."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                todo.extend(node.orelse)
                continue
            todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            todo.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
        elif isinstance(node, ast.With):
            todo.extend(node.body)
        else:
            out.append(node)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the facepipe modules it imports at import time."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runs_at_import(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from facepipe.x import y``: y is a submodule or a name defined in facepipe.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # ``import facepipe.x.y as z`` names a module
                    target = target.rpartition(".")[0]
                if target.startswith("facepipe") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_real_edges():
    graph = import_graph()
    assert "facepipe.engine.job" in graph["facepipe.engine.local"]
    assert len(graph) > 50


def test_package_has_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_jobs_and_evaluation_import_no_engine():
    """Commands choose the engine; jobs (pipeline, embedding, evaluation) only implement ``engine.job.BatchJob``."""
    graph = import_graph()
    offenders = {
        name: sorted(graph[name] & ENGINES)
        for name in graph
        if name.startswith(("facepipe.evaluation", "facepipe.pipeline", "facepipe.embedding")) and graph[name] & ENGINES
    }
    assert offenders == {}


def test_evaluation_imports_no_engine_even_lazily():
    """Not even inside a function: the IJB-C command chooses the engine and runs the feature job."""
    offenders = []
    for name, path in module_names().items():
        if name.startswith("facepipe.evaluation"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if ENGINES & set(names):
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("name", sorted(module_names()))
def test_every_module_imports(name):
    if name == "facepipe.__main__" or name.endswith("_forkserver_preload"):
        pytest.skip("runs the command line / changes signal handlers when imported")
    importlib.import_module(name)
