"""Rewriting an injected pod's HTTP probes so that the kubelet reaches the app through the proxy.

With inbound mTLS STRICT the proxy refuses the kubelet's plaintext probes on the app's ports.
So an app container's ``httpGet`` liveness, readiness and startup probes are sent to the proxy's
health port instead, at ``/app-health/CONTAINER/livez|readyz|startupz`` (spec §2), and what they
probed is handed to the proxy in the environment variable ``MESHPROXY_APP_PROBES``: a JSON
object from each rewritten path to ``{"port": 8080, "path": "/healthz", "scheme": "HTTP",
"timeoutSeconds": 1}`` (plus ``"headers": [[NAME, VALUE], ...]`` when the probe sets any). The
proxy answers a rewritten path with the status of a plain request to ``127.0.0.1:PORT`` (TLS
for ``HTTPS``).

Left as they are: ``exec``, ``tcpSocket`` and ``grpc`` probes, and ``httpGet`` probes that name
a ``host`` (they do not probe the pod) or a named port that the container does not declare.
"""

from __future__ import annotations

from typing import Any

APP_PROBES_ENV = "MESHPROXY_APP_PROBES"

# Probe field -> the last segment of its rewritten path.
PROBE_KINDS = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))


def app_health_path(container: str, probe_field: str) -> str:
    """Return the health-port path that stands for `container`'s `probe_field`
    (``livenessProbe`` ...), e.g. ``/app-health/web/livez``. Raises KeyError for another field."""
    return f"/app-health/{container}/{dict(PROBE_KINDS)[probe_field]}"


def _port_number(container: dict, port: Any) -> int | None:
    """The number of a probe's port: itself, or the container port of that name."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        for declared in container.get("ports") or ():
            if isinstance(declared, dict) and declared.get("name") == port:
                number = declared.get("containerPort")
                return number if isinstance(number, int) else None
    return None


def rewrite_app_probes(containers: list[dict], health_port: int) -> dict[str, dict]:
    """Point the ``httpGet`` probes of `containers` at ``health_port`` (changing the containers
    in place) and return what each rewritten path stands for, as in this module's docstring.
    Returns {} when no probe was rewritten."""
    targets: dict[str, dict] = {}
    for container in containers:
        name = container.get("name")
        if not isinstance(name, str):
            continue
        for field, _ in PROBE_KINDS:
            probe = container.get(field)
            http = probe.get("httpGet") if isinstance(probe, dict) else None
            if not isinstance(http, dict) or http.get("host"):
                continue
            port = _port_number(container, http.get("port"))
            if port is None:
                continue
            path = app_health_path(name, field)
            target: dict[str, Any] = {
                "port": port,
                "path": http.get("path") or "/",
                "scheme": http.get("scheme") or "HTTP",
                "timeoutSeconds": probe.get("timeoutSeconds", 1),
            }
            headers = [[h.get("name"), h.get("value")] for h in http.get("httpHeaders") or ()
                       if isinstance(h, dict)]
            if headers:
                target["headers"] = headers
            targets[path] = target
            probe["httpGet"] = {"path": path, "port": health_port, "scheme": "HTTP"}
    return targets
