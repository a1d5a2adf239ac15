"""Running `meshproxy proxy` as a process: its entry point (arguments to settings), where its
configuration and certificates come from (files, or the control plane and its CA), signals,
and the drain before exit. The proxy itself is dataplane/server.py."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from meshproxy.appprobes import parse_app_probes
from meshproxy.config import Snapshot
from meshproxy.dataplane.control_client import ControlClient, watch_target
from meshproxy.dataplane.redirected import parse_pod_ips
from meshproxy.dataplane.server import Proxy, ProxySettings
from meshproxy.observability.trace import tracing_from_env
from meshproxy.policy.detect import opaque_ports

log = logging.getLogger("meshproxy.proxy")


async def _follow_files(proxy: Proxy, watcher) -> None:
    """Standalone mode: every change of the files becomes a new snapshot, or is refused."""
    async for result in watcher.changes():
        if result.errors:
            proxy.refuse([str(e) for e in result.errors])
        else:
            proxy.apply(Snapshot(result.resources, warnings=result.warnings, files=result.files))


async def _both(*tasks: asyncio.Future) -> None:
    """Run `tasks` until one fails or this is cancelled (then cancel them all)."""
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _follow_identity(proxy: Proxy, control_url: str, token_file: str) -> None:
    """Get this proxy's certificate from the control plane's CA and renew it at 70% of its
    lifetime; `proxy.rotate` puts each in force. The token is read anew for every request (a
    projected ServiceAccount token is rotated by the kubelet)."""
    from meshproxy.identity.client import CertificateManager

    def token() -> str:
        with open(token_file, encoding="utf-8") as f:
            return f.read().strip()

    # In a pod, the certificate must name the pod's own namespace and ServiceAccount: a token
    # of another account mounted by mistake would otherwise make this proxy speak as it.
    account = proxy.settings.service_account
    proxy.certificates = CertificateManager(
        control_url, token, rng=proxy.rng, on_rotate=proxy.rotate,
        expected_namespace=proxy.settings.namespace if account else None,
        expected_service_account=account)
    await proxy.certificates.run()


async def serve(settings: ProxySettings, snapshot: Snapshot | None, *, control_url: str | None = None,
                watcher=None) -> int:
    """Run the proxy until SIGTERM/SIGINT or POST /drain has drained it; return 0.

    With `control_url` the configuration comes from the control plane (`snapshot` is None);
    with `watcher` (standalone) from the files it watches."""
    loop = asyncio.get_running_loop()
    proxy = Proxy(settings, snapshot, loop, tracing_from_env(settings.service_key, settings.instance))
    await proxy.start()
    follower: asyncio.Task | None = None
    if control_url is not None:
        proxy.control = ControlClient(
            control_url, service=settings.service or "unknown", namespace=settings.namespace,
            instance=settings.instance, inbound_port=settings.inbound_port,
            admin=f"127.0.0.1:{settings.admin_port}", on_snapshot=proxy.apply,
            on_refused=proxy.refuse, rng=proxy.rng,
        )
        follower = asyncio.ensure_future(proxy.control.run())
        if settings.token_file:
            identity = asyncio.ensure_future(_follow_identity(proxy, control_url, settings.token_file))
            follower = asyncio.ensure_future(_both(follower, identity))
    elif watcher is not None:
        follower = asyncio.ensure_future(_follow_files(proxy, watcher))
    # Everything made at start-up (modules, configuration) lives as long as the process:
    # keep it out of the collector's scans, and collect young objects less often. Requests
    # allocate many short-lived objects that reference counting frees; collecting them every
    # 700 allocations cost about 8% of the CPU per request (measured with benchmarks/run.py).
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(proxy.drain()))
    from meshproxy.build_info import version_line  # the build in force (compiled or not)

    log.info("%s", version_line())
    log.info(
        "meshproxy proxy %s listening: outbound 127.0.0.1:%d inbound %s:%d admin 127.0.0.1:%d "
        "health :%d (%s)", settings.service_key, settings.outbound_port,
        settings.inbound_bind, settings.inbound_port, settings.admin_port, settings.health_port,
        f"config {snapshot.version}" if snapshot is not None else f"control plane {control_url}",
    )
    await proxy.stopped
    if follower is not None:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    await proxy.close()
    log.info("drained; exiting")
    return 0


def run_proxy(args) -> int:
    """Entry point of `meshproxy proxy` (parsed arguments from meshproxy.cli)."""
    from meshproxy.config.watch import ConfigWatcher

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # we log what a change did instead
    if args.control and args.config:
        print("meshproxy proxy: give either --control URL or --config PATH..., not both", file=sys.stderr)
        return 2
    if not args.control and not args.config:
        print("meshproxy proxy: give --control URL (control plane) or --config PATH... (standalone)",
              file=sys.stderr)
        return 2
    snapshot, watcher = None, None
    if args.config:
        watcher = ConfigWatcher(args.config)
        result = watcher.load()
        if result.errors:
            for error in result.errors:
                print(error, file=sys.stderr)
            return 1
        snapshot = Snapshot(result.resources, warnings=result.warnings, files=result.files)
    else:
        try:
            watch_target(args.control, {})
        except ValueError as exc:
            print(f"meshproxy proxy: --control: {exc}", file=sys.stderr)
            return 2
    settings = ProxySettings(
        service=args.service, namespace=args.namespace, instance=args.instance,
        config_paths=list(args.config or []), outbound_bind=args.outbound_bind,
        outbound_port=args.outbound_port, inbound_bind=args.inbound_bind,
        inbound_port=args.inbound_port, admin_port=args.admin_port,
        health_port=args.health_port, app_host=args.app_host, app_port=args.app_port,
        drain_timeout=args.drain_timeout, header_timeout=args.header_timeout,
        client_idle_timeout=args.client_idle_timeout,
        token_file=args.token_file, default_mtls_mode=args.default_mtls_mode,
        service_account=getattr(args, "service_account", None),
        access_log=getattr(args, "access_log", None),
    )
    try:
        settings.pod_ips = parse_pod_ips(getattr(args, "pod_ips", None))
    except ValueError as exc:
        print(f"meshproxy proxy: --pod-ips: {exc}", file=sys.stderr)
        return 2
    try:
        settings.app_probes = parse_app_probes(args.app_probes)
    except ValueError as exc:
        print(f"meshproxy proxy: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "transparent", False):
        try:
            settings.opaque_ports = opaque_ports(args.opaque_ports)
        except ValueError as exc:
            print(f"meshproxy proxy: --opaque-ports: {exc}", file=sys.stderr)
            return 2
        settings.transparent = True
        settings.detect_timeout = args.detect_timeout
    if settings.access_log and settings.access_log != "-":
        try:
            open(settings.access_log, "ab").close()
        except OSError as exc:
            print(f"meshproxy proxy: --access-log: {exc}", file=sys.stderr)
            return 2
    if settings.token_file and not args.control:
        print("meshproxy proxy: --token-file needs --control (the CA is the control plane's)",
              file=sys.stderr)
        return 2
    main = serve(settings, snapshot, control_url=args.control, watcher=watcher)
    if not args.no_uvloop:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
