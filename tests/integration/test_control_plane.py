"""The control plane and its proxies, as processes on 127.0.0.1: a change of the files reaches
every proxy, an invalid one is refused and traffic goes on, a dead control plane stops nothing,
and a proxy with nothing from its control plane yet is not ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from support.control import ControlProcess
from support.proxy import ProxyProcess, closed_port, free_ports, mesh_yaml, wait_for

HEADER_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-tag}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules:
    - backendRefs: [{name: web, port: 80}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-tag, value: "%s"}]}
"""


def _replace(path, text: str) -> None:
    """Save the way editors do: write a new file, rename it over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _get(proxy: ProxyProcess, path: str = "/echo") -> requests.Response:
    return requests.get(f"http://127.0.0.1:{proxy.outbound}{path}", headers={"Host": "web"}, timeout=5)


def _version(proxy: ProxyProcess) -> str | None:
    return json.loads(proxy.admin_get("/config")[1])["version"]


@pytest.fixture
def mesh_dir(tmp_path, backend):
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "mesh.yaml").write_text(mesh_yaml({"web": [f"127.0.0.1:{backend.port}"]}))
    (folder / "route.yaml").write_text(HEADER_ROUTE % "one")
    return folder


@pytest.fixture
def control(tmp_path, mesh_dir):
    plane = ControlProcess(tmp_path, [mesh_dir]).start()
    yield plane
    plane.stop()


@pytest.fixture
def two_proxies(tmp_path, control):
    proxies = [ProxyProcess(tmp_path, "", service=f"client{i}", instance=f"client{i}-0", name=f"p{i}",
                            control=control.url).start() for i in range(2)]
    yield proxies
    for proxy in proxies:
        proxy.stop()


def test_a_policy_edit_reaches_every_proxy(mesh_dir, control, two_proxies):
    for proxy in two_proxies:
        assert _get(proxy).headers["x-tag"] == "one"
    before = control.config()["version"]
    _replace(mesh_dir / "route.yaml", HEADER_ROUTE % "two")
    wait_for(lambda: control.config()["version"] != before, timeout=5, what="the control plane to follow")
    version = control.config()["version"]
    wait_for(lambda: all(_version(p) == version for p in two_proxies), timeout=2,
             what="every proxy on the new version within a second or so")
    for proxy in two_proxies:
        assert _get(proxy).headers["x-tag"] == "two"
        assert proxy.metric_sum("meshproxy_config_version_info", version=version) == 1
    listed = json.loads(control.get("/v1/proxies")[1])["proxies"]
    assert sorted((p["service"], p["version"], p["connected"]) for p in listed) == [
        ("client0.default", version, True), ("client1.default", version, True)]
    assert {p["admin"] for p in listed} == {f"127.0.0.1:{p.admin}" for p in two_proxies}


def test_an_invalid_edit_is_refused_and_traffic_is_unaffected(mesh_dir, control, two_proxies):
    before = control.config()["version"]
    bad = (HEADER_ROUTE % "three").replace("parentRefs: [{kind: Service, name: web}]",
                                           "parentRefs: [{kind: Service, name: web}]\n  hostnames: 7")
    _replace(mesh_dir / "route.yaml", bad)
    wait_for(lambda: control.config()["lastError"] is not None, timeout=5, what="the refusal")
    config = control.config()
    assert config["version"] == before
    assert any(e.startswith(f"{mesh_dir / 'route.yaml'}:6:") for e in config["lastError"]["errors"]), config
    metrics = control.get("/metrics")[1].decode()
    assert "meshproxy_config_errors_total 1.0" in metrics
    for proxy in two_proxies:
        response = _get(proxy)
        assert response.status_code == 200 and response.headers["x-tag"] == "one"
        assert _version(proxy) == before
    # The next valid change goes in force.
    _replace(mesh_dir / "route.yaml", HEADER_ROUTE % "four")
    wait_for(lambda: all(_get(p).headers.get("x-tag") == "four" for p in two_proxies), timeout=5,
             what="the fixed change in force")


def test_traffic_goes_on_without_the_control_plane_and_proxies_reconnect(tmp_path, mesh_dir, control,
                                                                         two_proxies):
    control.stop(signal.SIGKILL)
    for _ in range(20):
        for proxy in two_proxies:
            assert _get(proxy).status_code == 200
    wait_for(lambda: not any(json.loads(p.admin_get("/config")[1])["source"]["connected"]
                             for p in two_proxies), timeout=5, what="the proxies to notice")
    for proxy in two_proxies:
        assert proxy.admin_get("/ready")[0] == 200  # still serving with the last snapshot
    _replace(mesh_dir / "route.yaml", HEADER_ROUTE % "back")
    again = ControlProcess(tmp_path, [mesh_dir], name="control-again")
    try:
        again.start(port=control.port)
        wait_for(lambda: all(_get(p).headers.get("x-tag") == "back" for p in two_proxies), timeout=10,
                 what="the proxies back on the control plane, with the change made meanwhile")
    finally:
        again.stop()


def test_a_proxy_is_ready_only_once_it_has_a_snapshot(tmp_path, mesh_dir):
    port = closed_port()
    proxy = ProxyProcess(tmp_path, "", service="client", control=f"http://127.0.0.1:{port}")
    proxy.outbound, proxy.inbound, proxy.admin, proxy.health = free_ports(4)
    import subprocess
    import sys

    with open(proxy.stderr_path, "wb") as err:
        proxy.process = subprocess.Popen(proxy.command(), stdout=err, stderr=err, cwd=str(tmp_path),
                                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    plane = None
    try:
        wait_for(lambda: _admin_status(proxy, "/live") == 200, timeout=10, what="the proxy live")
        assert proxy.admin_get("/ready")[0] == 503
        assert json.loads(proxy.admin_get("/config")[1])["version"] is None
        plane = ControlProcess(tmp_path, [mesh_dir]).start(port=port)
        wait_for(lambda: _admin_status(proxy, "/ready") == 200, timeout=10, what="ready after the snapshot")
        assert _version(proxy) == plane.config()["version"]
    finally:
        proxy.stop()
        if plane is not None:
            plane.stop()


def _admin_status(proxy: ProxyProcess, path: str) -> int | None:
    try:
        return proxy.admin_get(path, timeout=1)[0]
    except OSError:
        return None


def test_a_standalone_proxy_follows_its_files(tmp_path, backend, proxy_factory):
    route = tmp_path / "route.yaml"
    route.write_text(HEADER_ROUTE % "one")
    proxy = proxy_factory(mesh_yaml({"web": [f"127.0.0.1:{backend.port}"]}), extra_configs=[route])
    assert _get(proxy).headers["x-tag"] == "one"
    _replace(route, HEADER_ROUTE % "two")
    wait_for(lambda: _get(proxy).headers.get("x-tag") == "two", timeout=5, what="the edit in force")
    good = _version(proxy)
    _replace(route, "kind: HTTPRoute\nmetadata: [oops\n")
    wait_for(lambda: proxy.metric_sum("meshproxy_config_errors_total") == 1, timeout=5, what="the refusal")
    config = json.loads(proxy.admin_get("/config")[1])
    assert config["version"] == good
    assert config["lastError"]["errors"][0].startswith(f"{route}:")
    assert _get(proxy).headers["x-tag"] == "two"


def test_sidecar_ports_known_in_advance_are_in_the_first_snapshot(tmp_path):
    """`up` restarts a control plane that died while the mesh runs: its first snapshot must
    already send callers to the destinations' sidecars (--sidecar-ports, which `up` writes),
    not to the apps directly in plaintext, past their authorization, until every sidecar has
    registered again."""
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("""
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: test}
spec:
  services:
    - name: account
      instances:
        - {name: account-0, app: {address: "127.0.0.1:9101"}}
        - {name: account-1, app: {address: "127.0.0.1:9102"}}
