"""The registry's view of a proxy's metrics: a prometheus-client ``Collector``.

Kept apart from observability/metrics.py because that module is compiled (its counting runs
once per request) and a compiled class cannot subclass prometheus-client's ``Collector``;
this adapter is only called at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.observability.metrics import ProxyMetrics


class MetricsCollector(Collector):
    """Adapts ``ProxyMetrics`` to the registry; kept apart so that the registry does not
    treat the metrics object itself as a collector."""

    def __init__(self, metrics: "ProxyMetrics") -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the current numbers."""
        return self._metrics.collect()
