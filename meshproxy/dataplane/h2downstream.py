"""The client side of the proxy over HTTP/2: one connection, many streams, each an exchange.

A client connection starts as a `DownstreamConnection` (dataplane/downstream.py); when its
first bytes are the HTTP/2 connection preface (prior knowledge, or `h2` chosen by ALPN over
mTLS between sidecars), it hands the connection to an `Http2Downstream`, which owns the
server-side codec (http2/codec.py). Each request stream becomes an `Http2Stream`, the
`ClientConnection` its `Exchange` (dataplane/exchange.py) answers through, so a stream is
routed, balanced, retried, timed, authorized, counted and traced like an HTTP/1.1 request
(the stream is dataplane/h2stream.py; this module is the connection).

Flow control is the back-pressure in both directions:
- request bodies: the client gets credit back (WINDOW_UPDATE) for the bytes a stream has
  passed on, unless its exchange paused it (the upstream is slow or not connected yet): then
  the credit waits until it resumes, and the client stops at the end of its window;
- response bodies: what the client's window does not admit stays queued in the codec; past
  `QUEUED_LIMIT` per stream, or while the socket's send buffer is full, the stream's upstream
  is no longer read, until the client opens its window again. While the socket's send
  buffer is full, nothing is taken from the codec either: what the client does not read
  waits there, where the codec counts it (a client that floods SETTINGS or PING and never
  reads the acknowledgements is refused with GOAWAY ENHANCE_YOUR_CALM).

A client that takes nothing of a stream's response for the idle timeout (`--client-idle-
timeout`: a zero window never opened, a socket never read) has that stream reset
(RST_STREAM CANCEL) and its upstream closed; when it reads nothing at all, the connection
is closed. The limits and floods the codec refuses (http2/codec.py) end here: a request
whose header block is over the limit is answered 431 `headers-too-large` like an HTTP/1.1
head, and a connection refused as a whole gets its GOAWAY before it closes (the proxy
stops writing, then reads and drops what the client still sends for up to the idle
timeout, so that the GOAWAY is not lost to a TCP reset).

Errors the proxy makes are HTTP/2 responses; for gRPC requests (content-type
`application/grpc*`) they are trailers-only responses with spec §9's status mapping
(http2/grpc.py). A response that breaks off after its head ends its stream with RST_STREAM.
"""

from __future__ import annotations

import asyncio

from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.exchange import Exchange
from meshproxy.dataplane.h2stream import QUEUED_LIMIT, UNWANTED_BODY_LIMIT, Http2Stream, StreamOwner
from meshproxy.http1.errors import BadRequest, HeadersTooLarge, ProxyError
from meshproxy.http2 import grpc
from meshproxy.http2.codec import (
    CANCEL,
    NO_ERROR,
    Closed,
    Codec,
    ConnectionFailed,
    Data,
    GoAway,
    Headers,
    OversizedHeaders,
    Reset,
    Settings,
    WindowOpened,
)
from meshproxy.http2.fields import request_head
from meshproxy.observability.record import RequestRecord


