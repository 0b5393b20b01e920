"""Module structure: no two modules import each other (directly or in a loop, lazy imports counted),
and the model zoo stays independent of the DP engine (docs/design.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("medfusion_fl", "server", "client", "strategies", "simulations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (a package import counts as its __init__)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    for name in graph:  # a package's own __init__ re-exporting its modules is not a cycle of its modules
        graph[name] = {dep for dep in graph[name] if not (dep.startswith(name + ".") and name in graph)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles() -> None:
    graph = _graph()
    assert "server.sites" in graph["server.rounds"] and "server.sites" in graph["server.secure_round"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_models_do_not_import_the_dp_engine() -> None:
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d.startswith("medfusion_fl.privacy"))
                 for m, deps in graph.items() if m.startswith("medfusion_fl.models")}
    assert not any(offenders.values()), offenders
    assert "medfusion_fl.models.dp_form" in graph["medfusion_fl.privacy.persample"]
