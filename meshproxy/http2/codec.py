"""One HTTP/2 connection's protocol state, sans I/O: bytes in, events out; calls in, bytes out.

The proxy drives HTTP/2 through this interface only. Underneath is libnghttp2 (through the
`ngh2` package): measured against the pure-Python `h2`, it costs about a 25th of the CPU per
call and keeps working through a graceful GOAWAY (docs/http2-codec.md has the comparison).
What this layer adds to it:

- the proxy's settings, advertised and enforced alike, each refused at the smallest scope
  that keeps the connection sound (RFC 9113 §5.4): a stream over `max_concurrent_streams`
  is refused by itself (RST_STREAM REFUSED_STREAM, §5.1.2; nghttp2 would end the whole
  connection), a request header block over `max_header_list_size` is handed on as
  `OversizedHeaders` for a 431 answer (§10.5.1), and only a peer far past either limit
  (a stream flood, an HPACK bomb) loses its connection; no server push;
- flow control as back-pressure: nothing opens a receive window by itself; the proxy
  calls `consumed(stream_id, n)` once it has passed `n` received bytes on, so a slow
  reader on the far side slows the sender here;
- the proxy's own small event types (below), so that the rest of the proxy does not import
  the library;
- the floods (docs/http2-codec.md): a client that resets or has refused half of the streams
  it opens (rapid reset, CVE-2023-44487), a header block continued without end
  (CVE-2024-27316) or decoded past the ceiling (HPACK bomb), and acknowledgements piling up
  unread (SETTINGS and PING floods, while the connection does not take `data_to_send`)
  are refused with GOAWAY(ENHANCE_YOUR_CALM);
- the end of a connection is said: a flood raises `ConnectionFailed` once the GOAWAY it
  calls for is queued (written by hand when nghttp2 will not produce one); after a protocol
  error of the peer, nghttp2 queues its GOAWAY itself and `finished` turns true once it has
  been taken with `data_to_send`.

No timers: idle, header and stall timeouts belong to the connection that owns the codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

import ngh2

from meshproxy.http1.events import HeaderList

# RFC 9113 §7 error codes the proxy sends or reads.
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB

# Rapid reset: judged once the peer has opened this many streams (a client that cancels a
# few calls is normal), then refused when it has reset half of them or more. nghttp2's own
# limit (a token bucket of resets, 33 a second) stays behind it with a burst larger than one
# read can hold (256 KiB of 26-byte HEADERS + RST_STREAM pairs), so that the rule here
# decides first and the peer reads ENHANCE_YOUR_CALM, not nghttp2's INTERNAL_ERROR.
RESET_FLOOD_MIN_STREAMS: Final = 100
RESET_BURST: Final = 16384

# Server side, a request header block over `max_header_list_size` is still decoded (the
# HPACK state must stay in step with the peer's, RFC 9113 §4.3) and answered 431, up to this
# many times the limit; past it nghttp2 stops decoding and the peer is refused as a flood.
HEADER_LIST_CEILING: Final = 4

# Server side, nghttp2 is told this many times `max_concurrent_streams`: over its own limit,
# once the peer has acknowledged it, nghttp2 ends the connection (GOAWAY PROTOCOL_ERROR).
# The peer is told the limit itself, which the codec enforces stream by stream.
STREAM_CEILING: Final = 2

# The client connection preface (RFC 9113 §3.4): how a listener tells HTTP/2 with prior
# knowledge from HTTP/1.1 on the same port.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True)
class Settings:
    """What the proxy advertises and enforces on one connection."""

    max_concurrent_streams: int = 100
    initial_window_size: int = 1 << 20  # per stream: bytes a peer may send before credit
    connection_window_size: int = 16 << 20
    max_header_list_size: int = 64 * 1024  # the HTTP/1.1 head limit, alike
    max_frame_size: int = 16384


# -- events (slotted, not frozen: made per frame, and a frozen dataclass sets each field
# through object.__setattr__) ---------------------------------------------------------


@dataclass(slots=True)
class Headers:
    """A header block of a stream: a request (server side), a response or an interim 1xx
    (`informational`, client side), or trailers."""

    stream_id: int
    fields: HeaderList
    end_stream: bool
    informational: bool = False
    trailers: bool = False


@dataclass(slots=True)
class Data:
    """Body bytes of a stream; pass them on, then call `Codec.consumed`."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class Reset:
    """The peer reset a stream (RST_STREAM) with `code`."""

    stream_id: int
    code: int


@dataclass(slots=True)
class Closed:
    """A stream is closed, both ways (after its end, or a reset either way)."""

    stream_id: int
    code: int


