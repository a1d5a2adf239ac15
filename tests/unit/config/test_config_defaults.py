"""Every default of spec §3 is filled in where the file says nothing."""

from __future__ import annotations

import pytest

from meshproxy.config import TrafficPolicy, load_text
from meshproxy.config.model.mesh import SidecarPorts

HEAD = "apiVersion: meshproxy.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\n"


def policy(spec: str) -> TrafficPolicy:
    snap = load_text(HEAD + spec)
    [found] = snap.resources
    assert isinstance(found, TrafficPolicy)
    return found


def test_an_empty_traffic_policy_has_every_default() -> None:
    p = policy("spec: {}\n")
    assert (p.load_balancer.type, p.load_balancer.decay, p.load_balancer.default_rtt) == ("PeakEWMA", 10.0, 0.030)
    pool = p.connection_pool
    assert pool.connect_timeout == 2.0
    assert pool.idle_timeout is None
    assert (pool.max_connections, pool.max_pending_requests, pool.max_requests) == (1024, 1024, 1024)
    assert pool.max_request_body_bytes is None
    assert (p.timeouts.request, p.timeouts.per_try) == (None, None)
    assert p.retry.attempts == 2
    assert p.retry.on == ("connect-failure", "reset", "502", "503", "504")
    assert p.retry.non_idempotent is False
    assert (p.retry.backoff.base, p.retry.backoff.max) == (0.025, 0.250)
    assert (p.retry.budget.percent, p.retry.budget.min_per_second) == (20.0, 10.0)
    cb = p.circuit_breaker
    assert (cb.consecutive_failures, cb.base_ejection_time, cb.max_ejection_time, cb.max_ejection_percent) == (
        5, 5.0, 60.0, 50)
    assert p.target_ref is None
    # The built-in defaults (no policy at all) are the same values.
    assert TrafficPolicy(metadata=p.metadata, source=p.source) == p


def test_idle_timeout_depends_on_the_peer_unless_configured() -> None:
    pool = policy("spec: {}\n").connection_pool
    assert (pool.idle_timeout_for(meshed=True), pool.idle_timeout_for(meshed=False)) == (60.0, 1.5)
    pool = policy("spec:\n  connectionPool: {idleTimeout: 30s}\n").connection_pool
    assert (pool.idle_timeout_for(meshed=True), pool.idle_timeout_for(meshed=False)) == (30.0, 30.0)


def test_a_partial_section_keeps_the_other_defaults() -> None:
    p = policy("spec:\n  retry:\n    attempts: 5\n    backoff: {max: 1s}\n  circuitBreaker: {consecutiveFailures: 3}\n")
    assert p.retry.attempts == 5
    assert p.retry.on == ("connect-failure", "reset", "502", "503", "504")
    assert (p.retry.backoff.base, p.retry.backoff.max) == (0.025, 1.0)
    assert p.retry.budget.percent == 20.0
    assert (p.circuit_breaker.consecutive_failures, p.circuit_breaker.max_ejection_time) == (3, 60.0)


@pytest.mark.parametrize("spec", ["spec:\n  timeouts: {request: 0s, perTry: 0s}\n", "spec:\n  timeouts: {}\n"])
def test_zero_timeouts_mean_none(spec: str) -> None:
    assert policy(spec).timeouts.request is None
    assert policy(spec).timeouts.per_try is None


def test_retry_on_accepts_numbers_as_codes() -> None:
    assert policy("spec:\n  retry: {on: [connect-failure, 503, '429']}\n").retry.on == (
        "connect-failure", "503", "429")


MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - name: web
      instances:
        - name: web-0
          app: {address: "[::1]:9000", command: [python3, -m, http.server, 9000]}
        - {name: web-1, labels: {version: v2}, app: {address: localhost:9001}, sidecar: false}
        - {name: web-2, app: {address: 127.0.0.1:9002}, sidecar: {inbound: 15106}}
"""


def test_mesh_defaults() -> None:
    snap = load_text(MESH)
    mesh = snap.mesh
    assert mesh is not None
    assert mesh.trust_domain == "cluster.local"
    assert mesh.control_plane.listen == "127.0.0.1:15010"
    assert mesh.mtls_mode is None
    assert mesh.outbound_traffic_policy == snap.outbound_traffic_policy == "ALLOW_ANY"
    assert mesh.policies == ()
    web = snap.services["web.default"]
    assert (web.name, web.namespace, web.port, web.addresses, web.key) == ("web", "default", 80, (), "web.default")
    i0, i1, i2 = web.instances
    assert (i0.app_host, i0.app_port, i0.app_address) == ("::1", 9000, "[::1]:9000")
    assert i0.command == ("python3", "-m", "http.server", "9000")
    assert (i0.meshed, i0.sidecar_ports, dict(i0.labels)) == (True, SidecarPorts(), {})
    assert (i1.meshed, i1.command, i1.app_host, dict(i1.labels)) == (False, None, "localhost", {"version": "v2"})
    assert (i2.meshed, i2.sidecar_ports) == (True, SidecarPorts(inbound=15106))


ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules:
    - backendRefs: [{name: web-v1}, {name: web-v2, namespace: other, weight: 3}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https}
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow}, percent: 10}
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      retry: {attempts: 1}
"""


def test_route_defaults() -> None:
    [route] = load_text(ROUTE).resources
    [parent] = route.parent_refs
    assert (parent.kind, parent.group, parent.namespace, parent.port, parent.service_key) == (
        "Service", "", "shop", None, "web.shop")
    [rule] = route.rules
    assert rule.name is None
    [match] = rule.matches
    assert (match.path.type, match.path.value, match.headers, match.query_params, match.method) == (
        "PathPrefix", "/", (), (), None)
    v1, v2 = rule.backend_refs
    assert (v1.service_key, v1.port, v1.weight) == ("web-v1.shop", None, 1)
    assert (v2.service_key, v2.weight) == ("web-v2.other", 3)
    redirect, mirror, rewrite = rule.filters
    assert redirect.request_redirect.status_code == 302
    assert (redirect.request_redirect.scheme, redirect.request_redirect.port) == ("https", None)
    assert mirror.request_mirror.backend_ref.service_key == "shadow.shop"
    assert mirror.request_mirror.ratio == 0.1
    assert rewrite.url_rewrite.path.replace_prefix_match == "/v2"
    assert (rule.retry.attempts, rule.retry.codes, rule.retry.backoff) == (1, (), None)
    assert rule.timeouts is None
    assert route.rule_label(0) == "shop/r/0"


def test_a_route_without_rules_matches_everything() -> None:
    text = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n" \
           "spec: {parentRefs: [{kind: Service, name: web}]}\n"
    [route] = load_text(text).resources
    [rule] = route.rules
    assert rule.matches[0].path.value == "/"
    assert rule.backend_refs == ()


def test_authorization_policy_defaults_and_principal_prefix() -> None:
    text = """\
apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  rules:
    - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/x", "*/sa/y"]}}]
"""
    [policy] = load_text(text).resources
    assert policy.action == "ALLOW"
    assert policy.target_ref is None
    [rule] = policy.rules
    assert rule.from_[0].principals == ("cluster.local/ns/default/sa/x", "*/sa/y")
    assert rule.to == ()
