"""The README's first command: `meshproxy up` with no argument runs the drone-delivery demo.
Then `meshproxy demo load` drives it and `meshproxy stat` shows the split and the retries, over
HTTP and over gRPC (the scheduler's preflight calls to `drone-telemetry`)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.output import Lines, alive

REPO = Path(__file__).resolve().parents[2]


def _meshproxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshproxy", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _stat(control: str, direction: str) -> dict[str, dict]:
    proc = _meshproxy("stat", "--control", control, "--window", "0", "--direction", direction, "-o", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {row["service"]: row for row in json.loads(proc.stdout)}


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "meshproxy", "up", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    out = Lines(proc.stdout)
    pids: list[int] = []
    try:
        assert out.wait_for("mesh ready", 60), "\n".join(out.lines)
        pids = [int(line.split()[0]) for line in (state / "pids").read_text().splitlines()]
        assert len(pids) == 26  # control plane, 12 sidecars, 13 apps (thirdparty has no sidecar)
        assert "edge  ingestion.default: http://127.0.0.1:18000/" in out.lines
        control = re.search(r"control plane (http://\S+)/config;", "\n".join(out.lines)).group(1)

        load = _meshproxy("demo", "load", "--duration", "6", "--rate", "40", "--seed", "7")
        assert load.returncode == 0, load.stdout + load.stderr
        versions = re.search(r"delivery versions answering: v1 (\d+), v2 (\d+)", load.stdout)
        assert versions and int(versions[1]) > int(versions[2]) > 0, load.stdout  # the 80/20 split

        inbound = _stat(control, "inbound")
        for service in ("ingestion", "scheduler", "account", "package", "drone", "drone-telemetry",
                        "delivery-v1", "delivery-v2"):
            assert inbound[f"{service}.default"]["requests"] > 0, (service, inbound)
        assert inbound["package.default"]["instances"] == 2
        assert inbound["drone-telemetry.default"]["instances"] == 3
        outbound = _stat(control, "outbound")
        # package-1 fails some calls (its sidecar counts them inbound); the callers' sidecars
        # retried them on the other instance, so what the scheduler saw succeeded.
        assert inbound["package.default"]["success_rate"] < 1.0
        assert outbound["package.default"]["success_rate"] > inbound["package.default"]["success_rate"]
        assert outbound["package.default"]["success_rate"] >= 0.99
        # The same over gRPC: drone-telemetry-2's UNAVAILABLE answers are retried on another
        # instance by the scheduler's sidecar.
        assert outbound["drone-telemetry.default"]["success_rate"] >= 0.99
        # mTLS and authorization: only the scheduler may call `account`.
        ingestion = next(line for line in out.lines if line.startswith("ingestion.default "))
        ingestion_outbound = ingestion.split()[3]
        denied = subprocess.run(["curl", "-s", "-i", "-H", "Host: account",
                                 f"http://{ingestion_outbound}/api/accounts/acct-0001"],
                                capture_output=True, text=True, timeout=10).stdout
        assert denied.startswith("HTTP/1.1 403") and "x-meshproxy-error: unauthorized" in denied, denied
        assert _stat(control, "inbound")["account.default"]["requests"] > 0
        # Calls to the canary parent `delivery` show as the two versions its route splits them to.
        assert outbound["delivery-v1.default"]["requests"] > outbound["delivery-v2.default"]["requests"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "\n".join(out.lines[-40:])
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"
