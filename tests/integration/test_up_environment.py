"""What `meshproxy up` takes from the environment it runs in, and what it says about it.

- The shell's MESHPROXY_* variables are the defaults of `meshproxy proxy`'s flags, so they must
  not reach the sidecars `up` starts (MESHPROXY_SERVICE_ACCOUNT from a shell would make every
  sidecar refuse its certificate).
- A command's `python3` is the interpreter running `up`, not the first python3 on PATH: run by
  path from a virtual environment that is not activated, `up` must still start the demo's apps
  (`python3 -m meshproxy.demo ...`) with an interpreter that has meshproxy.
- A healthy start is quiet (the control plane first, the sidecars once it answers), and a start
  that fails says so once, naming the part, its log and what to do.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import requests

from meshproxy.local.supervisor import Child, Supervisor
from support.output import Lines, alive

REPO = Path(__file__).resolve().parents[2]
# A log line of a warning or an error, as meshproxy's processes write them (`... WARNING
# meshproxy.proxy: ...`), or as grpcio's C core does (`E1208 03:27:48.676385 ...`).
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^\[[^\]]+\] [EW]\d{4} |Traceback")


async def test_children_get_only_the_meshproxy_variables_up_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPROXY_SERVICE_ACCOUNT", "from-the-shell")
    monkeypatch.setenv("MESHPROXY_TRANSPARENT", "true")
    monkeypatch.setenv("UNRELATED_SETTING", "kept")
    supervisor = Supervisor(tmp_path / "logs", out=open(tmp_path / "out", "w"))
    child = Child("probe", [sys.executable, "-c",
                            "import os; print(sorted((k, v) for k, v in os.environ.items() "
                            "if k.startswith('MESHPROXY_') or k == 'UNRELATED_SETTING'))"],
                  env={"MESHPROXY_SERVICE": "web"})
    await supervisor.start(child)
    assert await child.process.wait() == 0
    await child._pump
    printed = child.log_path.read_text()
    assert "[('MESHPROXY_SERVICE', 'web'), ('UNRELATED_SETTING', 'kept')]" in printed, printed


def _python3_without_meshproxy(folder: Path) -> str:
    """A PATH whose first python3 (and python) cannot import meshproxy, as the system's python3
    cannot when meshproxy lives in a virtual environment: it fails the way that one would."""
    folder.mkdir()
    for name in ("python3", "python"):
        shim = folder / name
        shim.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'meshproxy' "
                        "($0, the first python3 on PATH)\" >&2\nexit 1\n")
        shim.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def _environment(path: str) -> dict[str, str]:
    """This environment as a shell without the virtual environment activated would have it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = path
    return env


def _installed_script() -> Path:
    """The `meshproxy` console script of the installation running these tests (what
    `.venv/bin/meshproxy` is in a virtual environment): it names its interpreter itself."""
    script = Path(sysconfig.get_path("scripts")) / "meshproxy"
    assert script.exists(), f"{script} is missing: install the package (scripts/venv.sh)"
    return script


