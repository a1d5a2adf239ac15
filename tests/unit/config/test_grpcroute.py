"""`GRPCRoute` (spec §9): parsing into the model and its HTTPRoute form, every mistake reported
at FILE:LINE:COL, the warnings `check` gives (a GRPCRoute and an HTTPRoute on one Service, a
rule that can never match), and what the Snapshot attaches to each Service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshproxy.config import GRPCRoute, HTTPRoute, load, load_text
from meshproxy.config.check import run_check
from meshproxy.config.export import to_plain
from meshproxy.config.model.grpcroute import GRPCMethodMatch, GRPCRouteMatch, GRPCRouteRule, winning_route_kind
from meshproxy.config.model.route import PathMatch, RouteTimeouts, ValueMatch

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - {name: drone, port: 50051}
    - name: drone-v1
      port: 50051
      instances: [{name: d1, app: {address: 127.0.0.1:9001}}]
    - name: drone-v2
      port: 50051
      instances: [{name: d2, app: {address: 127.0.0.1:9002}}]
"""

# The spec §9 example, with the backends the Mesh above defines.
ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: tracking, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: drone, port: 50051}]
  rules:
    - matches:
        - method: {type: Exact, service: drone.v1.Tracking, method: Watch}
      backendRefs: [{name: drone-v1, port: 50051}]
      timeouts: {request: 30s}
    - matches:
        - method: {type: RegularExpression, service: "drone\\\\.v1\\\\..*"}
          headers: [{name: x-canary, value: "true"}]
      backendRefs:
        - {name: drone-v2, port: 50051}
