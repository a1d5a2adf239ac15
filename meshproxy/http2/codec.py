"""One HTTP/2 connection's protocol state, sans I/O: bytes in, events out; calls in, bytes out.

The proxy drives HTTP/2 through this interface only. Underneath is libnghttp2 (through the
`ngh2` package): measured against the pure-Python `h2`, it costs about a 25th of the CPU per
call and keeps working through a graceful GOAWAY (docs/http2-codec.md has the comparison).
What this layer adds to it:

- the proxy's settings, advertised and enforced alike: at most `max_concurrent_streams`
  streams from the peer, `max_header_list_size` for a received header block (nghttp2
  enforces its own configured limit, not the one it advertises: both come from here),
  no server push;
- flow control as back-pressure: nothing opens a receive window by itself; the proxy
  calls `consumed(stream_id, n)` once it has passed `n` received bytes on, so a slow
  reader on the far side slows the sender here;
- the proxy's own small event types (below), so that the rest of the proxy does not import
  the library;
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
# few calls is normal), then refused when it has reset half of them or more.
RESET_FLOOD_MIN_STREAMS: Final = 100

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


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headers:
    """A header block of a stream: a request (server side), a response or an interim 1xx
    (`informational`, client side), or trailers."""

    stream_id: int
    fields: HeaderList
    end_stream: bool
    informational: bool = False
    trailers: bool = False


@dataclass(frozen=True)
class Data:
    """Body bytes of a stream; pass them on, then call `Codec.consumed`."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True)
class Reset:
    """The peer reset a stream (RST_STREAM) with `code`."""

    stream_id: int
    code: int


@dataclass(frozen=True)
class Closed:
    """A stream is closed, both ways (after its end, or a reset either way)."""

    stream_id: int
    code: int


@dataclass(frozen=True)
class GoAway:
    """The peer will process no stream above `last_stream_id`."""

    last_stream_id: int
    code: int


@dataclass(frozen=True)
class WindowOpened:
    """The peer gave credit (0: the whole connection): queued body bytes may move on."""

    stream_id: int


@dataclass(frozen=True)
class PeerSettings:
    """The peer's SETTINGS arrived; `max_concurrent_streams` None when it set no limit."""

    max_concurrent_streams: int | None = None
    values: dict[int, int] = field(default_factory=dict)


Event = Headers | Data | Reset | Closed | GoAway | WindowOpened | PeerSettings


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


class Codec:
    """One HTTP/2 connection, server side (`server=True`: it reads requests) or client
    side. Call `start()` first (it queues the preface and SETTINGS), then `receive(data)`
    for every read and write `data_to_send()` after each call that may produce bytes."""

    __slots__ = ("_conn", "settings", "server", "_last_peer_stream", "_failed", "_pending_goaway",
                 "peer_streams", "peer_resets", "_closing")

    def __init__(self, server: bool, settings: Settings = Settings()) -> None:
        self.server = server
        self.settings = settings
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
        self._closing = False  # a GOAWAY went either way: the session may end by itself

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
            values[ngh2.Setting.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        self._conn.initiate_connection(values)
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
        if self.server and self.peer_streams >= RESET_FLOOD_MIN_STREAMS \
                and self.peer_resets * 2 >= self.peer_streams:
            self._fail(ENHANCE_YOUR_CALM)
            raise ConnectionFailed(ENHANCE_YOUR_CALM, f"rapid reset: the peer reset "
                                   f"{self.peer_resets} of its {self.peer_streams} streams")
        if not self._conn.want_read and not self._closing:
            # The library ended the session by itself (a protocol error of the peer, or one
            # of its own flood limits) and queued its GOAWAY, without an event.
            self._failed = True
            raise ConnectionFailed(PROTOCOL_ERROR, "the session was ended by the codec")
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
        if kind is ngh2.RequestReceived or kind is ngh2.ResponseReceived:
            stream_id = event.stream_id  # type: ignore[attr-defined]
            if stream_id > self._last_peer_stream and kind is ngh2.RequestReceived:
                self._last_peer_stream = stream_id
                self.peer_streams += 1
            return Headers(stream_id, list(event.headers),  # type: ignore[attr-defined]
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

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer now (b"" when none)."""
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
        """Reset `stream_id` (RST_STREAM)."""
        self._conn.reset_stream(stream_id, code)

    def consumed(self, stream_id: int, amount: int) -> None:
        """`amount` received body bytes of `stream_id` have been passed on: give the peer
        that much credit again (on the stream and the connection)."""
        if amount > 0:
            self._conn.acknowledge_received_data(amount, stream_id)

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
        try:
            queued = self._conn.data_to_send()
        except ngh2.NGH2Error:
            queued = b""
        return queued + pending
