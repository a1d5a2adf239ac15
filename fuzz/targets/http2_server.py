"""Fuzz target: a client's bytes into the HTTP/2 codec, server side (meshproxy/http2/codec.py),
driven as the proxy's downstream drives it: requests are answered once they end, a request
over the header limit gets 431 at once, received body bytes are credited back, and what the
codec has to send is taken after every read.

Small limits (4 streams, a 1 KiB header list) put the refusals within the fuzzer's reach.

Invariants, whatever the bytes:
- `receive` returns the codec's own events or raises ConnectionFailed (then a GOAWAY is
  ready in `failure_bytes()` and later reads give nothing), nothing else;
- a request's header block is on a client stream (odd id) and within the limit; one over it
  comes as OversizedHeaders; no more streams are handed over than the limit allows at once;
- a stream the codec handed over and has not closed can be answered without an error;
- what the codec writes stays within a small multiple of what it read (no amplification).
"""

from __future__ import annotations

from fuzz.targets._support import pieces
from meshproxy.http2.codec import (
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    Closed,
    Codec,
    ConnectionFailed,
    Data,
    GoAway,
    Headers,
    OversizedHeaders,
    PeerSettings,
    Reset,
    Settings,
    WindowOpened,
)

SETTINGS = Settings(max_concurrent_streams=4, max_header_list_size=1024, initial_window_size=65535)
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]
TOO_LARGE = [(b":status", b"431")]
# Bytes written per byte read, past the preface and SETTINGS: acknowledgements, credit and
# the answers are each about the size of the frame that asked for them.
AMPLIFICATION = 8
OVERHEAD = 4096


def check_fields(fields: list) -> int:
    """Return the header list's size as RFC 9113 §6.5.2 counts it."""
    size = 0
    for field in fields:
        name, value = field
        assert isinstance(name, bytes) and isinstance(value, bytes), field
        size += len(name) + len(value) + 32
    return size


def TestOneInput(data: bytes) -> None:
    codec = Codec(server=True, settings=SETTINGS)
    codec.start()
    written = len(codec.data_to_send())
    open_streams: set[int] = set()
    ended: set[int] = set()  # open streams whose request has ended: to answer
    answered: set[int] = set()  # each stream is answered once, as the proxy does
    for chunk in pieces(data):
        try:
            events = codec.receive(chunk)
        except ConnectionFailed as failed:
            assert failed.code in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM), failed.code
            assert isinstance(codec.failure_bytes(), bytes)
            assert codec.receive(b"\x00" * 9) == [], "a failed codec still reads"
            assert codec.finished
            return
        for event in events:
            kind = type(event)
            if kind is Headers:
                assert event.stream_id % 2 == 1, event.stream_id
                assert not event.informational
                size = check_fields(event.fields)
                if event.trailers:
                    if event.stream_id in open_streams:
                        ended.add(event.stream_id)
                    continue
                assert size <= SETTINGS.max_header_list_size, size
                assert event.stream_id not in open_streams, "a stream opened twice"
                open_streams.add(event.stream_id)
                assert len(open_streams) <= SETTINGS.max_concurrent_streams, len(open_streams)
                if event.end_stream:
                    ended.add(event.stream_id)
            elif kind is OversizedHeaders:
                assert event.stream_id % 2 == 1 and event.stream_id not in open_streams
                assert event.size == check_fields(event.fields) > SETTINGS.max_header_list_size
                open_streams.add(event.stream_id)
                assert len(open_streams) <= SETTINGS.max_concurrent_streams, len(open_streams)
                codec.send_headers(event.stream_id, TOO_LARGE, end_stream=True)
                answered.add(event.stream_id)
            elif kind is Data:
                assert event.stream_id > 0 and isinstance(event.data, bytes)
                codec.consumed(event.stream_id, len(event.data))
                if event.end_stream and event.stream_id in open_streams:
                    ended.add(event.stream_id)
            elif kind is Reset or kind is Closed:
                open_streams.discard(event.stream_id)
                ended.discard(event.stream_id)
            else:
                assert kind in (GoAway, WindowOpened, PeerSettings), event
        for stream_id in sorted(ended - answered):
            answered.add(stream_id)
            codec.send_headers(stream_id, RESPONSE)
            codec.send_data(stream_id, b"ok", end_stream=True)
        ended.clear()
        written += len(codec.data_to_send())
        assert written <= AMPLIFICATION * len(data) + OVERHEAD, f"{written} bytes written for {len(data)} read"
    if not codec.finished:  # a finished session's connection is closed: nothing to drain
        codec.goaway()
        codec.data_to_send()
