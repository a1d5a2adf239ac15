"""The Markdown report of a scenario run: one table per scenario, and each goal checked.

Goals (from the resilience work): a. PeakEWMA's p99 at most 1.5x the p99 of the two healthy
instances alone, and at most 5 % of requests to the slow instance; b. at least 99.9 % of GETs
succeed with the defaults while one instance answers 503; c. no failed GET while an instance
is killed and restarted; d. at 300 requests/s each of two equal instances gets 40–60 % of the
answers, and a 50 ms slower one less than 5 %.
"""

from __future__ import annotations

from harness.scenario_cases import AFFECTED, CASES, SCENARIOS, SHARE_AFFECTED

P99_FACTOR = 1.5
SLOW_SHARE_MAX = 0.05
SUCCESS_MIN_PCT = 99.9
EQUAL_SHARE = (0.40, 0.60)
# Above this share of a core used by other programs during a case, its numbers are suspect.
OTHER_LOAD_WARNING_PCT = 10.0

LABELS = {case.key: case for case in CASES}


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f} %"


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {count}" for kind, count in kinds.items()) or "—"


def _other(cpu: dict) -> str:
    shown = [None if cpu.get(k) is None else max(cpu[k], 0.0)
             for k in ("proxy_core_other_pct", "load_core_other_pct")]
    return " / ".join(_num(v, 0) for v in shown)


def _cpu_cells(r: dict) -> list[str]:
    cpu = r["cpu"]
    return [_num(cpu["proxy_cpu_us_per_req"]), _num(cpu["proxy_core_busy_pct"], 0),
            _num(cpu["load_core_busy_pct"], 0), _other(cpu)]


CPU_HEADERS = ["proxy CPU µs/req", "proxy core busy %", "load core busy %",
               "other load % proxy / load core"]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(headers), "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |",
            *(_row(r) for r in rows)]


def _failed_row(key: str, why: str, width: int) -> list[str]:
    first = why.strip().splitlines()[0] if why.strip() else "unknown"
    return [LABELS[key].label, f"failed: {first[:160]}"] + [""] * (width - 2)


def _scenario_a(results: dict) -> list[str]:
    headers = ["case", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
               f"to {AFFECTED} (slow)", "failed", *CPU_HEADERS]
    rows, timelines = [], []
    for key, r in results.items():
        if "failed" in r:
            rows.append(_failed_row(key, r["failed"], len(headers)))
            continue
        s = r["summary"]
        slow = s["share"].get(AFFECTED, 0.0) if key != "a-healthy" else None
        if slow is not None and r.get("timeline"):
            timelines.append(f"- {LABELS[key].label}: "
                             + " ".join(f"{100 * v:.1f}" for v in r["timeline"]))
        rows.append([LABELS[key].label, _num(s["rps"], 0), _num(s["p50_ms"], 2),
                     _num(s["p90_ms"], 2), _num(s["p99_ms"], 2), _num(s["max_ms"], 1),
                     _pct(slow), str(s["failures"]), *_cpu_cells(r)])
    lines = _table(headers, rows)
    if timelines:
        lines += ["", f"{AFFECTED}'s share of answers (%) per second from the start of the load "
                  "(warm-up included):", "", *timelines]
    base, peak = results.get("a-healthy", {}), results.get("a-peakewma", {})
    if "summary" in base and "summary" in peak and base["summary"]["p99_ms"]:
        limit = P99_FACTOR * base["summary"]["p99_ms"]
        p99 = peak["summary"]["p99_ms"]
        share = peak["summary"]["share"].get(AFFECTED, 0.0)
        p99_met = p99 is not None and p99 <= limit
        lines += ["", f"Goal: PeakEWMA p99 ≤ {P99_FACTOR}× the healthy-only p99 "
                  f"({_num(base['summary']['p99_ms'], 2)} ms → limit {_num(limit, 2)} ms): "
                  f"{_num(p99, 2)} ms, **{'met' if p99_met else 'missed'}**"
                  f"; ≤ {SLOW_SHARE_MAX:.0%} of requests to {AFFECTED}: {_pct(share)}, "
                  f"**{'met' if share <= SLOW_SHARE_MAX else 'missed'}**."]
    return lines


