"""soak.py's figures: per-process memory and descriptor trends, error counts, the load's
failures, the goals, the Markdown report, the CSV of samples and the plot.

Everything here reads the run's JSON (`raw`), so a report or a plot can be made again from a
saved run (`soak.py --plot-only FILE.json`) without the mesh.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from pathlib import Path

ERROR_KEYS = ("failed_requests", "tls_failures", "config_errors", "cert_failures")
RSS_GOAL_PCT = 5.0
KIND_ORDER = {"control": 0, "sidecar": 1, "app": 2, "up": 3}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _window(rows: list[dict], key: str, start: float, end: float) -> list[float]:
    return [r[key] for r in rows if start <= r["t"] < end and r.get(key) is not None]


def process_summary(raw: dict) -> list[dict]:
    """One row per process (by name): RSS and descriptors at the steady point (the median of
    the samples in the minute after `steady_after`) and at the end (the median of the last
    minute), the peak, growth, error-counter increases over the soak, and restarts."""
    steady = raw["settings"]["steady_after"]
    duration = raw["soak"]["elapsed"]
    by_name: dict[str, list[dict]] = {}
    for row in raw["samples"]:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for name, rows in by_name.items():
        rows.sort(key=lambda r: r["t"])
        rss_steady = _median(_window(rows, "rss_kib", steady, steady + 60))
        rss_end = _median(_window(rows, "rss_kib", duration - 60, duration + 60))
        fds_steady = _window(rows, "fds", steady, steady + 60)
        fds_end = _window(rows, "fds", duration - 60, duration + 60)
        growth = (100.0 * (rss_end - rss_steady) / rss_steady
                  if rss_steady and rss_end is not None else None)
        errors = {}
        for key in ERROR_KEYS + ("requests", "retries"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                errors[key] = values[-1] - values[0]
        fresh = next((r for r in raw.get("fresh_samples", []) if r["name"] == name), None)
        idle = [r for r in raw.get("idle_samples", []) if r["name"] == name]
        pids = []
        for r in rows + idle:
            if not pids or pids[-1] != r["pid"]:
                pids.append(r["pid"])
        out.append({
            "name": name, "kind": rows[0]["kind"],
            "rss_start_mib": rows[0]["rss_kib"] / 1024 if rows[0].get("rss_kib") else None,
            "rss_steady_mib": rss_steady / 1024 if rss_steady else None,
            "rss_end_mib": rss_end / 1024 if rss_end else None,
            "rss_peak_mib": max((r["rss_kib"] for r in rows if r.get("rss_kib")), default=0) / 1024,
            "rss_growth_pct": growth,
            "fds_steady_median": _median(fds_steady), "fds_steady_max": max(fds_steady, default=None),
            "fds_end_median": _median(fds_end), "fds_max": max((r["fds"] for r in rows if r.get("fds")), default=None),
            "errors": errors, "restarts": len(pids) - 1,
            "fds_fresh": fresh["fds"] if fresh else None,
            "fds_after_idle": idle[-1]["fds"] if idle else None,
            "close_wait_max": max((r.get("close_wait") or 0 for r in rows + idle), default=0),
            "close_wait_after_idle": idle[-1].get("close_wait") if idle else None,
        })
    out.sort(key=lambda p: (KIND_ORDER.get(p["kind"], 9), p["name"]))
    return out


def load_summary(raw: dict) -> dict:
    """The load's totals from its records: requests, rate, the answers that were not the
    expected ones (by operation and answer), and latency percentiles."""
    intervals = raw["load_intervals"]
    sent = sum(i["sent"] for i in intervals)
    failures = Counter()
    for i in intervals:
        for key, n in i["failed_by"].items():
            failures[key] += n
    lat = raw["soak"].get("latency_ms", {})
    return {"sent": sent, "failed": sum(failures.values()), "failed_by": dict(failures.most_common()),
            "rate": sent / raw["soak"]["elapsed"] if raw["soak"]["elapsed"] else 0.0, **lat}


def goals(procs: list[dict], load: dict, steady_after: float) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for the three soak goals; only sidecars and the control plane
    count for memory and descriptors."""
    mesh = [p for p in procs if p["kind"] in ("sidecar", "control")]
    growths = [p["rss_growth_pct"] for p in mesh if p["rss_growth_pct"] is not None]
    worst = max(mesh, key=lambda p: p["rss_growth_pct"] if p["rss_growth_pct"] is not None else -1e9,
                default=None)
    if all(p["fds_after_idle"] is not None and p["fds_fresh"] is not None for p in mesh):
        # The decision: after the idle keep-alive of every connection has passed, only a leaked
        # descriptor is still open.
        fd_grew = [p for p in mesh if p["fds_after_idle"] > p["fds_fresh"] or p["close_wait_after_idle"]]
        fd_goal = "no descriptor growth: after the load and the idle period, as many as before any traffic"
        fd_text = lambda p: f"{p['name']} {p['fds_fresh']}→{p['fds_after_idle']}"  # noqa: E731
    else:  # a run without the idle period: the trend under load
        fd_grew = [p for p in mesh if p["fds_end_median"] is not None and p["fds_steady_max"] is not None
                   and p["fds_end_median"] > p["fds_steady_max"]]
        fd_goal = f"no descriptor growth (end median ≤ the highest count of minute {steady_after / 60:g})"
        fd_text = lambda p: f"{p['name']} {p['fds_steady_max']}→{p['fds_end_median']:g}"  # noqa: E731
    restarted = [p["name"] for p in mesh if p["restarts"]]
    return [
        ("0 failed requests that should have succeeded",
         f"{load['failed']:,} of {load['sent']:,}", load["failed"] == 0),
        (f"RSS growth < {RSS_GOAL_PCT:g} % from minute {steady_after / 60:g} to the end, every sidecar "
         "and the control plane",
         (f"max {max(growths):+.1f} % ({worst['name']}), median {statistics.median(growths):+.1f} %"
          if growths and worst else "not measured"),
         bool(growths) and max(growths) < RSS_GOAL_PCT and len(growths) == len(mesh)),
        (fd_goal,
         ("none grew" if not fd_grew else ", ".join(fd_text(p) for p in fd_grew))
         + (f"; restarted: {', '.join(restarted)}" if restarted else ""),
         not fd_grew and not restarted),
    ]


