"""Located YAML documents to typed resources, reporting every error on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from meshproxy.config.diagnostics import Diagnostics, Pos
from meshproxy.config.model import (
    AuthorizationPolicy,
    GRPCRoute,
    HTTPRoute,
    Mesh,
    PeerAuthentication,
    Resource,
    TrafficPolicy,
)
from meshproxy.config.model.common import ObjectMeta, Source
from meshproxy.config.parse.common import parse_metadata
from meshproxy.config.parse.fields import Obj, Reader
from meshproxy.config.parse.grpcroute import parse_grpc_route
from meshproxy.config.parse.mesh import parse_mesh
from meshproxy.config.parse.policy import parse_authorization_policy, parse_peer_authentication, parse_traffic_policy
from meshproxy.config.parse.route import parse_http_route
from meshproxy.config.yamlsource import YNode, to_python

_Parser = Callable[[Obj, ObjectMeta, Source], Resource]
# kind -> (accepted apiVersions, the first being the current one; parser)
KINDS: dict[str, tuple[tuple[str, ...], _Parser]] = {
    "Mesh": ((Mesh.api_version,), parse_mesh),
    "HTTPRoute": ((HTTPRoute.api_version, "gateway.networking.k8s.io/v1beta1"), parse_http_route),
    # v1alpha2 has the same fields (GRPCRoute became v1 in Gateway API 1.1).
    "GRPCRoute": ((GRPCRoute.api_version, "gateway.networking.k8s.io/v1alpha2"), parse_grpc_route),
    "TrafficPolicy": ((TrafficPolicy.api_version,), parse_traffic_policy),
    "PeerAuthentication": ((PeerAuthentication.api_version,), parse_peer_authentication),
    "AuthorizationPolicy": ((AuthorizationPolicy.api_version,), parse_authorization_policy),
}


@dataclass
class Parsed:
    """One document's resource and what cross-document checks need to know about it.

    `ok` is False when the document had errors (the resource, if any, then has gaps).
    `paths` maps field paths (`spec.rules[0].matches[1]`) to where they were written;
    `refs` lists (service key, field path, port) of every Service the document refers to.
    """

    resource: Resource | None
    ok: bool
    source: Source
    paths: dict[str, Pos] = field(default_factory=dict)
    refs: list[tuple[str, str, int | None]] = field(default_factory=list)
    node: YNode | None = None  # the document as written, for sending it on (control plane)
    _plain: dict | None = field(default=None, repr=False)

    def document(self) -> dict:
        """The document as plain data (made once: a parse cached for an unchanged file gives
        the same object on every load, which the control plane's encoding cache relies on)."""
        if self._plain is None:
            self._plain = to_python(self.node)
        return self._plain

    def pos(self, path: str) -> Pos:
        """Where the field `path` was written (the document's start when unknown)."""
        found = self.paths.get(path)
        return found if found is not None else Pos(self.source.file, self.source.line, self.source.col)


def parse_document(node: YNode, diags: Diagnostics) -> Parsed:
    """Return the resource of one YAML document, every error recorded in `diags`."""
    mark = diags.count()
    source = Source(node.pos.file, node.pos.line, node.pos.col)
    reader = Reader(diags)
    doc = reader.obj(node, "")
    if doc is None:
        return Parsed(None, False, source, node=node)
    api_version = doc.string("apiVersion", required=True)
    kind = doc.string("kind", required=True)
    if kind is not None and kind not in KINDS:
        diags.error(doc.value_pos("kind"), f"kind: unknown kind '{kind}' (known: {', '.join(KINDS)})")
    if kind not in KINDS:
        return Parsed(None, False, source, reader.paths, node=node)
    versions, parser = KINDS[kind]
    if api_version is not None and api_version not in versions:
        diags.error(doc.value_pos("apiVersion"), f"apiVersion: unknown apiVersion '{api_version}' "
                    f"for kind {kind} (expected {versions[0]})")
    meta = parse_metadata(doc)
    spec = doc.obj("spec", required=True)
    doc.ignore("status")
    resource = parser(spec, meta, source) if spec is not None else None
    reader.finish()
    ok = resource is not None and not diags.errors_since(mark)
    return Parsed(resource, ok, source, reader.paths, reader.refs, node)
