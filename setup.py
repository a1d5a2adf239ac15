"""Build hook: the modules on every request's path are compiled with mypyc where possible.

Everything else about the package is in pyproject.toml. `pip install .` and `pip install -e .`
compile COMPILED_MODULES to C extensions (native classes, as black and mypy ship) when mypy
and a C compiler are there; when they are not, or when anything in the compile fails, the
install goes on as pure Python and says so. MESHPROXY_NO_COMPILE=1 asks for the pure install.
`meshproxy --version` tells which one is in force (meshproxy/build_info.py).

How to add a module and what mypyc asks of its source: docs/architecture.md, "Compiled
modules".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# The modules compiled by mypyc, as paths from this folder. They are compiled together (one
# shared library), so each may call the others' functions and classes natively.
COMPILED_MODULES = [
    "meshproxy/http1/events.py",
    "meshproxy/http1/headers.py",
    "meshproxy/http1/errors.py",
    "meshproxy/http1/reader.py",
    "meshproxy/http1/response_reader.py",
    "meshproxy/http1/writer.py",
    "meshproxy/policy/balancer.py",
    "meshproxy/policy/retry.py",
    "meshproxy/policy/breaker.py",
    "meshproxy/observability/record.py",
    "meshproxy/observability/metrics.py",
    "meshproxy/observability/trace.py",
    "meshproxy/observability/tracecontext.py",
    "meshproxy/dataplane/context.py",
    "meshproxy/dataplane/client.py",
    "meshproxy/dataplane/downstream.py",
    "meshproxy/dataplane/exchange.py",
    "meshproxy/dataplane/forwarder.py",
    "meshproxy/dataplane/sink.py",
    "meshproxy/dataplane/attempts.py",
    "meshproxy/dataplane/tries.py",
    "meshproxy/dataplane/routing.py",
    "meshproxy/dataplane/upstream.py",
    "meshproxy/dataplane/relay.py",
    "meshproxy/dataplane/mirror.py",
    "meshproxy/dataplane/h2downstream.py",
    "meshproxy/dataplane/h2stream.py",
    "meshproxy/dataplane/h2upstream.py",
    "meshproxy/http2/fields.py",
    "meshproxy/http2/grpc.py",
    "meshproxy/dataplane/destinations.py",
    "meshproxy/dataplane/resolvers.py",
]
# Modules they import but that are not compiled are type-checked only for what the compiled
# ones use of them (their own errors are not the build's business).
MYPY_OPTIONS = ["--follow-imports=silent"]
# mypyc's shared library with the code of all of them (each module gets a small shim).
SHARED_LIBRARY = "meshproxy._native__mypyc"
# Written next to the extensions: which modules were compiled, from which source (sha256),
# or why none was. meshproxy/__init__.py loads none of them when a source changed since.
MANIFEST = "meshproxy/_compiled.json"


def _module_name(path: str) -> str:
    return path[: -len(".py")].replace("/", ".")


def _short(exc: BaseException) -> str:
    """The first line of an error, with a failed compiler command cut to its program."""
    text = (str(exc).strip().splitlines() or [""])[0]
    command = re.match(r"Command '\['([^']*)'.*\]' (returned .*)", text)
    if command:
        text = f"{command[1]} {command[2]}"
    return f"{type(exc).__name__}: {text[:300]}"


def _say(message: str) -> None:
    # pip shows a build's output with -v only; a pure fallback is also in `meshproxy --version`.
    print(f"meshproxy build: {message}", file=sys.stderr, flush=True)


class BuildMaybeCompiled(build_ext):
    """build_ext that compiles COMPILED_MODULES with mypyc, or installs pure Python."""

    def finalize_options(self) -> None:
        # mypyc type-checks the modules and writes their C here, before setuptools prepares
        # the extensions it returns (a type error ends mypycify with SystemExit).
        self.pure_reason = self._why_pure()
        if self.pure_reason is None:
            out = io.StringIO()  # mypy's messages, to say the first one when it refuses
            try:
                from mypyc.build import mypycify

                with contextlib.redirect_stdout(out):
                    self.distribution.ext_modules = mypycify(
                        MYPY_OPTIONS + COMPILED_MODULES, opt_level="3",
                        group_name=SHARED_LIBRARY[: -len("__mypyc")],
                    )
            except (Exception, SystemExit) as exc:
                errors = [line for line in out.getvalue().splitlines() if ": error:" in line]
                first = errors[0] if errors else _short(exc)
                self.pure_reason = f"mypyc refused the modules ({first})"
            finally:
                sys.stderr.write(out.getvalue())
        super().finalize_options()
        if self.pure_reason is not None:
            # (The stand-in stays in the distribution, so that run() still comes: it clears
            # a previous build's extensions out of the way.)
            self.extensions = []

    def run(self) -> None:
        self._remove_outputs()  # a previous build's extensions must not outlive this one
        if self.pure_reason is None:
            try:
                super().run()
                self._write_manifest()
                _say(f"compiled {len(COMPILED_MODULES)} modules with mypyc")
                return
            except Exception as exc:  # no compiler, no Python headers, a C error
                self.pure_reason = f"compiling failed ({_short(exc)})"
                self._remove_outputs()
        self.extensions = []
        self._write_manifest(pure_reason=self.pure_reason)
        _say(f"installing pure Python: {self.pure_reason}")

    def _why_pure(self) -> str | None:
        if os.environ.get("MESHPROXY_NO_COMPILE", "") not in ("", "0"):
            return "MESHPROXY_NO_COMPILE is set"
        if sys.implementation.name != "cpython":
            return f"mypyc needs CPython, not {sys.implementation.name}"
        try:
            import mypyc.build  # noqa: F401
        except ImportError as exc:
            return f"mypyc is not installed ({exc})"
        return None

    def _output_dirs(self) -> list[str]:
        """Where this build puts extensions: build_lib, and the source tree when in place."""
        dirs = [self.build_lib]
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.append(os.path.dirname(os.path.abspath(__file__)))
        return dirs

    def _remove_outputs(self) -> None:
        # Every extension under meshproxy/, not only those of COMPILED_MODULES: a module taken
        # off the list would otherwise leave its old shim behind, which then fails to import
        # from a shared library that no longer has it. The package has no other extensions.
        suffix = self.get_ext_filename("x")[1:]
        for top in self._output_dirs():
            for folder, _, files in os.walk(os.path.join(top, "meshproxy")):
                for name in files:
                    if name.endswith(suffix):
                        os.remove(os.path.join(folder, name))
            manifest = os.path.join(top, MANIFEST)
            if os.path.exists(manifest):
                os.remove(manifest)

    def _write_manifest(self, pure_reason: str | None = None) -> None:
        """Record what was compiled, from which sources; or why nothing was."""
        if pure_reason is not None:
            manifest = {"compiler": None, "modules": {}, "pure_reason": pure_reason}
        else:
            import mypy.version

            here = os.path.dirname(os.path.abspath(__file__))
            sources = {}
            for path in COMPILED_MODULES:
                with open(os.path.join(here, path), "rb") as f:
                    sources[_module_name(path)] = hashlib.sha256(f.read()).hexdigest()
            manifest = {"compiler": "mypyc", "compiler_version": mypy.version.__version__,
                        "modules": sources}
        text = json.dumps(manifest, indent=1) + "\n"
        for top in self._output_dirs():
            target = os.path.join(top, MANIFEST)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(text)


class BuildWithMeshFiles(build_py):
    """Also copy the Mesh files of config/ (the demo's, the examples') into the built package
    as meshproxy/bundled/config: a wheel (`pip install .`, `pipx install .`) has no source tree
    beside it, and `meshproxy up` without a MESH_FILE runs the demo from there
    (meshproxy/local/bundled.py). Editable installs read config/ itself."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        source = os.path.join(here, "config")
        target = os.path.join(self.build_lib, "meshproxy", "bundled", "config")
        for folder, _, files in os.walk(source):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    relative = os.path.relpath(os.path.join(folder, name), source)
                    os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
                    self.copy_file(os.path.join(folder, name), os.path.join(target, relative))


setup(
    # A stand-in, so that setuptools runs build_ext (and tags the wheel for this platform);
    # BuildMaybeCompiled replaces it with mypyc's extensions, or with none.
    ext_modules=[Extension(SHARED_LIBRARY, sources=[])],
    cmdclass={"build_ext": BuildMaybeCompiled, "build_py": BuildWithMeshFiles},
)
