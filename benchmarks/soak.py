#!/usr/bin/env python3
"""Soak: the demo mesh under `meshproxy demo load` at half its maximum for 30 minutes.

It starts the demo with `meshproxy up`, finds the highest rate the mesh sustains (a ramp of
short `demo load` runs), then runs `demo load` at half of it for `--duration` while it samples,
every `--interval` seconds, the RSS, open descriptors and error counters (admin `/metrics`)
of every sidecar, the control plane, the apps and `up`. Goals: no request that should have
succeeded fails, RSS grows < 5 % between minute 5 and the end, descriptors do not grow.

    python benchmarks/soak.py --quick       # 10 min of soak after a ramp of about 3 min
    python benchmarks/soak.py               # 30 min
    python benchmarks/soak.py --rate 60     # no ramp: soak at 60 req/s
    python benchmarks/soak.py --plot-only benchmarks/out/soak.json   # draw the PNG again

Writes benchmarks/out/soak.md, .json, .csv (every sample) and .png (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import busy_before_start, progress, start_run, write_report  # noqa: E402
from harness.demo_load import expected, read_records, start_load  # noqa: E402
from harness.demo_mesh import DEMO_MESH, DemoMesh, MeshError, app_exceptions  # noqa: E402
from harness.demo_probes import (edge_url, error_counts, fd_count, fd_kinds,  # noqa: E402
                                 ingestion_address, ingestion_queue, metrics_url, mesh_workdir,
                                 rss_kib, tcp_states)
from harness.procs import cpu_busy_ticks  # noqa: E402
from harness.soak_report import markdown, plot, write_csv  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
MACHINE_KEYS = ("nproc", "cpu", "kernel", "python", "meshproxy", "git")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 min of soak, 8 s ramp steps")
    p.add_argument("--duration", type=float, default=None, help="seconds of soak (default 1800, --quick 600)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--steady-after", type=float, default=300.0,
                   help="seconds of soak after which memory and descriptors must stop growing")
    p.add_argument("--idle", type=float, default=90.0,
                   help="seconds of sampling after the load, without traffic: longer than the idle "
                        "keep-alive of every connection (75 s for a client of a sidecar, 60 s between "
                        "sidecars), so that only leaked descriptors remain")
    p.add_argument("--rate", type=float, default=None, help="soak at this rate; no ramp")
    p.add_argument("--max-rate", type=float, default=None, help="take this as the maximum; no ramp")
    p.add_argument("--ramp-start", type=float, default=30.0, help="first rate of the ramp, req/s")
    p.add_argument("--ramp-factor", type=float, default=1.25, help="each ramp step's rate over the one before")
    p.add_argument("--ramp-step", type=float, default=None, help="seconds per ramp step (default 12, --quick 8)")
    p.add_argument("--ramp-limit", type=float, default=1000.0, help="stop the ramp above this rate")
    p.add_argument("--queue-limit", type=int, default=20,
                   help="a ramp step fails when ingestion's queue to the scheduler holds more than this")
    p.add_argument("--concurrency", type=int, default=32, help="demo load's requests in flight at most")
    p.add_argument("--seed", type=int, default=1, help="demo load's seed")
    p.add_argument("--mesh-file", type=Path, default=DEMO_MESH, help="the Mesh file `up` runs")
    p.add_argument("--port-offset", type=int, default=0,
                   help="run a copy of the Mesh file with every fixed port moved up by this much "
                        "(beside another copy of the demo, e.g. a test suite's)")
    p.add_argument("--meshproxy-cmd", default=f"{shlex.quote(sys.executable)} -m meshproxy",
                   help="how to run meshproxy (`up`)")
    p.add_argument("--proxy-cpu", type=int, default=None,
                   help="pin the whole mesh (`up` and everything it starts) to this core")
    p.add_argument("--load-cpu", type=int, default=None,
                   help="pin the load generator and this script to this core")
    p.add_argument("--start-timeout", type=float, default=90.0, help="seconds `up` has to be ready")
    p.add_argument("--out", type=Path, default=OUT_DIR / "soak.md",
                   help="Markdown report; .json, .csv and .png go next to it")
    p.add_argument("--png", type=Path, default=None, help="the plot (default: next to --out)")
    p.add_argument("--keep-workdir", action="store_true", help="keep `up`'s state, logs and the load's records")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON",
                   help="only draw the plot (and the report) again from a run's JSON")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 600.0 if args.quick else 1800.0
    if args.ramp_step is None:
        args.ramp_step = 8.0 if args.quick else 12.0
    if args.png is None:
        args.png = args.out.with_suffix(".png")
    usable = os.sched_getaffinity(0)
    for flag, cpu in (("--proxy-cpu", args.proxy_cpu), ("--load-cpu", args.load_cpu)):
        if cpu is not None and cpu not in usable:
            p.error(f"{flag} {cpu} is not one of the usable cores {sorted(usable)}")
    if args.steady_after + 60 > args.duration:
        p.error("--duration must leave a minute after --steady-after")
    return args


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    values = sorted(latencies)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": values[-1]}


def wait_drained(address: str | None, timeout: float) -> bool:
    """Poll ingestion's queue until it is empty (the last step's creates are scheduled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ingestion_queue(address) == 0:
            return True
        time.sleep(0.5)
    return False


