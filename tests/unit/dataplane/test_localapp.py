"""The local app as an endpoint (dataplane/localapp.py): one plaintext endpoint with a short
idle timeout and the policy's connect timeout, no resilience, kept across snapshots at the
same address. No sockets: pools only keep the loop for later connections."""

from __future__ import annotations

import random
from types import SimpleNamespace

from meshproxy.config import Snapshot
from meshproxy.config.loader import load_text
from meshproxy.dataplane.destinations import IDLE_TO_APP
from meshproxy.dataplane.localapp import local_app_runtime
from meshproxy.observability.metrics import ProxyMetrics
from meshproxy.policy.balancer import RoundRobinBalancer

LOOP = SimpleNamespace(time=lambda: 0.0)
METRICS = ProxyMetrics()
KEY = "web.default"
POLICY = Snapshot().policy_for(KEY)
TUNED = load_text("""
apiVersion: meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web}
  connectionPool: {connectTimeout: 500ms}
""").policy_for(KEY)


def runtime(app, old=None, policy=POLICY):
    return local_app_runtime(KEY, policy, app, instance="web-0", old=old, loop=LOOP,
                             metrics=METRICS, rng=random.Random(1))


def test_the_app_is_one_plaintext_endpoint_with_the_apps_timeouts() -> None:
    r = runtime(("127.0.0.1", 8080))
    assert r.key == KEY and r.policy is POLICY
    assert isinstance(r.balancer, RoundRobinBalancer)
    [endpoint] = r.endpoints
    assert (endpoint.key, endpoint.host, endpoint.port) == ("127.0.0.1:8080", "127.0.0.1", 8080)
    assert endpoint.meshed is False and endpoint.instance == "web-0"
    pool = endpoint.pool
    assert (pool.host, pool.port, pool.loop, pool.metrics) == ("127.0.0.1", 8080, LOOP, METRICS)
    assert pool.idle_timeout == IDLE_TO_APP
    assert pool.connect_timeout == POLICY.connection_pool.connect_timeout
    assert pool.tls is None and pool.expected_id is None  # no mTLS to the app
    assert endpoint.load.key == "127.0.0.1:8080"


def test_the_app_has_no_resilience_and_no_limits() -> None:
    r = runtime(("127.0.0.1", 8080))
    assert r.breaker is None
    assert r.at_connection_limit() is False


def test_an_ipv6_address_is_bracketed_in_the_key() -> None:
    [endpoint] = runtime(("::1", 8080)).endpoints
    assert endpoint.key == "[::1]:8080"


def test_no_app_address_is_no_endpoint() -> None:
    r = runtime(None)
    assert r.endpoints == [] and r.key == KEY


def test_a_new_snapshot_keeps_the_endpoint_at_the_same_address() -> None:
    old = runtime(("127.0.0.1", 8080))
    new = runtime(("127.0.0.1", 8080), old, TUNED)
    assert new is not old and new.policy is TUNED
    assert new.endpoints[0] is old.endpoints[0]  # load and pooled connections kept


def test_another_address_gets_a_new_endpoint_under_the_new_policy() -> None:
    old = runtime(("127.0.0.1", 8080))
    new = runtime(("127.0.0.1", 9090), old, TUNED)
    assert new.endpoints[0] is not old.endpoints[0]
    assert new.endpoints[0].pool.connect_timeout == 0.5
    assert runtime(("127.0.0.1", 8080), runtime(None)).endpoints[0].port == 8080
    assert runtime(None, old).endpoints == []  # no address: the old endpoint is not used
