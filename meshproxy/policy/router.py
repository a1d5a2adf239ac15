"""HTTPRoute and GRPCRoute matching for one Service (Gateway API, GAMMA binding): pure, no I/O.

A RouteTable is built once per configuration snapshot from the routes attached to a Service
(oldest first). Every (rule, match) pair becomes a candidate, sorted once by the Gateway API's
precedence, so matching a request is a walk down that list to the first candidate that holds.

HTTPRoute precedence:

1. an `Exact` path match, then a `PathPrefix` match with more characters, then (an
   implementation choice, documented in docs/routing.md) `RegularExpression` path matches;
2. a match with a method over one without;
3. more header matches;
4. more query parameter matches;
5. the older route (load order: files sorted by path, then document order, then
   namespace/name), then the rule's and the match's order within the route.

GRPCRoute rules are matched in their HTTPRoute form (config/model/grpcroute.py: the path
`/SERVICE/METHOD` and the header matches), by GRPCRoute precedence:

1. an `Exact` method match, then (an implementation choice, documented in docs/routing.md) a
   `RegularExpression` one, then a match without a method;
2. among Exact ones, more characters in the service, then in the method; among regular
   expressions, one with a service pattern, then one with a method pattern;
3. more header matches;
4. the older route, then the rule's and the match's order within the route.

A Service's routes are of one kind (GRPCRoute before HTTPRoute, GEP-1426; given both, the table
keeps its GRPCRoutes), so the two precedences never meet.

Paths are matched as received (no percent-decoding or dot-segment removal), without the query.
Of several header (or query parameter) conditions with the same name in one match, only the
first counts, as the Gateway API requires.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from random import Random
from typing import Callable, Sequence
from urllib.parse import parse_qsl

from meshproxy.config.model.grpcroute import GRPCRoute, GRPCRouteMatch, winning_route_kind
from meshproxy.config.model.route import BackendRef, HTTPRoute, RouteMatch, RouteRule, ValueMatch

HeaderLookup = Callable[[str], "str | None"]  # lower-case name -> value (repeats joined by ", ")

_PATH_RANK = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}
Route = HTTPRoute | GRPCRoute


@dataclass(frozen=True)
class MatchedRule:
    """A rule of a route, ready to use: its metrics label and weighted backends."""

    route: Route
    index: int
    rule: RouteRule
    label: str  # spec §6 `route` label: NAMESPACE/NAME/RULE
    cumulative: tuple[int, ...]  # running sum of backend weights, for the weighted pick
    total_weight: int

    @property
    def backends(self) -> tuple[BackendRef, ...]:
        return self.rule.backend_refs

    def pick_backend(self, rng: Random) -> BackendRef | None:
        """Return a backend chosen in proportion to its weight (weight 0: never), or None
        when the rule has no backend with a weight."""
        if self.total_weight <= 0:
            return None
        point = rng.random() * self.total_weight
        return self.rule.backend_refs[bisect_right(self.cumulative, point)]


class RouteDecision:
    """What a Service's routes decide for one request before anything is sent: the rule that
    takes it (its metrics label, filters, weighted backends, timeouts and retry) and the
    PathPrefix that matched (a ReplacePrefixMatch rewrite needs it). The data plane acts on
    it (dataplane/routing.py) and `meshproxy check --explain` prints it (policy/explain.py),
    with `match`: the match of the rule that held, as written (a GRPCRouteMatch for a
    GRPCRoute)."""

    __slots__ = ("matched", "prefix", "match")

    def __init__(self, matched: MatchedRule, prefix: str | None,
                 match: RouteMatch | GRPCRouteMatch | None = None) -> None:
        self.matched = matched
        self.prefix = prefix
        self.match = match

    @property
    def label(self) -> str:
        return self.matched.label

    @property
    def rule(self) -> RouteRule:
        """The route rule: its filters, timeouts and retry override the Service's policy."""
        return self.matched.rule

    def pick_backend(self, rng: Random) -> BackendRef | None:
        """A backend by weight, or None when no backend has a weight (500)."""
        return self.matched.pick_backend(rng)


class _Candidate:
    """One match of one rule, compiled: the checks are ordered cheapest first."""

    __slots__ = ("rule", "written", "method", "path_type", "path", "path_regex", "headers", "query")

    def __init__(self, rule: MatchedRule, match: RouteMatch,
                 written: RouteMatch | GRPCRouteMatch | None = None) -> None:
        self.rule = rule
        self.written = written if written is not None else match  # as the route has it
        self.method = match.method
        self.path_type = match.path.type
        value = match.path.value
        if self.path_type == "PathPrefix" and value != "/":
            value = value.rstrip("/")  # `/foo/` and `/foo` match the same segments
        self.path = value
        self.path_regex = re.compile(value) if self.path_type == "RegularExpression" else None
        self.headers = _conditions(match.headers, str.lower)
        self.query = _conditions(match.query_params, str)

    def matches(self, method: str, path: str, query: dict[str, str] | None,
                header: HeaderLookup) -> bool:
        if self.method is not None and method != self.method:
            return False
        kind = self.path_type
        if kind == "PathPrefix":
            prefix = self.path
            if prefix != "/" and path != prefix and not path.startswith(prefix + "/"):
                return False
        elif kind == "Exact":
            if path != self.path:
                return False
        elif self.path_regex.fullmatch(path) is None:
            return False
        for name, expected in self.headers:
            value = header(name)
            if value is None or not _value_matches(expected, value):
                return False
        if self.query:
            for name, expected in self.query:
                value = query.get(name) if query is not None else None
                if value is None or not _value_matches(expected, value):
                    return False
        return True


