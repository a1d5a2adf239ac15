"""Where a redirected connection goes (transparent mode, spec §4): the runtime that serves an
outbound original destination, the resolvers of requests on redirected connections, the local
app per inbound original port, and who may open a TCP connection inbound.

Outbound: an original destination that is one of a Service's `addresses` (with the Service's
port) is balanced across that Service (its HTTPRoutes still apply); one that is a known
instance's app address, or one of its `app.otherAddresses` on the app's port (a dual-stack
pod's other family), goes to that instance's endpoint (over mTLS when it is meshed);
anything else follows `outboundTrafficPolicy`: ALLOW_ANY passes it through to the original
destination unchanged, REGISTRY_ONLY answers 502 `unknown-destination` (HTTP) or closes the
connection (TCP). Inbound, a redirected connection whose original destination is not one of
the pod's own addresses (`--pod-ips`) is not for this pod and is refused; without
`--app-port`, one that is goes to the app at `--app-host:ORIGINAL_PORT` (an IPv6 one at `::1`
when the app listens there: dataplane/loopback.py).

IPv6 addresses are compared in their canonical text (`ipaddress`: compressed, lower case), so
a Mesh that writes `FD00:0200::0002` and a kernel that reports `fd00:200::2` agree.

A TCP connection is authorized on its source alone: rules that name HTTP methods or paths
cannot match it (ALLOW) or are taken to match it (DENY), as Istio does, so a client cannot get
past an AuthorizationPolicy by not speaking HTTP.
"""

from __future__ import annotations

import ipaddress

from meshproxy.config.model.mesh import REGISTRY_ONLY
from meshproxy.dataplane.destinations import ServiceRuntime
from meshproxy.dataplane.localapp import local_app_runtime
from meshproxy.dataplane.resolvers import OutboundResolver, Resolver
from meshproxy.dataplane.loopback import IPV4_LOOPBACK, AppLoopback
from meshproxy.http1.errors import UnknownDestination
from meshproxy.http1.events import RequestHead
from meshproxy.policy.authz import SPIFFE_SCHEME, compile_patterns, namespace_of
from meshproxy.policy.balancer import make_balancer

MAX_CACHED = 4096
MAX_APP_PORTS = 1024
# How long the loopback address an app listens on (for IPv6 connections) is taken as known
# before the kernel is asked again: an app may restart and bind differently.


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


def parse_pod_ips(text: str | None) -> frozenset[str]:
    """Return the canonical texts of the comma-separated IP addresses in `text` (the downward
    API's `status.podIPs`, e.g. `10.1.2.3,fd00::3`); blank items are ignored, None gives an
    empty set. Raises ValueError naming an item that is not an IP address."""
    ips = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            ipaddress.ip_address(item)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
        ips.add(canonical_ip(item))
    return frozenset(ips)


def for_this_pod(host: str, pod_ips: frozenset[str]) -> bool:
    """Whether an inbound connection originally sent to `host` (canonical text) is for this
    pod: one of its addresses, or loopback (which cannot come from outside the pod); any
    address when the pod's addresses are not known. Anything else reached the pod only because
    the inbound redirect takes every address (a stale route, an address the pod was not
    given), as Linkerd's inbound refuses targets outside its pod's IPs."""
    return not pod_ips or host in pod_ips or host == "::1" or host.startswith("127.")


# -- outbound: where an original destination goes ------------------------------------------------


class OriginalDestinations:
    """Maps an outbound original destination to the runtime that serves it (spec §4), with a
    cache per configuration snapshot."""

    def __init__(self, destinations) -> None:
        self.destinations = destinations
        self._for = None
        self._vips: dict[tuple[str, int], str] = {}
        self._instances: dict[tuple[str, int], tuple] = {}
        self._pins: dict[tuple[str, str], ServiceRuntime | None] = {}  # (Service key, instance name)
        self._cache: dict[tuple[str, int], ServiceRuntime] = {}

    def lookup(self, host: str, port: int) -> ServiceRuntime | None:
        """Return the runtime for `host:port` (`host` in canonical text, as `original_of`
        gives it): the Service whose virtual IP it is, a runtime
        pinned to the instance at that address, or (ALLOW_ANY) a passthrough runtime; None
        under REGISTRY_ONLY for anything else."""
        destinations = self.destinations
        snapshot = destinations.snapshot
        if self._for is not snapshot:
            self._for = snapshot
            self._cache = {}
            self._pins = {}
            self._vips = {(canonical_ip(address), s.port): s.key
                          for s in snapshot.services.values() for address in s.addresses}
            self._instances = self._instance_index(snapshot)
        key = (host, port)
        runtime = self._cache.get(key)
        if runtime is not None:
            return runtime
        # Services and instances are known by address alone (a link-local one's scope is the
        # connection's, not theirs).
        service_key = self._vips.get((host.partition("%")[0], port))
        if service_key is not None:
            runtime = destinations.services.get(service_key)
        else:
            found = self._instances.get((host.partition("%")[0], port))
            if found is not None:
                # Every address of an instance shares one pinned runtime (and retry budget).
                service, instance = found
                pin = (service.key, instance.name)
                runtime = self._pins.get(pin)
                if runtime is None:
                    runtime = self._pins[pin] = self._pinned(service, instance)
        if runtime is None:
            if snapshot.outbound_traffic_policy == REGISTRY_ONLY:
                return None
            return destinations.passthrough_to(host, port)
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = runtime
        return runtime

    @staticmethod
    def _instance_index(snapshot) -> dict[tuple[str, int], tuple]:
        """(canonical IP, port) -> (Service, Instance) for every address of every instance (a
        dual-stack pod's `app.otherAddresses` too). Where an address is one instance's own and
        another's further one, it stays the own one's."""
        index: dict[tuple[str, int], tuple] = {}
        for own in (False, True):
            for s in snapshot.services.values():
                for i in s.instances:
                    for host in (i.app_host,) if own else i.other_app_hosts:
                        index[(canonical_ip(host), i.app_port)] = (s, i)
        return index

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
        return ServiceRuntime(service.key, whole.policy, [endpoint],
                              make_balancer("RoundRobin", destinations.rng), port=whole.port,
                              outbound=destinations.outbound_rules(None, whole.policy))


