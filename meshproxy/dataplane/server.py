"""The proxy: configuration in force, listeners, admin servers, TLS, and the drain. How it runs
as a process (arguments, signals, configuration and certificate sources) is dataplane/process.py."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from meshproxy.admin import start_servers
from meshproxy.config import Snapshot
from meshproxy.dataplane.control_client import ControlClient
from meshproxy.dataplane.tls import Contexts, TLSState
from meshproxy.policy.authz import Authorizer
from meshproxy.dataplane.destinations import Destinations, ServiceRuntime
from meshproxy.dataplane.localapp import local_app_runtime
from meshproxy.dataplane.resolvers import InboundResolver, OutboundResolver
from meshproxy.dataplane.context import CLIENT_IDLE_TIMEOUT, HEADER_TIMEOUT, ListenerContext
from meshproxy.dataplane.listener import Listener
from meshproxy.observability.accesslog import AccessLog
from meshproxy.observability.metrics import ProxyMetrics
from meshproxy.observability.trace import Tracing
from meshproxy.policy.detect import DEFAULT_OPAQUE_PORTS, DETECT_TIMEOUT

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
    # The pod's ServiceAccount (injection sets it): the certificate must name it and `namespace`.
    service_account: str | None = None
    # The inbound mTLS mode when neither a PeerAuthentication nor the Mesh says (spec §3).
    default_mtls_mode: str = "PERMISSIVE"
    # The app's own HTTP probes, answered on the health port (appprobes.py; from injection).
    app_probes: dict = field(default_factory=dict)
    # Transparent mode (iptables redirects, SO_ORIGINAL_DST, protocol detection; spec §4, §7).
    transparent: bool = False
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    detect_timeout: float = DETECT_TIMEOUT
    # The pod's own addresses (canonical text); in transparent mode an inbound connection
    # sent to any other is refused. Empty: not known, every address is accepted.
    pod_ips: frozenset[str] = frozenset()
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
        from meshproxy.identity.tls import h2_client_context, ssl_contexts

        server, client = ssl_contexts(certificate)
        trust_domain = certificate.spiffe_id.split("/")[2]
        self.tls.rotate(Contexts(server, client, certificate.spiffe_id, trust_domain,
                                 h2_client_context(certificate)))
        self.metrics.set_cert_expiry(certificate.expires)
        log.info("certificate for %s in force until %s", certificate.spiffe_id,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(certificate.expires)))

    def config_json(self) -> dict:
        snapshot = self.destinations.snapshot
        control = self.control
        return {"version": snapshot.version if self.has_config else None,
                "service": self.settings.service_key,
                "podIPs": sorted(self.settings.pod_ips),
                "identity": self._identity_json(),
                "source": {"control": control.url, "connected": control.connected}
                if control is not None else {"files": list(self.settings.config_paths)},
                "lastError": self.last_error, "config": snapshot.to_json()}

    def _identity_json(self) -> dict | None:
        """The certificate in force (None without mTLS; fields null before the first one)."""
        if self.settings.token_file is None:
            return None
        current = self.certificates.current if self.certificates is not None else None
        if current is None:
            return {"spiffeId": None, "notAfter": None}
        return {"spiffeId": current.spiffe_id,
                "notAfter": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current.expires))}

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
        if s.transparent:
            from meshproxy.dataplane.transparent import Transparent

            self.transparent = Transparent(self, s.opaque_ports, s.detect_timeout)
        outbound = self.make_listener(OutboundResolver(self.destinations, s.namespace, own_ports))
        s.outbound_port = await outbound.start(s.outbound_bind, s.outbound_port)
        self.listeners.append(outbound)
        self._inbound_runtime = self._make_inbound_runtime(None)
        self._inbound_resolver = InboundResolver(self._inbound_runtime,
                                                 self._authorizer(self.destinations.snapshot))
        inbound = self.make_listener(self._inbound_resolver, self.tls)
        s.inbound_port = await inbound.start(s.inbound_bind, s.inbound_port)
        self.listeners.append(inbound)
        own_ports.update({("127.0.0.1", s.outbound_port), ("127.0.0.1", s.inbound_port)})
        self.admin = await start_servers(self, "127.0.0.1", s.admin_port, "0.0.0.0", s.health_port,
                                         app_probes=s.app_probes)
        s.admin_port, s.health_port = self.admin.admin_port, self.admin.health_port
        if s.transparent:
            from meshproxy.dataplane.dualstack import start_ipv6

            await start_ipv6(self, self._inbound_resolver, own_ports)
        self.ready = True

    def make_listener(self, resolver, tls: TLSState | None = None) -> Listener:
        """A listener (not started) for `resolver`'s direction, with `tls` for an inbound one
        of a proxy with an identity; a transparent one in transparent mode. Its context is
        built here, complete, before the listener (settings → context → listener)."""
        s = self.settings
        transparent = self.transparent
        if transparent is not None:
            resolver = transparent.resolver_for(resolver)
        context = ListenerContext(
            self.loop, resolver, self.metrics, self.rng, tracing=self.tracing,
            access_log=self.access_log, header_timeout=s.header_timeout,
            idle_timeout=s.client_idle_timeout, tls=tls,
        )
        if transparent is None:
            return Listener(context)
        return Listener(context, *transparent.listener_parts(context))

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
        if port is None and self.has_config and (old is None or old.endpoints):
            log.warning("no --app-port and no app address for %s: inbound requests get 503",
                        s.service_key)
        return local_app_runtime(s.service_key, snapshot.policy_for(s.service_key),
                                 (host, port) if port is not None else None,
                                 instance=s.instance or "", old=old, loop=self.loop,
                                 metrics=self.metrics, rng=self.rng)

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
                endpoint.close_idle()
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
