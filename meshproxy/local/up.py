"""`meshproxy up [MESH_FILE]`: a whole mesh on this machine, each part its own process.

It starts the control plane (`meshproxy control` on the Mesh file, which it watches: edit the
file or its policies and every sidecar follows) and waits until it answers `/ready`; only then
for every meshed instance a sidecar (`meshproxy proxy --control URL`) and the instance's command
(when the file gives one), so that no sidecar starts by failing to reach it. Sidecar ports come
from the file or are picked free; each sidecar tells the control plane its inbound port when it
starts watching, and the control plane tells the others. `up` waits until every part is ready,
prints the table, restarts a child that dies (with backoff), and on Ctrl-C or SIGTERM drains the
sidecars, stops the apps and then the control plane. A start that fails says which part, how,
and where its output is, once.

An instance's command whose first word is `python3` or `python` runs with the interpreter that
runs `up` (app_argv): the apps then import the same installation as `up` (a virtual
environment run by path and not activated, pipx), whichever `python3` comes first on PATH.

Unless the Mesh disables mTLS, `up` makes the mesh's CA and one bootstrap token per Service in
its state directory (files 0600, folders 0700): each sidecar proves its Service's identity with
its token and gets a short-lived certificate from the control plane, and sidecars speak mTLS
to each other, STRICT unless a PeerAuthentication says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from meshproxy.config import ConfigError, load_config
from meshproxy.config.model.mesh import join_host_port
from meshproxy.local.bundled import bundled_file
from meshproxy.local.ports import free_port, port_is_open
from meshproxy.local.supervisor import Child, Supervisor

READY_TIMEOUT = 30.0  # for the control plane, then again for the sidecars and apps
STOP_TIMEOUT = 30.0  # sidecars drain for up to 25 s (spec §3)
RESTART_BACKOFF = (1.0, 30.0)  # first delay, longest delay; doubles after each quick death
STABLE_AFTER = 30.0  # a child that ran this long starts its backoff afresh


@dataclass
class PlannedInstance:
    """One meshed instance with every port decided."""

    service: str
    namespace: str
    name: str
    app_host: str
    app_port: int
    command: tuple[str, ...] | None
    outbound: int
    inbound: int
    admin: int
    health: int
    meshed: bool = True


# First words of a command that mean "the interpreter running `up`" (see app_argv).
PYTHON_NAMES = frozenset({"python3", "python"})


def default_mesh_file() -> Path | None:
    """The bundled demo, or the example mesh while the demo is not there (local/bundled.py:
    the source tree's config/, or a built package's copy); None when there is neither."""
    return bundled_file("demo", "mesh.yaml") or bundled_file("examples", "mesh.yaml")


def app_argv(command: tuple[str, ...]) -> list[str]:
    """The argv `up` runs for an instance's `command`.

    A first word `python3` or `python` becomes the interpreter running `up` (sys.executable):
    run by path from a virtual environment that is not activated, or installed with pipx, `up`
    would otherwise start the apps with whichever python3 PATH finds first, which may not have
    the packages the apps import (the demo's `-m meshproxy.demo`). Any other word, a path to an
    interpreter included, is run as written (found on PATH).
    """
    argv = list(command)
    if argv and argv[0] in PYTHON_NAMES and sys.executable:
        argv[0] = sys.executable
    return argv


def plan(snapshot) -> list[PlannedInstance]:
    """Decide every sidecar port: fixed ones from the file, free ones for the rest."""
    taken: set[int] = set()
    for service in snapshot.services.values():
        for instance in service.instances:
            taken.add(instance.app_port)
            ports = instance.sidecar_ports
            taken.update(p for p in (ports.outbound, ports.inbound, ports.admin, ports.health) if p)
    planned = []
    for service in snapshot.services.values():
        for instance in service.instances:
            if not instance.meshed:
                if instance.command:  # an unmeshed app `up` still starts, without a sidecar
                    planned.append(PlannedInstance(
                        service=service.name, namespace=service.namespace, name=instance.name,
                        app_host=instance.app_host, app_port=instance.app_port,
                        command=instance.command, outbound=0, inbound=0, admin=0, health=0,
                        meshed=False,
                    ))
                continue
            ports = instance.sidecar_ports
            planned.append(PlannedInstance(
                service=service.name, namespace=service.namespace, name=instance.name,
                app_host=instance.app_host, app_port=instance.app_port, command=instance.command,
                outbound=ports.outbound or free_port(taken),
                inbound=ports.inbound or free_port(taken),
                admin=ports.admin or free_port(taken),
                health=ports.health or free_port(taken),
            ))
    return planned


def control_address(snapshot, taken: set[int]) -> tuple[str, int]:
    """Where the control plane listens: the Mesh's controlPlane address when it is free, else a
    free loopback port (another mesh may be running on this machine)."""
    cp = snapshot.mesh.control_plane
    if not port_is_open(cp.host, cp.port) and cp.port not in taken:
        taken.add(cp.port)
        return cp.host, cp.port
    return "127.0.0.1", free_port(taken)


def write_sidecar_ports(state_dir: Path, planned: list[PlannedInstance]) -> Path:
    """The sidecars' inbound ports, for the control plane's --sidecar-ports: a control plane
    that `up` restarts knows them from its first snapshot, before the sidecars register."""
    path = state_dir / "sidecar-ports.json"
    path.write_text(json.dumps([
        {"namespace": p.namespace, "service": p.service, "instance": p.name, "inbound": p.inbound}
        for p in planned if p.meshed], indent=1) + "\n")
    return path


def control_child(mesh_file: Path, host: str, port: int, identity: Path | None,
                  sidecar_ports: Path | None = None) -> Child:
    argv = [sys.executable, "-m", "meshproxy", "control", "--config", str(mesh_file),
            "--listen", f"{host}:{port}"]
    if sidecar_ports is not None:
        argv += ["--sidecar-ports", str(sidecar_ports)]
    if identity is not None:
        argv += ["--ca-dir", str(identity / "ca"), "--tokens-dir", str(identity / "tokens")]
    return Child(name="control", argv=argv)


def make_identities(state_dir: Path, trust_domain: str, planned: list[PlannedInstance]) -> Path:
    """Make the mesh's CA and one bootstrap token per meshed Service (files 0600 in folders
    0700 under the state directory); return the folder."""
    from meshproxy.identity.ca import init_ca
    from meshproxy.identity.tokens import BootstrapTokens

    folder = state_dir / "identity"
    folder.mkdir(mode=0o700, exist_ok=True)
    if not (folder / "ca" / "issuer.crt").exists():
        init_ca(folder / "ca", trust_domain)
    tokens = BootstrapTokens(folder / "tokens", trust_domain)
    for p in planned:
        if p.meshed and not tokens.path(p.namespace, p.service).exists():
            tokens.issue(p.namespace, p.service)
    return folder


def sidecar_child(p: PlannedInstance, control_url: str, identity: Path | None = None) -> Child:
    argv = [
        sys.executable, "-m", "meshproxy", "proxy", "--control", control_url,
        "--service", p.service, "--namespace", p.namespace, "--instance", p.name,
        "--outbound-port", str(p.outbound), "--inbound-port", str(p.inbound),
        "--admin-port", str(p.admin), "--health-port", str(p.health),
        "--app-host", p.app_host, "--app-port", str(p.app_port),
        "--inbound-bind", "127.0.0.1",
    ]
    if identity is not None:
        # spec §3: `meshproxy up` runs STRICT unless the files say otherwise.
        argv += ["--token-file", str(identity / "tokens" / f"{p.namespace}.{p.service}.token"),
                 "--default-mtls-mode", "STRICT"]
    return Child(name=f"{p.name}/proxy", argv=argv)


def app_child(p: PlannedInstance, mesh_dir: Path, state_dir: Path) -> Child:
    # The app learns where its sidecar is the way a meshed app in Kubernetes would not need
    # to (iptables); outside Kubernetes HTTP_PROXY sends its calls through the sidecar.
    env = {"PORT": str(p.app_port), "HOST": p.app_host, "MESHPROXY_SERVICE": p.service,
           "MESHPROXY_INSTANCE": p.name,
           # A folder the mesh's apps share for their data (the demo keeps its stores there).
           "MESHPROXY_APP_DATA": str(state_dir / "data")}
    if p.meshed:
        outbound = f"http://127.0.0.1:{p.outbound}"
        env.update({"MESHPROXY_OUTBOUND": outbound, "HTTP_PROXY": outbound,
                    "http_proxy": outbound, "NO_PROXY": "", "no_proxy": ""})
    return Child(name=f"{p.name}/app", argv=app_argv(p.command), env=env, cwd=str(mesh_dir))


def table(planned: list[PlannedInstance]) -> str:
    """The table `up` prints once everything is ready."""
    rows = [("SERVICE", "INSTANCE", "APP", "OUTBOUND", "INBOUND", "ADMIN")]
    for p in planned:
        if p.meshed:
            sidecar = (f"127.0.0.1:{p.outbound}", f"127.0.0.1:{p.inbound}",
                       f"http://127.0.0.1:{p.admin}/")
        else:
            sidecar = ("-", "- (not meshed)", "-")
        rows.append((f"{p.service}.{p.namespace}", p.name, f"{p.app_host}:{p.app_port}", *sidecar))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _http_ok(url: str) -> bool:
    import urllib.request

    # No proxy: the polls go to 127.0.0.1, and an HTTP_PROXY in the user's shell (urllib
    # follows it unless NO_PROXY says otherwise) must not send them elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _exited(children: list[Child]) -> list[Child]:
    """The children among `children` whose process has ended."""
    return [c for c in children if c.process is not None and c.process.returncode is not None]


async def wait_control(control: Child, control_url: str) -> str | None:
    """Poll the control plane's /ready (200 once it listens with a valid configuration) until
    it answers, it exits, or READY_TIMEOUT passes; return None when ready, else what went wrong
    (one line, saying where its output is)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if _exited([control]):
            return (f"the control plane exited with code {control.process.returncode} before it was "
                    f"ready; its output is above and in {control.log_path}")
        if await asyncio.to_thread(_http_ok, f"{control_url}/ready"):
            return None
        await asyncio.sleep(0.05)
    return (f"the control plane did not answer {control_url}/ready within {READY_TIMEOUT:.0f}s; "
            f"its output is above and in {control.log_path}")


