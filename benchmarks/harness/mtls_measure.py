"""One measurement of one path: the open-loop generator at a fixed rate, with the CPU time of
each proxy and of everything else on the machine read from /proc over the measured window.

The generator (harness/openloop.py, its own process) prints the due time of its first request
on the system-wide monotonic clock; the measured window is known from then on, so this process
sleeps to its start and its end and reads /proc at both instants, while the generator runs.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.mtls_stack import APP_PATH, BODY_BYTES, HOST_HEADER, MeasuredPath
from harness.procs import CLOCK_TICKS, Child, die_with_parent, pinned

OPENLOOP = Path(__file__).resolve().parent / "openloop.py"
TOP_OTHERS = 3


class MeasureFailed(Exception):
    """The generator did not produce figures (the message says why)."""


@dataclass
class Settings:
    rate: float
    connections: int
    warmup: float
    seconds: float
    timeout: float
    load_cpu: int | None
    proxy_cpu: int | None


@dataclass
class Snapshot:
    """What /proc says at one instant: per-process CPU ticks, per-core ticks, load average."""

    at: float
    processes: dict[int, tuple[int, str, int, int]]  # pid -> (session, name, ticks, start time)
    cores: dict[int, tuple[int, int, int]]  # cpu -> (busy, total, steal) ticks
    loadavg: str


def _core_ticks() -> dict[int, tuple[int, int, int]]:
    """Per core from /proc/stat: ticks spent running something (user, nice, system, irq,
    softirq), all ticks (steal included), and steal (the hypervisor ran something else)."""
    result = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            result[int(name[3:])] = (user + nice + system + irq + softirq,
                                     user + nice + system + idle + iowait + irq + softirq + steal,
                                     steal)
    return result


def _process_stats() -> dict[int, tuple[int, str, int, int]]:
    result = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        open_paren, close_paren = data.index(b"("), data.rindex(b")")
        comm = data[open_paren + 1:close_paren].decode(errors="replace")
        fields = data[close_paren + 2:].split()
        # After the name, 0-based: state=0 ppid=1 pgrp=2 session=3 ... utime=11 stime=12 ...
        # starttime=19 (tells a reused pid from the process that had it before).
        result[int(entry.name)] = (int(fields[3]), comm, int(fields[11]) + int(fields[12]),
                                   int(fields[19]))
    return result


def snapshot() -> Snapshot:
    try:
        with open("/proc/loadavg") as f:
            loadavg = " ".join(f.read().split()[:3])
    except OSError:
        loadavg = "?"
    return Snapshot(time.monotonic(), _process_stats(), _core_ticks(), loadavg)


def _ticks_delta(before: Snapshot, after: Snapshot, pid: int) -> int:
    now = after.processes.get(pid)
    if now is None:
        return 0
    then = before.processes.get(pid)
    return now[2] - (then[2] if then is not None and then[3] == now[3] else 0)


def _session_seconds(before: Snapshot, after: Snapshot, sid: int) -> float:
    ticks = sum(_ticks_delta(before, after, pid)
                for pid, (s, *_) in after.processes.items() if s == sid)
    return ticks / CLOCK_TICKS


def _sleep_until(moment: float) -> None:
    while True:
        left = moment - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


def _read_t0(proc: subprocess.Popen, timeout: float) -> float:
    """The `t0 SECONDS` line the generator prints once its connections are open."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise MeasureFailed(f"the load generator did not start within {timeout:.0f}s")
            line = proc.stdout.readline()
            if not line:
                raise MeasureFailed("the load generator exited before starting")
            if line.startswith("t0 "):
                return float(line.split()[1])


