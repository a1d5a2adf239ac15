"""Which build is in force (meshproxy/build_info.py): compiled by mypyc, or pure Python.

The answer comes from the modules loaded. MESHPROXY_PURE=1 loads every module from its .py
source even where compiled ones are installed, and a compiled build whose sources changed
since is never loaded (meshproxy/_loading.py). Subprocesses: the choice is made when the
package is first imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import meshproxy
from meshproxy import _loading
from meshproxy.build_info import BuildInfo, build_info, describe

PACKAGE = Path(meshproxy.__file__).parent
# This checkout was installed compiled (the manifest of a pure install lists no modules).
COMPILED_BUILD = bool((_loading.read_manifest() or {}).get("modules"))

REPORT = """
import sys
from meshproxy.build_info import build_info, describe
import meshproxy.http1.reader, meshproxy.policy.balancer
info = build_info()
print(describe(info))
for name, module in sorted(sys.modules.items()):
    if name.startswith("meshproxy.") and getattr(module, "__file__", None):
        print(name, module.__file__)
"""


def run_python(code: str, *, pure: bool, pythonpath: Path | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHPROXY_PURE"}
    if pure:
        env["MESHPROXY_PURE"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # (In the folder of the package to load: `-c` puts the working folder first on sys.path.)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True, cwd=pythonpath or PACKAGE.parent)
    return done.stdout.splitlines()


def is_extension(path: str) -> bool:
    return any(path.endswith(suffix) for suffix in EXTENSION_SUFFIXES)


# -- the one-line answer ---------------------------------------------------------------------


def test_describe_compiled() -> None:
    info = BuildInfo(compiled=("meshproxy.http1.events", "meshproxy.http1.reader"), pure=(),
                     compiler="mypyc", note=None)
    assert describe(info) == "compiled with mypyc: 2 modules"


def test_describe_pure() -> None:
    assert describe(BuildInfo((), (), None, None)) == "pure Python"
    assert describe(BuildInfo((), ("meshproxy.http1.reader",), None, "MESHPROXY_PURE is set")) \
        == "pure Python: MESHPROXY_PURE is set"


def test_describe_partly_compiled() -> None:
    info = BuildInfo(("meshproxy.http1.events",), ("meshproxy.http1.reader",), "mypyc",
                     "the compiled modules did not load")
    assert describe(info) == ("partly compiled with mypyc: 1 modules, 1 from .py: "
                              "the compiled modules did not load")


# -- the answer matches what is loaded --------------------------------------------------------


def test_build_info_names_the_loaded_modules() -> None:
    info = build_info()
    for name in info.compiled:
        assert is_extension(sys.modules[name].__file__), name
    for name in info.pure:
        assert sys.modules[name].__file__.endswith(".py"), name
    if COMPILED_BUILD and _loading.reason is None:
        assert info.compiled and not info.pure and info.compiler == "mypyc"
        assert describe(info) == f"compiled with mypyc: {len(info.compiled)} modules"
    if not info.compiled:
        assert describe(info).startswith("pure Python")


def test_pure_switch_loads_every_module_from_source() -> None:
    first, *modules = run_python(REPORT, pure=True)
    assert first == "pure Python: MESHPROXY_PURE is set"
    files = dict(line.split(" ", 1) for line in modules)
    assert files["meshproxy.http1.reader"].endswith("reader.py")
    assert files["meshproxy.policy.balancer"].endswith("balancer.py")
    assert not [name for name, path in files.items() if not path.endswith(".py")]


@pytest.mark.skipif(not COMPILED_BUILD, reason="installed as pure Python")
def test_compiled_build_is_loaded_without_the_switch() -> None:
    first, *modules = run_python(REPORT, pure=False)
    files = dict(line.split(" ", 1) for line in modules)
    compiled = sorted(_loading.read_manifest()["modules"])
    assert first == f"compiled with mypyc: {len(compiled)} modules"
    for name in compiled:
        assert is_extension(files[name]), (name, files[name])


def test_a_stale_compiled_build_is_never_loaded(tmp_path: Path) -> None:
    """A compiled module's .py changed after the build: every compiled module loads from .py.

    Runs on a copy of the package (with its extensions, if any) so the tree stays as it is.
    """
    copy = tmp_path / "meshproxy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = _loading.read_manifest() if COMPILED_BUILD else {
        "compiler": "mypyc", "modules": {"meshproxy.http1.reader": "0" * 64}}
    (copy / "_compiled.json").write_text(json.dumps(manifest))
    reader = copy / "http1" / "reader.py"
    reader.write_text(reader.read_text() + "\n# changed after the build\n")

    first, *modules = run_python(REPORT, pure=False, pythonpath=tmp_path)
    files = dict(line.split(" ", 1) for line in modules)
    assert files["meshproxy.http1.reader"] == str(reader)
    assert re.fullmatch(r"pure Python: the compiled build is stale \(meshproxy\.http1\.reader "
                        r"changed since; `pip install -e \.` rebuilds it\)", first)
    for name in manifest["modules"]:
        assert files[name].endswith(".py"), name


def test_a_pure_install_says_why(tmp_path: Path) -> None:
    """An install that could not compile: no extensions, a manifest with the reason."""
    copy = tmp_path / "meshproxy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns(
        "__pycache__", *(f"*{suffix}" for suffix in EXTENSION_SUFFIXES)))
    (copy / "_compiled.json").write_text(json.dumps(
        {"compiler": None, "modules": {}, "pure_reason": "compiling failed (no C compiler)"}))
    first, *modules = run_python(REPORT, pure=False, pythonpath=tmp_path)
    assert first == "pure Python: compiling failed (no C compiler)"
    assert all(line.split(" ", 1)[1].startswith(str(copy)) for line in modules)


# -- meshproxy --version ------------------------------------------------------------------------


def version_line(pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MESHPROXY_PURE"}
    if pure:
        env["MESHPROXY_PURE"] = "1"
    done = subprocess.run([sys.executable, "-m", "meshproxy", "--version"], capture_output=True,
                          text=True, env=env, timeout=60, check=True)
    return done.stdout.strip()


def test_version_names_the_build() -> None:
    line = version_line(pure=False)
    assert re.fullmatch(
        rf"meshproxy {re.escape(meshproxy.__version__)} \((compiled with mypyc: \d+ modules"
        r"|pure Python(: .+)?)\)", line), line
    if COMPILED_BUILD and _loading.reason is None:
        assert "compiled with mypyc" in line


def test_version_names_pure_python_under_the_switch() -> None:
    assert version_line(pure=True) == (
        f"meshproxy {meshproxy.__version__} (pure Python: MESHPROXY_PURE is set)")
