#!/usr/bin/env python3
"""The control plane at scale: N Services, M proxies watching it, policy edits timed to the last proxy.

    python benchmarks/control_plane.py                                   # 1000 × 1000, 20 edits
    python benchmarks/control_plane.py --services 100 --proxies 100 --edits 10
    python benchmarks/control_plane.py --check                           # exit 1 when a goal is missed

What it does:

1. Writes a mesh to a temporary folder: a Mesh with N Services of 2–3 instances each (distinct
   127.0.0.1 ports; every tenth Service `sidecar: false`, the others meshed), one HTTPRoute per
   10 Services, a TrafficPolicy per 5 (one file each), an AuthorizationPolicy per 4, a
   mesh-wide PeerAuthentication; `meshproxy check` must accept it.
2. Starts the real control plane, `meshproxy control --config DIR/mesh.yaml --listen
   127.0.0.1:PORT`, as its own process (pinned to one core, this process to the other), and
   waits for `/ready`.
3. Opens M simulated proxies in this process (uvloop): each one raw connection doing `GET
   /v1/watch?service=svc-K&namespace=default&instance=...` as the sidecar's control client does,
   spread over the N Services so that their inbound views differ.
4. Edits one TrafficPolicy file E times (its retry attempts), writing a new file and renaming it
   over the old one as editors do, at least `--spacing` seconds apart, and times each edit from
   just before the rename until the median and the last proxy hold the new version.
5. Reads the control plane's CPU time (utime + stime) and memory (VmRSS, VmHWM) from /proc.

A simulated proxy *holds* a version once the whole NDJSON line of that snapshot has arrived. It
does not decode the line: decoding a thousand copies of a large view would make this process,
not the control plane, the bottleneck. It takes the version from the head of the line with a
bytes search (the line starts `{"type":"snapshot","seq":N,"version":"…","generation":[…],`)
and counts bytes up to the newline. So the figures are the control plane's delivery time; a real
proxy then spends its own time decoding and loading the snapshot, on its own core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.procs import CLOCK_TICKS, Supervisor, busy_percent, cpu_busy_ticks, log_tail  # noqa: E402
from harness.report import machine_facts  # noqa: E402
from harness.targets import free_ports  # noqa: E402

HOST = "127.0.0.1"
GOAL_P99_S = 1.0
GOAL_RSS_MIB = 200.0
HEAD_MAX = 256  # bytes of a line kept to find its version in
FIRST_APP_PORT = 20000
MACHINE_KEYS = ("nproc", "cpu", "kernel", "python", "meshproxy", "git")


class BenchmarkFailed(Exception):
    """The run could not produce its figures (the message says why)."""


# -- the mesh ------------------------------------------------------------------------------------

def _name(i: int) -> str:
    return f"svc-{i:04d}"


def _instances(i: int) -> int:
    return 2 + i % 2


def _traffic_policy(service: str, attempts: int) -> str:
    return f"""apiVersion: meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: {service}
  namespace: default
spec:
  targetRef: {{kind: Service, name: {service}}}
  loadBalancer:
    type: PeakEWMA
  timeouts:
    request: 5s
    perTry: 1s
  retry:
    attempts: {attempts}
    on: [connect-failure, reset, "502", "503", "504"]
    backoff: {{base: 25ms, max: 250ms}}
    budget: {{percent: 20, minPerSecond: 10}}
  circuitBreaker:
    consecutiveFailures: 3
    baseEjectionTime: 5s
    maxEjectionTime: 30s