class Http2Downstream(StreamOwner):
    """One client connection speaking HTTP/2, server side. Not an asyncio protocol itself:
    the `DownstreamConnection` that found the preface stays the transport's protocol and
    passes every call on."""

    __slots__ = ("streams", "writing_paused", "draining", "_idle_timer", "_stall_timer",
                 "_linger_timer", "flush_pending")

    def __init__(self, context: ListenerContext, transport: asyncio.Transport, *, tls: bool,
                 peer_id: str | None, original: tuple[str, int] | None,
                 settings: Settings) -> None:
        super().__init__(context, transport, Codec(server=True, settings=settings), tls=tls,
                         peer_id=peer_id, original=original)
        self.streams: dict[int, Http2Stream] = {}
        self.writing_paused = False
        self.flush_pending = False  # a flush_now is scheduled for this turn
        self.draining = False  # a GOAWAY went out: close once the last stream is done
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None  # streams whose client is behind
        # After close: aborts a transport whose last bytes the client does not take.
        self._linger_timer: asyncio.TimerHandle | None = None

    def start(self, first: bytes) -> None:
        """Send this side's SETTINGS and read the client's first bytes (its preface)."""
        self.codec.start()
        self.data_received(first)
        if not self.closing:
            self._arm_idle()

    # -- from the transport (through the DownstreamConnection) ------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            events = self.codec.receive(data)
        except ConnectionFailed:
            self._fail()
            return
        streams = self.streams
        opened = False
        for event in events:
            kind = event.__class__
            if kind is Data:
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    self._request_data(stream, event)  # type: ignore[arg-type]
                else:
                    self.codec.consumed(event.stream_id, len(event.data))  # type: ignore[union-attr]
            elif kind is Headers:
                self._headers(event)  # type: ignore[arg-type]
            elif kind is OversizedHeaders:
                self._oversized(event)  # type: ignore[arg-type]
            elif kind is Reset or kind is Closed:
                stream = streams.pop(event.stream_id, None)  # type: ignore[union-attr]
                if stream is not None:
                    self._stream_lost(stream)
            elif kind is WindowOpened:
                opened = True
            elif kind is GoAway:
                pass  # the client opens no more streams; those open finish
            if self.closing:
                return
        if opened:
            # Only once the codec has framed what the new credit admits does a stream's
            # queue shrink: then its upstream is read again.
            self.flush_now()
            self._window_opened()
        else:
            self.flush()

    def _headers(self, event: Headers) -> None:
        stream_id = event.stream_id
        stream = self.streams.get(stream_id)
        if stream is not None:
            # Request trailers: the request ends (they are not carried further).
            self._request_end(stream)
            return
        if event.trailers or event.informational:
            return
        stream = Http2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self._disarm_idle()
        try:
            head = request_head(event.fields)
        except BadRequest as exc:
            stream.request_ended = event.end_stream
            self._refuse(stream, exc)
            return
        if not event.end_stream and head.content_length is None:
            head.chunked = True  # a body of unknown length: chunked to an HTTP/1.1 upstream
        elif head.content_length is None or head.content_length <= UNWANTED_BODY_LIMIT:
            stream.body_unbounded = False
        stream.grpc = grpc.is_grpc(head)
        exchange = Exchange(stream, head)
        stream.exchange = exchange
        exchange.start()
        if event.end_stream:
            self._request_end(stream)

    def _oversized(self, event: OversizedHeaders) -> None:
        """A request whose header block is over the limit: 431, as an HTTP/1.1 head over
        64 KiB gets (RFC 9113 §10.5.1); the connection and its other streams go on."""
        stream = Http2Stream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        self._disarm_idle()
        stream.request_ended = event.end_stream
        try:
            stream.grpc = grpc.is_grpc(request_head(event.fields))
        except BadRequest:
            pass
        limit = self.codec.settings.max_header_list_size
        self._refuse(stream, HeadersTooLarge(f"a header list of {event.size} bytes, over {limit}"))

    def _request_data(self, stream: Http2Stream, event: Data) -> None:
        data = event.data
        exchange = stream.exchange
        if exchange is not None and data:
            exchange.request_body(data)
        if stream.paused and not stream.done:
            stream.withheld += len(data)
        else:
            self.codec.consumed(event.stream_id, len(data))
        if event.end_stream:
            self._request_end(stream)

    def _request_end(self, stream: Http2Stream) -> None:
        if stream.request_ended:
            return
        stream.request_ended = True
        exchange = stream.exchange
        if exchange is not None:
            exchange.request_end()
        elif stream.held_answer is not None:
            stream.release_held_answer()

    def _stream_lost(self, stream: Http2Stream) -> None:
        """The client reset the stream (or it closed before its exchange ended)."""
        stream.done = True
        stream.held_answer = None
        if stream.held_timer is not None:
            stream.held_timer.cancel()
            stream.held_timer = None
        exchange, stream.exchange = stream.exchange, None
        if exchange is not None:
            exchange.downstream_lost()
        self._after_stream()

    def _window_opened(self) -> None:
        codec = self.codec
        if self.writing_paused or self.closing:
            return
        for stream in list(self.streams.values()):
            if stream.upstream_paused and codec.queued(stream.stream_id) <= QUEUED_LIMIT:
                stream.resume_upstream()

    def _refuse(self, stream: Http2Stream, error: ProxyError) -> None:
        """Answer a request whose head the proxy cannot take (no exchange), and count it."""
        context = self.context
        record = RequestRecord(context.loop.time(), context.direction)
        record.status = error.status
        record.error = error.reason
        context.request_finished(record)
        stream.write_error(error, keep_alive=True)
        stream.exchange_done(None)

    def stream_done(self, stream: Http2Stream) -> None:
        """A stream's exchange ended (its response is complete, or it was reset)."""
        self.streams.pop(stream.stream_id, None)
        self.flush()
        self._after_stream()

    def _after_stream(self) -> None:
        if self.streams or self.closing:
            return
        if self.draining:
            self.close()
        else:
            self._arm_idle()

    def pause_writing(self) -> None:
        # The socket's send buffer is full: no stream's upstream is read, and nothing more
        # is taken from the codec (flush), until it drains.
        self.writing_paused = True
        for stream in list(self.streams.values()):
            if not stream.upstream_paused:
                stream.pause_upstream()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.flush_now()
        self._window_opened()  # what the flush took from the codec may resume streams

    # -- clients that fall behind ------------------------------------------------------------

    def watch_stall(self, since: float) -> None:
        """A stream's upstream was paused at `since`: check, an idle timeout later, that
        the client has taken some of its response meanwhile."""
        if self._stall_timer is None and not self.closing:
            self._stall_timer = self.context.loop.call_at(since + self.context.idle_timeout,
                                                          self._check_stalls)

    def _check_stalls(self) -> None:
        """Reset the streams whose client took none of their response for the idle timeout
        (a zero window never opened, RFC 9113 §6.9: nothing else would ever end them)."""
        self._stall_timer = None
        if self.closing:
            return
        now = self.context.loop.time()
        timeout = self.context.idle_timeout
        codec = self.codec
        stalled: list[Http2Stream] = []
        due = 0.0
        for stream in self.streams.values():
            if not stream.upstream_paused or not stream.stalled_since:
                continue
            out = stream.sent - codec.queued(stream.stream_id)
            if out > stream.stall_mark:  # some went out: watch again from now
                stream.stall_mark = out
                stream.stalled_since = now
            elif now - stream.stalled_since >= timeout - 0.001:
                stalled.append(stream)
                continue
            if not due or stream.stalled_since < due:
                due = stream.stalled_since
        if stalled and self.writing_paused:
            # The client has not read the socket for as long: nothing can reach it.
            self._end_streams()
            self.transport.abort()
            return
        for stream in stalled:
            self.streams.pop(stream.stream_id, None)
            codec.reset(stream.stream_id, CANCEL)
            self._stream_lost(stream)
        if due:
            self._stall_timer = self.context.loop.call_at(due + timeout, self._check_stalls)
        self.flush()

    def connection_lost(self) -> None:
        self.closing = True
        self._disarm_idle()
        self._disarm_stall()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.done = True
            exchange, stream.exchange = stream.exchange, None
            if exchange is not None:
                exchange.downstream_lost()

    # -- writing and closing ---------------------------------------------------------------

    def flush(self) -> None:
        """Write what the codec has queued, at the end of this turn of the event loop: the
        responses of many streams that complete in one turn (each upstream's read is a
        callback of its own) then leave in one write, not one system call each."""
        if self.flush_pending or self.closing or self.writing_paused:
            return
        self.flush_pending = True
        self.context.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write what the codec has queued (unless the socket's send buffer is full: then on
        resume_writing); close once the session is over."""
        self.flush_pending = False
        if self.closing or self.writing_paused:
            return
        data = self.codec.data_to_send()
        if data:
            self.transport.write(data)
        if self.codec.finished:
            self.close()

    def drain(self) -> None:
        """Stop taking streams (GOAWAY); close once those open are done."""
        if self.closing or self.draining:
            return
        self.draining = True
        self.codec.goaway(NO_ERROR)
        self.flush()
        if not self.streams:
            self.close()

    def _fail(self) -> None:
        """The client broke the protocol (or flooded): GOAWAY, and the streams end.

        The client may still be sending (a flood): closing with its bytes unread would make
        the kernel answer with a TCP reset, which can destroy the GOAWAY before the client
        reads it. So the proxy only shuts its side (after the GOAWAY), reads and drops what
        still comes, and closes once the client does (or aborts after the idle timeout)."""
        transport = self.transport
        transport.write(self.codec.failure_bytes())
        if not transport.can_write_eof():  # TLS: close_notify after the GOAWAY, then close
            self.close()
            return
        self._end_streams()
        transport.write_eof()
        self._linger()

    def close(self) -> None:
        if self.closing:
            return
        if not self.writing_paused:
            data = self.codec.data_to_send()  # a GOAWAY, the last responses (flush's)
            if data:
                self.transport.write(data)
        self._end_streams()
        self.transport.close()
        self._linger()  # what is still unwritten would hold it open for a client that never reads

    def _end_streams(self) -> None:
        self.closing = True
        self._disarm_idle()
        self._disarm_stall()
        for stream in list(self.streams.values()):
            if not stream.done:
                stream.done = True
                exchange, stream.exchange = stream.exchange, None
                if exchange is not None:
                    exchange.downstream_lost()
        self.streams.clear()

    def _linger(self) -> None:
        """Abort the transport if it is still open an idle timeout from now (connection_lost
        cancels this)."""
        if self._linger_timer is None:
            self._linger_timer = self.context.loop.call_later(self.context.idle_timeout,
                                                              self.transport.abort)

    def _arm_idle(self) -> None:
        if self._idle_timer is None and not self.closing:
            self._idle_timer = self.context.loop.call_later(self.context.idle_timeout,
                                                            self._idle)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _disarm_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.streams and not self.closing:
            self.drain()


