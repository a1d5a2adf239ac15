"""HTTP/2 connections to upstream endpoints: many requests at once on one connection.

gRPC calls go to their endpoint over HTTP/2 (cleartext with prior knowledge to an app; `h2`
by ALPN over mTLS to another sidecar), as do HTTP/2 requests between sidecars. Per endpoint,
an `Http2Pool` keeps a few connections and opens a stream on the least loaded one that has
room under the server's `SETTINGS_MAX_CONCURRENT_STREAMS`; when none has, another connection
is opened. A connection that received a GOAWAY takes no new stream and closes when its last
one ends.

The forwarder (dataplane/forwarder.py) sees each stream as an `UpstreamConnection`: an
`Http2UpstreamStream` answers the same calls (begin, send_body, send_end, finish, abort,
pause/resume reading) for its stream, so retries, timeouts and back-pressure work alike.
Back-pressure: response bytes a stream has passed on are credited back to the server unless
the client is behind (the stream's reading is paused); request bytes the server's window
does not admit stay queued in the codec, and past `QUEUED_LIMIT` the client is paused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

from meshproxy.dataplane.connect import asyncio_tls, connect_endpoint
from meshproxy.dataplane.tls import Contexts
from meshproxy.dataplane.upstream import ConnectionPool, ResponseReceiver, UpstreamConnection
from meshproxy.http1.errors import ConnectFailure, ProxyError, UpstreamProtocolError, UpstreamReset
from meshproxy.http1.events import RequestHead
from meshproxy.http1.response_reader import ResponseReader
from meshproxy.http2.codec import (
    CANCEL,
    REFUSED_STREAM,
    Closed,
    Codec,
    ConnectionFailed,
    Data,
    GoAway,
    Headers,
    PeerSettings,
    Reset,
    Settings,
    WindowOpened,
)
from meshproxy.http2.fields import request_fields, response_head

log = logging.getLogger("meshproxy.upstream")

# Request bytes queued for one stream beyond the server's window before the client is paused
# (as h2downstream.QUEUED_LIMIT, and for the same reason).
QUEUED_LIMIT = 1024 * 1024
# Streams a connection carries when the server's SETTINGS set no limit (RFC 9113: none).
DEFAULT_MAX_STREAMS = 100


class Http2UpstreamStream(UpstreamConnection):
    """One request stream on an upstream HTTP/2 connection, as the forwarder sees it."""

    __slots__ = ("conn", "stream_id", "ended", "closed_stream", "withheld", "reading_paused",
                 "write_paused", "response_started")

    def __init__(self, conn: "Http2UpstreamConnection") -> None:
        super().__init__(conn.pool, conn.idle_reader)
        self.conn = conn
        self.transport = conn.transport
        self.stream_id = 0
        self.ended = False  # this side's end (END_STREAM) was sent
        self.closed_stream = False  # the stream is over (closed or reset either way)
        self.withheld = 0  # response bytes whose credit waits for the client
        self.reading_paused = False
        self.write_paused = False  # the request's receiver was told the upstream is full
        self.response_started = False

    def begin(self, receiver: ResponseReceiver, head: RequestHead, target: bytes,
              body: list[bytes], *, complete: bool, upgrade: bool) -> None:
        self.exchange = receiver
        self.requests += 1
        conn = self.conn
        conn.reserved -= 1
        if conn.closed:
            # The connection went away between the stream's choice and its try.
            self.closed = True
            receiver.upstream_lost()
            return
        codec = conn.codec
        no_body = not head.has_body or (complete and not body)
        self.stream_id = codec.open_stream(request_fields(head, target, conn.scheme),
                                           end_stream=no_body)
        conn.streams[self.stream_id] = self
        if no_body:
            self.ended = True
        else:
            for data in body:
                codec.send_data(self.stream_id, data)
            if complete:
                self.ended = True
                codec.end_stream(self.stream_id)
        conn.flush()

    def send_body(self, head: RequestHead, data: bytes) -> None:
        if self.closed_stream or self.ended or not data:
            return
        codec = self.conn.codec
        codec.send_data(self.stream_id, data)
        self.conn.flush()
        if not self.write_paused and codec.queued(self.stream_id) > QUEUED_LIMIT:
            self.write_paused = True
            receiver = self.exchange
            if receiver is not None:
                receiver.upstream_write_paused()

    def send_end(self, head: RequestHead) -> None:
        if self.closed_stream or self.ended:
            return
        self.ended = True
        self.conn.codec.end_stream(self.stream_id)
        self.conn.flush()

    def finish(self, reusable: bool) -> None:
        self.exchange = None
        if not self.closed_stream and not self.ended:
            # The response is complete but the request is not: the rest is not wanted.
            self._reset(CANCEL)
        self.conn.stream_gone(self)

    def detach(self) -> None:
        self.exchange = None

    def abort(self) -> None:
        self.exchange = None
        if self.stream_id == 0:  # handed out, never begun: give its place back
            if not self.closed:
                self.closed = True
                self.conn.reserved -= 1
            return
        self.closed = True
        if not self.closed_stream:
            self._reset(CANCEL)
        self.conn.stream_gone(self)

    def close(self) -> None:
        self.abort()

    def _reset(self, code: int) -> None:
        self.closed_stream = True
        conn = self.conn
        if not conn.closed:
            conn.codec.reset(self.stream_id, code)
            conn.flush()

    def pause_reading(self) -> None:
        # Credit for what this stream receives waits (the client is behind).
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        withheld, self.withheld = self.withheld, 0
        conn = self.conn
        if withheld and not self.closed_stream and not conn.closed:
            conn.codec.consumed(self.stream_id, withheld)
            conn.flush()

    def writelines(self, parts: list) -> None:
        raise AssertionError("HTTP/1.1 bytes on an HTTP/2 stream")


class Http2UpstreamConnection:
    """One HTTP/2 connection to an endpoint, client side (an asyncio protocol)."""

    transport: asyncio.Transport

    __slots__ = ("pool", "h2pool", "transport", "codec", "streams", "max_streams", "closed",
                 "going_away", "scheme", "idle_since", "write_blocked", "contexts",
                 "idle_timer", "reserved", "settled", "flush_pending", "idle_reader")

    def __init__(self, pool: ConnectionPool, h2pool: "Http2Pool", scheme: bytes) -> None:
        self.pool = pool
        self.h2pool = h2pool
        self.scheme = scheme
        self.codec = Codec(server=False, settings=Settings())
        self.streams: dict[int, Http2UpstreamStream] = {}
        # No stream opens before the server's first SETTINGS say how many it allows (a burst
        # of calls would otherwise open more than it takes, and have them reset).
        self.max_streams = 0
        self.settled: asyncio.Future | None = None  # done once the server's SETTINGS came
        self.closed = False
        self.going_away = False  # a GOAWAY came: no new stream here
        self.idle_since = 0.0
        self.write_blocked = False  # the socket's send buffer is full
        # The TLS contexts in force when it was opened: after a certificate rotation it takes
        # no new stream (new connections use the new certificate), and closes when idle.
        tls = pool.tls
        self.contexts: Contexts | None = tls.contexts if tls is not None else None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.reserved = 0  # streams handed out (new_stream) and not yet begun
        self.flush_pending = False  # a flush_now is scheduled for this turn
        # What its streams hold as the HTTP/1.1 reader an UpstreamConnection has (unused).
        self.idle_reader = ResponseReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.settled = self.pool.loop.create_future()
        self.codec.start()
        self.flush_now()

    @property
    def available(self) -> bool:
        """True when another stream may be opened here."""
        return (not self.closed and not self.going_away and not self.stale
                and self.load < self.max_streams)

    @property
    def load(self) -> int:
        """Streams open or handed out to be opened."""
        return len(self.streams) + self.reserved

    @property
    def stale(self) -> bool:
        """True once the certificate it was opened with has been replaced."""
        tls = self.pool.tls
        return tls is not None and tls.contexts is not self.contexts

    def new_stream(self) -> Http2UpstreamStream:
        """A stream of this connection, counted against its limit from now: it is opened
        (`begin`) when its try is sent, which may be a loop step later."""
        self.reserved += 1
        return Http2UpstreamStream(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive(data)
        except ConnectionFailed as exc:
            self.transport.write(self.codec.failure_bytes())
            self._fail(UpstreamProtocolError(exc.reason))
            return
        touched: list[ResponseReceiver] = []
        streams = self.streams
        opened = False
        for event in events:
            kind = event.__class__
            if kind is Data:
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                self._data(stream, event, touched)  # type: ignore[arg-type]
            elif kind is Headers:
                self._headers(event, touched)  # type: ignore[arg-type]
            elif kind is Reset or kind is Closed:
                self._stream_closed(event.stream_id, event.code)  # type: ignore[union-attr]
            elif kind is WindowOpened:
                opened = True
            elif kind is PeerSettings:
                limit = event.max_concurrent_streams  # type: ignore[union-attr]
                if limit is not None:
                    self.max_streams = limit
                elif self.max_streams == 0:  # the first SETTINGS, without a limit
                    self.max_streams = DEFAULT_MAX_STREAMS
                settled = self.settled
                if settled is not None and not settled.done():
                    settled.set_result(None)
            elif kind is GoAway:
                self.going_away = True  # not `available` now; closes after its last stream
            if self.closed:
                break
        for receiver in touched:
            receiver.flush()
        if opened:
            # Only once the codec has framed what the new credit admits does a stream's
            # queue shrink: then its client is read again.
            self.flush_now()
            self._window_opened()
        else:
            self.flush()
        if not self.closed and self.going_away and not self.streams:
            self.close()

    def _headers(self, event: Headers, touched: list[ResponseReceiver]) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        receiver = stream.exchange
        if receiver is None:
            return
        if event.trailers:
            receiver.response_trailers(event.fields)
            receiver.response_end()
        else:
            try:
                head = response_head(event.fields)
            except ProxyError as exc:
                self._stream_failed(stream, exc)
                return
            if not event.informational:
                stream.response_started = True
                if head.content_length is None and head.status >= 200 \
                        and head.status not in (204, 304):
                    if event.end_stream:
                        head.content_length = 0  # (a trailers-only answer, say)
                    else:
                        # A body of unknown length: an HTTP/1.1 client gets it chunked.
                        head.chunked = True
            receiver.response_head(head)
            if event.end_stream and stream.exchange is receiver:
                receiver.response_end()
        if stream.exchange is receiver and receiver not in touched:
            touched.append(receiver)

    def _data(self, stream: Http2UpstreamStream | None, event: Data,
              touched: list[ResponseReceiver]) -> None:
        size = len(event.data)
        if stream is None or stream.exchange is None:
            self.codec.consumed(event.stream_id, size)
            return
        receiver = stream.exchange
        if size:
            receiver.response_body(event.data)
        if stream.reading_paused:
            stream.withheld += size
        else:
            self.codec.consumed(event.stream_id, size)
        if event.end_stream and stream.exchange is receiver:
            receiver.response_end()
        if receiver not in touched:
            touched.append(receiver)

    def _stream_closed(self, stream_id: int, code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.closed_stream = True
        receiver, stream.exchange = stream.exchange, None
        if receiver is None:
            return
        if code == REFUSED_STREAM and not stream.response_started:
            # The server takes fewer streams than its SETTINGS said (grpcio counts a stream
            # until its handler is done): hold this connection to what it carried when it
            # refused, so that a burst is not refused stream after stream.
            if not self.going_away:
                self.max_streams = max(1, min(self.max_streams, self.load))
            receiver.upstream_refused()
        else:
            receiver.upstream_failed(UpstreamReset(f"stream reset by the server ({code})"),
                                     reset=True)
        self._after_stream()

    def _stream_failed(self, stream: Http2UpstreamStream, error: ProxyError) -> None:
        receiver, stream.exchange = stream.exchange, None
        stream._reset(CANCEL)
        self.streams.pop(stream.stream_id, None)
        if receiver is not None:
            receiver.upstream_failed(error)
        self._after_stream()

    def _window_opened(self) -> None:
        codec = self.codec
        if self.closed or self.write_blocked:
            return
        for stream in list(self.streams.values()):
            if stream.write_paused and codec.queued(stream.stream_id) <= QUEUED_LIMIT:
                stream.write_paused = False
                receiver = stream.exchange
                if receiver is not None:
                    receiver.upstream_write_resumed()

    def stream_gone(self, stream: Http2UpstreamStream) -> None:
        """The forwarder is done with `stream` (its response ended, or it gave up)."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self._after_stream()

    def _after_stream(self) -> None:
        if self.streams or self.reserved or self.closed:
            return
        if self.going_away or self.stale:
            self.close()
        else:
            pool = self.pool
            self.idle_since = pool.loop.time()
            if self.idle_timer is None:
                self.idle_timer = pool.loop.call_later(pool.idle_timeout, self._idle_check)
            self.h2pool.idle(self)

    def _idle_check(self) -> None:
        """Close after the pool's idle timeout without a stream (as HTTP/1.1 ones are)."""
        self.idle_timer = None
        if self.closed or self.streams or self.reserved:
            return
        left = self.idle_since + self.pool.idle_timeout - self.pool.loop.time()
        if left > 0.001:
            self.idle_timer = self.pool.loop.call_later(left, self._idle_check)
            return
        self.close()

    def flush(self) -> None:
        """Write what the codec has queued, now. (Not deferred to the end of the loop's turn
        as the client side's is: with requests held back a turn, grpcio servers near their
        stream limit refused 25 times as many streams.)"""
        self.flush_now()

    def flush_now(self) -> None:
        self.flush_pending = False
        if self.closed:
            return
        data = self.codec.data_to_send()
        if data:
            self.transport.write(data)
        if self.codec.finished:
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        settled = self.settled
        if settled is not None and not settled.done():
            settled.set_result(None)  # (its waiter finds it closed)
        self.h2pool.forget(self)
        self._lose_streams(UpstreamReset("upstream connection closed"))

    def _lose_streams(self, error: ProxyError) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.closed_stream = True
            receiver, stream.exchange = stream.exchange, None
            if receiver is None:
                continue
            if stream.response_started:
                receiver.upstream_failed(error, reset=True)
            else:
                receiver.upstream_lost()

    def _fail(self, error: ProxyError) -> None:
        self.closed = True
        self.h2pool.forget(self)
        self.transport.close()
        self._lose_streams(error)

    def pause_writing(self) -> None:
        self.write_blocked = True
        for stream in list(self.streams.values()):
            if not stream.write_paused:
                stream.write_paused = True
                if stream.exchange is not None:
                    stream.exchange.upstream_write_paused()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.flush_now()
        self._window_opened()

    def close(self) -> None:
        if self.closed:
            return
        if not self.codec.finished:
            data = self.codec.data_to_send()  # resets, a GOAWAY: what flush would write
            if data:
                self.transport.write(data)
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.h2pool.forget(self)
        self.transport.close()


