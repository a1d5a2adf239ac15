"""Sidecar injection: a Kubernetes object in, a new object out, with the sidecar added to its pods.

Pure: no I/O, the input is never changed. `meshproxy inject` and the admission webhook both call
`inject()`; the rules (spec §7, docs/kubernetes.md):

- Workloads: Pods, the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
  ReplicationControllers and Jobs, CronJobs' ``jobTemplate.spec.template``, and the items of
  Lists (recursively). Every other object comes back unchanged.
- The decision: a pod annotated ``meshproxy.io/inject: disabled`` never, nor one on hostNetwork,
  nor one that already has the sidecar (so injecting twice changes nothing). Otherwise when its
  namespace is labelled ``meshproxy.io/inject: enabled`` or the pod is annotated
  ``meshproxy.io/inject: enabled``; never in a namespace labelled ``disabled`` (the webhook
  configuration does not even send its pods). Namespace labels that are not known
  (``namespace_labels=None``) enable nothing: the pod's annotation decides alone.
  `meshproxy inject` treats the objects it is given as going to an enabled namespace.
- What is added is built by `meshproxy.kube.sidecar`, and the app's HTTP probes are rewritten
  by `meshproxy.kube.probes`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from meshproxy import __version__
from meshproxy.kube.probes import APP_PROBES_ENV, rewrite_app_probes
from meshproxy.kube.sidecar import (
    HEALTH_PORT,
    INIT_NAME,
    PROXY_NAME,
    TOKEN_VOLUME,
    InjectError,
    InjectOptions,
    init_container,
    proxy_container,
    token_volume,
)

__all__ = [
    "InjectError",
    "InjectOptions",
    "INJECT_ANNOTATION",
    "NATIVE_SIDECAR_ANNOTATION",
    "STATUS_ANNOTATION",
    "has_sidecar",
    "inject",
    "injection_wanted",
    "pod_template",
]

INJECT_ANNOTATION = "meshproxy.io/inject"  # also the namespace label of the same name
NATIVE_SIDECAR_ANNOTATION = "meshproxy.io/native-sidecar"
STATUS_ANNOTATION = "meshproxy.io/status"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

# (API group, kind) -> the path from the object to its pod (a Pod's own metadata and spec).
_POD_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): (),
    ("", "ReplicationController"): ("spec", "template"),
    ("apps", "Deployment"): ("spec", "template"),
    ("apps", "StatefulSet"): ("spec", "template"),
    ("apps", "DaemonSet"): ("spec", "template"),
    ("apps", "ReplicaSet"): ("spec", "template"),
    ("batch", "Job"): ("spec", "template"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}


def inject(
    obj: dict,
    *,
    namespace_labels: Mapping[str, str] | None = None,
    options: InjectOptions = InjectOptions(),
) -> dict:
    """Return a copy of `obj` with the sidecar injected where the rules above say so.

    `namespace_labels` are the labels of the namespace the object goes to, or None when they
    are not known (then only pods annotated ``enabled`` are injected). `obj` itself is
    never changed; an object that is not a workload, or whose pods are skipped, comes back as
    an equal copy. Raises InjectError when an injected pod's ``config.meshproxy.io/*`` or
    ``meshproxy.io/native-sidecar`` annotation has a value that cannot be used.
    """
    out = copy.deepcopy(obj)
    _inject_in_place(out, namespace_labels, options)
    return out


def _inject_in_place(obj: Any, namespace_labels: Mapping[str, str] | None,
                     options: InjectOptions) -> None:
    if not isinstance(obj, dict):
        return
    kind = obj.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list):
        for item in obj["items"]:
            _inject_in_place(item, namespace_labels, options)
        return
    pod = pod_template(obj)
    if pod is not None and injection_wanted(pod, namespace_labels):
        _inject_pod(pod, options)


def pod_template(obj: Mapping[str, Any]) -> dict | None:
    """Return the part of `obj` that has a pod's ``metadata`` and ``spec`` (the object itself
    for a Pod, the pod template for a workload), or None when `obj` is not a workload or has
    no pod spec. The result is part of `obj`, not a copy."""
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    group = api_version.rpartition("/")[0]
    path = _POD_PATHS.get((group, kind))
    if path is None and group == "extensions":  # the old home of Deployments and friends
        path = _POD_PATHS.get(("apps", kind))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("spec"), dict):
        return None
    return node


def injection_wanted(pod: Mapping[str, Any], namespace_labels: Mapping[str, str] | None) -> bool:
    """Return True when the pod (a Pod or pod template: ``metadata`` and ``spec``) is to get
    the sidecar, by the rules in this module's docstring."""
    annotations = _annotations(pod)
    spec = pod.get("spec") or {}
    if annotations.get(INJECT_ANNOTATION) == "disabled":
        return False
    if spec.get("hostNetwork") is True or has_sidecar(spec):
        return False
    namespace = (namespace_labels or {}).get(INJECT_ANNOTATION)
    if namespace == "disabled":
        return False
    return namespace == "enabled" or annotations.get(INJECT_ANNOTATION) == "enabled"