async def wait_ready(planned: list[PlannedInstance], supervisor: Supervisor) -> list[str]:
    """Poll every sidecar's /ready and every started app's port until all answer, a child
    exits, or READY_TIMEOUT passes; return the instances still not ready (empty when all are)."""
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = {p.name: p for p in planned}
    while waiting and time.monotonic() < deadline:
        if _exited(supervisor.children):
            break
        for name, p in list(waiting.items()):
            if not p.meshed:
                ready = port_is_open(p.app_host, p.app_port)
            else:
                ready = (p.command is None or port_is_open(p.app_host, p.app_port)) and \
                    await asyncio.to_thread(_http_ok, f"http://127.0.0.1:{p.admin}/ready")
            if ready:
                del waiting[name]
        if waiting:
            await asyncio.sleep(0.1)
    return sorted(waiting)


def ports_in_use(planned: list[PlannedInstance]) -> list[str]:
    """The ports `up` is about to listen on (through the apps it starts and the sidecars) that
    something already listens on, each as "HOST:PORT (WHAT)". An app `up` does not start is
    expected to listen already, so its port is not checked."""
    busy = []
    for p in planned:
        if p.command and port_is_open(p.app_host, p.app_port):
            busy.append(f"{join_host_port(p.app_host, p.app_port)} ({p.name}'s app)")
        if p.meshed:
            for what, port in (("outbound", p.outbound), ("inbound", p.inbound),
                               ("admin", p.admin), ("health", p.health)):
                if port_is_open("127.0.0.1", port):
                    busy.append(f"127.0.0.1:{port} ({p.name}'s sidecar {what})")
    return busy


