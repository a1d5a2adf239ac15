"""`meshproxy up [MESH_FILE]`: a whole mesh on this machine, each part its own process.

This first version starts, for every meshed instance of the Mesh file, the instance's command
(when the file gives one) and a standalone sidecar (`meshproxy proxy --config`) in front of it.
Sidecars find each other through a copy of the Mesh file written to the state directory with
every sidecar port filled in. The control plane and mTLS come later; until then sidecars speak
plaintext whatever the file says about mTLS, and `up` says so.
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

import yaml

from meshproxy.config import ConfigError, load_config
from meshproxy.local.ports import free_port, port_is_open
from meshproxy.local.supervisor import Child, Supervisor

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0  # sidecars drain for up to 25 s (spec §3)


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


def write_resolved_mesh(mesh_file: Path, planned: list[PlannedInstance], state_dir: Path) -> Path:
    """Copy the Mesh file with every sidecar port filled in and policy paths made absolute."""
    by_name = {(p.namespace, p.service, p.name): p for p in planned if p.meshed}
    documents = list(yaml.safe_load_all(mesh_file.read_text()))
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") != "Mesh":
            continue
        spec = doc.setdefault("spec", {})
        spec["policies"] = [str((mesh_file.parent / p).resolve()) for p in spec.get("policies", [])]
        for service in spec.get("services", []):
            namespace = service.get("namespace", "default")
            for instance in service.get("instances", []) or []:
                p = by_name.get((namespace, service["name"], instance["name"]))
                if p is not None:
                    instance["sidecar"] = {"outbound": p.outbound, "inbound": p.inbound,
                                           "admin": p.admin, "health": p.health}
    resolved = state_dir / "mesh.resolved.yaml"
    resolved.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return resolved


def sidecar_child(p: PlannedInstance, resolved: Path) -> Child:
    argv = [
        sys.executable, "-m", "meshproxy", "proxy", "--config", str(resolved),
        "--service", p.service, "--namespace", p.namespace, "--instance", p.name,
        "--outbound-port", str(p.outbound), "--inbound-port", str(p.inbound),
        "--admin-port", str(p.admin), "--health-port", str(p.health),
        "--inbound-bind", "127.0.0.1",
    ]
    return Child(name=f"{p.name}/proxy", argv=argv)


def app_child(p: PlannedInstance, mesh_dir: Path) -> Child:
    # The app learns where its sidecar is the way a meshed app in Kubernetes would not need
    # to (iptables); outside Kubernetes HTTP_PROXY sends its calls through the sidecar.
    env = {"PORT": str(p.app_port), "HOST": p.app_host, "MESHPROXY_SERVICE": p.service,
           "MESHPROXY_INSTANCE": p.name}
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


async def wait_ready(planned: list[PlannedInstance], supervisor: Supervisor) -> list[str]:
    """Poll every sidecar's /ready and every started app's port; return what is not ready."""
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT
    waiting = {p.name: p for p in planned}
    while waiting and time.monotonic() < deadline:
        if not supervisor.exited.empty():
            break
        for name, p in list(waiting.items()):
            if not p.meshed:
                if port_is_open(p.app_host, p.app_port):
                    del waiting[name]
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/ready", timeout=0.5) as r:
                    sidecar_ready = r.status == 200
            except OSError:
                sidecar_ready = False
            app_ready = p.command is None or port_is_open(p.app_host, p.app_port)
            if sidecar_ready and app_ready:
                del waiting[name]
        if waiting:
            await asyncio.sleep(0.1)
    return sorted(waiting)


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
    resolved = write_resolved_mesh(mesh_file, planned, state_dir)
    mtls_mode = snapshot.mesh.mtls_mode or "STRICT"  # spec §3: `up` defaults to STRICT
    if mtls_mode != "DISABLE":
        print(f"warning: the Mesh asks for mTLS ({mtls_mode}); this version's sidecars speak "
              "plaintext to each other", file=out)
    supervisor = Supervisor(state_dir / "logs", out=out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    sidecars: list[Child] = []
    apps: list[Child] = []
    code = 0
    try:
        for p in planned:
            if p.meshed:
                child = sidecar_child(p, resolved)
                await supervisor.start(child)
                sidecars.append(child)
            if p.command:
                child = app_child(p, mesh_file.parent)
                await supervisor.start(child)
                apps.append(child)
        (state_dir / "pids").write_text(
            "".join(f"{c.pid} {c.name}\n" for c in supervisor.children)
        )
        not_ready = await wait_ready(planned, supervisor)
        if not_ready or not supervisor.exited.empty():
            print(f"meshproxy up: not ready: {', '.join(not_ready) or 'a process exited'}; "
                  f"logs in {state_dir / 'logs'}", file=sys.stderr)
            return 1
        print(table(planned), file=out)
        print(f"mesh ready ({len(planned)} instances); state and logs in {state_dir}; "
              "Ctrl-C stops it", file=out, flush=True)
        exited = asyncio.ensure_future(supervisor.exited.get())
        stopped = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                exited.cancel()
                break
            child = exited.result()
            print(f"meshproxy up: {child.name} exited with code {child.process.returncode}; "
                  f"see {child.log_path}", file=out, flush=True)
            exited = asyncio.ensure_future(supervisor.exited.get())
    finally:
        print("stopping: draining sidecars, then apps", file=out, flush=True)
        await supervisor.stop(sidecars, STOP_TIMEOUT)
        await supervisor.stop(apps, 10.0)
        print("stopped", file=out, flush=True)
    return code


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
