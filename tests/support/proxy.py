"""A `meshproxy proxy --config` subprocess for integration tests.

    mesh = mesh_yaml({"web": [backend.address], "empty": []}, policy="REGISTRY_ONLY")
    proxy = ProxyProcess(tmp_path, mesh, uvloop=False).start()
    proxy.outbound, proxy.inbound, proxy.admin, proxy.health     # ports
    proxy.metrics(), proxy.rss_kib(), proxy.peak_rss_kib()
    proxy.stop()

start() picks free ports, waits (with a deadline) until admin GET /ready answers 200, and
retries with other ports if one was taken in between. The proxy's stderr goes to a file in the
test's tmp_path; stop() prints it, so pytest shows it when the test failed.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def mesh_yaml(services: dict[str, list[str]], *, policy: str = "ALLOW_ANY",
              namespace: str = "default", ports: dict[str, int] | None = None,
              documents: list[dict | str] | tuple = ()) -> str:
    """Return a Mesh document: each Service's instances are unmeshed apps at the addresses given.

    Instances are named `<service>-<index>`. Services listen on port 80 unless `ports` names
    another. `documents` (dicts, or YAML text) follow the Mesh in the same file, e.g. HTTPRoutes.
    """
    ports = ports or {}
    entries = []
    for name, addresses in services.items():
        entry: dict = {"name": name, "namespace": namespace, "port": ports.get(name, 80)}
        if addresses:
            entry["instances"] = [
                {"name": f"{name}-{i}", "sidecar": False, "app": {"address": address}}
                for i, address in enumerate(addresses)
            ]
        entries.append(entry)
    doc = {
        "apiVersion": "meshproxy.io/v1alpha1",
        "kind": "Mesh",
        "metadata": {"name": "test"},
        "spec": {"outboundTrafficPolicy": policy, "services": entries},
    }
    parts = [yaml.safe_dump(doc, sort_keys=False)]
    for extra in documents:
        parts.append(extra if isinstance(extra, str) else yaml.safe_dump(extra, sort_keys=False))
    return "---\n".join(parts)


def free_ports(n: int) -> list[int]:
    """Return n distinct ports that were free on every address a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def closed_port() -> int:
    """Return a port on 127.0.0.1 where nothing listens (connections are refused)."""
    return free_ports(1)[0]


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `condition()` until it returns a true value (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ProxyProcess:
    """One `meshproxy proxy` subprocess (uvloop unless uvloop=False)."""

    def __init__(self, tmp_path: Path, mesh: str, *, service: str = "client",
                 namespace: str = "default", instance: str | None = None,
                 app_port: int | None = None, uvloop: bool = True,
                 extra_args: list[str] | tuple[str, ...] = (), drain_timeout: float = 5.0,
                 name: str = "proxy", extra_configs: list[str] | tuple[str, ...] = (),
                 control: str | None = None) -> None:
        """`control`: a control-plane URL; the proxy then follows it instead of `mesh`."""
        self.tmp_path = Path(tmp_path)
        self.config = self.tmp_path / f"{name}-mesh.yaml"
        self.config.write_text(mesh)
        self.stderr_path = self.tmp_path / f"{name}.stderr"
        self.service = service
        self.namespace = namespace
        self.instance = instance
        self.app_port = app_port
        self.uvloop = uvloop
        self.extra_args = list(extra_args)
        self.extra_configs = [str(path) for path in extra_configs]  # read after the Mesh file
        self.drain_timeout = drain_timeout
        self.name = name
        self.control = control
        self.process: subprocess.Popen | None = None
        self.outbound = self.inbound = self.admin = self.health = 0

    # life cycle ------------------------------------------------------------------------------

    def command(self) -> list[str]:
        source = ["--control", self.control] if self.control else ["--config", str(self.config),
                                                                   *self.extra_configs]
        cmd = [
            sys.executable, "-m", "meshproxy", "proxy", *source,
            "--service", self.service, "--namespace", self.namespace,
            "--outbound-port", str(self.outbound), "--inbound-port", str(self.inbound),
            "--admin-port", str(self.admin), "--health-port", str(self.health),
            "--inbound-bind", "127.0.0.1", "--drain-timeout", str(self.drain_timeout),
        ]
        if self.instance is not None:
            cmd += ["--instance", self.instance]
        if self.app_port is not None:
            cmd += ["--app-port", str(self.app_port)]
        if not self.uvloop:
            cmd.append("--no-uvloop")
        return cmd + self.extra_args

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        for _ in range(3):
            self.outbound, self.inbound, self.admin, self.health = free_ports(4)
            if self._launch(timeout):
                return self
            if b"address already in use" not in self.stderr().lower():
                break
        raise AssertionError(f"proxy did not become ready:\n{self.stderr().decode(errors='replace')}")

    def _launch(self, timeout: float) -> bool:
        env = dict(os.environ)
        env.pop("MESHPROXY_SERVICE", None)
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.command(), cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                # Still running after the 200: the answer came from this process.
                if self.admin_get("/ready", timeout=1)[0] == 200 and self.process.poll() is None:
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        return False

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; return its exit code (raises TimeoutExpired)."""
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        """SIGTERM, wait for the drain, kill on timeout; print stderr for a failed test."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.drain_timeout + 5)
            except subprocess.TimeoutExpired:
                self.kill()
        print(f"--- {self.name} ({' '.join(self.command()[2:])}) exit {self.process.returncode}")
        print(self.stderr().decode(errors="replace"))

    def stderr(self) -> bytes:
        try:
            return self.stderr_path.read_bytes()
        except FileNotFoundError:
            return b""

    @property
    def pid(self) -> int:
        return self.process.pid

    # admin -----------------------------------------------------------------------------------

    def admin_get(self, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Return every sample of admin /metrics as {(name, frozenset(labels)): value}."""
        status, body = self.admin_get("/metrics")
        assert status == 200, body
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and wanted <= ls)

    # memory ----------------------------------------------------------------------------------

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS), KiB."""
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        """Peak resident memory since start (VmHWM), KiB."""
        return self._status_kib("VmHWM")
