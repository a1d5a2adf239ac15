"""`meshproxy check PATH... [--strict]`: validate configuration files and folders.

Valid: warnings (`FILE:LINE:COL: warning: message`), then one summary line, exit 0.
Invalid: one `FILE:LINE:COL: message` line per error (warnings among them, in file order) on
stdout, a count on stderr, exit 1. With --strict a warning fails the check too.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Sequence, TextIO

from meshproxy.config.diagnostics import sort_key
from meshproxy.config.loader import LoadResult, load
from meshproxy.config.parse import KINDS
from meshproxy.config.snapshot import Snapshot


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(result: LoadResult) -> str:
    """Return the one-line summary of a valid load, e.g.
    `ok: 4 files, 5 resources (1 Mesh, 1 HTTPRoute, ...), 7 services, 0 warnings`."""
    kinds = Counter(r.kind for r in result.resources)
    parts = ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
    services = len(Snapshot(result.resources).services)
    return (f"ok: {_plural(len(result.files), 'file')}, {_plural(len(result.resources), 'resource')}"
            + (f" ({parts})" if parts else "")
            + f", {_plural(services, 'service')}, {_plural(len(result.warnings), 'warning')}")


def run_check(paths: Sequence[str], strict: bool = False, out: TextIO | None = None,
              err: TextIO | None = None, explain: str | None = None) -> int:
    """Check `paths` and print the outcome; return the exit code (0 valid, 1 not).

    With `explain` (`METHOD URL [-H NAME:VALUE]...`, or for a gRPC call
    `GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H NAME:VALUE]...`), a valid configuration
    is followed by how that request would be routed; a malformed request exits 2.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    result = load(paths)
    for diag in sorted((*result.errors, *result.warnings), key=sort_key):
        print(diag, file=out)
    if result.errors or (strict and result.warnings):
        reason = "" if result.errors else " (--strict)"
        print(f"meshproxy check: {_plural(len(result.errors), 'error')}, "
              f"{_plural(len(result.warnings), 'warning')}{reason}", file=err)
        return 1
    print(summary(result), file=out)
    if explain is not None:
        from meshproxy.policy.explain import ExplainError, explain as explain_request

        try:
            lines = explain_request(Snapshot(result.resources), explain)
        except ExplainError as exc:
            print(f"meshproxy check: --explain: {exc}", file=err)
            return 2
        for line in lines:
            print(line, file=out)
    return 0