def run_step(args, workdir: Path, url: str, ingestion: str | None, rate: float, index: int) -> dict:
    """One ramp step: `demo load` at `rate` for --ramp-step seconds, ingestion's queue polled
    every second. Returns its figures and whether it passed."""
    records = workdir / f"ramp-{index}.rec"
    load = start_load(records, workdir / f"ramp-{index}.log", url, rate, args.ramp_step,
                      args.concurrency, args.seed + index, args.load_cpu)
    started = time.monotonic()
    queue: list[tuple[float, int | None]] = []
    try:
        while load.poll() is None and time.monotonic() < started + args.ramp_step + 30:
            queue.append((time.monotonic() - started, ingestion_queue(ingestion)))
            time.sleep(1.0)  # the queue's sampling period, not a wait for a server
    finally:
        if load.poll() is None:
            load.terminate()
        load.wait(timeout=15)
    recs, _ = read_records(records)
    failed = sum(not expected(op, answer) for _, op, answer, _ in recs)
    late = [q for t, q in queue if t >= args.ramp_step / 2 and q is not None]
    step = {"rate": rate, "sent": len(recs), "achieved": len(recs) / args.ramp_step, "failed": failed,
            **{k: v for k, v in _percentiles([r[3] for r in recs]).items() if k != "max"},
            "queue": max(late, default=None)}
    step.setdefault("p50", None)
    step.setdefault("p99", None)
    step["passed"] = (step["achieved"] >= 0.95 * rate and failed <= 0.01 * max(len(recs), 1)
                      and (step["queue"] or 0) <= args.queue_limit)
    return step


def ramp(args, workdir: Path, url: str) -> tuple[float, list[dict]]:
    """Raise the rate by --ramp-factor until a step fails; return the last rate that passed
    (the first one when none did) and every step."""
    ingestion = ingestion_address(args.mesh_file)
    steps: list[dict] = []
    best = None
    rate = args.ramp_start
    while rate <= args.ramp_limit:
        wait_drained(ingestion, 60.0)
        step = run_step(args, workdir, url, ingestion, rate, len(steps))
        steps.append(step)
        progress(f"ramp {rate:g} req/s: sent {step['achieved']:.1f}/s, {step['failed']} unexpected, "
                 f"p99 {step['p99'] or 0:.0f} ms, queue {step['queue']} -> "
                 f"{'passed' if step['passed'] else 'failed'}")
        if not step["passed"]:
            break
        best = rate
        rate = round(rate * args.ramp_factor, 1)
    wait_drained(ingestion, 120.0)
    return (best if best is not None else args.ramp_start), steps


def sample(mesh: DemoMesh, t: float, kinds: dict | None = None) -> list[dict]:
    """One sample of every child of `up` and of `up` itself; with `kinds`, also fill it with
    each process's descriptors by kind."""
    rows = []
    states = tcp_states()
    procs = [(name, proc.kind, proc.pid, proc) for name, proc in sorted(mesh.procs().items())]
    for name, kind, pid, proc in [*procs, ("up", "up", mesh.pid, None)]:
        by_kind = fd_kinds(pid, states) or {}
        row = {"t": t, "name": name, "kind": kind, "pid": pid, "rss_kib": rss_kib(pid),
               "fds": sum(by_kind.values()) if by_kind else fd_count(pid),
               "close_wait": by_kind.get("tcp close_wait", 0)}
        url = metrics_url(proc) if proc is not None else None
        if url:
            row.update(error_counts(url) or {})
        if kinds is not None:
            kinds[name] = by_kind
        rows.append(row)
    return rows


