"""A listening socket: it accepts connections and starts each one's protocol.

What the connections share (resolver, timeouts, metrics, tracing, the drain flag) is the
listener's `ListenerContext` (dataplane/context.py), built before the listener. The protocol
each connection starts with, and how an accepted socket is set up, are given to the listener
when it is built: a `DownstreamConnection` and, with TLS, tls.accept_inbound's first-bytes
decision by default; transparent mode (dataplane/transparent.py) gives its own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Awaitable, Callable

from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.downstream import DownstreamConnection, TlsDownstreamConnection
from meshproxy.dataplane.tls import accept_inbound

log = logging.getLogger("meshproxy.listener")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
# (loop, accepted socket) -> sets the socket up (TLS or not) and starts its protocol
AcceptSocket = Callable[[asyncio.AbstractEventLoop, socket.socket], Awaitable[None]]


class Listener:
    """Accepts client connections for one direction (inbound or outbound)."""

    def __init__(self, context: ListenerContext, protocol_factory: ProtocolFactory | None = None,
                 accept_socket: AcceptSocket | None = None) -> None:
        """`protocol_factory`: the protocol of each connection (default: DownstreamConnection).
        `accept_socket`: sets up each accepted socket when the context has TLS (default:
        tls.accept_inbound with the context's header timeout)."""
        self.context = context
        self.direction = context.direction
        self.protocol_factory: ProtocolFactory = (
            protocol_factory or (lambda: DownstreamConnection(context)))
        # Over asyncio's TLS the default connection reads into the shared TLS buffer.
        self.tls_protocol_factory: ProtocolFactory = (
            protocol_factory or (lambda: TlsDownstreamConnection(context)))
        self.accept_socket = accept_socket or self._accept_inbound
        self.server: asyncio.base_events.Server | None = None
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._setting_up: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting; return the bound port (useful with port 0).

        With the context's `tls` (the inbound listener of a proxy with an identity), each
        connection's first bytes decide between TLS and plaintext (see dataplane/tls.py)."""
        loop = self.context.loop
        if self.context.tls is None:
            self.server = await loop.create_server(
                self.protocol_factory, host, port, reuse_address=True, backlog=1024,
            )
            if not self.server.sockets:  # every address skipped: no socket of its family here
                self.server.close()
                raise OSError(errno.EAFNOSUPPORT, f"cannot listen on {host}:{port}")
            return self.server.sockets[0].getsockname()[1]
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
        loop = self.context.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: keep serving the connections we have
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self.accept_socket(loop, conn))
            self._setting_up.add(task)
            task.add_done_callback(self._setting_up.discard)

    def _accept_inbound(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Awaitable[None]:
        context = self.context
        return accept_inbound(loop, sock, context.tls, self.protocol_factory,
                              first_byte_timeout=context.header_timeout,
                              on_refused=context.tls_refused,
                              tls_protocol_factory=self.tls_protocol_factory)

    @property
    def port(self) -> int:
        if self._socket is not None:
            return self._socket.getsockname()[1]
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already accepted go on."""
        self.context.draining = True
        if self.server is not None:
            self.server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
            self._socket.close()
        for conn in list(self.context.connections):
            conn.close_if_idle()

    async def wait_closed(self) -> None:
        """Wait until every accepted connection has closed."""
        await self.context.wait_closed()

    def abort_all(self) -> None:
        """Drop every remaining connection (the drain timeout passed)."""
        for conn in list(self.context.connections):
            if conn.transport is not None:
                conn.transport.abort()
