"""SPIFFE IDs and CSR handling are pure (design convention 1): no files, sockets, TLS or
event loop, so the CA's rules are tested without I/O and reused by proxy and control plane."""

from __future__ import annotations

import ast
from pathlib import Path

import meshproxy.identity

IDENTITY = Path(meshproxy.identity.__file__).resolve().parent
PURE = ("spiffe.py", "csr.py")
IO_MODULES = {"os", "io", "pathlib", "shutil", "glob", "socket", "ssl", "asyncio", "subprocess", "tempfile",
              "httptools", "aiohttp"}


def io_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in IO_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append("open()")
    return found


def test_spiffe_and_csr_modules_do_no_io():
    offenders = {name: io_imports((IDENTITY / name).read_text()) for name in PURE}
    assert offenders == {name: [] for name in PURE}


def test_the_detector_sees_an_import_of_ssl():
    assert io_imports("import ssl\nfrom asyncio import sleep\nopen('x')") == ["ssl", "asyncio", "open()"]
