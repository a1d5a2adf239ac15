"""`meshproxy up [MESH_FILE]`: a whole mesh on this machine, each part its own process.

It starts the control plane (`meshproxy control` on the Mesh file, which it watches: edit the
file or its policies and every sidecar follows), then for every meshed instance a sidecar
(`meshproxy proxy --control URL`) and the instance's command (when the file gives one). Sidecar
ports come from the file or are picked free; each sidecar tells the control plane its inbound
port when it starts watching, and the control plane tells the others. `up` waits until every
part is ready, prints the table, restarts a child that dies (with backoff), and on Ctrl-C or
SIGTERM drains the sidecars, stops the apps and then the control plane.

Unless the Mesh disables mTLS, `up` makes the mesh's CA and one bootstrap token per Service in
its state directory (files 0600, folders 0700): each sidecar proves its Service's identity with
its token and gets a short-lived certificate from the control plane, and sidecars speak mTLS
to each other, STRICT unless a PeerAuthentication says otherwise.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


from meshproxy.config import ConfigError, load_config
from meshproxy.local.ports import free_port, port_is_open
from meshproxy.local.supervisor import Child, Supervisor

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"
READY_TIMEOUT = 30.0
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


def default_mesh_file() -> Path:
    """The bundled demo, or the example mesh while the demo is not there."""
    for candidate in (REPO_CONFIG / "demo" / "mesh.yaml", REPO_CONFIG / "examples" / "mesh.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("no bundled mesh file found; give MESH_FILE")


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


def control_child(mesh_file: Path, host: str, port: int, identity: Path | None) -> Child:
    argv = [sys.executable, "-m", "meshproxy", "control", "--config", str(mesh_file),
            "--listen", f"{host}:{port}"]
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
    return Child(name=f"{p.name}/app", argv=list(p.command), env=env, cwd=str(mesh_dir))


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

    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


async def wait_ready(planned: list[PlannedInstance], supervisor: Supervisor, control_url: str) -> list[str]:
    """Poll the control plane's and every sidecar's /ready and every started app's port;
    return what is still not ready at the deadline (empty when all are)."""
    deadline = time.monotonic() + READY_TIMEOUT
    waiting: dict[str, PlannedInstance | None] = {"control": None, **{p.name: p for p in planned}}
    while waiting and time.monotonic() < deadline:
        if not supervisor.exited.empty():
            break
        for name, p in list(waiting.items()):
            if p is None:
                ready = await asyncio.to_thread(_http_ok, f"{control_url}/ready")
            elif not p.meshed:
                ready = port_is_open(p.app_host, p.app_port)
            else:
                ready = (p.command is None or port_is_open(p.app_host, p.app_port)) and \
                    await asyncio.to_thread(_http_ok, f"http://127.0.0.1:{p.admin}/ready")
            if ready:
                del waiting[name]
        if waiting:
            await asyncio.sleep(0.1)
    return sorted(waiting)


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

    def __init__(self, supervisor: Supervisor, out) -> None:
        self.supervisor = supervisor
        self.out = out
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
    taken = {p for q in planned for p in (q.app_port, q.outbound, q.inbound, q.admin, q.health) if p}
    control_host, control_port = control_address(snapshot, taken)
    control_url = f"http://{control_host}:{control_port}"
    mtls_mode = snapshot.mesh.mtls_mode or "STRICT"  # spec §3: `up` defaults to STRICT
    identity = None
    if mtls_mode != "DISABLE":
        identity = make_identities(state_dir, snapshot.trust_domain, planned)
    supervisor = Supervisor(state_dir / "logs", out=out)
    restarts = _Restarts(supervisor, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    control = control_child(mesh_file, control_host, control_port, identity)
    sidecars: list[Child] = []
    apps: list[Child] = []
    try:
        await supervisor.start(control)
        for p in planned:
            if p.meshed:
                sidecars.append(sidecar_child(p, control_url, identity))
            if p.command:
                apps.append(app_child(p, mesh_file.parent, state_dir))
        for child in [*sidecars, *apps]:
            await supervisor.start(child)
        for child in supervisor.children:
            restarts.started_now(child)
        _write_pids(state_dir, supervisor)
        not_ready = await wait_ready(planned, supervisor, control_url)
        if not_ready or not supervisor.exited.empty():
            print(f"meshproxy up: not ready: {', '.join(not_ready) or 'a process exited'}; "
                  f"logs in {state_dir / 'logs'}", file=sys.stderr)
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
