"""What a Kubernetes list + watch delivers, held as plain data: `ClusterState`. Pure: no I/O.

Objects are dicts as the API server's JSON has them (camelCase), keyed by (namespace, name).
Stored objects lose `status`, `managedFields` and `resourceVersion`, and pods everything but
name, labels, service account and container names: so a status-only update is no change.
control/kubeobjects.py turns a ClusterState into configuration documents.
"""

from __future__ import annotations

from typing import Any, Iterable

API_VERSIONS: dict[str, str] = {
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Pod": "v1",
    "Namespace": "v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "GRPCRoute": "gateway.networking.k8s.io/v1",
    "TrafficPolicy": "meshproxy.io/v1alpha1",
    "PeerAuthentication": "meshproxy.io/v1alpha1",
    "AuthorizationPolicy": "meshproxy.io/v1alpha1",
}
KINDS = tuple(API_VERSIONS)
_UNSTORED_METADATA = ("managedFields", "resourceVersion")

Key = tuple[str, str]


def metadata_of(obj: dict) -> dict:
    """`obj`'s metadata mapping ({} when it has none or it is not a mapping)."""
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def namespaced_name(obj: dict) -> Key:
    """(namespace, name) of `obj` ("" for what it lacks)."""
    meta = metadata_of(obj)
    return (meta.get("namespace") or "", meta.get("name") or "")


def _version_number(value: Any) -> int | None:
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() else None


def _names(containers: Any) -> list[dict]:
    return [{"name": c.get("name")} for c in containers or () if isinstance(c, dict)]


def _stored(kind: str, obj: dict) -> dict:
    """The part of `obj` worth keeping (see the module docstring), with its kind set."""
    meta = {k: v for k, v in metadata_of(obj).items() if k not in _UNSTORED_METADATA}
    if kind == "Pod":
        spec = obj.get("spec") or {}
        return {
            "apiVersion": API_VERSIONS[kind],
            "kind": kind,
            "metadata": {k: meta[k] for k in ("name", "namespace", "labels") if k in meta},
            "spec": {
                "serviceAccountName": spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
                "containers": _names(spec.get("containers")),
                "initContainers": _names(spec.get("initContainers")),
            },
        }
    out = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    out["apiVersion"] = obj.get("apiVersion") or API_VERSIONS[kind]
    out["kind"] = kind
    out["metadata"] = meta
    return out


class ClusterState:
    """The objects of the kinds in `KINDS`, as a list + watch of each has delivered them."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, dict]] = {kind: {} for kind in KINDS}
        self._version = 0

    @staticmethod
    def _kind(obj: dict, kind: str | None) -> str:
        found = kind or obj.get("kind")
        if found not in API_VERSIONS:
            raise ValueError(f"unknown kind {found!r} (known: {', '.join(KINDS)})")
        return found

    def observe(self, resource_version: Any) -> None:
        """Note a resourceVersion (of a list, an object or a bookmark); non-numeric ones are ignored."""
        number = _version_number(resource_version)
        if number is not None and number > self._version:
            self._version = number

    def resource_version(self) -> int:
        """Return the highest numeric resourceVersion seen (0 before any): a generation that only grows."""
        return self._version

    def upsert(self, obj: dict, kind: str | None = None) -> bool:
        """Add or replace `obj` (kind from `kind`, else its own `kind`); return True when what is
        kept of it changed. Raises ValueError for a kind not in `KINDS`."""
        kind = self._kind(obj, kind)
        self.observe(metadata_of(obj).get("resourceVersion"))
        stored = _stored(kind, obj)
        table = self._objects[kind]
        key = namespaced_name(obj)
        if table.get(key) == stored:
            return False
        table[key] = stored
        return True

    def delete(self, obj: dict, kind: str | None = None) -> bool:
        """Remove `obj` (by namespace and name); return True when it was held.
        Raises ValueError for a kind not in `KINDS`."""
        kind = self._kind(obj, kind)
        self.observe(metadata_of(obj).get("resourceVersion"))
        return self._objects[kind].pop(namespaced_name(obj), None) is not None

    def apply_event(self, event_type: str, obj: dict, kind: str | None = None) -> bool:
        """Apply one watch event (ADDED, MODIFIED, DELETED, BOOKMARK); return True when the state
        changed. Raises ValueError for another event type or an unknown kind."""
        if event_type in ("ADDED", "MODIFIED"):
            return self.upsert(obj, kind)
        if event_type == "DELETED":
            return self.delete(obj, kind)
        if event_type == "BOOKMARK":
            self.observe(metadata_of(obj).get("resourceVersion"))
            return False
        raise ValueError(f"unknown watch event type {event_type!r}")

    def replace(self, kind: str, objects: Iterable[dict], *, namespace: str | None = None,
                resource_version: Any = None) -> bool:
        """Make the objects of `kind` (in `namespace`, or all of them when None) exactly
        `objects`, as a fresh list gives them; return True when anything changed.
        Raises ValueError for a kind not in `KINDS`."""
        kind = self._kind({}, kind)
        self.observe(resource_version)
        table = self._objects[kind]
        fresh = {}
        for obj in objects:
            self.observe(metadata_of(obj).get("resourceVersion"))
            fresh[namespaced_name(obj)] = _stored(kind, obj)
        old = {k: v for k, v in table.items() if namespace is None or k[0] == namespace}
        if old == fresh:
            return False
        for key in old:
            del table[key]
        table.update(fresh)
        return True

    def objects(self, kind: str) -> list[dict]:
        """Return the held objects of `kind`, sorted by (namespace, name); do not modify them."""
        table = self._objects[self._kind({}, kind)]
        return [table[k] for k in sorted(table)]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        """Return the held object of `kind` at namespace/name (namespace "" for cluster-scoped
        kinds), or None."""
        return self._objects[self._kind({}, kind)].get((namespace, name))