"""


@dataclass
class GeneratedMesh:
    """What was written: the Mesh file, the TrafficPolicy files (edited later) and counts."""

    mesh_file: Path
    policy_files: list[Path]
    counts: dict[str, int]


def write_mesh(folder: Path, services: int) -> GeneratedMesh:
    """Write the Mesh of `services` Services and its policies under `folder`."""
    policies = folder / "policies"
    (policies / "traffic").mkdir(parents=True)
    lines = ["apiVersion: meshproxy.io/v1alpha1", "kind: Mesh", "metadata:", "  name: scale", "spec:",
             "  trustDomain: cluster.local", "  mtls:", "    mode: STRICT", "  services:"]
    port = FIRST_APP_PORT
    instances = 0
    for i in range(services):
        name = _name(i)
        lines += [f"    - name: {name}", "      namespace: default", "      port: 80",
                  "      instances:"]
        for k in range(_instances(i)):
            lines += [f"        - name: {name}-{k}", "          labels: {version: v1}",
                      "          app:", f"            address: {HOST}:{port}"]
            if i % 10 == 9:
                lines.append("          sidecar: false")
            port += 1
            instances += 1
    lines += ["  policies:", "    - policies"]
    mesh_file = folder / "mesh.yaml"
    mesh_file.write_text("\n".join(lines) + "\n")

    routes = []
    for k in range(services // 10):
        parent, stable, canary = _name(10 * k), _name(10 * k + 1), _name(10 * k + 2)
        routes.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: route-{k:04d}
  namespace: default
spec:
  parentRefs:
    - {{group: "", kind: Service, name: {parent}, port: 80}}
  rules:
    - name: canary
      matches:
        - path: {{type: PathPrefix, value: /api}}
          headers:
            - {{name: x-canary, value: "true"}}
      backendRefs:
        - {{name: {canary}, port: 80}}
    - name: split
      matches:
        - path: {{type: PathPrefix, value: /api}}
      backendRefs:
        - {{name: {stable}, port: 80, weight: 90}}
        - {{name: {canary}, port: 80, weight: 10}}
      timeouts:
        request: 3s
""")
    (policies / "routes.yaml").write_text("---\n".join(routes) if routes else "# none\n")

    policy_files = []
    for i in range(0, services, 5):
        path = policies / "traffic" / f"{_name(i)}.yaml"
        path.write_text(_traffic_policy(_name(i), 3))
        policy_files.append(path)

    security = ["""apiVersion: meshproxy.io/v1alpha1
kind: PeerAuthentication
metadata:
  name: mesh
  namespace: meshproxy-system
spec:
  mtls: {mode: STRICT}
"""]
    authz = 0
    for i in range(0, services, 4):
        caller = _name((i - 1) % services)
        security.append(f"""apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: {_name(i)}-callers
  namespace: default
spec:
  targetRef: {{kind: Service, name: {_name(i)}}}
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/default/sa/{caller}"]
      to:
        - operation:
            methods: [GET, POST]
            paths: ["/api/*"]
""")
        authz += 1
    (policies / "security.yaml").write_text("---\n".join(security))
    counts = {"services": services, "instances": instances, "httproutes": len(routes),
              "trafficpolicies": len(policy_files), "authorizationpolicies": authz}
    return GeneratedMesh(mesh_file, policy_files, counts)


def edit_policy(path: Path, attempts: int) -> float:
    """Rewrite the TrafficPolicy at `path` with `attempts` as an editor saves (a new file renamed
    over the old one); return time.perf_counter() just before the rename."""
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(_traffic_policy(path.stem, attempts))
    started = time.perf_counter()
    os.replace(temporary, path)
    return started


# -- the control plane's process -----------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads) in seconds; raises OSError when gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident size) of process `pid` in MiB; raises OSError when gone."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024  # kB
    return out


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (all sockets
    of the machine: TcpExt ListenOverflows), or None when /proc does not say."""
    try:
        with open("/proc/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(dict(zip(rows[0], rows[1]))["ListenOverflows"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_ready(port: int, child_alive, timeout: float) -> None:
    """Return once the control plane answers GET /ready with 200; raises BenchmarkFailed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child_alive():
            raise BenchmarkFailed("the control plane exited before it was ready")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise BenchmarkFailed(f"the control plane was not ready within {timeout:g} s")


# -- the simulated proxies -----------------------------------------------------------------------

@dataclass
class Wave:
    """One new configuration on its way to every proxy: from `old` (the version held before) to
    whatever the proxies receive next; arrival times are seconds after `started`."""

    old: str | None
    started: float
    expected: int
    arrivals: list[float] = field(default_factory=list)
    bytes: int = 0
    versions: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Fleet:
    """The simulated proxies' shared bookkeeping: which version each holds, the wave in flight."""

    def __init__(self) -> None:
        self.wave: Wave | None = None
        self.heartbeats = 0
        self.snapshots = 0
        self.line_sizes: list[int] = []
        self.lost: list[str] = []
        self.lost_event = asyncio.Event()

    def begin(self, old: str | None, started: float, expected: int) -> Wave:
        """Start timing a new wave from `started` (time.perf_counter())."""
        self.wave = Wave(old, started, expected)
        return self.wave

    def took(self, watcher: Watcher, version: str, size: int, now: float) -> None:
        self.snapshots += 1
        wave = self.wave
        if wave is not None and version != wave.old and watcher.wave is not wave:
            watcher.wave = wave
            wave.arrivals.append(now - wave.started)
            wave.bytes += size
            wave.versions.add(version)
            if len(wave.arrivals) >= wave.expected:
                wave.done.set()

    def gone(self, watcher: Watcher, why: str) -> None:
        self.lost.append(f"{watcher.service}: {why}")
        self.lost_event.set()


