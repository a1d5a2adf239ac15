"""The Markdown report of benchmarks/mtls_pair.py: latency added over direct, CPU per
1000 requests/s per proxy, the goals, the machine's load during each measurement."""

from __future__ import annotations

import statistics

GOAL_P90_RATIO = 1.5  # meshproxy pair's added p90 at most this times the nginx pair's
GOAL_VCPU_PER_1000 = 0.10  # per sidecar
PERCENTILES = ("p50", "p90", "p99")
REFERENCE = ("For scale: Istio publishes 0.20 vCPU per 1000 requests/s for its sidecar (1.24) "
             "and +0.23 ms p90 / +0.30 ms p99 for a client+server sidecar pair (1.20), "
             "on its own hardware and load.")


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """Per path: medians over the rounds that produced figures (added latency per round
    against that round's direct, then the median), CPU per proxy role, and worst-case flags."""
    direct = rounds.get("direct", [])
    out: dict[str, dict] = {}
    for name, results in rounds.items():
        ok = [r for r in results if "failed" not in r]
        row: dict = {"rounds": len(results), "measured": len(ok),
                     "failed": [r["failed"] for r in results if "failed" in r]}
        if not ok:
            out[name] = row
            continue
        for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms",
                    "timer_lag_p99_ms", "others_pct", "steal_pct", "generator_vcpu", "app_vcpu"):
            row[key] = _median([r.get(key) for r in ok])
        row["max_ms"] = max(r["max_ms"] for r in ok if r.get("max_ms") is not None) \
            if any(r.get("max_ms") is not None for r in ok) else None
        row["errors"] = sum(r["errors"] for r in ok)
        row["scheduled"] = sum(r["scheduled"] for r in ok)
        row["held"] = all(r["held"] for r in ok)
        row["loadavg"] = [r["loadavg"][0] for r in ok]
        row["others_top"] = max(ok, key=lambda r: r["others_pct"])["others_top"]
        row["disturbed_max_pct"] = max(r["others_pct"] + r["steal_pct"] for r in ok)
        row["attempts"] = sum(r.get("attempts", 1) for r in ok)
        row["cores_busy_pct"] = {cpu: _median([r["cores_busy_pct"].get(cpu) for r in ok])
                                 for cpu in ok[0]["cores_busy_pct"]}
        roles = sorted({role for r in ok for role in r["proxies"]})
        row["proxies"] = {role: _median([r["proxies"][role]["vcpu_per_1000_rps"]
                                         for r in ok if role in r["proxies"]]) for role in roles}
        if name != "direct":
            for p in PERCENTILES:
                added = []
                for r, d in zip(results, direct):
                    if "failed" not in r and "failed" not in d:
                        added.append(r[f"{p}_ms"] - d[f"{p}_ms"])
                row[f"added_{p}_ms"] = _median(added)
        out[name] = row
    return out


def goals(summary: dict[str, dict]) -> list[dict]:
    """The two goals, each with what was measured and whether it is met (None: not measured)."""
    mesh, nginx = summary.get("meshproxy", {}), summary.get("nginx", {})
    rows = []
    m, n = mesh.get("added_p90_ms"), nginx.get("added_p90_ms")
    if m is None or n is None:
        rows.append({"goal": f"added p90 ≤ {GOAL_P90_RATIO}× the nginx pair's",
                     "measured": "not measured", "met": None})
    else:
        ratio = f"{m / n:.2f}×" if n > 0 else "ratio undefined (nginx pair adds nothing)"
        rows.append({"goal": f"added p90 ≤ {GOAL_P90_RATIO}× the nginx pair's",
                     "measured": f"+{m:.3f} ms vs +{n:.3f} ms: {ratio}",
                     "met": m <= GOAL_P90_RATIO * n if n > 0 else m <= 0})
    cpus = mesh.get("proxies") or {}
    if cpus:
        worst = max(cpus.values())
        rows.append({"goal": f"≤ {GOAL_VCPU_PER_1000:.2f} vCPU per 1000 req/s per sidecar",
                     "measured": ", ".join(f"{role} {v:.3f}" for role, v in sorted(cpus.items())),
                     "met": worst <= GOAL_VCPU_PER_1000})
    else:
        rows.append({"goal": f"≤ {GOAL_VCPU_PER_1000:.2f} vCPU per 1000 req/s per sidecar",
                     "measured": "not measured", "met": None})
    return rows


