#!/usr/bin/env python3
"""Chaos under `meshproxy up`: SIGKILL a random app, sidecar or the control plane every few
seconds during `meshproxy demo load`, and let `up` restart it.

Goals: no idempotent request fails while another instance of its Service is up; every killed
process is back (a new pid) and serving within 5 s; after the run every sidecar holds the
control plane's current config version. The report has one row per kind of kill and one per
kill.

    python benchmarks/chaos.py                  # 5 min of kills, about 6 min in all
    python benchmarks/chaos.py --duration 60 --seed 3
    python benchmarks/chaos.py --kinds sidecar,control
    python benchmarks/chaos.py --report-only benchmarks/out/chaos.json   # the report again

Writes benchmarks/out/chaos.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.chaos_report import BACK_GOAL, KINDS, classify, markdown  # noqa: E402
from harness.cli import busy_before_start, progress, start_run, write_report  # noqa: E402
from harness.demo_load import expected, read_records, start_load  # noqa: E402
from harness.demo_mesh import (DEMO_MESH, DemoMesh, MeshError, Proc, app_exceptions,  # noqa: E402
                               child_pids, describe)
from harness.demo_probes import config_version, edge_url, http_json, mesh_workdir, serving  # noqa: E402
from harness.procs import cpu_busy_ticks  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
MACHINE_KEYS = ("nproc", "cpu", "kernel", "python", "meshproxy", "git")
POLL = 0.1  # seconds between looks at a victim that is coming back


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(KINDS)}")
    return kinds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of kills")
    p.add_argument("--interval-min", type=float, default=3.0, help="shortest time between two kills, s")
    p.add_argument("--interval-max", type=float, default=7.0, help="longest time between two kills, s")
    p.add_argument("--kinds", type=_kinds, default=list(KINDS), help="what may be killed: app,sidecar,control")
    p.add_argument("--min-uptime", type=float, default=30.0,
                   help="kill only processes that have run this long: `up` restarts those after 1 s, "
                        "and backs off (2, 4, 8 ... s) for one that dies again sooner, as for a crash loop")
    p.add_argument("--give-up", type=float, default=30.0, help="seconds to wait for a victim to come back")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="seconds of load before the first kill (by then every process has run "
                        "--min-uptime, so the first kills have the whole mesh to choose from)")
    p.add_argument("--cooldown", type=float, default=10.0, help="seconds of load after the last victim is back")
    p.add_argument("--version-timeout", type=float, default=15.0,
                   help="seconds the sidecars have, after the cool-down, to agree with the control plane")
    p.add_argument("--rate", type=float, default=40.0, help="demo load's requests per second")
    p.add_argument("--concurrency", type=int, default=32, help="demo load's requests in flight at most")
    p.add_argument("--seed", type=int, default=1, help="seeds the choice of victims, the intervals and the load")
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
    p.add_argument("--out", type=Path, default=OUT_DIR / "chaos.md", help="Markdown report; the JSON goes next to it")
    p.add_argument("--keep-workdir", action="store_true", help="keep `up`'s state, logs and the load's records")
    p.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                   help="only write the report again from a run's JSON (beside it)")
    args = p.parse_args(argv)
    if not 0 < args.interval_min <= args.interval_max:
        p.error("need 0 < --interval-min <= --interval-max")
    usable = os.sched_getaffinity(0)
    for flag, cpu in (("--proxy-cpu", args.proxy_cpu), ("--load-cpu", args.load_cpu)):
        if cpu is not None and cpu not in usable:
            p.error(f"{flag} {cpu} is not one of the usable cores {sorted(usable)}")
    return args


def find(mesh: DemoMesh, name: str, not_pid: int) -> Proc | None:
    """`up`'s child called `name` other than pid `not_pid`, if there is one."""
    for pid in child_pids(mesh.pid):
        if pid != not_pid:
            proc = describe(pid)
            if proc is not None and proc.name == name:
                return proc
    return None


def watching(control_url: str) -> int | None:
    """How many sidecars watch the control plane (its `/config`)."""
    body = http_json(f"{control_url}/config", 1.0)
    value = (body or {}).get("proxies")
    return value if isinstance(value, int) else None


