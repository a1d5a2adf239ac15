"""`meshproxy check --explain 'GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H N:V]...'`: which
GRPCRoute rule a gRPC call takes and where it goes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.config import load_text
from meshproxy.policy.explain import ExplainError, explain, parse_grpc_call

EXAMPLES = Path(__file__).resolve().parents[3] / "config" / "examples"

CONFIG = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - {name: delivery, port: 50051}
    - {name: drone, port: 50051, instances: [{name: drone-0, app: {address: 127.0.0.1:9001}}]}
    - {name: drone-v2, port: 50051, instances: [{name: drone-v2-0, app: {address: 127.0.0.1:9002}}]}
    - {name: audit, namespace: ops, port: 50051, instances: [{name: a-0, app: {address: 127.0.0.1:9003}}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: tracking, namespace: default}
spec:
  parentRefs: [{kind: Service, name: delivery, port: 50051}]
  rules:
    - name: watch
      matches:
        - method: {service: drone.Tracking, method: Watch}
      backendRefs: [{name: drone, port: 50051}]
      timeouts: {request: 30s}
      retry: {attempts: 1}
    - matches:
        - method: {type: RegularExpression, service: "drone\\\\..*"}
          headers: [{name: x-canary, value: "true"}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: audit, namespace: ops}, percent: 10}
      backendRefs:
        - {name: drone, port: 50051, weight: 80}
        - {name: drone-v2, port: 50051, weight: 20}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: delivery-http, namespace: default}
spec:
  parentRefs: [{kind: Service, name: delivery}]
  rules: [{backendRefs: [{name: drone}]}]
"""


@pytest.fixture(scope="module")
def snapshot():
    return load_text(CONFIG, "grpc.yaml")


def test_parse_grpc_call() -> None:
    assert parse_grpc_call("GRPC delivery/drone.Tracking/Watch") == (
        "delivery", "drone.Tracking", "Watch", {"content-type": "application/grpc"})
    assert parse_grpc_call("grpc shop/delivery/drone.Tracking/Watch -H X-Canary:true") == (
        "delivery.shop", "drone.Tracking", "Watch", {"content-type": "application/grpc", "x-canary": "true"})
    assert parse_grpc_call("GRPC delivery:50051/a.B/M -H content-type:application/grpc+proto")[3] == {
        "content-type": "application/grpc+proto"}


@pytest.mark.parametrize("text", ["GRPC", "GRPC delivery/Watch", "GRPC a/b/c/d/e", "GRPC delivery//Watch",
                                  "GRPC delivery/a.B/M -H", "GRPC delivery/a.B/M -X y"])
def test_malformed_calls_are_refused(text: str) -> None:
    with pytest.raises(ExplainError):
        explain(load_text(CONFIG), text)


def test_exact_method_names_the_rule_backend_timeouts_and_the_ignored_http_route(snapshot) -> None:
    assert explain(snapshot, "GRPC delivery/drone.Tracking/Watch") == [
        "request: gRPC drone.Tracking/Watch to delivery: POST http://delivery/drone.Tracking/Watch"
        "  -H content-type:application/grpc",
        "service: delivery.default (1 GRPCRoute(s) attached)",
        "ignored: HTTPRoute default/delivery-http (a GRPCRoute is attached to the same Service and takes "
        "precedence, GEP-1426)",
        "matched: GRPCRoute default/tracking, rule watch (metrics route label default/tracking/watch)",
        "match: Exact drone.Tracking/Watch",
        "backend: drone.default weight 1 (100%)",
        "timeouts: request 30s, backendRequest none",
        "retry: attempts 1, backoff none, conditions: the Service's TrafficPolicy retry.on",
    ]


def test_regex_and_header_match_with_a_split_and_a_mirror(snapshot) -> None:
    lines = explain(snapshot, "GRPC default/delivery/drone.Fleet/List -H x-canary:true")
    assert lines[0].startswith("request: gRPC drone.Fleet/List to delivery.default: ")
    assert lines[3:] == [
        "matched: GRPCRoute default/tracking, rule 1 (metrics route label default/tracking/1)",
        "match: RegularExpression service drone\\..*, any method; header x-canary: true",
        "filter: RequestMirror to audit.ops (10% of requests)",
        "backend: drone.default weight 80 (80%)",
        "backend: drone-v2.default weight 20 (20%)",
    ]


def test_a_call_no_rule_matches_is_a_404_and_unimplemented(snapshot) -> None:
    assert explain(snapshot, "GRPC delivery/drone.Fleet/List")[-1] == \
        "matched: no rule -> 404 no-route (gRPC: grpc-status 12 UNIMPLEMENTED)"
    # The same path without the gRPC content-type is a plain request: a 404 alone.
    assert explain(snapshot, "POST http://delivery/drone.Fleet/List")[-1] == "matched: no rule -> 404 no-route"


def test_services_without_routes_and_unknown_ones(snapshot) -> None:
    assert explain(snapshot, "GRPC drone/drone.Tracking/Watch")[-1] == \
        "no routes: balanced across the Service's endpoints: drone-0 127.0.0.1:9001"
    assert "passed through unchanged (ALLOW_ANY)" in explain(snapshot, "GRPC elsewhere/a.B/M")[-1]


def test_http_explain_is_unchanged() -> None:
    snap = load_text(CONFIG.split("---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute")[0]
                     + "---\n" + CONFIG.split("---\n")[-1])
    lines = explain(snap, "GET http://delivery/x")
    assert lines[1] == "service: delivery.default (1 route(s) attached)"
    assert lines[2] == "matched: route default/delivery-http, rule 0 (metrics route label default/delivery-http/0)"


def test_check_explain_grpc_on_the_command_line() -> None:
    ok = subprocess.run([sys.executable, "-m", "meshproxy", "check", "--strict", str(EXAMPLES), "--explain",
                         "GRPC backend/drone.v1.Tracking/Watch"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "matched: GRPCRoute default/backend-grpc, rule watch" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "meshproxy", "check", str(EXAMPLES), "--explain",
                          "GRPC backend/Watch"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "--explain" in bad.stderr
