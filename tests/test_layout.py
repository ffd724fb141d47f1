"""The code layout: no import cycles among the project's modules, and nothing but tests, configs and benchmarks
refers to ../shared (users of the project do not have it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (lazy imports and TYPE_CHECKING blocks too)."""
    modules = {}
    for path in (ROOT / "src").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _project_imports()
    assert {"lowgrad.config", "lowgrad.route", "lowgrad.stages.score"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # negative control: a cycle is found when there is one
    graph["lowgrad.paths"] = graph["lowgrad.paths"] | {"lowgrad.config"}
    graph["lowgrad.config"] = graph["lowgrad.config"] | {"lowgrad.paths"}
    assert _cycle(graph) is not None


def test_shared_is_referred_to_only_by_tests_configs_and_benchmarks():
    for folder in ("src", "flows", "stages", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml"):
                assert "shared/METHOD" not in path.read_text(), path
    assert "shared/METHOD" not in (ROOT / "README.md").read_text()