class TlsHttp2UpstreamConnection(Http2UpstreamConnection):
    """An HTTP/2 connection over asyncio's TLS (to another sidecar): the same, but the
    transport decrypts into the TLS state's shared buffer (`TLSState.read_buffer`), as
    `TlsUpstreamConnection` does. Read as a plain protocol, uvloop's TLS asks for 256 KiB per
    read, which glibc serves with mmap, mremap and munmap: three system calls per request
    (measured: 2,795 of each in 5 s at 1000 req/s)."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        tls = self.pool.tls
        assert tls is not None  # made only by a pool with TLS
        return tls.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        tls = self.pool.tls
        assert tls is not None
        self.data_received(bytes(tls.read_buffer[:nbytes]))


class Http2Pool:
    """The HTTP/2 connections to one endpoint (beside its HTTP/1.1 pool)."""

    __slots__ = ("pool", "conns", "connecting")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.conns: list[Http2UpstreamConnection] = []
        # The connection being opened, which the requests that find no room wait for.
        self.connecting: asyncio.Future | None = None

    def take_stream(self) -> Http2UpstreamStream | None:
        """A new stream on the least loaded connection with room, or None."""
        best: Http2UpstreamConnection | None = None
        for conn in list(self.conns):
            if not conn.streams and not conn.reserved and conn.stale:
                conn.close()  # opened with a certificate since replaced
                continue
            if conn.available and (best is None or conn.load < best.load):
                best = conn
        if best is None:
            return None
        return best.new_stream()

    async def open_stream(self) -> Http2UpstreamStream:
        """A new stream, on a new connection when none has room. Raises ConnectFailure."""
        while True:
            stream = self.take_stream()
            if stream is not None:
                return stream
            connecting = self.connecting
            if connecting is None or connecting.done():
                # (A finished one may still be here, its done callback not yet run: awaiting
                # it would not yield, and a full connection would make this loop spin.)
                connecting = self.connecting = asyncio.ensure_future(self._connect())
                connecting.add_done_callback(self._connected)
            conn = await asyncio.shield(connecting)
            if conn.available:
                return conn.new_stream()

    def _connected(self, future: asyncio.Future) -> None:
        if self.connecting is future:
            self.connecting = None

    async def _connect(self) -> Http2UpstreamConnection:
        pool = self.pool
        tls = pool.tls
        contexts = tls.contexts if tls is not None else None
        scheme = b"https" if contexts is not None else b"http"
        leg = asyncio_tls
        if contexts is not None and contexts.client_h2 is not None:
            context = contexts.client_h2

            async def h2_leg(loop: asyncio.AbstractEventLoop, host: str, port: int,
                             _: ssl.SSLContext, factory: Callable, timeout: float):  # type: ignore[no-untyped-def]
                return await asyncio_tls(loop, host, port, context, factory, timeout)
            leg = h2_leg  # type: ignore[assignment]
        factory: Callable[[], Http2UpstreamConnection]
        if contexts is not None:
            factory = lambda: TlsHttp2UpstreamConnection(pool, self, scheme)  # noqa: E731
        else:
            factory = lambda: Http2UpstreamConnection(pool, self, scheme)  # noqa: E731
        _, conn = await connect_endpoint(pool.loop, pool.host, pool.port, factory,
                                         timeout=pool.connect_timeout, metrics=pool.metrics,
                                         tls=tls, expected_id=pool.expected_id,
                                         tls_leg=leg)
        assert isinstance(conn, Http2UpstreamConnection)
        settled = conn.settled
        if settled is not None and not settled.done():
            try:
                async with asyncio.timeout(pool.connect_timeout):
                    await settled
            except TimeoutError:
                conn.close()
                raise ConnectFailure(f"{pool.host}:{pool.port} sent no HTTP/2 SETTINGS in time") \
                    from None
        if conn.closed:
            raise ConnectFailure(f"{pool.host}:{pool.port} closed the HTTP/2 connection at once")
        self.conns.append(conn)
        return conn

    def idle(self, conn: Http2UpstreamConnection) -> None:
        """`conn` carries no stream now; connections beyond the first idle one are closed."""
        idle = [c for c in self.conns if not c.streams and not c.reserved and not c.closed]
        if len(idle) > 1 and conn in idle:
            conn.close()

    def forget(self, conn: Http2UpstreamConnection) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        for conn in list(self.conns):
            if not conn.streams and not conn.reserved:
                conn.close()