@dataclass(slots=True)
class GoAway:
    """The peer will process no stream above `last_stream_id`."""

    last_stream_id: int
    code: int


@dataclass(slots=True)
class WindowOpened:
    """The peer gave credit (0: the whole connection): queued body bytes may move on."""

    stream_id: int


@dataclass(slots=True)
class PeerSettings:
    """The peer's SETTINGS arrived; `max_concurrent_streams` None when it set no limit."""

    max_concurrent_streams: int | None = None
    values: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class OversizedHeaders:
    """Server side: a request whose header block is over `max_header_list_size` (decoded,
    `size` bytes as RFC 9113 §6.5.2 counts them): its stream is open, not to be served;
    answer it 431 (RFC 9113 §10.5.1, RFC 6585 §5)."""

    stream_id: int
    fields: HeaderList
    end_stream: bool
    size: int


Event = (Headers | Data | Reset | Closed | GoAway | WindowOpened | PeerSettings
         | OversizedHeaders)


class ConnectionFailed(Exception):
    """The connection cannot go on; a GOAWAY with `code` is queued (send `data_to_send()`,
    then close)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def goaway_frame(last_stream_id: int, code: int) -> bytes:
    """A GOAWAY frame (RFC 9113 §6.8), for when the library will not write one."""
    return struct.pack(">I", 8)[1:] + bytes((0x7, 0)) + struct.pack(">III", 0, last_stream_id,
                                                                   code)


def _advertise(frames: bytes, setting: int, value: int) -> bytes:
    """`frames`, whose first frame is this side's SETTINGS (RFC 9113 §6.5), with the value of
    `setting` in it replaced by `value` (what the peer is told, rather than nghttp2's)."""
    length = int.from_bytes(frames[:3], "big")
    if frames[3] != 0x4 or frames[4] & 0x1 or length % 6 or len(frames) < 9 + length:
        raise AssertionError("the codec's first bytes are not its SETTINGS")
    out = bytearray(frames)
    for at in range(9, 9 + length, 6):
        if int.from_bytes(out[at:at + 2], "big") == setting:
            out[at + 2:at + 6] = struct.pack(">I", value)
    return bytes(out)


class Codec:
    """One HTTP/2 connection, server side (`server=True`: it reads requests) or client
    side. Call `start()` first (it queues the preface and SETTINGS), then `receive(data)`
    for every read and write `data_to_send()` after each call that may produce bytes."""

    __slots__ = ("_conn", "settings", "server", "_last_peer_stream", "_failed", "_pending_goaway",
                 "peer_streams", "peer_resets", "refused", "_open", "_closing", "_held")

    def __init__(self, server: bool, settings: Settings = Settings()) -> None:
        self.server = server
        self.settings = settings
        if server:
            # Decoded up to the ceiling, refused (431) over the limit: see OversizedHeaders.
            # Every field costs at least 32 bytes (RFC 9113 §6.5.2), so the count of fields
            # never binds before the size does.
            ceiling = settings.max_header_list_size * HEADER_LIST_CEILING
            config = ngh2.Configuration(
                auto_window_update=False,
                max_inbound_header_list_size=ceiling,
                max_inbound_header_count=ceiling // 32,
                stream_reset_rate_limit=(RESET_BURST, 33),
            )
        else:
            config = ngh2.Configuration(
                auto_window_update=False,
                max_inbound_header_list_size=settings.max_header_list_size,
            )
        role = ngh2.Role.SERVER if server else ngh2.Role.CLIENT
        self._conn = ngh2.Connection(role, config)
        self._last_peer_stream = 0
        self._failed = False
        self._pending_goaway = b""  # written by hand when the library will not
        # Streams the peer opened, and those it reset itself: a client that resets most of
        # the streams it opens is the rapid-reset attack (CVE-2023-44487), whatever its pace.
        self.peer_streams = 0
        self.peer_resets = 0
        self.refused = 0  # streams over max_concurrent_streams, refused here: they count too
        self._open: set[int] = set()  # the peer's streams taken and not yet closed
        self._closing = False  # a GOAWAY went either way: the session may end by itself
        self._held = b""  # output taken from nghttp2, not yet given: SETTINGS as advertised

    def start(self) -> None:
        """Queue the connection preface (client) and this side's SETTINGS."""
        s = self.settings
        values = {
            ngh2.Setting.ENABLE_PUSH: 0,
            ngh2.Setting.INITIAL_WINDOW_SIZE: s.initial_window_size,
            ngh2.Setting.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            ngh2.Setting.MAX_FRAME_SIZE: s.max_frame_size,
        }
        if self.server:
            values[ngh2.Setting.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams * STREAM_CEILING
        self._conn.initiate_connection(values)
        if self.server:
            # The peer is told the limit (the codec refuses streams over it one by one, as
            # RFC 9113 §5.1.2 allows); nghttp2 keeps the ceiling.
            self._held = _advertise(self._conn.data_to_send(),
                                    ngh2.Setting.MAX_CONCURRENT_STREAMS, s.max_concurrent_streams)
        if s.connection_window_size > 65535:  # the connection window every peer starts with
            self._conn.set_local_window_size(s.connection_window_size)

    # -- bytes in, events out -------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the peer; return what they complete. Raises ConnectionFailed
        (a GOAWAY is then queued)."""
        if self._failed:
            return []
        try:
            self._conn.receive_data(data)
            raw = self._conn.events()
        except ngh2.ConnectionStateError:
            # The session is over (`finished`: a GOAWAY went either way and its last stream
            # is done, or the library's GOAWAY after a protocol error has been taken): the
            # library reads nothing more, and nothing the peer still sends is answered.
            return []
        except ngh2.DenialOfServiceError as exc:
            # nghttp2 has torn the session down: it writes nothing more, so the GOAWAY is ours.
            self._failed = True
            self._pending_goaway = goaway_frame(self._last_peer_stream, ENHANCE_YOUR_CALM)
            raise ConnectionFailed(ENHANCE_YOUR_CALM, f"flood refused: {exc}") from None
        except ngh2.ProtocolError as exc:
            self._failed = True
            raise ConnectionFailed(PROTOCOL_ERROR, f"protocol error: {exc}") from None
        events: list[Event] = []
        for event in raw:
            translated = self._translate(event)
            if translated is not None:
                events.append(translated)
        if not self._conn.want_read and not self._closing:
            # The library ended the session by itself (a protocol error of the peer, or one
            # of its own flood limits) and queued its GOAWAY, without an event.
            self._failed = True
            raise ConnectionFailed(PROTOCOL_ERROR, "the session was ended by the codec")
        if self.server and self.peer_streams >= RESET_FLOOD_MIN_STREAMS \
                and (self.peer_resets + self.refused) * 2 >= self.peer_streams:
            # nghttp2 may have ended the session in this read (a peer far over the stream
            # ceiling: its GOAWAY PROTOCOL_ERROR is queued): then that is what the peer gets.
            self._held += self._conn.data_to_send()
            if not self._conn.want_read:
                self._failed = True
                raise ConnectionFailed(PROTOCOL_ERROR, "the session was ended by the codec")
            self._fail(ENHANCE_YOUR_CALM)
            raise ConnectionFailed(ENHANCE_YOUR_CALM, f"rapid reset: of its "
                                   f"{self.peer_streams} streams the peer reset "
                                   f"{self.peer_resets}, {self.refused} were refused")
        return events

    @property
    def finished(self) -> bool:
        """True once the session will neither read nor write any more (a GOAWAY went out
        and its streams are done, or the library ended it after a protocol error of the
        peer, whose GOAWAY `data_to_send` has given): close the transport."""
        return self._failed or not (self._conn.want_read or self._conn.want_write)

    def _translate(self, event: object) -> Event | None:
        kind = type(event)
        if kind is ngh2.DataReceived:
            return Data(event.stream_id, event.data, event.end_stream)  # type: ignore[attr-defined]
        if kind is ngh2.RequestReceived:
            return self._request(event.stream_id, event.headers,  # type: ignore[attr-defined]
                                 event.end_stream)  # type: ignore[attr-defined]
        if kind is ngh2.ResponseReceived:
            return Headers(event.stream_id, list(event.headers),  # type: ignore[attr-defined]
                           event.end_stream)  # type: ignore[attr-defined]
        if kind is ngh2.InformationalResponseReceived:
            return Headers(event.stream_id, list(event.headers),  # type: ignore[attr-defined]
                           False, informational=True)
        if kind is ngh2.TrailersReceived:
            return Headers(event.stream_id, list(event.headers),  # type: ignore[attr-defined]
                           True, trailers=True)
        if kind is ngh2.StreamReset:
            self.peer_resets += 1
            return Reset(event.stream_id, event.error_code)  # type: ignore[attr-defined]
        if kind is ngh2.StreamClosed:
            self._open.discard(event.stream_id)  # type: ignore[attr-defined]
            return Closed(event.stream_id, event.error_code)  # type: ignore[attr-defined]
        if kind is ngh2.GoAwayReceived:
            self._closing = True
            return GoAway(event.last_stream_id, event.error_code)  # type: ignore[attr-defined]
        if kind is ngh2.WindowUpdated:
            return WindowOpened(event.stream_id)  # type: ignore[attr-defined]
        if kind is ngh2.SettingsReceived:
            values = dict(event.settings)  # type: ignore[attr-defined]
            return PeerSettings(values.get(int(ngh2.Setting.MAX_CONCURRENT_STREAMS)), values)
        return None  # pings, acknowledgements, priorities: answered by the library

    def _request(self, stream_id: int, headers: tuple, end_stream: bool) -> Event | None:
        """A request's header block opened `stream_id`: taken, refused, or too large."""
        if stream_id > self._last_peer_stream:
            self._last_peer_stream = stream_id
        self.peer_streams += 1
        open_streams = self._open
        if len(open_streams) >= self.settings.max_concurrent_streams:
            # RFC 9113 §5.1.2: a stream error; REFUSED_STREAM says it was not processed, so
            # the client may send it again (§8.7). Nothing of it reaches the proxy.
            self.refused += 1
            self._conn.reset_stream(stream_id, REFUSED_STREAM)
            return None
        open_streams.add(stream_id)
        fields = list(headers)
        size = 32 * len(fields)  # RFC 9113 §6.5.2: name, value and 32 bytes per field
        for name, value in fields:
            size += len(name) + len(value)
        if size > self.settings.max_header_list_size:
            return OversizedHeaders(stream_id, fields, end_stream, size)
        return Headers(stream_id, fields, end_stream)

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer now (b"" when none)."""
        if self._held:
            held, self._held = self._held, b""
            return held + self._conn.data_to_send()
        return self._conn.data_to_send()

    # -- calls in, bytes out ----------------------------------------------------------------

    def open_stream(self, fields: HeaderList, end_stream: bool = False) -> int:
        """Client side: send a request's header block on a new stream; return its id."""
        return self._conn.send_request(fields, end_stream=end_stream)

    def send_headers(self, stream_id: int, fields: HeaderList, end_stream: bool = False) -> None:
        """Server side: send a response's header block on `stream_id`."""
        self._conn.send_response(stream_id, fields, end_stream=end_stream)

    def send_informational(self, stream_id: int, fields: HeaderList) -> None:
        """Server side: send an interim 1xx response (e.g. 103 Early Hints)."""
        self._conn.send_informational_response(stream_id, fields)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes; what the peer's window does not admit yet stays queued in the
        codec (`queued`) until a WindowOpened."""
        self._conn.send_data(stream_id, data, end_stream=end_stream)

    def send_trailers(self, stream_id: int, fields: HeaderList) -> None:
        """Send trailers, which end the stream."""
        self._conn.send_trailers(stream_id, fields)

    def end_stream(self, stream_id: int) -> None:
        """End this side of `stream_id` without trailers (an empty DATA with END_STREAM)."""
        self._conn.end_stream(stream_id)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """Reset `stream_id` (RST_STREAM). Nothing once the session is ending (its last
        stream done after a GOAWAY): the library then takes no frame, and none is needed."""
        try:
            self._conn.reset_stream(stream_id, code)
        except ngh2.ConnectionStateError:
            pass

    def consumed(self, stream_id: int, amount: int) -> None:
        """`amount` received body bytes of `stream_id` have been passed on: give the peer
        that much credit again (on the stream and the connection). Nothing once the session
        is ending (see `reset`)."""
        if amount > 0:
            try:
                self._conn.acknowledge_received_data(amount, stream_id)
            except ngh2.ConnectionStateError:
                pass

    def queued(self, stream_id: int) -> int:
        """Body bytes of `stream_id` waiting for the peer's window."""
        return self._conn.queued_body_size(stream_id)

    def goaway(self, code: int = NO_ERROR) -> None:
        """Tell the peer no stream above the last one it opened will be processed (drain)."""
        self._closing = True
        self._conn.send_goaway(code, last_stream_id=self._last_peer_stream)

    @property
    def last_peer_stream(self) -> int:
        """The highest stream id the peer has opened."""
        return self._last_peer_stream

    def _fail(self, code: int) -> None:
        """Queue a GOAWAY with `code` and stop: the library's own when it will still write
        one, else one written here."""
        self._failed = True
        try:
            self._conn.send_goaway(code, last_stream_id=self._last_peer_stream)
        except ngh2.NGH2Error:
            self._pending_goaway = goaway_frame(self._last_peer_stream, code)

    def failure_bytes(self) -> bytes:
        """After ConnectionFailed: the GOAWAY to write before closing."""
        pending, self._pending_goaway = self._pending_goaway, b""
        held, self._held = self._held, b""
        try:
            queued = self._conn.data_to_send()
        except ngh2.NGH2Error:
            queued = b""
        return held + queued + pending
