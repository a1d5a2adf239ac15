"""Fuzz target: a configuration file's bytes through the loader and validator, the steps
`meshproxy check` takes for one file (meshproxy/config/loader.py `load`): read and decode,
parse every YAML document, check across documents, and for a valid file the summary and the
Snapshot the proxies would run on.

The step `load` adds for a Mesh, following `spec.policies` to other files, is left out: it
reads the file system wherever a path points, which is what an operator asked for, not
something the bytes of this file could break.

Invariants, whatever the bytes:
- nothing is raised: every problem is a diagnostic;
- every diagnostic names this file and a line and column within it (`FILE:LINE:COL: ...`);
- a file without errors gives a Snapshot whose every service answers the queries the proxy
  makes, and whose admin view and documents encode as JSON;
- a file with errors gives a ConfigError that lists them, one line each.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile

from meshproxy.config.check import summary
from meshproxy.config.diagnostics import ConfigError, Diagnostics, sort_key
from meshproxy.config.loader import LoadResult, ParseCache, _read
from meshproxy.config.snapshot import Snapshot
from meshproxy.config.validate import cross_check

_FOLDER = tempfile.mkdtemp(prefix="meshproxy-fuzz-config-")
atexit.register(shutil.rmtree, _FOLDER, True)
FILE = os.path.join(_FOLDER, "mesh.yaml")
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def load_one(data: bytes) -> LoadResult:
    """What `load([FILE])` gives for a file holding `data`, policies not followed."""
    with open(FILE, "wb") as f:
        f.write(data)
    diags = Diagnostics()
    text = _read(FILE, diags)
    parsed = ParseCache().parse(FILE, text, diags) if text is not None else []
    cross_check(parsed, diags)
    kept = [p for p in parsed if p.ok and p.resource is not None]
    return LoadResult((FILE,), tuple(p.resource for p in kept), tuple(diags.errors),
                      tuple(diags.warnings), tuple(p.document() for p in kept))


def TestOneInput(data: bytes) -> None:
    result = load_one(data)
    # YAML's line breaks (YAML 1.1 §5.4): a lone CR ends a line too, as in most editors.
    lines = len(LINE_BREAK.findall(data.decode("utf-8", "replace"))) + 1
    for diag in sorted((*result.errors, *result.warnings), key=sort_key):
        assert diag.file == FILE, diag
        assert 1 <= diag.line <= lines + 1 and diag.col >= 1, f"no place in the file: {diag}"
        assert str(diag).startswith(f"{FILE}:{diag.line}:{diag.col}: "), str(diag)
    if result.errors:
        error = ConfigError(result.errors, result.warnings)
        assert len(str(error).splitlines()) >= len(result.errors)
        return
    summary(result)
    snap = Snapshot(result.resources, warnings=result.warnings, files=result.files)
    for key in snap.services:
        snap.policy_for(key)
        snap.routes_for(key)
        snap.mtls_mode_for(key)
        snap.authorization_policies_for(key)
    json.dumps(snap.to_json())
    json.dumps(result.documents)
