"""When the proxy renews its certificate, and where it asks for one (pure parts of
meshproxy/identity/client.py)."""

from __future__ import annotations

import random

import pytest

from meshproxy.identity.client import certificates_target, renewal_time


def test_renewal_is_at_70_to_75_percent_of_the_lifetime():
    times = [renewal_time(1000.0, 1000.0 + 86400, random.Random(seed)) for seed in range(200)]
    assert all(1000 + 0.70 * 86400 <= t <= 1000 + 0.75 * 86400 for t in times)
    assert max(times) - min(times) > 0.03 * 86400  # jitter spreads proxies started together


def test_the_schedule_is_the_same_for_the_same_random_source():
    assert renewal_time(0.0, 100.0, random.Random(3)) == renewal_time(0.0, 100.0, random.Random(3))


def test_without_jitter_renewal_is_at_exactly_70_percent():
    assert renewal_time(500.0, 510.0, random.Random(1), jitter=0.0) == pytest.approx(507.0)


def test_a_certificate_received_already_expired_is_due_at_once():
    assert renewal_time(1000.0, 990.0, random.Random(1)) == 1000.0


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:15010", ("127.0.0.1", 15010, "/v1/certificates")),
    ("http://control", ("control", 15010, "/v1/certificates")),
    ("control:8080", ("control", 8080, "/v1/certificates")),
    ("http://[::1]:9000/mesh/", ("::1", 9000, "/mesh/v1/certificates")),
])
def test_the_certificates_endpoint_is_found_from_the_control_url(url, expected):
    assert certificates_target(url) == expected


@pytest.mark.parametrize("url", ["https://control:15010", "http://", "ftp://x"])
def test_a_url_that_is_not_plain_http_is_refused(url):
    with pytest.raises(ValueError, match="http://HOST"):
        certificates_target(url)
