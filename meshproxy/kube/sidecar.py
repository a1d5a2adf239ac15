"""The containers and volume that injection adds to a pod, built from options and annotations.

Pure: plain dicts in the shape of the Kubernetes API, no I/O. Each call returns new objects.
The pod's own annotations (``config.meshproxy.io/*``) override the defaults; a value that
cannot be used raises InjectError rather than giving the pod a proxy that would not start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meshproxy import __version__

INIT_NAME = "meshproxy-init"
PROXY_NAME = "meshproxy-proxy"
TOKEN_VOLUME = "meshproxy-token"
TOKEN_DIR = "/var/run/secrets/meshproxy.io/token"
TOKEN_AUDIENCE = "meshproxy"  # the audience the control plane's TokenReview asks for
TOKEN_EXPIRATION_SECONDS = 3600

# Spec §2.
PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HEALTH_PORT = 15021

DEFAULT_CONTROL = "http://meshproxy-control.meshproxy-system.svc:15010"
DEFAULT_IMAGE = f"ghcr.io/meshproxy/meshproxy:{__version__}"
DEFAULT_CPU_REQUEST = "100m"
DEFAULT_MEMORY_REQUEST = "64Mi"
DEFAULT_MEMORY_LIMIT = "256Mi"

CONFIG_PREFIX = "config.meshproxy.io/"
SKIP_INBOUND_PORTS = CONFIG_PREFIX + "skip-inbound-ports"
SKIP_OUTBOUND_PORTS = CONFIG_PREFIX + "skip-outbound-ports"
OPAQUE_PORTS = CONFIG_PREFIX + "opaque-ports"
PROXY_CPU_REQUEST = CONFIG_PREFIX + "proxy-cpu-request"
PROXY_MEMORY_LIMIT = CONFIG_PREFIX + "proxy-memory-limit"
LOG_LEVEL = CONFIG_PREFIX + "log-level"
LOG_LEVELS = ("debug", "info", "warning", "error")  # what `meshproxy proxy --log-level` takes
WAIT_BEFORE_EXIT = CONFIG_PREFIX + "proxy-wait-before-exit-seconds"
# A classic sidecar gets SIGTERM with the app; it keeps serving this long first, so that the
# app's own shutdown (last requests, a final flush to a database) still goes through the mesh.
DEFAULT_WAIT_BEFORE_EXIT = 5
MAX_WAIT_BEFORE_EXIT = 3600

# Labels that usually name the Service a pod backs, in order of preference.
SERVICE_LABELS = ("app.kubernetes.io/name", "app")


class InjectError(ValueError):
    """A pod asks for something injection cannot do (an unusable annotation value)."""


@dataclass(frozen=True)
class InjectOptions:
    """What injection adds, where the pod's annotations do not say otherwise.

    ``proxy_image`` runs both the proxy and ``meshproxy init``; ``control_url`` is where the
    proxy finds the control plane; ``native_sidecar`` chooses an ``initContainers`` entry with
    ``restartPolicy: Always`` (Kubernetes 1.29 and later) over a classic container.
    """

    proxy_image: str = DEFAULT_IMAGE
    control_url: str = DEFAULT_CONTROL
    native_sidecar: bool = True


_PORT_ITEM = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
# resource.Quantity's grammar: a decimal number, then a binary or decimal suffix or an exponent.
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def port_list(annotations: Mapping[str, Any], key: str) -> list[str]:
    """Return the ports or ranges (``"3306"``, ``"8000-8010"``) of a comma-separated port
    annotation, in the order written; [] when it is absent or empty. Raises InjectError for
    an item that is not a port (1-65535) or a range of them."""
    value = annotations.get(key)
    if value is None:
        return []
    if not isinstance(value, str):
        raise InjectError(f"annotation {key}: {value!r} is not a comma-separated list of ports")
    items = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        match = _PORT_ITEM.match(item)
        low = int(match.group(1)) if match else 0
        high = int(match.group(2) or low) if match else 0
        if not (1 <= low <= high <= 65535):
            raise InjectError(f"annotation {key}: {item!r} is not a port or a range of ports "
                              "(1-65535, e.g. 3306 or 8000-8010)")
        items.append(item)
    return items


def quantity(annotations: Mapping[str, Any], key: str, default: str) -> str:
    """Return the resource quantity an annotation gives (``100m``, ``128Mi``), else `default`.
    Raises InjectError for a value that is not a positive Kubernetes quantity."""
    value = annotations.get(key)
    if value is None:
        return default
    amount = _quantity_value(value) if isinstance(value, str) else None
    if amount is None or amount <= 0:
        raise InjectError(f"annotation {key}: {value!r} is not a positive resource quantity "
                          "(e.g. 100m, 0.5, 128Mi, 1G)")
    return value


def _quantity_value(text: str) -> Decimal | None:
    match = _QUANTITY.match(text)
    if match is None:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(number) * Decimal(10) ** int(suffix[1:])
    return Decimal(number) * _SUFFIX[suffix]


def init_args(annotations: Mapping[str, Any]) -> list[str]:
    """Return the arguments of ``meshproxy init`` for a pod with these annotations.

    The health port is never redirected, so the kubelet reaches the proxy's probes whatever the
    inbound mTLS mode; nor are the ports the pod asks to skip. Raises InjectError as
    `port_list`."""
    args = ["--proxy-uid", str(PROXY_UID), "--inbound-port", str(INBOUND_PORT),
            "--outbound-port", str(OUTBOUND_PORT), "--health-port", str(HEALTH_PORT)]
    skip_in = port_list(annotations, SKIP_INBOUND_PORTS)
    if skip_in:
        args += ["--skip-inbound-ports", ",".join(skip_in)]
    skip_out = port_list(annotations, SKIP_OUTBOUND_PORTS)
    if skip_out:
        args += ["--skip-outbound-ports", ",".join(skip_out)]
    return args


def proxy_resources(annotations: Mapping[str, Any]) -> dict:
    """Return the proxy's ``resources``: requests cpu 100m and memory 64Mi, limit memory 256Mi,
    with the cpu request and memory limit from the pod's annotations. A memory limit below the
    default request lowers the request to it (Kubernetes refuses a request above its limit).
    Raises InjectError as `quantity`."""
    cpu = quantity(annotations, PROXY_CPU_REQUEST, DEFAULT_CPU_REQUEST)
    limit = quantity(annotations, PROXY_MEMORY_LIMIT, DEFAULT_MEMORY_LIMIT)
    request = DEFAULT_MEMORY_REQUEST
    if _quantity_value(limit) < _quantity_value(request):
        request = limit
    return {"requests": {"cpu": cpu, "memory": request}, "limits": {"memory": limit}}


def init_container(annotations: Mapping[str, Any], options: InjectOptions) -> dict:
    """Return the ``meshproxy-init`` container, which installs the pod's redirect rules.

    It runs as root with NET_ADMIN and NET_RAW only (iptables needs them, nothing else does).
    Raises InjectError for unusable annotations."""
    return {
        "name": INIT_NAME,
        "image": options.proxy_image,
        "command": ["meshproxy", "init"],
        "args": init_args(annotations),
        "resources": proxy_resources(annotations),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _field_env(name: str, field_path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def _http_probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"},
            "periodSeconds": period, "timeoutSeconds": 3, "failureThreshold": failures}


def proxy_env(annotations: Mapping[str, Any], labels: Mapping[str, Any],
              options: InjectOptions) -> list[dict]:
    """Return the proxy's environment: the ``MESHPROXY_*`` variables `meshproxy proxy` reads,
    the pod's identity from the downward API. Raises InjectError for unusable annotations."""
    env = [
        _field_env("MESHPROXY_NAMESPACE", "metadata.namespace"),
        _field_env("MESHPROXY_INSTANCE", "metadata.name"),
        _field_env("MESHPROXY_POD_IP", "status.podIP"),
        # Every address of a dual-stack pod, comma-separated: inbound connections to any
        # other address are refused.
        _field_env("MESHPROXY_POD_IPS", "status.podIPs"),
        _field_env("MESHPROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        {"name": "MESHPROXY_CONTROL", "value": options.control_url},
        {"name": "MESHPROXY_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
        # The pod's traffic arrives redirected by meshproxy-init's rules.
        {"name": "MESHPROXY_TRANSPARENT", "value": "true"},
    ]
    service = next((labels[k] for k in SERVICE_LABELS if isinstance(labels.get(k), str)), None)
    if service:
        env.append({"name": "MESHPROXY_SERVICE", "value": service})
    level = annotations.get(LOG_LEVEL)
    if level is not None:
        if level not in LOG_LEVELS:
            raise InjectError(f"annotation {LOG_LEVEL}: {level!r} is not one of {', '.join(LOG_LEVELS)}")
        env.append({"name": "MESHPROXY_LOG_LEVEL", "value": level})
    opaque = port_list(annotations, OPAQUE_PORTS)
    if OPAQUE_PORTS in annotations:
        env.append({"name": "MESHPROXY_OPAQUE_PORTS", "value": ",".join(opaque)})
    return env


def proxy_container(annotations: Mapping[str, Any], labels: Mapping[str, Any],
                    options: InjectOptions, *, native: bool) -> dict:
    """Return the ``meshproxy-proxy`` container; with `native`, as a native sidecar
    (``restartPolicy: Always``, for ``initContainers``). Raises InjectError for unusable
    annotations."""
    container = {
        "name": PROXY_NAME,
        "image": options.proxy_image,
        "command": ["meshproxy", "proxy"],
        "ports": [
            {"name": "mesh-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "mesh-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        "env": proxy_env(annotations, labels, options),
        "resources": proxy_resources(annotations),
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}],
        # Later init containers and the app start once the proxy is ready (config, endpoints
        # and certificate in place): up to 10 minutes for a control plane that is slow to come.
        "startupProbe": _http_probe("/ready", 1, 600),
        "readinessProbe": _http_probe("/ready", 5, 3),
        "livenessProbe": _http_probe("/live", 10, 3),
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if native:
        # Kubernetes orders native sidecars itself: started (startupProbe) before later init
        # containers and the app, stopped after the app has exited.
        container["restartPolicy"] = "Always"
    else:
        container["lifecycle"] = classic_lifecycle(annotations)
    return container


def classic_lifecycle(annotations: Mapping[str, Any]) -> dict:
    """Return the ``lifecycle`` hooks of a classic proxy container: ``postStart`` waits until the
    proxy is ready (the kubelet holds the app's start until it returns), ``preStop`` keeps the
    proxy serving for ``proxy-wait-before-exit-seconds`` (default 5; 0: none) while the app
    shuts down. Raises InjectError for an unusable annotation."""
    hooks: dict[str, Any] = {"postStart": {"exec": {"command": ["meshproxy", "wait-ready", "--timeout", "600"]}}}
    text = str(annotations.get(WAIT_BEFORE_EXIT, DEFAULT_WAIT_BEFORE_EXIT)).strip()
    if not text.isdigit() or int(text) > MAX_WAIT_BEFORE_EXIT:
        raise InjectError(f"annotation {WAIT_BEFORE_EXIT}: {text!r} is not a whole number of seconds "
                          f"from 0 to {MAX_WAIT_BEFORE_EXIT}")
    if int(text):
        hooks["preStop"] = {"exec": {"command": ["sleep", str(int(text))]}}
    return hooks


def token_volume() -> dict:
    """Return the projected ServiceAccount token volume the proxy proves its identity with
    (audience ``meshproxy``, renewed by the kubelet before its hour is up)."""
    return {
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
            "path": "token",
        }}]},
    }
