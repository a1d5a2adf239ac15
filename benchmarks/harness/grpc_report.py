"""The Markdown report of benchmarks/h2.py: one table per case, the goals of the issue with
what was measured against each, and what went wrong (a proxy that stopped answering: its log
tail and Python stacks)."""

from __future__ import annotations

import statistics

GOAL_RPS_RATIO = 0.5  # h2: requests/s at least this times nginx's
GOAL_CPU_RATIO = 2.0  # h2: CPU per request at most this times nginx's
GOAL_ADDED_P99_MS = 2.0  # mtls: gRPC through the sidecar pair, added p99 over direct
GOAL_SHARE_TOLERANCE = 0.10  # spread: each backend within ±10 % (relative) of a third

CASE_TITLES = {
    "h2": "h2: HTTP/2 (h2c) to the proxy, HTTP/1.1 to the backend",
    "h2-grpc": "h2-grpc: gRPC calls (h2c) to the proxy, HTTP/2 (h2c) to the backend",
}


def _f(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_h2(rounds: list[dict]) -> dict:
    """Medians over the rounds that produced figures; errors summed over all rounds; a round
    whose load did not finish counts as failed."""
    finished = [r for r in rounds if "succeeded" in r]
    # A round after which the proxy no longer answered measured a proxy spinning, not serving:
    # its failures count, its rate and CPU do not.
    ok = [r for r in finished if "stuck" not in r]
    row: dict = {"rounds": len(rounds), "measured": len(ok),
                 "failed": [r["failed"] for r in rounds if isinstance(r.get("failed"), str)],
                 "stuck": sum(1 for r in rounds if "stuck" in r),
                 "errors": sum(r["errors"] for r in finished),
                 "non_2xx": sum(r["non_2xx"] for r in finished),
                 "requests": sum(r["total"] for r in finished)}
    if not ok:
        return row
    for key in ("rps", "proxy_cpu_us_per_req", "proxy_core_busy_pct", "load_core_busy_pct",
                "proxy_core_other_pct", "load_core_other_pct"):
        row[key] = _median([r.get(key) for r in ok])
    row["rps_range"] = (min(r["rps"] for r in ok), max(r["rps"] for r in ok))
    row["mean_ms"] = _median([r.get("request_ms", {}).get("mean") for r in ok])
    row["succeeded"] = sum(r["succeeded"] for r in ok)
    row["upstream_max_open"] = max(r["upstream_max_open"] for r in ok)
    row["upstream_distinct"] = max(r["upstream_distinct"] for r in ok)
    return row


def _h2_section(case: str, raw: dict[str, list[dict]], settings: dict) -> tuple[list[str], dict]:
    rows = {target: summarise_h2(rounds) for target, rounds in raw.items()}
    nginx = rows.get("nginx", {})
    lines = [f"### {CASE_TITLES[case]}", "",
             f"`h2load -n {settings['requests']} -c {settings['clients']} -m "
             f"{settings['streams']}` per round, after {settings['warmup_requests']:,} requests "
             f"of warm-up; {settings['rounds']} round(s), medians.", "",
             "| target | req/s | req/s range | mean request ms | proxy CPU µs/req | req/s vs "
             "nginx | CPU/req vs nginx | requests failed (h2load) | non-2xx | upstream "
             "connections, most open at once / seen | proxy core busy % | load core busy % "
             "| other load % proxy / load core |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for target, row in rows.items():
        if not row.get("measured"):
            why = (f"sidecar stuck in {row['stuck']} of {row['rounds']} round(s)"
                   if row["stuck"] else "failed")
            lines.append(f"| {target} | {why} | " + " | ".join(["—"] * 5)
                         + f" | {row['errors']:,} of {row['requests']:,} | {row['non_2xx']:,} | "
                         + " | ".join(["—"] * 4) + " |")
            continue
        rps_ratio = (row["rps"] / nginx["rps"] if nginx.get("rps") and row.get("rps")
                     else None)
        cpu_ratio = (row["proxy_cpu_us_per_req"] / nginx["proxy_cpu_us_per_req"]
                     if nginx.get("proxy_cpu_us_per_req") and row.get("proxy_cpu_us_per_req")
                     else None)
        row["rps_ratio"], row["cpu_ratio"] = rps_ratio, cpu_ratio
        stuck = f" (+{row['stuck']} stuck)" if row["stuck"] else ""
        lines.append(
            f"| {target} | {_f(row['rps'], 0)} | {_f(row['rps_range'][0], 0)}–"
            f"{_f(row['rps_range'][1], 0)} | {_f(row['mean_ms'], 2)} | "
            f"{_f(row['proxy_cpu_us_per_req'])} | {_ratio(rps_ratio)} | {_ratio(cpu_ratio)} | "
            f"{row['errors']:,} of {row['requests']:,}{stuck} | {row['non_2xx']:,} | "
            f"{row['upstream_max_open']} / {row['upstream_distinct']} | "
            f"{_f(row['proxy_core_busy_pct'], 0)} | {_f(row['load_core_busy_pct'], 0)} | "
            f"{_f(row['proxy_core_other_pct'], 0)} / {_f(row['load_core_other_pct'], 0)} |")
        if row["measured"] < row["rounds"]:
            lines.append(f"| | {row['rounds'] - row['measured']} round(s) produced no figures "
                         "(see Problems) | | | | | | | | | | | |")
    lines.append("")
    return lines, rows


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _mtls_section(mtls: dict, settings: dict) -> list[str]:
    lines = ["### mtls: gRPC unary through two sidecars with mTLS, at a fixed rate", "",
             f"Open loop at {settings['rate']:g} calls/s, latency from each call's scheduled "
             f"time, {settings['warmup']:g} s warm-up then {settings['seconds']:g} s measured "
             f"per path, {settings.get('mtls_rounds', 1)} round(s) (path order rotating; "
             "medians, added latency against each round's direct). gRPC: grpcio's asyncio "
             "client, one channel, 32-byte messages, to a "
             "grpcio app (thread-pool server). HTTP/1.1 (same run, benchmarks/mtls_pair.py's "
             f"generator): `GET /1k` over {settings['connections']} keep-alive connections to "
             "an nginx app.", ""]
    for kind, title in (("grpc", "gRPC"), ("http1", "HTTP/1.1")):
        summary = mtls["summary"].get(kind)
        if summary is None:
            continue
        labels = mtls["labels"].get(kind, {})
        lines += [f"{title}:", "",
                  "| path | calls | errors | held rate | p50 ms | p90 ms | p99 ms | max ms | added "
                  "p50 / p90 / p99 ms | vCPU per 1000 calls/s, client / server proxy | other "
                  "programs / steal, % of a core |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
        for name, row in summary.items():
            label = labels.get(name, name)
            if not row.get("measured"):
                why = (row.get("failed") or ["?"])[0].splitlines()[0]
                lines.append(f"| {label} | — | failed: {why} | | | | | | | | |")
                continue
            cpus = row.get("proxies") or {}
            cpu = f"{_f(cpus.get('client'), 3)} / {_f(cpus.get('server'), 3)}" if cpus else "—"
            added = (" / ".join(_f(row.get(f"added_{p}_ms"), 3, sign=True)
                                for p in ("p50", "p90", "p99")) if name != "direct" else "")
            lines.append(
                f"| {label} | {row['scheduled']:,} | {row['errors']:,} | "
                f"{'yes' if row['held'] else 'NO'} | {_f(row['p50_ms'], 3)} | "
                f"{_f(row['p90_ms'], 3)} | {_f(row['p99_ms'], 3)} | {_f(row['max_ms'], 2)} | "
                f"{added} | {cpu} | {_f(row['others_pct'], 0)} / {_f(row['steal_pct'], 0)} |")
        lines.append("")
    return lines


def _spread_section(spread: dict, settings: dict) -> list[str]:
    lines = ["### spread: one client connection, three backends", "",
             f"{settings['spread_calls']:,} unary calls over one grpcio channel with "
             f"{settings['spread_concurrency']} in flight, to a proxy in front of three grpcio "
             "backends (b0, b1, b2, on the load core). Upstream connections per backend from "
             "/proc/net/tcp every 0.1 s (the proxy's own sockets): most open at once / "
             "distinct seen.", "",
             "| target | calls ok | errors | calls/s | b0 | b1 | b2 | upstream connections "
             "b0, b1, b2 | proxy CPU µs/call |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for target, r in spread.items():
        if "ok" not in r:
            lines.append(f"| {target} | failed: {r.get('failed', '?').splitlines()[0]} "
                         "| | | | | | | |")
            continue
        shares = " | ".join(f"{100 * s:.1f} %" if s is not None else "—"
                            for s in r["shares"].values())
        conns = ", ".join(f"{c['max_open']} / {c['distinct']}"
                          for c in r["upstream_by_backend"].values())
        lines.append(f"| {target} | {r['ok']:,} | {r['errors']:,} | {_f(r['calls_per_s'], 0)} "
                     f"| {shares} | {conns} | {_f(r.get('proxy_cpu_us_per_call'))} |")
    lines.append("")
    return lines


def goals(results: dict, h2rows: dict) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    for case in ("h2", "h2-grpc"):
        rows = h2rows.get(case)
        if rows is None:
            continue
        mesh = rows.get("meshproxy", {})
        bad = mesh.get("errors", 0) + mesh.get("non_2xx", 0)
        stuck = f", sidecar stopped answering in {mesh['stuck']} of {mesh['rounds']} round(s)" \
            if mesh["stuck"] else ""
        out.append((f"{case}: 0 errors through meshproxy",
                    f"{mesh['errors']:,} failed, {mesh['non_2xx']:,} non-2xx of "
                    f"{mesh['requests']:,}{stuck}", bad == 0 and not mesh["stuck"]))
        if not mesh.get("measured"):
            for goal in (f"requests/s ≥ {GOAL_RPS_RATIO}× nginx's",
                         f"CPU per request ≤ {GOAL_CPU_RATIO}× nginx's"):
                out.append((f"{case}: {goal}", "not measured: no round ended with the sidecar "
                            "still answering", False))
            continue
        r = mesh.get("rps_ratio")
        out.append((f"{case}: requests/s ≥ {GOAL_RPS_RATIO}× nginx's",
                    f"{_f(mesh.get('rps'), 0)} vs {_f(rows.get('nginx', {}).get('rps'), 0)}: "
                    f"{_ratio(r)}", None if r is None else r >= GOAL_RPS_RATIO))
        c = mesh.get("cpu_ratio")
        out.append((f"{case}: CPU per request ≤ {GOAL_CPU_RATIO}× nginx's",
                    f"{_f(mesh.get('proxy_cpu_us_per_req'))} vs "
                    f"{_f(rows.get('nginx', {}).get('proxy_cpu_us_per_req'))} µs: {_ratio(c)}",
                    None if c is None else c <= GOAL_CPU_RATIO))
    mtls = results.get("mtls")
    if mtls:
        row = mtls["summary"]["grpc"].get("meshproxy", {})
        added = row.get("added_p99_ms")
        nginx = mtls["summary"]["grpc"].get("nginx", {}).get("added_p99_ms")
        ok = added is not None and row.get("held") and not row.get("errors")
        out.append((f"mtls: gRPC through the sidecar pair adds ≤ {GOAL_ADDED_P99_MS:g} ms at p99",
                    "not measured" if added is None else
                    f"{_f(added, 3, sign=True)} ms (nginx pair {_f(nginx, 3, sign=True)} ms)"
                    + ("" if row.get("held") else ", rate not held")
                    + (f", {row['errors']} errors" if row.get("errors") else ""),
                    None if added is None else bool(ok and added <= GOAL_ADDED_P99_MS)))
    spread = results.get("spread", {}).get("meshproxy")
    if spread and "shares" in spread:
        third = 1 / 3
        lo, hi = third * (1 - GOAL_SHARE_TOLERANCE), third * (1 + GOAL_SHARE_TOLERANCE)
        shares = spread["shares"].values()
        met = all(s is not None and lo <= s <= hi for s in shares) and not spread["errors"]
        out.append((f"spread: each backend {100 * lo:.1f}–{100 * hi:.1f} % of the calls "
                    "(a third ± 10 %)", ", ".join(f"{100 * s:.1f} %" for s in shares), met))
        conns = spread["upstream_by_backend"].values()
        one = all(c["distinct"] == 1 for c in conns)
        out.append(("spread: one upstream connection per backend",
                    ", ".join(f"{c['distinct']}" for c in conns) + " connection(s) seen", one))
    return out


def _problems(results: dict) -> list[str]:
    lines: list[str] = []
    for case in ("h2", "h2-grpc"):
        for target, rounds in results.get(case, {}).items():
            for i, r in enumerate(rounds, 1):
                warm = r.get("warmup") or {}
                if warm.get("failed_requests"):
                    lines.append(f"- {case}, {target}, round {i}: the warm-up before it had "
                                 f"{warm['failed_requests']:,} failed requests")
                if "stuck" not in r and not isinstance(r.get("failed"), str) \
                        and not r.get("errors") and not r.get("non_2xx"):
                    continue
                lines += [f"- **{case}, {target}, round {i}**: "
                          + (r["failed"] if isinstance(r.get("failed"), str) else
                             f"h2load: {r.get('succeeded', 0):,} succeeded, "
                             f"{r.get('failed_requests', 0):,} failed, {r.get('errored', 0):,} "
                             f"errored, {r.get('timeout', 0):,} timed out of "
                             f"{r.get('total', 0):,}"), "", f"  `{r['command']}`", ""]
                if r.get("h2load_tail"):
                    lines += ["  ```", *("  " + x for x in r["h2load_tail"].splitlines()[-8:]),
                              "  ```", ""]
                stuck = r.get("stuck")
                if stuck:
                    lines.append(f"  Afterwards the proxy did not answer (alive: "
                                 f"{stuck['alive']}, CPU {_f(stuck.get('cpu_pct_while_stuck'), 0)}"
                                 " % of a core while idle); it was restarted for the next "
                                 "measurement. Log tail:")
                    tail = (stuck.get("log_tail") or "(empty)").splitlines()[-10:]
                    lines += ["", "  ```", *("  " + x for x in tail), "  ```", ""]
                    if stuck.get("py_spy"):
                        main = "\nThread ".join(stuck["py_spy"].split("\nThread ")[0:2])
                        frames = [x for x in main.splitlines()[3:] if x.strip()]
                        lines += ["  Its main thread (`py-spy dump --native`, innermost first):",
                                  "", "  ```", *("  " + x for x in frames[:14]), "  ```", ""]
    for target, r in results.get("spread", {}).items():
        if isinstance(r.get("failed"), str) or r.get("errors") or "stuck" in r:
            lines.append(f"- **spread, {target}**: {r.get('failed') or r.get('errors_by_kind')}"
                         f" {r.get('error_details', '')}")
    mtls = results.get("mtls")
    if mtls:
        for kind, paths in mtls["rounds"].items():
            for name, rounds in paths.items():
                for r in rounds:
                    if isinstance(r.get("failed"), str):
                        lines.append(f"- **mtls {kind}, {name}**: " + r["failed"][:600])
                    elif r.get("errors"):
                        lines.append(f"- **mtls {kind}, {name}**: {r['errors']} errors "
                                     f"{r.get('errors_by_kind')} {r.get('error_details', '')}")
    return lines


def markdown(meta: dict, results: dict) -> str:
    s = meta["settings"]
    pin = (f"proxies pinned to CPU {s['proxy_cpu']}; load generators, backends, apps, control "
           f"plane and harness to CPU {s['load_cpu']}" if s["proxy_cpu"] is not None
           else "nothing pinned")
    lines = ["## HTTP/2 and gRPC through the sidecar, side by side with nginx", "",
             f"Command: `{meta['command']}`", "",
             f"Date: {meta['date']}; {pin}.", "",
             "| machine | |", "| --- | --- |",
             *(f"| {k} | {v} |" for k, v in meta["machine"].items()), "",
             "Cores busy in the second before the run: " + ", ".join(
                 f"CPU {c}: {p:.0f} %" for c, p in sorted(meta["busy_before_start"].items()))
             + ".", ""]
    h2rows: dict = {}
    for case in ("h2", "h2-grpc"):
        if case in results:
            section, h2rows[case] = _h2_section(case, results[case], s)
            lines += section
    if "mtls" in results:
        lines += _mtls_section(results["mtls"], s)
    if "spread" in results:
        lines += _spread_section(results["spread"], s)
    lines += ["### Against the goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
    for goal, measured, met in goals(results, h2rows):
        lines.append(f"| {goal} | {measured} | "
                     f"{'—' if met is None else ('yes' if met else '**no**')} |")
    lines.append("")
    problems = _problems(results)
    if problems:
        lines += ["### Problems", "", *problems, ""]
        if meta.get("workdir"):
            lines += [f"Configs and logs kept in `{meta['workdir']}`.", ""]
    return "\n".join(lines)
