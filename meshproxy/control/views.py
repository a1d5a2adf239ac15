"""What the control plane holds and what each proxy receives, as pure data: no I/O.

A `ControlSnapshot` is one valid configuration: the documents as written (plain data, the same
shape as the YAML files), the Snapshot built from them, a content `version` and a `generation`.

- `version` is a hash of the documents the proxies receive. Two control-plane replicas reading
  the same files (or the same API server) compute the same version, so a proxy that moves from
  one replica to the other applies nothing twice.
- `generation` orders versions: one number per source (the newest file time, the API server's
  highest resourceVersion). A proxy refuses a snapshot that is older in every source than the
  one it holds, so a replica that has not seen a change yet cannot roll it back.

A proxy's view is every document it needs to call out (the Mesh with every Service and its
endpoints, the routes, the TrafficPolicies, the PeerAuthentications: a caller sends plaintext to
a Service whose mTLS is disabled) plus the AuthorizationPolicies in force for its own Service,
and no other Service's: who may call a Service is none of its callers' business.

Documents from a discovery source (Kubernetes) are many objects with many owners, so they are
judged one by one (control/screening.py): an invalid object does not hold back everyone else's.
Files keep the all-or-nothing rule: one person edits them, and half a folder is no valid state.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from meshproxy.config import ConfigError, Diagnostic, LoadResult, Resource, Snapshot
from meshproxy.config.diagnostics import Diagnostics
from meshproxy.config.parse import parse_document
from meshproxy.config.validate import cross_check
from meshproxy.config.yamlsource import YEntry, YMap, YNode, YSeq, from_python

# (namespace, service, instance) -> the inbound port its sidecar told the control plane.
Registrations = Mapping[tuple[str, str, str], int]
INBOUND_KINDS = ("AuthorizationPolicy",)
# Where a screened document came from when it is not one discovered object.
FILES_SOURCE = "<files>"
DISCOVERY_SOURCE = "<discovery>"
ObjectKey = tuple[str, str, str]  # kind, namespace, name


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def is_older(candidate: Sequence[int], held: Sequence[int]) -> bool:
    """True when generation `candidate` is behind `held`: no source newer, at least one older.

    Generations of different lengths (a control plane with another set of sources) are never
    older; the version decides alone then.
    """
    if len(candidate) != len(held):
        return False
    return all(c <= h for c, h in zip(candidate, held)) and any(c < h for c, h in zip(candidate, held))


def _sanitised_mesh(doc: dict, registrations: Registrations) -> dict:
    """The Mesh as proxies get it: sidecar ports that sidecars reported filled in; policy file
    paths and app commands left out (they mean nothing to a proxy)."""
    doc = copy.deepcopy(doc)
    spec = doc.get("spec") or {}
    spec.pop("policies", None)
    for service in spec.get("services") or []:
        namespace = service.get("namespace", "default")
        for instance in service.get("instances") or []:
            app = instance.get("app")
            if isinstance(app, dict):
                app.pop("command", None)
            sidecar = instance.get("sidecar")
            if sidecar is False:
                continue
            port = registrations.get((namespace, service.get("name"), instance.get("name")))
            if port is None:
                continue
            if not isinstance(sidecar, dict):
                sidecar = instance["sidecar"] = {}
            sidecar.setdefault("inbound", port)
    return doc


def merge_discovered(file_documents: Sequence[dict], discovered: Sequence[dict]) -> list[dict]:
    """Return the documents of both sources as one configuration: the Services a discovery
    source found join the files' Mesh (or form the Mesh when the files have none)."""
    documents = [copy.deepcopy(d) for d in file_documents]
    mesh = next((d for d in documents if d.get("kind") == "Mesh"), None)
    for doc in discovered:
        if doc.get("kind") == "Mesh" and mesh is not None:
            spec = mesh.setdefault("spec", {})
            known = {(s.get("namespace", "default"), s.get("name")) for s in spec.get("services") or []}
            extra = [s for s in (doc.get("spec") or {}).get("services") or []
                     if (s.get("namespace", "default"), s.get("name")) not in known]
            spec["services"] = [*(spec.get("services") or []), *extra]
        else:
            documents.append(doc)
            if doc.get("kind") == "Mesh":
                mesh = doc
    return documents


