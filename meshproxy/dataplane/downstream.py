"""The client side of the proxy: one asyncio protocol per accepted connection.

It parses requests (sans-I/O reader), runs their exchanges strictly one after another (a
pipelined request waits, and the client is paused, until the previous response is complete),
enforces the header-read and idle keep-alive timeouts, and passes back-pressure on. After a
successful Upgrade (101) the client and upstream connections become a byte relay
(dataplane/relay.py), which takes both transports over; the connection's own bookkeeping still
ends in its connection_lost. What its exchanges use of it is the ClientConnection base
(dataplane/client.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Sequence

from meshproxy.dataplane.client import PAUSE_PIPELINE, ClientConnection
from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.exchange import Exchange
from meshproxy.dataplane.h2downstream import Http2Downstream
from meshproxy.dataplane.relay import Relay
from meshproxy.dataplane.tls import peer_identity
from meshproxy.dataplane.upstream import UpstreamConnection
from meshproxy.http1.errors import HeaderTimeout, ProxyError, error_response
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, Upgrade
from meshproxy.http1.reader import RequestReader
from meshproxy.http2.codec import PREFACE
from meshproxy.observability.record import RequestRecord

_IDLE, _HEAD, _BUSY = 0, 1, 2


class DownstreamConnection(ClientConnection):
    """A client connection on an inbound or outbound listener (an asyncio protocol)."""

    __slots__ = ("reader", "current", "parsing", "queue", "_state", "_deadline", "_timer",
                 "_relay", "h2", "sniffing", "held")

    def __init__(self, context: ListenerContext, original: tuple[str, int] | None = None) -> None:
        super().__init__(context, original)
        self.reader: RequestReader | None = RequestReader()
        self.current: Exchange | None = None  # the exchange being answered
        self.parsing: Exchange | None = None  # the exchange whose request is being read
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self._state = _IDLE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None  # the connection's one timer
        # After 101: the relay that has this connection's transport (the loop no longer
        # calls this protocol; the relay calls its connection_lost).
        self._relay: Relay | None = None
        # Once the client's first bytes are the HTTP/2 preface: the connection's HTTP/2
        # side (dataplane/h2downstream.py), which every call is passed on to.
        self.h2: Http2Downstream | None = None
        self.sniffing = True  # the first bytes have not yet told HTTP/1.1 from HTTP/2
        self.held = b""  # first bytes that may still be the start of the preface

    # -- asyncio protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        context = self.context
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            # Heads and small bodies go out in separate writes; Nagle's algorithm would hold
            # the second one back until the client acknowledges the first.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context.connection_opened(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls = True
            self.peer_id = peer_identity(ssl_object)
            context.metrics.tls_handshake(context.direction, "ok")
        context.metrics.connection_opened(context.direction, self.tls)
        self._arm(_IDLE, context.idle_timeout)

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        if h2 is not None:
            h2.data_received(data)
            return
        if self.closing:
            return
        if self.sniffing:
            data = self._sniff(data)
            if not data:
                return
        reader = self.reader
        if reader is None:
            # After an Upgrade request, bytes for the new protocol wait in its exchange until
            # the upstream answers. Once the upstream has refused the upgrade, or after a
            # framing error, they are dropped: they must never reach the upstream as HTTP
            # (a request smuggled past the proxy); the connection closes after the response.
            parsing = self.parsing
            if parsing is not None and parsing.upgrading:
                parsing.request_body(data)
            return
        if self._state == _IDLE:
            self._arm(_HEAD, self.context.header_timeout)
        try:
            events = reader.feed(data)
        except ProxyError as exc:
            # Requests that were complete before the bad one are answered first.
            if exc.completed:
                self._handle(exc.completed)
            if not self.closing:
                self._protocol_error(exc)
            return
        self._handle(events)

    def _sniff(self, data: bytes) -> bytes:
        """Tell HTTP/2 with prior knowledge from HTTP/1.1 by the first bytes: return those to
        read as HTTP/1.1 (b"" while they may still be the preface, or once HTTP/2 has the
        connection)."""
        held = self.held + data if self.held else data
        if not PREFACE.startswith(held[:len(PREFACE)]):
            self.sniffing = False
            self.held = b""
            return held
        if len(held) < len(PREFACE):
            self.held = held
            if self._state == _IDLE:
                self._arm(_HEAD, self.context.header_timeout)
            return b""
        self.sniffing = False
        self.held = b""
        self._state = _BUSY  # the HTTP/2 side keeps its own timers
        self._deadline = 0.0
        h2 = self.h2 = Http2Downstream(self.context, self.transport, tls=self.tls,
                                       peer_id=self.peer_id, original=self.original,
                                       settings=self.context.h2_settings)
        h2.start(held)
        return b""

    def _handle(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, bytes):
                parsing = self.parsing
                assert parsing is not None  # body events follow their head
                parsing.request_body(event)
            elif event is END_OF_MESSAGE:
                exchange = self.parsing
                assert exchange is not None
                exchange.request_end()
                if not exchange.upgrading:
                    self.parsing = None
                    if exchange.finished and self.current is None and not self.closing:
                        # It was answered from its head (an error, a redirect) before its end
                        # was read: only now is the connection waiting for the next request.
                        self._arm_for_next()
            elif isinstance(event, RequestHead):
                self._on_head(event)
            elif isinstance(event, Upgrade):
                # Bytes after an upgrade request belong to the new protocol; they wait in the
                # exchange until the upstream agrees (101) or refuses.
                self.reader = None
                parsing = self.parsing
                if event.rest and parsing is not None:
                    parsing.request_body(event.rest)
            if self.closing:
                return

    def _on_head(self, head: RequestHead) -> None:
        self._state = _BUSY
        self._deadline = 0.0
        exchange = Exchange(self, head)
        self.parsing = exchange
        if self.context.draining:
            exchange.client_keep_alive = False
        if self.current is None:
            self.current = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.pause_reading(PAUSE_PIPELINE)

    def eof_received(self) -> bool:
        self.eof = True
        if self.h2 is not None:
            return False
        if self.current is not None and self.parsing is None and not self.queue:
            # The client half-closed after a complete request: answer it, then close.
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        context = self.context
        context.metrics.connection_closed(context.direction, self.tls)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # (A relay has already ended the upstream; dropping it frees the pair.)
        self._relay = None
        if self.h2 is not None:
            self.h2.connection_lost()
        if self.current is not None:
            self.current.downstream_lost()
        for exchange in self.queue:
            exchange.downstream_lost()
        self.queue.clear()
        self.current = self.parsing = None
        context.connection_closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream.
        self.writing_paused = True
        if self.h2 is not None:
            self.h2.pause_writing()
            return
        upstream = self.current.upstream_connection() if self.current else None
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.h2 is not None:
            self.h2.resume_writing()
            return
        upstream = self.current.upstream_connection() if self.current else None
        if upstream is not None:
            upstream.resume_reading()

    # -- what exchanges tell this connection (ClientConnection) --------------------------------

    def exchange_done(self, exchange: object) -> None:
        """The current exchange's response is complete: close, or go on to the next request."""
        current = self.current
        if current is None or exchange is not current:
            return
        self.current = None
        if not current.client_keep_alive or self.context.draining or (
            self.eof and not self.queue
        ):
            self._close()
            return
        if self.queue:
            self.current = self.queue.popleft()
            if not self.queue:
                self.resume_reading(PAUSE_PIPELINE)
            self.current.start()
            return
        self.resume_reading(PAUSE_PIPELINE)
        if self.parsing is current:
            return  # its request's end is still to be read; the timers start after it
        self._arm_for_next()

    def _arm_for_next(self) -> None:
        if self.reader is not None and self.reader.in_message:
            self._arm(_HEAD, self.context.header_timeout)
        else:
            self._arm(_IDLE, self.context.idle_timeout)

    def exchange_aborted(self, exchange: object) -> None:
        """The response broke off midway: the client must see the connection fail."""
        self.current = None
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def start_tunnel(self, upstream: UpstreamConnection, pending: list) -> None:
        """After 101: the client and `upstream` become a Relay (dataplane/relay.py), `pending`
        sent first, until both directions have ended or either side goes away."""
        self.current = self.parsing = None
        self._state = _BUSY  # no timer applies to a tunnel (the relay has no idle timeout)
        self._deadline = 0.0
        # The pause reasons were the exchanges'; the relay reads the client and pauses it
        # itself. A pause for a full upstream send buffer is dropped too, as it always was:
        # the bit may outlive the connection that set it, and honouring a stale one would
        # stall the tunnel for good; a real one costs at most some buffering until that
        # buffer drains (its resume_writing then reaches the relay).
        self.paused = 0
        relay = self._relay = Relay(self.transport, upstream.transport,
                                    client_lost=self.connection_lost,
                                    upstream_lost=upstream.connection_lost)
        relay.start(pending, client_write_paused=self.writing_paused)

    def close_if_idle(self) -> None:
        """Drain: close now if no request is in progress; otherwise after the response. A
        tunnel has no point at which it is idle: it goes on until it ends or the drain
        timeout aborts it. HTTP/2 sends GOAWAY and closes after its open streams."""
        if self.h2 is not None:
            self.h2.drain()
            return
        if self.current is None and self._relay is None and (
            self.reader is None or not self.reader.in_message
        ):
            self._close()

    # -- internals ---------------------------------------------------------------------------------

    def _protocol_error(self, error: ProxyError) -> None:
        # The stream position is unknown after a framing error: answer (if nothing else is
        # being answered on this connection) and close. With no reader, later bytes are
        # dropped (data_received).
        self.reader = None
        if self.current is None:
            self._refuse(error)
        elif self.parsing is self.current:
            # The request being forwarded has a broken body: stop it upstream and answer 400
            # (or cut the connection if its response has already started).
            self.closing = True
            self.current.fail(error)
        else:
            # Answer the complete requests before the bad one, then close; the bad one is
            # never forwarded (nor is a queued one whose body turned out bad). Not closing
            # yet: that would make the earlier responses say `connection: close` and end the
            # connection after the first of them.
            bad = self.parsing
            self.parsing = None
            if bad is not None and bad in self.queue:
                self.queue.remove(bad)
                bad.downstream_lost()
            last = self.queue[-1] if self.queue else self.current
            last.client_keep_alive = False

    def _arm(self, state: int, timeout: float) -> None:
        # One timer per connection, never cancelled: it is set at most `tick` ahead (the
        # shorter of the two timeouts) and, when it fires early, re-set for the deadline. A
        # deadline then only ever moves by assignment, even from idle (75 s) to a new head
        # (10 s) on every request of a keep-alive connection.
        self._state = state
        loop = self.context.loop
        now = loop.time()
        self._deadline = now + timeout
        if self._timer is None:
            self._timer = loop.call_at(min(self._deadline, now + self.context.tick),
                                       self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing or self._state == _BUSY:
            return  # re-armed by _arm when the connection waits again
        loop = self.context.loop
        now = loop.time()
        if self._deadline - now > 0.001:
            self._timer = loop.call_at(min(self._deadline, now + self.context.tick),
                                       self._on_timer)
            return
        if self._state == _HEAD:
            self._refuse(HeaderTimeout("request head not received in time"))
            return
        self._close()

    def _refuse(self, error: ProxyError) -> None:
        """Answer `error` to a request that has no exchange (its head was malformed, too
        large or late: 400, 431, 408), count it, log it, and close the connection."""
        self.closing = True
        context = self.context
        now = context.loop.time()
        # The header timer was armed, for header_timeout, when the head's first bytes came.
        started = self._deadline - context.header_timeout if self._state == _HEAD else now
        record = RequestRecord(min(started, now), context.direction)
        record.status = error.status
        record.error = error.reason
        record.peer = self.peer_address()
        context.request_finished(record)
        self.transport.write(error_response(error, keep_alive=False))
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class TlsDownstreamConnection(DownstreamConnection):
    """A client connection over asyncio's TLS (inbound mTLS): the same, but the transport
    decrypts into the TLS state's shared buffer (`TLSState.read_buffer`, dataplane/tls.py),
    and each read is copied out at its size (the event loop sees get_buffer and reads this
    protocol as a buffered one)."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        tls = self.context.tls
        assert tls is not None  # a TLS connection exists only on a listener with TLS
        return tls.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        tls = self.context.tls
        assert tls is not None
        self.data_received(bytes(tls.read_buffer[:nbytes]))

    def writelines(self, parts: list) -> None:
        # One TLS record for what one read produced (a head and a small body): a record per
        # piece would cost an encryption and 22 bytes each.
        self.transport.write(b"".join(parts))
