"""meshproxy stat's arithmetic: scrapes in, golden metrics per Service out (no sockets)."""

from __future__ import annotations

import math
from textwrap import dedent

import pytest

from meshproxy.observability.metrics import ProxyMetrics
from meshproxy.observability.stat import (
    ProxyWindow,
    Scrape,
    StatRow,
    compute_rows,
    histogram_quantile,
    increase,
    parse_scrape,
)

# One proxy of Service web, scraped twice 2 s apart. Between the scrapes it served 40
# successes and 10 failures inbound; the summed bucket increases are
# le=0.01: 10, le=0.05: 30, le=0.1: 50, +Inf: 50. It also called db 5 times (outbound).
WEB_T1 = dedent("""\
    # HELP meshproxy_requests_total Requests finished, by status code and outcome.
    # TYPE meshproxy_requests_total counter
    meshproxy_requests_total{classification="success",code="200",direction="inbound",route="default",service="web.default"} 100.0
    meshproxy_requests_total{classification="failure",code="500",direction="inbound",route="default",service="web.default"} 20.0
    meshproxy_requests_total{classification="success",code="200",direction="outbound",route="default",service="db.default"} 7.0
    # HELP meshproxy_request_duration_seconds Time from the request's first byte to the response's last byte.
    # TYPE meshproxy_request_duration_seconds histogram
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="0.01",route="default",service="web.default"} 50.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="0.05",route="default",service="web.default"} 90.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="0.1",route="default",service="web.default"} 100.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="+Inf",route="default",service="web.default"} 100.0
    meshproxy_request_duration_seconds_count{classification="success",direction="inbound",route="default",service="web.default"} 100.0
    meshproxy_request_duration_seconds_sum{classification="success",direction="inbound",route="default",service="web.default"} 2.5
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="0.01",route="default",service="web.default"} 20.0
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="0.05",route="default",service="web.default"} 20.0
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="0.1",route="default",service="web.default"} 20.0
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="+Inf",route="default",service="web.default"} 20.0
    meshproxy_request_duration_seconds_count{classification="failure",direction="inbound",route="default",service="web.default"} 20.0
    meshproxy_request_duration_seconds_sum{classification="failure",direction="inbound",route="default",service="web.default"} 0.1
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="0.01",route="default",service="db.default"} 7.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="0.05",route="default",service="db.default"} 7.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="0.1",route="default",service="db.default"} 7.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="+Inf",route="default",service="db.default"} 7.0
    meshproxy_request_duration_seconds_count{classification="success",direction="outbound",route="default",service="db.default"} 7.0
    meshproxy_request_duration_seconds_sum{classification="success",direction="outbound",route="default",service="db.default"} 0.02
    # HELP meshproxy_request_bytes_total Request body bytes.
    # TYPE meshproxy_request_bytes_total counter
    meshproxy_request_bytes_total{direction="inbound",service="web.default"} 4096.0
    # HELP meshproxy_tcp_connections_open Open TCP connections.
    # TYPE meshproxy_tcp_connections_open gauge
    meshproxy_tcp_connections_open{direction="inbound",tls="false"} 3.0
""")

WEB_T2 = dedent("""\
    # TYPE meshproxy_requests_total counter
    meshproxy_requests_total{classification="success",code="200",direction="inbound",route="default",service="web.default"} 140.0
    meshproxy_requests_total{classification="failure",code="500",direction="inbound",route="default",service="web.default"} 30.0
    meshproxy_requests_total{classification="success",code="200",direction="outbound",route="default",service="db.default"} 12.0
    # TYPE meshproxy_request_duration_seconds histogram
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="0.01",route="default",service="web.default"} 50.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="0.05",route="default",service="web.default"} 110.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="0.1",route="default",service="web.default"} 140.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="inbound",le="+Inf",route="default",service="web.default"} 140.0
    meshproxy_request_duration_seconds_count{classification="success",direction="inbound",route="default",service="web.default"} 140.0
    meshproxy_request_duration_seconds_sum{classification="success",direction="inbound",route="default",service="web.default"} 4.5
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="0.01",route="default",service="web.default"} 30.0
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="0.05",route="default",service="web.default"} 30.0
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="0.1",route="default",service="web.default"} 30.0
    meshproxy_request_duration_seconds_bucket{classification="failure",direction="inbound",le="+Inf",route="default",service="web.default"} 30.0
    meshproxy_request_duration_seconds_count{classification="failure",direction="inbound",route="default",service="web.default"} 30.0
    meshproxy_request_duration_seconds_sum{classification="failure",direction="inbound",route="default",service="web.default"} 0.15
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="0.01",route="default",service="db.default"} 12.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="0.05",route="default",service="db.default"} 12.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="0.1",route="default",service="db.default"} 12.0
    meshproxy_request_duration_seconds_bucket{classification="success",direction="outbound",le="+Inf",route="default",service="db.default"} 12.0
    meshproxy_request_duration_seconds_count{classification="success",direction="outbound",route="default",service="db.default"} 12.0
    meshproxy_request_duration_seconds_sum{classification="success",direction="outbound",route="default",service="db.default"} 0.04
""")

