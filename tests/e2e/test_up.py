"""`meshproxy up`: a whole mesh from one file, requests across it, and a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for the user's purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


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
"""
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return path, inbound


class _Lines:
    """Collects a child's output lines in a thread, so the test can wait for one."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.05)
        return False


def test_up_runs_the_mesh_and_stops_everything(tmp_path: Path) -> None:
    mesh, frontend_inbound = _mesh_file(tmp_path)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "up", str(mesh), "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    out = _Lines(proc.stdout)
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
        pids = [int(line.split()[0]) for line in (state / "pids").read_text().splitlines()]
        assert len(pids) == 7  # 3 sidecars, 4 apps
        assert all(_alive(pid) for pid in pids)
        assert (state / "logs" / "frontend-0_proxy.log").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "\n".join(out.lines)
    assert out.wait_for("stopped", 5)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)], "processes left behind"


def test_up_refuses_an_invalid_mesh_file(tmp_path: Path) -> None:
    bad = tmp_path / "mesh.yaml"
    bad.write_text("apiVersion: meshproxy.io/v1alpha1\nkind: Mesh\nmetadata: {name: x}\n"
                   "spec:\n  services:\n    - name: a\n      port: 99999\n")
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "up", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"{bad}:7:" in proc.stderr


def test_example_mesh_checks_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "check", str(REPO / "config")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok:")