class Watcher(asyncio.Protocol):
    """One simulated proxy: a watch request, then the NDJSON stream read line by line without
    decoding it (see the module docstring)."""

    def __init__(self, fleet: Fleet, request: bytes, service: str) -> None:
        self.fleet = fleet
        self.request = request
        self.service = service
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status: int | None = None
        self.head = bytearray()  # the first HEAD_MAX bytes of the line being received
        self.line_bytes = 0
        self.version: str | None = None
        self.wave: Wave | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.fleet.gone(self, f"connection lost ({exc or 'closed by the control plane'})")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status != 200:
            self._fail(f"watch answered {self.status}")

    def on_body(self, body: bytes) -> None:
        start, length = 0, len(body)
        while True:
            newline = body.find(b"\n", start)
            end = length if newline < 0 else newline
            room = HEAD_MAX - len(self.head)
            if room > 0:
                self.head += body[start:min(end, start + room)]
            self.line_bytes += end - start
            if newline < 0:
                return
            self._line(self.line_bytes + 1)
            self.head.clear()
            self.line_bytes = 0
            start = newline + 1

    def _line(self, size: int) -> None:
        head = self.head
        if head.startswith(b'{"type":"heartbeat"'):
            self.fleet.heartbeats += 1
            return
        at = head.find(b'"version":"')
        if not head.startswith(b'{"type":"snapshot"') or at < 0:
            self._fail(f"unexpected line {bytes(head[:80])!r}")
            return
        at += len(b'"version":"')
        version = head[at:head.index(b'"', at)].decode()
        self.fleet.line_sizes.append(size)
        self.version = version
        self.fleet.took(self, version, size, time.perf_counter())

    def on_message_complete(self) -> None:
        self._fail("the watch ended")

    def _fail(self, why: str) -> None:
        if not self.closing:
            self.closing = True
            self.fleet.gone(self, why)
            if self.transport is not None:
                self.transport.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def watch_request(port: int, service: str, instance: str) -> bytes:
    """The request the sidecar's control client sends (meshproxy/dataplane/control_client.py)."""
    target = f"/v1/watch?service={service}&namespace=default&instance={instance}"
    return (f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: application/x-ndjson\r\n"
            f"Connection: close\r\n\r\n").encode()