def idle(args, mesh: DemoMesh, start_t: float) -> tuple[list[dict], dict]:
    """Sample for --idle seconds without traffic; return the samples and, from the last one,
    each process's descriptors by kind."""
    started = time.monotonic()
    samples: list[dict] = []
    kinds: dict = {}
    k = 1
    while True:
        time.sleep(max(0.0, started + k * args.interval - time.monotonic()))  # the sampling grid
        last = time.monotonic() - started >= args.idle
        samples += sample(mesh, round(start_t + k * args.interval, 3), kinds if last else None)
        if last:
            return samples, kinds
        k += 1


def _tree_cpu_seconds(mesh: DemoMesh) -> float:
    """CPU seconds used so far by `up` and its live children."""
    total = 0
    for pid in [mesh.pid, *[p.pid for p in mesh.procs().values()]]:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def soak(args, mesh: DemoMesh, workdir: Path, url: str, rate: float) -> dict:
    """Run the load at `rate` for --duration, sampling every --interval; return the samples,
    the load's per-interval counts and the run's totals."""
    records = workdir / "soak.rec"
    cores0, mesh_cpu0, load_cpu0 = cpu_busy_ticks(), _tree_cpu_seconds(mesh), _children_cpu()
    load = start_load(records, workdir / "soak-load.log", url, rate, args.duration, args.concurrency,
                      args.seed, args.load_cpu)
    started = time.monotonic()
    samples: list[dict] = []
    intervals: list[dict] = []
    latencies: list[float] = []
    loadavg: list[float] = []
    offset = 0
    k = 0
    try:
        while True:
            target = started + k * args.interval
            # Samples are taken on a fixed grid, so that intervals are comparable.
            time.sleep(max(0.0, target - time.monotonic()))
            t = time.monotonic() - started
            samples += sample(mesh, round(k * args.interval, 3))
            recs, offset = read_records(records, offset)
            failed_by = Counter(f"{op} {answer}" for _, op, answer, _ in recs if not expected(op, answer))
            latencies += [r[3] for r in recs]
            intervals.append({"t": round(k * args.interval, 3), "sent": len(recs),
                              "failed": sum(failed_by.values()), "failed_by": dict(failed_by)})
            with open("/proc/loadavg") as f:
                loadavg.append(float(f.read().split()[0]))
            if k % max(1, round(60 / args.interval)) == 0:
                progress(f"soak {t / 60:5.1f} min: {sum(i['sent'] for i in intervals):,} requests, "
                         f"{sum(i['failed'] for i in intervals)} unexpected answers")
            if t >= args.duration or load.poll() is not None:
                break
            k += 1
    finally:
        if load.poll() is None:
            load.terminate()
        load.wait(timeout=30)
    elapsed = time.monotonic() - started
    recs, offset = read_records(records, offset)  # answers that came after the last sample
    if recs and intervals:
        late = Counter(f"{op} {answer}" for _, op, answer, _ in recs if not expected(op, answer))
        intervals[-1]["sent"] += len(recs)
        intervals[-1]["failed"] += sum(late.values())
        for key, n in late.items():
            intervals[-1]["failed_by"][key] = intervals[-1]["failed_by"].get(key, 0) + n
        latencies += [r[3] for r in recs]
    cores = cpu_busy_ticks()
    busy = sum(cores[c][0] - cores0[c][0] for c in cores)
    total = sum(cores[c][1] - cores0[c][1] for c in cores)
    wall_ticks = elapsed * os.sysconf("SC_CLK_TCK")
    mesh_pct = 100 * (_tree_cpu_seconds(mesh) - mesh_cpu0) / elapsed
    load_pct = 100 * (_children_cpu() - load_cpu0) / elapsed
    busy_cores_pct = 100 * busy / wall_ticks if wall_ticks else 0.0
    return {"samples": samples, "load_intervals": intervals,
            "soak": {"rate": rate, "elapsed": elapsed, "load_exit": load.returncode,
                     "latency_ms": _percentiles(latencies),
                     "cpu": {"mesh_pct": mesh_pct, "load_pct": load_pct, "cores": len(cores),
                             "busy_pct": 100 * busy / total if total else 0.0,
                             "other_pct": max(0.0, busy_cores_pct - mesh_pct - load_pct),
                             "loadavg_min": min(loadavg, default=0.0),
                             "loadavg_max": max(loadavg, default=0.0)}},
            "load_log": (workdir / "soak-load.log").read_text(errors="replace").splitlines()[-8:]}


