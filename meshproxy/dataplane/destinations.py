"""Services and their endpoints at run time, built from a Snapshot (`Destinations.apply`).
Which Service a request goes to is the resolvers' concern (dataplane/resolvers.py).

Run-time state (balancer load, connection pools) lives in EndpointRuntime objects that survive a
configuration change when the endpoint stays the same.
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

from meshproxy.config import Snapshot
from meshproxy.config.model.mesh import join_host_port
from meshproxy.dataplane.h2upstream import Http2Pool
from meshproxy.dataplane.tls import TLSState
from meshproxy.dataplane.upstream import ConnectionPool
from meshproxy.http1.errors import NoEndpoints, NoHealthyEndpoints
from meshproxy.policy.balancer import EndpointLoad, make_balancer
from meshproxy.policy.breaker import PROBING, CircuitBreaker
from meshproxy.policy.retry import RetryBudget, RetryRule
from meshproxy.policy.router import RouteTable

# Spec §3: idle keep-alive towards meshed peers (their inbound keeps clients 75 s) and towards
# apps and unmeshed endpoints (which often close idle connections after 2-5 s).
IDLE_TO_MESHED = 60.0
IDLE_TO_APP = 1.5
MAX_PASSTHROUGH = 1024


class EndpointRuntime:
    """One upstream endpoint: its address, balancer load and connection pool."""

    __slots__ = ("key", "host", "port", "meshed", "instance", "load", "pool", "h2")

    def __init__(self, host: str, port: int, *, meshed: bool, instance: str, load: EndpointLoad,
                 pool: ConnectionPool) -> None:
        self.key = join_host_port(host, port)
        self.host = host
        self.port = port
        self.meshed = meshed
        self.instance = instance
        self.load = load
        self.pool = pool
        # Its HTTP/2 connections (dataplane/h2upstream.py), made on first use.
        self.h2: Http2Pool | None = None

    def h2_pool(self) -> Http2Pool:
        h2 = self.h2
        if h2 is None:
            h2 = self.h2 = Http2Pool(self.pool)
        return h2

    def close_idle(self) -> None:
        """Close the idle connections, HTTP/1.1 and HTTP/2 (drain, or the endpoint went)."""
        self.pool.close_idle()
        if self.h2 is not None:
            self.h2.close_idle()

    def to_json(self, now: float) -> dict:
        return {
            "address": self.key,
            "instance": self.instance,
            "meshed": self.meshed,
            "load": round(self.load.load(), 6),
            "rtt_estimate_seconds": round(self.load.rtt_estimate(), 6),
            "in_flight": self.load.in_flight,
            "idle_connections": len(self.pool.idle),
            "ejected_until": None,
        }


class OutboundRules:
    """What calls to another Service get and the local app (inbound) does not: the circuit
    breaker, the retry budget and rule, the request and per-try timeouts, and the limits on
    connections being opened and open (spec §3)."""

    __slots__ = ("breaker", "budget", "retry_rule", "request_timeout", "per_try_timeout",
                 "max_pending", "max_connections")

    def __init__(self, policy, breaker: CircuitBreaker, budget: RetryBudget) -> None:
        self.breaker = breaker
        self.budget = budget
        self.retry_rule = RetryRule.from_policy(policy.retry)
        self.request_timeout = policy.timeouts.request
        self.per_try_timeout = policy.timeouts.per_try
        self.max_pending = policy.connection_pool.max_pending_requests
        self.max_connections = policy.connection_pool.max_connections


class ServiceRuntime:
    """A Service as the data plane sees it: name, policy, endpoints, balancer and routes, and
    for outbound traffic its OutboundRules (None for the local app)."""

    __slots__ = ("key", "policy", "endpoints", "balancer", "routes", "port", "keys", "by_key",
                 "outbound", "breaker", "active", "connecting", "max_requests")

    def __init__(self, key: str, policy, endpoints: list[EndpointRuntime], balancer,
                 routes: RouteTable | None = None, port: int = 80, *,
                 outbound: OutboundRules | None = None) -> None:
        self.key = key
        self.policy = policy
        self.endpoints = endpoints
        self.keys = [e.key for e in endpoints]
        self.by_key = {e.key: e for e in endpoints}
        self.balancer = balancer
        self.outbound = outbound
        # outbound.breaker, read on every pick; None for the local app.
        self.breaker = outbound.breaker if outbound is not None else None
        if self.breaker is not None:
            self.breaker.forget(self.keys)
        self.active = 0  # requests in flight (maxRequests)
        self.connecting = 0  # connections being opened (maxPendingRequests)
        self.max_requests = policy.connection_pool.max_requests
        # HTTPRoutes attached to this Service (outbound only); None rather than an empty table,
        # so the check on every request is a plain None test.
        self.routes = routes
        self.port = port

    def pick(self, tried: set | None = None) -> EndpointRuntime:
        """Return the endpoint for the next try: a probe when an ejected endpoint is due one,
        else the balancer's choice among the usable endpoints not `tried` yet (all usable ones
        when every one was tried). Raises NoEndpoints, NoHealthyEndpoints."""
        endpoints = self.endpoints
        if not endpoints:
            raise NoEndpoints(f"{self.key} has no endpoints")
        breaker = self.breaker
        if breaker is not None and not breaker.all_ready:
            keys = breaker.eligible(self.keys)
            if not keys:
                raise NoHealthyEndpoints(f"every endpoint of {self.key} is ejected")
            last = keys[-1]
            if breaker.health(last).state == PROBING:
                # The half-open probe: one real request decides whether it comes back.
                breaker.probe_started(last)
                return self.by_key[last]
            endpoints = [self.by_key[k] for k in keys]
        if tried:
            untried = [e for e in endpoints if e.key not in tried]
            if untried:
                endpoints = untried
        if len(endpoints) == 1:
            return endpoints[0]
        load = self.balancer.pick([e.load for e in endpoints])
        for endpoint in endpoints:
            if endpoint.load is load:
                return endpoint
        raise AssertionError("balancer returned an unknown endpoint")  # pragma: no cover

    def connect_ended(self, task) -> None:
        """Done callback of a connect task: it no longer counts as being opened."""
        self.connecting -= 1

    def open_connections(self) -> int:
        """Upstream connections open to this Service's endpoints (maxConnections): pooled
        HTTP connections and proxied TCP connections alike."""
        return sum(e.pool.open_count for e in self.endpoints)

    def at_connection_limit(self) -> bool:
        """Return True when no new upstream connection may be opened now (spec §3 limits):
        `maxPendingRequests` connections are being opened, or `maxConnections` are open or
        being opened and none of them is idle. When one is idle, the longest-idle one is
        closed to make room and this returns False. Outbound only: the local app has no
        limits."""
        outbound = self.outbound
        if outbound is None:
            return False
        # Connections being opened count too, or a burst would open past the limit.
        return (self.connecting >= outbound.max_pending
                or (self.open_connections() + self.connecting >= outbound.max_connections
                    and not self.free_idle_connection()))

    def free_idle_connection(self) -> bool:
        """Close the longest-idle connection to any of the endpoints, making room under
        maxConnections for a new one; return False when no connection is idle."""
        oldest = None
        for e in self.endpoints:
            idle = e.pool.idle
            if idle and (oldest is None or idle[0].idle_since < oldest.idle[0].idle_since):
                oldest = e.pool
        return oldest is not None and oldest.close_oldest_idle()

    def record_outcome(self, endpoint_key: str, success: bool, metrics) -> None:
        """Tell the circuit breaker how a try (or a TCP connect) to `endpoint_key` went, and
        keep the ejection counter and endpoint gauges in step. Nothing for the local app."""
        breaker = self.breaker
        if breaker is None:
            return
        was_ready = breaker.all_ready
        if breaker.record(endpoint_key, success):
            metrics.endpoint_ejected(self.key, endpoint_key)
            was_ready = not breaker.all_ready  # force the gauge update below
        if was_ready != breaker.all_ready or not breaker.all_ready:
            metrics.set_endpoints(self.key, *breaker.counts())

    def to_json(self, now: float) -> dict:
        endpoints = []
        for e in self.endpoints:
            entry = e.to_json(now)
            if self.breaker is not None:
                health = self.breaker.health(e.key)
                entry["state"] = health.state
                if health.state != "ready":
                    entry["ejected_until"] = round(health.ejected_until, 3)
                    entry["ejected_for_seconds"] = round(max(health.ejected_until - now, 0.0), 3)
            endpoints.append(entry)
        data = {"service": self.key, "endpoints": endpoints, "active_requests": self.active}
        if self.outbound is not None:
            data["retry_budget_remaining"] = round(self.outbound.budget.remaining(), 2)
        return data


SERVICE_ACCOUNT_LABEL = "meshproxy.io/service-account"


def expected_identity(trust_domain: str, service, instance) -> str:
    """The SPIFFE ID a meshed instance's sidecar must prove (spec §5): its ServiceAccount's
    (Kubernetes discovery labels it), else, outside Kubernetes, the Service's name."""
    account = instance.labels.get(SERVICE_ACCOUNT_LABEL) or service.name
    return f"spiffe://{trust_domain}/ns/{service.namespace}/sa/{account}"


