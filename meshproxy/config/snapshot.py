"""The immutable, versioned configuration the data plane reads: Services, the effective policy
of each, routes attached to each, and name resolution. No I/O; build one per valid change and
swap it in one step.

Routes (HTTPRoute, GRPCRoute) attach to the Services their parentRefs name. A Service with
both kinds attached uses its GRPCRoutes and ignores its HTTPRoutes (Gateway API GEP-1426: of
different route types bound to the same Service, GRPCRoute wins over HTTPRoute; rules of the
two kinds are never merged); `ignored_routes_for` names the HTTPRoutes left out.

Scope of TrafficPolicy, PeerAuthentication and AuthorizationPolicy (spec §3): a targetRef on the
Service wins over a namespace-wide one (no targetRef, same namespace), which wins over one in the
root namespace `meshproxy-system`; with none, the defaults. Only the narrowest scope that has
any applies: one TrafficPolicy or PeerAuthentication (the oldest), every AuthorizationPolicy.
"""

from __future__ import annotations

import ipaddress
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence, TypeVar

from meshproxy.config.diagnostics import Diagnostic
from meshproxy.config.export import content_version, to_plain
from meshproxy.config.model import (
    AuthorizationPolicy,
    GRPCRoute,
    HTTPRoute,
    Instance,
    Mesh,
    PeerAuthentication,
    Resource,
    Service,
    TrafficPolicy,
)
from meshproxy.config.model.common import DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, ROOT_NAMESPACE, split_service_key
from meshproxy.config.model.grpcroute import winning_route_kind
from meshproxy.config.model.mesh import ALLOW_ANY

DEFAULT_TRAFFIC_POLICY = TrafficPolicy()
Route = HTTPRoute | GRPCRoute
ROUTE_KINDS = (HTTPRoute, GRPCRoute)
_P = TypeVar("_P", TrafficPolicy, PeerAuthentication, AuthorizationPolicy)


class _Scoped:
    """Policies of one kind indexed by scope; `lookup` gives those of the narrowest scope."""

    def __init__(self, policies: Iterable[_P]) -> None:
        self.targeted: dict[tuple[str, str], list[_P]] = {}
        self.namespaced: dict[str, list[_P]] = {}
        for p in policies:
            ns = p.metadata.namespace
            if p.target_ref is not None:
                self.targeted.setdefault((ns, p.target_ref.name), []).append(p)
            else:
                self.namespaced.setdefault(ns, []).append(p)

    def lookup(self, name: str, namespace: str) -> tuple:
        for found in (self.targeted.get((namespace, name)), self.namespaced.get(namespace),
                      self.namespaced.get(ROOT_NAMESPACE)):
            if found:
                return tuple(found)
        return ()


def _normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("["):  # [v6] or [v6]:port
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port or v4:port
        host = host.split(":", 1)[0]
    return host


