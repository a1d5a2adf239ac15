"""A listening socket and what its connections share: direction, resolver, timeouts, drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket

from meshproxy.dataplane.downstream import DownstreamConnection
from meshproxy.dataplane.tls import TLSState, accept_inbound
from meshproxy.dataplane.exchange import RequestIds
from meshproxy.dataplane.mirror import Mirrors
from meshproxy.observability.trace import Tracing

log = logging.getLogger("meshproxy.listener")

# Spec §3 "client side": header read timeout and idle keep-alive.
HEADER_TIMEOUT = 10.0
CLIENT_IDLE_TIMEOUT = 75.0


class Listener:
    """Accepts client connections for one direction (inbound or outbound)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolver, metrics, rng: random.Random, *,
                 header_timeout: float = HEADER_TIMEOUT,
                 idle_timeout: float = CLIENT_IDLE_TIMEOUT, tracing: Tracing | None = None,
                 access_log=None) -> None:
        self.loop = loop
        self.rng = rng
        self.request_ids = RequestIds(rng)
        self.mirrors = Mirrors(loop)
        self.resolver = resolver
        self.metrics = metrics
        self.direction = resolver.direction
        # Trace context of every request (spec §4); spans only with a configured exporter.
        self.trace = (tracing or Tracing()).propagator(self.direction, rng)
        self.access_log = access_log  # observability.accesslog.AccessLog, or None (off)
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        self.server: asyncio.base_events.Server | None = None
        self._idle_waiter: asyncio.Future | None = None
        self.tls: TLSState | None = None
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._setting_up: set[asyncio.Task] = set()
        # Transparent mode (dataplane/transparent.py) sets these before start(): the protocol
        # each connection starts with (default: DownstreamConnection), and with `tls` the
        # coroutine (loop, sock) that sets up each accepted socket (default: accept_inbound).
        self.protocol_factory = None
        self.accept_socket = None

    async def start(self, host: str, port: int, tls: TLSState | None = None) -> int:
        """Bind and start accepting; return the bound port (useful with port 0).

        With `tls` (the inbound listener of a proxy with an identity), each connection's first
        bytes decide between TLS and plaintext (see dataplane/tls.py)."""
        if self.protocol_factory is None:
            self.protocol_factory = lambda: DownstreamConnection(self)
        if tls is None:
            self.server = await self.loop.create_server(
                self.protocol_factory, host, port, reuse_address=True, backlog=1024,
            )
            if not self.server.sockets:  # every address skipped: no socket of its family here
                self.server.close()
                raise OSError(errno.EAFNOSUPPORT, f"cannot listen on {host}:{port}")
            return self.server.sockets[0].getsockname()[1]
        self.tls = tls
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As create_server does: IPv6 only, so that `::` can listen beside `0.0.0.0`.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        self._accepting = asyncio.ensure_future(self._accept_loop(sock))
        return sock.getsockname()[1]

    async def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: keep serving the connections we have
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if self.accept_socket is not None:
                task = asyncio.ensure_future(self.accept_socket(self.loop, conn))
            else:
                task = asyncio.ensure_future(accept_inbound(
                    self.loop, conn, self.tls, self.protocol_factory,
                    first_byte_timeout=self.header_timeout, on_refused=self._refused))
            self._setting_up.add(task)
            task.add_done_callback(self._setting_up.discard)

    def _refused(self, reason: str) -> None:
        self.metrics.tls_handshake(self.direction, "refused-" + reason.split(":")[0])

    @property
    def port(self) -> int:
        if self._socket is not None:
            return self._socket.getsockname()[1]
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already accepted go on."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
            self._socket.close()
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