def _fmt(value, spec: str = ".1f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def markdown(raw: dict) -> str:
    """The report."""
    procs = process_summary(raw)
    load = load_summary(raw)
    s, soak = raw["settings"], raw["soak"]
    lines = [f"# Soak: the demo mesh under `meshproxy demo load` ({raw['meta']['started']})", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in raw["meta"]["machine"].items()]
    lines += [f"| busy before start | {raw['meta']['busy_before']} |",
              f"| command | `{raw['meta']['command']}` |", ""]
    if raw.get("ramp"):
        lines += ["## The maximum (ramp)", "",
                  f"Steps of {s['ramp_step']:g} s of `demo load --concurrency {s['concurrency']}`; a step "
                  f"passes when it sent ≥ 95 % of its rate, ≤ 1 % of answers were not the expected "
                  f"ones, and ingestion's queue to the scheduler stayed ≤ {s['queue_limit']} in the "
                  "second half of the step (above that the scheduler is falling behind and creates "
                  "will be refused with 503 once the queue is full).", "",
                  "| rate req/s | sent req/s | unexpected answers | p50 ms | p99 ms | queue (2nd half, max) | passed |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for step in raw["ramp"]:
            lines.append(f"| {step['rate']:g} | {step['achieved']:.1f} | {step['failed']} "
                         f"({100 * step['failed'] / max(step['sent'], 1):.1f} %) | {_fmt(step['p50'], '.0f')} | "
                         f"{_fmt(step['p99'], '.0f')} | {_fmt(step['queue'], 'd')} | {'yes' if step['passed'] else 'no'} |")
        lines.append("")
    lines += ["## Soak", "",
              f"{soak['rate']:g} req/s (half of {soak['max_rate']:g}) for {soak['elapsed'] / 60:.1f} min, "
              f"`--concurrency {s['concurrency']} --seed {s['seed']}`; every process sampled every "
              f"{s['interval']:g} s. Sent {load['sent']:,} requests ({load['rate']:.1f}/s); latency at "
              f"ingestion p50 {_fmt(load.get('p50'), '.0f')} ms, p99 {_fmt(load.get('p99'), '.0f')} ms, "
              f"max {_fmt(load.get('max'), '.0f')} ms.", ""]
    if soak.get("cpu"):
        c = soak["cpu"]
        lines += [f"CPU over the soak: the mesh (`up` and its children) {c['mesh_pct']:.0f} % of a core, "
                  f"the load generator {c['load_pct']:.0f} %, other programs {c['other_pct']:.0f} % "
                  f"(the machine's {c['cores']} cores were {c['busy_pct']:.0f} % busy on average; "
                  f"load average {c['loadavg_min']:.1f}–{c['loadavg_max']:.1f}).", ""]
    lines += ["| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {g} | {m} | {'**yes**' if ok else '**no**'} |" for g, m, ok in goals(procs, load, s["steady_after"])]
    lines.append("")
    if load["failed_by"]:
        lines += ["Answers at ingestion that were not the expected ones (operation answer: count): "
                  + ", ".join(f"{k}: {n}" for k, n in load["failed_by"].items()) + ".", ""]
    lines += exceptions_lines(raw.get("app_exceptions"))
    lines += ["| process | RSS start MiB | RSS min 5 MiB | RSS end MiB | growth | peak MiB | fds fresh | fds min 5 (max) | "
              "fds end | fds max | fds after idle | CLOSE_WAIT max | failed requests | TLS / config / cert errors | restarts |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in procs:
        e = p["errors"]
        other = (" / ".join(_fmt(e.get(k), ".0f") for k in ("tls_failures", "config_errors", "cert_failures"))
                 if e else "—")
        growth = "—" if p["rss_growth_pct"] is None else f"{p['rss_growth_pct']:+.1f} %"
        failed = _fmt(e.get("failed_requests"), ",.0f") if e else "—"
        if e.get("requests"):
            failed += f" of {e['requests']:,.0f}"
        lines.append(
            f"| {p['name']} | {_fmt(p['rss_start_mib'])} | {_fmt(p['rss_steady_mib'])} | {_fmt(p['rss_end_mib'])} | "
            f"{growth} | {p['rss_peak_mib']:.1f} | {_fmt(p['fds_fresh'], 'g')} | "
            f"{_fmt(p['fds_steady_median'], 'g')} ({_fmt(p['fds_steady_max'], 'g')}) | "
            f"{_fmt(p['fds_end_median'], 'g')} | {_fmt(p['fds_max'], 'g')} | {_fmt(p['fds_after_idle'], 'g')} | "
            f"{p['close_wait_max']} | {failed} | {other} | {p['restarts']} |")
    lines += ["", "*RSS min 5* and *fds min 5*: medians (and the highest) of the samples in the minute "
              f"after minute {s['steady_after'] / 60:g}; *end*: medians of the last minute; *fresh*: once `up` "
              "was ready, before any traffic; *after idle*: after the load and "
              f"{s.get('idle', 0):g} s without traffic (longer than every idle keep-alive); *CLOSE_WAIT "
              "max*: the most TCP sockets the peer had closed and the process had not, in any sample. "
              "*failed requests*: the "
              "sidecar's `meshproxy_requests_total{classification=\"failure\"}` (inbound and outbound) "
              "added during the soak, of all its requests; they include the demo's designed failures "
              "(package-1's 503s, drone-telemetry-2's UNAVAILABLE), which the callers' sidecars retry. "
              "Apps and `up` are listed for reference; the goals are about the sidecars and the "
              "control plane.", ""]
    if raw.get("png"):
        lines += [f"Plot: `{raw['png']}`.", ""]
    if raw.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in raw["notes"]] + [""]
    return "\n".join(lines)


def exceptions_lines(found: dict | None) -> list[str]:
    """The apps' unhandled exceptions (500 answers that are the app's own bug), as a list."""
    if not found:
        return ["No app logged an unhandled exception.", ""] if found is not None else []
    lines = ["Unhandled exceptions in the apps' logs (each one a 500 answer from the app itself):", ""]
    for app, counts in found.items():
        lines += [f"- {app}: " + "; ".join(f"`{message}` ×{n}" for message, n in counts.items())]
    return lines + [""]


def write_csv(raw: dict, path: Path) -> None:
    """Every sample, one row per process and time."""
    keys = ["t", "name", "kind", "pid", "rss_kib", "fds", "requests", "failed_requests", "retries",
            "tls_failures", "config_errors", "cert_failures"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in raw["samples"]:
            writer.writerow(row)


def plot(raw: dict, path: Path) -> None:
    """Three panels against minutes of soak: RSS and descriptors of every sidecar and the
    control plane, and the load (answered per second, unexpected answers per interval) with
    the sidecars' failed requests per interval. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    interval = raw["settings"]["interval"]
    series: dict[str, list[dict]] = {}
    for row in raw["samples"] + raw.get("idle_samples", []):
        if row["kind"] in ("sidecar", "control"):
            series.setdefault(row["name"], []).append(row)
    fig, (ax_rss, ax_fds, ax_load) = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    colours = plt.get_cmap("tab20").colors
    for i, (name, rows) in enumerate(sorted(series.items(), key=lambda kv: (kv[0] != "control", kv[0]))):
        t = [r["t"] / 60 for r in rows]
        style = dict(color="black", linewidth=2) if name == "control" else dict(color=colours[i % 20], linewidth=1)
        label = name.removesuffix("/proxy")
        ax_rss.plot(t, [(r["rss_kib"] or 0) / 1024 for r in rows], label=label, **style)
        ax_fds.plot(t, [r["fds"] or 0 for r in rows], label=label, **style)
    ax_rss.set_ylabel("RSS MiB")
    ax_rss.set_title(f"Soak: {raw['soak']['rate']:g} req/s (half of {raw['soak']['max_rate']:g}), "
                     "sidecars and control plane (black)", fontsize=10)
    ax_fds.set_ylabel("open descriptors")
    ax_rss.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    intervals = [i for i in raw["load_intervals"] if i["t"] > 0]  # the first sample is the start
    t = [i["t"] / 60 for i in intervals]
    ax_load.plot(t, [i["sent"] / interval for i in intervals], color="tab:blue", label="requests/s sent")
    ax_load.set_ylabel("requests/s")
    ax_err = ax_load.twinx()
    ax_err.bar(t, [i["failed"] for i in intervals], width=interval / 60 * 0.8, color="tab:red",
               label=f"unexpected answers at ingestion per {interval:g} s")
    sidecar_failed = _sidecar_failures_per_interval(raw)
    ax_err.plot([x / 60 for x, _ in sidecar_failed], [n for _, n in sidecar_failed], color="tab:orange",
                linewidth=1, label=f"sidecars' failed requests per {interval:g} s (incl. designed, retried)")
    ax_err.set_ylabel("count per interval")
    handles = ax_load.get_legend_handles_labels()
    more = ax_err.get_legend_handles_labels()
    ax_load.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper left",
                   bbox_to_anchor=(0.0, -0.18), ncol=3, frameon=False)
    ax_load.set_xlabel("minutes since the soak's load started")
    steady = raw["settings"]["steady_after"] / 60
    end = raw["soak"]["elapsed"] / 60
    for ax in (ax_rss, ax_fds, ax_load):
        ax.axvline(steady, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
        if raw.get("idle_samples"):
            ax.axvspan(end, max(r["t"] for r in raw["idle_samples"]) / 60, color="grey", alpha=0.12)
    if raw.get("idle_samples"):
        ax_fds.annotate("no traffic", (end, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                        textcoords="offset points", fontsize=7, color="grey")
    ax_rss.annotate("growth measured from here", (steady, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(3, 3), textcoords="offset points", fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    try:  # a palette of 64 colours keeps the file small enough to commit beside RESULTS.md
        from PIL import Image

        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=64)
        small.save(path, optimize=True)
    except ImportError:
        pass


def _sidecar_failures_per_interval(raw: dict) -> list[tuple[float, float]]:
    """Sum over sidecars of the increase of failed requests between consecutive samples."""
    by_time: dict[float, float] = {}
    last: dict[str, float] = {}
    for row in sorted(raw["samples"], key=lambda r: r["t"]):
        if row["kind"] != "sidecar" or row.get("failed_requests") is None:
            continue
        before = last.get(row["name"])
        last[row["name"]] = row["failed_requests"]
        if before is not None:
            by_time[row["t"]] = by_time.get(row["t"], 0.0) + max(0.0, row["failed_requests"] - before)
    return sorted(by_time.items())
