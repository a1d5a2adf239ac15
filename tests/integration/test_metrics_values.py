"""Metrics as a scraper sees them (spec §6): parsed with prometheus_client's parser, their values
equal to the traffic sent, and the number of series bounded however many paths are called."""

from __future__ import annotations

import http.client

from prometheus_client.parser import text_string_to_metric_families

from support.proxy import mesh_yaml


def _series(proxy) -> dict[tuple[str, frozenset], float]:
    status, body = proxy.admin_get("/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def _sum(series, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


def test_values_equal_the_traffic_and_series_stay_bounded(backend, proxy_factory):
    proxy = proxy_factory(mesh_yaml({"web": [f"127.0.0.1:{backend.port}"]}))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.outbound, timeout=10)
    sent_body = b"x" * 100
    try:
        for i in range(10):
            conn.request("POST", "/echo", body=sent_body, headers={"Host": "web"})
            assert conn.getresponse().read() == sent_body
        before = _series(proxy)
        for i in range(10_000):
            conn.request("GET", f"/api/a/{i}?n={i}" if i % 10 else f"/status/500?p=/a/{i}", headers={"Host": "web"})
            conn.getresponse().read()
    finally:
        conn.close()
    after = _series(proxy)
    outbound = {"direction": "outbound", "service": "web.default"}
    assert _sum(after, "meshproxy_requests_total", **outbound) == 10_010
    assert _sum(after, "meshproxy_requests_total", code="500", **outbound) == 1_000
    assert _sum(after, "meshproxy_requests_total", classification="failure", **outbound) == 1_000
    assert _sum(after, "meshproxy_request_duration_seconds_count", **outbound) == 10_010
    assert _sum(before, "meshproxy_request_bytes_total", **outbound) == 10 * len(sent_body)
    assert _sum(before, "meshproxy_response_bytes_total", **outbound) == 10 * len(sent_body)
    # 9,000 distinct paths add no series: labels name the route, never the path.
    new = {key for key in after if key not in before}
    assert len(new) <= 40, sorted(new)  # the 500s' series (one code, buckets of one class)
    assert not any("/a/" in value for _, labels in after for _, value in labels)