def start_failure(supervisor: Supervisor, not_ready: list[str], log_dir: Path) -> str:
    """One message for a start that failed: the children that exited (with their codes) or,
    when none did, the instances not ready in time; where their output is, and what to do."""
    exited = _exited(supervisor.children)
    if exited:
        codes = ", ".join(f"{c.name} exited with code {c.process.returncode}" for c in exited)
        return (f"the mesh did not start: {codes}; the output is above and in {log_dir}. Fix "
                f"what it says and run `meshproxy up` again")
    return (f"the mesh did not start: not ready within {READY_TIMEOUT:.0f}s: {', '.join(not_ready)}; "
            f"their output is above and in {log_dir}. An app must listen on its address; a "
            f"sidecar must get its configuration and certificate from the control plane")


def edge_urls(snapshot, planned: list[PlannedInstance]) -> list[str]:
    """The URLs a user calls the mesh at: the sidecars of Services whose inbound accepts
    plaintext (PERMISSIVE or DISABLE), like the demo's `ingestion`."""
    urls = []
    for p in planned:
        key = f"{p.service}.{p.namespace}"
        if p.meshed and snapshot.mtls_mode_for(key, "STRICT") != "STRICT":
            urls.append(f"{key}: http://127.0.0.1:{p.inbound}/")
    return urls


