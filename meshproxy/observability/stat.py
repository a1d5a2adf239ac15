"""Golden metrics per Service from the proxies' ``/metrics`` (``meshproxy stat``); no I/O.

A scrape is the text a proxy's admin ``GET /metrics`` answers. ``parse_scrape`` keeps the
two request families of spec §6 (``meshproxy_requests_total`` and the buckets of
``meshproxy_request_duration_seconds``), one entry per series; ``increase`` turns two
scrapes of the same proxy into what it counted in between; ``compute_rows`` sums those
increases over every proxy, per Service and direction, into requests per second, success
rate and latency quantiles. The quantiles interpolate within the buckets the way
Prometheus' ``histogram_quantile`` does, so the numbers agree with a dashboard over the
same metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS_SAMPLE = "meshproxy_requests_total"
DURATION_BUCKET_SAMPLE = "meshproxy_request_duration_seconds_bucket"

#: The latency quantiles of a row, in the order of its ``p50_ms``, ``p95_ms``, ``p99_ms``.
QUANTILES = (0.5, 0.95, 0.99)

#: A series: its label pairs (``le`` excluded), sorted by label name.
Labels = tuple[tuple[str, str], ...]
#: Cumulative histogram buckets: ``(upper bound in seconds, count)``, sorted by bound.
Buckets = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scrape:
    """One proxy's request metrics at one moment, or what it counted over a window.

    ``requests`` maps each ``meshproxy_requests_total`` series to its value;
    ``durations`` maps each ``meshproxy_request_duration_seconds`` series to its buckets.
    """

    requests: Mapping[Labels, float] = field(default_factory=dict)
    durations: Mapping[Labels, Buckets] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyWindow:
    """What one proxy counted, and over how long.

    ``counted`` is an ``increase`` between two scrapes taken ``seconds`` apart, or one
    scrape's totals with ``seconds=None`` (since the proxy started, a time the metrics do
    not tell). ``service`` is the proxy's own Service (``NAME.NAMESPACE``) when known from
    the control plane, so that an instance that served nothing still counts.
    """

    counted: Scrape
    seconds: float | None
    service: str | None = None


@dataclass(frozen=True)
class StatRow:
    """The golden metrics of one Service in one direction.

    ``instances`` is how many proxies contributed: for ``inbound``, the Service's own
    sidecars; for ``outbound``, the sidecars that called it. ``rps`` is None for totals
    since start; ``success_rate`` and the latencies (milliseconds) are None without
    requests.
    """

    service: str
    direction: str
    instances: int
    requests: int
    rps: float | None
    success_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    def to_json(self) -> dict:
        """Return the row as a JSON-ready dict (the ``-o json`` keys)."""
        return {
            "service": self.service,
            "direction": self.direction,
            "instances": self.instances,
            "rps": _round(self.rps),
            "success_rate": _round(self.success_rate),
            "p50_ms": _round(self.p50_ms),
            "p95_ms": _round(self.p95_ms),
            "p99_ms": _round(self.p99_ms),
            "requests": self.requests,
        }


def parse_scrape(text: str) -> Scrape:
    """Return the request series of one ``/metrics`` answer; other metrics are ignored.

    Raises ValueError when ``text`` is not Prometheus text exposition.
    """
    requests: dict[Labels, float] = {}
    buckets: dict[Labels, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS_SAMPLE:
                requests[_key(sample.labels)] = float(sample.value)
            elif sample.name == DURATION_BUCKET_SAMPLE:
                labels = dict(sample.labels)
                le = labels.pop("le", None)
                if le is None:
                    raise ValueError(f"{DURATION_BUCKET_SAMPLE} sample without an le label")
                buckets.setdefault(_key(labels), {})[float(le)] = float(sample.value)
    durations = {key: tuple(sorted(bounds.items())) for key, bounds in buckets.items()}
    return Scrape(requests=requests, durations=durations)


def increase(earlier: Scrape, later: Scrape) -> Scrape:
    """Return what a proxy counted between two of its scrapes, series by series.

    Every series of ``later`` is kept (a zero increase too). A series absent from
    ``earlier`` was created in between, so all of its value is new. A series that went
    down means the proxy restarted in between: like Prometheus' ``rate``, its ``later``
    value is taken as the increase. A histogram is judged as a whole, so that its buckets
    stay consistent.
    """
    requests: dict[Labels, float] = {}
    for key, value in later.requests.items():
        before = earlier.requests.get(key, 0.0)
        requests[key] = value if value < before else value - before
    durations: dict[Labels, Buckets] = {}
    for key, buckets in later.durations.items():
        before_buckets = dict(earlier.durations.get(key, ()))
        if any(count < before_buckets.get(bound, 0.0) for bound, count in buckets):
            durations[key] = buckets
        else:
            durations[key] = tuple(
                (bound, count - before_buckets.get(bound, 0.0)) for bound, count in buckets
            )
    return Scrape(requests=requests, durations=durations)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Return the ``q``-quantile of cumulative ``(upper bound, count)`` buckets.

    Follows Prometheus' ``histogram_quantile``: buckets are sorted, equal bounds summed,
    counts made monotonic; the rank ``q × total`` is located in its bucket and the value
    interpolated linearly between the bucket's bounds (the first bucket starts at 0 unless
    its bound is not positive). A rank in the ``+Inf`` bucket returns the highest finite
    bound. Returns NaN without observations, with fewer than two buckets, without a
    ``+Inf`` bucket, or for a NaN ``q``; -Inf for ``q < 0`` and +Inf for ``q > 1``.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return math.nan
    # Buckets summed from series scraped at slightly different moments can dip;
    # Prometheus takes the running maximum rather than give up.
    monotonic: list[tuple[float, float]] = []
    highest = 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    total = monotonic[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    index = next(
        (i for i, (_, count) in enumerate(monotonic[:-1]) if count >= rank), len(monotonic) - 1
    )
    if index == len(monotonic) - 1:
        return monotonic[-2][0]
    end, count = monotonic[index]
    if index == 0 and end <= 0:
        return end
    start = 0.0
    if index > 0:
        start, below = monotonic[index - 1]
        count -= below
        rank -= below
    if count == 0:
        return start
    return start + (end - start) * (rank / count)


class _Totals:
    """Sums for one (service, direction) over every proxy."""

    __slots__ = ("instances", "requests", "successes", "rps", "buckets")

    def __init__(self) -> None:
        self.instances = 0
        self.requests = 0.0
        self.successes = 0.0
        self.rps = 0.0
        self.buckets: dict[float, float] = {}


def compute_rows(windows: Sequence[ProxyWindow], direction: str) -> list[StatRow]:
    """Return one row per Service seen in ``direction`` (``"inbound"`` or ``"outbound"``),
    sorted by service.

    Requests and their success rate come from ``meshproxy_requests_total`` (success is
    ``classification="success"``), latencies from the duration buckets of every route and
    classification, summed over proxies before the quantile is taken. Requests per second
    sum each proxy's increase over its own window; they are None as soon as one window
    holds totals since start.
    """
    totals: dict[str, _Totals] = {}
    rates_known = True
    for window in windows:
        seen: set[str] = set()
        if direction == "inbound" and window.service:
            seen.add(window.service)
        if window.seconds is None or window.seconds <= 0:
            rates_known = False
        for labels, value in window.counted.requests.items():
            values = dict(labels)
            if values.get("direction") != direction:
                continue
            service = values.get("service", "")
            seen.add(service)
            sums = totals.setdefault(service, _Totals())
            sums.requests += value
            if values.get("classification") == "success":
                sums.successes += value
            if window.seconds:
                sums.rps += value / window.seconds
        for labels, buckets in window.counted.durations.items():
            values = dict(labels)
            if values.get("direction") != direction:
                continue
            service = values.get("service", "")
            seen.add(service)
            sums = totals.setdefault(service, _Totals())
            for bound, count in buckets:
                sums.buckets[bound] = sums.buckets.get(bound, 0.0) + count
        for service in seen:
            totals.setdefault(service, _Totals()).instances += 1

    rows = []
    for service in sorted(totals):
        sums = totals[service]
        latencies = [
            _milliseconds(histogram_quantile(q, sums.buckets.items())) for q in QUANTILES
        ]
        rows.append(StatRow(
            service=service,
            direction=direction,
            instances=sums.instances,
            requests=round(sums.requests),
            rps=sums.rps if rates_known else None,
            success_rate=sums.successes / sums.requests if sums.requests > 0 else None,
            p50_ms=latencies[0],
            p95_ms=latencies[1],
            p99_ms=latencies[2],
        ))
    return rows


def _key(labels: Mapping[str, str]) -> Labels:
    """Return a series' labels in a fixed order, usable as a dict key."""
    return tuple(sorted(labels.items()))


def _milliseconds(seconds: float) -> float | None:
    """Return ``seconds`` in milliseconds, or None when the quantile is undefined (NaN)."""
    return None if math.isnan(seconds) else seconds * 1000.0


def _round(value: float | None) -> float | None:
    """Round away float noise (0.30000000000000004) for output; keep None."""
    return None if value is None else round(value, 6)