def _conditions(matches: Sequence[ValueMatch], normal_name: Callable[[str], str]) -> tuple:
    """Return (name, expected) pairs, expected a str (Exact) or a compiled pattern; of entries
    with the same name only the first counts (Gateway API: later ones MUST be ignored)."""
    out: dict[str, object] = {}
    for m in matches:
        out.setdefault(normal_name(m.name), m.value if m.type == "Exact" else re.compile(m.value))
    return tuple(out.items())


def _condition_key(conditions: tuple) -> tuple:
    """The conditions in a canonical, comparable form: an Exact value and a pattern with the
    same text are different conditions."""
    return tuple(sorted(
        (name, "Exact", v) if isinstance(v, str) else (name, "RegularExpression", v.pattern)
        for name, v in conditions
    ))


def _value_matches(expected, value: str) -> bool:
    if isinstance(expected, str):
        return value == expected
    return expected.fullmatch(value) is not None


def _precedence(candidate: _Candidate, route_order: int, rule_index: int, match_index: int):
    rank = _PATH_RANK[candidate.path_type]
    length = -len(candidate.path) if rank < 2 else 0
    return (rank, length, 0 if candidate.method else 1, -len(candidate.headers),
            -len(candidate.query), route_order, rule_index, match_index)


def _grpc_precedence(candidate: _Candidate, match: GRPCRouteMatch, route_order: int, rule_index: int,
                     match_index: int):
    """GRPCRoute precedence (see the module docstring); `candidate` is `match` compiled."""
    method = match.method
    if method is None:
        rank, service, name = 2, 0, 0
    elif method.type == "Exact":
        rank, service, name = 0, -len(method.service or ""), -len(method.method or "")
    else:
        rank, service, name = 1, -(method.service is not None), -(method.method is not None)
    return (rank, service, name, -len(candidate.headers), route_order, rule_index, match_index)


def compile_rule(route: Route, index: int) -> MatchedRule:
    """Return rule `index` of `route` with its label and weights worked out (a GRPCRoute's
    rule in its HTTPRoute form)."""
    rule = route.route_rules[index]
    cumulative, total = [], 0
    for backend in rule.backend_refs:
        total += max(backend.weight, 0)
        cumulative.append(total)
    return MatchedRule(route, index, rule, route.rule_label(index), tuple(cumulative), total)


class RouteTable:
    """The routes attached to one Service, in precedence order. Given GRPCRoutes and
    HTTPRoutes, only the GRPCRoutes are used (GEP-1426)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        routes, _ = winning_route_kind(routes)
        ordered = []
        for route_order, route in enumerate(routes):
            for rule_index in range(len(route.rules)):
                compiled = compile_rule(route, rule_index)
                for match_index, match in enumerate(compiled.rule.matches):
                    if isinstance(route, GRPCRoute):
                        written = route.rules[rule_index].matches[match_index]
                        candidate = _Candidate(compiled, match, written)
                        key = _grpc_precedence(candidate, written, route_order, rule_index, match_index)
                    else:
                        candidate = _Candidate(compiled, match)
                        key = _precedence(candidate, route_order, rule_index, match_index)
                    ordered.append((key, candidate))
        ordered.sort(key=lambda pair: pair[0])
        self.candidates = tuple(candidate for _, candidate in ordered)
        self.needs_query = any(c.query for c in self.candidates)
        self.routes = tuple(routes)

    def __bool__(self) -> bool:
        """True when any route is attached (then an unmatched request gets 404)."""
        return bool(self.candidates)

    def match(self, method: str, target: str, header: HeaderLookup) -> MatchedRule | None:
        """Return the rule that takes a request (`target` is path plus query), or None."""
        decision = self.decide(method, target, header)
        return decision.matched if decision is not None else None

    def decide(self, method: str, target: str, header: HeaderLookup) -> RouteDecision | None:
        """Return the decision for a request (`target` is path plus query), or None when no
        rule matches it (then it gets 404 `no-route`, spec §3)."""
        path, _, query_text = target.partition("?")
        query = None
        if self.needs_query and query_text:
            query = {}
            for name, value in parse_qsl(query_text, keep_blank_values=True):
                query.setdefault(name, value)  # the first value of a repeated parameter
        for candidate in self.candidates:
            if candidate.matches(method, path, query, header):
                prefix = candidate.path if candidate.path_type == "PathPrefix" else None
                return RouteDecision(candidate.rule, prefix, candidate.written)
        return None

    def shadowed(self) -> list[MatchedRule]:
        """Rules none of whose matches can ever be chosen: each is preceded by a candidate
        with exactly the same conditions (a heuristic for `check`'s warnings)."""
        seen: set = set()
        live: set[int] = set()
        rules: dict[int, MatchedRule] = {}
        for candidate in self.candidates:
            key = (candidate.method, candidate.path_type, candidate.path,
                   _condition_key(candidate.headers), _condition_key(candidate.query))
            rules[id(candidate.rule)] = candidate.rule
            if key not in seen:
                live.add(id(candidate.rule))
                seen.add(key)
        return [rule for ident, rule in rules.items() if ident not in live]
