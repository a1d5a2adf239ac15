"""HTTPRoute matching (spec §3 `HTTPRoute`): Gateway API precedence, path, header, query and
method matches, weighted backends and shadowed rules.

Routes are written as YAML and loaded through the configuration loader, so the tests cover the
same path a proxy takes: YAML -> Snapshot.routes_for -> RouteTable. Deterministic: seeded
random sources only.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from meshproxy.config import load_config, load_text
from meshproxy.config.model.common import ObjectMeta
from meshproxy.config.model.route import (
    BackendRef,
    HTTPRoute,
    PathMatch,
    RouteMatch,
    RouteRule,
    ValueMatch,
)
from meshproxy.policy.router import RouteTable, compile_rule

SPEC_ROUTES = Path(__file__).resolve().parents[2] / "spec_examples" / "routes.yaml"
SERVICE = "svc.default"


# --- building routes ---------------------------------------------------------------------


def route(name: str, *rules: dict, namespace: str = "default") -> dict:
    """An HTTPRoute document attached to Service `svc` in namespace default."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "svc", "namespace": "default"}],
            "rules": list(rules),
        },
    }


def rule(*matches: dict, name: str | None = None, backends: list | None = None) -> dict:
    """A rule with `matches` (none written: the rule matches `/`) and one backend."""
    out: dict = {"backendRefs": backends if backends is not None else [{"name": "app", "port": 80}]}
    if matches:
        out["matches"] = list(matches)
    if name is not None:
        out["name"] = name
    return out


def prefix(value: str, **conditions) -> dict:
    return {"path": {"type": "PathPrefix", "value": value}, **conditions}


def exact(value: str, **conditions) -> dict:
    return {"path": {"type": "Exact", "value": value}, **conditions}


def regex(value: str, **conditions) -> dict:
    return {"path": {"type": "RegularExpression", "value": value}, **conditions}


def hdr(name: str, value: str, kind: str = "Exact") -> dict:
    return {"name": name, "value": value, "type": kind}


def qp(name: str, value: str, kind: str = "Exact") -> dict:
    return {"name": name, "value": value, "type": kind}


def table(*routes: dict) -> RouteTable:
    """The RouteTable of Service svc.default after loading `routes` as one YAML file."""
    snapshot = load_text(yaml.safe_dump_all(routes, sort_keys=False), "routes.yaml")
    return RouteTable(snapshot.routes_for(SERVICE))


