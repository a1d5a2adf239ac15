"""Kubernetes API objects to the configuration documents the control plane loads. Pure: no I/O.

`ClusterState` holds the objects a list + watch delivers (dicts as the API server's JSON has
them, camelCase), keyed by (namespace, name). `documents_from_cluster` turns them into plain
documents of the shape users write in files: one `Mesh` named `kubernetes` holding every
Service with its instances, then the HTTPRoutes and the meshproxy.io policies.

Where the Mesh shape and Kubernetes differ, these choices hold:

- One port per Service (a Mesh Service has one): the TCP port named `http`, else the first TCP
  port. Services with no TCP port and `ExternalName` Services are left out: the mesh could not
  send them anything.
- EndpointSlices join their Service by the label `kubernetes.io/service-name`. An endpoint is
  an instance when it is ready (an absent `ready` counts as true, as the API documents), or
  when it is `serving` and `terminating`: it still answers, and carries the label
  `meshproxy.io/terminating: "true"`. Every other endpoint (not ready and not serving, or
  not ready and not terminating) is left out, as kube-proxy leaves it out.
- The instance's port is the EndpointSlice port of the same name as the chosen Service port
  (that is how named targetPorts are resolved). A slice that lists ports but not that one
  serves other ports and is skipped; a slice with no ports falls back to a numeric targetPort.
  Only IPv4 and IPv6 slices count (FQDN slices are deprecated and give no IP to dial).
- An instance is named after the endpoint's `targetRef` (the pod), else after its address. A
  pod listed twice for one Service (one slice per IP family, or a slice being rewritten) is one
  instance: the Service's primary IP family gives its `app.address` (a listing that is not
  terminating before one that is), and a dual-stack pod's address of the other family becomes
  `app.otherAddresses`, so that a client calling the pod at either address reaches the
  instance; endpoints without a targetRef are never merged. Instance names are unique in a
  Mesh, but a pod may back several Services and pod names repeat across namespaces: the
  Service that sorts first (namespace, name) keeps the bare pod name, later ones get
  `POD.SERVICE.NAMESPACE`.
- A pod is meshed when it has a container or init container `meshproxy-proxy` (the injected
  sidecar); such instances get no `sidecar` key. Unmeshed pods, and endpoints whose pod is not
  known (no targetRef, or the pod not seen yet), get `sidecar: false`: plaintext to the app.
- The pod's labels become the instance's, plus `meshproxy.io/service-account` (spec §5: the
  identity) and `meshproxy.io/terminating`.
- Routes and policies keep apiVersion, kind, spec and metadata name, namespace, labels and
  annotations (less kubectl's last-applied copy); the server's bookkeeping and `status` go.
  They are ordered oldest first (creationTimestamp, then namespace/name), as the Gateway API
  orders routes and as the spec picks "the oldest" policy.

- A Service or EndpointSlice whose fields are not of the shapes the API documents (the API
  server's schema makes that rare; a webhook or an old object can) is left out alone and
  reported as a `Rejection`; it does not stop the other objects from being mapped.

Stored objects lose `status`, `managedFields` and `resourceVersion`, and pods everything but
name, labels, service account and container names: so a status-only update is no change.
Namespaces are held (for whoever needs their labels) but do not shape the documents.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from typing import Any, Iterable

from meshproxy.config.model.common import DEFAULT_TRUST_DOMAIN
from meshproxy.config.model.mesh import Mesh, join_host_port
from meshproxy.config.parse.common import DNS_SUBDOMAIN_RE
from meshproxy.control.screening import Rejection

API_VERSIONS: dict[str, str] = {
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Pod": "v1",
    "Namespace": "v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "TrafficPolicy": "meshproxy.io/v1alpha1",
    "PeerAuthentication": "meshproxy.io/v1alpha1",
    "AuthorizationPolicy": "meshproxy.io/v1alpha1",
}
KINDS = tuple(API_VERSIONS)
# Kinds passed through as documents, in this order after the Mesh.
DOCUMENT_KINDS = ("HTTPRoute", "TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy")
MESH_NAME = "kubernetes"
SIDECAR_CONTAINER = "meshproxy-proxy"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_ACCOUNT_LABEL = "meshproxy.io/service-account"
TERMINATING_LABEL = "meshproxy.io/terminating"
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_UNSTORED_METADATA = ("managedFields", "resourceVersion")
_DOCUMENT_METADATA = ("name", "namespace", "labels", "annotations")

Key = tuple[str, str]
# What a field of an unexpected shape raises deep in the mapping (a list where a dict belongs).
_SHAPE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def _meta(obj: dict) -> dict:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: dict) -> Key:
    meta = _meta(obj)
    return (meta.get("namespace") or "", meta.get("name") or "")


def _version_number(value: Any) -> int | None:
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() else None


def _names(containers: Any) -> list[dict]:
    return [{"name": c.get("name")} for c in containers or () if isinstance(c, dict)]


def _stored(kind: str, obj: dict) -> dict:
    """The part of `obj` worth keeping (see the module docstring), with its kind set."""
    meta = {k: v for k, v in _meta(obj).items() if k not in _UNSTORED_METADATA}
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
        self.observe(_meta(obj).get("resourceVersion"))
        stored = _stored(kind, obj)
        table = self._objects[kind]
        key = _key(obj)
        if table.get(key) == stored:
            return False
        table[key] = stored
        return True

    def delete(self, obj: dict, kind: str | None = None) -> bool:
        """Remove `obj` (by namespace and name); return True when it was held.
        Raises ValueError for a kind not in `KINDS`."""
        kind = self._kind(obj, kind)
        self.observe(_meta(obj).get("resourceVersion"))
        return self._objects[kind].pop(_key(obj), None) is not None

    def apply_event(self, event_type: str, obj: dict, kind: str | None = None) -> bool:
        """Apply one watch event (ADDED, MODIFIED, DELETED, BOOKMARK); return True when the state
        changed. Raises ValueError for another event type or an unknown kind."""
        if event_type in ("ADDED", "MODIFIED"):
            return self.upsert(obj, kind)
        if event_type == "DELETED":
            return self.delete(obj, kind)
        if event_type == "BOOKMARK":
            self.observe(_meta(obj).get("resourceVersion"))
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
            self.observe(_meta(obj).get("resourceVersion"))
            fresh[_key(obj)] = _stored(kind, obj)
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


def documents_from_cluster(state: ClusterState, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                           rejected: list[Rejection] | None = None) -> list[dict]:
    """Return the configuration documents of `state`: the Mesh (every Service with its
    instances), then HTTPRoutes, TrafficPolicies, PeerAuthentications, AuthorizationPolicies,
    each kind oldest first. Fresh data: the caller may keep or change it.

    Services and EndpointSlices that cannot be mapped are left out and appended to `rejected`
    (when given)."""
    problems = rejected if rejected is not None else []
    mesh = {
        "apiVersion": Mesh.api_version,
        "kind": Mesh.kind,
        "metadata": {"name": MESH_NAME},
        "spec": {"trustDomain": trust_domain, "services": _services(state, problems)},
    }
    docs = [mesh]
    for kind in DOCUMENT_KINDS:
        docs.extend(_document(o) for o in sorted(state.objects(kind), key=_age))
    return docs


def _age(obj: dict) -> tuple[str, str, str]:
    # RFC 3339 timestamps as the API server writes them (UTC, `Z`) sort as strings.
    meta = _meta(obj)
    return (meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta.get("name") or "")


def _document(obj: dict) -> dict:
    meta = {k: copy.deepcopy(v) for k, v in _meta(obj).items() if k in _DOCUMENT_METADATA}
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(_LAST_APPLIED, None)
        if not annotations:
            del meta["annotations"]
    doc = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": meta}
    if "spec" in obj:
        doc["spec"] = copy.deepcopy(obj["spec"])
    return doc


# Services and instances.


def _unmapped(kind: str, obj: dict, exc: Exception) -> Rejection:
    namespace, name = _key(obj)
    return Rejection(kind, namespace, name, f"cannot be mapped: {type(exc).__name__}: {exc}")


def _services(state: ClusterState, rejected: list[Rejection]) -> list[dict]:
    slices: dict[Key, list[dict]] = {}
    for s in state.objects("EndpointSlice"):
        namespace, _ = _key(s)
        labels = _meta(s).get("labels")
        service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
        if service:
            slices.setdefault((namespace, service), []).append(s)
    taken: set[str] = set()
    out = []
    for service in state.objects("Service"):
        try:
            entry = _service(service, slices.get(_key(service), []), state, taken, rejected)
        except _SHAPE_ERRORS as exc:
            rejected.append(_unmapped("Service", service, exc))
            continue
        if entry is not None:
            out.append(entry)
    return out


def _chosen_port(ports: Any) -> dict | None:
    tcp = [p for p in ports or () if isinstance(p, dict) and (p.get("protocol") or "TCP") == "TCP"
           and isinstance(p.get("port"), int)]
    return next((p for p in tcp if p.get("name") == "http"), tcp[0] if tcp else None)


def _ip(text: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(text)) if isinstance(text, str) else None
    except ValueError:
        return None


def _service(service: dict, slices: list[dict], state: ClusterState, taken: set[str],
             rejected: list[Rejection]) -> dict | None:
    namespace, name = _key(service)
    spec = service.get("spec") or {}
    port = _chosen_port(spec.get("ports"))
    if spec.get("type") == "ExternalName" or port is None:
        return None
    cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    addresses = [ip for ip in (_ip(a) for a in cluster_ips) if ip is not None]  # "None": headless
    primary = (spec.get("ipFamilies") or ["IPv4"])[0]
    # instance name -> IP family -> (rank, instance): the best listing of each pod per family.
    best: dict[str, dict[str, tuple[tuple[bool, bool], dict]]] = {}
    for s in sorted(slices, key=lambda s: _key(s)[1]):
        family = s.get("addressType")
        try:
            target = _target_port(s, port)
            if family not in ("IPv4", "IPv6") or target is None:
                continue
            found = [i for i in (_instance(e, namespace, target, state) for e in s.get("endpoints") or ())
                     if i is not None]
        except _SHAPE_ERRORS as exc:
            rejected.append(_unmapped("EndpointSlice", s, exc))
            continue
        for instance in found:
            rank = (family != primary, TERMINATING_LABEL in instance.get("labels", {}))
            held = best.setdefault(instance["name"], {}).get(family)
            if held is None or rank < held[0]:
                best[instance["name"]][family] = (rank, instance)
    instances = []
    for instance_name in sorted(best):
        instance = _merged(best[instance_name])
        instance["name"] = _unique(instance_name, name, namespace, taken)
        instances.append(instance)
    return {"name": name, "namespace": namespace, "port": port["port"], "addresses": addresses,
            "instances": instances}


def _merged(families: dict[str, tuple[tuple[bool, bool], dict]]) -> dict:
    """The instance of one pod from its best listing per IP family: the best-ranked one (the
    Service's primary family, not terminating), with the other family's address, when it is on
    the same port, as `app.otherAddresses`."""
    (_, instance), *rest = sorted(families.values(), key=lambda entry: entry[0])
    port = instance["app"]["address"].rpartition(":")[2]
    others = [host.strip("[]") for host, _, p in (o["app"]["address"].rpartition(":") for _, o in rest)
              if p == port]
    if others:
        instance["app"]["otherAddresses"] = others
    return instance


def _target_port(endpoint_slice: dict, port: dict) -> int | None:
    """The port the endpoints of `endpoint_slice` serve the Service's `port` on, or None."""
    name = port.get("name") or ""
    ports = [p for p in endpoint_slice.get("ports") or () if isinstance(p, dict)]
    for p in ports:
        if (p.get("name") or "") == name and (p.get("protocol") or "TCP") == "TCP":
            number = p.get("port")
            return number if isinstance(number, int) and 1 <= number <= 65535 else None
    if ports:
        return None  # these endpoints serve other ports of the Service, not this one
    target = port.get("targetPort", port["port"])
    return target if isinstance(target, int) and 1 <= target <= 65535 else None


def _instance(endpoint: dict, namespace: str, port: int, state: ClusterState) -> dict | None:
    conditions = endpoint.get("conditions") or {}
    ready = conditions.get("ready") is not False
    serving = conditions["serving"] if isinstance(conditions.get("serving"), bool) else ready
    terminating = conditions.get("terminating") is True
    if not (ready or (serving and terminating)):
        return None
    address = next((ip for ip in (_ip(a) for a in endpoint.get("addresses") or ()) if ip is not None), None)
    if address is None:
        return None
    ref = endpoint.get("targetRef") or {}
    pod = None
    if ref.get("kind", "Pod") == "Pod" and ref.get("name"):
        pod = state.get("Pod", ref.get("namespace") or namespace, ref["name"])
    name = ref.get("name") if DNS_SUBDOMAIN_RE.match(ref.get("name") or "") else _address_name(address)
    labels = dict((_meta(pod).get("labels") or {}) if pod else {})
    if pod is not None:
        labels[SERVICE_ACCOUNT_LABEL] = pod["spec"]["serviceAccountName"]
    if terminating:
        labels[TERMINATING_LABEL] = "true"
    instance: dict[str, Any] = {"name": name}
    if labels:
        instance["labels"] = labels
    instance["app"] = {"address": join_host_port(address, port)}
    if pod is None or not _meshed(pod):
        instance["sidecar"] = False
    return instance


def _meshed(pod: dict) -> bool:
    spec = pod.get("spec") or {}
    containers = [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]
    return any(c.get("name") == SIDECAR_CONTAINER for c in containers)


def _address_name(address: str) -> str:
    ip = ipaddress.ip_address(address)
    # The exploded IPv6 form starts and ends with a hex digit, so it is a valid name with '-'.
    return ip.exploded.replace(":", "-") if ip.version == 6 else str(ip)


def _unique(name: str, service: str, namespace: str, taken: set[str]) -> str:
    """`name`, or `name.service.namespace` when another Service already has an instance `name`."""
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{name}.{service}.{namespace}" + (f"-{n}" if n > 1 else "")
        if len(candidate) > 253:  # a DNS subdomain's limit; pod names may be that long already
            digest = hashlib.sha256(candidate.encode()).hexdigest()[:12]
            candidate = f"{candidate[:230].rstrip('.-')}-{digest}"
        n += 1
    taken.add(candidate)
    return candidate
