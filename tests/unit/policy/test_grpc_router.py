"""GRPCRoute matching (spec §9 `GRPCRoute`): Exact and RegularExpression method matches (service
and method, one of them alone), header matches, the Gateway API's GRPCRoute precedence,
weighted backends, filters and mirrors, and a GRPCRoute beside an HTTPRoute on one Service.

Routes are written as YAML and loaded through the configuration loader, so the tests cover the
same path a proxy takes: YAML -> Snapshot.routes_for -> RouteTable -> RouteDecision, the
decision carrying the rule in the HTTPRoute form dataplane/routing.py acts on. Deterministic:
seeded random sources only.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from meshproxy.config import load_text
from meshproxy.config.model.grpcroute import GRPCMethodMatch, GRPCRoute, GRPCRouteMatch
from meshproxy.config.model.route import RouteRule
from meshproxy.policy.router import RouteTable

SERVICE = "svc.default"
GRPC = {"content-type": "application/grpc"}


def grpc_route(name: str, *rules: dict, namespace: str = "default") -> dict:
    """A GRPCRoute document attached to Service `svc` in namespace default."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"parentRefs": [{"kind": "Service", "name": "svc", "namespace": "default"}],
                 "rules": list(rules)},
    }


def http_route(name: str) -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "svc"}],
                     "rules": [{"backendRefs": [{"name": "http-app"}]}]}}


def rule(*matches: dict, name: str | None = None, backends: list | None = None, **extra) -> dict:
    out: dict = {"backendRefs": backends if backends is not None else [{"name": "app", "port": 80}], **extra}
    if matches:
        out["matches"] = list(matches)
    if name is not None:
        out["name"] = name
    return out


def method(service: str | None = None, name: str | None = None, kind: str | None = None, **conditions) -> dict:
    """A GRPCRouteMatch: a method match of `kind` (the CRD default Exact when None)."""
    m: dict = {}
    if kind is not None:
        m["type"] = kind
    if service is not None:
        m["service"] = service
    if name is not None:
        m["method"] = name
    return {"method": m, **conditions}


def hdr(name: str, value: str, kind: str = "Exact") -> dict:
    return {"name": name, "value": value, "type": kind}


def table(*routes: dict) -> RouteTable:
    """The RouteTable of Service svc.default after loading `routes` as one YAML file."""
    snapshot = load_text(yaml.safe_dump_all(routes, sort_keys=False), "routes.yaml")
    return RouteTable(snapshot.routes_for(SERVICE))


def label(routes: RouteTable, path: str, headers: dict | None = None, verb: str = "POST") -> str | None:
    values = {**GRPC, **(headers or {})}
    decision = routes.decide(verb, path, values.get)
    return decision.label if decision is not None else None


# --- matching ---------------------------------------------------------------------------------

MATCHING = [
    pytest.param(method("drone.v1.Tracking", "Watch"),
                 {"/drone.v1.Tracking/Watch": True, "/drone.v1.Tracking/List": False,
                  "/drone.v1.Tracking/Watch/x": False, "/drone.v1.TrackingX/Watch": False,
                  "/drone.v1.Tracking/watch": False},  # case-sensitive
                 id="exact-service-and-method"),
    pytest.param(method("drone.v1.Tracking"),
                 {"/drone.v1.Tracking/Watch": True, "/drone.v1.Tracking/List": True,
                  "/drone.v1.Tracking/": False, "/drone.v1.Tracking": False, "/droneXv1.Tracking/Watch": False,
                  "/drone.v1.Tracking/a/b": False},
                 id="exact-service-only"),
    pytest.param(method(name="Check"),
                 {"/grpc.health.v1.Health/Check": True, "/other.Svc/Check": True,
                  "/other.Svc/CheckAll": False, "/Check": False},
                 id="exact-method-only"),
    pytest.param(method(r"drone\.v1\..*", kind="RegularExpression"),
                 {"/drone.v1.Tracking/Watch": True, "/drone.v1.Fleet/List": True,
                  "/drone.v2.Fleet/List": False, "/drone.v1.a/b/c": False},
                 id="regex-service"),
    pytest.param(method(name="(Get|List).*", kind="RegularExpression"),
                 {"/a.B/GetOne": True, "/a.B/ListAll": True, "/a.B/Watch": False},
                 id="regex-method"),
    pytest.param(method("(?i)drone[.]v1[.]tracking", "Watch", kind="RegularExpression"),
                 {"/Drone.V1.Tracking/Watch": True, "/drone.v1.tracking/Watch": True,
                  "/drone.v1.tracking/watch": False},  # the flag is the service pattern's alone
                 id="regex-with-leading-flags"),
    pytest.param({"headers": [hdr("x-canary", "true")]},
                 {"/any.Service/Any": True},
                 id="headers-only"),
]


