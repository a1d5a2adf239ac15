"""`meshproxy check --explain`: which route, rule, backends and filters a request gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.config import load_config
from meshproxy.policy.explain import ExplainError, explain, parse_request

EXAMPLES = Path(__file__).resolve().parents[2] / "spec_examples"


@pytest.fixture(scope="module")
def snapshot():
    return load_config([str(EXAMPLES)])


def test_parse_request_reads_method_url_and_headers() -> None:
    assert parse_request("get http://delivery:80/a/b?x=1 -H X-Beta:true -H 'a: b c'") == (
        "GET", "delivery", "/a/b?x=1", {"x-beta": "true", "a": "b c"})
    assert parse_request("GET delivery") == ("GET", "delivery", "/", {})


@pytest.mark.parametrize("text", ["GET", "GET http:///x", "GET http://a -H", "GET http://a -X y",
                                  "GET http://a -H novalue", "GET 'http://a"])
def test_malformed_requests_are_refused(text: str) -> None:
    with pytest.raises(ExplainError):
        parse_request(text)


def test_header_match_wins_and_names_the_rule(snapshot) -> None:
    lines = explain(snapshot, "GET http://delivery/api/deliveries/7 -H x-beta:true")
    assert "matched: route default/delivery, rule beta-testers" in lines[2]
    assert lines[3] == "backend: delivery-v2.default weight 1 (100%)"


def test_split_rule_shows_shares_filters_timeouts_and_retry(snapshot) -> None:
    lines = explain(snapshot, "GET http://delivery.default.svc.cluster.local/api/deliveries/7")
    assert "metrics route label default/delivery/1" in lines[2]
    assert "filter: RequestHeaderModifier set x-route: deliveries" in lines
    assert "backend: delivery-v1.default weight 90 (90%)" in lines
    assert "backend: delivery-v2.default weight 10 (10%)" in lines
    assert "timeouts: request 3s, backendRequest 1s" in lines
    assert "retry: attempts 3, codes 502 503 504, backoff 50ms" in lines


def test_unmatched_request_is_a_404(snapshot) -> None:
    assert explain(snapshot, "GET http://delivery/other")[-1] == "matched: no rule -> 404 no-route"


def test_service_without_routes_and_unknown_hosts(snapshot) -> None:
    assert "balanced across the Service's endpoints: account-0 127.0.0.1:9041" in \
        explain(snapshot, "GET http://account/x")[-1]
    assert "passed through unchanged (ALLOW_ANY)" in explain(snapshot, "GET http://example.com/")[-1]


def test_check_explain_on_the_command_line() -> None:
    ok = subprocess.run([sys.executable, "-m", "meshproxy", "check", str(EXAMPLES), "--explain",
                         "GET http://delivery/api/deliveries/7 -H x-beta:true"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "rule beta-testers" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "meshproxy", "check", str(EXAMPLES), "--explain",
                          "GET"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "--explain" in bad.stderr
