"""Per-request figures of percall.py: counts of a batch, less an idle window, divided by the
requests; the top functions; the Markdown report.

Both the call counts and the uprobe counts cover the whole proxy process, which also does
work without traffic (timers, the file watcher). So each batch is followed by a window of
the same length without traffic, and that window's counts, scaled to the batch's duration,
are taken off before dividing by the number of requests.
"""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from harness.uprobes import ALLOC_SYMBOLS, HEADLINE_SYMBOLS


def net_per_request(batch: float, idle: float, requests: int, batch_s: float,
                    idle_s: float) -> float | None:
    """Return (batch - idle scaled to the batch's duration) / requests; None without requests.

    `idle` counted over idle_s seconds without traffic; a zero-length idle window counts as
    no background at all."""
    if requests <= 0:
        return None
    background = idle * batch_s / idle_s if idle_s > 0 else 0.0
    return (batch - background) / requests


def short_path(path: str, roots: Sequence[tuple[str, str]]) -> str:
    """Return `path` relative to the first of `roots` ((folder, label) pairs) that holds it,
    prefixed with the label ("<stdlib>/asyncio/events.py"); unchanged when none does."""
    for root, label in roots:
        root = root.rstrip("/") + "/"
        if path.startswith(root):
            rest = path[len(root):]
            return f"{label}/{rest}" if label else rest
    return path


def default_roots(meshproxy_file: str) -> list[tuple[str, str]]:
    """Folders to shorten paths with: the tree meshproxy came from (paths then read
    meshproxy/...), site-packages, and the standard library."""
    roots = [(str(Path(meshproxy_file).resolve().parent.parent), "")]
    paths = sysconfig.get_paths()
    roots += [(paths["purelib"], "<site>"), (paths["platlib"], "<site>"),
              (paths["stdlib"], "<stdlib>")]
    return roots


def _totals(rows: Iterable[dict], key) -> Counter:
    totals: Counter = Counter()
    for row in rows:
        totals[key(row)] += row["count"]
    return totals


def _py_key(row: dict) -> tuple:
    return (row["qualname"], row["file"], row["line"], row["resumable"])


def _c_key(row: dict) -> tuple:
    return (row["module"], row["qualname"])


def call_figures(batch: dict, idle: dict, requests: int, batch_s: float, idle_s: float,
                 roots: Sequence[tuple[str, str]], top: int = 25) -> dict:
    """Return calls and c_calls per request (net of the idle window and raw), the share of
    calls that resume coroutines or generators, and the `top` functions of each kind.

    `batch` and `idle` are countcalls dumps (rows with counts)."""
    def per(b: float, i: float) -> float | None:
        return net_per_request(b, i, requests, batch_s, idle_s)

    py_b, py_i = _totals(batch["calls"], _py_key), _totals(idle["calls"], _py_key)
    c_b, c_i = _totals(batch["c_calls"], _c_key), _totals(idle["c_calls"], _c_key)
    resumes_b = sum(n for k, n in py_b.items() if k[3])
    resumes_i = sum(n for k, n in py_i.items() if k[3])
    # Most calls first; ties in file and line order, so that a listing reads like the code.
    py_keys = sorted(py_b, key=lambda k: (-per(py_b[k], py_i.get(k, 0)), k[1], k[2]))
    py_rows = [{"function": k[0], "where": f"{short_path(k[1], roots)}:{k[2]}",
                "coroutine": k[3], "per_request": per(py_b[k], py_i.get(k, 0))}
               for k in py_keys]
    c_rows = sorted(({"function": f"{k[0]}.{k[1]}" if k[0] else k[1],
                      "per_request": per(n, c_i.get(k, 0))}
                     for k, n in c_b.items()), key=lambda r: (-r["per_request"], r["function"]))
    return {
        "calls_per_request": per(sum(py_b.values()), sum(py_i.values())),
        "resumes_per_request": per(resumes_b, resumes_i),
        "c_calls_per_request": per(sum(c_b.values()), sum(c_i.values())),
        "raw_calls_per_request": sum(py_b.values()) / requests,
        "raw_c_calls_per_request": sum(c_b.values()) / requests,
        "idle_calls_per_second": sum(py_i.values()) / idle_s if idle_s > 0 else None,
        "distinct_functions": len(py_b),
        "top_functions": py_rows[:top],
        "top_c_functions": c_rows[:top],
    }


def alloc_figures(batch: dict[str, int | None], idle: dict[str, int | None], requests: int,
                  batch_s: float, idle_s: float) -> dict:
    """Return uprobe hits per request for each symbol (net of the idle window) and the
    headline `allocations_per_request` (PyObject_Malloc + PyObject_Calloc)."""
    per_symbol = {}
    for symbol, hits in batch.items():
        background = idle.get(symbol)
        per_symbol[symbol] = (None if hits is None else
                              net_per_request(hits, background or 0, requests, batch_s, idle_s))
    headline = [per_symbol.get(s) for s in HEADLINE_SYMBOLS if s in per_symbol]
    return {
        "allocations_per_request": (sum(headline) if headline and None not in headline
                                    else None),
        "per_symbol": per_symbol,
        "raw_per_symbol": {s: (h / requests if h is not None else None)
                           for s, h in batch.items()},
        "idle_per_second": {s: (h / idle_s if h is not None and idle_s > 0 else None)
                            for s, h in idle.items()},
    }