def _machine(meshproxy_cmd: list[str]) -> dict:
    from harness.report import machine_facts

    facts = machine_facts(meshproxy_cmd)
    return {k: facts[k] for k in MACHINE_KEYS if k in facts}


def finish(raw: dict, args) -> None:
    """Plot (when matplotlib is there), then write the report, JSON and CSV."""
    try:
        plot(raw, args.png)
        raw["png"] = str(args.png)
    except ImportError:
        raw["png"] = None
        progress(f"no matplotlib here: no plot. Install it (pip install matplotlib) where you like "
                 f"and run: python benchmarks/soak.py --plot-only {args.out.with_suffix('.json')}")
    write_report(args.out, markdown(raw), raw)
    write_csv(raw, args.out.with_suffix(".csv"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        raw = json.loads(args.plot_only.read_text())
        if args.out == OUT_DIR / "soak.md":  # the report goes beside the JSON it came from
            args.out = args.plot_only.with_suffix(".md")
            args.png = args.out.with_suffix(".png") if args.png == OUT_DIR / "soak.png" else args.png
        finish(raw, args)
        return 0
    if not start_run(args, ["taskset"] if args.proxy_cpu is not None or args.load_cpu is not None else []):
        return 2
    workdir = mesh_workdir(args, "meshproxy-soak-", progress)
    if workdir is None:
        return 2
    busy = busy_before_start()
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    mesh = DemoMesh(meshproxy_cmd, workdir, args.mesh_file, args.proxy_cpu)
    raw: dict = {"meta": {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "command": shlex.join(["python", "benchmarks/soak.py", *(argv or sys.argv[1:])]),
                          "machine": _machine(meshproxy_cmd),
                          "busy_before": ", ".join(f"CPU {c} {p:.0f} %" for c, p in sorted(busy.items()))},
                 "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "notes": []}
    ok = False
    try:
        progress(f"starting the mesh (`up`, state in {workdir})")
        mesh.start(args.start_timeout)
        url = edge_url(args.mesh_file)
        # Before any traffic: what each process holds when it has served nothing.
        raw["fd_kinds"] = {"fresh": {}}
        raw["fresh_samples"] = sample(mesh, 0.0, raw["fd_kinds"]["fresh"])
        if args.rate is not None:
            rate, max_rate, raw["ramp"] = args.rate, 2 * args.rate, []
            raw["notes"].append(f"no ramp: --rate {args.rate:g} given")
        else:
            if args.max_rate is not None:
                max_rate, raw["ramp"] = args.max_rate, []
            else:
                max_rate, raw["ramp"] = ramp(args, workdir, url)
            rate = round(max_rate / 2, 1)
        progress(f"soak at {rate:g} req/s for {args.duration / 60:g} min")
        raw.update(soak(args, mesh, workdir, url, rate))
        raw["soak"]["max_rate"] = max_rate
        progress(f"{args.idle:g} s without traffic")
        raw["idle_samples"], raw["fd_kinds"]["after_idle"] = idle(args, mesh, raw["soak"]["elapsed"])
        raw["up_lines"] = mesh.restart_lines()
        if raw["up_lines"]:
            raw["notes"].append("`up` restarted children during the run: " + "; ".join(raw["up_lines"][:10]))
        ok = True
    except MeshError as exc:
        progress(str(exc))
        return 2
    finally:
        progress("stopping the mesh")
        mesh.stop()
        raw["app_exceptions"] = app_exceptions(mesh.state_dir)
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"kept {workdir}")
    raw["notes"].append(f"machine: {raw['meta']['machine'].get('nproc')} cores, shared with other "
                        "programs during the run (see the CPU line)")
    finish(raw, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
