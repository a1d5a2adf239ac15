"""Protocol and policy modules stay free of I/O (design convention 1: sans-I/O).

Every module under meshproxy/policy/, meshproxy/http1/ and meshproxy/http2/ (found on disk, so new modules are
covered without touching this file) must not import asyncio, socket, ssl or selectors:
not directly, not through another meshproxy module it imports (or whose package it loads),
and must not hold an object from those modules among its globals once imported.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

import meshproxy

FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "selectors"})
SANS_IO_PACKAGES = ("policy", "http1", "http2")
PACKAGE_ROOT = Path(meshproxy.__file__).resolve().parent
FIRST_PARTY = "meshproxy"


def discover_modules() -> list[str]:
    """Returns the dotted names of every module in the sans-I/O packages, sorted."""
    names = []
    for package in SANS_IO_PACKAGES:
        for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def first_party_source(module: str) -> tuple[str, bool] | None:
    """Returns (source, is_package) of a meshproxy module, or None if there is no such file."""
    base = PACKAGE_ROOT.parent.joinpath(*module.split("."))
    package_init = base / "__init__.py"
    if package_init.is_file():
        return package_init.read_text(encoding="utf-8"), True
    module_file = base.with_suffix(".py")
    if module_file.is_file():
        return module_file.read_text(encoding="utf-8"), False
    return None


def imported_names(module: str, source: str, is_package: bool) -> list[tuple[str, int]]:
    """Returns (absolute module name, line) for every import in `source`, wherever it sits
    (top level, function bodies, `if TYPE_CHECKING` blocks), including `__import__("x")` and
    `importlib.import_module("x")` with a literal name. `from pkg import name` yields both
    `pkg` and `pkg.name`, since `name` may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                if node.module:
                    base_parts.append(node.module)
                base = ".".join(base_parts)
            else:
                base = node.module or ""
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names
                         if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else None)
            first = node.args[0]
            if (name in ("__import__", "import_module") and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)):
                found.append((first.value, node.lineno))
    return found


def parents(module: str) -> list[str]:
    """Returns the packages Python loads before `module`: a.b.c -> [a, a.b]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def forbidden_imports(
    module: str, source_of: Callable[[str], tuple[str, bool] | None]
) -> list[str]:
    """Returns one message per forbidden import reachable from `module` through first-party
    modules (its own parent packages included), each with the chain that leads to it."""
    problems: list[str] = []
    seen: set[str] = set()
    queue: list[tuple[str, tuple[str, ...]]] = [(module, (module,))]
    queue.extend((parent, (module, parent)) for parent in parents(module))
    while queue:
        current, chain = queue.pop()
        if current in seen:
            continue
        seen.add(current)
        found = source_of(current)
        if found is None:
            continue  # `from pkg import name` where name is not a module
        source, is_package = found
        for name, line in imported_names(current, source, is_package):
            top = name.split(".")[0]
            if top in FORBIDDEN:
                path = " -> ".join(chain)
                problems.append(f"{path} imports {name} (line {line})")
            elif top == FIRST_PARTY:
                for target in (*parents(name), name):
                    if target not in seen:
                        queue.append((target, (*chain, target)))
    return sorted(set(problems))


def forbidden_globals(loaded: ModuleType) -> list[str]:
    """Returns the names of globals of `loaded` that are, or come from, a forbidden module."""
    bad = []
    for name, value in vars(loaded).items():
        origin = value.__name__ if isinstance(value, ModuleType) else getattr(
            value, "__module__", None)
        if isinstance(origin, str) and origin.split(".")[0] in FORBIDDEN:
            bad.append(f"{name} ({origin})")
    return bad


MODULES = discover_modules()


def test_discovery_finds_the_sans_io_modules() -> None:
    assert "meshproxy.policy" in MODULES
    assert "meshproxy.policy.balancer" in MODULES
    assert "meshproxy.http1" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_io(module: str) -> None:
    assert forbidden_imports(module, first_party_source) == []


@pytest.mark.parametrize("module", MODULES)
def test_module_globals_hold_nothing_from_io_modules(module: str) -> None:
    assert forbidden_globals(importlib.import_module(module)) == []


# --- the checker itself catches what it should --------------------------------------------


def fake_tree(files: dict[str, str]) -> Callable[[str], tuple[str, bool] | None]:
    """A source lookup over in-memory modules; names ending in '/' are packages."""

    def source_of(module: str) -> tuple[str, bool] | None:
        if module + "/" in files:
            return files[module + "/"], True
        if module in files:
            return files[module], False
        return None

    return source_of


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import asyncio.events",
        "import socket as s",
        "from ssl import SSLContext",
        "from selectors import *",
        "def f():\n    import asyncio\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ssl\n",
        "x = __import__('socket')",
        "import importlib\nx = importlib.import_module('asyncio')",
        "from .helper import thing",  # helper imports asyncio
        "from . import helper",
        "from meshproxy.dataplane import pool",  # the package loads asyncio
    ],
)
def test_checker_flags_forbidden_imports(source: str) -> None:
    tree = fake_tree({
        "meshproxy/": "",
        "meshproxy.policy/": "",
        "meshproxy.policy.subject": source,
        "meshproxy.policy.helper": "import asyncio\nthing = 1\n",
        "meshproxy.dataplane/": "import asyncio\n",
        "meshproxy.dataplane.pool": "",
    })
    problems = forbidden_imports("meshproxy.policy.subject", tree)
    assert problems, source
    assert all(p.startswith("meshproxy.policy.subject") for p in problems)


@pytest.mark.parametrize(
    "source",
    [
        "import random\nfrom math import exp",
        "import asyncio_compat\nimport sslkit\nimport socketserver_like",
        "from .helper import thing",  # helper is clean
        "x = 'import asyncio'",
        "from http import HTTPStatus",
    ],
)
def test_checker_accepts_clean_modules(source: str) -> None:
    tree = fake_tree({
        "meshproxy/": "",
        "meshproxy.policy/": "",
        "meshproxy.policy.subject": source,
        "meshproxy.policy.helper": "import math\nthing = 1\n",
    })
    assert forbidden_imports("meshproxy.policy.subject", tree) == []


def test_checker_flags_a_forbidden_parent_package() -> None:
    tree = fake_tree({"meshproxy/": "", "meshproxy.policy/": "import socket",
                      "meshproxy.policy.subject": ""})
    assert forbidden_imports("meshproxy.policy.subject", tree) == [
        "meshproxy.policy.subject -> meshproxy.policy imports socket (line 1)"
    ]


def test_globals_check_flags_io_objects() -> None:
    import asyncio
    import socket

    fake = ModuleType("fake")
    fake.loop_type = asyncio.AbstractEventLoop
    fake.sock = socket
    fake.fine = Path
    assert sorted(forbidden_globals(fake)) == [
        "loop_type (asyncio.events)",
        "sock (socket)",
    ]
