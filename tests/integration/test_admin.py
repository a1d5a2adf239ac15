"""Admin (15000) and health (15021) servers over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.admin import AdminServers, start_servers
from meshproxy.observability.metrics import ProxyMetrics


class FakeState:
    """An AdminState whose answers the test sets."""

    def __init__(self) -> None:
        self.metrics = ProxyMetrics()
        self.live = True
        self.ready = False
        self.drains = 0
        self.drain_started = asyncio.Event()
        self.release_drain = asyncio.Event()

    def is_live(self) -> bool:
        return self.live

    def is_ready(self) -> bool:
        return self.ready

    def config_json(self) -> dict:
        return {"version": "v7", "resources": [{"kind": "HTTPRoute", "name": "r"}]}

    def endpoints_json(self) -> dict:
        return {"cart.shop": [{"address": "10.0.0.1:80", "inflight": 2, "ejectedUntil": None}]}

    async def drain(self) -> None:
        self.drains += 1
        self.drain_started.set()
        await self.release_drain.wait()


@pytest.fixture
async def state() -> FakeState:
    return FakeState()


@pytest.fixture
async def servers(state: FakeState) -> AsyncIterator[AdminServers]:
    running = await start_servers(state, "127.0.0.1", 0, "127.0.0.1", 0)
    yield running
    state.release_drain.set()
    await running.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def admin_url(servers: AdminServers, path: str) -> str:
    return f"http://127.0.0.1:{servers.admin_port}{path}"


def health_url(servers: AdminServers, path: str) -> str:
    return f"http://127.0.0.1:{servers.health_port}{path}"


async def get(client: aiohttp.ClientSession, url: str, method: str = "GET") -> tuple[int, str, str]:
    async with client.request(method, url) as resp:
        return resp.status, await resp.text(), resp.headers.get("Content-Type", "")


async def test_ports_are_bound_and_distinct(servers: AdminServers) -> None:
    assert servers.admin_port > 0 and servers.health_port > 0
    assert servers.admin_port != servers.health_port


@pytest.mark.parametrize("url", [admin_url, health_url])
async def test_live(servers, state, client, url) -> None:
    assert (await get(client, url(servers, "/live")))[:2] == (200, "live\n")
    state.live = False
    assert (await get(client, url(servers, "/live")))[:2] == (503, "not live\n")


@pytest.mark.parametrize("url", [admin_url, health_url])
async def test_ready_flips_from_503_to_200(servers, state, client, url) -> None:
    assert (await get(client, url(servers, "/ready")))[:2] == (503, "not ready\n")
    state.ready = True
    assert (await get(client, url(servers, "/ready")))[:2] == (200, "ready\n")


@pytest.mark.parametrize("url", [admin_url, health_url])
async def test_metrics_are_prometheus_text(servers, state, client, url) -> None:
    state.metrics.request_finished("inbound", "cart.shop", "default", 200, 0.01, 5, 6)
    state.metrics.set_config_version("v7")
    status, body, content_type = await get(client, url(servers, "/metrics"))
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }
    key = tuple(sorted(dict(direction="inbound", service="cart.shop", route="default",
                            code="200", classification="success", grpc_status="").items()))
    assert samples[("meshproxy_requests_total", key)] == 1
    assert samples[("meshproxy_config_version_info", (("version", "v7"),))] == 1


async def test_config_and_endpoints_are_json(servers, state, client) -> None:
    async with client.get(admin_url(servers, "/config")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == state.config_json()
    async with client.get(admin_url(servers, "/endpoints")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == state.endpoints_json()


async def test_drain_answers_202_at_once_and_drains_in_background(servers, state, client) -> None:
    # The fake drain blocks until released, so a 202 proves it did not wait.
    status, body, _ = await get(client, admin_url(servers, "/drain"), method="POST")
    assert (status, body) == (202, "draining\n")
    await asyncio.wait_for(state.drain_started.wait(), timeout=5)
    # A second request while draining does not start another drain.
    status, _, _ = await get(client, admin_url(servers, "/drain"), method="POST")
    assert status == 202
    assert state.drains == 1
    # The admin server keeps answering during the drain.
    assert (await get(client, admin_url(servers, "/live")))[0] == 200


async def test_wrong_methods_are_405(servers, client) -> None:
    for path in ("/live", "/ready", "/metrics", "/config", "/endpoints"):
        status, _, _ = await get(client, admin_url(servers, path), method="POST")
        assert status == 405, path
    for method in ("GET", "PUT", "DELETE"):
        status, _, _ = await get(client, admin_url(servers, "/drain"), method=method)
        assert status == 405, method
    for path in ("/live", "/ready", "/metrics"):
        status, _, _ = await get(client, health_url(servers, path), method="DELETE")
        assert status == 405, path


async def test_health_app_is_read_only(servers, state, client) -> None:
    for path in ("/config", "/endpoints"):
        assert (await get(client, health_url(servers, path)))[0] == 404, path
    for method in ("GET", "POST"):
        assert (await get(client, health_url(servers, "/drain"), method=method))[0] == 404
    assert state.drains == 0


async def test_unknown_path_is_404(servers, client) -> None:
    assert (await get(client, admin_url(servers, "/nope")))[0] == 404


async def test_close_frees_both_ports(state) -> None:
    running = await start_servers(state, "127.0.0.1", 0, "127.0.0.1", 0)
    ports = (running.admin_port, running.health_port)
    await running.close()
    for port in ports:
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_busy_health_port_raises_and_releases_admin_port(state) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = blocker.sockets[0].getsockname()[1]
    admin_port = free_port()
    try:
        with pytest.raises(OSError):
            await start_servers(state, "127.0.0.1", admin_port, "127.0.0.1", busy)
    finally:
        blocker.close()
        await blocker.wait_closed()
    # The admin server that had started was stopped: its port can be bound again.
    running = await start_servers(state, "127.0.0.1", admin_port, "127.0.0.1", 0)
    assert running.admin_port == admin_port
    await running.close()
