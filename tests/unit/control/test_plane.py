"""The control plane's state: valid changes go in force, invalid ones are refused and counted,
watchers wake on a change, proxies are listed."""

from __future__ import annotations

import asyncio

from meshproxy.config import load
from meshproxy.control.plane import FORGET_DISCONNECTED_AFTER, ControlPlane, ProxyRecord

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: test}
spec:
  services:
    - name: package
      instances: [{name: package-0, app: {address: 127.0.0.1:9031}}]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _load(tmp_path, text: str):
    (tmp_path / "mesh.yaml").write_text(text)
    return load([str(tmp_path / "mesh.yaml")])


async def test_an_invalid_change_is_refused_and_the_last_valid_one_stays(tmp_path):
    plane = ControlPlane()
    assert plane.files_changed(_load(tmp_path, MESH), 1)
    good = plane.current.version
    assert not plane.files_changed(_load(tmp_path, MESH.replace("9031", "not-a-port")), 2)
    assert plane.current.version == good
    assert plane.errors_total == 1
    config = plane.config_json()
    assert config["version"] == good
    assert any(f"{tmp_path / 'mesh.yaml'}:7:" in e for e in config["lastError"]["errors"])


async def test_watchers_wake_on_a_change_and_time_out_without_one(tmp_path):
    plane = ControlPlane()
    plane.files_changed(_load(tmp_path, MESH), 1)
    held = plane.current.version
    assert (await plane.wait_for_change(None, 1.0)).version == held  # nothing held: at once
    assert await plane.wait_for_change(held, 0.05) is None
    waiter = asyncio.ensure_future(plane.wait_for_change(held, 5.0))
    await asyncio.sleep(0)
    plane.files_changed(_load(tmp_path, MESH.replace("9031", "9032")), 2)
    new = await asyncio.wait_for(waiter, 1.0)
    assert new.version != held and new.generation == (2,)


async def test_a_registration_fills_in_a_sidecar_port_once(tmp_path):
    plane = ControlPlane()
    plane.files_changed(_load(tmp_path, MESH), 1)
    before = plane.current.version
    plane.register("default", "package", "package-0", 41006)
    after = plane.current.version
    assert after != before
    plane.register("default", "package", "package-0", 41006)
    assert plane.current.version == after and plane.snapshots_total == 2
    assert b'"inbound":41006' in plane.current.view("client.default")


async def test_nothing_is_served_before_discovery_has_listed_everything(tmp_path):
    plane = ControlPlane()
    plane.uses_discovery = True
    plane.files_changed(_load(tmp_path, MESH), 1)
    assert plane.current is None
    plane.discovery_changed([], 7)
    assert plane.current is not None and plane.current.generation == (1, 7)


async def test_proxies_are_listed_once_per_instance_and_forgotten_later():
    clock = Clock()
    plane = ControlPlane(clock)
    first = plane.proxy_connected(ProxyRecord("package.default", "package-0", "127.0.0.1:15000", "127.0.0.1"))
    plane.proxy_disconnected(first)
    clock.now += 1
    plane.proxy_connected(ProxyRecord("package.default", "package-0", "127.0.0.1:15000", "127.0.0.1"))
    listed = plane.proxies_json()
    assert len(listed) == 1 and listed[0]["connected"] is True
    gone = plane.proxy_connected(ProxyRecord("drone.default", "drone-0", "127.0.0.1:15100", "127.0.0.1"))
    plane.proxy_disconnected(gone)
    assert {p["service"] for p in plane.proxies_json()} == {"package.default", "drone.default"}
    clock.now += FORGET_DISCONNECTED_AFTER + 1
    assert {p["service"] for p in plane.proxies_json()} == {"package.default"}
