"""Kubernetes API objects as the API server's JSON has them (camelCase dicts), for tests.

Each builder gives the fields a real object of that kind carries, server-set metadata included,
so the code under test meets what a cluster sends and not a tidied-up version of it.
"""

from __future__ import annotations

from typing import Any

_MANAGED = [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
             "time": "2024-05-01T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]


def _meta(name: str, namespace: str | None, rv: int, labels: dict | None = None, **extra: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "uid": f"0000-{name}", "resourceVersion": str(rv),
                            "creationTimestamp": "2024-05-01T10:00:00Z", "managedFields": _MANAGED}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    meta.update(extra)
    return meta


def service(name: str, namespace: str = "default", *, ports: list[dict] | None = None,
            cluster_ip: str | None = "10.96.0.10", cluster_ips: list[str] | None = None,
            type: str = "ClusterIP", ip_families: list[str] | None = None, rv: int = 10) -> dict:
    """A Service; `cluster_ip="None"` for a headless one."""
    spec: dict[str, Any] = {
        "type": type,
        "ports": ports if ports is not None else [{"name": "http", "protocol": "TCP", "port": 80,
                                                    "targetPort": 8080}],
        "selector": {"app": name},
        "sessionAffinity": "None",
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    }
    if type != "ExternalName":
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = cluster_ips if cluster_ips is not None else [cluster_ip]
        spec["ipFamilies"] = ip_families or ["IPv4"]
    else:
        spec["externalName"] = "example.com"
        spec.pop("selector")
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, rv),
            "spec": spec, "status": {"loadBalancer": {}}}


def endpoint(ip: str, pod: str | None = None, namespace: str = "default", *, ready: bool | None = True,
             serving: bool | None = None, terminating: bool | None = None, node: str = "node-1") -> dict:
    """One EndpointSlice endpoint; conditions left out when None (the API allows that)."""
    conditions = {}
    for key, value in (("ready", ready), ("serving", serving if serving is not None else ready),
                       ("terminating", terminating if terminating is not None else False)):
        if value is not None:
            conditions[key] = value
    out: dict[str, Any] = {"addresses": [ip], "conditions": conditions, "nodeName": node}
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod, "uid": f"0000-{pod}"}
    return out


def endpoint_slice(service_name: str, endpoints: list[dict], namespace: str = "default", *,
                   name: str | None = None, ports: list[dict] | None = None, address_type: str = "IPv4",
                   rv: int = 20) -> dict:
    """An EndpointSlice of `service_name`, as the EndpointSlice controller writes it."""
    labels = {"kubernetes.io/service-name": service_name,
              "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(name or f"{service_name}-abcde", namespace, rv, labels,
                          generateName=f"{service_name}-",
                          ownerReferences=[{"apiVersion": "v1", "kind": "Service", "name": service_name,
                                            "uid": f"0000-{service_name}", "controller": True,
                                            "blockOwnerDeletion": True}]),
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "protocol": "TCP", "port": 8080}],
    }


def pod(name: str, namespace: str = "default", *, labels: dict | None = None, service_account: str = "default",
        meshed: bool = True, native_sidecar: bool = True, ip: str = "10.244.0.5", rv: int = 30) -> dict:
    """A running pod; meshed ones have the injected `meshproxy-proxy` (native sidecar: an init
    container with restartPolicy Always; else a classic container)."""
    containers = [{"name": "app", "image": "example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]
    init = []
    if meshed:
        proxy = {"name": "meshproxy-proxy", "image": "meshproxy:0.1.0", "args": ["proxy"]}
        if native_sidecar:
            init = [{"name": "meshproxy-init", "image": "meshproxy:0.1.0"}, {**proxy, "restartPolicy": "Always"}]
        else:
            containers.append(proxy)
    spec: dict[str, Any] = {"containers": containers, "serviceAccountName": service_account,
                            "serviceAccount": service_account, "nodeName": "node-1"}
    if init:
        spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _meta(name, namespace, rv, labels or {"app": name.rsplit("-", 1)[0]}),
            "spec": spec,
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def namespace(name: str, labels: dict | None = None, rv: int = 5) -> dict:
    """A Namespace."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, rv, labels),
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def http_route(name: str, parent: str, backends: list[tuple[str, int]], namespace: str = "default", *,
               path: str = "/", created: str = "2024-05-01T10:00:00Z", rv: int = 40) -> dict:
    """An HTTPRoute bound to Service `parent` (GAMMA) with the defaults the CRD fills in and a
    status a controller wrote."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(name, namespace, rv, generation=1, creationTimestamp=created,
                          annotations={"kubectl.kubernetes.io/last-applied-configuration": "{\"big\": 1}\n",
                                       "team": "deliveries"}),
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                "backendRefs": [{"group": "", "kind": "Service", "name": b, "port": p, "weight": 1}
                                for b, p in backends],
            }],
        },
        "status": {"parents": [{"parentRef": {"group": "", "kind": "Service", "name": parent},
                                "controllerName": "meshproxy.io/control",
                                "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                                "message": "", "observedGeneration": 1,
                                                "lastTransitionTime": "2024-05-01T10:00:01Z"}]}]},
    }


def policy(kind: str, name: str, spec: dict, namespace: str = "default", *,
           created: str = "2024-05-01T10:00:00Z", rv: int = 50) -> dict:
    """A meshproxy.io/v1alpha1 object (TrafficPolicy, PeerAuthentication, AuthorizationPolicy)."""
    return {"apiVersion": "meshproxy.io/v1alpha1", "kind": kind,
            "metadata": _meta(name, namespace, rv, generation=1, creationTimestamp=created),
            "spec": spec, "status": {"observedGeneration": 1}}


def grpc_route(name: str, parent: str, backends: list[tuple[str, int]], namespace: str = "default", *,
               service: str = "drone.v1.Tracking", method: str | None = "Watch",
               created: str = "2024-05-01T10:00:00Z", rv: int = 45) -> dict:
    """A GRPCRoute bound to Service `parent` (GAMMA) with the defaults the CRD fills in (type
    Exact, weight 1) and a status a controller wrote."""
    match: dict[str, Any] = {"type": "Exact", "service": service}
    if method is not None:
        match["method"] = method
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": _meta(name, namespace, rv, generation=1, creationTimestamp=created),
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{
                "matches": [{"method": match}],
                "backendRefs": [{"group": "", "kind": "Service", "name": b, "port": p, "weight": 1}
                                for b, p in backends],
            }],
        },
        "status": {"parents": [{"parentRef": {"group": "", "kind": "Service", "name": parent},
                                "controllerName": "meshproxy.io/control",
                                "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                                "message": "", "observedGeneration": 1,
                                                "lastTransitionTime": "2024-05-01T10:00:01Z"}]}]},
    }