def kill_and_watch(mesh: DemoMesh, victim: Proc, give_up: float, sidecars: int) -> dict:
    """SIGKILL `victim`; poll until `up` has started its replacement and that serves (for the
    control plane, also until every sidecar watches it again), at most `give_up` seconds.
    Returns the kill's record (monotonic times)."""
    kill = {"victim": victim.name, "kind": victim.kind, "service": victim.service,
            "instance": victim.instance, "pid": victim.pid}
    kill["at"] = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    deadline = kill["at"] + give_up
    new = None
    while time.monotonic() < deadline:
        if new is None:
            new = find(mesh, victim.name, victim.pid)
            if new is not None:
                kill["respawn_at"] = time.monotonic()
                kill["new_pid"] = new.pid
        if new is not None and "serving_at" not in kill and serving(new):
            kill["serving_at"] = time.monotonic()
            if victim.kind != "control":
                break
        if "serving_at" in kill and victim.kind == "control" and (watching(new.control_url) or 0) >= sidecars:
            kill["rewatched_at"] = time.monotonic()
            break
        time.sleep(POLL)
    return kill


def pick(rng: random.Random, procs: dict[str, Proc], kinds: list[str], min_uptime: float) -> Proc | None:
    """A kind first (each equally likely among those with a process old enough), then one of
    its processes: the control plane is one process against a dozen sidecars and apps, and
    is chosen as often as either kind."""
    eligible = {kind: sorted((p for p in procs.values() if p.kind == kind and p.age() >= min_uptime),
                             key=lambda p: p.name) for kind in kinds}
    available = [kind for kind in kinds if eligible[kind]]
    if not available:
        return None
    return rng.choice(eligible[rng.choice(available)])


