"""`meshproxy up`: a whole mesh from one file, requests across it, and a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from support.output import Lines, alive

REPO = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _mesh_file(tmp_path: Path) -> tuple[Path, int]:
    front, b0, b1, ext, inbound = _free_ports(5)
    echo = "[python3, -m, meshproxy.demo.echo]"
    text = f"""
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {{name: test}}
spec:
  mtls: {{mode: DISABLE}}
  services:
    - name: frontend
      instances:
        - name: frontend-0
          app: {{address: 127.0.0.1:{front}, command: {echo}}}
          sidecar: {{inbound: {inbound}}}
    - name: backend
      instances:
        - {{name: backend-0, app: {{address: 127.0.0.1:{b0}, command: {echo}}}}}
        - {{name: backend-1, app: {{address: 127.0.0.1:{b1}, command: {echo}}}}}
    - name: weather
      instances:
        - {{name: weather-0, sidecar: false, app: {{address: 127.0.0.1:{ext}, command: {echo}}}}}
---
# Round robin, so that 20 calls in a row reach both backends (PeakEWMA would rightly keep
# sending them to whichever answered fastest).
apiVersion: meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: backend-lb}}
spec:
  targetRef: {{kind: Service, name: backend}}
  loadBalancer: {{type: RoundRobin}}
"""
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return path, inbound


def test_up_runs_the_mesh_and_stops_everything(tmp_path: Path) -> None:
    mesh, frontend_inbound = _mesh_file(tmp_path)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "up", str(mesh), "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    out = Lines(proc.stdout)
    try:
        assert out.wait_for("mesh ready", 40), "\n".join(out.lines)
        header = next(line for line in out.lines if line.startswith("SERVICE"))
        assert header.split() == ["SERVICE", "INSTANCE", "APP", "OUTBOUND", "INBOUND", "ADMIN"]
        assert any(line.startswith("weather.default") and "not meshed" in line
                   for line in out.lines)
        instances = set()
        for _ in range(20):
            r = requests.get(f"http://127.0.0.1:{frontend_inbound}/call/backend/hello", timeout=5)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["via"] == "frontend-0"
            assert body["answer"]["path"] == "/hello"
            assert body["answer"]["request_id"]  # added by a sidecar on the way
            instances.add(body["answer"]["instance"])
        assert instances == {"backend-0", "backend-1"}
        r = requests.get(f"http://127.0.0.1:{frontend_inbound}/call/weather/today", timeout=5)
        assert r.json()["answer"]["instance"] == "weather-0"
        named = dict(reversed(line.split(maxsplit=1)) for line in (state / "pids").read_text().splitlines())
        assert len(named) == 8, named  # the control plane, 3 sidecars, 4 apps
        assert all(alive(int(pid)) for pid in named.values())
        assert (state / "logs" / "frontend-0_proxy.log").exists()
        # The sidecars follow the control plane `up` runs (the one that watches the file).
        listed = requests.get(_control_url(out.lines) + "/v1/proxies", timeout=5).json()["proxies"]
        assert sorted(p["instance"] for p in listed) == ["backend-0", "backend-1", "frontend-0"]
        # A child that dies is reported and started again.
        os.kill(int(named["backend-1/app"]), signal.SIGKILL)
        assert out.wait_for("backend-1/app exited", 10), "\n".join(out.lines)
        assert out.wait_for("restarted backend-1/app", 10), "\n".join(out.lines)
        wait_until(lambda: {_call_backend(frontend_inbound) for _ in range(4)} == {"backend-0", "backend-1"},
                   10)
        pids = [int(line.split()[0]) for line in (state / "pids").read_text().splitlines()]
        # The pids file names the restarted process, not the one that died.
        now = dict(reversed(line.split(maxsplit=1)) for line in (state / "pids").read_text().splitlines())
        assert now["backend-1/app"] != named["backend-1/app"] and alive(int(now["backend-1/app"]))
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "\n".join(out.lines)
    assert out.wait_for("stopped", 5)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"


def _control_url(lines: list[str]) -> str:
    line = next(line for line in lines if line.startswith("control plane "))
    return line.split()[2].removesuffix("/config;")


def _call_backend(frontend_inbound: int) -> str | None:
    try:
        r = requests.get(f"http://127.0.0.1:{frontend_inbound}/call/backend/again", timeout=5)
        return r.json()["answer"]["instance"] if r.status_code == 200 else None
    except (requests.RequestException, ValueError, KeyError):
        return None


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_up_refuses_an_invalid_mesh_file(tmp_path: Path) -> None:
    bad = tmp_path / "mesh.yaml"
    bad.write_text("apiVersion: meshproxy.io/v1alpha1\nkind: Mesh\nmetadata: {name: x}\n"
                   "spec:\n  services:\n    - name: a\n      port: 99999\n")
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "up", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"{bad}:7:" in proc.stderr


@pytest.mark.parametrize("folder", ["examples", "demo"])
def test_bundled_meshes_check_clean(folder: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "check", "--strict", str(REPO / "config" / folder)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok:")
