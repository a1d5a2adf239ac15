"""ProxyMetrics: what a Prometheus scrape of the proxy shows after known events."""

from __future__ import annotations

import timeit

from prometheus_client.parser import text_string_to_metric_families

from meshproxy.observability.metrics import DURATION_BUCKETS, ProxyMetrics

ALL_FAMILIES = {
    "meshproxy_requests": "counter",
    "meshproxy_request_duration_seconds": "histogram",
    "meshproxy_request_bytes": "counter",
    "meshproxy_response_bytes": "counter",
    "meshproxy_retries": "counter",
    "meshproxy_retries_budget_exhausted": "counter",
    "meshproxy_endpoint_ejections": "counter",
    "meshproxy_endpoints": "gauge",
    "meshproxy_tcp_connections_open": "gauge",
    "meshproxy_tls_handshakes": "counter",
    "meshproxy_config_version_info": "gauge",
    "meshproxy_config_errors": "counter",
    "meshproxy_cert_expiry_timestamp_seconds": "gauge",
}


def scrape(metrics: ProxyMetrics) -> dict[tuple[str, frozenset], float]:
    """Render and parse; return {(sample name, labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def families(metrics: ProxyMetrics) -> dict[str, str]:
    body, _ = metrics.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def series(samples: dict, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def L(**labels: str) -> frozenset:
    return frozenset(labels.items())


def test_every_family_is_present_before_any_event() -> None:
    m = ProxyMetrics()
    assert families(m) == ALL_FAMILIES
    samples = scrape(m)
    # Only the unlabelled counter has a sample yet.
    assert samples == {("meshproxy_config_errors_total", frozenset()): 0.0}


def test_exposition_uses_the_spec_names_with_total_suffix() -> None:
    body, _ = ProxyMetrics().render()
    text = body.decode()
    for name in (
        "meshproxy_requests_total",
        "meshproxy_request_bytes_total",
        "meshproxy_response_bytes_total",
        "meshproxy_retries_total",
        "meshproxy_retries_budget_exhausted_total",
        "meshproxy_endpoint_ejections_total",
        "meshproxy_config_errors_total",
        "meshproxy_tls_handshakes_total",
    ):
        assert f"# TYPE {name} counter\n" in text
    assert "# TYPE meshproxy_request_duration_seconds histogram\n" in text
    assert "_created" not in text


def test_requests_counted_per_label_set_and_classified() -> None:
    m = ProxyMetrics()
    route = "shop/checkout/0"
    m.request_finished("outbound", "cart.shop", route, 200, 0.002, 10, 100)
    m.request_finished("outbound", "cart.shop", route, 200, 0.004, 20, 200)
    m.request_finished("outbound", "cart.shop", route, 503, 0.5, 30, 0)
    m.request_finished("outbound", "cart.shop", route, 0, 1.5, 5, 0)
    m.request_finished("outbound", "cart.shop", route, 404, 0.001, 0, 9)
    m.request_finished("inbound", "cart.shop", "default", 499, 0.02, 1, 2)
    m.request_finished("inbound", "cart.shop", "default", 500, 0.02, 1, 2)

    requests = series(scrape(m), "meshproxy_requests_total")
    out = dict(direction="outbound", service="cart.shop", route=route)
    inb = dict(direction="inbound", service="cart.shop", route="default")
    assert requests == {
        L(**out, code="200", classification="success", grpc_status=""): 2.0,
        L(**out, code="503", classification="failure", grpc_status=""): 1.0,
        L(**out, code="0", classification="failure", grpc_status=""): 1.0,
        L(**out, code="404", classification="success", grpc_status=""): 1.0,
        L(**inb, code="499", classification="success", grpc_status=""): 1.0,
        L(**inb, code="500", classification="failure", grpc_status=""): 1.0,
    }


def test_grpc_answers_are_counted_with_their_status_and_classified_by_it() -> None:
    """gRPC answers are HTTP 200; their status decides: UNAVAILABLE and DEADLINE_EXCEEDED are
    failures, NOT_FOUND is the server's answer to the caller (spec §9)."""
    m = ProxyMetrics()
    for grpc_status in (0, 5, 14, 4):
        m.request_finished("outbound", "drone.default", "default", 200, 0.01, 5, 5, grpc_status)
    requests = series(scrape(m), "meshproxy_requests_total")
    out = dict(direction="outbound", service="drone.default", route="default", code="200")
    assert requests == {
        L(**out, classification="success", grpc_status="0"): 1.0,
        L(**out, classification="success", grpc_status="5"): 1.0,
        L(**out, classification="failure", grpc_status="14"): 1.0,
        L(**out, classification="failure", grpc_status="4"): 1.0,
    }


