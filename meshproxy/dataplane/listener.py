"""A listening socket and what its connections share: direction, resolver, timeouts, drain."""

from __future__ import annotations

import asyncio
import random

from meshproxy.dataplane.downstream import DownstreamConnection
from meshproxy.dataplane.exchange import RequestIds
from meshproxy.dataplane.mirror import Mirrors

# Spec §3 "client side": header read timeout and idle keep-alive.
HEADER_TIMEOUT = 10.0
CLIENT_IDLE_TIMEOUT = 75.0


class Listener:
    """Accepts client connections for one direction (inbound or outbound)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolver, metrics, rng: random.Random, *,
                 header_timeout: float = HEADER_TIMEOUT,
                 idle_timeout: float = CLIENT_IDLE_TIMEOUT) -> None:
        self.loop = loop
        self.rng = rng
        self.request_ids = RequestIds(rng)
        self.mirrors = Mirrors(loop)
        self.resolver = resolver
        self.metrics = metrics
        self.direction = resolver.direction
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        self.server: asyncio.base_events.Server | None = None
        self._idle_waiter: asyncio.Future | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting; return the bound port (useful with port 0)."""
        self.server = await self.loop.create_server(
            lambda: DownstreamConnection(self), host, port, reuse_address=True, backlog=1024,
        )
        return self.server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already accepted go on."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    def connection_gone(self) -> None:
        if self._idle_waiter is not None and not self.connections and not self._idle_waiter.done():
            self._idle_waiter.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until every accepted connection has closed."""
        if not self.connections:
            return
        self._idle_waiter = self.loop.create_future()
        await self._idle_waiter

    def abort_all(self) -> None:
        """Drop every remaining connection (the drain timeout passed)."""
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