def _n(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    # A net figure a hair below zero (the idle window did a little more) reads as 0, not -0.
    return f"{max(value, 0.0) if round(value, digits) == 0 else value:,.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


SYMBOL_NOTES = {
    "PyObject_Malloc": "every object not taken from a free list, and dict key tables",
    "PyObject_Calloc": "zeroed object memory",
    "PyMem_Malloc": "buffers (list items, ...); not objects",
    "PyType_GenericAlloc": "instances of classes (subset of PyObject_Malloc)",
    "_PyObject_GC_New": "GC-tracked built-in objects (subset of PyObject_Malloc)",
    "_PyObject_GC_NewVar": "variable-size GC objects (subset of PyObject_Malloc)",
    "_PyObject_New": "untracked built-in objects (subset of PyObject_Malloc)",
}


def markdown(meta: dict, calls: dict | None, allocs: dict | None) -> str:
    """Return the report: how it was measured, the per-request figures, the top functions."""
    lines = [f"# Calls and allocations per request: meshproxy, case `tiny` ({meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             f"meshproxy imported from `{meta['meshproxy_file']}`; "
             f"{meta['requests']} requests counted after {meta['warmup']} of warm-up, over "
             f"{meta['connections']} keep-alive connections (`GET /`, `Host: origin`, answered "
             "`ok`). Only the proxy process is counted; each figure is the batch's count less "
             "that of an equally long window without traffic, divided by the requests.", "",
             "| per request | net | batch only |", "| --- | ---: | ---: |"]
    if calls:
        lines += [
            f"| Python calls (profile `call` events) | {_n(calls['calls_per_request'])} | "
            f"{_n(calls['raw_calls_per_request'])} |",
            f"| … of which coroutine/generator resumptions | "
            f"{_n(calls['resumes_per_request'])} | |",
            f"| built-in calls from Python (profile `c_call` events) | "
            f"{_n(calls['c_calls_per_request'])} | {_n(calls['raw_c_calls_per_request'])} |"]
    if allocs and allocs.get("per_symbol"):
        lines.append(f"| **allocations** (uprobes: PyObject_Malloc + PyObject_Calloc calls) | "
                     f"**{_n(allocs['allocations_per_request'])}** | |")
        for symbol in ALLOC_SYMBOLS:
            if symbol in allocs["per_symbol"]:
                lines.append(f"| `{symbol}` calls: {SYMBOL_NOTES[symbol]} | "
                             f"{_n(allocs['per_symbol'][symbol])} | "
                             f"{_n(allocs['raw_per_symbol'][symbol])} |")
    elif allocs:
        lines.append(f"| allocations | not measured: {_cell(allocs.get('unavailable', '?'))} | |")
        if allocs.get("live_blocks_per_request") is not None:
            lines.append("| approximation: growth of live pymalloc blocks "
                         "(sys.getallocatedblocks; frees cancel allocations, so this is *not* "
                         f"an allocation count) | {_n(allocs['live_blocks_per_request'], 2)} | |")
    if meta.get("cpu_us_per_request") is not None:
        lines.append(f"| proxy CPU µs (no hook, no probes; 10 ms ticks, noisy) | "
                     f"{_n(meta['cpu_us_per_request'])} | |")
    if calls and calls.get("compiled_modules"):
        lines += ["", "**Compiled modules were loaded** (C extensions): the profile hook sees "
                  "none of their functions nor the built-ins they call, so the call counts "
                  "cover the interpreted code only (allocations are counted everywhere): "
                  + ", ".join(f"`{m}`" for m in calls["compiled_modules"]) + "."]
    if calls:
        lines += ["", f"## Top {len(calls['top_functions'])} Python functions by calls per "
                  f"request ({calls['distinct_functions']} distinct in the batch)", "",
                  "| calls/req | function | where |", "| ---: | --- | --- |"]
        lines += [f"| {_n(r['per_request'], 2)} | `{_cell(r['function'])}`"
                  f"{' (coroutine)' if r['coroutine'] else ''} | {_cell(r['where'])} |"
                  for r in calls["top_functions"]]
        lines += ["", f"## Top {len(calls['top_c_functions'])} built-in functions by c_calls "
                  "per request", "", "| c_calls/req | function |", "| ---: | --- |"]
        lines += [f"| {_n(r['per_request'], 2)} | `{_cell(r['function'])}` |"
                  for r in calls["top_c_functions"]]
    lines += ["", "Notes: `call` counts each Python function entry and each resumption of a "
              "coroutine or generator; `c_call` counts calls from Python code to built-in "
              "functions and methods (not calls of types, not calls made from uvloop's or "
              "httptools' compiled code). Allocation counts are exact uprobe hits on the "
              "interpreter's allocator entry points in the proxy process; objects reused from "
              "free lists (small tuples, floats, dicts, lists) never reach them.", ""]
    return "\n".join(lines)