def test_duration_histogram_buckets_count_and_sum() -> None:
    m = ProxyMetrics()
    svc = dict(direction="outbound", service="api.prod", route="default")
    # 0.001 sits exactly on a bound: buckets are inclusive (le).
    for duration, code in [(0.001, 200), (0.003, 201), (0.003, 404), (0.2, 200), (45.0, 200)]:
        m.request_finished("outbound", "api.prod", "default", code, duration, 0, 0)
    m.request_finished("outbound", "api.prod", "default", 502, 0.04, 0, 0)

    samples = scrape(m)
    buckets = series(samples, "meshproxy_request_duration_seconds_bucket")
    ok = dict(svc, classification="success")
    expected_ok = {
        "0.001": 1, "0.0025": 1, "0.005": 3, "0.01": 3, "0.025": 3, "0.05": 3,
        "0.1": 3, "0.25": 4, "0.5": 4, "1.0": 4, "2.5": 4, "5.0": 4, "10.0": 4,
        "30.0": 4, "+Inf": 5,
    }
    assert {le: buckets[L(**ok, le=le)] for le in expected_ok} == expected_ok
    assert samples[("meshproxy_request_duration_seconds_count", L(**ok))] == 5
    assert abs(samples[("meshproxy_request_duration_seconds_sum", L(**ok))] - 45.207) < 1e-9

    bad = dict(svc, classification="failure")
    bad_buckets = {dict(k)["le"]: v for k, v in buckets.items() if dict(k)["classification"] == "failure"}
    assert bad_buckets["0.025"] == 0 and bad_buckets["0.05"] == 1 and bad_buckets["+Inf"] == 1
    assert samples[("meshproxy_request_duration_seconds_count", L(**bad))] == 1
    assert samples[("meshproxy_request_duration_seconds_sum", L(**bad))] == 0.04
    # One series per bound plus +Inf, per classification.
    assert len(buckets) == 2 * (len(DURATION_BUCKETS) + 1)


def test_bytes_summed_per_direction_and_service() -> None:
    m = ProxyMetrics()
    m.request_finished("outbound", "a.ns", "ns/r/0", 200, 0.01, 100, 1000)
    m.request_finished("outbound", "a.ns", "ns/r/1", 500, 0.01, 50, 7)
    m.request_finished("inbound", "a.ns", "default", 200, 0.01, 3, 4)
    m.request_finished("outbound", "b.ns", "default", 200, 0.01, 0, 0)

    samples = scrape(m)
    assert series(samples, "meshproxy_request_bytes_total") == {
        L(direction="outbound", service="a.ns"): 150,
        L(direction="inbound", service="a.ns"): 3,
        L(direction="outbound", service="b.ns"): 0,
    }
    assert series(samples, "meshproxy_response_bytes_total") == {
        L(direction="outbound", service="a.ns"): 1007,
        L(direction="inbound", service="a.ns"): 4,
        L(direction="outbound", service="b.ns"): 0,
    }


def test_open_connections_gauge_goes_up_and_down() -> None:
    m = ProxyMetrics()
    for _ in range(3):
        m.connection_opened("inbound", True)
    m.connection_opened("inbound", False)
    m.connection_opened("outbound", False)
    m.connection_closed("inbound", True)
    m.connection_closed("outbound", False)

    assert series(scrape(m), "meshproxy_tcp_connections_open") == {
        L(direction="inbound", tls="true"): 2,
        L(direction="inbound", tls="false"): 1,
        L(direction="outbound", tls="false"): 0,
    }
    m.connection_closed("inbound", True)
    m.connection_closed("inbound", True)
    assert series(scrape(m), "meshproxy_tcp_connections_open")[L(direction="inbound", tls="true")] == 0