class _Restarts:
    """Restarts children that die, waiting longer after each quick death."""

    def __init__(self, supervisor: Supervisor, out, on_restart: Callable[[], None] = lambda: None) -> None:
        """`on_restart`: called after each restart (`up` rewrites its pids file)."""
        self.supervisor = supervisor
        self.out = out
        self.on_restart = on_restart
        self.delay: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()

    def started_now(self, child: Child) -> None:
        self.started[child.name] = time.monotonic()

    def schedule(self, child: Child) -> float:
        first, longest = RESTART_BACKOFF
        ran = time.monotonic() - self.started.get(child.name, 0.0)
        delay = first if ran >= STABLE_AFTER else min(longest, self.delay.get(child.name, first / 2) * 2)
        self.delay[child.name] = delay
        task = asyncio.ensure_future(self._restart(child, delay))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return delay

    async def _restart(self, child: Child, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.supervisor.start(child)
        except OSError as exc:
            print(f"meshproxy up: cannot restart {child.name}: {exc}", file=self.out, flush=True)
            return
        self.started_now(child)
        self.on_restart()
        print(f"meshproxy up: restarted {child.name} (pid {child.pid})", file=self.out, flush=True)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


def _write_pids(state_dir: Path, supervisor: Supervisor) -> None:
    (state_dir / "pids").write_text("".join(f"{c.pid} {c.name}\n" for c in supervisor.children))


async def run_mesh(mesh_file: Path, state_dir: Path, out=sys.stdout) -> int:
    """Start the mesh, print its table, run until SIGINT/SIGTERM, stop everything; exit code."""
    try:
        snapshot = load_config([str(mesh_file)])
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if snapshot.mesh is None:
        print(f"{mesh_file}: no Mesh document in this file", file=sys.stderr)
        return 1
    planned = plan(snapshot)
    busy = ports_in_use(planned)
    if busy:
        # Said before anything starts: each app and sidecar would otherwise fail on its own.
        print(f"meshproxy up: already in use: {', '.join(busy)}. Is another `meshproxy up` "
              f"running? Stop it, or change these ports in {mesh_file}", file=sys.stderr)
        return 1
    taken = {p for q in planned for p in (q.app_port, q.outbound, q.inbound, q.admin, q.health) if p}
    control_host, control_port = control_address(snapshot, taken)
    control_url = f"http://{control_host}:{control_port}"
    mtls_mode = snapshot.mesh.mtls_mode or "STRICT"  # spec §3: `up` defaults to STRICT
    identity = None
    if mtls_mode != "DISABLE":
        identity = make_identities(state_dir, snapshot.trust_domain, planned)
    supervisor = Supervisor(state_dir / "logs", out=out)
    restarts = _Restarts(supervisor, out, lambda: _write_pids(state_dir, supervisor))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    control = control_child(mesh_file, control_host, control_port, identity,
                            write_sidecar_ports(state_dir, planned))
    sidecars = [sidecar_child(p, control_url, identity) for p in planned if p.meshed]
    apps = [app_child(p, mesh_file.parent, state_dir) for p in planned if p.command]
    try:
        # The control plane first, and the rest once it answers: a sidecar started earlier
        # would find nothing listening, log it, and retry its watch and its certificate.
        await supervisor.start(control)
        _write_pids(state_dir, supervisor)
        problem = await wait_control(control, control_url)
        if problem:
            print(f"meshproxy up: {problem}", file=sys.stderr, flush=True)
            return 1
        for child in [*sidecars, *apps]:
            try:
                await supervisor.start(child)
            except OSError as exc:  # the program is not there, or may not be run
                print(f"meshproxy up: cannot start {child.name} ({' '.join(child.argv)}): {exc}; "
                      f"fix its command in {mesh_file}", file=sys.stderr, flush=True)
                return 1
        for child in supervisor.children:
            restarts.started_now(child)
        _write_pids(state_dir, supervisor)
        not_ready = await wait_ready(planned, supervisor)
        if not_ready or _exited(supervisor.children):
            print(f"meshproxy up: {start_failure(supervisor, not_ready, state_dir / 'logs')}",
                  file=sys.stderr, flush=True)
            return 1
        print(table(planned), file=out)
        for url in edge_urls(snapshot, planned):
            print(f"edge  {url}", file=out)
        print(f"control plane {control_url}/config; mesh ready ({len(planned)} instances); state and "
              f"logs in {state_dir}; Ctrl-C stops it", file=out, flush=True)
        exited = asyncio.ensure_future(supervisor.exited.get())
        stopped = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                exited.cancel()
                break
            child = exited.result()
            delay = restarts.schedule(child)
            print(f"meshproxy up: {child.name} exited with code {child.process.returncode}; "
                  f"restarting in {delay:.0f}s; see {child.log_path}", file=out, flush=True)
            exited = asyncio.ensure_future(supervisor.exited.get())
            _write_pids(state_dir, supervisor)
    finally:
        restarts.cancel()
        print("stopping: draining sidecars, then apps, then the control plane", file=out, flush=True)
        await supervisor.stop(sidecars, STOP_TIMEOUT)
        await supervisor.stop(apps, 10.0)
        await supervisor.stop([control], 10.0)
        print("stopped", file=out, flush=True)
    return 0


def run_up(args) -> int:
    """Entry point of `meshproxy up` (parsed arguments from meshproxy.cli)."""
    mesh_file = Path(args.mesh_file) if args.mesh_file else default_mesh_file()
    if mesh_file is None:
        # Neither the source tree's config/ nor a built package's copy of it (a package built
        # by something other than setup.py's build_py).
        print("meshproxy up: this installation has no bundled mesh: give MESH_FILE (the demo is "
              "config/demo/mesh.yaml in the source tree)", file=sys.stderr)
        return 1
    if not mesh_file.exists():
        print(f"meshproxy up: {mesh_file}: no such file", file=sys.stderr)
        return 1
    if args.state_dir:
        state_dir = Path(args.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
    else:
        state_dir = Path(tempfile.mkdtemp(prefix="meshproxy-up-"))
    os.chmod(state_dir, 0o700)
    return asyncio.run(run_mesh(mesh_file.resolve(), state_dir))