class Snapshot:
    """One valid configuration, in force as a whole. Build with the resources in load order."""

    def __init__(
        self,
        resources: Sequence[Resource] = (),
        *,
        warnings: Iterable[Diagnostic] = (),
        files: Iterable[str] = (),
        services: Iterable[Service] | None = None,
        version: str | None = None,
    ) -> None:
        """`services` replaces the Mesh's Services (Kubernetes discovery gives them); `version`
        replaces the content hash (a proxy shows the control plane's version)."""
        self.resources: tuple[Resource, ...] = tuple(resources)
        self.warnings: tuple[Diagnostic, ...] = tuple(warnings)
        self.files: tuple[str, ...] = tuple(files)
        self.mesh: Mesh | None = next((r for r in self.resources if isinstance(r, Mesh)), None)
        given = services is not None
        service_list = tuple(services) if services is not None else (self.mesh.services if self.mesh else ())
        self.services: Mapping[str, Service] = MappingProxyType({s.key: s for s in service_list})
        self.outbound_traffic_policy: str = self.mesh.outbound_traffic_policy if self.mesh else ALLOW_ANY
        self.trust_domain: str = self.mesh.trust_domain if self.mesh else DEFAULT_TRUST_DOMAIN
        # Services a caller gives (not from the Mesh, which is among the resources) count too.
        extra = sorted(service_list, key=lambda s: s.key) if given else []
        self.version: str = version or content_version([*self.resources, *extra])
        self._traffic = _Scoped(r for r in self.resources if isinstance(r, TrafficPolicy))
        self._peer = _Scoped(r for r in self.resources if isinstance(r, PeerAuthentication))
        self._authz = _Scoped(r for r in self.resources if isinstance(r, AuthorizationPolicy))
        self._routes, self._ignored_routes = self._attach_routes()
        self._hosts = self._host_index()
        self._instances = {(i.app_host, i.app_port): (s, i) for s in service_list for i in s.instances}

    def _attach_routes(self) -> tuple[dict[str, tuple[Route, ...]], dict[str, tuple[Route, ...]]]:
        """(routes in force, routes ignored) per Service key, each oldest first."""
        attached: dict[str, list[tuple[int, str, str, Route]]] = {}
        for index, r in enumerate(self.resources):
            if not isinstance(r, ROUTE_KINDS):
                continue
            for ref in r.parent_refs:
                service = self.services.get(ref.service_key)
                if not ref.attaches(service.port if service is not None else None):
                    continue
                entries = attached.setdefault(ref.service_key, [])
                if all(e[3] is not r for e in entries):
                    entries.append((index, r.metadata.namespace, r.metadata.name, r))
        in_force: dict[str, tuple[Route, ...]] = {}
        ignored: dict[str, tuple[Route, ...]] = {}
        for key, entries in attached.items():
            routes = tuple(e[3] for e in sorted(entries, key=lambda e: e[:3]))
            in_force[key], left_out = winning_route_kind(routes)
            if left_out:
                ignored[key] = left_out
        return in_force, ignored

    def _host_index(self) -> dict[str, Service]:
        hosts: dict[str, Service] = {}
        suffixes = {"svc.cluster.local", f"svc.{self.trust_domain.lower()}"}
        for s in self.services.values():
            base = f"{s.name}.{s.namespace}".lower()
            hosts[base] = s
            hosts[f"{base}.svc"] = s
            for suffix in suffixes:
                hosts[f"{base}.{suffix}"] = s
            for address in s.addresses:
                hosts[str(ipaddress.ip_address(address))] = s
        return hosts

    # Effective policies.

    def policy_for(self, service_key: str) -> TrafficPolicy:
        """Return the TrafficPolicy in force for Service `NAME.NAMESPACE` (defaults when none)."""
        found = self._traffic.lookup(*split_service_key(service_key))
        return found[0] if found else DEFAULT_TRAFFIC_POLICY

    def peer_authentication_for(self, service_key: str) -> PeerAuthentication | None:
        """Return the PeerAuthentication in force for Service `NAME.NAMESPACE`, or None."""
        found = self._peer.lookup(*split_service_key(service_key))
        return found[0] if found else None

    def mtls_mode_for(self, service_key: str, default: str = "PERMISSIVE") -> str:
        """Return the inbound mTLS mode of a Service: its PeerAuthentication's, else the Mesh's,
        else `default` (PERMISSIVE; `meshproxy up` passes STRICT)."""
        peer = self.peer_authentication_for(service_key)
        if peer is not None:
            return peer.mtls_mode
        if self.mesh is not None and self.mesh.mtls_mode is not None:
            return self.mesh.mtls_mode
        return default

    def authorization_policies_for(self, service_key: str) -> tuple[AuthorizationPolicy, ...]:
        """Return the AuthorizationPolicies in force for a Service (all of the narrowest scope
        that has any, oldest first); () when none applies and so everything is allowed."""
        return self._authz.lookup(*split_service_key(service_key))

    def routes_for(self, service_key: str) -> tuple[Route, ...]:
        """Return the routes in force for Service `NAME.NAMESPACE`, oldest first: its
        GRPCRoutes when it has any, else its HTTPRoutes (never both kinds)."""
        return self._routes.get(service_key, ())

    def ignored_routes_for(self, service_key: str) -> tuple[Route, ...]:
        """Return the routes attached to a Service but not in force (its HTTPRoutes, when a
        GRPCRoute is attached too), oldest first."""
        return self._ignored_routes.get(service_key, ())

    # Names and addresses.

    def resolve_authority(self, host: str, client_namespace: str = DEFAULT_NAMESPACE) -> Service | None:
        """Return the Service that `host` names, or None.

        Accepts `NAME` (in `client_namespace`), `NAME.NS`, `NAME.NS.svc`,
        `NAME.NS.svc.cluster.local` (and `.svc.TRUST_DOMAIN`), and the Service's virtual IPs;
        case-insensitive; a `:port` suffix is ignored.
        """
        host = _normal_host(host)
        found = self._hosts.get(host)
        if found is None and host and "." not in host:
            found = self._hosts.get(f"{host}.{client_namespace.lower()}")
        return found

    def instance_at(self, host: str, port: int) -> tuple[Service, Instance] | None:
        """Return (Service, Instance) whose app listens at `host:port`, or None."""
        return self._instances.get((_normal_host(host), port))

    # Export.

    def to_json(self) -> dict[str, Any]:
        """Return the configuration in force as JSON-serialisable data (admin `/config`):
        version, Services with instances and effective policies, routes, warnings."""
        services = {}
        for key, service in self.services.items():
            entry = to_plain(service)
            entry["key"] = key
            entry["trafficPolicy"] = to_plain(self.policy_for(key))
            peer = self.peer_authentication_for(key)
            entry["peerAuthentication"] = to_plain(peer) if peer is not None else None
            entry["mtlsMode"] = self.mtls_mode_for(key)
            entry["authorizationPolicies"] = [to_plain(p) for p in self.authorization_policies_for(key)]
            entry["routes"] = [f"{r.metadata.namespace}/{r.metadata.name}" for r in self.routes_for(key)]
            if any(isinstance(r, GRPCRoute) for r in self.routes_for(key)):
                entry["routeKind"] = GRPCRoute.kind
            ignored = self.ignored_routes_for(key)
            if ignored:
                entry["ignoredRoutes"] = [f"{r.kind} {r.metadata.namespace}/{r.metadata.name}" for r in ignored]
            services[key] = entry
        mesh = None
        if self.mesh is not None:
            mesh = to_plain(self.mesh)
            mesh.pop("services", None)
        return {
            "version": self.version,
            "trustDomain": self.trust_domain,
            "outboundTrafficPolicy": self.outbound_traffic_policy,
            "mesh": mesh,
            "services": services,
            "routes": [to_plain(r) for r in self.resources if isinstance(r, ROUTE_KINDS)],
            "resources": [
                {"kind": r.kind, "namespace": r.metadata.namespace, "name": r.metadata.name,
                 "source": str(r.source) if r.source else None}
                for r in self.resources
            ],
            "files": list(self.files),
            "warnings": [str(w) for w in self.warnings],
        }

    def __repr__(self) -> str:
        return f"<Snapshot {self.version}: {len(self.resources)} resources, {len(self.services)} services>"
