"""The proxy's metrics (spec §6): counted in plain numbers, exposed at scrape time.

The data plane calls ``ProxyMetrics`` once per request and per connection. A
prometheus-client ``Counter.labels(...).inc()`` plus ``Histogram.observe()``
costs several microseconds per request, so the hot path here is one dict
lookup of a label tuple to a small mutable record, a ``bisect`` for the
histogram bucket and a few integer additions. The numbers become Prometheus
metric families only when someone scrapes ``/metrics``, through a custom
collector (observability/collector.py) registered in a ``CollectorRegistry``
that each ``ProxyMetrics`` owns (no global registry).

This module is compiled (setup.py): the per-request call is native code
called natively from the data plane. That is why the collector, a subclass
of prometheus-client's class, lives in a module of its own.

Everything runs on the proxy's event loop thread; a scrape copies each dict
before walking it, so a record added during rendering cannot break the walk.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from meshproxy.observability.collector import MetricsCollector

#: Upper bounds (seconds, inclusive) of the request duration histogram; a
#: last, implicit +Inf bucket catches the rest. Spec §6: from 1 ms to 30 s.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

_BUCKET_LABELS: tuple[str, ...] = tuple(floatToGoString(b) for b in DURATION_BUCKETS) + ("+Inf",)

#: Lowest status code counted as a failure. Code 0 means that no response was
#: sent at all (the exchange broke off), which is a failure too.
_FAILURE_CODE = 500

_ENDPOINT_STATES = ("ready", "ejected", "probing")


class _Histogram:
    """Per-bucket (not cumulative) counts and the sum of observed values."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0


class _Bytes:
    """Request and response body bytes of one (direction, service)."""

    __slots__ = ("request_bytes", "response_bytes")

    def __init__(self) -> None:
        self.request_bytes = 0
        self.response_bytes = 0


class _RequestRecord:
    """The count for one (direction, service, route, code), plus links to the
    histogram and byte counters it shares with other codes, so that one lookup
    reaches every number a finished request changes."""

    __slots__ = ("count", "histogram", "io")

    def __init__(self, histogram: _Histogram, io: _Bytes) -> None:
        self.count = 0
        self.histogram = histogram
        self.io = io


# gRPC statuses that are the server's answer, not a failure of the call's path: a client's
# own error (INVALID_ARGUMENT 3, NOT_FOUND 5, ALREADY_EXISTS 6, PERMISSION_DENIED 7,
# FAILED_PRECONDITION 9, OUT_OF_RANGE 11, UNAUTHENTICATED 16), as a 4xx is for HTTP.
_GRPC_SUCCESS = frozenset({0, 3, 5, 6, 7, 9, 11, 16})


def classify(code: int, grpc_status: int = -1) -> str:
    """Return ``"failure"`` for a 5xx status or 0 (no response), or a gRPC status that says
    the call failed (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...), else ``"success"``."""
    if grpc_status >= 0 and grpc_status not in _GRPC_SUCCESS:
        return "failure"
    return "failure" if code >= _FAILURE_CODE or code == 0 else "success"


