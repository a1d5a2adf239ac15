"""`meshproxy control --kubernetes` with an invalid object in the cluster: that object is skipped
alone (or held at its last valid version) and reported once, while everything else reaches the
proxies.

No Kubernetes API server runs on these machines: the API server here is the fake of
tests/support/fakekube.py, at the HTTP boundary (list and watch as the real one serves them),
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


def web(i: int, port: int) -> list[dict]:
    """Pod web-I (unmeshed, on 127.0.0.1) and an EndpointSlice of Service `web` for it."""
    return [k.pod(f"web-{i}", meshed=False, ip="127.0.0.1"),
            k.endpoint_slice("web", [k.endpoint("127.0.0.1", f"web-{i}")], name=f"web-{i}",
                             ports=[{"name": "http", "protocol": "TCP", "port": port}])]


def tag_route(name: str, value: str, path_type: str = "PathPrefix") -> dict:
    route = k.http_route(name, "web", [("web", 80)])
    rule = route["spec"]["rules"][0]
    rule["matches"][0]["path"]["type"] = path_type
    rule["filters"] = [{"type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {"set": [{"name": "x-tag", "value": value}]}}]
    return route


def errors_total(control: ControlProcess) -> float:
    for line in control.get("/metrics")[1].decode().splitlines():
        if line.startswith("meshproxy_config_errors_total "):
            return float(line.split()[1])
    raise AssertionError("no meshproxy_config_errors_total")


def test_an_invalid_object_in_the_cluster_is_skipped_alone(tmp_path, cluster, backend, backend_b):
    fake, kubeconfig = cluster
    fake.apply(k.service("web", ports=[{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}]))
    for obj in web(0, backend.port):
        fake.apply(obj)
    fake.apply(tag_route("tag", "v1"))
    fake.apply(tag_route("typo", "never", path_type="Prefix"))  # a typo in another team's route
    init_ca(tmp_path / "ca", "cluster.local")
    control = ControlProcess(tmp_path, [], extra_args=["--kubernetes", "--kubeconfig", str(kubeconfig),
                                                       "--ca-dir", str(tmp_path / "ca")]).start()
    proxy = ProxyProcess(tmp_path, "", service="client", control=control.url)
    try:
        proxy.start()

        def tag() -> str | None:
            response = requests.get(f"http://127.0.0.1:{proxy.outbound}/echo",
                                    headers={"Host": "web.default.svc.cluster.local"}, timeout=5)
            assert response.status_code == 200
            return response.headers.get("x-tag")

        def rejected() -> list[tuple[str, bool]]:
            return [(r["name"], r["keptLastValid"]) for r in control.config()["rejected"]]

        # The valid route is in force; the invalid one is left out and reported.
        assert tag() == "v1"
        [typo] = control.config()["rejected"]
        assert (typo["kind"], typo["namespace"], typo["name"], typo["keptLastValid"]) == \
            ("HTTPRoute", "default", "typo", False)
        assert "path.type" in typo["reason"]
        assert errors_total(control) == 1

        # The good route breaks too: its last valid version stays in force...
        fake.apply(tag_route("tag", "v2", path_type="Prefix"))
        wait_for(lambda: ("tag", True) in rejected(), timeout=5, what="the broken route reported")
        assert tag() == "v1"
        # ...and every other change still reaches the proxy.
        for obj in web(1, backend_b.port):
            fake.apply(obj)

        def endpoints() -> set[str]:
            data = json.loads(proxy.admin_get("/endpoints")[1])
            return {e["address"] for e in data["web.default"]["endpoints"]}

        wait_for(lambda: endpoints() == {f"127.0.0.1:{backend.port}", f"127.0.0.1:{backend_b.port}"},
                 timeout=5, what="the new endpoint in the proxy")
        assert errors_total(control) == 2
        # Said once, though the configuration changed again since.
        assert control.stderr().count("HTTPRoute default/tag: ") == 1
        assert control.stderr().count("HTTPRoute default/typo: ") == 1

        # Fixed: the new version is in force, and nothing is rejected but the typo.
        fake.apply(tag_route("tag", "v3"))
        wait_for(lambda: tag() == "v3", timeout=5, what="the fixed route in force")
        assert rejected() == [("typo", False)]
    finally:
        proxy.stop()
        control.stop()