def measure(path: MeasuredPath, settings: Settings, workdir: Path,
            known: dict[str, Child | None]) -> dict:
    """Load the path for warm-up + measured seconds; return the generator's figures with the
    CPU of each proxy of the path and of the rest of the machine over the measured window.

    `known` names the other processes this run started (app, control plane), so that they are
    not counted as other programs. Raises MeasureFailed."""
    argv = [sys.executable, str(OPENLOOP), "--port", str(path.port),
            "--host-header", HOST_HEADER, "--path", APP_PATH, "--rate", str(settings.rate),
            "--connections", str(settings.connections), "--warmup", str(settings.warmup),
            "--seconds", str(settings.seconds), "--timeout", str(settings.timeout),
            "--expect-bytes", str(BODY_BYTES)]
    return measure_generator(path, argv, settings, workdir / f"openloop-{path.name}.log", known)


def measure_generator(path: MeasuredPath, argv: list[str], settings: Settings, log: Path,
                      known: dict[str, Child | None]) -> dict:
    """Run the open-loop generator `argv` (pinned to the load core; it prints `t0 SECONDS`,
    then one line of JSON with at least `held`, `errors`, `scheduled` and the percentiles) and
    return its figures with the CPU of each proxy of the path and of the rest of the machine
    over its measured window (`settings.warmup` after t0, `settings.seconds` long). Its
    standard error goes to `log`. Raises MeasureFailed."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(pinned(argv, settings.load_cpu), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=die_with_parent)
    try:
        t0 = _read_t0(proc, 30.0)
        start = t0 + settings.warmup
        end = start + settings.seconds
        _sleep_until(start)
        before = snapshot()
        _sleep_until(end)
        after = snapshot()
        out, _ = proc.communicate(timeout=settings.timeout + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise MeasureFailed(f"the load generator exited with status {proc.returncode}:\n{tail}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise MeasureFailed("the load generator printed no figures")
    result = json.loads(lines[-1])
    wall = after.at - before.at
    rate_k = settings.rate / 1000
    result["window_wall_s"] = wall
    result["proxies"] = {}
    for role, child in path.proxies.items():
        cpu = _session_seconds(before, after, child.sid)
        result["proxies"][role] = {"cpu_s": cpu, "vcpu": cpu / wall,
                                   "vcpu_per_1000_rps": cpu / wall / rate_k}
    ours = {child.sid for child in path.proxies.values()}
    ours.update(child.sid for child in known.values() if child is not None)
    mine = {os.getpid(), proc.pid}
    app = known.get("app")
    if app is not None:
        result["app_vcpu"] = _session_seconds(before, after, app.sid) / wall
    result["generator_vcpu"] = _ticks_delta(before, after, proc.pid) / CLOCK_TICKS / wall
    ours_s = 0.0
    others: list[tuple[float, str, int]] = []
    for pid, (sid, comm, *_) in after.processes.items():
        used = _ticks_delta(before, after, pid) / CLOCK_TICKS
        if sid in ours or pid in mine:
            ours_s += used
        elif used > 0:
            others.append((used, comm, pid))
    others.sort(reverse=True)
    # Everything the cores ran that this run's processes did not: other programs, including
    # those that started and ended within the window (no longer in /proc), and kernel work
    # outside any process's time. The cores' counters are sampled at each clock tick while
    # processes' times are exact, so the difference is approximate; it is never taken below
    # what the other processes still alive used.
    busy_s = sum(after.cores[c][0] - before.cores[c][0] for c in after.cores) / CLOCK_TICKS
    steal_s = sum(after.cores[c][2] - before.cores[c][2] for c in after.cores) / CLOCK_TICKS
    alive_s = sum(u for u, _, _ in others)
    result["others_pct"] = 100 * max(busy_s - ours_s, alive_s) / wall
    result["steal_pct"] = 100 * steal_s / wall
    result["others_top"] = [{"comm": c, "pid": p, "pct": 100 * u / wall}
                            for u, c, p in others[:TOP_OTHERS]]
    result["cores_busy_pct"] = {}
    for cpu in sorted(after.cores):
        total = after.cores[cpu][1] - before.cores[cpu][1]
        busy = after.cores[cpu][0] - before.cores[cpu][0]
        result["cores_busy_pct"][str(cpu)] = 100 * busy / total if total else None
    result["loadavg"] = [before.loadavg, after.loadavg]
    return result
