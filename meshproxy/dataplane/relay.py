"""The byte relay: what a client connection and an upstream connection become once they only
carry bytes, both ways, until both directions have ended. Plain TCP proxying
(dataplane/tcpproxy.py) relays from the moment its upstream connection is open; an HTTP
connection does after an Upgrade was accepted (101 Switching Protocols, e.g. WebSocket:
`DownstreamConnection.start_tunnel`, dataplane/downstream.py).

A `Relay` knows nothing of what it carries or why: the caller chose the upstream, held what
the client sent before it was there, and counts what it needs counted. `Relay.start` hands
both transports to the relay's two ends (`transport.set_protocol`), so that from then on the
event loop calls the ends directly and each chunk read is one write to the other transport.

- Back-pressure: when one end's send buffer is full (`pause_writing`), the other end stops
  being read until it drains (`resume_writing`), so a fast sender cannot make the proxy
  buffer without bound.
- Half-close: an EOF from one end is passed on as an EOF (`write_eof`, shutdown of the write
  side) to the other, and the pair lives on until both directions have ended; then it
  closes. TlsStreams (dataplane/tlsstream.py) half-close with TLS 1.3's close_notify.
- A transport that cannot half-close (asyncio's own TLS): the client's EOF is held back (a
  request-then-EOF client still gets its answer) and the pair ends when the upstream closes;
  the upstream's EOF ends the pair (the client learns of it as a close, after the bytes
  still buffered for it). Such a transport also closes itself after its own EOF.
- An end that goes away ends the other: a reset aborts it; a clean close closes it once its
  buffered bytes are sent.

Each end then calls its owner's hook with the way it ended (`client_lost`, `upstream_lost`):
the bookkeeping of the connection it was (metrics, pools, limits) stays with its owner.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol

# What an end calls when its transport is gone: the connection_lost of the protocol the
# transport had before the relay (or another function taking the same argument).
LostHook = Callable[[Exception | None], None]


class ByteCounts(Protocol):
    """Where a relay counts bytes, when asked to (TcpProxy's per-Service counters)."""

    sent: int  # client -> upstream
    received: int  # upstream -> client


class _End:
    """The protocol of one of a relay's two transports: what it reads goes to `peer`, the
    other end's transport. (A plain class: the event loop calls its methods by name.)"""

    __slots__ = ("transport", "peer", "other", "eof", "holds_eof", "on_lost")

    def __init__(self, transport: asyncio.Transport, peer: asyncio.Transport, holds_eof: bool,
                 on_lost: LostHook | None) -> None:
        self.transport = transport
        self.peer = peer
        # The other end, until either transport is gone: None from then on (which also
        # breaks the reference cycle between the two ends).
        self.other: _End | None = None
        self.eof = False  # this end has finished sending
        # When the other end cannot half-close: hold this end's EOF back (the client's), or
        # end the pair (the upstream's).
        self.holds_eof = holds_eof
        self.on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        # The per-chunk path: nothing else here.
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None or other.eof:
            # Both directions have ended (or the other end is already gone): close; the
            # other end follows (connection_lost). Keeping a half-closed pair open would
            # leak both sockets.
            return False
        peer = self.peer
        if peer.can_write_eof():
            peer.write_eof()
        elif not self.holds_eof:
            # The upstream is done and the client cannot be told so but by a close.
            return False
        # (Else the client's EOF is held back: the upstream may still answer.) Returning
        # True from a transport that cannot half-close would only earn a warning: it closes
        # after an EOF whatever this returns, and the pair then ends.
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other
        if other is not None:
            self.other = other.other = None
            if exc is None:
                self.peer.close()  # after the bytes still buffered for it
            else:
                self.peer.abort()
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(exc)

    def pause_writing(self) -> None:
        # This end's send buffer is full: stop reading the other end until it drains.
        if self.other is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None:
            self.peer.resume_reading()


class _CountedEnd(_End):
    """An end whose reads are counted in `counts`."""

    __slots__ = ("counts",)

    def __init__(self, transport: asyncio.Transport, peer: asyncio.Transport, holds_eof: bool,
                 on_lost: LostHook | None, counts: ByteCounts) -> None:
        super().__init__(transport, peer, holds_eof, on_lost)
        self.counts = counts


class _CountedClientEnd(_CountedEnd):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.counts.sent += len(data)
        self.peer.write(data)


class _CountedUpstreamEnd(_CountedEnd):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.counts.received += len(data)
        self.peer.write(data)


class Relay:
    """Bytes between a client transport and an upstream transport; see the module docstring.

    Made with both transports open; `start` hands them to the relay. `client_lost` and
    `upstream_lost` are called, once each, with the way that transport ended (None: a clean
    close; an exception: a reset or an error). With `counts`, the bytes read from the client
    are added to `counts.sent`, those from the upstream to `counts.received`."""

    __slots__ = ("client", "upstream")

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport, *,
                 client_lost: LostHook | None = None, upstream_lost: LostHook | None = None,
                 counts: ByteCounts | None = None) -> None:
        # The uncounted ends keep the per-chunk path to one write (the HTTP tunnel's).
        if counts is None:
            self.client = _End(client, upstream, True, client_lost)
            self.upstream = _End(upstream, client, False, upstream_lost)
        else:
            self.client = _CountedClientEnd(client, upstream, True, client_lost, counts)
            self.upstream = _CountedUpstreamEnd(upstream, client, False, upstream_lost, counts)
        self.client.other = self.upstream
        self.upstream.other = self.client

    def start(self, pending: list[bytes] | None = None, *, client_eof: bool = False,
              upstream_eof: bool = False, client_write_paused: bool = False) -> None:
        """Take both transports over and relay from now on.

        What the previous owners knew comes along: `pending`, client bytes held for the
        upstream (sent first); `client_eof` / `upstream_eof`, that side already sent its EOF
        (and its transport stayed open); `client_write_paused`, that the client's send
        buffer is full (its resume_writing will come to the relay)."""
        client, upstream = self.client, self.upstream
        # From here on the loop calls the ends: the previous protocols hear nothing more
        # (but each end's hook).
        client.transport.set_protocol(client)  # type: ignore[arg-type]
        upstream.transport.set_protocol(upstream)  # type: ignore[arg-type]
        # Whatever paused the client's reading before (a full buffer of held bytes, a
        # pipelined request) was its previous owner's; the relay pauses it again itself. A
        # side that already sent its EOF is not read again (libuv leaves reading after EOF
        # undefined; uvloop would report the EOF once more).
        if not client_eof:
            client.transport.resume_reading()
        if client_write_paused:
            upstream.transport.pause_reading()
        elif not upstream_eof:
            upstream.transport.resume_reading()
        if pending:
            # After the handover: a full send buffer here pauses the client through its end.
            upstream.transport.writelines(pending)
        # An EOF that came before the handover, as eof_received would have taken it.
        if client_eof and not client.eof_received():
            client.transport.close()
        if upstream_eof and not upstream.eof_received():
            upstream.transport.close()
