"""Plain-TCP proxying (dataplane/tcpproxy.py) against the Service's connection-pool limits and
routes, as a client and a backend see it, on real sockets on 127.0.0.1.

A proxy runs in the test's own event loop (its outbound HTTP listener, admin server and
destinations as `meshproxy proxy` makes them), and a TCP front listener hands each accepted
connection to a `TcpProxy` for one Service, exactly as transparent mode's detection step does
once it has decided a connection is not HTTP (that step needs SO_ORIGINAL_DST, so a network
namespace, which these tests do not). The backend echoes bytes and answers `GET` with a
small HTTP response, and counts the connections it has open.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.config.loader import load_text
from meshproxy.dataplane.server import Proxy, ProxySettings
from meshproxy.dataplane.tcpproxy import TcpProxy
from meshproxy.dataplane.tcpstats import TcpStats

DEADLINE = 5.0

MESH = """
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: limits}
spec:
  services:
    - name: db
      port: 5432
      instances:
        - {name: db-0, sidecar: false, app: {address: "127.0.0.1:%(db)d"}}
    - name: delivery
      port: 80
    - name: delivery-v1
      port: 80
      instances:
        - {name: delivery-v1-0, sidecar: false, app: {address: "127.0.0.1:%(v1)d"}}
---
apiVersion: meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {name: db, namespace: default}
spec:
  targetRef: {kind: Service, name: db}
  connectionPool: {maxConnections: 2, idleTimeout: 30s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: delivery, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: delivery}]
  rules:
    - backendRefs: [{name: delivery-v1, port: 80}]
"""


class Backend(asyncio.Protocol):
    """Echoes bytes; a buffer that is an HTTP GET head gets `200 http` (keep-alive)."""

    def __init__(self, open_connections: set) -> None:
        self.open = open_connections
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.open.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.startswith(b"GET "):
            while b"\r\n\r\n" in self.buffer:
                _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nhttp")
            return
        self.transport.write(self.buffer)
        self.buffer = b""

    def connection_lost(self, exc) -> None:
        self.open.discard(self)


async def until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Harness:
    """The proxy, a backend per Service with instances, and a TCP front per Service."""

    async def start(self) -> "Harness":
        loop = asyncio.get_running_loop()
        self.db_open: set = set()
        self.v1_open: set = set()
        self.servers = []
        db = await self._serve(lambda: Backend(self.db_open))
        v1 = await self._serve(lambda: Backend(self.v1_open))
        settings = ProxySettings(service="client", outbound_port=0, inbound_port=0, admin_port=0,
                                 health_port=0, inbound_bind="127.0.0.1", drain_timeout=1.0)
        self.proxy = Proxy(settings, load_text(MESH % {"db": db, "v1": v1}), loop)
        await self.proxy.start()
        outbound = self.proxy.listeners[0]
        stats = TcpStats(self.proxy.metrics.registry)
        services = self.proxy.destinations.services
        self.fronts = {}
        for name in ("db", "delivery"):
            key = f"{name}.default"
            self.fronts[name] = await self._serve(
                lambda key=key: TcpProxy(outbound.context, services[key], stats))
        return self

    async def _serve(self, factory) -> int:
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        await self.proxy.drain()
        await self.proxy.close()

    async def tcp(self, service: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.fronts[service])

    async def http(self, host: str) -> tuple[int, dict]:
        """GET / with `Host: host` through the outbound listener; (status, headers)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.settings.outbound_port)
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        finally:
            writer.close()
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        return int(lines[0].split()[1]), headers

    async def metric(self, name: str, **labels) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.settings.admin_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), DEADLINE)
        writer.close()
        text = data.partition(b"\r\n\r\n")[2].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bool:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), DEADLINE) == data


async def closed_at_once(reader: asyncio.StreamReader) -> bool:
    """The proxy closed the connection without sending anything (EOF, or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(100), DEADLINE) == b""
    except ConnectionResetError:
        return True


def run(loop: str, scenario) -> None:
    async def main():
        harness = await Harness().start()
        try:
            await scenario(harness)
        finally:
            await harness.stop()
    (uvloop.run if loop == "uvloop" else asyncio.run)(main())


LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
REFUSED = "meshproxy_tcp_connections_refused_total"


@LOOPS
def test_tcp_connections_count_against_max_connections(loop) -> None:
    async def scenario(h: Harness) -> None:
        first, second = await h.tcp("db"), await h.tcp("db")
        assert await echoes(*first, b"one\n") and await echoes(*second, b"two\n")
        assert len(h.db_open) == 2

        # maxConnections 2: the third is closed at once, and never reaches the backend.
        third_reader, third_writer = await h.tcp("db")
        assert await closed_at_once(third_reader)
        third_writer.close()
        assert len(h.db_open) == 2
        assert await h.metric(REFUSED, direction="outbound", service="db.default",
                              reason="overloaded") == 1

        # HTTP to the same Service sees the TCP connections too: 503 at once.
        status, headers = await h.http("db")
        assert status == 503
        assert headers["x-meshproxy-error"] == "overloaded"
        assert headers["x-meshproxy-overloaded"] == "true"
        assert len(h.db_open) == 2

        # One closes: its place is free again, for HTTP...
        first[1].close()
        await until(lambda: len(h.db_open) == 1, "the backend to see the first one closed")
        assert (await h.http("db"))[0] == 200
        assert len(h.db_open) == 2  # the TCP one and the HTTP one, now idle in the pool

        # ...and for TCP: the idle HTTP connection gives way to a new one.
        fourth = await h.tcp("db")
        assert await echoes(*fourth, b"four\n")
        await until(lambda: len(h.db_open) == 2, "the idle HTTP connection to close")
        assert await echoes(*second, b"still two\n")

        fifth_reader, fifth_writer = await h.tcp("db")
        assert await closed_at_once(fifth_reader)
        fifth_writer.close()
        assert await h.metric(REFUSED, direction="outbound", service="db.default",
                              reason="overloaded") == 2
        second[1].close()
        fourth[1].close()
        await until(lambda: not h.db_open, "every connection to the backend to close")
        # All closed: nothing is left counted against the limit.
        assert h.proxy.destinations.services["db.default"].open_connections() == 0

    run(loop, scenario)


@LOOPS
def test_tcp_to_a_service_with_route_backends_only_is_refused_and_counted(loop, caplog) -> None:
    async def scenario(h: Harness) -> None:
        # HTTP follows the route to delivery-v1...
        assert (await h.http("delivery"))[0] == 200
        assert len(h.v1_open) == 1
        # ...opaque TCP does not (HTTPRoute rules are HTTP's): `delivery` has no endpoints of
        # its own, so the connection is closed at once.
        with caplog.at_level(logging.DEBUG, logger="meshproxy.tcp"):
            reader, writer = await h.tcp("delivery")
            writer.write(b"\x16\x03\x01 not http")
            assert await closed_at_once(reader)
            writer.close()
        assert len(h.v1_open) == 1  # no new connection reached the route's backend
        assert await h.metric(REFUSED, direction="outbound", service="delivery.default",
                              reason="no-endpoints") == 1
        assert any("delivery.default refused: no-endpoints" in r.getMessage()
                   and "HTTPRoutes" in r.getMessage() for r in caplog.records)

    run(loop, scenario)
