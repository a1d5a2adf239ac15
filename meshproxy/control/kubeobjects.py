"""Kubernetes API objects to the configuration documents the control plane loads. Pure: no I/O.

`ClusterState` (control/clusterstate.py) holds the objects a list + watch delivers.
`documents_from_cluster` turns them into plain
documents of the shape users write in files: one `Mesh` named `kubernetes` holding every
Service with its instances, then the HTTPRoutes, GRPCRoutes and the meshproxy.io policies.

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

Namespaces are held (for whoever needs their labels) but do not shape the documents.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from typing import Any

from meshproxy.config.model.common import DEFAULT_TRUST_DOMAIN
from meshproxy.config.model.mesh import Mesh, join_host_port
from meshproxy.config.parse.common import DNS_SUBDOMAIN_RE
from meshproxy.control.clusterstate import ClusterState, Key, metadata_of, namespaced_name
from meshproxy.control.screening import Rejection

# Kinds passed through as documents, in this order after the Mesh.
DOCUMENT_KINDS = ("HTTPRoute", "GRPCRoute", "TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy")
MESH_NAME = "kubernetes"
SIDECAR_CONTAINER = "meshproxy-proxy"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_ACCOUNT_LABEL = "meshproxy.io/service-account"
TERMINATING_LABEL = "meshproxy.io/terminating"
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_DOCUMENT_METADATA = ("name", "namespace", "labels", "annotations")

# What a field of an unexpected shape raises deep in the mapping (a list where a dict belongs).
_SHAPE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def documents_from_cluster(state: ClusterState, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                           rejected: list[Rejection] | None = None) -> list[dict]:
    """Return the configuration documents of `state`: the Mesh (every Service with its
    instances), then HTTPRoutes, GRPCRoutes, TrafficPolicies, PeerAuthentications, AuthorizationPolicies,
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
    meta = metadata_of(obj)
    return (meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta.get("name") or "")


def _document(obj: dict) -> dict:
    meta = {k: copy.deepcopy(v) for k, v in metadata_of(obj).items() if k in _DOCUMENT_METADATA}
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
    namespace, name = namespaced_name(obj)
    return Rejection(kind, namespace, name, f"cannot be mapped: {type(exc).__name__}: {exc}")


def _services(state: ClusterState, rejected: list[Rejection]) -> list[dict]:
    slices: dict[Key, list[dict]] = {}
    for s in state.objects("EndpointSlice"):
        namespace, _ = namespaced_name(s)
        labels = metadata_of(s).get("labels")
        service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
        if service:
            slices.setdefault((namespace, service), []).append(s)
    taken: set[str] = set()
    out = []
    for service in state.objects("Service"):
        try:
            entry = _service(service, slices.get(namespaced_name(service), []), state, taken, rejected)
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
    namespace, name = namespaced_name(service)
    spec = service.get("spec") or {}
    port = _chosen_port(spec.get("ports"))
    if spec.get("type") == "ExternalName" or port is None:
        return None
    cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    addresses = [ip for ip in (_ip(a) for a in cluster_ips) if ip is not None]  # "None": headless
    primary = (spec.get("ipFamilies") or ["IPv4"])[0]
    # instance name -> IP family -> (rank, instance): the best listing of each pod per family.
    best: dict[str, dict[str, tuple[tuple[bool, bool], dict]]] = {}
    for s in sorted(slices, key=lambda s: namespaced_name(s)[1]):
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
    labels = dict((metadata_of(pod).get("labels") or {}) if pod else {})
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
