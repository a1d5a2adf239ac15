"""Parsing `GRPCRoute` (Gateway API v1) with the checks the Gateway API's CRD makes (an Exact
service or method is a valid protobuf name, at least one of them is given, the filter types
GRPCRoute has), plus that every regular expression compiles with Python's `re`.

The parts a GRPCRoute shares with an HTTPRoute (parentRefs, header matches, filters,
backendRefs, timeouts) are read by the HTTPRoute parser's functions, so both report the same
mistakes the same way.
"""

from __future__ import annotations

import re

from meshproxy.config.model.common import ObjectMeta, Source
from meshproxy.config.model.grpcroute import (
    EXACT_METHOD_RE,
    EXACT_SERVICE_RE,
    GRPC_FILTER_TYPES,
    MAX_NAME_LENGTH,
    METHOD_MATCH_TYPES,
    GRPCMethodMatch,
    GRPCRoute,
    GRPCRouteMatch,
    GRPCRouteRule,
)
from meshproxy.config.model.route import RouteRetry
from meshproxy.config.parse.fields import Obj
from meshproxy.config.parse.route import (
    check_regex,
    parse_backend_refs,
    parse_filters,
    parse_header_matches,
    parse_parent_refs,
    parse_timeouts,
)


def parse_grpc_route(spec: Obj, meta: ObjectMeta, source: Source) -> GRPCRoute:
    """Return the GRPCRoute of `spec`; namespaces left out of references are the route's own."""
    ns = meta.namespace
    parents = parse_parent_refs(spec, ns)
    hostnames = spec.strs("hostnames")
    rules = tuple(_rule(o, ns) for o in spec.objs("rules"))
    return GRPCRoute(
        metadata=meta,
        parent_refs=parents,
        hostnames=hostnames,
        rules=rules if spec.has("rules") else (GRPCRouteRule(),),
        source=source,
    )


def _rule(o: Obj, ns: str) -> GRPCRouteRule:
    name = o.string("name")
    matches = tuple(_match(m) for m in o.objs("matches"))
    filters = parse_filters(o, ns, GRPC_FILTER_TYPES)
    backends = parse_backend_refs(o, ns, GRPC_FILTER_TYPES)
    timeouts = parse_timeouts(o)
    retry = None
    if (r := o.obj("retry")) is not None:
        if r.has("codes"):
            # Route `codes` are HTTP statuses; a gRPC answer's status is in grpc-status.
            r.r.error(r.pos("codes"), f"{r.field('codes')}: not for GRPCRoute: a gRPC call's status "
                      "is its grpc-status, and which ones are retried is the Service's TrafficPolicy "
                      "retry.on (e.g. unavailable)")
        r.entry("codes")
        retry = RouteRetry(attempts=r.integer("attempts", lo=0, hi=100), backoff=r.duration("backoff"))
    return GRPCRouteRule(
        matches=matches or (GRPCRouteMatch(),),
        filters=filters,
        backend_refs=backends,
        timeouts=timeouts,
        retry=retry,
        name=name,
    )


def _match(o: Obj) -> GRPCRouteMatch:
    method = _method_match(m) if (m := o.obj("method")) is not None else None
    return GRPCRouteMatch(method=method, headers=parse_header_matches(o))


def _method_match(o: Obj) -> GRPCMethodMatch | None:
    kind = o.string("type", "Exact", choices=METHOD_MATCH_TYPES)
    # Gateway API: a service or method left empty or out matches any.
    service = o.string("service") or None
    method = o.string("method") or None
    if service is None and method is None:
        o.r.error(o.where, f"{o.path}: give a service, a method or both (an empty one matches any)")
        return None
    ok = True
    for key, value, exact, what in (("service", service, EXACT_SERVICE_RE, "gRPC service name"),
                                    ("method", method, EXACT_METHOD_RE, "gRPC method name")):
        if value is None:
            continue
        if len(value) > MAX_NAME_LENGTH:
            o.r.error(o.value_pos(key), f"{o.field(key)}: longer than {MAX_NAME_LENGTH} characters")
            ok = False
        elif kind == "RegularExpression":
            ok = check_regex(o, key, value) and ok
        elif not exact.match(value):
            hint = "package and service names joined by '.', e.g. drone.v1.Tracking" if key == "service" \
                else "letters, digits and '_', not starting with a digit, e.g. Watch"
            o.r.error(o.value_pos(key), f"{o.field(key)}: '{value}' is not a valid {what} ({hint})")
            ok = False
    if not ok:
        return None
    match = GRPCMethodMatch(type=kind, service=service, method=method)
    if kind == "RegularExpression":
        # Each pattern compiles alone; together they must too (a group name used in both,
        # say, does not).
        pattern = match.path_match().value
        try:
            re.compile(pattern)
        except re.error as exc:
            o.r.error(o.where, f"{o.path}: service and method do not make one regular expression "
                      f"('{pattern}': {exc})")
            return None
    return match
