"""Only the loader (with its watcher) and the `check` command touch files: the model, parsers
and Snapshot are pure, so the data plane and the control plane can build and test them without
I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import meshproxy.config

CONFIG = Path(meshproxy.config.__file__).resolve().parent
MAY_DO_IO = {"loader.py", "check.py", "watch.py"}  # watch.py: the loader, again on every change
IO_MODULES = {"os", "io", "pathlib", "shutil", "glob", "socket", "asyncio", "subprocess", "tempfile"}


def io_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in IO_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append("open()")
    return found


def test_only_the_loader_does_io() -> None:
    modules = sorted(p for p in CONFIG.rglob("*.py") if p.name not in MAY_DO_IO)
    assert len(modules) > 10
    assert {str(p.relative_to(CONFIG)): io_uses(p.read_text()) for p in modules if io_uses(p.read_text())} == {}


def test_the_checker_sees_io() -> None:
    assert io_uses("import os\nfrom pathlib import Path\nopen('x')\n") == ["os", "pathlib", "open()"]
