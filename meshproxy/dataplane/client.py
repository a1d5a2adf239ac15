"""A client connection as its exchanges see it: where response bytes go, how the client is
paused, who the client is, and what happens when an exchange ends.

`DownstreamConnection` (dataplane/downstream.py) is the one implementation: it reads requests
and runs their exchanges. Exchanges (dataplane/exchange.py) hold this base type, so that they
import nothing of the connection that drives them.
"""

from __future__ import annotations

import asyncio

from meshproxy.config.model.mesh import join_host_port
from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.upstream import UpstreamConnection
from meshproxy.http1.errors import ProxyError, error_response

# Why the client is not being read; reading resumes when no reason is left.
PAUSE_PIPELINE = 1  # a request waits behind the one in flight
PAUSE_BUFFER = 2  # request bytes wait for the upstream connection
PAUSE_UPSTREAM = 4  # the upstream's send buffer is full


class ClientConnection:
    """The write side, pausing and identity of a client connection."""

    # Set by connection_made, before anything else uses it.
    transport: asyncio.Transport

    __slots__ = (
        "context", "transport", "tls", "peer_id", "original", "writing_paused", "paused",
        "closing", "eof", "_peer_address",
    )

    def __init__(self, context: ListenerContext, original: tuple[str, int] | None = None) -> None:
        """`original`: the destination a redirected connection was sent to (transparent
        mode), which decides where its requests go; None otherwise."""
        self.context = context
        self.original = original
        self.tls = False
        self.peer_id: str | None = None  # the caller's verified SPIFFE ID (inbound mTLS)
        self.writing_paused = False  # the client reads slower than responses come
        self.paused = 0  # PAUSE_* reasons for not reading the client
        self.closing = False
        self.eof = False  # the client half-closed
        self._peer_address: str | None = None  # peer_address()'s answer, made once

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writelines(self, parts: list) -> None:
        self.transport.writelines(parts)

    def write_error(self, error: ProxyError, *, keep_alive: bool) -> None:
        """Send the proxy's own response for `error` (spec §4)."""
        self.transport.write(error_response(error, keep_alive=keep_alive))

    def closing_after_response(self) -> bool:
        """True when this connection will close after the current response."""
        return self.closing or self.context.draining or self.eof

    def pause_reading(self, reason: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closing:
            self.transport.resume_reading()

    def peer_address(self) -> str | None:
        """The client's address as `HOST:PORT` (`[HOST]:PORT` for IPv6), or None when the
        transport has none. Made on first use and kept: every request of a kept-alive
        connection logs it."""
        if self._peer_address is None:
            peer = self.transport.get_extra_info("peername")
            if not isinstance(peer, tuple) or len(peer) < 2:
                return None
            self._peer_address = join_host_port(peer[0], peer[1])
        return self._peer_address

    # -- what an exchange tells its connection (DownstreamConnection implements these) ---------

    def exchange_done(self, exchange: object) -> None:
        """The exchange's response is complete: close, or go on to the next request."""
        raise NotImplementedError  # abstract: implemented by DownstreamConnection

    def exchange_aborted(self, exchange: object) -> None:
        """The response broke off midway: the client must see the connection fail."""
        raise NotImplementedError  # abstract: implemented by DownstreamConnection

    def start_tunnel(self, upstream: UpstreamConnection, pending: list[bytes]) -> None:
        """After 101 Switching Protocols: the client and `upstream` become a byte relay
        (dataplane/relay.py), `pending` (the client's bytes held until now) sent first."""
        raise NotImplementedError  # abstract: implemented by DownstreamConnection
