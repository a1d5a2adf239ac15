"""The client side of the proxy over HTTP/2: one connection, many streams, each an exchange.

A client connection starts as a `DownstreamConnection` (dataplane/downstream.py); when its
first bytes are the HTTP/2 connection preface (prior knowledge, or `h2` chosen by ALPN over
mTLS between sidecars), it hands the connection to an `Http2Downstream`, which owns the
server-side codec (http2/codec.py). Each request stream becomes an `Http2Stream`, the
`ClientConnection` its `Exchange` (dataplane/exchange.py) answers through, so a stream is
routed, balanced, retried, timed, authorized, counted and traced like an HTTP/1.1 request.

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

from meshproxy.dataplane.client import ClientConnection
from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.exchange import Exchange
from meshproxy.dataplane.upstream import UpstreamConnection
from meshproxy.http1.errors import BadRequest, HeadersTooLarge, ProxyError
from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead
from meshproxy.http2 import grpc
from meshproxy.http2.codec import (
    CANCEL,
    INTERNAL_ERROR,
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
from meshproxy.http2.fields import request_head, response_fields, trailer_fields
from meshproxy.observability.record import RequestRecord

# Response bytes queued for one stream beyond the client's window before its upstream is no
# longer read (the codec would queue without bound). Not smaller: a client grants credit in
# steps of its own (grpcio: 2 MiB at a time, once it has seen enough arrive), and a proxy
# that holds back more than a step's worth stalls the stream until the client's timer
# (measured: 256 KiB gave 34 MB/s where 1 MiB gives 650 MB/s, Envoy's buffer limit too).
QUEUED_LIMIT = 1024 * 1024
# A request body still to come after an early answer is reset past this size (else let in
# and dropped).
UNWANTED_BODY_LIMIT = 64 * 1024


class Http2Stream(ClientConnection):
    """One request stream: the `ClientConnection` its exchange answers through."""

    __slots__ = ("conn", "stream_id", "exchange", "grpc", "withheld", "trailers_sent",
                 "request_ended", "upstream_paused", "done", "head_fields", "body_unbounded",
                 "held_answer", "held_timer",
                 "sent", "stalled_since", "stall_mark")

    def __init__(self, conn: "Http2Downstream", stream_id: int) -> None:
        super().__init__(conn.context, conn.original)
        self.conn = conn
        self.stream_id = stream_id
        self.transport = conn.transport
        self.tls = conn.tls
        self.peer_id = conn.peer_id
        self.exchange: Exchange | None = None
        self.grpc = False  # a gRPC call: the proxy's errors are trailers-only responses
        self.withheld = 0  # received body bytes whose credit waits for the stream to resume
        self.trailers_sent = False
        self.request_ended = False
        self.upstream_paused = False  # its upstream is not read: the client is behind
        self.done = False  # the response is complete (or the stream reset)
        # The response head, held until what follows it in the same upstream read is known:
        # a head that ends the response (gRPC's trailers-only answer) must go as one HEADERS
        # frame with END_STREAM, not HEADERS and an empty DATA.
        self.head_fields: HeaderList | None = None
        self.body_unbounded = True  # the request body's length is unknown or over a window
        # The proxy's answer, waiting for the rest of a small request body (_answer).
        self.held_answer: tuple[HeaderList, bytes] | None = None
        self.held_timer: asyncio.TimerHandle | None = None
        # Stall watch: response bytes handed to the codec, when the upstream was last paused
        # or seen to move (0.0: not paused), and how many had gone out to the client then.
        self.sent = 0
        self.stalled_since = 0.0
        self.stall_mark = 0

    # -- the response, as the exchange hands it over ------------------------------------------

    def send_informational(self, head: ResponseHead) -> None:
        self.conn.codec.send_informational(self.stream_id, response_fields(head))

    def send_head(self, request: RequestHead, head: ResponseHead, keep_alive: bool) -> bool:
        self.head_fields = response_fields(head)
        return True

    def _send_held_head(self, end_stream: bool = False) -> None:
        fields = self.head_fields
        if fields is not None:
            self.head_fields = None
            self.conn.codec.send_headers(self.stream_id, fields, end_stream=end_stream)

    def send_body(self, data: bytes) -> None:
        if not data:
            return
        self._send_held_head()
        codec = self.conn.codec
        codec.send_data(self.stream_id, data)
        self.sent += len(data)
        if not self.upstream_paused and codec.queued(self.stream_id) > QUEUED_LIMIT:
            self.pause_upstream()

    def send_trailers(self, fields: HeaderList) -> None:
        self.trailers_sent = True
        self._send_held_head()
        self.conn.codec.send_trailers(self.stream_id, trailer_fields(fields))

    def send_end(self) -> None:
        if self.head_fields is not None:
            self._send_held_head(end_stream=True)
        elif not self.trailers_sent:
            self.conn.codec.end_stream(self.stream_id)
        self.conn.flush()

    def send_switch(self, head: ResponseHead, rest: bytes) -> None:
        # Unreachable: an HTTP/2 request cannot ask for Upgrade (fields.request_head).
        self.exchange_aborted(None)

    def flush(self) -> None:
        self._send_held_head()
        self.conn.flush()

    def write(self, data: bytes) -> None:
        raise AssertionError("HTTP/1.1 bytes on an HTTP/2 stream")

    def send_redirect(self, status: int, location: str, *, keep_alive: bool) -> None:
        fields: HeaderList = [(b":status", b"%d" % status),
                              (b"location", location.encode("latin-1"))]
        self._answer(fields, b"")

    def write_error(self, error: ProxyError, *, keep_alive: bool) -> None:
        """The proxy's own answer for `error`: a trailers-only response for gRPC (spec §9),
        else the spec §4 response as on HTTP/1.1."""
        if self.grpc:
            self._answer(grpc.error_fields(error), b"")
        else:
            fields, body = grpc.http_error(error)
            self._answer(fields, body)

    def _answer(self, fields: HeaderList, body: bytes) -> None:
        """Send an answer the proxy makes. Made before the request's small body has come
        (an error found from its head), it waits for the request's end, bounded by the
        header timeout: some clients (Debian 12's curl) stall, or fail, when a complete
        response comes before they have sent their whole body (curl/curl#22984)."""
        if not self.request_ended and not self.body_unbounded:
            self.held_answer = (fields, body)
            return
        self._send_answer(fields, body)

    def _send_answer(self, fields: HeaderList, body: bytes) -> None:
        codec = self.conn.codec
        if body:
            codec.send_headers(self.stream_id, fields)
            codec.send_data(self.stream_id, body, end_stream=True)
        else:
            codec.send_headers(self.stream_id, fields, end_stream=True)
        self.conn.flush()

    def release_held_answer(self) -> None:
        """The request ended (or the wait is over): send the held answer; the stream ends."""
        held, self.held_answer = self.held_answer, None
        if self.held_timer is not None:
            self.held_timer.cancel()
            self.held_timer = None
        if held is not None and not self.conn.closing:
            self._send_answer(held[0], held[1])
            self.conn.stream_done(self)

    def closing_after_response(self) -> bool:
        return False

    # -- back-pressure ---------------------------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        # The client is not read as such: its credit is withheld (data_received).
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.withheld:
            withheld, self.withheld = self.withheld, 0
            if not self.done:
                self.conn.codec.consumed(self.stream_id, withheld)
                self.conn.flush()

    def pause_upstream(self) -> None:
        """The client is behind on this stream's response: stop reading its upstream (and
        watch that it takes some of it within the idle timeout)."""
        self.upstream_paused = True
        self.writing_paused = True
        if not self.stalled_since:
            self.stalled_since = self.conn.context.loop.time()
            self.stall_mark = self.sent - self.conn.codec.queued(self.stream_id)
            self.conn.watch_stall(self.stalled_since)
        exchange = self.exchange
        upstream = exchange.upstream_connection() if exchange is not None else None
        if upstream is not None:
            upstream.pause_reading()

    def resume_upstream(self) -> None:
        self.upstream_paused = False
        self.writing_paused = False
        self.stalled_since = 0.0
        exchange = self.exchange
        upstream = exchange.upstream_connection() if exchange is not None else None
        if upstream is not None:
            upstream.resume_reading()

    # -- what the exchange tells its stream ------------------------------------------------

    def exchange_done(self, exchange: object) -> None:
        self.done = True
        self.exchange = None
        conn = self.conn
        if self.held_answer is not None:
            # The answer waits for the request's end (_answer); the stream stays open.
            self.held_timer = self.context.loop.call_later(self.context.header_timeout,
                                                           self.release_held_answer)
            return
        if not self.request_ended and self.body_unbounded:
            # Answered before the request's end (an error, 413) while a body of unknown or
            # large size is still coming: it is not wanted (RFC 9113 §8.1: RST_STREAM with
            # NO_ERROR after a complete response). A small body of known length is let in
            # and dropped instead: some clients (curl) take a reset before they have sent
            # everything as a failure, even after the whole response.
            conn.flush_now()  # the response first: queued together, the reset would overtake it
            conn.codec.reset(self.stream_id, NO_ERROR)
        conn.stream_done(self)

    def exchange_aborted(self, exchange: object) -> None:
        """The response broke off after its head: the stream ends with RST_STREAM."""
        self.done = True
        self.exchange = None
        conn = self.conn
        conn.codec.reset(self.stream_id, INTERNAL_ERROR)
        conn.stream_done(self)

    def start_tunnel(self, upstream: UpstreamConnection, pending: list) -> None:
        upstream.abort()
        self.exchange_aborted(None)


class Http2Downstream:
    """One client connection speaking HTTP/2, server side. Not an asyncio protocol itself:
    the `DownstreamConnection` that found the preface stays the transport's protocol and
    passes every call on."""

    __slots__ = ("context", "transport", "codec", "streams", "tls", "peer_id", "original",
                 "closing", "writing_paused", "draining", "_idle_timer", "_stall_timer",
                 "_linger_timer", "flush_pending")

    def __init__(self, context: ListenerContext, transport: asyncio.Transport, *, tls: bool,
                 peer_id: str | None, original: tuple[str, int] | None,
                 settings: Settings) -> None:
        self.context = context
        self.transport = transport
        self.tls = tls
        self.peer_id = peer_id
        self.original = original
        self.codec = Codec(server=True, settings=settings)
        self.streams: dict[int, Http2Stream] = {}
        self.closing = False
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


