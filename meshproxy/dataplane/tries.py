"""The books of a request's current try at one endpoint.

Each try picks an endpoint (the balancer's choice among those not tried yet, or the circuit
breaker's half-open probe), counts in that endpoint's load estimate from its start, and when
it ends tells the balancer how long it took and the breaker how it went. `EndpointTry` keeps
those books for the exchange (dataplane/exchange.py), which owns one and reuses it try after
try; inbound exchanges have one too (the local app is an endpoint like any other, without a
breaker).
"""

from __future__ import annotations

from meshproxy.dataplane.destinations import EndpointRuntime, ServiceRuntime
from meshproxy.observability.metrics import ProxyMetrics
from meshproxy.policy.breaker import PROBING


class EndpointTry:
    """The endpoint of the current try, and whether the try is open, was sent, is a probe."""

    __slots__ = ("endpoint", "started_at", "open", "sent", "probe")

    def __init__(self) -> None:
        self.endpoint: EndpointRuntime | None = None  # the last try's endpoint, once one began
        self.started_at = 0.0  # the balancer's start time of the try
        self.open = False  # between the try's start and its outcome
        self.sent = False  # the try's head was written upstream
        self.probe = False  # the try is the half-open probe of an ejected endpoint

    def begin(self, service: ServiceRuntime, tried: set[str] | None) -> EndpointRuntime:
        """Start a try at the endpoint `service` picks (not one in `tried` where there is
        another) and return it. Raises NoEndpoints, NoHealthyEndpoints."""
        endpoint = self.endpoint = service.pick(tried)
        breaker = service.breaker
        if breaker is not None and not breaker.all_ready:
            # pick() hands out a PROBING endpoint only as its probe.
            self.probe = breaker.health(endpoint.key).state == PROBING
        self.started_at = endpoint.load.start()
        self.open = True
        self.sent = False
        return endpoint

    def dispatched(self) -> None:
        """The try's request goes out only now, on a connection just opened: its RTT counts
        from here, as in Linkerd and Envoy (a connection's setup, or a cold app's first
        answer over a new connection, would keep an endpoint out of the balance long after
        it is warm)."""
        endpoint = self.endpoint
        if endpoint is not None and self.open:
            self.started_at = endpoint.load.now()

    def end(self, service: ServiceRuntime, success: bool | None, metrics: ProxyMetrics) -> None:
        """Close the open try's books (call only while `open`): the balancer's load, and
        (success not None) the circuit breaker's record of the endpoint; success None: no
        outcome (the client left, or the request goes elsewhere)."""
        endpoint = self.endpoint
        assert endpoint is not None  # a try is open
        self.open = False
        endpoint.load.finish(self.started_at)
        if self.probe:
            self.probe = False
            breaker = service.breaker
            if success is None and breaker is not None:
                # The probe must not keep the endpoint out until it is given up as lost.
                breaker.probe_abandoned(endpoint.key)
        if success is not None:
            service.record_outcome(endpoint.key, success, metrics)