"""

HTTP_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: drone-http, namespace: default}
spec:
  parentRefs:
    - {kind: Service, name: drone}
  rules:
    - backendRefs: [{name: drone-v1}]
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def lines(tmp_path: Path, *files: tuple[str, str], errors: bool = True) -> list[str]:
    """Load the (name, text) files; return the errors (or warnings) with tmp_path left out."""
    result = load([write(tmp_path, name, text) for name, text in files])
    found = result.errors if errors else result.warnings
    return [str(d).replace(f"{tmp_path}/", "") for d in found]


def rule_text(*, method: str = "{type: Exact, service: drone.v1.Tracking, method: Watch}", extra: str = "") -> str:
    """A GRPCRoute whose one rule has the method match `method` (line 8) and `extra` lines
    (starting at line 10)."""
    return ("apiVersion: gateway.networking.k8s.io/v1\n"            # 1
            "kind: GRPCRoute\n"                                       # 2
            "metadata: {name: g}\n"                                   # 3
            "spec:\n"                                                 # 4
            "  parentRefs: [{kind: Service, name: drone}]\n"          # 5
            "  rules:\n"                                              # 6
            "    - matches:\n"                                        # 7
            f"        - method: {method}\n"                           # 8
            "      backendRefs: [{name: drone-v1}]\n"                 # 9
            + extra)


# Parsing.


def test_the_spec_example_parses_into_the_model() -> None:
    [route] = [r for r in load_text(MESH + "---\n" + ROUTE, "r.yaml").resources if isinstance(r, GRPCRoute)]
    assert route.metadata.name == "tracking" and route.parent_refs[0].service_key == "drone.default"
    assert route.parent_refs[0].port == 50051
    first, second = route.rules
    assert first.matches == (GRPCRouteMatch(GRPCMethodMatch("Exact", "drone.v1.Tracking", "Watch")),)
    assert first.timeouts == RouteTimeouts(request=30.0)
    assert [b.service_key for b in first.backend_refs] == ["drone-v1.default"]
    assert second.matches == (GRPCRouteMatch(GRPCMethodMatch("RegularExpression", r"drone\.v1\..*", None),
                                             (ValueMatch("x-canary", "true"),)),)
    assert route.rule_label(0) == "default/tracking/0"


def test_rules_in_their_http_route_form() -> None:
    route = load_text(ROUTE).resources[0]
    exact, regex = route.route_rules
    assert exact.matches[0].path == PathMatch("Exact", "/drone.v1.Tracking/Watch")
    assert exact.timeouts == RouteTimeouts(request=30.0) and exact.backend_refs == route.rules[0].backend_refs
    assert regex.matches[0].path.type == "RegularExpression"
    assert regex.matches[0].headers == (ValueMatch("x-canary", "true"),)
    pattern = re.compile(regex.matches[0].path.value)
    assert pattern.fullmatch("/drone.v1.Tracking/List")
    assert not pattern.fullmatch("/drone.v2.Tracking/List")
    # A service pattern cannot reach over the `/` into the method, nor a path have 3 segments.
    assert not pattern.fullmatch("/drone.v1.a/b/List")


@pytest.mark.parametrize(("match", "path", "expected"), [
    (GRPCMethodMatch("Exact", "a.B", "M"), "/a.B/M", True),
    (GRPCMethodMatch("Exact", "a.B", None), "/a.B/Anything", True),
    (GRPCMethodMatch("Exact", "a.B", None), "/aXB/Anything", False),   # the `.` is escaped
    (GRPCMethodMatch("Exact", "a.B", None), "/a.B/", False),
    (GRPCMethodMatch("Exact", None, "Get"), "/any.Service/Get", True),
    (GRPCMethodMatch("Exact", None, "Get"), "/any.Service/GetAll", False),
    (GRPCMethodMatch("RegularExpression", None, "Get.*"), "/s.S/GetAll", True),
    (GRPCMethodMatch("RegularExpression", "(?i)A\\.b", None), "/a.B/M", True),  # leading flags made scoped
    (GRPCMethodMatch("RegularExpression", ".*", ".*"), "/a/b/c", False),
    (GRPCMethodMatch("RegularExpression", "a|b", "M"), "/b/M", True),         # alternation stays inside
    (GRPCMethodMatch("RegularExpression", "a|b", "M"), "/a/X", False),
])
def test_method_matches_become_path_matches(match: GRPCMethodMatch, path: str, expected: bool) -> None:
    translated = match.path_match()
    if translated.type == "Exact":
        assert (path == translated.value) is expected
    else:
        assert (re.fullmatch(translated.value, path) is not None) is expected


def test_defaults_a_rule_without_matches_and_a_route_without_rules() -> None:
    text = ROUTE.split("  rules:\n")[0]
    route = load_text(text).resources[0]
    assert route.rules == (GRPCRouteRule(),)
    assert route.route_rules[0].matches[0].path == PathMatch("PathPrefix", "/")
    one = load_text(rule_text().replace("    - matches:\n        - method: {type: Exact, service: drone.v1.Tracking, "
                                        "method: Watch}\n", "    - name: all\n")).resources[0]
    assert one.rules[0].matches == (GRPCRouteMatch(),) and one.rule_label(0) == "default/g/all"


def test_type_defaults_to_exact_and_empty_names_match_any() -> None:
    route = load_text(rule_text(method="{service: drone.v1.Tracking, method: ''}")).resources[0]
    assert route.rules[0].matches[0].method == GRPCMethodMatch("Exact", "drone.v1.Tracking", None)


def test_filters_mirrors_weights_and_retry() -> None:
    extra = ("      filters:\n"
             "        - type: RequestHeaderModifier\n"
             "          requestHeaderModifier: {set: [{name: x-a, value: '1'}], remove: [x-b]}\n"
             "        - type: ResponseHeaderModifier\n"
             "          responseHeaderModifier: {add: [{name: x-c, value: '2'}]}\n"
             "        - type: RequestMirror\n"
             "          requestMirror: {backendRef: {name: drone-v2}, percent: 25}\n"
             "      retry: {attempts: 2, backoff: 20ms}\n")
    text = rule_text(extra=extra).replace("backendRefs: [{name: drone-v1}]",
                                          "backendRefs: [{name: drone-v1, weight: 3}, {name: drone-v2, weight: 1}]")
    rule = load_text(text).resources[0].rules[0]
    assert [f.type for f in rule.filters] == ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"]
    assert rule.filters[2].request_mirror.backend_ref.service_key == "drone-v2.default"
    assert rule.filters[2].request_mirror.ratio == 0.25
    assert [(b.name, b.weight) for b in rule.backend_refs] == [("drone-v1", 3), ("drone-v2", 1)]
    assert rule.retry.attempts == 2 and rule.retry.backoff == 0.02 and rule.retry.codes == ()


def test_v1alpha2_is_accepted_and_the_summary_counts_grpc_routes(tmp_path: Path, capsys) -> None:
    text = ROUTE.replace("gateway.networking.k8s.io/v1\n", "gateway.networking.k8s.io/v1alpha2\n")
    assert run_check([write(tmp_path, "m.yaml", MESH), write(tmp_path, "r.yaml", text)]) == 0
    assert capsys.readouterr().out.strip() == \
        "ok: 2 files, 2 resources (1 Mesh, 1 GRPCRoute), 3 services, 0 warnings"


def test_export_names_the_kind_and_the_fields_as_written() -> None:
    plain = to_plain(load_text(ROUTE, "r.yaml").resources[0])
    assert plain["kind"] == "GRPCRoute" and plain["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert plain["rules"][0]["matches"][0]["method"] == {"type": "Exact", "service": "drone.v1.Tracking",
                                                         "method": "Watch"}
    assert "routeRules" not in plain and plain["source"] == "r.yaml:1:1"


# Errors, each at FILE:LINE:COL.


@pytest.mark.parametrize(("method", "expected"), [
    ("{service: drone/Tracking}",
     "g.yaml:8:29: spec.rules[0].matches[0].method.service: 'drone/Tracking' is not a valid gRPC service name "
     "(package and service names joined by '.', e.g. drone.v1.Tracking)"),
    ("{service: drone.v1.Tracking, method: 1Watch}",
     "g.yaml:8:56: spec.rules[0].matches[0].method.method: '1Watch' is not a valid gRPC method name "
     "(letters, digits and '_', not starting with a digit, e.g. Watch)"),
    ("{type: Exact}",
     "g.yaml:8:11: spec.rules[0].matches[0].method: give a service, a method or both (an empty one matches any)"),
    ("{type: Prefix, service: a}",
     "g.yaml:8:26: spec.rules[0].matches[0].method.type: unknown value 'Prefix' "
     "(expected one of: Exact, RegularExpression)"),
    ("{type: RegularExpression, service: 'drone\\.(v1'}",
     "g.yaml:8:54: spec.rules[0].matches[0].method.service: bad regular expression 'drone\\.(v1': "
     "missing ), unterminated subpattern at position 7"),
    ("{type: Exact, service: a, verb: Watch}",
     "g.yaml:8:45: spec.rules[0].matches[0].method: unknown field 'verb' (allowed: method, service, type)"),
])
def test_bad_method_matches(tmp_path: Path, method: str, expected: str) -> None:
    assert lines(tmp_path, ("g.yaml", rule_text(method=method))) == [expected]


def test_service_and_method_patterns_must_make_one_expression(tmp_path: Path) -> None:
    [line] = lines(tmp_path, ("g.yaml", rule_text(method="{type: RegularExpression, service: '(?P<v>a)', method: '(?P<v>b)'}")))
    assert line.startswith("g.yaml:8:11: spec.rules[0].matches[0].method: service and method do not make one "
                           "regular expression")


def test_filters_grpc_route_does_not_have(tmp_path: Path) -> None:
    extra = ("      filters:\n"                                                                  # 10
             "        - type: URLRewrite\n"                                                      # 11
             "        - type: RequestHeaderModifier\n"                                           # 12
             "          urlRewrite: {hostname: x}\n"                                             # 13
             "          requestHeaderModifier: {set: [{name: x-a, value: '1'}]}\n")              # 14
    assert lines(tmp_path, ("g.yaml", rule_text(extra=extra))) == [
        "g.yaml:11:17: spec.rules[0].filters[0].type: unknown value 'URLRewrite' "
        "(expected one of: RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)",
        "g.yaml:13:11: spec.rules[0].filters[1]: unknown field 'urlRewrite' "
        "(allowed: requestHeaderModifier, requestMirror, responseHeaderModifier, type)",
    ]


def test_retry_codes_are_for_http_routes(tmp_path: Path) -> None:
    extra = "      retry: {attempts: 2, codes: [503]}\n"
    [line] = lines(tmp_path, ("g.yaml", rule_text(extra=extra)))
    assert line.startswith("g.yaml:10:28: spec.rules[0].retry.codes: not for GRPCRoute: a gRPC call's status "
                           "is its grpc-status")


def test_header_weight_timeout_and_reference_mistakes(tmp_path: Path) -> None:
    extra = ("          headers: [{name: 'bad name', value: x}, {type: RegularExpression, name: x-v, value: '*'}]\n"
             "      timeouts: {request: 1s, backendRequest: 2s}\n")
    text = rule_text(extra="").replace("      backendRefs: [{name: drone-v1}]\n",
                                       extra + "      backendRefs: [{name: drone-v1, weight: 0}]\n")
    assert lines(tmp_path, ("g.yaml", text)) == [
        "g.yaml:9:28: spec.rules[0].matches[0].headers[0].name: 'bad name' is not a valid header name",
        "g.yaml:9:95: spec.rules[0].matches[0].headers[1].value: bad regular expression '*': "
        "nothing to repeat at position 0",
        "g.yaml:10:47: spec.rules[0].timeouts.backendRequest: must not be longer than request",
        "g.yaml:11:7: spec.rules[0].backendRefs: every weight is 0, so no request can be sent anywhere",
    ]


def test_duplicates_are_per_kind(tmp_path: Path) -> None:
    text = ROUTE + "---\n" + ROUTE
    assert lines(tmp_path, ("r.yaml", text)) == [
        "r.yaml:19:18: metadata.name: duplicate GRPCRoute default/tracking (first defined at r.yaml:1:1)"]
    same_name = HTTP_ROUTE.replace("drone-http", "tracking")
    assert lines(tmp_path, ("r.yaml", ROUTE + "---\n" + same_name)) == []


# Warnings.


def test_unknown_services_are_warnings(tmp_path: Path) -> None:
    text = ROUTE.replace("{name: drone-v2, port: 50051}", "{name: drone-v3, port: 50051}")
    assert lines(tmp_path, ("m.yaml", MESH), ("r.yaml", text), errors=False) == [
        "r.yaml:15:18: warning: spec.rules[1].backendRefs[0].name: Service 'drone-v3.default' is not defined in the Mesh"]


def test_an_http_route_on_the_same_service_is_ignored_with_a_warning(tmp_path: Path) -> None:
    assert lines(tmp_path, ("m.yaml", MESH), ("r.yaml", ROUTE), ("h.yaml", HTTP_ROUTE), errors=False) == [
        "h.yaml:6:7: warning: spec.parentRefs[0]: Service 'drone.default' has GRPCRoute default/tracking attached, "
        "which takes precedence (GEP-1426): this HTTPRoute is not used for it"]


def test_a_grpc_rule_that_can_never_match(tmp_path: Path) -> None:
    other = ROUTE.replace("name: tracking", "name: later")
    warnings = lines(tmp_path, ("m.yaml", MESH), ("a.yaml", ROUTE), ("b.yaml", other), errors=False)
    assert warnings == [
        "b.yaml:8:11: warning: spec.rules[0].matches[0]: can never match: rule default/tracking/0 has the same match "
        "and takes precedence",
        "b.yaml:12:11: warning: spec.rules[1].matches[0]: can never match: rule default/tracking/1 has the same match "
        "and takes precedence",
    ]


# The Snapshot.


def test_grpc_routes_attach_and_win_over_http_routes() -> None:
    snap = load_text(MESH + "---\n" + HTTP_ROUTE + "---\n" + ROUTE)
    assert [type(r).__name__ for r in snap.routes_for("drone.default")] == ["GRPCRoute"]
    assert [r.metadata.name for r in snap.ignored_routes_for("drone.default")] == ["drone-http"]
    service = snap.to_json()["services"]["drone.default"]
    assert service["routes"] == ["default/tracking"] and service["routeKind"] == "GRPCRoute"
    assert service["ignoredRoutes"] == ["HTTPRoute default/drone-http"]
    assert [r["kind"] for r in snap.to_json()["routes"]] == ["HTTPRoute", "GRPCRoute"]


def test_an_http_route_alone_is_in_force() -> None:
    snap = load_text(MESH + "---\n" + HTTP_ROUTE)
    assert [r.metadata.name for r in snap.routes_for("drone.default")] == ["drone-http"]
    assert snap.ignored_routes_for("drone.default") == ()


def test_a_parent_port_the_service_does_not_have_does_not_attach() -> None:
    snap = load_text(MESH + "---\n" + ROUTE.replace("port: 50051}]", "port: 8080}]", 1))
    assert snap.routes_for("drone.default") == ()


def test_winning_route_kind_keeps_order() -> None:
    h1, h2 = (load_text(HTTP_ROUTE.replace("drone-http", n)).resources[0] for n in ("h1", "h2"))
    g = load_text(ROUTE).resources[0]
    assert isinstance(h1, HTTPRoute)
    assert winning_route_kind([h1, h2]) == ((h1, h2), ())
    assert winning_route_kind([h1, g, h2]) == ((g,), (h1, h2))