def has_sidecar(spec: Mapping[str, Any]) -> bool:
    """Return True when the pod spec already has the proxy or its init container."""
    names = {c.get("name") for key in ("initContainers", "containers")
             for c in spec.get(key) or () if isinstance(c, dict)}
    return PROXY_NAME in names or INIT_NAME in names


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = pod.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    return annotations if isinstance(annotations, dict) else {}


def _native(annotations: Mapping[str, Any], options: InjectOptions) -> bool:
    value = annotations.get(NATIVE_SIDECAR_ANNOTATION)
    if value is None:
        return options.native_sidecar
    if value in ("true", "false"):
        return value == "true"
    raise InjectError(f'annotation {NATIVE_SIDECAR_ANNOTATION}: {value!r} is not "true" or "false"')


def _inject_pod(pod: dict, options: InjectOptions) -> None:
    """Add the sidecar to `pod` (a Pod or pod template), in place."""
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        metadata = pod["metadata"] = {}
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        annotations = metadata["annotations"] = {}
    labels = metadata.get("labels") if isinstance(metadata.get("labels"), dict) else {}
    spec = pod["spec"]
    native = _native(annotations, options)

    app_containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    app_sidecars = [c for c in spec.get("initContainers") or []
                    if isinstance(c, dict) and c.get("restartPolicy") == "Always"]
    probes = rewrite_app_probes(app_containers + app_sidecars, HEALTH_PORT)

    init = init_container(annotations, options)
    proxy = proxy_container(annotations, labels, options, native=native)
    if probes:
        proxy["env"].append({"name": APP_PROBES_ENV,
                             "value": json.dumps(probes, sort_keys=True, separators=(",", ":"))})

    inits = list(spec.get("initContainers") or [])
    if native:
        spec["initContainers"] = [init, proxy, *inits]
    else:
        spec["initContainers"] = [init, *inits]
        spec["containers"] = [proxy, *(spec.get("containers") or [])]
        # The proxy comes first so that it starts first; `kubectl logs` and `exec` should
        # still land in the app.
        if app_containers and DEFAULT_CONTAINER_ANNOTATION not in annotations:
            annotations[DEFAULT_CONTAINER_ANNOTATION] = app_containers[0].get("name")
    volumes = [v for v in spec.get("volumes") or []
               if not (isinstance(v, dict) and v.get("name") == TOKEN_VOLUME)]
    spec["volumes"] = [*volumes, token_volume()]

    annotations[STATUS_ANNOTATION] = json.dumps({
        "version": __version__,
        "initContainers": [INIT_NAME, PROXY_NAME] if native else [INIT_NAME],
        "containers": [] if native else [PROXY_NAME],
        "volumes": [TOKEN_VOLUME],
    }, separators=(",", ":"))
    # Prometheus scrapes the proxy's health port, which serves its /metrics (spec §7).
    annotations["prometheus.io/scrape"] = "true"
    annotations["prometheus.io/port"] = str(HEALTH_PORT)
    annotations["prometheus.io/path"] = "/metrics"
