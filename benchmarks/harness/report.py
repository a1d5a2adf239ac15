"""Summaries of a run: machine facts, medians over rounds, Markdown tables.

The raw per-round numbers stay in the JSON; the tables show the median of each metric over
the rounds (the peak for RSS) and the ratio of each target to nginx in the same case.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from harness.cases import REQUEST_CASES, STREAM_CASES

REPO = Path(__file__).resolve().parent.parent.parent


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0].strip() if text else f"unavailable (exit {done.returncode})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(meshproxy_cmd: list[str]) -> dict[str, str]:
    """Return the facts that make a result comparable: cores, CPU, kernel, tool versions."""
    git = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "curl": _first_line(["curl", "--version"]),
        "meshproxy": _first_line([*meshproxy_cmd, "--version"]),
        "git": git + (" (with uncommitted changes)" if dirty else ""),
    }


def _median(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def _peak(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return max(values) if values else None


REQUEST_MEDIANS = ("rps", "p50_ms", "p99_ms", "proxy_cpu_us_per_req", "origin_cpu_us_per_req",
                   "proxy_core_busy_pct", "proxy_core_other_pct", "load_core_busy_pct",
                   "load_core_other_pct")
STREAM_MEDIANS = ("mib_per_s", "proxy_cpu_s_per_gib", "proxy_core_other_pct",
                  "load_core_other_pct")
RATIOS = (("rps", "vs_nginx_rps"), ("proxy_cpu_us_per_req", "vs_nginx_cpu"),
          ("mib_per_s", "vs_nginx_mib_per_s"))


def _summarise_target(case: str, rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "failed" not in r]
    failures = [r["failed"] for r in rounds if "failed" in r]
    summary: dict = {"rounds": len(ok), "failed": failures[0] if failures and not ok else None}
    for key in REQUEST_MEDIANS if case in REQUEST_CASES else STREAM_MEDIANS:
        summary[key] = _median(ok, key)
    if case in REQUEST_CASES:
        summary["errors"] = sum(r["errors"] for r in ok)
        summary["rps_min"] = min((r["rps"] for r in ok), default=None)
        summary["rps_max"] = max((r["rps"] for r in ok), default=None)
    summary["proxy_core_other_max_pct"] = _peak(ok, "proxy_core_other_pct")
    summary["load_core_other_max_pct"] = _peak(ok, "load_core_other_pct")
    summary["proxy_rss_peak_mib"] = _peak(ok, "proxy_rss_peak_mib")
    return summary


def summarise(raw: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """Return {case: {target: summary}} from {case: {target: [round results]}}.

    A summary holds the median of each number over its rounds, the peak RSS, the summed
    errors, and `vs_nginx_rps` / `vs_nginx_cpu` (or `vs_nginx_mib_per_s`) ratios; `failed`
    is the first failure message when no round succeeded.
    """
    out: dict[str, dict[str, dict]] = {}
    for case, targets in raw.items():
        out[case] = {target: _summarise_target(case, rounds) for target, rounds in targets.items()}
        nginx = out[case].get("nginx", {})
        for summary in out[case].values():
            for key, ratio in RATIOS:
                mine, ref = summary.get(key), nginx.get(key)
                summary[ratio] = mine / ref if mine is not None and ref else None
    return out


def _num(digits: int):
    return lambda v: "—" if v is None else f"{v:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _range(s: dict) -> str:
    if s.get("rps_min") is None:
        return "—"
    return f"{s['rps_min']:,.0f}–{s['rps_max']:,.0f}"


def _other_load(s: dict) -> str:
    # Small negative values are clock-tick rounding; show them as 0.
    shown = [None if s[k] is None else max(s[k], 0.0)
             for k in ("proxy_core_other_pct", "load_core_other_pct")]
    return " / ".join(_num(0)(v) for v in shown)


# (header, function of the target's summary) per column, after `case` and `target`.
REQUEST_COLUMNS = (
    ("req/s", lambda s: _num(0)(s["rps"])),
    ("req/s range", _range),
    ("p50 ms", lambda s: _num(2)(s["p50_ms"])),
    ("p99 ms", lambda s: _num(2)(s["p99_ms"])),
    ("proxy CPU µs/req", lambda s: _num(1)(s["proxy_cpu_us_per_req"])),
    ("proxy RSS MiB", lambda s: _num(1)(s["proxy_rss_peak_mib"])),
    ("req/s vs nginx", lambda s: _ratio(s["vs_nginx_rps"])),
    ("CPU/req vs nginx", lambda s: _ratio(s["vs_nginx_cpu"])),
    ("other load % proxy / load core", _other_load),
    ("load core busy %", lambda s: _num(0)(s["load_core_busy_pct"])),
    ("errors", lambda s: str(s["errors"])),
)
STREAM_COLUMNS = (
    ("MiB/s", lambda s: _num(0)(s["mib_per_s"])),
    ("proxy peak RSS MiB", lambda s: _num(1)(s["proxy_rss_peak_mib"])),
    ("proxy CPU s/GiB", lambda s: _num(2)(s["proxy_cpu_s_per_gib"])),
    ("MiB/s vs nginx", lambda s: _ratio(s["vs_nginx_mib_per_s"])),
    ("other load % proxy / load core", _other_load),
)


def _table(summary: dict[str, dict[str, dict]], cases: list[str], columns) -> list[str]:
    lines = ["| case | target | " + " | ".join(h for h, _ in columns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
    for case in cases:
        for target, s in summary[case].items():
            if s["failed"]:
                cells = [f"failed: {_one_line(s['failed'])}"] + [""] * (len(columns) - 1)
            else:
                cells = [show(s) for _, show in columns]
            lines.append(f"| {case} | {target} | " + " | ".join(cells) + " |")
    return lines


# Above this share of the proxy's core used by something else, a row is not trustworthy.
OTHER_LOAD_WARNING_PCT = 10.0


def _interference_note(summary: dict[str, dict[str, dict]], cases: list[str]) -> list[str]:
    worst = 0.0
    for case in cases:
        for target, s in summary[case].items():
            # `direct` does not use the proxies' core: load there does not change its numbers.
            keys = ["load_core_other_max_pct"] + (
                ["proxy_core_other_max_pct"] if target != "direct" else [])
            worst = max([worst, *(s.get(k) or 0.0 for k in keys)])
    if worst <= OTHER_LOAD_WARNING_PCT:
        return []
    return ["", f"**Warning:** other programs ran on the measured cores during this run (up to "
            f"{worst:.0f} % of a core in one case, column *other load*). Those rows measure "
            "shared cores, not the proxy alone; rerun on a quiet machine."]


def markdown(meta: dict, summary: dict[str, dict[str, dict]]) -> str:
    """Return the report: run facts, one table for request cases, one for streaming."""
    settings = meta["settings"]
    lines = [f"# Benchmark run {meta['date']}", "", f"Command: `{meta['command']}`", "",
             f"Settings: {settings['connections']} connections, {settings['threads']} wrk "
             f"thread(s), {settings['duration']} s per case after {settings['warmup']} s warm-up, "
             f"{settings['rounds']} round(s), stream size {settings['stream_mib']} MiB; "
             + (f"proxies on CPU {settings['proxy_cpu']}, wrk/curl/origin on CPU "
                f"{settings['load_cpu']}." if settings["proxy_cpu"] is not None
                else "nothing pinned to a core."),
             ""]
    idle = meta.get("busy_before_start")
    if idle:
        lines += ["Cores busy in the second before the run (other programs): " + ", ".join(
            f"CPU {cpu}: {pct:.0f} %" for cpu, pct in sorted(idle.items())) + ".", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in meta["machine"].items()]
    request_cases = [c for c in summary if c in REQUEST_CASES]
    if request_cases:
        lines += ["", "## Requests (wrk, keep-alive, median over rounds)", ""]
        lines += _table(summary, request_cases, REQUEST_COLUMNS)
        lines += _interference_note(summary, request_cases)
    stream_cases = [c for c in summary if c in STREAM_CASES]
    if stream_cases:
        lines += ["", f"## Streaming {settings['stream_mib']} MiB (curl, median over rounds)", ""]
        lines += _table(summary, stream_cases, STREAM_COLUMNS)
        lines += _interference_note(summary, stream_cases)
    if meta.get("failures"):
        lines += ["", "## Failures", ""]
        for failure in meta["failures"]:
            first, _, rest = failure.strip().partition("\n")
            lines.append(f"- {first}")
            if rest.strip():
                lines += ["", "  ```", *[f"  {line}" for line in rest.splitlines()], "  ```"]
    lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "unknown"
    return first.replace("|", "\\|")[:160]