@pytest.mark.parametrize(("match", "paths"), MATCHING)
def test_method_matches(match: dict, paths: dict[str, bool]) -> None:
    routes = table(grpc_route("r", rule(match)))
    for path, expected in paths.items():
        headers = {"x-canary": "true"}
        assert (label(routes, path, headers) == "default/r/0") is expected, path


def test_header_matches_exact_regex_and_case_insensitive_names() -> None:
    routes = table(grpc_route("r", rule(method("a.B", headers=[hdr("X-Canary", "true"),
                                                              hdr("x-tenant", "t-[0-9]+", "RegularExpression")]))))
    assert label(routes, "/a.B/M", {"x-canary": "true", "x-tenant": "t-42"}) == "default/r/0"
    assert label(routes, "/a.B/M", {"x-canary": "True", "x-tenant": "t-42"}) is None
    assert label(routes, "/a.B/M", {"x-canary": "true", "x-tenant": "t-42x"}) is None
    assert label(routes, "/a.B/M", {"x-canary": "true"}) is None


def test_a_rule_without_matches_takes_every_call_and_plain_requests() -> None:
    routes = table(grpc_route("r", rule(method("a.B", "M")), rule(name="rest")))
    assert label(routes, "/a.B/M") == "default/r/0"
    assert label(routes, "/c.D/N") == "default/r/rest"
    assert routes.decide("GET", "/health", {}.get).label == "default/r/rest"


def test_no_matching_rule_is_none() -> None:
    routes = table(grpc_route("r", rule(method("a.B", "M"))))
    assert routes
    assert label(routes, "/a.B/N") is None


# --- precedence -------------------------------------------------------------------------------
# In every row both candidates hold for the call, and the one that must win is written last.

PRECEDENCE = [
    pytest.param([grpc_route("r", rule(method("drone.v1.Tracking")), rule(method("drone.v1.Tracking", "Watch")))],
                 "/drone.v1.Tracking/Watch", {}, "default/r/1", id="service-and-method-over-service"),
    pytest.param([grpc_route("r", rule(method(name="Watch")), rule(method("drone.v1.Tracking")))],
                 "/drone.v1.Tracking/Watch", {}, "default/r/1", id="service-characters-before-method-characters"),
    pytest.param([grpc_route("r", rule(method("a.Service")), rule(method("a.LongerService")))],
                 "/a.LongerService/M", {}, "default/r/1", id="only-the-matching-one"),
    pytest.param([grpc_route("r", rule(method(".*", "Watch", kind="RegularExpression", headers=[hdr("x-a", "1")])),
                             rule(method(name="Watch")))],
                 "/drone.v1.Tracking/Watch", {"x-a": "1"}, "default/r/1", id="exact-over-regex"),
    pytest.param([grpc_route("r", rule(method("drone.*", kind="RegularExpression")),
                             rule(method("drone.*", "Watch", kind="RegularExpression")))],
                 "/drone.v1.Tracking/Watch", {}, "default/r/1", id="regex-service-and-method-over-service"),
    pytest.param([grpc_route("r", rule({"headers": [hdr("x-a", "1"), hdr("x-b", "2")]}),
                             rule(method(".*", kind="RegularExpression")))],
                 "/drone.v1.Tracking/Watch", {"x-a": "1", "x-b": "2"}, "default/r/1", id="any-method-match-over-none"),
    pytest.param([grpc_route("r", rule(method("a.B")), rule(method("a.B", headers=[hdr("x-a", "1")])))],
                 "/a.B/M", {"x-a": "1"}, "default/r/1", id="more-headers"),
    pytest.param([grpc_route("r", rule(method("a.B", headers=[hdr("x-a", "1"), hdr("X-A", "2")])),
                             rule(method("a.B", headers=[hdr("x-a", "1"), hdr("x-b", "2")])))],
                 "/a.B/M", {"x-a": "1", "x-b": "2"}, "default/r/1", id="repeated-header-names-count-once"),
    pytest.param([grpc_route("r", rule(method("a.B"), name="first"), rule(method("a.B"), name="second"))],
                 "/a.B/M", {}, "default/r/first", id="rule-order-on-a-tie"),
    pytest.param([grpc_route("old", rule(method("a.B"))), grpc_route("new", rule(method("a.B")))],
                 "/a.B/M", {}, "default/old/0", id="older-route-on-a-tie"),
]