class Destinations:
    """Builds and keeps the ServiceRuntime objects of one configuration snapshot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics, rng: random.Random,
                 clock: Callable[[], float], tls: TLSState | None = None,
                 transparent: bool = False) -> None:
        """`tls`: the proxy's TLS state when it has an identity (control-plane mode); calls to
        meshed endpoints then use mTLS unless their Service's PeerAuthentication disables it.
        `transparent`: the mesh redirects connections to sidecars (Kubernetes), so a meshed
        instance whose sidecar port is not known is still meshed at its app's address: the
        destination's iptables rules hand the connection to its sidecar (spec §4)."""
        self.loop = loop
        self.tls = tls
        self.transparent = transparent
        self.metrics = metrics
        self.rng = rng
        self.clock = clock
        self.snapshot: Snapshot = Snapshot()  # apply() puts the first one in force
        self.services: dict[str, ServiceRuntime] = {}
        self._endpoints: dict[tuple, EndpointRuntime] = {}
        self.passthrough: dict[tuple[str, int], ServiceRuntime] = {}

    def apply(self, snapshot) -> None:
        """Swap in a new snapshot; endpoints that stay keep their load and pooled connections."""
        services: dict[str, ServiceRuntime] = {}
        endpoints: dict[tuple, EndpointRuntime] = {}
        for key, service in snapshot.services.items():
            policy = snapshot.policy_for(key)
            mtls = self.tls is not None and snapshot.mtls_mode_for(key) != "DISABLE"
            runtimes = []
            for instance in service.instances:
                inbound = instance.sidecar_ports.inbound if instance.meshed else None
                port = inbound if inbound else instance.app_port
                meshed = bool(inbound) or (self.transparent and instance.meshed)
                expected = expected_identity(snapshot.trust_domain, service, instance) if meshed and mtls else None
                endpoint = self._endpoint(key, instance.app_host, port, meshed, instance.name, policy,
                                          expected)
                endpoints[(key, endpoint.key)] = endpoint
                runtimes.append(endpoint)
            balancer = make_balancer(policy.load_balancer.type, self.rng)
            routes = snapshot.routes_for(key)
            services[key] = ServiceRuntime(key, policy, runtimes, balancer,
                                           RouteTable(routes) if routes else None,
                                           service.port,
                                           outbound=self.outbound_rules(self.services.get(key), policy))
        for ident, endpoint in self._endpoints.items():
            if ident not in endpoints:
                endpoint.close_idle()
        self._endpoints = endpoints
        for key in self.services.keys() - services.keys():
            self.metrics.remove_endpoints(key)
        for key, runtime in services.items():
            if runtime.breaker is not None and runtime.endpoints:
                self.metrics.set_endpoints(key, *runtime.breaker.counts())
        self.services = services
        self.snapshot = snapshot
        for runtime in self.passthrough.values():
            for endpoint in runtime.endpoints:
                endpoint.close_idle()
        self.passthrough = {}

    def outbound_rules(self, old: ServiceRuntime | None, policy) -> OutboundRules:
        """The OutboundRules for calls to a Service: `old`'s (the same Service in the last
        snapshot) while its policy stays the same, so that ejections and the budget's window
        survive a reload; else new ones."""
        if old is not None and old.outbound is not None and old.policy == policy:
            return old.outbound
        return OutboundRules(policy,
                             CircuitBreaker.from_policy(policy.circuit_breaker, self.clock, self.rng),
                             RetryBudget.from_policy(policy.retry.budget, self.clock))

    def _endpoint(self, service_key: str, host: str, port: int, meshed: bool, instance: str,
                  policy, expected_id: str | None = None) -> EndpointRuntime:
        existing = self._endpoints.get((service_key, join_host_port(host, port)))
        if existing is not None and existing.meshed == meshed and existing.pool.expected_id == expected_id:
            existing.instance = instance
            return existing
        pool_spec = policy.connection_pool
        pool = ConnectionPool(
            self.loop, host, port,
            idle_timeout=pool_spec.idle_timeout_for(meshed),
            connect_timeout=pool_spec.connect_timeout,
            metrics=self.metrics,
            tls=self.tls if expected_id is not None else None,
            expected_id=expected_id,
        )
        lb = policy.load_balancer
        load = EndpointLoad(join_host_port(host, port), lb.default_rtt, lb.decay, self.clock)
        return EndpointRuntime(host, port, meshed=meshed, instance=instance, load=load, pool=pool)

    def passthrough_to(self, host: str, port: int) -> ServiceRuntime:
        """Return (creating if needed) the runtime for an unknown destination host:port."""
        key = (host, port)
        runtime = self.passthrough.get(key)
        if runtime is None:
            if len(self.passthrough) >= MAX_PASSTHROUGH:
                # Bound the table: forget the oldest destination (dicts keep insertion order).
                oldest = next(iter(self.passthrough))
                for endpoint in self.passthrough.pop(oldest).endpoints:
                    endpoint.close_idle()
            policy = self.snapshot.policy_for(join_host_port(host, port))
            endpoint = self._endpoint(join_host_port(host, port), host, port, False, "", policy)
            runtime = ServiceRuntime(join_host_port(host, port), policy, [endpoint],
                                     make_balancer("RoundRobin", self.rng),
                                     outbound=self.outbound_rules(None, policy))
            self.passthrough[key] = runtime
        return runtime

    def close_idle(self) -> None:
        """Close all idle upstream connections (used when draining)."""
        for endpoint in self._endpoints.values():
            endpoint.close_idle()
        for runtime in self.passthrough.values():
            for endpoint in runtime.endpoints:
                endpoint.close_idle()

    def to_json(self) -> dict:
        now = self.clock()
        return {key: runtime.to_json(now) for key, runtime in self.services.items()}