@dataclass
class ControlSnapshot:
    """One valid configuration and the encoded view of every proxy that asked for one."""

    version: str
    generation: tuple[int, ...]
    documents: tuple[dict, ...]  # as proxies get them (registrations in, file paths out)
    snapshot: Snapshot
    _shared: bytes = b""  # every document but the AuthorizationPolicies, comma-separated JSON
    _inbound: dict[int, bytes] = field(default_factory=dict)  # document index -> JSON
    _index: dict[int, int] = field(default_factory=dict)  # id(resource) -> document index
    _suffixes: dict[str, bytes] = field(default_factory=dict)  # service key -> its own part

    def view_parts(self, service_key: str) -> tuple[bytes, bytes]:
        """Return the JSON array of documents the proxy of Service `NAME.NAMESPACE` receives, in
        two parts to write one after the other: `[` and the part every proxy shares (one bytes
        object for all of them, not a copy per proxy), then this Service's own part and `]`."""
        suffix = self._suffixes.get(service_key)
        if suffix is None:
            own = [self._inbound[self._index[id(p)]]
                   for p in self.snapshot.authorization_policies_for(service_key) if id(p) in self._index]
            joined = b",".join(own)
            suffix = (b"," if self._shared and joined else b"") + joined + b"]"
            if len(self._suffixes) < 100_000:
                self._suffixes[service_key] = suffix
        return self._shared, suffix

    def view(self, service_key: str) -> bytes:
        """The whole JSON array of view_parts() (for tests and small meshes)."""
        shared, suffix = self.view_parts(service_key)
        return b"[" + shared + suffix

    def to_json(self) -> dict:
        """The control plane's `/config`: version, generation, the configuration in force."""
        return {"version": self.version, "generation": list(self.generation),
                "config": self.snapshot.to_json()}


class EncodingCache:
    """Each document's JSON from the last build, by identity: a reload gives the same document
    objects for unchanged files (see loader.ParseCache), so an edit re-encodes one file's
    documents, not the mesh's thousands."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def encode(self, doc: dict, registrations: Registrations, used: dict[int, tuple]) -> tuple[dict, bytes]:
        """Return (the document as proxies get it, its JSON); note the entry in `used`."""
        key = id(doc)
        facts = tuple(sorted(registrations.items())) if doc.get("kind") == "Mesh" else None
        hit = self._entries.get(key)
        if hit is None or hit[0] is not doc or hit[1] != facts:
            sent = _sanitised_mesh(doc, registrations) if facts is not None else doc
            hit = (doc, facts, sent, _dumps(sent))
        used[key] = hit
        return hit[2], hit[3]

    def keep(self, used: dict[int, tuple]) -> None:
        """Keep the entries of the last build only."""
        self._entries = used


def build(
    files: LoadResult | None,
    discovered: Sequence[dict] = (),
    registrations: Registrations | None = None,
    generation: Iterable[int] = (0,),
    cache: EncodingCache | None = None,
) -> ControlSnapshot:
    """Return the ControlSnapshot of the files' load result and discovered documents.

    Raises ConfigError when the files had errors (with FILE:LINE:COL) or the combination is
    invalid; an error in a discovered object names it as its file (`HTTPRoute NS/NAME`, or
    `Service NS/NAME` for a Service of the discovered Mesh). Registrations (sidecar inbound
    ports) fill in ports the files leave open.
    """
    registrations = registrations or {}
    if files is not None and files.errors:
        raise ConfigError(files.errors, files.warnings)
    file_documents = list(files.documents) if files is not None else []
    documents = merge_discovered(file_documents, discovered) if discovered else file_documents
    # Checked before anything is encoded: a refused change costs the check alone.
    loaded = load_nodes(_labelled_nodes(file_documents, discovered)) if discovered else None
    cache = cache if cache is not None else EncodingCache()
    used: dict[int, tuple] = {}
    pairs = [cache.encode(d, registrations, used) for d in documents]
    sent = [p[0] for p in pairs]
    encoded = [p[1] for p in pairs]
    version = hashlib.sha256(b"\n".join(encoded)).hexdigest()[:12]
    if loaded is not None:
        snapshot = Snapshot(loaded[0], warnings=loaded[1], version=version)
    elif files is not None:
        snapshot = Snapshot(files.resources, warnings=files.warnings, files=files.files, version=version)
    else:
        snapshot = Snapshot(version=version)
    inbound = {i: e for i, (d, e) in enumerate(zip(sent, encoded)) if d.get("kind") in INBOUND_KINDS}
    shared = b",".join(e for i, e in enumerate(encoded) if i not in inbound)
    # Documents and the Snapshot's resources are in the same order.
    index = {id(r): i for i, r in enumerate(snapshot.resources) if i in inbound}
    cache.keep(used)
    return ControlSnapshot(version, tuple(generation), tuple(sent), snapshot, shared, inbound, index)


def object_key(doc: dict, kind: str | None = None) -> ObjectKey:
    """(kind, namespace, name) of a discovered document, or of a Service of a Mesh."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else doc
    return (str(kind or doc.get("kind")), str(meta.get("namespace") or "default"), str(meta.get("name")))


