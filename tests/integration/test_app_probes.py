"""The app's probes through the health port (spec §7): injection rewrites the kubelet's httpGet
probes to /app-health/CONTAINER/...; the sidecar asks the app and answers as the kubelet would
judge (200-399: success)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

from support.proxy import closed_port, mesh_yaml


def _health_get(proxy, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.health, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_app_probes_are_answered_from_the_app(backend, proxy_factory):
    probes = {
        "/app-health/app/livez": {"port": backend.port, "path": "/status/204"},
        "/app-health/app/readyz": {"port": backend.port, "path": "/status/503", "timeoutSeconds": 2},
        "/app-health/app/startupz": {"port": closed_port(), "path": "/"},
        "/app-health/app/redirect": {"port": backend.port, "path": "/status/302",
                                     "headers": [["x-probe", "yes"]]},
    }
    proxy = proxy_factory(mesh_yaml({}), extra_args=["--app-probes", json.dumps(probes)])
    assert _health_get(proxy, "/app-health/app/livez")[0] == 200
    status, body = _health_get(proxy, "/app-health/app/readyz")
    assert status == 503 and b"503" in body
    assert _health_get(proxy, "/app-health/app/startupz")[0] == 503  # nothing listens
    assert _health_get(proxy, "/app-health/app/redirect")[0] == 200  # 3xx counts as success
    assert _health_get(proxy, "/app-health/other/livez")[0] == 404
    # The sidecar's own probes are unchanged beside them.
    assert _health_get(proxy, "/ready")[0] == 200


def test_malformed_app_probes_stop_the_sidecar_with_a_clear_error(tmp_path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_yaml({}))
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "proxy", "--config", str(mesh),
                           "--app-probes", '{"/elsewhere": {"port": 80}}'],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "MESHPROXY_APP_PROBES" in proc.stderr and "/app-health/" in proc.stderr