class Headers:
    """A header lookup over a dict; records the names it is asked for."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = values or {}
        self.asked: list[str] = []

    def __call__(self, name: str) -> str | None:
        self.asked.append(name)
        return self.values.get(name)


def label(routes: RouteTable, target: str, headers: dict | None = None, method: str = "GET") -> str | None:
    matched = routes.match(method, target, Headers(headers))
    return matched.label if matched is not None else None


# --- precedence across the routes of one Service -------------------------------------------
# In every row both candidates hold for the request, and the one that must win is written
# last, so that a table ordered by load or rule order alone picks the wrong one.

PRECEDENCE = [
    pytest.param(
        [route("r",
               rule(prefix("/foo/bar", method="GET", headers=[hdr("x-a", "1")], queryParams=[qp("q", "1")])),
               rule(exact("/foo/bar")))],
        ("GET", "/foo/bar?q=1", {"x-a": "1"}), "default/r/1", id="exact-over-any-prefix"),
    pytest.param(
        [route("r",
               rule(prefix("/api", method="GET", headers=[hdr("x-a", "1")])),
               rule(prefix("/api/v1")))],
        ("GET", "/api/v1/users", {"x-a": "1"}), "default/r/1", id="longer-prefix-over-shorter"),
    pytest.param(
        [route("r",
               rule(prefix("/api/", headers=[hdr("x-a", "1")])),
               rule(prefix("/api", headers=[hdr("x-a", "1"), hdr("x-b", "2")])))],
        ("GET", "/api/x", {"x-a": "1", "x-b": "2"}), "default/r/1",
        id="trailing-slash-does-not-lengthen-prefix"),
    pytest.param(
        [route("r",
               rule(prefix("/foo", headers=[hdr("x-a", "1"), hdr("x-b", "2")], queryParams=[qp("q", "1")])),
               rule(prefix("/foo", method="POST")))],
        ("POST", "/foo?q=1", {"x-a": "1", "x-b": "2"}), "default/r/1", id="method-over-none"),
    pytest.param(
        [route("r",
               rule(prefix("/foo", headers=[hdr("x-a", "1")], queryParams=[qp("q", "1"), qp("p", "2")])),
               rule(prefix("/foo", headers=[hdr("x-a", "1"), hdr("x-b", "2")])))],
        ("GET", "/foo?q=1&p=2", {"x-a": "1", "x-b": "2"}), "default/r/1", id="more-headers-over-fewer"),
    pytest.param(
        [route("r",
               rule(prefix("/foo", queryParams=[qp("q", "1")])),
               rule(prefix("/foo", queryParams=[qp("q", "1"), qp("p", "2")])))],
        ("GET", "/foo?q=1&p=2", {}), "default/r/1", id="more-query-params-over-fewer"),
    pytest.param(
        [route("b", rule(prefix("/foo"))), route("a", rule(prefix("/foo")))],
        ("GET", "/foo", {}), "default/b/0", id="older-route-over-name-order"),
    pytest.param(
        [route("r", rule(prefix("/foo")), namespace="zeta"),
         route("r", rule(prefix("/foo")), namespace="alpha")],
        ("GET", "/foo", {}), "zeta/r/0", id="older-route-over-namespace-order"),
    pytest.param(
        [route("r", rule(prefix("/foo"), name="first"), rule(prefix("/foo"), name="second"))],
        ("GET", "/foo", {}), "default/r/first", id="rule-order-within-route"),
    pytest.param(
        [route("r", rule(prefix("/foo")), rule(prefix("/foo")))],
        ("GET", "/foo", {}), "default/r/0", id="rule-order-unnamed-rules"),
    pytest.param(
        [route("r",
               rule(regex("/api/.*", method="GET", headers=[hdr("x-a", "1")])),
               rule(prefix("/")))],
        ("GET", "/api/x", {"x-a": "1"}), "default/r/1", id="regex-after-shortest-prefix"),
    pytest.param(
        [route("r",
               rule(regex("/api/v[0-9]+", method="GET")),
               rule(exact("/api/v1")))],
        ("GET", "/api/v1", {}), "default/r/1", id="regex-after-exact"),
    pytest.param(
        [route("r",
               rule(regex("/api/.*")),
               rule(regex("/api/v.*", method="GET")))],
        ("GET", "/api/v1", {}), "default/r/1", id="regex-paths-then-by-method"),
]


@pytest.mark.parametrize(("routes", "request_", "expected"), PRECEDENCE)
def test_precedence(routes: list[dict], request_: tuple, expected: str) -> None:
    method, target, headers = request_
    routes_table = table(*routes)
    assert label(routes_table, target, headers, method) == expected


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (("GET", "/foo/bar?q=1", {"x-a": "1"}), "default/r/0"),  # everything holds
        (("GET", "/foo/bar", {"x-a": "1"}), "default/r/1"),  # no query: the next candidate
        (("PUT", "/foo/bar?q=1", {"x-a": "1"}), "default/r/2"),
        (("PUT", "/foo/bar?q=1", {}), "default/r/3"),
    ],
)
def test_precedence_falls_through_to_the_next_candidate_that_holds(request_: tuple, expected: str) -> None:
    routes_table = table(route(
        "r",
        rule(prefix("/foo", method="GET", headers=[hdr("x-a", "1")], queryParams=[qp("q", "1")])),
        rule(prefix("/foo", method="GET")),
        rule(prefix("/foo", headers=[hdr("x-a", "1")])),
        rule(prefix("/")),
    ))
    method, target, headers = request_
    assert label(routes_table, target, headers, method) == expected


def test_older_file_wins_whatever_order_the_files_are_given_in(tmp_path: Path) -> None:
    # Load order is files sorted by path, then documents in order; names play no part.
    (tmp_path / "10-first.yaml").write_text(yaml.safe_dump(route("zz", rule(prefix("/foo")))))
    (tmp_path / "20-second.yaml").write_text(yaml.safe_dump(route("aa", rule(prefix("/foo")))))
    snapshot = load_config([str(tmp_path / "20-second.yaml"), str(tmp_path / "10-first.yaml")])
    routes_table = RouteTable(snapshot.routes_for(SERVICE))
    assert label(routes_table, "/foo/x") == "default/zz/0"


def test_table_keeps_the_route_order_it_is_given() -> None:
    # The Snapshot decides which route is older; the table must not re-sort by name.
    snapshot = load_text(yaml.safe_dump_all([route("b", rule(prefix("/foo"))),
                                             route("a", rule(prefix("/foo")))]), "routes.yaml")
    older_first = snapshot.routes_for(SERVICE)
    assert label(RouteTable(older_first), "/foo") == "default/b/0"
    assert label(RouteTable(tuple(reversed(older_first))), "/foo") == "default/a/0"


# --- paths ---------------------------------------------------------------------------------

PATHS = [
    # PathPrefix matches whole segments.
    (prefix("/foo"), "/foo", True),
    (prefix("/foo"), "/foo/", True),
    (prefix("/foo"), "/foo/bar", True),
    (prefix("/foo"), "/foobar", False),
    (prefix("/foo"), "/fo", False),
    (prefix("/foo"), "/", False),
    (prefix("/foo"), "/bar/foo", False),
    # `/foo/` behaves like `/foo`.
    (prefix("/foo/"), "/foo", True),
    (prefix("/foo/"), "/foo/", True),
    (prefix("/foo/"), "/foo/bar", True),
    (prefix("/foo/"), "/foobar", False),
    (prefix("/foo/bar"), "/foo/bar/baz", True),
    (prefix("/foo/bar"), "/foo/barbaz", False),
    # `/` matches everything.
    (prefix("/"), "/", True),
    (prefix("/"), "/anything", True),
    (prefix("/"), "/a/b/c?x=1", True),
    # The query is not part of the path.
    (prefix("/foo"), "/foo?x=1", True),
    (prefix("/foo"), "/foobar?next=/foo", False),
    (prefix("/foo"), "/bar?next=/foo/x", False),
    # Exact.
    (exact("/foo"), "/foo", True),
    (exact("/foo"), "/foo?x=1", True),
    (exact("/foo"), "/foo/", False),
    (exact("/foo"), "/foo/bar", False),
    (exact("/foo"), "/fo", False),
    # RegularExpression: Python `re`, the whole path.
    (regex("/api/v[0-9]+"), "/api/v2", True),
    (regex("/api/v[0-9]+"), "/api/v22", True),
    (regex("/api/v[0-9]+"), "/api/v2?x=1", True),
    (regex("/api/v[0-9]+"), "/api/v2/x", False),
    (regex("/api/v[0-9]+"), "/x/api/v2", False),
    (regex("/api/v[0-9]+"), "/api/v", False),
    (regex(r"/users/\d+/orders"), "/users/42/orders", True),
]


@pytest.mark.parametrize(("match", "target", "matches"), PATHS,
                         ids=[f"{m['path']['type']}:{m['path']['value']}:{t}" for m, t, _ in PATHS])
def test_path_matching(match: dict, target: str, matches: bool) -> None:
    routes_table = table(route("r", rule(match)))
    assert label(routes_table, target) == ("default/r/0" if matches else None)


@pytest.mark.parametrize("target", ["/", "/anything", "/a/b?c=d"])
def test_rule_without_matches_matches_every_path(target: str) -> None:
    assert label(table(route("r", rule())), target) == "default/r/0"


def test_route_without_rules_matches_every_path() -> None:
    doc = route("r")
    del doc["spec"]["rules"]
    assert label(table(doc), "/x/y", method="DELETE") == "default/r/0"


# --- headers -------------------------------------------------------------------------------

HEADER_CASES = [
    pytest.param([hdr("x-beta", "true")], {"x-beta": "true"}, True, id="exact"),
    pytest.param([hdr("x-beta", "true")], {"x-beta": "True"}, False, id="exact-value-case-sensitive"),
    pytest.param([hdr("x-beta", "true")], {"x-beta": "true "}, False, id="exact-whole-value"),
    pytest.param([hdr("x-beta", "true")], {}, False, id="missing-header"),
    pytest.param([hdr("X-Beta", "true")], {"x-beta": "true"}, True, id="name-case-insensitive"),
    pytest.param([hdr("x-v", "v[0-9]+", "RegularExpression")], {"x-v": "v2"}, True, id="regex"),
    pytest.param([hdr("x-v", "v[0-9]+", "RegularExpression")], {"x-v": "v2-beta"}, False,
                 id="regex-whole-value-end"),
    pytest.param([hdr("x-v", "v[0-9]+", "RegularExpression")], {"x-v": "xv2"}, False,
                 id="regex-whole-value-start"),
    pytest.param([hdr("x-a", "1"), hdr("x-b", "2")], {"x-a": "1", "x-b": "2"}, True, id="and-both"),
    pytest.param([hdr("x-a", "1"), hdr("x-b", "2")], {"x-a": "1"}, False, id="and-one-missing"),
    pytest.param([hdr("x-a", "1"), hdr("x-b", "2")], {"x-a": "1", "x-b": "3"}, False, id="and-one-wrong"),
    # Gateway API: of entries with the same (case-insensitive) name only the first counts.
    pytest.param([hdr("x-a", "1"), hdr("X-A", "2")], {"x-a": "1"}, True, id="repeated-name-first-counts"),
    pytest.param([hdr("x-a", "1"), hdr("X-A", "2")], {"x-a": "2"}, False, id="repeated-name-later-ignored"),
]


@pytest.mark.parametrize(("conditions", "request_headers", "matches"), HEADER_CASES)
def test_header_matching(conditions: list, request_headers: dict, matches: bool) -> None:
    routes_table = table(route("r", rule(prefix("/", headers=conditions))))
    assert label(routes_table, "/x", request_headers) == ("default/r/0" if matches else None)


def test_header_lookup_is_asked_lower_case_names() -> None:
    routes_table = table(route("r", rule(prefix("/", headers=[hdr("X-Beta", "true"), hdr("X-B", "2")]))))
    lookup = Headers({"x-beta": "true", "x-b": "2"})
    assert routes_table.match("GET", "/", lookup).label == "default/r/0"
    assert sorted(lookup.asked) == ["x-b", "x-beta"]


def test_header_names_lowered_for_routes_built_without_the_loader() -> None:
    built = HTTPRoute(
        metadata=ObjectMeta(name="r"),
        rules=(RouteRule(matches=(RouteMatch(headers=(ValueMatch("X-Canary", "yes"),)),),
                         backend_refs=(BackendRef("app", "default"),)),),
    )
    lookup = Headers({"x-canary": "yes"})
    assert RouteTable([built]).match("GET", "/", lookup).label == "default/r/0"
    assert lookup.asked == ["x-canary"]


@pytest.mark.parametrize(
    ("request_headers", "expected"),
    [({"x-a": "1"}, "default/r/0"), ({"x-b": "2"}, "default/r/0"), ({"x-c": "3"}, None)],
)
def test_several_matches_in_one_rule_are_ored(request_headers: dict, expected: str | None) -> None:
    routes_table = table(route("r", rule(prefix("/", headers=[hdr("x-a", "1")]),
                                         prefix("/", headers=[hdr("x-b", "2")]))))
    assert label(routes_table, "/", request_headers) == expected


def test_header_match_still_needs_the_path() -> None:
    routes_table = table(route("r", rule(prefix("/api", headers=[hdr("x-a", "1")]))))
    assert label(routes_table, "/other", {"x-a": "1"}) is None


# --- query parameters ----------------------------------------------------------------------

QUERY_CASES = [
    pytest.param([qp("version", "2")], "/s?version=2", True, id="exact"),
    pytest.param([qp("version", "2")], "/s?version=3", False, id="exact-other-value"),
    pytest.param([qp("version", "2")], "/s?version=22", False, id="exact-whole-value"),
    pytest.param([qp("version", "2")], "/s?a=b&version=2&c=d", True, id="among-others"),
    pytest.param([qp("version", "2")], "/s?Version=2", False, id="name-case-sensitive"),
    pytest.param([qp("version", "2")], "/s?other=2", False, id="missing-param"),
    pytest.param([qp("version", "2")], "/s", False, id="no-query"),
    pytest.param([qp("version", "2")], "/s?", False, id="empty-query"),
    pytest.param([qp("version", "v[0-9]+", "RegularExpression")], "/s?version=v12", True, id="regex"),
    pytest.param([qp("version", "v[0-9]+", "RegularExpression")], "/s?version=v12x", False,
                 id="regex-whole-value"),
    pytest.param([qp("v", "1")], "/s?v=1&v=2", True, id="repeated-param-first-value"),
    pytest.param([qp("v", "2")], "/s?v=1&v=2", False, id="repeated-param-later-value-ignored"),
    pytest.param([qp("a", "1"), qp("b", "2")], "/s?a=1&b=2", True, id="and-both"),
    pytest.param([qp("a", "1"), qp("b", "2")], "/s?a=1", False, id="and-one-missing"),
    pytest.param([qp("a", "1"), qp("a", "2")], "/s?a=1", True, id="repeated-name-first-counts"),
]


@pytest.mark.parametrize(("conditions", "target", "matches"), QUERY_CASES)
def test_query_param_matching(conditions: list, target: str, matches: bool) -> None:
    routes_table = table(route("r", rule(prefix("/s", queryParams=conditions))))
    assert label(routes_table, target) == ("default/r/0" if matches else None)


# --- method --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "expected"),
    [("GET", "default/r/0"), ("POST", "default/r/1"), ("DELETE", None), ("HEAD", None)],
)
def test_method_matching(method: str, expected: str | None) -> None:
    routes_table = table(route("r", rule(prefix("/", method="GET")), rule(prefix("/", method="POST"))))
    assert label(routes_table, "/x", method=method) == expected


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "OPTIONS"])
def test_match_without_method_takes_every_method(method: str) -> None:
    assert label(table(route("r", rule(prefix("/")))), "/x", method=method) == "default/r/0"


# --- empty and non-matching tables ---------------------------------------------------------


def test_empty_table_is_falsy_and_matches_nothing() -> None:
    empty = RouteTable([])
    assert not empty
    assert empty.match("GET", "/", Headers()) is None


def test_service_without_routes_has_an_empty_table() -> None:
    snapshot = load_text(yaml.safe_dump(route("r", rule())), "routes.yaml")
    assert not RouteTable(snapshot.routes_for("other.default"))


def test_unmatched_request_with_routes_attached_returns_none() -> None:
    routes_table = table(route("r", rule(prefix("/api"))))
    assert routes_table  # a route is attached: the proxy answers 404, not pass-through
    assert routes_table.match("GET", "/other", Headers()) is None


# --- weighted backends ---------------------------------------------------------------------

PICKS = 10_000


def picks(weights: dict[str, int], seed: int = 7) -> Counter:
    routes_table = table(route("r", rule(backends=[{"name": n, "port": 80, "weight": w}
                                                   for n, w in weights.items()])))
    matched = routes_table.match("GET", "/", Headers())
    rng = random.Random(seed)
    return Counter(matched.pick_backend(rng).name for _ in range(PICKS))


@pytest.mark.parametrize(
    "weights",
    [
        pytest.param({"v1": 90, "v2": 10}, id="90-10"),
        pytest.param({"a": 50, "b": 30, "c": 20}, id="50-30-20"),
        pytest.param({"a": 1, "b": 1}, id="equal"),
    ],
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_split_follows_the_weights(weights: dict[str, int], seed: int) -> None:
    counts = picks(weights, seed)
    total = sum(weights.values())
    assert set(counts) == set(weights)
    for name, weight in weights.items():
        assert abs(counts[name] / PICKS - weight / total) <= 0.02, (name, counts)


@pytest.mark.parametrize(
    "weights",
    [{"zero": 0, "a": 1}, {"a": 1, "zero": 0}, {"a": 1, "zero": 0, "b": 3}],
    ids=["zero-first", "zero-last", "zero-middle"],
)
def test_weight_zero_is_never_chosen(weights: dict[str, int]) -> None:
    counts = picks(weights)
    assert counts["zero"] == 0
    assert sum(counts.values()) == PICKS


def _compiled(*backends: BackendRef):
    built = HTTPRoute(metadata=ObjectMeta(name="r"), rules=(RouteRule(backend_refs=backends),))
    return compile_rule(built, 0)


def test_all_weights_zero_picks_nothing() -> None:
    # The loader rejects this (`every weight is 0`); the router must still not pick one.
    matched = _compiled(BackendRef("a", "default", weight=0), BackendRef("b", "default", weight=0))
    assert matched.pick_backend(random.Random(1)) is None


def test_rule_without_backends_picks_nothing() -> None:
    assert _compiled().pick_backend(random.Random(1)) is None


def test_single_backend_is_always_chosen() -> None:
    assert picks({"only": 5}) == Counter({"only": PICKS})


# --- the spec's example ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_table() -> RouteTable:
    return RouteTable(load_config([str(SPEC_ROUTES)]).routes_for("delivery.default"))


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/api/deliveries/7", {"x-beta": "true"}, "default/delivery/beta-testers"),
        ("/api/deliveries", {"x-beta": "true"}, "default/delivery/beta-testers"),
        ("/api/deliveries/7", {}, "default/delivery/1"),
        ("/api/deliveries/7", {"x-beta": "false"}, "default/delivery/1"),
        ("/api/deliveries?page=2", {}, "default/delivery/1"),
        ("/other", {}, None),
        ("/other", {"x-beta": "true"}, None),
        ("/api/deliveriesX", {}, None),
    ],
)
def test_spec_example_routes(spec_table: RouteTable, target: str, headers: dict, expected: str | None) -> None:
    assert label(spec_table, target, headers) == expected


def test_spec_example_backends(spec_table: RouteTable) -> None:
    beta = spec_table.match("GET", "/api/deliveries/7", Headers({"x-beta": "true"}))
    assert [b.name for b in beta.backends] == ["delivery-v2"]
    assert beta.pick_backend(random.Random(1)).name == "delivery-v2"
    split = spec_table.match("GET", "/api/deliveries/7", Headers())
    rng = random.Random(5)
    counts = Counter(split.pick_backend(rng).name for _ in range(PICKS))
    assert abs(counts["delivery-v1"] / PICKS - 0.9) <= 0.02


# --- shadowed rules --------------------------------------------------------------------------

SHADOWED = [
    pytest.param([route("r", rule(prefix("/foo")), rule(prefix("/foo")))], ["default/r/1"],
                 id="identical-rule-same-route"),
    pytest.param([route("a", rule(prefix("/foo", method="GET"))), route("b", rule(prefix("/foo", method="GET")))],
                 ["default/b/0"], id="identical-rule-younger-route"),
    pytest.param([route("r", rule(prefix("/foo/")), rule(prefix("/foo")))], ["default/r/1"],
                 id="trailing-slash-prefix-is-the-same"),
    pytest.param([route("r", rule(prefix("/", headers=[hdr("x-a", "1"), hdr("x-b", "2")])),
                          rule(prefix("/", headers=[hdr("X-B", "2"), hdr("x-a", "1")])))],
                 ["default/r/1"], id="same-headers-other-order"),
    pytest.param([route("r", rule(prefix("/", headers=[hdr("x-a", "1")])),
                          rule(prefix("/", headers=[hdr("x-a", "1"), hdr("x-a", "2", "RegularExpression")])))],
                 ["default/r/1"], id="repeated-header-name-ignored"),
    pytest.param([route("r", rule(prefix("/foo")), rule(prefix("/bar")))], [], id="other-path"),
    pytest.param([route("r", rule(prefix("/foo")), rule(exact("/foo")))], [], id="other-path-type"),
    pytest.param([route("r", rule(prefix("/foo")), rule(prefix("/foo", method="GET")))], [], id="other-method"),
    pytest.param([route("r", rule(prefix("/", headers=[hdr("x-a", "1")])),
                          rule(prefix("/", headers=[hdr("x-a", "2")])))], [], id="other-header-value"),
    pytest.param([route("r", rule(prefix("/", headers=[hdr("x-a", "a.c")])),
                          rule(prefix("/", headers=[hdr("x-a", "a.c", "RegularExpression")])))],
                 [], id="exact-and-regex-with-same-text"),
    pytest.param([route("r", rule(prefix("/", queryParams=[qp("q", "1")])),
                          rule(prefix("/", queryParams=[qp("q", "1")])))], ["default/r/1"],
                 id="identical-query"),
    pytest.param([route("r", rule(prefix("/", queryParams=[qp("q", "1")])),
                          rule(prefix("/", queryParams=[qp("Q", "1")])))], [], id="query-name-case"),
    pytest.param([route("r", rule(prefix("/foo")), rule(prefix("/foo"), prefix("/bar")))], [],
                 id="one-live-match-keeps-the-rule"),
]


@pytest.mark.parametrize(("routes", "expected"), SHADOWED)
def test_shadowed(routes: list[dict], expected: list[str]) -> None:
    assert [r.label for r in table(*routes).shadowed()] == expected


def test_exact_and_regex_with_same_text_are_both_reachable() -> None:
    routes_table = table(route("r", rule(prefix("/", headers=[hdr("x-a", "a.c")])),
                                    rule(prefix("/", headers=[hdr("x-a", "a.c", "RegularExpression")]))))
    assert label(routes_table, "/", {"x-a": "a.c"}) == "default/r/0"
    assert label(routes_table, "/", {"x-a": "abc"}) == "default/r/1"
