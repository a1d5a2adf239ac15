"""One HTTP/2 request stream as its exchange sees it: the `ClientConnection` of one stream.

An `Http2Downstream` (dataplane/h2downstream.py) makes one `Http2Stream` per request stream
and an `Exchange` (dataplane/exchange.py) for it; the exchange hands the response over as it
does to an HTTP/1.1 client connection (`send_head`, `send_body`, `send_trailers`,
`send_end`, `write_error`), and the stream turns it into HTTP/2 frames through its
connection's codec. Pausing a stream withholds the flow-control credit of what it received;
a response that breaks off after its head ends the stream with RST_STREAM.

The stream holds its connection as a `StreamOwner` (below), so that this module imports
nothing of the connection that drives it.
"""

from __future__ import annotations

import asyncio

from meshproxy.dataplane.client import ClientConnection
from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.exchange import Exchange
from meshproxy.dataplane.upstream import UpstreamConnection
from meshproxy.http1.errors import ProxyError
from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead
from meshproxy.http2 import grpc
from meshproxy.http2.codec import INTERNAL_ERROR, NO_ERROR, Codec
from meshproxy.http2.fields import response_fields, trailer_fields

# Response bytes queued for one stream beyond the client's window before its upstream is no
# longer read (the codec would queue without bound). Not smaller: a client grants credit in
# steps of its own (grpcio: 2 MiB at a time, once it has seen enough arrive), and a proxy
# that holds back more than a step's worth stalls the stream until the client's timer
# (measured: 256 KiB gave 34 MB/s where 1 MiB gives 650 MB/s, Envoy's buffer limit too).
QUEUED_LIMIT = 1024 * 1024
# A request body still to come after an early answer is reset past this size (else let in
# and dropped).
UNWANTED_BODY_LIMIT = 64 * 1024


class StreamOwner:
    """What a stream uses of its connection (abstract; `Http2Downstream` implements it)."""

    # Set by the connection when it is made, before any stream exists.
    transport: asyncio.Transport

    __slots__ = ("context", "transport", "codec", "tls", "peer_id", "original", "closing")

    def __init__(self, context: ListenerContext, transport: asyncio.Transport, codec: Codec, *,
                 tls: bool, peer_id: str | None, original: tuple[str, int] | None) -> None:
        self.context = context
        self.transport = transport
        self.codec = codec
        self.tls = tls
        self.peer_id = peer_id
        self.original = original
        self.closing = False

    def flush(self) -> None:
        """Write what the codec has queued, at the end of this turn of the loop."""
        raise NotImplementedError  # abstract: implemented by Http2Downstream

    def flush_now(self) -> None:
        """Write what the codec has queued, now."""
        raise NotImplementedError  # abstract: implemented by Http2Downstream

    def stream_done(self, stream: "Http2Stream") -> None:
        """A stream's exchange ended (its response is complete, or it was reset)."""
        raise NotImplementedError  # abstract: implemented by Http2Downstream

    def watch_stall(self, since: float) -> None:
        """A stream's upstream was paused at `since` (the client is behind)."""
        raise NotImplementedError  # abstract: implemented by Http2Downstream


class Http2Stream(ClientConnection):
    """One request stream: the `ClientConnection` its exchange answers through."""

    __slots__ = ("conn", "stream_id", "exchange", "grpc", "withheld", "trailers_sent",
                 "request_ended", "upstream_paused", "done", "head_fields", "body_unbounded",
                 "held_answer", "held_timer",
                 "sent", "stalled_since", "stall_mark")

    def __init__(self, conn: StreamOwner, stream_id: int) -> None:
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
