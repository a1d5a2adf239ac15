"""Which form of the compiled modules is loaded: the C extensions, or their .py source.

setup.py compiles the request path with mypyc and writes `_compiled.json` beside it: the
modules compiled and the sha256 of the source each was compiled from. meshproxy/__init__.py
calls `choose()` before any of them is imported, and the .py source is loaded instead of
every compiled module (all or none: compiled modules call each other natively) when

- MESHPROXY_PURE=1 is set (CI's second pass runs the unit tests so), or
- a compiled module's .py changed since it was compiled: in an editable install the
  extensions sit beside the sources, and a stale one must never run.

Never compiled itself (it decides how the compiled modules load). `reason` says why the .py
source is in force, for meshproxy/build_info.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(PACKAGE_DIR, "_compiled.json")

# Why the compiled modules are loaded from their .py source (None: they are not).
reason: str | None = None


class SourceOnlyFinder:
    """A meta-path finder that loads meshproxy modules from their .py files.

    `names`: the modules it applies to; None for every meshproxy module.
    """

    def __init__(self, names: frozenset[str] | None) -> None:
        self.names = names

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if not fullname.startswith("meshproxy.") or not path:
            return None
        if self.names is not None and fullname not in self.names:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if os.path.isfile(source):
                return spec_from_file_location(fullname, source)
        return None  # a package, or not found: the usual finders decide

    def __repr__(self) -> str:
        names = "all meshproxy modules" if self.names is None else sorted(self.names)
        return f"SourceOnlyFinder({names})"


def read_manifest() -> dict | None:
    """Return the build's manifest, or None (a source checkout that was never built):
    {"compiler": "mypyc", "compiler_version", "modules": {name: sha256 of its .py}} when it
    compiled, {"compiler": None, "modules": {}, "pure_reason": why} when it installed pure."""
    try:
        with open(MANIFEST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def changed_since_build(manifest: dict) -> list[str]:
    """Return the compiled modules whose .py source differs from the one compiled."""
    changed = []
    for name, digest in manifest.get("modules", {}).items():
        source = os.path.join(PACKAGE_DIR, *name.split(".")[1:]) + ".py"
        try:
            with open(source, "rb") as f:
                current = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            current = None
        if current != digest:
            changed.append(name)
    return changed


def choose() -> None:
    """Install the source-only finder when the .py source must be loaded (see above)."""
    global reason
    if os.environ.get("MESHPROXY_PURE", "") not in ("", "0"):
        reason = "MESHPROXY_PURE is set"
        sys.meta_path.insert(0, SourceOnlyFinder(None))
        return
    manifest = read_manifest()
    if manifest is None:
        return
    changed = changed_since_build(manifest)
    if changed:
        reason = (f"the compiled build is stale ({', '.join(changed)} changed since; "
                  "`pip install -e .` rebuilds it)")
        sys.meta_path.insert(0, SourceOnlyFinder(frozenset(manifest["modules"])))