WEB_SUCCESS_INBOUND = (
    ("classification", "success"), ("code", "200"), ("direction", "inbound"),
    ("route", "default"), ("service", "web.default"),
)
WEB_SUCCESS_DURATIONS = (
    ("classification", "success"), ("direction", "inbound"), ("route", "default"),
    ("service", "web.default"),
)


def request_line(service: str, code: int, value: float, direction: str = "inbound",
                 route: str = "default") -> str:
    classification = "failure" if code >= 500 else "success"
    return (f'meshproxy_requests_total{{classification="{classification}",code="{code}",'
            f'direction="{direction}",route="{route}",service="{service}"}} {value}\n')


def bucket_lines(service: str, counts: dict[str, float], direction: str = "inbound",
                 classification: str = "success", route: str = "default") -> str:
    return "".join(
        f'meshproxy_request_duration_seconds_bucket{{classification="{classification}",'
        f'direction="{direction}",le="{le}",route="{route}",service="{service}"}} {count}\n'
        for le, count in counts.items()
    )


def window(earlier: str, later: str, seconds: float = 2.0, service: str | None = None):
    return ProxyWindow(increase(parse_scrape(earlier), parse_scrape(later)), seconds, service)


# -- parsing ------------------------------------------------------------------------------------

def test_parse_keeps_the_request_series_and_their_buckets():
    scrape = parse_scrape(WEB_T1)
    assert scrape.requests[WEB_SUCCESS_INBOUND] == 100.0
    assert len(scrape.requests) == 3  # bytes and connections are not request series
    assert scrape.durations[WEB_SUCCESS_DURATIONS] == (
        (0.01, 50.0), (0.05, 90.0), (0.1, 100.0), (math.inf, 100.0),
    )
    assert len(scrape.durations) == 3


def test_parse_sorts_buckets_by_bound_whatever_their_order_in_the_text():
    text = bucket_lines("web.default", {"+Inf": 4, "0.1": 3, "0.01": 1})
    [buckets] = parse_scrape(text).durations.values()
    assert buckets == ((0.01, 1.0), (0.1, 3.0), (math.inf, 4.0))


def test_parse_of_an_empty_answer_has_no_series():
    assert parse_scrape("") == Scrape()


@pytest.mark.parametrize("text", ["<html><body>hello</body></html>\n",
                                  'meshproxy_requests_total{service="a"} many\n'])
def test_parse_rejects_what_is_not_prometheus_text(text):
    with pytest.raises(ValueError):
        parse_scrape(text)


# -- histogram_quantile ---------------------------------------------------------------------

PROM_EXAMPLE = [(0.05, 0.0), (0.1, 50.0), (0.25, 90.0), (0.5, 100.0), (math.inf, 100.0)]


@pytest.mark.parametrize("q, expected", [
    (0.5, 0.1),      # rank 50 ends the (0.05, 0.1] bucket
    (0.7, 0.175),    # rank 70: 20 of the 40 in (0.1, 0.25]
    (0.95, 0.375),   # rank 95: 5 of the 10 in (0.25, 0.5]
    (0.99, 0.475),
    (1.0, 0.5),
])
def test_quantile_interpolates_within_the_bucket_of_its_rank(q, expected):
    assert histogram_quantile(q, PROM_EXAMPLE) == pytest.approx(expected)


def test_quantile_in_the_first_bucket_starts_from_zero():
    assert histogram_quantile(0.25, [(0.2, 10.0), (math.inf, 10.0)]) == pytest.approx(0.05)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound():
    assert histogram_quantile(0.5, [(0.1, 1.0), (30.0, 2.0), (math.inf, 10.0)]) == 30.0


def test_quantile_in_a_first_bucket_with_a_negative_bound_is_that_bound():
    assert histogram_quantile(0.1, [(-1.0, 5.0), (math.inf, 10.0)]) == -1.0


def test_quantile_sorts_and_sums_buckets_with_equal_bounds():
    # Two series' buckets handed over together: like (0.1: 5, 0.2: 10, +Inf: 10).
    buckets = [(math.inf, 6.0), (0.1, 3.0), (0.2, 6.0), (0.1, 2.0), (0.2, 4.0), (math.inf, 4.0)]
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)


