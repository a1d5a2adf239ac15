"""`meshproxy proxy`: wires configuration, listeners, admin servers, signals and drain together."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass, field

from meshproxy.admin import start_servers
from meshproxy.appprobes import parse_app_probes
from meshproxy.config import Snapshot
from meshproxy.dataplane.control_client import ControlClient, watch_target
from meshproxy.dataplane.tls import Contexts, TLSState
from meshproxy.policy.authz import Authorizer
from meshproxy.dataplane.destinations import (
    IDLE_TO_APP,
    Destinations,
    EndpointRuntime,
    InboundResolver,
    OutboundResolver,
    ServiceRuntime,
)
from meshproxy.dataplane.listener import CLIENT_IDLE_TIMEOUT, HEADER_TIMEOUT, Listener
from meshproxy.dataplane.upstream import ConnectionPool
from meshproxy.observability.accesslog import AccessLog
from meshproxy.observability.metrics import ProxyMetrics
from meshproxy.observability.trace import Tracing, tracing_from_env
from meshproxy.policy.balancer import EndpointLoad, make_balancer
from meshproxy.policy.detect import DEFAULT_OPAQUE_PORTS, DETECT_TIMEOUT, opaque_ports

log = logging.getLogger("meshproxy.proxy")


@dataclass
class ProxySettings:
    """Everything `meshproxy proxy` was told on its command line (spec §1, §2)."""

    service: str | None
    namespace: str = "default"
    instance: str | None = None
    config_paths: list[str] = field(default_factory=list)
    outbound_bind: str = "127.0.0.1"
    outbound_port: int = 15001
    inbound_bind: str = "0.0.0.0"
    inbound_port: int = 15006
    admin_port: int = 15000
    health_port: int = 15021
    app_host: str = "127.0.0.1"
    app_port: int | None = None
    drain_timeout: float = 25.0
    header_timeout: float = HEADER_TIMEOUT
    client_idle_timeout: float = CLIENT_IDLE_TIMEOUT
    # Identity (control-plane mode): the credential the CA checks; without one, plaintext.
    token_file: str | None = None
    # The inbound mTLS mode when neither a PeerAuthentication nor the Mesh says (spec §3).
    default_mtls_mode: str = "PERMISSIVE"
    # The app's own HTTP probes, answered on the health port (appprobes.py; from injection).
    app_probes: dict = field(default_factory=dict)
    # Transparent mode (iptables redirects, SO_ORIGINAL_DST, protocol detection; spec §4, §7).
    transparent: bool = False
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    detect_timeout: float = DETECT_TIMEOUT
    # One JSON line per request to this file, or "-" for stdout; None: no access log.
    access_log: str | None = None

    @property
    def service_key(self) -> str:
        return f"{self.service or 'unknown'}.{self.namespace}"


class Proxy:
    """A running sidecar: the AdminState the admin server reads, and the drain logic."""

    def __init__(self, settings: ProxySettings, snapshot: Snapshot | None, loop: asyncio.AbstractEventLoop,
                 tracing: Tracing | None = None) -> None:
        """`snapshot` None: wait for the control plane's first one (not ready until then).
        `tracing`: spans and sampling (default: propagation only). Raises OSError when the
        access log cannot be opened."""
        self.settings = settings
        self.loop = loop
        self.metrics = ProxyMetrics()
        self.tracing = tracing or Tracing()
        self.access_log = AccessLog.open(loop, settings.access_log) if settings.access_log else None
        self.rng = random.Random()
        # mTLS needs an identity: a control plane with a CA and a credential for it.
        self.tls: TLSState | None = TLSState(self.inbound_mtls_mode) if settings.token_file else None
        self.certificates = None  # identity.client.CertificateManager, once started
        self.destinations = Destinations(loop, self.metrics, self.rng, loop.time, tls=self.tls,
                                         transparent=settings.transparent)
        self.destinations.apply(snapshot or Snapshot())
        self.has_config = snapshot is not None
        if snapshot is not None:
            self.metrics.set_config_version(snapshot.version)
        self.last_error: dict | None = None
        self.control: ControlClient | None = None
        self._inbound_resolver: InboundResolver | None = None
        self.listeners: list[Listener] = []
        self.admin = None
        self.ready = False
        self.stopped = loop.create_future()
        self._draining: asyncio.Task | None = None
        self._inbound_runtime: ServiceRuntime | None = None
        self.transparent = None  # dataplane.transparent.Transparent in transparent mode

    # -- AdminState -------------------------------------------------------------------------

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        has_identity = self.tls is None or self.tls.contexts is not None
        return self.ready and self.has_config and has_identity and self._draining is None

    def inbound_mtls_mode(self) -> str:
        """STRICT, PERMISSIVE or DISABLE for this proxy's own Service, from the snapshot."""
        return self.destinations.snapshot.mtls_mode_for(self.settings.service_key,
                                                        self.settings.default_mtls_mode)

    def rotate(self, certificate) -> None:
        """Put a new certificate in force for new connections; open ones keep theirs."""
        from meshproxy.identity.tls import ssl_contexts

        server, client = ssl_contexts(certificate)
        trust_domain = certificate.spiffe_id.split("/")[2]
        self.tls.rotate(Contexts(server, client, certificate.spiffe_id, trust_domain))
        self.metrics.set_cert_expiry(certificate.expires)
        log.info("certificate for %s in force until %s", certificate.spiffe_id,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(certificate.expires)))

    def config_json(self) -> dict:
        snapshot = self.destinations.snapshot
        control = self.control
        return {"version": snapshot.version if self.has_config else None,
                "service": self.settings.service_key,
                "source": {"control": control.url, "connected": control.connected}
                if control is not None else {"files": list(self.settings.config_paths)},
                "lastError": self.last_error, "config": snapshot.to_json()}

    def endpoints_json(self) -> dict:
        data = self.destinations.to_json()
        inbound = self._inbound_runtime
        if inbound is not None:
            data["inbound"] = inbound.to_json(self.loop.time())
        return data

    async def drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._draining)

    # -- configuration changes ------------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> None:
        """Put `snapshot` in force in one step; requests in flight finish on the one they
        started with (they hold their ServiceRuntime)."""
        self.destinations.apply(snapshot)
        self.metrics.set_config_version(snapshot.version)
        self.has_config = True
        self.last_error = None
        if self._inbound_resolver is not None:
            self._inbound_resolver.runtime = self._make_inbound_runtime(self._inbound_runtime)
            self._inbound_runtime = self._inbound_resolver.runtime
            self._inbound_resolver.authorizer = self._authorizer(snapshot)
        if self.transparent is not None:
            self.transparent.apply(snapshot)
        log.info("configuration %s in force", snapshot.version)

    def refuse(self, errors: list[str]) -> None:
        """Report a configuration change that cannot be put in force; the last one stays."""
        self.metrics.config_error()
        self.last_error = {"errors": errors}
        log.error("configuration change refused; keeping version %s:\n  %s",
                  self.destinations.snapshot.version if self.has_config else "none", "\n  ".join(errors))

    def _authorizer(self, snapshot: Snapshot) -> Authorizer | None:
        policies = snapshot.authorization_policies_for(self.settings.service_key)
        return Authorizer(policies) if policies else None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every port; the proxy is ready once all are listening."""
        s = self.settings
        own_ports: set[tuple[str, int]] = set()
        outbound = Listener(
            self.loop,
            OutboundResolver(self.destinations, s.namespace, own_ports),
            self.metrics, self.rng, header_timeout=s.header_timeout,
            idle_timeout=s.client_idle_timeout, tracing=self.tracing, access_log=self.access_log,
        )
        if s.transparent:
            from meshproxy.dataplane.transparent import Transparent

            self.transparent = Transparent(self, s.opaque_ports, s.detect_timeout)
            self.transparent.intercept(outbound)
        s.outbound_port = await outbound.start(s.outbound_bind, s.outbound_port)
        self.listeners.append(outbound)
        self._inbound_runtime = self._make_inbound_runtime(None)
        self._inbound_resolver = InboundResolver(self._inbound_runtime,
                                                 self._authorizer(self.destinations.snapshot))
        inbound = Listener(
            self.loop, self._inbound_resolver, self.metrics, self.rng,
            header_timeout=s.header_timeout, idle_timeout=s.client_idle_timeout,
            tracing=self.tracing, access_log=self.access_log,
        )
        if self.transparent is not None:
            self.transparent.intercept(inbound)
        s.inbound_port = await inbound.start(s.inbound_bind, s.inbound_port, tls=self.tls)
        self.listeners.append(inbound)
        own_ports.update({("127.0.0.1", s.outbound_port), ("127.0.0.1", s.inbound_port)})
        self.admin = await start_servers(self, "127.0.0.1", s.admin_port, "0.0.0.0", s.health_port,
                                         app_probes=s.app_probes)
        s.admin_port, s.health_port = self.admin.admin_port, self.admin.health_port
        self.ready = True

    def _make_inbound_runtime(self, old: ServiceRuntime | None) -> ServiceRuntime:
        """The local app as an endpoint: --app-port, else this instance's app in the Mesh.
        An `old` runtime for the same address keeps its endpoint (and pooled connections)."""
        s = self.settings
        host, port = s.app_host, s.app_port
        snapshot = self.destinations.snapshot
        service = snapshot.services.get(s.service_key)
        if port is None and service is not None:
            instances = [i for i in service.instances if i.name == s.instance] or (
                list(service.instances) if len(service.instances) == 1 else []
            )
            if instances:
                host, port = instances[0].app_host, instances[0].app_port
        policy = snapshot.policy_for(s.service_key)
        endpoints = []
        reused = old.by_key.get(f"{host}:{port}") if old is not None and port is not None else None
        if reused is not None:
            endpoints.append(reused)
        elif port is not None:
            pool = ConnectionPool(self.loop, host, port, idle_timeout=IDLE_TO_APP,
                                  connect_timeout=policy.connection_pool.connect_timeout,
                                  metrics=self.metrics)
            lb = policy.load_balancer
            load = EndpointLoad(f"{host}:{port}", lb.default_rtt, lb.decay, self.loop.time)
            endpoints.append(EndpointRuntime(host, port, meshed=False, instance=s.instance or "",
                                             load=load, pool=pool))
        elif self.has_config and (old is None or old.endpoints):
            log.warning("no --app-port and no app address for %s: inbound requests get 503",
                        s.service_key)
        return ServiceRuntime(s.service_key, policy, endpoints, make_balancer("RoundRobin", self.rng))

    async def _drain(self) -> None:
        """Stop accepting, let in-flight exchanges finish (bounded), close idle, then stop."""
        log.info("draining (at most %.0fs)", self.settings.drain_timeout)
        for listener in self.listeners:
            listener.stop_accepting()
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                await asyncio.gather(*(listener.wait_closed() for listener in self.listeners))
        except TimeoutError:
            log.warning("drain timeout: closing the connections still open")
            for listener in self.listeners:
                listener.abort_all()
        self.destinations.close_idle()
        if self.transparent is not None:
            self.transparent.close_idle()
        if self._inbound_runtime is not None:
            for endpoint in self._inbound_runtime.endpoints:
                endpoint.pool.close_idle()
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def close(self) -> None:
        """Release the admin ports (after the drain); write out access-log lines and spans."""
        if self.admin is not None:
            await self.admin.close()
        if self.access_log is not None:
            self.access_log.flush()
            await self.loop.run_in_executor(None, self.access_log.close)
        await self.loop.run_in_executor(None, self.tracing.shutdown)


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

    proxy.certificates = CertificateManager(control_url, token, rng=proxy.rng, on_rotate=proxy.rotate)
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
        access_log=getattr(args, "access_log", None),
    )
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
