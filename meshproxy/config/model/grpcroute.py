"""`GRPCRoute` (gateway.networking.k8s.io/v1) as the mesh uses it: attached to a Service through
`parentRefs` like an HTTPRoute (GAMMA), matching gRPC calls by service, method and headers.

A gRPC call is an HTTP/2 POST whose path is `/SERVICE/METHOD` (gRPC over HTTP/2,
PROTOCOL-HTTP2.md), so every GRPCRoute rule is also an HTTPRoute rule: `route_rules()` gives
them in the internal form (a path match plus the header matches) that the router and the data
plane already act on. Filters, backends, timeouts and retry are the HTTPRoute model's.

Which GRPCRoute rule wins is the Gateway API's GRPCRoute precedence (policy/router.py), not
HTTPRoute's; a Service with both kinds attached uses its GRPCRoutes only (GEP-1426).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Sequence, TypeVar

from meshproxy.config.model.common import ObjectMeta, Source
from meshproxy.config.model.route import (
    BackendRef,
    ParentRef,
    PathMatch,
    RouteFilter,
    RouteMatch,
    RouteRetry,
    RouteRule,
    RouteTimeouts,
    ValueMatch,
)

METHOD_MATCH_TYPES = ("Exact", "RegularExpression")
GRPC_FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")
# What an Exact service or method may be (the Gateway API CRD's validation rules).
EXACT_SERVICE_RE = re.compile(r"^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")
EXACT_METHOD_RE = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
MAX_NAME_LENGTH = 1024

# One segment of the path: what a left-out service or method matches.
_SEGMENT = "[^/]+"
# Leading global inline flags, e.g. `(?i)`: Python refuses them once the pattern is embedded
# in a larger one, so they become scoped flags, `(?i:...)`, around the user's pattern.
_GLOBAL_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")


def _scoped(pattern: str) -> str:
    """`pattern` as a group that can sit inside a larger pattern (its leading global flags,
    if any, made scoped)."""
    flags = ""
    while (m := _GLOBAL_FLAGS.match(pattern)) is not None:
        flags += m.group(1)
        pattern = pattern[m.end():]
    return f"(?{flags}:{pattern})"


@dataclass(frozen=True)
class GRPCMethodMatch:
    """`service` and/or `method` (None: any), compared Exact (case-sensitive) or as Python
    regular expressions matched against the whole service or method name."""

    type: str = "Exact"
    service: str | None = None
    method: str | None = None

    def path_match(self) -> PathMatch:
        """The path match that holds for exactly the calls this matches: an Exact path when
        both names are given and exact, else a RegularExpression over `/SERVICE/METHOD`."""
        if self.type == "Exact":
            if self.service is not None and self.method is not None:
                return PathMatch(type="Exact", value=f"/{self.service}/{self.method}")
            service = re.escape(self.service) if self.service is not None else _SEGMENT
            method = re.escape(self.method) if self.method is not None else _SEGMENT
            return PathMatch(type="RegularExpression", value=f"/{service}/{method}")
        service = _scoped(self.service) if self.service is not None else _SEGMENT
        method = _scoped(self.method) if self.method is not None else _SEGMENT
        # The lookahead pins the path to two non-empty segments, so that a service pattern
        # such as `.*` cannot reach over the `/` into the method (or the other way round).
        return PathMatch(type="RegularExpression", value=f"/(?=[^/]+/[^/]+\\Z){service}/{method}")

    def describe(self) -> str:
        """For people: `Exact drone.v1.Tracking/Watch` when both are exact, else e.g.
        `RegularExpression service drone\\.v1\\..*, any method`."""
        if self.type == "Exact" and self.service is not None and self.method is not None:
            return f"Exact {self.service}/{self.method}"
        service = f"service {self.service}" if self.service is not None else "any service"
        method = f"method {self.method}" if self.method is not None else "any method"
        return f"{self.type} {service}, {method}"


@dataclass(frozen=True)
class GRPCRouteMatch:
    """All given conditions must hold; no method match: every service and method."""

    method: GRPCMethodMatch | None = None
    headers: tuple[ValueMatch, ...] = ()

    def route_match(self) -> RouteMatch:
        """This match as an HTTPRoute match: a path match and the same header matches."""
        path = self.method.path_match() if self.method is not None else PathMatch()
        return RouteMatch(path=path, headers=self.headers)


@dataclass(frozen=True)
class GRPCRouteRule:
    """Matches (any), filters, weighted backends, timeouts and retry of one rule.

    A rule written without matches has one match that every call satisfies.
    """

    matches: tuple[GRPCRouteMatch, ...] = (GRPCRouteMatch(),)
    filters: tuple[RouteFilter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: RouteTimeouts | None = None
    retry: RouteRetry | None = None
    name: str | None = None

    def route_rule(self) -> RouteRule:
        """This rule as an HTTPRoute rule (matches in the same order, the rest unchanged)."""
        return RouteRule(
            matches=tuple(m.route_match() for m in self.matches),
            filters=self.filters,
            backend_refs=self.backend_refs,
            timeouts=self.timeouts,
            retry=self.retry,
            name=self.name,
        )


@dataclass(frozen=True)
class GRPCRoute:
    """A Gateway API GRPCRoute. A route written without rules has one rule matching every call."""

    api_version: ClassVar[str] = "gateway.networking.k8s.io/v1"
    kind: ClassVar[str] = "GRPCRoute"

    metadata: ObjectMeta
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[GRPCRouteRule, ...] = (GRPCRouteRule(),)
    source: Source | None = field(default=None, compare=False)

    @cached_property
    def route_rules(self) -> tuple[RouteRule, ...]:
        """The rules in the HTTPRoute form the router and the data plane act on (same order:
        `route_rules[i]` is `rules[i]`). Worked out once per route object."""
        return tuple(r.route_rule() for r in self.rules)

    def rule_label(self, index: int) -> str:
        """The metrics `route` label of rule `index`: `NAMESPACE/NAME/RULE` (spec §6)."""
        rule_name = self.rules[index].name
        return f"{self.metadata.namespace}/{self.metadata.name}/{rule_name if rule_name else index}"


_R = TypeVar("_R")


def winning_route_kind(routes: Sequence[_R]) -> tuple[tuple[_R, ...], tuple[_R, ...]]:
    """Split the routes attached to one Service into (in force, ignored), order kept: with any
    GRPCRoute among them the GRPCRoutes are in force and the others ignored, else all are in
    force. Gateway API GEP-1426: of different route types bound to the same Service only one
    type applies, GRPCRoute before HTTPRoute, and rules of the two are never merged."""
    if not any(isinstance(r, GRPCRoute) for r in routes):
        return tuple(routes), ()
    return (tuple(r for r in routes if isinstance(r, GRPCRoute)),
            tuple(r for r in routes if not isinstance(r, GRPCRoute)))