def test_quantile_makes_counts_monotonic():
    buckets = [(0.1, 6.0), (0.2, 5.0), (math.inf, 10.0)]  # read as 6, 6, 10
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 * 5 / 6)
    assert histogram_quantile(0.9, buckets) == 0.2


@pytest.mark.parametrize("buckets", [
    [],
    [(math.inf, 10.0)],                       # one bucket only
    [(0.1, 5.0), (0.2, 10.0)],                # no +Inf bucket
    [(0.1, 0.0), (math.inf, 0.0)],            # no observations
])
def test_quantile_is_nan_when_undefined(buckets):
    assert math.isnan(histogram_quantile(0.5, buckets))


def test_quantile_outside_zero_to_one():
    assert histogram_quantile(-0.1, PROM_EXAMPLE) == -math.inf
    assert histogram_quantile(1.1, PROM_EXAMPLE) == math.inf
    assert math.isnan(histogram_quantile(math.nan, PROM_EXAMPLE))


# -- increase -----------------------------------------------------------------------------------

def test_increase_is_the_difference_series_by_series():
    counted = increase(parse_scrape(WEB_T1), parse_scrape(WEB_T2))
    assert counted.requests[WEB_SUCCESS_INBOUND] == 40.0
    assert counted.durations[WEB_SUCCESS_DURATIONS] == (
        (0.01, 0.0), (0.05, 20.0), (0.1, 40.0), (math.inf, 40.0),
    )


def test_a_series_created_between_the_scrapes_counts_whole():
    earlier = request_line("web.default", 200, 9)
    later = earlier + request_line("web.default", 200, 4, route="default/web/1")
    counted = increase(parse_scrape(earlier), parse_scrape(later))
    assert sorted(counted.requests.values()) == [0.0, 4.0]


def test_a_counter_that_went_down_was_reset_and_its_new_value_is_the_increase():
    counted = increase(parse_scrape(request_line("web.default", 200, 500)),
                       parse_scrape(request_line("web.default", 200, 7)))
    assert list(counted.requests.values()) == [7.0]


def test_a_histogram_reset_takes_every_bucket_of_the_later_scrape():
    # Only le=0.01 went down, yet the whole histogram restarted with the proxy.
    earlier = bucket_lines("web.default", {"0.01": 5, "0.1": 6, "+Inf": 6})
    later = bucket_lines("web.default", {"0.01": 1, "0.1": 8, "+Inf": 9})
    [buckets] = increase(parse_scrape(earlier), parse_scrape(later)).durations.values()
    assert buckets == ((0.01, 1.0), (0.1, 8.0), (math.inf, 9.0))


# -- rows ---------------------------------------------------------------------------------------

def test_inbound_row_over_a_window():
    [row] = compute_rows([window(WEB_T1, WEB_T2, seconds=2.0)], "inbound")
    assert row == StatRow(service="web.default", direction="inbound", instances=1,
                          requests=50, rps=pytest.approx(25.0),
                          success_rate=pytest.approx(0.8),
                          p50_ms=pytest.approx(40.0),     # rank 25: 15 of the 20 in (10, 50]
                          p95_ms=pytest.approx(93.75),    # rank 47.5: 17.5 of 20 in (50, 100]
                          p99_ms=pytest.approx(98.75))


def test_outbound_rows_come_from_the_callers_outbound_series():
    [row] = compute_rows([window(WEB_T1, WEB_T2, seconds=2.0)], "outbound")
    assert (row.service, row.direction, row.instances, row.requests) == (
        "db.default", "outbound", 1, 5)
    assert row.rps == pytest.approx(2.5)
    assert row.success_rate == 1.0
    assert row.p50_ms == pytest.approx(5.0)  # all 5 in (0, 10]: rank 2.5 of 5


def test_totals_since_start_have_no_rate():
    [row] = compute_rows([ProxyWindow(parse_scrape(WEB_T2), None)], "inbound")
    assert row.requests == 170
    assert row.success_rate == pytest.approx(140 / 170)
    assert row.rps is None
    # +Inf 170; rank 85 is 5 of the 60 in (10, 50] (after the 80 at or below 10 ms).
    assert row.p50_ms == pytest.approx(10 + 40 * 5 / 60)