@pytest.mark.parametrize(("routes", "path", "headers", "expected"), PRECEDENCE)
def test_precedence(routes: list[dict], path: str, headers: dict, expected: str) -> None:
    assert label(table(*routes), path, headers) == expected


def test_shadowed_rules_are_found() -> None:
    routes = table(grpc_route("r", rule(method("a.B"), name="one"), rule(method("a.B"), name="two")))
    assert [m.label for m in routes.shadowed()] == ["default/r/two"]


# --- the decision the data plane acts on -----------------------------------------------------------


def test_the_decision_carries_the_rule_in_http_route_form_and_the_match_as_written() -> None:
    routes = table(grpc_route("r", rule(method("a.B", "M"), name="m", timeouts={"request": "30s"},
                                        retry={"attempts": 2, "backoff": "10ms"})))
    decision = routes.decide("POST", "/a.B/M", GRPC.get)
    assert isinstance(decision.rule, RouteRule)
    assert decision.rule.timeouts.request == 30.0 and decision.rule.retry.attempts == 2
    assert decision.label == "default/r/m"
    assert isinstance(decision.matched.route, GRPCRoute)
    assert decision.match == GRPCRouteMatch(GRPCMethodMatch("Exact", "a.B", "M"))
    assert decision.prefix is None


def test_filters_and_mirrors_are_the_rules_and_the_backends() -> None:
    filters = [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]}},
               {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"},
                                                          "fraction": {"numerator": 1, "denominator": 4}}}]
    backends = [{"name": "v1", "filters": [{"type": "ResponseHeaderModifier",
                                            "responseHeaderModifier": {"add": [{"name": "x-b", "value": "2"}]}}]}]
    decision = table(grpc_route("r", rule(method("a.B"), filters=filters, backends=backends))).decide(
        "POST", "/a.B/M", GRPC.get)
    assert [f.type for f in decision.rule.filters] == ["RequestHeaderModifier", "RequestMirror"]
    mirror = decision.rule.filters[1].request_mirror
    assert mirror.backend_ref.service_key == "shadow.default" and mirror.ratio == 0.25
    [backend] = decision.rule.backend_refs
    assert backend.filters[0].response_header_modifier.add[0].name == "x-b"


def test_weighted_backends() -> None:
    backends = [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}, {"name": "off", "weight": 0}]
    decision = table(grpc_route("r", rule(method("a.B"), backends=backends))).decide("POST", "/a.B/M", GRPC.get)
    rng = random.Random(7)
    counts = Counter(decision.pick_backend(rng).name for _ in range(20_000))
    assert counts["off"] == 0
    assert abs(counts["v1"] / 20_000 - 0.9) <= 0.02 and abs(counts["v2"] / 20_000 - 0.1) <= 0.02


# --- with an HTTPRoute on the same Service -----------------------------------------------------


def test_grpc_routes_win_over_http_routes_and_are_never_merged() -> None:
    docs = (http_route("web"), grpc_route("g", rule(method("a.B"))))
    snapshot = load_text(yaml.safe_dump_all(docs, sort_keys=False))
    assert [r.kind for r in snapshot.routes_for(SERVICE)] == ["GRPCRoute"]
    routes = RouteTable(snapshot.routes_for(SERVICE))
    assert label(routes, "/a.B/M") == "default/g/0"
    # The HTTPRoute's catch-all is not used: what the GRPCRoute does not match gets no route.
    assert routes.decide("GET", "/index.html", {}.get) is None
    # Given both kinds, a RouteTable applies the same rule itself.
    mixed = RouteTable([*snapshot.routes_for(SERVICE), *snapshot.ignored_routes_for(SERVICE)])
    assert [type(r).__name__ for r in mixed.routes] == ["GRPCRoute"]


def test_http_routes_alone_are_unchanged() -> None:
    snapshot = load_text(yaml.safe_dump(http_route("web"), sort_keys=False))
    routes = RouteTable(snapshot.routes_for(SERVICE))
    assert routes.decide("GET", "/index.html", {}.get).label == "default/web/0"
