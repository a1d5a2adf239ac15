"""The demo mesh under `meshproxy up`, as soak.py and chaos.py drive it.

`up` is started in its own session and never told where its children are; they are found the
way an operator would find them: the processes whose parent is `up`, named from their command
lines (`meshproxy control`, `meshproxy proxy --instance NAME`) or, for apps, from the
environment `up` gives them (MESHPROXY_INSTANCE, PORT). Each child runs in a session of its
own (`meshproxy/local/supervisor.py`), so stopping `up` with a signal to its group does not
reach them: `stop` asks `up` to stop them (SIGTERM: sidecars drain, then apps, then the
control plane) and kills what is left only after that had its time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import die_with_parent, log_tail, pinned

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[2]
DEMO_MESH = REPO / "config" / "demo" / "mesh.yaml"
READY_LINE = re.compile(r"control plane (http://\S+)/config; mesh ready")
# `up` stops sidecars (they drain for up to 25 s), then apps, then the control plane.
STOP_GRACE = 70.0


class MeshError(RuntimeError):
    """The mesh did not start, or a port it needs is taken."""


@dataclass
class Proc:
    """One child of `up`: `kind` is control, sidecar or app; `name` is what `up` calls it
    (`control`, `INSTANCE/proxy`, `INSTANCE/app`)."""

    name: str
    kind: str
    pid: int
    started: float  # CLOCK_BOOTTIME seconds, from /proc/PID/stat
    service: str = ""
    instance: str = ""
    admin_port: int | None = None  # sidecars
    app_host: str = "127.0.0.1"
    app_port: int | None = None  # apps
    control_url: str | None = None  # the control plane

    def age(self) -> float:
        """Seconds since the process started."""
        return time.clock_gettime(time.CLOCK_BOOTTIME) - self.started


@dataclass
class DemoMesh:
    """`meshproxy up` on a Mesh file, its log, and its children."""

    meshproxy_cmd: list[str]
    workdir: Path
    mesh_file: Path = DEMO_MESH
    cpu: int | None = None
    popen: subprocess.Popen | None = None
    control_url: str = ""
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "up.log"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def start(self, timeout: float) -> None:
        """Start `up` and wait until it prints that the mesh is ready. Raises MeshError when it
        exits first or is not ready within `timeout` seconds (its log tail says why)."""
        argv = pinned([*self.meshproxy_cmd, "up", str(self.mesh_file), "--state-dir",
                       str(self.state_dir)], self.cpu)
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY_LINE.search(self._log_head())
            if match:
                self.control_url = match.group(1)
                return
            if self.popen.poll() is not None:
                raise MeshError(f"`up` exited with code {self.popen.returncode}:\n"
                                + log_tail(self.log_path, 25))
            time.sleep(0.1)
        raise MeshError(f"`up` not ready within {timeout:.0f} s:\n" + log_tail(self.log_path, 25))

    def _log_head(self) -> str:
        # The ready line comes after the children's first lines; 1 MiB is far more than that.
        with open(self.log_path, "rb") as f:
            return f.read(1 << 20).decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def procs(self) -> dict[str, Proc]:
        """Return `up`'s live children by name."""
        found: dict[str, Proc] = {}
        for pid in child_pids(self.pid):
            proc = describe(pid)
            if proc is not None:
                found[proc.name] = proc
        return found

    def stop(self) -> None:
        """SIGTERM `up` and wait for it to stop its children; then SIGKILL any child (and its
        group) still there. Never raises for processes already gone."""
        if self.popen is None:
            return
        children = child_pids(self.pid)
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                children += child_pids(self.pid)
                _kill_group(self.pid)
                self.popen.wait(timeout=5)
        for pid in children:
            _kill_group(pid)

    def restart_lines(self) -> list[str]:
        """`up`'s own lines about children that exited and were restarted."""
        lines = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if line.startswith("meshproxy up: "):
                    lines.append(line.rstrip("\n"))
        return lines


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def child_pids(parent: int) -> list[int]:
    """The pids of the live (not zombie) processes whose parent is `parent`."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent and fields[0] != b"Z":
                pids.append(int(entry.name))
    return pids


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def describe(pid: int) -> Proc | None:
    """Name a child of `up` from /proc, or None when it is gone or not one of its kinds."""
    fields = _stat_fields(pid)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if fields is None or not argv:
        return None
    started = int(fields[19]) / CLOCK_TICKS  # starttime: field 22 of stat, in ticks after boot
    if "meshproxy" in argv and "control" in argv:
        listen = _flag(argv, "--listen") or "127.0.0.1:15010"
        return Proc("control", "control", pid, started, control_url=f"http://{listen}")
    if "meshproxy" in argv and "proxy" in argv:
        instance = _flag(argv, "--instance") or ""
        admin = _flag(argv, "--admin-port")
        return Proc(f"{instance}/proxy", "sidecar", pid, started, service=_flag(argv, "--service") or "",
                    instance=instance, admin_port=int(admin) if admin else None)
    env = _environ(pid)
    instance = env.get("MESHPROXY_INSTANCE")
    if not instance:
        return None
    port = env.get("PORT")
    return Proc(f"{instance}/app", "app", pid, started, service=env.get("MESHPROXY_SERVICE", ""),
                instance=instance, app_host=env.get("HOST", "127.0.0.1"),
                app_port=int(port) if port else None)


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    env = {}
    for item in items:
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def shifted_copy(mesh_file: Path, offset: int, folder: Path) -> Path:
    """Copy the Mesh file and its policy files into `folder` with every port the Mesh file
    fixes (apps' addresses, fixed sidecar ports, the control plane's) moved up by `offset`;
    return the copy. The same mesh then runs beside another copy of it, such as the one a test
    suite starts on the demo's own ports."""
    import yaml

    docs = list(yaml.safe_load_all(mesh_file.read_text()))
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "Mesh":
            continue
        spec = doc.setdefault("spec", {})
        control = spec.get("controlPlane")
        if isinstance(control, dict) and control.get("port"):
            control["port"] = int(control["port"]) + offset
        for service in spec.get("services") or []:
            for instance in service.get("instances") or []:
                app = instance.get("app") or {}
                host, sep, port = str(app.get("address", "")).rpartition(":")
                if sep and port.isdigit():
                    app["address"] = f"{host}:{int(port) + offset}"
                sidecar = instance.get("sidecar")
                if isinstance(sidecar, dict):
                    for key, value in list(sidecar.items()):
                        if isinstance(value, int) and not isinstance(value, bool):
                            sidecar[key] = value + offset
        for policy in spec.get("policies") or []:
            shutil.copy(mesh_file.parent / policy, folder / Path(policy).name)
        spec["policies"] = [Path(p).name for p in spec.get("policies") or []]
    copy = folder / mesh_file.name
    copy.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return copy


def app_exceptions(state_dir: Path) -> dict[str, dict[str, int]]:
    """Unhandled exceptions the apps logged (aiohttp's `Error handling request` followed by a
    traceback), by app log and by the exception's last line: an app answering 500 because of
    its own bug, rather than anything the mesh did."""
    found: dict[str, dict[str, int]] = {}
    for path in sorted((state_dir / "logs").glob("*_app.log")):
        counts: dict[str, int] = {}
        in_traceback = False
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("Traceback (most recent call last)"):
                    in_traceback = True
                elif in_traceback and line.strip() and not line.startswith((" ", "\t")):
                    message = line.strip()[:160]
                    counts[message] = counts.get(message, 0) + 1
                    in_traceback = False
        if counts:
            found[path.name.removesuffix("_app.log")] = counts
    return found