# -- the run -------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def _wait(wave: Wave, fleet: Fleet, timeout: float, what: str) -> None:
    lost = asyncio.ensure_future(fleet.lost_event.wait())
    done = asyncio.ensure_future(wave.done.wait())
    try:
        await asyncio.wait([lost, done], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        done.cancel()
    if fleet.lost:
        raise BenchmarkFailed(f"{len(fleet.lost)} proxies lost their watch during {what}; "
                              f"first: {fleet.lost[0]}")
    if not wave.done.is_set():
        raise BenchmarkFailed(f"{what}: only {len(wave.arrivals)} of {wave.expected} proxies held the "
                              f"new version after {timeout:g} s")


async def measure(args: argparse.Namespace, port: int, pid: int, mesh: GeneratedMesh,
                  progress) -> dict:
    """Connect the proxies, measure idle and edits; return the figures (raises BenchmarkFailed)."""
    loop = asyncio.get_running_loop()
    fleet = Fleet()
    figures: dict = {"memory_mib": {}}
    figures["memory_mib"]["ready, no proxies"] = memory_mib(pid)

    # Initial sync: every proxy connected and holding the first version.
    progress(f"connecting {args.proxies} proxies")
    watchers: list[Watcher] = []
    gate = asyncio.Semaphore(args.connect_concurrency or args.proxies)
    cpu0, own0, overflows0 = cpu_seconds(pid), _own_cpu(), listen_overflows()
    wave = fleet.begin(None, time.perf_counter(), args.proxies)

    async def connect(j: int) -> None:
        service = _name(j % args.services)
        instance = f"{service}-{(j // args.services) % _instances(j % args.services)}"
        if j >= args.services * _instances(j % args.services):
            instance += f"-{j}"
        watcher = Watcher(fleet, watch_request(port, service, instance), service)
        watchers.append(watcher)
        async with gate:
            await loop.create_connection(lambda: watcher, HOST, port)

    try:
        try:
            await asyncio.gather(*(connect(j) for j in range(args.proxies)))
        except OSError as exc:
            raise BenchmarkFailed(f"connecting the proxies: {exc}") from exc
        await _wait(wave, fleet, args.timeout, "the initial sync")
        versions = {w.version for w in watchers}
        if len(versions) != 1:
            raise BenchmarkFailed(f"after the initial sync the proxies hold {len(versions)} versions")
        current = versions.pop()
        figures["initial"] = {"version": current, "last_s": max(wave.arrivals),
                              "median_s": statistics.median(wave.arrivals), "bytes": wave.bytes,
                              "cp_cpu_s": cpu_seconds(pid) - cpu0, "client_cpu_s": _own_cpu() - own0,
                              "listen_overflows": None if overflows0 is None
                              else listen_overflows() - overflows0}
        sizes = sorted(fleet.line_sizes)
        figures["line_bytes"] = {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1]}
        figures["memory_mib"][f"{args.proxies} proxies holding the first version"] = memory_mib(pid)
        progress(f"initial sync: {args.proxies} proxies hold {current} after {max(wave.arrivals):.2f} s "
                 f"(line {sizes[-1] / 1024:.0f} KiB)")

        # Idle: heartbeats only.
        progress(f"idle for {args.idle:g} s with {args.proxies} watches open")
        heartbeats0 = fleet.heartbeats
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(args.idle)
        idle_cpu = cpu_seconds(pid) - cpu0
        idle_wall = time.perf_counter() - wall0
        figures["idle"] = {"seconds": idle_wall, "cp_cpu_s": idle_cpu,
                           "cp_cpu_pct": 100 * idle_cpu / idle_wall,
                           "heartbeats": fleet.heartbeats - heartbeats0}
        if fleet.lost:
            raise BenchmarkFailed(f"{len(fleet.lost)} proxies lost their watch while idle; "
                                  f"first: {fleet.lost[0]}")

        # Edits.
        profiler = _start_profiler(args.profile, pid, progress) if args.profile else None
        edits = []
        last_edit = 0.0
        try:
            for i in range(args.edits):
                await asyncio.sleep(max(0.0, last_edit + args.spacing - time.perf_counter()))
                path = mesh.policy_files[(7 * i) % len(mesh.policy_files)]
                attempts = 4 + i % 90  # unique per edit for 90 edits; the initial files say 3
                cpu0, own0, cores0 = cpu_seconds(pid), _own_cpu(), cpu_busy_ticks()
                started = edit_policy(path, attempts)
                wave = fleet.begin(current, started, args.proxies)
                last_edit = started
                await _wait(wave, fleet, args.timeout, f"edit {i + 1}")
                await asyncio.sleep(args.settle)  # the control plane's bookkeeping after its writes
                wall = time.perf_counter() - started
                cp_cpu, client_cpu, cores1 = cpu_seconds(pid) - cpu0, _own_cpu() - own0, cpu_busy_ticks()
                edit = {"file": path.name, "attempts": attempts, "last_s": max(wave.arrivals),
                        "median_s": statistics.median(wave.arrivals),
                        "first_s": min(wave.arrivals), "bytes": wave.bytes,
                        "versions": sorted(wave.versions),
                        "cp_cpu_s": cp_cpu, "client_cpu_s": client_cpu,
                        "other_cp_core_pct": _other(cores0, cores1, args.cp_cpu, cp_cpu, wall),
                        "other_client_core_pct": _other(cores0, cores1, args.client_cpu, client_cpu,
                                                        wall)}
                edits.append(edit)
                current = next(iter(wave.versions)) if len(wave.versions) == 1 else None
                if current is None:  # two versions in one wave: wait for the newest to be everywhere
                    raise BenchmarkFailed(f"edit {i + 1} reached the proxies as "
                                          f"{len(wave.versions)} versions")
                progress(f"edit {i + 1}/{args.edits} ({path.name}, attempts {attempts}): "
                         f"median proxy {1000 * edit['median_s']:.0f} ms, "
                         f"last {1000 * edit['last_s']:.0f} ms, control plane "
                         f"{edit['cp_cpu_s']:.2f} s CPU, this process {edit['client_cpu_s']:.2f} s")
        finally:
            if profiler is not None:
                _stop_profiler(profiler, progress)
        figures["edits"] = edits
        figures["memory_mib"]["after the edits"] = memory_mib(pid)
        figures["heartbeats"] = fleet.heartbeats
    finally:
        for watcher in watchers:
            watcher.close()
    return figures