class TransparentOutboundResolver(Resolver):
    """Outbound requests by original destination; requests on connections that were not
    redirected by their authority, as OutboundResolver does."""

    def __init__(self, base: OutboundResolver, originals: OriginalDestinations) -> None:
        super().__init__("outbound")
        self.base = base
        self.originals = originals

    def service(self, key: str) -> ServiceRuntime | None:
        """The runtime of Service `key` (a route's backend), or None."""
        return self.base.service(key)

    def resolve(self, head: RequestHead, client_id: str | None = None,
                original: tuple[str, int] | None = None) -> tuple[ServiceRuntime, bytes]:
        """Return (runtime, target). Raises UnknownDestination (REGISTRY_ONLY), BadRequest."""
        if original is None:
            return self.base.resolve(head, client_id)
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
    """The local app as an endpoint per original destination: `--app-host:PORT`; for an IPv6
    original destination with the default app host, `::1:PORT` when the app listens there
    (`AppLoopback`, dataplane/loopback.py), else `127.0.0.1:PORT`."""

    def __init__(self, proxy, app_loopback: AppLoopback | None = None) -> None:
        self.proxy = proxy
        self.app_loopback = app_loopback or AppLoopback(proxy.loop.time)
        self.runtimes: dict[tuple[str, int], ServiceRuntime] = {}

    def at(self, original: tuple[str, int]) -> ServiceRuntime:
        """Return the runtime for the app's port of `original` (host, port); one without
        endpoints (503, or closed) for the proxy's own ports, which a redirect must never loop
        back into."""
        host, port = original
        app_host = self.proxy.settings.app_host
        if ":" in host and app_host == IPV4_LOOPBACK:
            app_host = self.app_loopback.host(port)
        key = (app_host, port)
        runtime = self.runtimes.get(key)
        if runtime is None:
            if len(self.runtimes) >= MAX_APP_PORTS:
                _, old = self.runtimes.popitem()
                for endpoint in old.endpoints:
                    endpoint.close_idle()
            runtime = self.runtimes[key] = self._runtime(app_host, port, None)
        return runtime

    def _runtime(self, host: str, port: int, old: ServiceRuntime | None) -> ServiceRuntime:
        """The app at host:port (none at one of the proxy's own ports), keeping `old`'s
        endpoint."""
        proxy = self.proxy
        s = proxy.settings
        own = {s.outbound_port, s.inbound_port, s.admin_port, s.health_port}
        return local_app_runtime(s.service_key, proxy.destinations.snapshot.policy_for(s.service_key),
                                 (host, port) if port not in own else None,
                                 instance=s.instance or "", old=old, loop=proxy.loop,
                                 metrics=proxy.metrics, rng=proxy.rng)

    def apply(self) -> None:
        """A new snapshot: the same endpoints (and pooled connections) under its policy."""
        self.runtimes = {key: self._runtime(*key, old) for key, old in self.runtimes.items()}

    def close_idle(self) -> None:
        for runtime in self.runtimes.values():
            for endpoint in runtime.endpoints:
                endpoint.close_idle()


class TransparentInboundResolver(Resolver):
    """Inbound requests as InboundResolver answers them (authorization, client id), sent to
    the app's original destination port when the connection was redirected."""

    def __init__(self, base, apps: InboundApps | None) -> None:
        super().__init__("inbound")
        self.base = base
        self.apps = apps

    def service(self, key: str) -> None:
        return None

    def resolve(self, head: RequestHead, client_id: str | None = None,
                original: tuple[str, int] | None = None) -> tuple[ServiceRuntime, bytes]:
        """Return (the app's runtime, target). Raises Unauthorized."""
        runtime, target = self.base.resolve(head, client_id)
        if original is not None and self.apps is not None:
            runtime = self.apps.at(original)
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
