"""What soak.py and chaos.py read from the demo mesh's processes: memory and descriptors
from /proc, readiness, `/metrics` error counters and `/config` versions from the admin
endpoints, ingestion's queue, and the ports and addresses the Mesh file fixes (the only
functions that import meshproxy, for its config loader).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from harness.demo_mesh import Proc, shifted_copy


def rss_kib(pid: int) -> int | None:
    """VmRSS of pid in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    """Open file descriptors of pid, or None when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """GET url; return (status, body), or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return None


def http_json(url: str, timeout: float = 1.0) -> dict | None:
    """GET url and decode a JSON object from a 200 answer; None otherwise."""
    got = http_get(url, timeout)
    if got is None or got[0] != 200:
        return None
    try:
        value = json.loads(got[1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when host:port accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def serving(proc: Proc) -> bool:
    """True when the process does its job: the control plane's and a sidecar's `/ready` answer
    200; an HTTP app answers `/healthz`; the gRPC app (drone-telemetry) accepts connections."""
    if proc.kind == "control":
        got = http_get(f"{proc.control_url}/ready", 0.5)
    elif proc.kind == "sidecar":
        got = http_get(f"http://127.0.0.1:{proc.admin_port}/ready", 0.5) if proc.admin_port else None
    elif proc.app_port is None:
        return False
    elif proc.service == "drone-telemetry":
        return port_open(proc.app_host, proc.app_port)
    else:
        got = http_get(f"http://{proc.app_host}:{proc.app_port}/healthz", 0.5)
    return got is not None and got[0] == 200


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format to (name, labels, value) samples; comments skipped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, labels = head.partition("{")
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)) if brace else {}
        try:
            samples.append((name, pairs, float(value)))
        except ValueError:
            continue
    return samples


def error_counts(metrics_url: str) -> dict[str, float] | None:
    """The error counters of a sidecar's or the control plane's `/metrics`, or None when it did
    not answer: failed requests (`classification="failure"`, both directions), failed TLS
    handshakes, refused configuration changes, certificate requests not issued; and, for
    scale, requests and retries."""
    got = http_get(metrics_url, 2.0)
    if got is None or got[0] != 200:
        return None
    counts = {"requests": 0.0, "failed_requests": 0.0, "retries": 0.0, "tls_failures": 0.0,
              "config_errors": 0.0, "cert_failures": 0.0}
    for name, labels, value in parse_metrics(got[1].decode(errors="replace")):
        if name == "meshproxy_requests_total":
            counts["requests"] += value
            if labels.get("classification") == "failure":
                counts["failed_requests"] += value
        elif name == "meshproxy_retries_total":
            counts["retries"] += value
        elif name == "meshproxy_tls_handshakes_total" and labels.get("result") != "ok":
            counts["tls_failures"] += value
        elif name == "meshproxy_config_errors_total":
            counts["config_errors"] += value
        elif name == "meshproxy_control_certificates_total" and labels.get("result") != "issued":
            counts["cert_failures"] += value
    return counts


def metrics_url(proc: Proc) -> str | None:
    if proc.kind == "control":
        return f"{proc.control_url}/metrics"
    if proc.kind == "sidecar" and proc.admin_port:
        return f"http://127.0.0.1:{proc.admin_port}/metrics"
    return None


def config_version(proc: Proc) -> tuple[str | None, bool | None]:
    """(the config version in force, whether a sidecar's watch is connected) from `/config`."""
    if proc.kind == "control":
        body = http_json(f"{proc.control_url}/config", 2.0)
        return (body or {}).get("version"), None
    body = http_json(f"http://127.0.0.1:{proc.admin_port}/config", 2.0) or {}
    source = body.get("source") if isinstance(body.get("source"), dict) else {}
    return body.get("version"), source.get("connected")


def edge_url(mesh_file: Path) -> str:
    """Where `meshproxy demo load` sends its traffic: ingestion's edge (its sidecar's inbound)."""
    from meshproxy.demo.load import default_url

    return default_url(mesh_file)


def ingestion_address(mesh_file: Path) -> str | None:
    """HOST:PORT of ingestion's app (not its sidecar), or None when the file has none."""
    from meshproxy.config import load_config

    snapshot = load_config([str(mesh_file)])
    for service in snapshot.services.values():
        if service.name == "ingestion" and service.instances:
            return service.instances[0].app_address
    return None


def ingestion_queue(address: str | None) -> int | None:
    """How many deliveries wait in ingestion's queue for the scheduler (its `/stats`)."""
    stats = http_json(f"http://{address}/stats", 2.0) if address else None
    queued = (stats or {}).get("queued")
    return queued if isinstance(queued, int) else None


def fixed_ports(mesh_file: Path) -> list[int]:
    """The ports the Mesh file fixes (apps, fixed sidecar ports, the control plane's)."""
    from meshproxy.config import load_config

    snapshot = load_config([str(mesh_file)])
    ports = set()
    for service in snapshot.services.values():
        for instance in service.instances:
            if instance.command:
                ports.add(instance.app_port)
            sp = instance.sidecar_ports
            ports.update(p for p in (sp.outbound, sp.inbound, sp.admin, sp.health) if p)
    return sorted(ports)


def ports_taken(mesh_file: Path) -> list[int]:
    """The Mesh file's fixed ports that something already listens on (another mesh)."""
    return [p for p in fixed_ports(mesh_file) if port_open("127.0.0.1", p, 0.2)]


TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def tcp_states() -> dict[int, str]:
    """Socket inode -> TCP state (established, close_wait, ...) for this network namespace."""
    states: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    states[int(fields[9])] = TCP_STATES.get(fields[3], fields[3])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return states


def fd_kinds(pid: int, states: dict[int, str]) -> dict[str, int] | None:
    """pid's descriptors by kind: `tcp STATE` for TCP sockets, `socket` for others, `pipe`,
    `anon_inode:...` (epoll, eventfd, timerfd), `file`; None when it is gone. A leak shows as
    a kind that only grows; a socket the peer closed and the process never did stays in
    CLOSE_WAIT."""
    kinds: dict[str, int] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            state = states.get(int(target[8:-1]))
            kind = f"tcp {state}" if state else "socket"
        elif target.startswith("pipe:"):
            kind = "pipe"
        elif target.startswith("anon_inode:"):
            kind = target
        else:
            kind = "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def mesh_workdir(args, prefix: str, progress) -> Path | None:
    """A work folder for a run of the demo (soak.py, chaos.py), with `args.mesh_file` moved by
    `--port-offset` into it when asked; None, having said why, when the mesh's ports are taken."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if args.port_offset:
        args.mesh_file = shifted_copy(args.mesh_file, args.port_offset, workdir)
    taken = ports_taken(args.mesh_file)
    if taken:
        progress(f"ports of {args.mesh_file} already in use ({', '.join(map(str, taken))}): "
                 "is another mesh running? (--port-offset moves them)")
        shutil.rmtree(workdir, ignore_errors=True)
        return None
    return workdir
