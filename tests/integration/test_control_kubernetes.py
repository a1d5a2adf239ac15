"""`meshproxy control --kubernetes` end to end: Services, EndpointSlices, Pods and HTTPRoutes
from an API server become a proxy's configuration, and a change in the cluster reaches it.

No Kubernetes API server runs on these machines: the API server here is the fake of
tests/support/fakekube.py, at the HTTP boundary (it serves list and watch as the real one does),
run on its own event loop in a thread. The control plane and the proxy are real processes; the
backends are real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest
import requests

import support.kubefactory as k
from meshproxy.identity.ca import init_ca
from support.control import ControlProcess
from support.threadedkube import threaded_cluster
from support.proxy import ProxyProcess, wait_for


@pytest.fixture
def cluster(tmp_path):
    with threaded_cluster(tmp_path) as running:
        yield running


def _web(backends) -> list[dict]:
    """Service `web` and an EndpointSlice with one endpoint per backend (all on 127.0.0.1, told
    apart by port: one slice per backend, as a Service with several target ports would not be)."""
    objects = [k.service("web", ports=[{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}])]
    for i, backend in enumerate(backends):
        objects.append(k.pod(f"web-{i}", meshed=False, ip="127.0.0.1"))
        objects.append(k.endpoint_slice("web", [k.endpoint("127.0.0.1", f"web-{i}")], name=f"web-{i}",
                                        ports=[{"name": "http", "protocol": "TCP", "port": backend.port}]))
    return objects


def test_the_cluster_becomes_the_proxies_configuration(tmp_path, cluster, backend, backend_b):
    fake, kubeconfig = cluster
    for obj in _web([backend]):
        fake.apply(obj)
    # The CA from a folder: the fake API server does not keep Secrets, which a control plane
    # without --ca-dir would create its CA in (tests/integration/test_bootstrap.py covers that).
    init_ca(tmp_path / "ca", "cluster.local")
    control = ControlProcess(tmp_path, [], extra_args=["--kubernetes", "--kubeconfig", str(kubeconfig),
                                                       "--ca-dir", str(tmp_path / "ca")]).start()
    proxy = ProxyProcess(tmp_path, "", service="client", control=control.url)
    try:
        proxy.start()

        def get() -> requests.Response:
            return requests.get(f"http://127.0.0.1:{proxy.outbound}/echo",
                                headers={"Host": "web.default.svc.cluster.local"}, timeout=5)

        response = get()
        assert response.status_code == 200 and response.headers["x-backend"] == "a"
        # Scaled up: a second endpoint appears in the cluster and in the proxy's balancer.
        for obj in _web([backend, backend_b])[-2:]:
            fake.apply(obj)

        def endpoints() -> set[str]:
            data = json.loads(proxy.admin_get("/endpoints")[1])
            return {e["address"] for e in data["web.default"]["endpoints"]}

        wait_for(lambda: endpoints() == {f"127.0.0.1:{backend.port}", f"127.0.0.1:{backend_b.port}"},
                 timeout=5, what="the new endpoint in the proxy")
        # An HTTPRoute created in the cluster takes effect.
        route = k.http_route("web-tag", "web", [("web", 80)])
        route["spec"]["rules"][0]["filters"] = [{"type": "ResponseHeaderModifier",
                                                 "responseHeaderModifier": {"set": [{"name": "x-tag", "value": "k8s"}]}}]
        fake.apply(route)
        wait_for(lambda: get().headers.get("x-tag") == "k8s", timeout=5, what="the route in force")
        config = control.config()
        assert config["generation"][-1] > 0  # the API server's resourceVersion orders versions
        assert json.loads(proxy.admin_get("/config")[1])["version"] == config["version"]
    finally:
        proxy.stop()
        control.stop()
