"""The data plane's imports run one way (docs/architecture.md, "A request's life"):

    listener → downstream → exchange → attempts, routing, upstream → destinations, context

No module of meshproxy.dataplane imports, directly or through others, a module that imports
it back: not at the top, not inside a function, not under `if TYPE_CHECKING`. A module that
knows another only as the thing calling it back holds a base class from below (an exchange
holds a `ClientConnection`, an upstream connection a `ResponseReceiver`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import meshproxy.dataplane

PACKAGE = "meshproxy.dataplane"
ROOT = Path(meshproxy.dataplane.__file__).resolve().parent


def dataplane_imports() -> dict[str, set[str]]:
    """Module name (short) -> the dataplane modules it imports anywhere in its source."""
    modules = {path.stem for path in ROOT.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        found: set[str] = set()
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith(PACKAGE + "."):
                    found.add(node.module.split(".")[2])
                elif node.module == PACKAGE:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[2] for alias in node.names
                             if alias.name.startswith(PACKAGE + "."))
        graph[name] = (found & modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports as a list of module names (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_data_plane_has_no_import_cycle() -> None:
    cycle = find_cycle(dataplane_imports())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_request_path_imports_run_from_the_listener_down() -> None:
    graph = dataplane_imports()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for child in graph[todo.pop()]:
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    order = ["listener", "downstream", "exchange"]
    for upper, lower in zip(order, order[1:]):
        assert lower in graph[upper], f"{upper} should import {lower}"
    for lower in ("attempts", "routing", "upstream", "destinations", "context"):
        assert lower in reaches("exchange")
        assert not {"listener", "downstream", "exchange"} & reaches(lower), lower


def test_a_cycle_is_found_and_named() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