def object_label(key: ObjectKey) -> str:
    """`KIND NAMESPACE/NAME`: the "file" a discovered object's errors name."""
    return f"{key[0]} {key[1]}/{key[2]}"


def _with_services(mesh: YNode, services: list[YNode]) -> YNode:
    """The Mesh node `mesh` with `services` appended to its spec.services."""
    spec_entry = mesh.entries.get("spec") if isinstance(mesh, YMap) else None
    if not services or spec_entry is None or not isinstance(spec_entry.value, YMap):
        return mesh  # a Mesh without a spec mapping: its own error says so
    spec = spec_entry.value
    held = spec.entries.get("services")
    if held is not None and not isinstance(held.value, YSeq):
        return mesh
    own = held.value.items if held is not None else ()
    entries = {**spec.entries, "services": YEntry("services", held.key_pos if held else spec.pos,
                                                  YSeq(spec.pos, (*own, *services)))}
    return YMap(mesh.pos, {**mesh.entries, "spec": YEntry("spec", spec_entry.key_pos, YMap(spec.pos, entries))})


def _labelled_nodes(file_documents: Sequence[dict], discovered: Sequence[dict]) -> list[YNode]:
    """The documents of merge_discovered(file_documents, discovered) as nodes, in its order;
    each discovered object (a Service of a Mesh, or a document) under its own source name,
    the files' documents under FILES_SOURCE, a discovered Mesh's settings DISCOVERY_SOURCE."""
    nodes = [from_python(doc, FILES_SOURCE) for doc in file_documents]
    mesh_at = next((i for i, d in enumerate(file_documents) if d.get("kind") == "Mesh"), None)
    known: set[ObjectKey] = set()
    if mesh_at is not None:
        spec = file_documents[mesh_at].get("spec") or {}
        known = {object_key(s, "Service") for s in spec.get("services") or () if isinstance(s, dict)}
    services: list[YNode] = []
    for doc in discovered:
        if doc.get("kind") != "Mesh":
            nodes.append(from_python(doc, object_label(object_key(doc))))
            continue
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        mine = [(object_key(s, "Service"), s) for s in spec.get("services") or () if isinstance(s, dict)]
        if mesh_at is None:  # the first discovered Mesh is the Mesh, every Service of it kept
            nodes.append(from_python({**doc, "spec": {k: v for k, v in spec.items() if k != "services"}},
                                     DISCOVERY_SOURCE))
            mesh_at = len(nodes) - 1
        else:  # merged into the Mesh there is: a Service it already has wins
            mine = [(k, s) for k, s in mine if k not in known]
        known.update(k for k, _ in mine)
        services.extend(from_python(s, object_label(k)) for k, s in mine)
    if mesh_at is not None:
        nodes[mesh_at] = _with_services(nodes[mesh_at], services)
    return nodes


def load_nodes(nodes: list[YNode]) -> tuple[tuple[Resource, ...], tuple[Diagnostic, ...]]:
    """Return (resources, warnings) of `nodes`; raises ConfigError listing every error."""
    diags = Diagnostics()
    parsed = [parse_document(node, diags) for node in nodes]
    cross_check(parsed, diags)
    if diags.errors:
        raise ConfigError(diags.errors, diags.warnings)
    return tuple(p.resource for p in parsed if p.resource is not None), tuple(diags.warnings)