def test_retries_ejections_handshakes() -> None:
    m = ProxyMetrics()
    m.retry("a.ns", "5xx")
    m.retry("a.ns", "5xx")
    m.retry("a.ns", "connect-failure")
    m.retry_budget_exhausted("a.ns")
    m.endpoint_ejected("a.ns", "10.0.0.1:8080")
    m.endpoint_ejected("a.ns", "10.0.0.1:8080")
    m.endpoint_ejected("a.ns", "10.0.0.2:8080")
    m.tls_handshake("inbound", "ok")
    m.tls_handshake("inbound", "error")
    m.tls_handshake("inbound", "ok")

    samples = scrape(m)
    assert series(samples, "meshproxy_retries_total") == {
        L(service="a.ns", reason="5xx"): 2,
        L(service="a.ns", reason="connect-failure"): 1,
    }
    assert series(samples, "meshproxy_retries_budget_exhausted_total") == {L(service="a.ns"): 1}
    assert series(samples, "meshproxy_endpoint_ejections_total") == {
        L(service="a.ns", endpoint="10.0.0.1:8080"): 2,
        L(service="a.ns", endpoint="10.0.0.2:8080"): 1,
    }
    assert series(samples, "meshproxy_tls_handshakes_total") == {
        L(direction="inbound", result="ok"): 2,
        L(direction="inbound", result="error"): 1,
    }


def test_endpoint_states_are_replaced_and_removed() -> None:
    m = ProxyMetrics()
    m.set_endpoints("a.ns", ready=3, ejected=1, probing=0)
    m.set_endpoints("b.ns", ready=1, ejected=0, probing=1)
    m.set_endpoints("a.ns", ready=2, ejected=1, probing=1)
    assert series(scrape(m), "meshproxy_endpoints") == {
        L(service="a.ns", state="ready"): 2,
        L(service="a.ns", state="ejected"): 1,
        L(service="a.ns", state="probing"): 1,
        L(service="b.ns", state="ready"): 1,
        L(service="b.ns", state="ejected"): 0,
        L(service="b.ns", state="probing"): 1,
    }
    m.remove_endpoints("b.ns")
    m.remove_endpoints("never-seen.ns")
    assert {dict(k)["service"] for k in series(scrape(m), "meshproxy_endpoints")} == {"a.ns"}


def test_config_version_errors_and_cert_expiry() -> None:
    m = ProxyMetrics()
    m.set_config_version("v1")
    m.set_config_version("v2")
    m.config_error()
    m.config_error()
    m.set_cert_expiry(1_700_000_000.5)

    samples = scrape(m)
    assert series(samples, "meshproxy_config_version_info") == {L(version="v2"): 1}
    assert samples[("meshproxy_config_errors_total", frozenset())] == 2
    assert samples[("meshproxy_cert_expiry_timestamp_seconds", frozenset())] == 1_700_000_000.5


def test_instances_do_not_share_numbers() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    a.config_error()
    a.request_finished("inbound", "x.ns", "default", 200, 0.01, 1, 1)
    assert a.registry is not b.registry
    assert scrape(b) == {("meshproxy_config_errors_total", frozenset()): 0.0}


def test_label_values_are_escaped() -> None:
    m = ProxyMetrics()
    m.request_finished("outbound", 'we"ird\\.ns', "default", 200, 0.01, 0, 0)
    requests = series(scrape(m), "meshproxy_requests_total")
    assert {dict(k)["service"] for k in requests} == {'we"ird\\.ns'}


def test_request_finished_cost() -> None:
    """Not a limit: prints the per-call cost (run with -s to see it)."""
    m = ProxyMetrics()
    call = m.request_finished
    n = 200_000
    seconds = min(
        timeit.repeat(
            lambda: call("outbound", "cart.shop", "shop/checkout/0", 200, 0.012, 120, 3400),
            number=n,
            repeat=3,
        )
    )
    print(f"\nrequest_finished: {seconds / n * 1e6:.2f} us per call (incl. lambda)")
    assert series(scrape(m), "meshproxy_requests_total") == {
        L(direction="outbound", service="cart.shop", route="shop/checkout/0",
          code="200", classification="success", grpc_status=""): 3 * n,
    }