""")
    ports = tmp_path / "sidecar-ports.json"
    ports.write_text(json.dumps([{"namespace": "default", "service": "account",
                                  "instance": "account-0", "inbound": 16006}]))
    plane = ControlProcess(tmp_path, [mesh], extra_args=["--sidecar-ports", str(ports)]).start()
    try:
        # What a proxy is sent first: the view in its watch's first snapshot.
        with requests.get(f"{plane.url}/v1/watch?service=client&namespace=default", stream=True,
                          timeout=10) as r:
            first = json.loads(next(r.iter_lines()))
        [mesh_doc] = [d for d in first["documents"] if d.get("kind") == "Mesh"]
        [account] = mesh_doc["spec"]["services"]
        sidecars = {i["name"]: i.get("sidecar") for i in account["instances"]}
        # account-0's sidecar port is served before its sidecar said anything; account-1's
        # is not known (nothing registered, nothing given) and stays unset.
        assert sidecars == {"account-0": {"inbound": 16006}, "account-1": None}, sidecars
    finally:
        plane.stop()


def test_a_bad_sidecar_ports_file_is_refused_with_a_clear_error(tmp_path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_yaml({"web": ["127.0.0.1:9"]}))
    ports = tmp_path / "ports.json"
    ports.write_text('[{"namespace": "default", "service": "web", "instance": "web-0"}]')
    done = subprocess.run([sys.executable, "-m", "meshproxy", "control", "--config", str(mesh),
                           "--sidecar-ports", str(ports)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"meshproxy control: --sidecar-ports {ports}: entry 0: needs "
                                   "namespace, service, instance and inbound")
