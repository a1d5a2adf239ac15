"""The app's HTTP probes, rewritten through the proxy's health port by injection."""

from __future__ import annotations

import json

import pytest
from kubernetes_validate import utils as kv

from meshproxy.kube.inject import inject
from meshproxy.kube.probes import app_health_path, rewrite_app_probes

ENABLED = {"meshproxy.io/inject": "enabled"}


def injected(containers: list[dict], init_containers: list[dict] | None = None) -> dict:
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0"},
           "spec": {"containers": containers, "initContainers": init_containers or []}}
    out = inject(obj, namespace_labels=ENABLED)
    for version in ("1.29.0", kv.latest_version()):
        kv.validate(out, version, strict=True)
    return out


def app_probes(pod: dict) -> dict | None:
    proxy = next(c for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]
                 if c["name"] == "meshproxy-proxy")
    value = next((e["value"] for e in proxy["env"] if e["name"] == "MESHPROXY_APP_PROBES"), None)
    return None if value is None else json.loads(value)


def test_http_probes_go_through_the_health_port():
    web = {
        "name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                      "httpHeaders": [{"name": "X-Probe", "value": "live"}]},
                          "periodSeconds": 7, "failureThreshold": 4},
        "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": 8080, "scheme": "HTTPS"},
                           "timeoutSeconds": 3},
        "startupProbe": {"httpGet": {"port": 8081}},
    }
    pod = injected([web])
    out = pod["spec"]["containers"][0]
    assert out["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"},
        "periodSeconds": 7, "failureThreshold": 4}  # timing is kept as the app set it
    assert out["readinessProbe"]["httpGet"] == {"path": "/app-health/web/readyz", "port": 15021,
                                                "scheme": "HTTP"}
    assert out["startupProbe"]["httpGet"]["path"] == "/app-health/web/startupz"
    assert app_probes(pod) == {
        "/app-health/web/livez": {"port": 8080, "path": "/healthz", "scheme": "HTTP",
                                  "timeoutSeconds": 1, "headers": [["X-Probe", "live"]]},
        "/app-health/web/readyz": {"port": 8080, "path": "/ready?full=1", "scheme": "HTTPS",
                                   "timeoutSeconds": 3},
        "/app-health/web/startupz": {"port": 8081, "path": "/", "scheme": "HTTP",
                                     "timeoutSeconds": 1},
    }


def test_every_container_and_app_sidecar_is_rewritten_under_its_own_name():
    pod = injected(
        [{"name": "web", "image": "web:1", "readinessProbe": {"httpGet": {"path": "/r", "port": 80}}},
         {"name": "worker", "image": "w:1", "livenessProbe": {"httpGet": {"path": "/l", "port": 81}}}],
        [{"name": "cache", "image": "c:1", "restartPolicy": "Always",
          "startupProbe": {"httpGet": {"path": "/s", "port": 82}}}])
    assert sorted(app_probes(pod)) == ["/app-health/cache/startupz", "/app-health/web/readyz",
                                       "/app-health/worker/livez"]
    cache = next(c for c in pod["spec"]["initContainers"] if c["name"] == "cache")
    assert cache["startupProbe"]["httpGet"]["port"] == 15021


@pytest.mark.parametrize("probe", [
    {"exec": {"command": ["true"]}},
    {"tcpSocket": {"port": 5432}},
    {"grpc": {"port": 9090}},
    {"httpGet": {"path": "/healthz", "port": 8080, "host": "10.0.0.1"}},  # does not probe the pod
    {"httpGet": {"path": "/healthz", "port": "metrics"}},  # a name the container does not declare
])
def test_other_probes_are_left_alone(probe):
    pod = injected([{"name": "db", "image": "db:1", "livenessProbe": probe}])
    assert pod["spec"]["containers"][0]["livenessProbe"] == probe
    assert app_probes(pod) is None


def test_the_proxy_own_probes_are_not_rewritten():
    pod = injected([{"name": "web", "image": "web:1"}])
    proxy = pod["spec"]["initContainers"][1]
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/live"


def test_rewrite_app_probes_returns_nothing_without_http_probes():
    containers = [{"name": "a", "image": "a"}]
    assert rewrite_app_probes(containers, 15021) == {}
    assert containers == [{"name": "a", "image": "a"}]


def test_app_health_path():
    assert app_health_path("web", "livenessProbe") == "/app-health/web/livez"
    assert app_health_path("web", "readinessProbe") == "/app-health/web/readyz"
    assert app_health_path("web", "startupProbe") == "/app-health/web/startupz"
    with pytest.raises(KeyError):
        app_health_path("web", "deathProbe")