def _scenario_b(results: dict) -> list[str]:
    headers = ["case", "requests", "success", "failed (kind: count)", "p50 ms", "p99 ms",
               "retries made", "retries refused by budget", "ejections", *CPU_HEADERS]
    rows, times = [], []
    for key, r in results.items():
        if "failed" in r:
            rows.append(_failed_row(key, r["failed"], len(headers)))
            continue
        s, m = r["summary"], r["metrics"]
        if r.get("failure_times_s"):
            shown = r["failure_times_s"]
            more = s["failures"] - len(shown)
            times.append(f"- {LABELS[key].label}: " + ", ".join(f"{t:.2f}" for t in shown)
                         + (f" and {more} more" if more > 0 else ""))
        rows.append([LABELS[key].label, f"{s['requests']:,}", _num(s["success_pct"], 3) + " %",
                     _kinds(s["failures_by_kind"]), _num(s["p50_ms"], 2), _num(s["p99_ms"], 2),
                     _num(m.get("retries_total"), 0), _num(m.get("budget_exhausted"), 0),
                     _num(m.get("ejections"), 0), *_cpu_cells(r)])
    lines = _table(headers, rows)
    if times:
        lines += ["", "Failed requests, seconds after the first request (no warm-up in this "
                  "scenario: the first requests are the ones ejection has not caught yet):", "",
                  *times]
    d = results.get("b-defaults", {})
    if "summary" in d and d["summary"]["success_pct"] is not None:
        pct = d["summary"]["success_pct"]
        lines += ["", f"Goal: ≥ {SUCCESS_MIN_PCT} % of GETs succeed with the defaults: "
                  f"{pct:.3f} %, **{'met' if pct >= SUCCESS_MIN_PCT else 'missed'}**."]
    return lines


def _scenario_c(results: dict) -> list[str]:
    headers = ["case", "requests", "failed (kind: count)", "p99 ms", "max ms",
               f"{AFFECTED} back after restart", f"{AFFECTED} share once back",
               "retries made", "ejections", *CPU_HEADERS]
    rows, timelines = [], []
    for key, r in results.items():
        if "failed" in r:
            rows.append(_failed_row(key, r["failed"], len(headers)))
            continue
        s, m, rc = r["summary"], r["metrics"], r["recovery"]
        back = rc["first_answer_after_restart_s"]
        rows.append([LABELS[key].label, f"{s['requests']:,}", _kinds(s["failures_by_kind"]),
                     _num(s["p99_ms"], 2), _num(s["max_ms"], 1),
                     "not within the run" if back is None else f"{back:.1f} s",
                     _pct(rc["share_after_return"], 0), _num(m.get("retries_total"), 0),
                     _num(m.get("ejections"), 0), *_cpu_cells(r)])
        ev = r["events"]
        shares = " ".join(f"{round(100 * v)}" for v in r["timeline"])
        timelines.append(f"- {LABELS[key].label}: killed at +{ev['killed_at']:.1f} s, "
                         f"accepting again at +{ev['back_at']:.1f} s (load start = 0); "
                         f"{AFFECTED}'s share of answers (%) per second from 2 s before the "
                         f"kill: {shares}")
    lines = _table(headers, rows)
    if timelines:
        lines += ["", *timelines]
    d = results.get("c-defaults", {})
    if "summary" in d:
        failed = d["summary"]["failures"]
        lines += ["", f"Goal: zero failed GETs with the defaults: {failed}, "
                  f"**{'met' if failed == 0 else 'missed'}**."]
    return lines


