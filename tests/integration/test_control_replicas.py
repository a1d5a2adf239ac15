"""Two control-plane replicas serving the same proxy: nothing is applied twice, nothing older
replaces something newer. Real HTTP on 127.0.0.1 between the proxy's watch client and
control-plane APIs run in this process."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from meshproxy.config import load
from meshproxy.control import api
from meshproxy.control.plane import ControlPlane
from meshproxy.dataplane.control_client import ControlClient

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: test}
spec:
  services:
    - name: package
      instances: [{name: package-0, app: {address: "127.0.0.1:%d"}}]
"""


async def _serve(plane: ControlPlane):
    runner = web.AppRunner(api.build_app(plane), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def quick_heartbeats(monkeypatch):
    monkeypatch.setattr(api, "HEARTBEAT_INTERVAL", 0.05)


async def test_a_proxy_moving_between_replicas_applies_each_version_once(tmp_path, quick_heartbeats):
    (tmp_path / "mesh.yaml").write_text(MESH % 9031)
    result = load([str(tmp_path / "mesh.yaml")])
    replicas = [ControlPlane(), ControlPlane()]
    for plane in replicas:
        plane.files_changed(result, 100)  # the same files: the same version
    assert replicas[0].current.version == replicas[1].current.version
    servers = [await _serve(plane) for plane in replicas]
    applied, refused = [], []
    client = ControlClient(servers[0][1], service="client", namespace="default", instance="c-0",
                           inbound_port=None, admin=None, on_snapshot=applied.append,
                           on_refused=refused.append)
    try:
        task = asyncio.ensure_future(client.run())
        await _until(lambda: len(applied) == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        client.url = servers[1][1]
        task = asyncio.ensure_future(client.run())
        # The second replica holds the same version: it sends heartbeats only (the client is
        # connected once a line arrived) and records no version sent; nothing is applied again.
        await _until(lambda: replicas[1].proxies and client.connected)
        assert [r.version for r in replicas[1].proxies.values()] == [None]
        assert len(applied) == 1 and not refused
        # A change on the replica the proxy watches now reaches it once.
        (tmp_path / "mesh.yaml").write_text(MESH % 9032)
        replicas[1].files_changed(load([str(tmp_path / "mesh.yaml")]), 200)
        await _until(lambda: len(applied) == 2)
        assert applied[1].version == replicas[1].current.version
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        for runner, _ in servers:
            await runner.cleanup()


async def test_a_replica_behind_cannot_roll_a_proxy_back(tmp_path, quick_heartbeats):
    (tmp_path / "mesh.yaml").write_text(MESH % 9032)
    newer = ControlPlane()
    newer.files_changed(load([str(tmp_path / "mesh.yaml")]), 200)
    (tmp_path / "mesh.yaml").write_text(MESH % 9031)
    behind = ControlPlane()
    behind.files_changed(load([str(tmp_path / "mesh.yaml")]), 100)
    servers = [await _serve(newer), await _serve(behind)]
    applied = []
    client = ControlClient(servers[0][1], service="client", namespace="default", instance=None,
                           inbound_port=None, admin=None, on_snapshot=applied.append,
                           on_refused=lambda errors: None)
    try:
        task = asyncio.ensure_future(client.run())
        await _until(lambda: len(applied) == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        client.url = servers[1][1]
        task = asyncio.ensure_future(client.run())
        # The replica behind sends its (older) snapshot; the proxy keeps the newer one.
        await _until(lambda: any(r.version == behind.current.version for r in behind.proxies.values()))
        assert [s.version for s in applied] == [newer.current.version]
        assert client.version == newer.current.version
        # Once the replica catches up (a newer generation), its snapshot is applied.
        (tmp_path / "mesh.yaml").write_text(MESH % 9033)
        behind.files_changed(load([str(tmp_path / "mesh.yaml")]), 300)
        await _until(lambda: len(applied) == 2)
        assert applied[1].services["package.default"].instances[0].app_port == 9033
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        for runner, _ in servers:
            await runner.cleanup()