def test_instances_of_one_service_are_summed_before_the_quantile():
    fast = request_line("web.default", 200, 10) + bucket_lines(
        "web.default", {"0.01": 10, "0.1": 10, "+Inf": 10})
    slow = request_line("web.default", 200, 30) + request_line("web.default", 503, 10) + (
        bucket_lines("web.default", {"0.01": 0, "0.1": 30, "+Inf": 30})
        + bucket_lines("web.default", {"0.01": 0, "0.1": 10, "+Inf": 10},
                       classification="failure"))
    rows = compute_rows([window("", fast, seconds=2.0), window("", slow, seconds=4.0)],
                        "inbound")
    assert [(r.service, r.instances, r.requests) for r in rows] == [("web.default", 2, 50)]
    [row] = rows
    assert row.rps == pytest.approx(10 / 2 + 40 / 4)  # each proxy over its own window
    assert row.success_rate == pytest.approx(0.8)
    # Summed buckets: 10 at or below 10 ms, 40 in (10, 100]; rank 25 is the 15th of those 40.
    assert row.p50_ms == pytest.approx(10 + 90 * 15 / 40)


def test_a_proxy_restarted_between_scrapes_counts_what_it_served_since():
    before = request_line("web.default", 200, 1000) + bucket_lines(
        "web.default", {"0.01": 1000, "+Inf": 1000})
    after = request_line("web.default", 200, 6) + request_line("web.default", 500, 2) + (
        bucket_lines("web.default", {"0.01": 6, "+Inf": 6})
        + bucket_lines("web.default", {"0.01": 2, "+Inf": 2}, classification="failure"))
    [row] = compute_rows([window(before, after, seconds=2.0)], "inbound")
    assert (row.requests, row.rps, row.success_rate) == (8, 4.0, 0.75)


def test_services_are_rows_of_their_own_sorted_by_name():
    text = request_line("web.default", 200, 3) + request_line("api.shop", 200, 1)
    rows = compute_rows([window("", text)], "inbound")
    assert [row.service for row in rows] == ["api.shop", "web.default"]


def test_an_instance_known_from_the_control_plane_counts_even_without_traffic():
    busy = window("", request_line("web.default", 200, 4), service="web.default")
    idle = window("", "", service="web.default")
    other = window("", "", service="db.default")
    rows = compute_rows([busy, idle, other], "inbound")
    assert [(r.service, r.instances, r.requests) for r in rows] == [
        ("db.default", 1, 0), ("web.default", 2, 4)]
    db = rows[0]
    assert (db.rps, db.success_rate, db.p50_ms, db.p99_ms) == (0.0, None, None, None)


def test_a_service_without_requests_in_the_window_has_no_success_rate_or_latency():
    text = request_line("web.default", 200, 5) + bucket_lines(
        "web.default", {"0.01": 5, "+Inf": 5})
    [row] = compute_rows([window(text, text)], "inbound")
    assert (row.instances, row.requests, row.rps) == (1, 0, 0.0)
    assert (row.success_rate, row.p50_ms, row.p95_ms, row.p99_ms) == (None, None, None, None)


def test_nothing_seen_is_no_rows():
    assert compute_rows([], "inbound") == []
    assert compute_rows([window(WEB_T1, WEB_T2)], "inbound")[0].service == "web.default"
    only_outbound = request_line("db.default", 200, 3, direction="outbound")
    assert compute_rows([window("", only_outbound)], "inbound") == []


def test_json_row_has_the_documented_keys():
    [row] = compute_rows([window(WEB_T1, WEB_T2, seconds=3.0)], "inbound")
    assert row.to_json() == {
        "service": "web.default", "direction": "inbound", "instances": 1,
        "rps": 16.666667, "success_rate": 0.8, "p50_ms": 40.0, "p95_ms": 93.75,
        "p99_ms": 98.75, "requests": 50,
    }


# -- the proxy's own exposition ---------------------------------------------------------------

def test_rows_from_what_a_proxy_actually_exposes():
    metrics = ProxyMetrics()
    first = metrics.render()[0].decode()
    for _ in range(4):
        metrics.request_finished("inbound", "web.default", "default", 200, 0.030, 0, 0)
    metrics.request_finished("inbound", "web.default", "default/web/1", 502, 0.003, 0, 0)
    metrics.request_finished("outbound", "db.default", "default", 0, 1.5, 0, 0)
    second = metrics.render()[0].decode()
    inbound = compute_rows([window(first, second, seconds=1.0)], "inbound")
    outbound = compute_rows([window(first, second, seconds=1.0)], "outbound")
    [row] = inbound
    assert (row.service, row.requests, row.rps, row.success_rate) == ("web.default", 5, 5.0, 0.8)
    # Buckets: 1 in (2.5, 5] ms, 4 in (25, 50] ms; rank 2.5 is 1.5 of those 4.
    assert row.p50_ms == pytest.approx(25 + 25 * 1.5 / 4)
    [row] = outbound
    assert (row.service, row.requests, row.success_rate) == ("db.default", 1, 0.0)
    assert row.p50_ms == pytest.approx(1000 + 1500 * 0.5)  # in (1 s, 2.5 s]