def check_versions(mesh: DemoMesh, timeout: float) -> dict:
    """Poll until every sidecar's `/config` version is the control plane's; return what was
    seen last, and after how long they agreed."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        procs = mesh.procs()
        control = procs.get("control")
        want = config_version(control)[0] if control else None
        seen = {p.name: config_version(p) for p in procs.values() if p.kind == "sidecar"}
        differ = sorted(f"{name} {v or 'no answer'}{'' if connected else ' (not connected)'}"
                        for name, (v, connected) in seen.items() if v != want or not connected)
        if (want and not differ) or time.monotonic() >= deadline:
            return {"control": want, "sidecars": len(seen), "differ": differ,
                    "agreeing": len(seen) - len(differ),
                    "seconds": time.monotonic() - started if not differ and want else None}
        time.sleep(0.2)


def _up_delays(mesh: DemoMesh, kills: list[dict]) -> None:
    """Attach `up`'s announced restart delay (its `restarting in Ns` line) to each kill, in
    order per victim."""
    import re

    delays: dict[str, list[float]] = {}
    for line in mesh.restart_lines():
        m = re.match(r"meshproxy up: (\S+) exited .*; restarting in ([\d.]+)s", line)
        if m:
            delays.setdefault(m.group(1), []).append(float(m.group(2)))
    for kill in kills:
        queue = delays.get(kill["victim"])
        if queue:
            kill["up_delay"] = queue.pop(0)


def _tree_cpu(mesh: DemoMesh) -> float:
    total = 0
    for pid in [mesh.pid, *child_pids(mesh.pid)]:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run(args, mesh: DemoMesh, workdir: Path, raw: dict) -> None:
    """Start the load, kill for --duration, check versions, stop the load; fill `raw`."""
    url = edge_url(args.mesh_file)
    procs = mesh.procs()
    raw["processes"] = sorted(procs)
    instances: dict[str, set] = {}
    for p in procs.values():
        if p.kind != "control":
            instances.setdefault(p.service, set()).add(p.instance)
    sidecars = sum(1 for p in procs.values() if p.kind == "sidecar")
    rng = random.Random(args.seed)
    records = workdir / "chaos.rec"
    total = args.warmup + args.duration + args.give_up + args.cooldown + args.version_timeout + 60
    load = start_load(records, workdir / "load.log", url, args.rate, total, args.concurrency,
                      args.seed, args.load_cpu)
    kills: list[dict] = []
    cores0, tree0, t0 = cpu_busy_ticks(), 0.0, time.monotonic()
    loadavg = []
    try:
        # The load runs alone first, so that failures of a cold start are not blamed on a kill.
        time.sleep(args.warmup)
        if load.poll() is not None:
            raise MeshError("demo load stopped before the chaos: " + (workdir / "load.log").read_text()[-2000:])
        chaos_from = time.monotonic()
        tree0 = _tree_cpu(mesh)
        next_kill = chaos_from
        while time.monotonic() < chaos_from + args.duration:
            time.sleep(max(0.0, next_kill - time.monotonic()))
            victim = pick(rng, mesh.procs(), args.kinds, args.min_uptime)
            if victim is None:
                next_kill = time.monotonic() + 1.0
                continue
            kill = kill_and_watch(mesh, victim, args.give_up, sidecars)
            kills.append(kill)
            back = kill.get("serving_at")
            progress(f"{kill['at'] - chaos_from:6.1f} s  killed {victim.name:26} "
                     + (f"serving again after {back - kill['at']:.2f} s" if back else "NOT BACK"))
            with open("/proc/loadavg") as f:
                loadavg.append(float(f.read().split()[0]))
            # The next kill comes a random few seconds after this one, and not before the
            # victim is back: one process down at a time keeps each failure attributable.
            next_kill = kill["at"] + rng.uniform(args.interval_min, args.interval_max)
        chaos_to = time.monotonic()
        time.sleep(args.cooldown)  # load goes on, so that late failures show
        raw["versions"] = check_versions(mesh, args.version_timeout)
        progress(f"versions: {raw['versions']['agreeing']} of {raw['versions']['sidecars']} sidecars on "
                 f"the control plane's {raw['versions']['control']}")
        final = mesh.procs()
        raw["missing_at_end"] = sorted(set(procs) - set(final))
        raw["not_serving_at_end"] = sorted(name for name, p in final.items() if not serving(p))
        elapsed = time.monotonic() - chaos_from
        cores = cpu_busy_ticks()
        mesh_pct = 100 * (_tree_cpu(mesh) - tree0) / elapsed  # survivors only: a lower bound
        busy = sum(cores[c][0] - cores0[c][0] for c in cores) / (time.monotonic() - t0) / os.sysconf("SC_CLK_TCK")
        raw["cpu"] = {"mesh_pct": mesh_pct, "other_pct": max(0.0, 100 * busy - mesh_pct),
                      "loadavg": f"{min(loadavg, default=0):.1f}–{max(loadavg, default=0):.1f}"}
    finally:
        if load.poll() is None:
            load.send_signal(signal.SIGTERM)  # demo load stops and prints its summary
        try:
            load.wait(timeout=30)
        except Exception:
            load.kill()
    recs, _ = read_records(records)
    _up_delays(mesh, kills)
    counts = {service: len(names) for service, names in instances.items()}
    raw["classified"] = classify(recs, kills, counts, chaos_from, chaos_to, expected)
    raw.update({"kills": kills, "chaos_from": chaos_from, "chaos_seconds": chaos_to - chaos_from,
                "instances": counts, "load_summary": (workdir / "load.log").read_text(
                    errors="replace").splitlines()[-8:]})
    late = [k["victim"] for k in kills if k.get("serving_at") is None or k["serving_at"] - k["at"] > BACK_GOAL]
    if late:
        raw["notes"].append(f"back later than {BACK_GOAL:g} s or not at all: {', '.join(late)}")
    if raw["missing_at_end"] or raw["not_serving_at_end"]:
        raw["notes"].append(f"at the end, missing: {raw['missing_at_end'] or 'none'}; not serving: "
                            f"{raw['not_serving_at_end'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        raw = json.loads(args.report_only.read_text())
        write_report(args.report_only.with_suffix(".md"), markdown(raw), raw)
        return 0
    if not start_run(args, ["taskset"] if args.proxy_cpu is not None or args.load_cpu is not None else []):
        return 2
    workdir = mesh_workdir(args, "meshproxy-chaos-", progress)
    if workdir is None:
        return 2
    busy = busy_before_start()
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    from harness.report import machine_facts

    facts = machine_facts(meshproxy_cmd)
    raw: dict = {"meta": {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "command": shlex.join(["python", "benchmarks/chaos.py", *(argv or sys.argv[1:])]),
                          "machine": {k: facts[k] for k in MACHINE_KEYS if k in facts},
                          "busy_before": ", ".join(f"CPU {c} {p:.0f} %" for c, p in sorted(busy.items()))},
                 "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "notes": []}
    mesh = DemoMesh(meshproxy_cmd, workdir, args.mesh_file, args.proxy_cpu)
    ok = False
    try:
        progress(f"starting the mesh (`up`, state in {workdir})")
        mesh.start(args.start_timeout)
        run(args, mesh, workdir, raw)
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
    raw["notes"].append(f"machine: {raw['meta']['machine'].get('nproc')} cores shared with other programs "
                        "(see the CPU line); `up`, every child it restarts and the load compete for them")
    write_report(args.out, markdown(raw), raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
