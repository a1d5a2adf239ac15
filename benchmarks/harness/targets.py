"""The servers of a benchmark run: the origin, the upload sink and the proxies under test.

Each one gets its own folder under the run's work directory, a config rendered from
benchmarks/upstream/, free loopback ports, and is started through the Supervisor (so it is
stopped at the end whatever happens).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.procs import Child, Supervisor, log_tail, wait_until
from harness.sources import check_source, interpreter_of, source_env

UPSTREAM_DIR = Path(__file__).resolve().parent.parent / "upstream"
SINK_SCRIPT = Path(__file__).resolve().parent / "sink.py"
HOST = "127.0.0.1"
PROXY_TARGETS = ("nginx", "haproxy", "meshproxy")
ALL_TARGETS = ("direct", *PROXY_TARGETS)
# The sidecar started from another source tree (run.py --baseline-src): not in ALL_TARGETS,
# the flag adds it, next to `meshproxy`.
BASELINE_TARGET = "meshproxy-base"


class TargetFailed(Exception):
    """A server did not start or does not answer; the message says why, with its log tail."""


@dataclass
class Endpoint:
    """Where the load generator sends requests for one target, and which session to measure."""

    name: str
    port: int
    child: Child | None  # the proxy; None for `direct`
    upload_port: int = 0  # where uploads go: the proxy's port, or the sink's for `direct`

    def __post_init__(self) -> None:
        if not self.upload_port:
            self.upload_port = self.port

    @property
    def sid(self) -> int | None:
        """Session id of the proxy process tree, or None for `direct`."""
        return self.child.sid if self.child is not None else None


def render(template: str, values: dict[str, object]) -> str:
    """Return benchmarks/upstream/TEMPLATE with each {{name}} replaced by values[name].

    Raises KeyError naming a placeholder that has no value.
    """
    text = (UPSTREAM_DIR / template).read_text()

    def value(match: re.Match) -> str:
        return str(values[match.group(1)])

    return re.sub(r"\{\{(\w+)\}\}", value, text)


def free_ports(count: int) -> list[int]:
    """Return `count` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_status(port: int, path: str, host: str | None = None) -> tuple[int, bytes] | None:
    """Return (status, body) of GET path on the port, or None when it cannot be fetched."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_ready(child: Child, ready, timeout: float, what: str) -> None:
    """Wait until ready() is true while the child runs; `what` describes ready() for errors.

    Raises TargetFailed (with the log tail) when the child exits or the deadline passes.
    """
    deadline = time.monotonic() + timeout
    if wait_until(lambda: not child.alive() or ready(), deadline) and child.alive():
        return
    state = (f"exited with status {child.popen.returncode} before it would {what}"
             if not child.alive() else f"did not {what} within {timeout:.0f}s")
    tail = log_tail(child.log_path)
    raise TargetFailed(f"{child.name} {state}; log {child.log_path}:\n{tail}")


@dataclass(frozen=True)
class MeshPorts:
    """The four ports of one meshproxy sidecar."""

    outbound: int
    inbound: int
    admin: int
    health: int


class Stack:
    """Starts and describes the servers of one run. All ports are chosen at construction.

    `meshproxy_names` are the sidecars the run may start (each gets its own ports and
    folder); with `baseline_src`, BASELINE_TARGET is one of them and runs from that tree.
    """

    def __init__(self, supervisor: Supervisor, workdir: Path, *, proxy_cpu: int | None,
                 load_cpu: int | None, big_file: Path, start_timeout: float,
                 meshproxy_cmd: Sequence[str], meshproxy_args: Sequence[str],
                 baseline_src: Path | None = None,
                 meshproxy_names: Sequence[str] = ("meshproxy",)) -> None:
        self.sup = supervisor
        self.workdir = workdir
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self.big_file = big_file
        self.start_timeout = start_timeout
        self.meshproxy_cmd = list(meshproxy_cmd)
        self.meshproxy_args = list(meshproxy_args)
        self.baseline_src = baseline_src
        names = list(dict.fromkeys(meshproxy_names))
        if baseline_src is not None and BASELINE_TARGET not in names:
            names.append(BASELINE_TARGET)
        # One free_ports call for everything: ports chosen in separate calls could collide
        # with ones chosen earlier whose server has not bound them yet.
        ports = free_ports(4 + 4 * len(names))
        self.origin_port, self.sink_port, self.nginx_port, self.haproxy_port = ports[:4]
        self.mesh_ports = {name: MeshPorts(*ports[4 + 4 * i:8 + 4 * i])
                           for i, name in enumerate(names)}
        self.origin: Child | None = None
        self.sink: Child | None = None

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _values(self, directory: Path, port: int) -> dict[str, object]:
        return {"dir": directory, "port": port, "origin_port": self.origin_port,
                "sink_port": self.sink_port, "big_file": self.big_file, "body_1k": "x" * 1024}

    def start_origin(self) -> Child:
        """Start the origin nginx (pinned to the load core); return it once it accepts."""
        directory = self._dir("origin")
        conf = directory / "nginx.conf"
        conf.write_text(render("origin-nginx.conf", self._values(directory, self.origin_port)))
        self.origin = self.sup.start("origin", ["nginx", "-p", str(directory), "-c", str(conf)],
                                     cpu=self.load_cpu)
        wait_ready(self.origin, lambda: _http_status(self.origin_port, "/") is not None,
                   self.start_timeout, f"answer GET / on {HOST}:{self.origin_port}")
        return self.origin

    def start_sink(self) -> Child:
        """Start the upload sink (pinned to the load core); return it once it accepts."""
        self.sink = self.sup.start(
            "sink", [sys.executable, str(SINK_SCRIPT), "--port", str(self.sink_port)],
            cpu=self.load_cpu)
        wait_ready(self.sink, lambda: _accepts(self.sink_port), self.start_timeout,
                   f"accept connections on {HOST}:{self.sink_port}")
        return self.sink

    def start(self, target: str) -> Endpoint:
        """Start one target and return its Endpoint once it forwards a request to the origin.

        Raises TargetFailed when it does not start, or answers anything but 200 "ok".
        """
        if target == "direct":
            endpoint = Endpoint("direct", self.origin_port, None, upload_port=self.sink_port)
        elif target == "nginx":
            endpoint = self._start_nginx()
        elif target == "haproxy":
            endpoint = self._start_haproxy()
        elif target == "meshproxy":
            endpoint = self.start_meshproxy("meshproxy")
        elif target == BASELINE_TARGET and self.baseline_src is not None:
            endpoint = self.start_meshproxy(BASELINE_TARGET, src=self.baseline_src)
        else:
            raise TargetFailed(f"unknown target {target!r}")
        check_forwards(endpoint)
        return endpoint

    def _start_nginx(self) -> Endpoint:
        directory = self._dir("nginx")
        conf = directory / "nginx.conf"
        conf.write_text(render("nginx-proxy.conf", self._values(directory, self.nginx_port)))
        child = self.sup.start("nginx", ["nginx", "-p", str(directory), "-c", str(conf)],
                               cpu=self.proxy_cpu)
        wait_ready(child, lambda: _accepts(self.nginx_port), self.start_timeout,
                   f"accept connections on {HOST}:{self.nginx_port}")
        return Endpoint("nginx", self.nginx_port, child)

    def _start_haproxy(self) -> Endpoint:
        directory = self._dir("haproxy")
        conf = directory / "haproxy.cfg"
        conf.write_text(render("haproxy.cfg", self._values(directory, self.haproxy_port)))
        child = self.sup.start("haproxy", ["haproxy", "-db", "-f", str(conf)], cpu=self.proxy_cpu)
        wait_ready(child, lambda: _accepts(self.haproxy_port), self.start_timeout,
                   f"accept connections on {HOST}:{self.haproxy_port}")
        return Endpoint("haproxy", self.haproxy_port, child)

    def start_meshproxy(self, name: str, *, src: Path | None = None,
                        command: Sequence[str] | None = None, pythonpath: Sequence[Path] = (),
                        env: dict[str, str] | None = None) -> Endpoint:
        """Start the sidecar `name` (one of `meshproxy_names`) as `meshproxy proxy ...` with
        the Mesh file of the run, and return its Endpoint once GET /ready answers 200.

        `command` replaces --meshproxy-cmd (percall.py's counting wrapper); `src` is a source
        tree to import meshproxy from instead of the installed package, checked before the
        start; `pythonpath` goes on PYTHONPATH after it; `env` adds variables. Raises
        TargetFailed when it does not start or imports meshproxy from elsewhere.
        """
        ports = self.mesh_ports[name]
        directory = self._dir(name)
        mesh = directory / "mesh.yaml"
        mesh.write_text(render("mesh.yaml", self._values(directory, ports.outbound)))
        command = list(command or self.meshproxy_cmd)
        argv = [*command, "proxy", "--config", str(mesh), "--service", "bench-client",
                "--outbound-port", str(ports.outbound),
                "--inbound-port", str(ports.inbound),
                "--admin-port", str(ports.admin),
                "--health-port", str(ports.health),
                "--inbound-bind", HOST,  # nothing here needs to listen beyond loopback
                *self.meshproxy_args]
        paths = [*([src] if src is not None else []), *pythonpath]
        child_env = source_env(dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), paths)
        if src is not None:
            try:
                where = check_source(src, interpreter_of(command), child_env)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                raise TargetFailed(f"{name}: {exc}") from exc
            (directory / "imports.txt").write_text(where + "\n")  # kept with the logs
        try:
            child = self.sup.start(name, argv, cpu=self.proxy_cpu, env=child_env)
        except OSError as exc:
            raise TargetFailed(f"{name}: cannot run {argv[0]!r}: {exc}") from exc
        wait_ready(child, lambda: (_http_status(ports.admin, "/ready") or (0,))[0] == 200,
                   self.start_timeout, f"answer 200 to GET /ready on {HOST}:{ports.admin}")
        return Endpoint(name, ports.outbound, child)


def check_forwards(endpoint: Endpoint) -> None:
    """Raise TargetFailed unless GET / with Host: origin through the endpoint answers 200 "ok"."""
    answer = _http_status(endpoint.port, "/", host="origin")
    if answer != (200, b"ok\n"):
        raise TargetFailed(f"{endpoint.name}: GET / with Host: origin on port {endpoint.port} "
                           f"answered {answer!r}, expected (200, b'ok\\n')")
