"""Where a redirected connection goes (transparent mode, spec §4): the runtime that serves an
outbound original destination, the resolvers of requests on redirected connections, the local
app per inbound original port, and who may open a TCP connection inbound.

Outbound: an original destination that is one of a Service's `addresses` (with the Service's
port) is balanced across that Service (its HTTPRoutes still apply); one that is a known
instance's app address goes to that instance (over mTLS when it is meshed); anything else
follows `outboundTrafficPolicy`: ALLOW_ANY passes it through to the original destination
unchanged, REGISTRY_ONLY answers 502 `unknown-destination` (HTTP) or closes the connection
(TCP). Inbound, without `--app-port`, a redirected connection goes to the app at
`--app-host:ORIGINAL_PORT`.

A TCP connection is authorized on its source alone: rules that name HTTP methods or paths
cannot match it (ALLOW) or are taken to match it (DENY), as Istio does, so a client cannot get
past an AuthorizationPolicy by not speaking HTTP.
"""

from __future__ import annotations

import ipaddress

from meshproxy.config.model.mesh import REGISTRY_ONLY
from meshproxy.dataplane.destinations import (
    IDLE_TO_APP,
    EndpointRuntime,
    OutboundResolver,
    ServiceRuntime,
)
from meshproxy.dataplane.upstream import ConnectionPool
from meshproxy.http1.errors import UnknownDestination
from meshproxy.policy.authz import SPIFFE_SCHEME, compile_patterns, namespace_of
from meshproxy.policy.balancer import EndpointLoad, make_balancer

MAX_CACHED = 4096
MAX_APP_PORTS = 1024


def canonical_ip(host: str) -> str:
    """The canonical text of an IP address (an IPv4-mapped IPv6 address as IPv4); any other
    `host` unchanged."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


# -- outbound: where an original destination goes ------------------------------------------------


class OriginalDestinations:
    """Maps an outbound original destination to the runtime that serves it (spec §4), with a
    cache per configuration snapshot."""

    def __init__(self, destinations) -> None:
        self.destinations = destinations
        self._for = None
        self._vips: dict[tuple[str, int], str] = {}
        self._cache: dict[tuple[str, int], ServiceRuntime] = {}

    def lookup(self, host: str, port: int) -> ServiceRuntime | None:
        """Return the runtime for `host:port`: the Service whose virtual IP it is, a runtime
        pinned to the instance at that address, or (ALLOW_ANY) a passthrough runtime; None
        under REGISTRY_ONLY for anything else."""
        destinations = self.destinations
        snapshot = destinations.snapshot
        if self._for is not snapshot:
            self._for = snapshot
            self._cache = {}
            self._vips = {(canonical_ip(address), s.port): s.key
                          for s in snapshot.services.values() for address in s.addresses}
        key = (host, port)
        runtime = self._cache.get(key)
        if runtime is not None:
            return runtime
        service_key = self._vips.get(key)
        if service_key is not None:
            runtime = destinations.services.get(service_key)
        else:
            found = snapshot.instance_at(host, port)
            if found is not None:
                runtime = self._pinned(*found)
        if runtime is None:
            if snapshot.outbound_traffic_policy == REGISTRY_ONLY:
                return None
            return destinations.passthrough_to(host, port)
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = runtime
        return runtime

    def _pinned(self, service, instance) -> ServiceRuntime | None:
        """A runtime with just `instance`'s endpoint (pool, load and TLS shared with its
        Service's), named as its Service for metrics, with its own retry budget."""
        destinations = self.destinations
        whole = destinations.services.get(service.key)
        if whole is None:
            return None
        endpoint = next((e for e in whole.endpoints if e.instance == instance.name), None)
        if endpoint is None:
            return None
        breaker, budget = destinations._resilience(None, whole.policy)
        return ServiceRuntime(service.key, whole.policy, [endpoint],
                              make_balancer("RoundRobin", destinations.rng), port=whole.port,
                              breaker=breaker, budget=budget)


class TransparentOutboundResolver:
    """Outbound requests by original destination; requests on connections that were not
    redirected by their authority, as OutboundResolver does."""

    direction = "outbound"

    def __init__(self, base: OutboundResolver, originals: OriginalDestinations) -> None:
        self.base = base
        self.originals = originals

    def service(self, key: str) -> ServiceRuntime | None:
        """The runtime of Service `key` (a route's backend), or None."""
        return self.base.service(key)

    def resolve(self, head, down=None) -> tuple[ServiceRuntime, bytes]:
        """Return (runtime, target). Raises UnknownDestination (REGISTRY_ONLY), BadRequest."""
        original = getattr(down, "original", None)
        if original is None:
            return self.base.resolve(head, down)
        runtime = self.originals.lookup(*original)
        if runtime is None:
            raise UnknownDestination(f"{original[0]}:{original[1]} is not a known destination")
        target = head.target
        # Absolute form to a mesh Service becomes origin form; to anything else (another
        # proxy, say) it passes unchanged.
        if target[:7].lower() == b"http://" and runtime.key in self.originals.destinations.services:
            _, target = OutboundResolver._absolute_form(head)
        return runtime, target


