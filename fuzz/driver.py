#!/usr/bin/env python3
"""Run one fuzz target under atheris: `python3 fuzz/driver.py TARGET [libFuzzer flags] [CORPUS...]`.

fuzz/run.py starts this in a subprocess per target; it can also be run by hand, with any
libFuzzer flag (`-runs=N`, `-help=1`, or a finding's file to reproduce it). The target's name
is also passed on in MESHPROXY_FUZZ_TARGET: libFuzzer's -minimize_crash and -fork run this
file again with the libFuzzer flags alone.

Coverage is measured on meshproxy's Python source: the compiled modules (mypyc) would be
invisible to atheris, so MESHPROXY_PURE=1 makes meshproxy load every module from its .py
file, and atheris instruments each meshproxy module as it is imported, also those imported
later, inside functions. The libraries underneath that are written in C (llhttp in
httptools, libnghttp2, libyaml, OpenSSL/Rust in cryptography) run uninstrumented: their
branches do not count, their crashes still do.
"""

from __future__ import annotations

import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and not argv[1].startswith("-") and "/" not in argv[1]:
        name, flags = argv[1], argv[2:]
    elif os.environ.get("MESHPROXY_FUZZ_TARGET"):
        name, flags = os.environ["MESHPROXY_FUZZ_TARGET"], argv[1:]
    else:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer flags] [CORPUS...]")
    os.environ["MESHPROXY_FUZZ_TARGET"] = name
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from fuzz.targets import TARGETS

    if name not in TARGETS:
        sys.exit(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    # Before meshproxy is imported: its __init__ decides where its modules load from.
    os.environ["MESHPROXY_PURE"] = "1"
    import atheris

    import meshproxy  # noqa: F401 - puts its source-only finder on sys.meta_path first

    # atheris's finder now goes in front of meshproxy's and instruments what that one loads.
    # It stays installed for the whole run: modules imported later are instrumented too.
    atheris.instrument_imports(include=["meshproxy"]).__enter__()
    target = importlib.import_module(f"fuzz.targets.{name}")
    compiled = sorted(m.__name__ for m in list(sys.modules.values())
                      if m.__name__.startswith("meshproxy.")
                      and not (getattr(m, "__file__", None) or ".py").endswith(".py"))
    if compiled:
        sys.exit(f"compiled modules loaded, invisible to the fuzzer: {', '.join(compiled)}")
    atheris.Setup([argv[0], *flags], target.TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
