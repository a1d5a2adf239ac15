"""Checks that look across documents: duplicate names, one Mesh, references to Services the
Mesh does not define, policies that another one shadows, route rules that can never match,
HTTPRoutes left out because a GRPCRoute is attached to the same Service."""

from __future__ import annotations

from typing import Sequence

from meshproxy.config.diagnostics import Diagnostics
from meshproxy.config.model import GRPCRoute, HTTPRoute, Mesh, PeerAuthentication, TrafficPolicy
from meshproxy.config.model.grpcroute import GRPCRouteMatch, GRPCRouteRule
from meshproxy.config.model.route import RouteMatch, RouteRule
from meshproxy.config.parse import Parsed


def cross_check(parsed: Sequence[Parsed], diags: Diagnostics) -> None:
    """Record in `diags` every problem between the documents of `parsed` (in load order)."""
    _unique(parsed, diags)
    mesh = next((p.resource for p in parsed if isinstance(p.resource, Mesh)), None)
    if mesh is not None:
        _references(parsed, mesh, diags)
    _shadowed_policies(parsed, diags)
    _unreachable_rules(parsed, mesh, diags)
    _conflicting_route_kinds(parsed, mesh, diags)


def _where(p: Parsed) -> str:
    return str(p.source)


def _unique(parsed: Sequence[Parsed], diags: Diagnostics) -> None:
    seen: dict[tuple[str, str, str], Parsed] = {}
    first_mesh: Parsed | None = None
    for p in parsed:
        r = p.resource
        if r is None or not r.metadata.name:
            continue
        if isinstance(r, Mesh):
            if first_mesh is not None:
                diags.error(p.pos("kind"), f"kind: only one Mesh may be loaded (the first is at {_where(first_mesh)})")
            first_mesh = first_mesh or p
            continue
        key = (r.kind, r.metadata.namespace, r.metadata.name)
        if key in seen:
            diags.error(p.pos("metadata.name"), f"metadata.name: duplicate {r.kind} "
                        f"{key[1]}/{key[2]} (first defined at {_where(seen[key])})")
        else:
            seen[key] = p


def _references(parsed: Sequence[Parsed], mesh: Mesh, diags: Diagnostics) -> None:
    services = {s.key: s for s in mesh.services}
    for p in parsed:
        for key, path, port in p.refs:
            service = services.get(key)
            if service is None:
                diags.warning(p.pos(path), f"{path}: Service '{key}' is not defined in the Mesh")
            elif port is not None and port != service.port:
                port_path = path.rsplit(".", 1)[0] + ".port"
                diags.warning(p.pos(port_path), f"{port_path}: Service '{key}' has port {service.port}, not {port}")


def _shadowed_policies(parsed: Sequence[Parsed], diags: Diagnostics) -> None:
    """Two TrafficPolicies (or PeerAuthentications) of the same scope: the older one is used."""
    seen: dict[tuple[str, str, str | None], Parsed] = {}
    for p in parsed:
        r = p.resource
        if not isinstance(r, (TrafficPolicy, PeerAuthentication)) or r.metadata is None:
            continue
        target = r.target_ref.name if r.target_ref is not None else None
        key = (r.kind, r.metadata.namespace, target)
        if key not in seen:
            seen[key] = p
            continue
        older = seen[key].resource
        scope = f"Service '{target}.{key[1]}'" if target else f"namespace '{key[1]}'"
        path = "spec.targetRef.name" if target else "metadata.name"
        diags.warning(p.pos(path), f"{path}: {r.kind} {older.metadata.namespace}/{older.metadata.name} "
                      f"(at {_where(seen[key])}) already applies to {scope}; this one is not used")


def _signature(match: RouteMatch | GRPCRouteMatch) -> tuple:
    """The match with its header and query conditions in a canonical order (and its kind: an
    HTTPRoute and a GRPCRoute rule never shadow each other)."""
    if isinstance(match, GRPCRouteMatch):
        return ("GRPCRoute", match.method, tuple(sorted(match.headers, key=repr)))
    return (match.path, tuple(sorted(match.headers, key=repr)), tuple(sorted(match.query_params, key=repr)),
            match.method)


def _unreachable_rules(parsed: Sequence[Parsed], mesh: Mesh | None, diags: Diagnostics) -> None:
    """A match equal to one of an older rule for the same parent Service never wins (Gateway API
    breaks ties by route age, then rule order)."""
    ports = {s.key: s.port for s in mesh.services} if mesh is not None else {}
    taken: dict[tuple[str, tuple], str] = {}
    for p in parsed:
        route = p.resource
        if not isinstance(route, (HTTPRoute, GRPCRoute)):
            continue
        parents = {ref.service_key for ref in route.parent_refs if ref.attaches(ports.get(ref.service_key))}
        rules: Sequence[RouteRule | GRPCRouteRule] = route.rules
        for i, rule in enumerate(rules):
            label = route.rule_label(i)
            matches: Sequence[RouteMatch | GRPCRouteMatch] = rule.matches
            for j, match in enumerate(matches):
                sig = _signature(match)
                owners = {taken.get((parent, sig)) for parent in parents}
                if parents and None not in owners:
                    path = f"spec.rules[{i}].matches[{j}]" if p.paths.get(f"spec.rules[{i}].matches[{j}]") else f"spec.rules[{i}]"
                    other = sorted(o for o in owners if o is not None)[0]
                    diags.warning(p.pos(path), f"{path}: can never match: rule {other} has the same match "
                                  "and takes precedence")
                for parent in parents:
                    taken.setdefault((parent, sig), label)


def _conflicting_route_kinds(parsed: Sequence[Parsed], mesh: Mesh | None, diags: Diagnostics) -> None:
    """An HTTPRoute attached to a Service that a GRPCRoute is attached to as well is not used
    for it: only one route type applies to a Service, GRPCRoute first (GEP-1426)."""
    ports = {s.key: s.port for s in mesh.services} if mesh is not None else {}
    grpc: dict[str, GRPCRoute] = {}
    for p in parsed:
        if isinstance(p.resource, GRPCRoute):
            for ref in p.resource.parent_refs:
                if ref.attaches(ports.get(ref.service_key)):
                    grpc.setdefault(ref.service_key, p.resource)
    if not grpc:
        return
    for p in parsed:
        route = p.resource
        if not isinstance(route, HTTPRoute):
            continue
        for i, ref in enumerate(route.parent_refs):
            winner = grpc.get(ref.service_key)
            if winner is None or not ref.attaches(ports.get(ref.service_key)):
                continue
            path = f"spec.parentRefs[{i}]"
            diags.warning(p.pos(path), f"{path}: Service '{ref.service_key}' has GRPCRoute "
                          f"{winner.metadata.namespace}/{winner.metadata.name} attached, which takes "
                          "precedence (GEP-1426): this HTTPRoute is not used for it")