# -- inbound: the app at the original port -----------------------------------------------------


class InboundApps:
    """The local app as an endpoint per original destination port (`--app-host:PORT`)."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.runtimes: dict[int, ServiceRuntime] = {}

    def at(self, port: int) -> ServiceRuntime:
        """Return the runtime for the app's `port`; one without endpoints (503, or closed)
        for the proxy's own ports, which a redirect must never loop back into."""
        runtime = self.runtimes.get(port)
        if runtime is None:
            if len(self.runtimes) >= MAX_APP_PORTS:
                _, old = self.runtimes.popitem()
                for endpoint in old.endpoints:
                    endpoint.pool.close_idle()
            runtime = self.runtimes[port] = self._runtime(port, None)
        return runtime

    def _runtime(self, port: int, old: ServiceRuntime | None) -> ServiceRuntime:
        proxy = self.proxy
        s = proxy.settings
        snapshot = proxy.destinations.snapshot
        policy = snapshot.policy_for(s.service_key)
        own = {s.outbound_port, s.inbound_port, s.admin_port, s.health_port}
        endpoints = []
        if old is not None and old.endpoints:
            endpoints = old.endpoints
        elif port not in own:
            lb = policy.load_balancer
            pool = ConnectionPool(proxy.loop, s.app_host, port, idle_timeout=IDLE_TO_APP,
                                  connect_timeout=policy.connection_pool.connect_timeout,
                                  metrics=proxy.metrics)
            load = EndpointLoad(f"{s.app_host}:{port}", lb.default_rtt, lb.decay, proxy.loop.time)
            endpoints = [EndpointRuntime(s.app_host, port, meshed=False, instance=s.instance or "",
                                         load=load, pool=pool)]
        return ServiceRuntime(s.service_key, policy, endpoints, make_balancer("RoundRobin", proxy.rng))

    def apply(self) -> None:
        """A new snapshot: the same endpoints (and pooled connections) under its policy."""
        self.runtimes = {port: self._runtime(port, old) for port, old in self.runtimes.items()}

    def close_idle(self) -> None:
        for runtime in self.runtimes.values():
            for endpoint in runtime.endpoints:
                endpoint.pool.close_idle()


class TransparentInboundResolver:
    """Inbound requests as InboundResolver answers them (authorization, client id), sent to
    the app's original destination port when the connection was redirected."""

    direction = "inbound"

    def __init__(self, base, apps: InboundApps | None) -> None:
        self.base = base
        self.apps = apps

    def service(self, key: str) -> None:
        return None

    def resolve(self, head, down=None) -> tuple[ServiceRuntime, bytes]:
        """Return (the app's runtime, target). Raises Unauthorized."""
        runtime, target = self.base.resolve(head, down)
        original = getattr(down, "original", None)
        if original is not None and self.apps is not None:
            runtime = self.apps.at(original[1])
        return runtime, target


def tcp_allowed(policies, principal: str | None) -> bool:
    """Whether AuthorizationPolicies `policies` let a TCP connection from `principal` (a
    verified SPIFFE ID, or None) through. Only sources can be checked on a byte stream: a DENY
    rule matches on its sources alone (its operations are ignored: deny more, never less); an
    ALLOW rule that names operations cannot match."""
    if not policies:
        return True
    principal = principal.removeprefix(SPIFFE_SCHEME) if principal else None
    namespace = namespace_of(principal)

    def sources_match(rule) -> bool:
        if not rule.from_:
            return True
        for source in rule.from_:
            principals = compile_patterns([p.removeprefix(SPIFFE_SCHEME) for p in source.principals])
            namespaces = compile_patterns(source.namespaces)
            if ((principals is None or principals(principal))
                    and (namespaces is None or namespaces(namespace))):
                return True
        return False

    allows = [p for p in policies if p.action != "DENY"]
    for policy in policies:
        if policy.action == "DENY" and any(sources_match(r) for r in policy.rules):
            return False
    if not allows:
        return True
    return any(not r.to and sources_match(r) for p in allows for r in p.rules)