class ProxyMetrics:
    """All of one proxy's metrics; ``registry`` holds a collector that renders them.

    Label values are passed as the spec names them: ``direction`` is
    ``"inbound"`` or ``"outbound"``, ``service`` is ``NAME.NAMESPACE``,
    ``route`` is ``NAMESPACE/NAME/RULE`` or ``"default"``.
    """

    def __init__(self) -> None:
        # (direction, service, route, code) -> record
        # (direction, service, route, code, grpc status or -1) -> counts
        self._requests: dict[tuple[str, str, str, int, int], _RequestRecord] = {}
        # (direction, service, route, classification) -> histogram
        self._durations: dict[tuple[str, str, str, str], _Histogram] = {}
        # (direction, service) -> body byte counts
        self._bytes: dict[tuple[str, str], _Bytes] = {}
        # (direction, tls) -> open connections
        self._connections: dict[tuple[str, bool], int] = {}
        # (direction, result) -> handshakes
        self._handshakes: dict[tuple[str, str], int] = {}
        # (service, reason) -> retries
        self._retries: dict[tuple[str, str], int] = {}
        self._budget_exhausted: dict[str, int] = {}
        # (service, endpoint) -> ejections
        self._ejections: dict[tuple[str, str], int] = {}
        # service -> (ready, ejected, probing)
        self._endpoints: dict[str, tuple[int, int, int]] = {}
        self._config_version: str | None = None
        self._config_errors = 0
        self._cert_expiry: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(self))

    # -- per request (hot path) ------------------------------------------------

    def request_finished(
        self,
        direction: str,
        service: str,
        route: str,
        code: int,
        duration: float,
        request_bytes: int,
        response_bytes: int,
        grpc_status: int = -1,
    ) -> None:
        """Count one finished request: its status ``code`` (0 when no response
        was sent), ``duration`` in seconds, body sizes in bytes, and the status of a
        gRPC answer (-1: not gRPC, or none was read). Returns None."""
        record = self._requests.get((direction, service, route, code, grpc_status))
        if record is None:
            record = self._add_request_record(direction, service, route, code, grpc_status)
        record.count += 1
        histogram = record.histogram
        histogram.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        histogram.sum += duration
        io = record.io
        io.request_bytes += request_bytes
        io.response_bytes += response_bytes

    def _add_request_record(
        self, direction: str, service: str, route: str, code: int, grpc_status: int
    ) -> _RequestRecord:
        """Create (once per label set) the record ``request_finished`` updates."""
        hkey = (direction, service, route, classify(code, grpc_status))
        histogram = self._durations.get(hkey)
        if histogram is None:
            histogram = self._durations[hkey] = _Histogram()
        io = self._bytes.get((direction, service))
        if io is None:
            io = self._bytes[(direction, service)] = _Bytes()
        record = self._requests[(direction, service, route, code, grpc_status)] = \
            _RequestRecord(histogram, io)
        return record

    # -- per connection ----------------------------------------------------------

    def connection_opened(self, direction: str, tls: bool) -> None:
        """Count one more open connection in ``meshproxy_tcp_connections_open``."""
        key = (direction, tls)
        self._connections[key] = self._connections.get(key, 0) + 1

    def connection_closed(self, direction: str, tls: bool) -> None:
        """Count one open connection fewer in ``meshproxy_tcp_connections_open``."""
        key = (direction, tls)
        self._connections[key] = self._connections.get(key, 0) - 1

    def tls_handshake(self, direction: str, result: str) -> None:
        """Count one TLS handshake with its ``result`` (e.g. ``"ok"``, ``"error"``)."""
        key = (direction, result)
        self._handshakes[key] = self._handshakes.get(key, 0) + 1

    # -- resilience ----------------------------------------------------------------

    def retry(self, service: str, reason: str) -> None:
        """Count one retry sent to ``service`` because of ``reason``."""
        key = (service, reason)
        self._retries[key] = self._retries.get(key, 0) + 1

    def retry_budget_exhausted(self, service: str) -> None:
        """Count one retry not sent because ``service``'s retry budget was spent."""
        self._budget_exhausted[service] = self._budget_exhausted.get(service, 0) + 1

    def endpoint_ejected(self, service: str, endpoint: str) -> None:
        """Count one ejection of ``endpoint`` (its address) from ``service``."""
        key = (service, endpoint)
        self._ejections[key] = self._ejections.get(key, 0) + 1

    def set_endpoints(self, service: str, ready: int, ejected: int, probing: int) -> None:
        """Set how many of ``service``'s endpoints are in each balancer state."""
        self._endpoints[service] = (ready, ejected, probing)

    def remove_endpoints(self, service: str) -> None:
        """Stop reporting ``meshproxy_endpoints`` for a service no longer known."""
        self._endpoints.pop(service, None)

    # -- configuration and identity ----------------------------------------------

    def set_config_version(self, version: str) -> None:
        """Report ``version`` as the configuration in force."""
        self._config_version = version

    def config_error(self) -> None:
        """Count one refused configuration change."""
        self._config_errors += 1

    def set_cert_expiry(self, timestamp: float) -> None:
        """Report when the proxy's certificate expires (Unix time, seconds)."""
        self._cert_expiry = timestamp

    # -- exposition ----------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text exposition of every metric and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family, built from the current numbers."""
        requests = CounterMetricFamily(
            "meshproxy_requests",
            "Requests finished, by status code and outcome.",
            labels=("direction", "service", "route", "code", "classification", "grpc_status"),
        )
        for (direction, service, route, code, grpc), record in list(self._requests.items()):
            requests.add_metric(
                (direction, service, route, str(code), classify(code, grpc),
                 str(grpc) if grpc >= 0 else ""),
                record.count,
            )
        yield requests

        durations = HistogramMetricFamily(
            "meshproxy_request_duration_seconds",
            "Time from the request's first byte to the response's last byte.",
            labels=("direction", "service", "route", "classification"),
        )
        for duration_labels, histogram in list(self._durations.items()):
            cumulative = 0
            buckets = []
            for le, count in zip(_BUCKET_LABELS, histogram.buckets):
                cumulative += count
                buckets.append((le, cumulative))
            durations.add_metric(duration_labels, buckets, histogram.sum)
        yield durations

        request_bytes = CounterMetricFamily(
            "meshproxy_request_bytes",
            "Request body bytes.",
            labels=("direction", "service"),
        )
        response_bytes = CounterMetricFamily(
            "meshproxy_response_bytes",
            "Response body bytes.",
            labels=("direction", "service"),
        )
        for byte_labels, io in list(self._bytes.items()):
            request_bytes.add_metric(byte_labels, io.request_bytes)
            response_bytes.add_metric(byte_labels, io.response_bytes)
        yield request_bytes
        yield response_bytes

        yield _counter(
            "meshproxy_retries", "Retries sent.", ("service", "reason"), self._retries
        )
        yield _counter(
            "meshproxy_retries_budget_exhausted",
            "Retries not sent because the retry budget was spent.",
            ("service",),
            {(service,): n for service, n in list(self._budget_exhausted.items())},
        )
        yield _counter(
            "meshproxy_endpoint_ejections",
            "Endpoints ejected by outlier detection.",
            ("service", "endpoint"),
            self._ejections,
        )

        endpoints = GaugeMetricFamily(
            "meshproxy_endpoints",
            "Endpoints per service and balancer state.",
            labels=("service", "state"),
        )
        for service, counts in list(self._endpoints.items()):
            for state, count in zip(_ENDPOINT_STATES, counts):
                endpoints.add_metric((service, state), count)
        yield endpoints

        connections = GaugeMetricFamily(
            "meshproxy_tcp_connections_open",
            "Open TCP connections.",
            labels=("direction", "tls"),
        )
        for (direction, tls), count in list(self._connections.items()):
            connections.add_metric((direction, "true" if tls else "false"), count)
        yield connections

        yield _counter(
            "meshproxy_tls_handshakes",
            "TLS handshakes, by result.",
            ("direction", "result"),
            self._handshakes,
        )

        version = GaugeMetricFamily(
            "meshproxy_config_version_info",
            "The configuration version in force (always 1).",
            labels=("version",),
        )
        if self._config_version is not None:
            version.add_metric((self._config_version,), 1)
        yield version

        yield CounterMetricFamily(
            "meshproxy_config_errors",
            "Configuration changes refused.",
            value=self._config_errors,
        )

        # No sample before a certificate exists: 0 would read as "expired in 1970".
        expiry = GaugeMetricFamily(
            "meshproxy_cert_expiry_timestamp_seconds",
            "When the proxy's certificate expires, Unix time.",
            labels=(),
        )
        if self._cert_expiry is not None:
            expiry.add_metric((), self._cert_expiry)
        yield expiry


def _counter(
    name: str, documentation: str, labels: tuple[str, ...], values: dict
) -> CounterMetricFamily:
    """Return a counter family (``name`` without ``_total``) with one sample per entry."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, count in list(values.items()):
        family.add_metric(label_values, count)
    return family