def _other(before: dict, after: dict, core: int | None, used_s: float, wall: float) -> float | None:
    """Percent of `core` busy over `wall` seconds beyond the `used_s` CPU seconds of the process
    meant to run there: other programs competing with the measurement (None when not pinned)."""
    busy = busy_percent(before, after, core)
    return None if busy is None else max(0.0, busy - 100 * used_s / wall)


def _start_profiler(path: Path, pid: int, progress) -> subprocess.Popen | None:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        progress("py-spy not found: no profile")
        return None
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--output", str(path)]
    if path.suffix == ".txt":
        argv += ["--format", "raw"]  # collapsed stacks, one line each
    elif path.suffix == ".json":
        argv += ["--format", "speedscope"]
    progress(f"profiling the control plane: {shlex.join(argv)}")
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    return process


def _stop_profiler(process: subprocess.Popen, progress) -> None:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    if process.returncode:
        progress(f"py-spy: {err.decode(errors='replace').strip()[-300:]}")


# -- the report ----------------------------------------------------------------------------------

def summarise(figures: dict, args: argparse.Namespace) -> dict:
    """The figures the goals are about, from the raw ones."""
    edits = figures["edits"]
    last = [e["last_s"] for e in edits]
    median = [e["median_s"] for e in edits]
    memory = figures["memory_mib"]
    rss_peak = max(m["VmHWM"] for m in memory.values())
    return {
        "last_p50_s": _percentile(last, 50), "last_p99_s": _percentile(last, 99),
        "median_p50_s": _percentile(median, 50), "median_p99_s": _percentile(median, 99),
        "cp_cpu_s_per_edit": statistics.median(e["cp_cpu_s"] for e in edits),
        "client_cpu_s_per_edit": statistics.median(e["client_cpu_s"] for e in edits),
        "bytes_per_edit": statistics.median(e["bytes"] for e in edits),
        "rss_mib": memory["after the edits"]["VmRSS"],
        "rss_peak_mib": rss_peak,
        "other_cp_core_pct_max": max((e["other_cp_core_pct"] for e in edits
                                      if e["other_cp_core_pct"] is not None), default=None),
        "other_client_core_pct_max": max((e["other_client_core_pct"] for e in edits
                                          if e["other_client_core_pct"] is not None), default=None),
        "p99_met": _percentile(last, 99) <= GOAL_P99_S,
        "rss_met": rss_peak <= GOAL_RSS_MIB,
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown(meta: dict, figures: dict, summary: dict) -> str:
    """The report: goals, figures, each edit, memory over the run, machine and command."""
    s, n, m = summary, meta["services"], meta["proxies"]
    counts = meta["mesh"]
    initial, idle, lines = figures["initial"], figures["idle"], figures["line_bytes"]
    yes = {True: "yes", False: "**no**"}
    out = [
        f"## Control plane at scale: {n} Services, {m} proxies watching, {len(figures['edits'])} edits",
        "",
        f"{meta['date']}, git {meta['machine'].get('git', '?')}. Mesh: {counts['services']} Services, "
        f"{counts['instances']} instances, {counts['httproutes']} HTTPRoutes, "
        f"{counts['trafficpolicies']} TrafficPolicies, {counts['authorizationpolicies']} "
        f"AuthorizationPolicies, 1 PeerAuthentication. Control plane pinned to "
        f"{meta['cp_cpu_label']}, the simulated proxies to {meta['client_cpu_label']}.",
        "",
        "| figure | goal | measured | met |",
        "| --- | --- | --- | --- |",
        f"| edit → last proxy holds it, p50 / p99 | p99 ≤ {GOAL_P99_S:g} s | "
        f"{1000 * s['last_p50_s']:.0f} / **{1000 * s['last_p99_s']:.0f} ms** | {yes[s['p99_met']]} |",
        f"| edit → median proxy holds it, p50 / p99 | | {1000 * s['median_p50_s']:.0f} / "
        f"{1000 * s['median_p99_s']:.0f} ms | |",
        f"| control plane RSS after the edits / peak (VmHWM) | ≤ {GOAL_RSS_MIB:g} MiB | "
        f"{s['rss_mib']:.0f} / **{s['rss_peak_mib']:.0f} MiB** | {yes[s['rss_met']]} |",
        f"| control plane CPU per edit (rename → last proxy + {meta['settle']:g} s), median | | "
        f"{s['cp_cpu_s_per_edit']:.2f} s | |",
        f"| control plane CPU idle, {m} watches open (heartbeats every 5 s) | | "
        f"{idle['cp_cpu_pct']:.1f} % of a core ({idle['cp_cpu_s']:.2f} s in "
        f"{idle['seconds']:.0f} s) | |",
        f"| bytes sent per edit (view line × {m}) | | {s['bytes_per_edit'] / 2**20:.0f} MiB "
        f"(line {lines['min'] / 1024:.0f}–{lines['max'] / 1024:.0f} KiB) | |",
        f"| start: process started → `/ready` | | {meta['ready_s']:.1f} s | |",
        f"| initial sync: connect → every proxy holds the first version | | "
        f"{initial['last_s']:.2f} s (control plane {initial['cp_cpu_s']:.2f} s CPU; "
        f"{_pct(initial['listen_overflows'])} connections dropped by a full listen queue) | |",
        f"| this process (the {m} simulated proxies) CPU per edit, median | | "
        f"{s['client_cpu_s_per_edit']:.2f} s | |",
        f"| other programs on the control plane's / this process's core during an edit, worst | | "
        f"{_pct(s['other_cp_core_pct_max'])} % / {_pct(s['other_client_core_pct_max'])} % | |",
        "",
        "p50/p99 are nearest-rank over the edits (with fewer than 100 edits the p99 is the worst "
        "edit). Time runs from just before the rename to the arrival of the snapshot's whole "
        "line; a proxy's own decoding and loading of the snapshot is not included.",
        "",
        "Each edit: ms after the rename until the first / median / last proxy held it; CPU "
        "seconds of the control plane and of this process; how busy each one's core was with "
        "other programs (% of the core; where it is high, they competed with the edit):",
        "",
        "| # | file | first | median | last | CP CPU | client CPU | other load CP / client core |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, e in enumerate(figures["edits"], 1):
        out.append(f"| {i} | {e['file']} | {1000 * e['first_s']:.0f} | {1000 * e['median_s']:.0f} | "
                   f"{1000 * e['last_s']:.0f} | {e['cp_cpu_s']:.2f} | {e['client_cpu_s']:.2f} | "
                   f"{_pct(e['other_cp_core_pct'])} / {_pct(e['other_client_core_pct'])} % |")
    out += ["", "Control plane memory (MiB):", "", "| when | VmRSS | VmHWM |", "| --- | ---: | ---: |"]
    for when, mem in figures["memory_mib"].items():
        out.append(f"| {when} | {mem['VmRSS']:.0f} | {mem['VmHWM']:.0f} |")
    machine = ", ".join(f"{k}: {v}" for k, v in meta["machine"].items() if k != "git")
    out += ["", f"Machine: {machine}.", "", "Command:", "", "```", meta["command"], "```", ""]
    return "\n".join(out)


# -- the command ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--services", type=int, default=1000, help="Services in the Mesh")
    p.add_argument("--proxies", type=int, default=1000, help="simulated proxies watching")
    p.add_argument("--edits", type=int, default=20, help="policy edits timed")
    p.add_argument("--spacing", type=float, default=1.5, help="at least this many seconds between edits")
    p.add_argument("--idle", type=float, default=10.0,
                   help="seconds of idle watching measured before the edits")
    p.add_argument("--settle", type=float, default=0.2,
                   help="seconds after the last proxy holds an edit before the CPU time is read")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds every proxy has to hold a new version")
    p.add_argument("--connect-concurrency", type=int, default=0,
                   help="proxies connecting at the same time at the start; 0: all at once, as "
                        "after a restart of the control plane")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 when a goal is missed (p99 ≤ {GOAL_P99_S:g} s, "
                        f"RSS ≤ {GOAL_RSS_MIB:g} MiB)")
    p.add_argument("--cp-cpu", type=int, default=0, help="core the control plane is pinned to")
    p.add_argument("--client-cpu", type=int, default=1,
                   help="core of this process (the simulated proxies)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything to a core")
    p.add_argument("--start-timeout", type=float, default=120.0,
                   help="seconds the control plane has to become ready")
    p.add_argument("--meshproxy-cmd", default=f"{shlex.quote(sys.executable)} -m meshproxy",
                   help="how to run meshproxy")
    p.add_argument("--profile", type=Path, default=None,
                   help="record the control plane with py-spy during the edits into this file "
                        "(.svg flame graph, .txt collapsed stacks, .json speedscope)")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the Markdown report here, and the raw figures next to it (.json)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary folder (mesh, control plane log)")
    args = p.parse_args(argv)
    if args.services < 1 or args.proxies < 1 or not 1 <= args.edits <= 90:
        p.error("--services and --proxies must be at least 1, --edits 1..90")
    if args.no_pin:
        args.cp_cpu = args.client_cpu = None
    else:
        usable = os.sched_getaffinity(0)
        for flag, cpu in (("--cp-cpu", args.cp_cpu), ("--client-cpu", args.client_cpu)):
            if cpu not in usable:
                p.error(f"{flag} {cpu} is not one of the usable cores {sorted(usable)}; "
                        "pick others or pass --no-pin")
    return args


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY
                                                    else min(hard, max(needed, soft)), hard))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, 1 when it failed (or with --check a goal was missed), 2 when
    it could not start."""
    args = parse_args(argv)
    if not args.no_pin and shutil.which("taskset") is None:
        print("taskset is missing (util-linux); install it or pass --no-pin", file=sys.stderr)
        return 2
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(
        ["python", "benchmarks/control_plane.py", *argv])
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    _raise_fd_limit(args.proxies * 2 + 256)  # the control plane inherits it
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    started = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-control-bench-"))
    supervisor = Supervisor(workdir)
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    failed = None
    figures: dict = {}
    try:
        mesh = write_mesh(workdir / "mesh", args.services)
        checked = subprocess.run([*meshproxy_cmd, "check", str(mesh.mesh_file)], capture_output=True,
                                 text=True, timeout=300)
        if checked.returncode != 0:
            print(f"meshproxy check refused the generated mesh:\n{checked.stdout}{checked.stderr}",
                  file=sys.stderr)
            return 2
        _progress(f"mesh in {workdir / 'mesh'}: {checked.stdout.strip().splitlines()[-1]}")
        port = free_ports(1)[0]
        child = supervisor.start("control", [*meshproxy_cmd, "control", "--config", str(mesh.mesh_file),
                                             "--listen", f"{HOST}:{port}", "--log-level", "info"],
                                 cpu=args.cp_cpu)
        t0 = time.monotonic()
        try:
            wait_ready(port, child.alive, args.start_timeout)
        except BenchmarkFailed as exc:
            print(f"{exc}\n{log_tail(child.log_path)}", file=sys.stderr)
            return 2
        # `taskset -c N python ...` execs python: the session's pid is the control plane's.
        pid = child.sid
        ready_s = time.monotonic() - t0
        _progress(f"control plane pid {pid} ready on port {port} after {ready_s:.1f} s")
        import uvloop

        try:
            figures = uvloop.run(measure(args, port, pid, mesh, _progress))
        except BenchmarkFailed as exc:
            failed = str(exc)
        if not child.alive():
            failed = failed or "the control plane exited during the run"
        if failed:
            print(f"failed: {failed}\ncontrol plane log:\n{log_tail(child.log_path)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("interrupted; stopping the control plane", file=sys.stderr)
        return 130
    finally:
        supervisor.stop_all()
        if args.keep_workdir or failed:
            print(f"mesh and control plane log kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    facts = machine_facts(meshproxy_cmd)
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "services": args.services, "proxies": args.proxies, "mesh": mesh.counts,
        "settle": args.settle, "ready_s": ready_s,
        "cp_cpu_label": f"core {args.cp_cpu}" if args.cp_cpu is not None else "no core",
        "client_cpu_label": f"core {args.client_cpu}" if args.client_cpu is not None else "no core",
        "machine": {k: facts[k] for k in MACHINE_KEYS if k in facts},
    }
    summary = summarise(figures, args)
    report = markdown(meta, figures, summary)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        json_path = args.out.with_suffix(".json")
        raw = {"meta": meta, "summary": summary, "figures": figures}
        json_path.write_text(json.dumps(raw, indent=2) + "\n")
        _progress(f"wrote {args.out} and {json_path}")
    if args.check and not (summary["p99_met"] and summary["rss_met"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
