"""A client connection as its exchanges see it: where the response goes (head, body pieces,
end: framed here for HTTP/1.1, so an exchange holds no bytes of its own), how the client is
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
from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead
from meshproxy.http1.writer import (
    LAST_CHUNK,
    chunk,
    last_chunk_with,
    redirect_bytes,
    informational_bytes,
    response_framing,
    response_head_bytes,
)

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
        "closing", "eof", "_peer_address", "out", "response_chunked",
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
        # Response bytes produced while handling one read from the upstream; written with one
        # writelines() (one system call) at the end of that read: a head and a small body then
        # leave together, which on these machines costs less than the Python around it.
        self.out: list[bytes] = []
        self.response_chunked = False  # the response being sent is chunked by the proxy

    def write(self, data: bytes) -> None:
        """Send a whole response the proxy made (after any interim one still queued)."""
        self.out.append(data)
        self.flush()

    def writelines(self, parts: list) -> None:
        self.transport.writelines(parts)

    # -- the response, as its exchange hands it over (HTTP/1.1 framing is decided here) -------

    def send_informational(self, head: ResponseHead) -> None:
        """An interim 1xx response (100 Continue, 103 Early Hints), passed on as it came."""
        self.out.append(informational_bytes(head))

    def send_head(self, request: RequestHead, head: ResponseHead, keep_alive: bool) -> bool:
        """Frame and queue the final response head of `request`'s response; `keep_alive`:
        the exchange would keep the connection. Returns whether the connection is kept."""
        chunked, keep = response_framing(request, head,
                                         keep_alive and not self.closing_after_response())
        self.response_chunked = chunked
        self.out.append(response_head_bytes(head, chunked=chunked, keep_alive=keep,
                                            client_version=request.version))
        return keep

    def send_body(self, data: bytes) -> None:
        if self.response_chunked:
            self.out += chunk(data)
        else:
            self.out.append(data)

    def send_trailers(self, fields: HeaderList) -> None:
        """Trailer fields (from an HTTP/2 upstream): sent in the last chunk when the proxy
        chunks the body; a body framed by length cannot carry them, so they are dropped."""
        if self.response_chunked:
            self.out.append(last_chunk_with(fields))
            self.response_chunked = False

    def send_end(self) -> None:
        """The response ended: its last chunk, and everything queued, go out."""
        if self.response_chunked:
            self.out.append(LAST_CHUNK)
            self.response_chunked = False
        self.flush()

    def send_switch(self, head: ResponseHead, rest: bytes) -> None:
        """The 101 Switching Protocols head, then the upstream's first bytes of the new
        protocol (`rest`)."""
        self.out.append(response_head_bytes(head, chunked=False, keep_alive=True,
                                            client_version="1.1"))
        if rest:
            self.out.append(rest)
        self.flush()

    def flush(self) -> None:
        """Write the response bytes gathered from one upstream read."""
        out = self.out
        if out:
            self.out = []
            self.writelines(out)

    def send_redirect(self, status: int, location: str, *, keep_alive: bool) -> None:
        """Answer with a route's redirect (no body)."""
        self.write(redirect_bytes(status, location, keep_alive=keep_alive))

    def write_error(self, error: ProxyError, *, keep_alive: bool) -> None:
        """Send the proxy's own response for `error` (spec §4), after any interim response
        still queued (a 100 Continue before a 502 is a valid answer)."""
        self.write(error_response(error, keep_alive=keep_alive))

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