def _f(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown(meta: dict, summary: dict[str, dict], labels: dict[str, str]) -> str:
    s = meta["settings"]
    pin = (f"proxies pinned to CPU {s['proxy_cpu']}; load generator, app, control plane and "
           f"harness to CPU {s['load_cpu']}" if s["proxy_cpu"] is not None else "nothing pinned")
    lines = [
        "## Two proxies with mutual TLS between them, at a fixed rate",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Date: {meta['date']}. Settings: open loop at {s['rate']:g} req/s over "
        f"{s['connections']} keep-alive connections, `GET /1k` (1024-byte body), "
        f"{s['warmup']:g} s warm-up then {s['seconds']:g} s measured per path, "
        f"{s['rounds']} round(s) (path order rotating); latency from each request's scheduled "
        f"send time; {pin}.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in meta["machine"].items()),
        "",
        "Cores busy in the second before the run: " + ", ".join(
            f"CPU {cpu}: {pct:.0f} %" for cpu, pct in sorted(meta["busy_before_start"].items()))
        + f"; load average {meta['loadavg_before']}.",
        "",
        "| path | requests | errors | held rate | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| added p50 ms | added p90 ms | added p99 ms | vCPU per 1000 req/s (client / server "
        "proxy) | other programs / steal, % of a core | load average (1 min) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | --- |",
    ]
    for name, row in summary.items():
        label = labels.get(name, name)
        if not row.get("measured"):
            lines.append(f"| {label} | — | failed | — | " + " | ".join(["—"] * 11) + " |")
            continue
        cpus = row.get("proxies") or {}
        cpu = (f"{_f(cpus.get('client'))} / {_f(cpus.get('server'))}" if cpus else "—")
        lines.append(
            f"| {label} | {row['scheduled']:,} | {row['errors']:,} | "
            f"{'yes' if row['held'] else 'NO'} | {_f(row['p50_ms'])} | {_f(row['p90_ms'])} | "
            f"{_f(row['p99_ms'])} | {_f(row['p999_ms'])} | {_f(row['max_ms'], 2)} | "
            f"{_f(row.get('added_p50_ms'), sign=True)} | {_f(row.get('added_p90_ms'), sign=True)} | "
            f"{_f(row.get('added_p99_ms'), sign=True)} | {cpu} | {_f(row['others_pct'], 0)} / "
            f"{_f(row['steal_pct'], 0)} | "
            f"{', '.join(load.split()[0] for load in row['loadavg'])} |")
    lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]
    for g in goals(summary):
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
    lines += ["", REFERENCE, ""]
    notes = []
    for name, row in summary.items():
        if not row.get("measured"):
            continue
        top = ", ".join(f"{o['comm']} ({o['pid']}) {o['pct']:.0f} %" for o in row["others_top"])
        busy = ", ".join(f"CPU {c} {_f(p, 0)} %" for c, p in row["cores_busy_pct"].items())
        notes.append(f"- {labels.get(name, name)}: cores busy {busy}; other programs' biggest "
                     f"users: {top or 'none'}; load generator {_f(row['generator_vcpu'], 2)} "
                     f"vCPU, app {_f(row.get('app_vcpu'), 2)} vCPU, generator timer lag p99 "
                     f"{_f(row['timer_lag_p99_ms'])} ms; {row['attempts']} attempt(s) over "
                     f"{row['measured']} round(s).")
    if notes:
        lines += ["During the measured windows (median over rounds). *Other programs* is the "
                  "CPU the cores spent on anything this run did not start (processes that ended "
                  "within the window and kernel work included), *steal* the time the hypervisor "
                  "gave the machine's cores to others; the biggest users are those still "
                  "running at its end:", "", *notes, ""]
    failures = [f"- {labels.get(n, n)}: {msg.splitlines()[0]}" for n, row in summary.items()
                for msg in row.get("failed", [])] + [f"- {m.splitlines()[0]}"
                                                     for m in meta.get("failures", [])]
    if failures:
        lines += ["Failures (details in the JSON and the kept work folder):", "", *failures, ""]
    noisy = [f"{labels.get(n, n)} ({row['disturbed_max_pct']:.0f} %)"
             for n, row in summary.items()
             if row.get("measured") and row["disturbed_max_pct"] > s["noise_limit"]]
    if noisy:
        lines += [f"**Warning:** other programs and hypervisor steal took more than "
                  f"{s['noise_limit']:g} % of a core "
                  f"during {', '.join(noisy)}, even after repeating (up to "
                  f"{s['noise_retries']} times); those figures include their interference.", ""]
    not_held = [labels.get(n, n) for n, row in summary.items()
                if row.get("measured") and not row["held"]]
    if not_held:
        lines += [f"**Did not hold {s['rate']:g} req/s** (errors, or latency growing through the "
                  f"window): {', '.join(not_held)}. Its percentiles measure a queue, not the "
                  "proxy; rerun with a lower `--rate` to find the rate it holds.", ""]
    return "\n".join(lines)