def _scenario_d(results: dict) -> list[str]:
    headers = ["case", "req/s", "p50 ms", "p99 ms", "share of answers", "failed",
               "after the slow answers or the restart", *CPU_HEADERS]
    rows, timelines, goals = [], [], []
    for key, r in results.items():
        if "failed" in r:
            rows.append(_failed_row(key, r["failed"], len(headers)))
            continue
        s, case = r["summary"], LABELS[key]
        shares = ", ".join(f"{name} {_pct(share)}" for name, share in sorted(s["share"].items()))
        after = "—"
        if "after_delay" in r:
            a = r["after_delay"]
            after = ("its slow answers were not over" if a is None else
                     f"{SHARE_AFFECTED} {_pct(a['share'].get(SHARE_AFFECTED, 0.0))} of "
                     f"{a['requests']:,} from +{r['delay_over_s']:.1f} s on")
        elif "recovery" in r:
            rc = r["recovery"]
            back = rc["first_answer_after_restart_s"]
            after = (f"{case.kill} not back within the run" if back is None else
                     f"{case.kill} back {back:.1f} s after the restart, then "
                     f"{_pct(rc['share_after_return'])}")
        if r.get("timeline"):
            if case.kill:
                ev = r["events"]
                timelines.append(f"- {case.label}: {case.kill}, from 2 s before the kill "
                                 f"(killed at +{ev['killed_at']:.1f} s, accepting again at "
                                 f"+{ev['back_at']:.1f} s): "
                                 + " ".join(f"{100 * v:.0f}" for v in r["timeline"]))
            else:
                timelines.append(f"- {case.label}: {SHARE_AFFECTED}, from the start of the load "
                                 "(warm-up included): "
                                 + " ".join(f"{100 * v:.0f}" for v in r["timeline"]))
        rows.append([case.label, _num(s["rps"], 0), _num(s["p50_ms"], 2), _num(s["p99_ms"], 2),
                     shares, str(s["failures"]), after, *_cpu_cells(r)])
        mine = s["share"].get(SHARE_AFFECTED, 0.0)
        if key == "d-equal":
            low, high = EQUAL_SHARE
            met = all(low <= s["share"].get(n, 0.0) <= high for n in ("b0", SHARE_AFFECTED))
            goals.append(f"each of two equal instances gets {low:.0%}–{high:.0%}: "
                         f"{_pct(s['share'].get('b0', 0.0))} / {_pct(mine)}, "
                         f"**{'met' if met else 'missed'}**")
        elif key == "d-slower":
            goals.append(f"≤ {SLOW_SHARE_MAX:.0%} to the {SHARE_AFFECTED} that is 50 ms slower: "
                         f"{_pct(mine)}, **{'met' if mine <= SLOW_SHARE_MAX else 'missed'}**")
    lines = _table(headers, rows)
    if timelines:
        lines += ["", "Share of answers (%) per second:", "", *timelines]
    if goals:
        lines += ["", "Goal: " + "; ".join(goals) + "."]
    return lines


def _warnings(results: dict) -> list[str]:
    worst = max((max(r["cpu"].get("proxy_core_other_pct") or 0.0,
                     r["cpu"].get("load_core_other_pct") or 0.0)
                 for r in results.values() if "cpu" in r), default=0.0)
    if worst <= OTHER_LOAD_WARNING_PCT:
        return []
    return ["", f"**Warning:** other programs used up to {worst:.0f} % of a measured core "
            "during this scenario (column *other load*); latency figures are disturbed."]


def markdown(meta: dict, results: dict[str, dict]) -> str:
    """Return the report: run facts, machine facts, one section per scenario that ran."""
    s = meta["settings"]
    pin = (f"proxy on CPU {s['proxy_cpu']}, load generator and backends on CPU {s['load_cpu']}"
           if s["proxy_cpu"] is not None else "nothing pinned to a core")
    lines = [f"# Resilience scenarios {meta['date']}", "", f"Command: `{meta['command']}`", "",
             f"Settings: {s['concurrency']} keep-alive connections (closed loop, one request "
             f"at a time each, `GET /`), {s['warmup']:g} s warm-up (not counted; none in "
             f"scenario b) then {s['duration']:g} s measured per case (scenario c: kill "
             f"{s['kill_at']:g} s "
             f"after the warm-up, restart {s['restart_after']:g} s later, "
             f"{s['recovery_window']:g} s more), {s['request_timeout']:g} s request timeout; "
             f"{pin}. Three backends b0, b1, b2 (Python asyncio), {AFFECTED} the affected one; "
             f"in scenario d two, b0 and {SHARE_AFFECTED}, loaded open loop instead (requests "
             "fall due at a fixed rate whatever the answers do; latency from when a request "
             "was due). Latencies are of successful requests, measured by the client.", ""]
    idle = meta.get("busy_before_start")
    if idle:
        lines += ["Cores busy in the second before the run (other programs): " + ", ".join(
            f"CPU {cpu}: {pct:.0f} %" for cpu, pct in sorted(idle.items())) + ".", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in meta["machine"].items()]
    sections = {"a": _scenario_a, "b": _scenario_b, "c": _scenario_c, "d": _scenario_d}
    for letter, title in SCENARIOS.items():
        mine = {k: r for k, r in results.items() if LABELS[k].scenario == letter}
        if not mine:
            continue
        lines += ["", f"## {letter}. {title}", ""]
        lines += sections[letter](mine)
        notes = [f"{LABELS[k].label}: {LABELS[k].note}" for k in mine if LABELS[k].note]
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines += _warnings(mine)
    if meta.get("failures"):
        lines += ["", "## Failures", ""]
        for failure in meta["failures"]:
            first, _, rest = failure.strip().partition("\n")
            lines.append(f"- {first}")
            if rest.strip():
                lines += ["", "  ```", *[f"  {line}" for line in rest.splitlines()], "  ```"]
    lines.append("")
    return "\n".join(lines)
