"""Counters of plain TCP proxying (dataplane/tcpproxy.py): meshproxy_tcp_connections_opened_total,
..._closed_total, meshproxy_tcp_sent_bytes_total and meshproxy_tcp_received_bytes_total by
direction and service, and meshproxy_tcp_connections_refused_total by direction, service and
reason.

They are plain integers added to per connection, not prometheus_client children: a
connection touches them several times, and rendering them at scrape time by a collector in
the proxy's registry keeps that to an attribute increment.
"""

from __future__ import annotations


class _Counts:
    """Connections and bytes of one (direction, service)."""

    __slots__ = ("opened", "closed", "sent", "received", "refused")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.sent = 0  # client -> upstream
        self.received = 0  # upstream -> client
        self.refused: dict[str, int] = {}  # reason -> connections closed without an upstream


class TcpStats:
    """TCP proxying counters, exposed through a collector registered in `registry`."""

    def __init__(self, registry) -> None:
        self._counts: dict[tuple[str, str], _Counts] = {}
        registry.register(self)

    def counts(self, direction: str, service: str) -> _Counts:
        """Return the record of (direction, service), made on first use."""
        key = (direction, service)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = _Counts()
        return counts

    def describe(self):
        return self._families({})

    def collect(self):
        return self._families(dict(self._counts))

    @staticmethod
    def _families(counts: dict):
        from prometheus_client.metrics_core import CounterMetricFamily

        labels = ("direction", "service")
        families = {
            "opened": CounterMetricFamily("meshproxy_tcp_connections_opened",
                                          "TCP-proxied client connections opened.", labels=labels),
            "closed": CounterMetricFamily("meshproxy_tcp_connections_closed",
                                          "TCP-proxied client connections closed.", labels=labels),
            "sent": CounterMetricFamily("meshproxy_tcp_sent_bytes",
                                        "TCP-proxied bytes from clients to upstreams.", labels=labels),
            "received": CounterMetricFamily("meshproxy_tcp_received_bytes",
                                            "TCP-proxied bytes from upstreams to clients.",
                                            labels=labels),
        }
        refused = CounterMetricFamily(
            "meshproxy_tcp_connections_refused",
            "TCP-proxied client connections closed without an upstream connection, by reason.",
            labels=(*labels, "reason"))
        for key, record in counts.items():
            for name, family in families.items():
                family.add_metric(key, getattr(record, name))
            for reason, count in record.refused.items():
                refused.add_metric((*key, reason), count)
        return [*families.values(), refused]