def test_the_demo_starts_quietly_from_a_venv_that_is_not_activated(tmp_path: Path) -> None:
    script = _installed_script()
    state = tmp_path / "state"
    proc = subprocess.Popen([str(script), "up", "--state-dir", str(state)],
                            env=_environment(_python3_without_meshproxy(tmp_path / "bin")),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = Lines(proc.stdout)
    pids: list[int] = []
    try:
        # Longer than `up`'s own deadlines (the control plane, then the rest), so that a start
        # that fails shows what `up` said about it.
        deadline = time.monotonic() + 90
        while not out.wait_for("mesh ready", 0.2) and proc.poll() is None:
            assert time.monotonic() < deadline, out.text()
        assert out.wait_for("mesh ready", 1), out.text()
        started = out.lines[:next(i for i, line in enumerate(out.lines) if "mesh ready" in line)]
        assert [line for line in started if PROBLEM.search(line)] == [], out.text()
        assert any(line.split() == ["SERVICE", "INSTANCE", "APP", "OUTBOUND", "INBOUND", "ADMIN"]
                   for line in started), out.text()
        named = dict(reversed(line.split(maxsplit=1))
                     for line in (state / "pids").read_text().splitlines())
        pids = [int(pid) for pid in named.values()]
        # Every app runs with the interpreter running `up` (the one the script names), not the
        # shim that PATH finds first.
        interpreter = os.path.realpath(f"/proc/{proc.pid}/exe")
        apps = {name: pid for name, pid in named.items() if name.endswith("/app")}
        assert len(apps) == 13, named
        for name, pid in apps.items():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert os.path.realpath(argv[0].decode()) == interpreter, (name, argv, interpreter)
        # ... and answers through its sidecar: the edge takes a delivery.
        r = requests.post("http://127.0.0.1:18000/api/deliveries", timeout=10, json={
            "ownerId": "acct-0001", "pickupLocation": {"lat": 47.6, "lon": -122.3},
            "dropoffLocation": {"lat": 47.7, "lon": -122.2},
            "packageInfo": {"size": "small", "weight": 2}})
        assert r.status_code == 202, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, out.text()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"
    # The stop is quiet too (the control plane once logged a traceback per sidecar whose
    # watch it was writing to as the sidecar went).
    out.finish(10)
    assert [line for line in out.lines if PROBLEM.search(line)] == [], out.text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_app_mesh(tmp_path: Path, port: int, command: str, mtls: str = "DISABLE") -> Path:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(f"""
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {{name: test}}
spec:
  mtls: {{mode: {mtls}}}
  services:
    - name: web
      instances:
        - name: web-0
          app: {{address: 127.0.0.1:{port}, command: {command}}}
""")
    return mesh


def _up(mesh: Path, state: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = _environment(path) if path else None
    return subprocess.run([sys.executable, "-m", "meshproxy", "up", str(mesh), "--state-dir", str(state)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=90)


def _said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("meshproxy up:")]


def test_an_app_that_exits_is_said_once_with_its_log(tmp_path: Path) -> None:
    # `python3` here is the interpreter running `up`: the shim first on PATH would exit 1.
    command = ('[python3, -c, "import sys; print(\'app ran with\', sys.executable); '
               'sys.exit(3)"]')
    mesh = _one_app_mesh(tmp_path, _free_port(), command, mtls="STRICT")
    state = tmp_path / "state"
    done = _up(mesh, state, path=_python3_without_meshproxy(tmp_path / "bin"))
    assert done.returncode == 1, done.stdout + done.stderr
    said = _said(done.stderr)
    assert len(said) == 1, done.stderr
    assert "the mesh did not start: web-0/app exited with code 3;" in said[0], said
    assert f"in {state / 'logs'}" in said[0] and "Fix what it says" in said[0], said
    assert f"app ran with {sys.executable}" in (state / "logs" / "web-0_app.log").read_text()
    # The sidecar started once the control plane answered: until `up` stopped the mesh, it had
    # nothing to complain about (its certificate came at the first try).
    lines = done.stdout.splitlines()
    started = lines[:next(i for i, line in enumerate(lines) if line.startswith("stopping:"))]
    assert not [line for line in started if PROBLEM.search(line)], done.stdout


def test_ports_in_use_are_said_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mesh = _one_app_mesh(tmp_path, port, "[python3, -m, http.server]")
        state = tmp_path / "state"
        done = _up(mesh, state)
    assert done.returncode == 1, done.stdout + done.stderr
    assert _said(done.stderr) == [
        f"meshproxy up: already in use: 127.0.0.1:{port} (web-0's app). Is another "
        f"`meshproxy up` running? Stop it, or change these ports in {mesh}"], done.stderr
    assert not (state / "logs").exists()  # nothing was started
    assert done.stdout == ""


def test_a_command_that_is_not_there_is_said_once(tmp_path: Path) -> None:
    mesh = _one_app_mesh(tmp_path, _free_port(), "[no-such-program-of-meshproxy, --port, '1']")
    done = _up(mesh, tmp_path / "state")
    assert done.returncode == 1, done.stdout + done.stderr
    said = _said(done.stderr)
    assert len(said) == 1, done.stderr
    assert said[0].startswith("meshproxy up: cannot start web-0/app (no-such-program-of-meshproxy "
                              "--port 1): [Errno 2]"), said
    assert said[0].endswith(f"fix its command in {mesh}"), said
