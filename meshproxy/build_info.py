"""Which build is in force: the request path compiled (by mypyc), or pure Python.

Answered from the modules actually loaded, not from what the build meant to do: the modules
the build compiled (its manifest, meshproxy/_compiled.json) are imported and each counts as
compiled only when it came from a C extension. `meshproxy --version` and the proxy's start-up
log line show `version_line()`. `python3 -m meshproxy.build_info --require-compiled` exits 1
unless every compiled module is in force (CI checks its build with it); `-v` lists them.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES

from meshproxy import _loading

MYPYC_SHARED_LIBRARY = "meshproxy._native__mypyc"


@dataclass(frozen=True)
class BuildInfo:
    """`compiled`: modules running as C extensions; `pure`: modules the build compiled that
    run from their .py source anyway; `compiler`: "mypyc" (or "C extension" for another
    compiler), None when nothing compiled runs; `note`: why the .py source is in force."""

    compiled: tuple[str, ...]
    pure: tuple[str, ...]
    compiler: str | None
    note: str | None


def _is_extension(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    return any(path.endswith(suffix) for suffix in EXTENSION_SUFFIXES)


def build_info() -> BuildInfo:
    """Import the modules the build compiled and return which of them run compiled."""
    manifest = _loading.read_manifest() or {}
    names = sorted(manifest.get("modules", {}))
    for name in names:
        importlib.import_module(name)
    # Any other compiled meshproxy module loaded (a build without a manifest) counts too.
    loaded = {n for n, m in list(sys.modules.items())
              if n.startswith("meshproxy.") and n != MYPYC_SHARED_LIBRARY and _is_extension(m)}
    compiled = tuple(sorted(loaded))
    pure = tuple(n for n in names if n not in loaded)
    compiler = None
    if compiled:
        compiler = "mypyc" if MYPYC_SHARED_LIBRARY in sys.modules else "C extension"
    note = _loading.reason or manifest.get("pure_reason")  # (why the install is pure)
    if note is None and pure:
        note = "the compiled modules did not load"
    return BuildInfo(compiled, pure, compiler, note)


def describe(info: BuildInfo | None = None) -> str:
    """One line: "compiled with mypyc: 6 modules", "pure Python", "pure Python: why"."""
    info = info or build_info()
    if not info.compiled:
        return "pure Python" + (f": {info.note}" if info.note else "")
    if info.pure:
        return (f"partly compiled with {info.compiler}: {len(info.compiled)} modules, "
                f"{len(info.pure)} from .py: {info.note}")
    return f"compiled with {info.compiler}: {len(info.compiled)} modules"


def version_line() -> str:
    """`meshproxy --version` and the proxy's start-up log line, e.g.
    "meshproxy 0.1.0 (compiled with mypyc: 6 modules)"."""
    from meshproxy import __version__

    return f"meshproxy {__version__} ({describe()})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    info = build_info()
    print(describe(info))
    if "-v" in args or "--verbose" in args:
        for name in info.compiled:
            print(f"  compiled  {name}  {sys.modules[name].__file__}")
        for name in info.pure:
            print(f"  .py       {name}  {sys.modules[name].__file__}")
    if "--require-compiled" in args and (not info.compiled or info.pure):
        print("meshproxy: the compiled build is not in force", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
