"""Fuzz target: an upstream's bytes into the HTTP/2 codec, client side
(meshproxy/http2/codec.py), with two calls in flight as the proxy's upstream connection has
them: a GET that has ended and a POST whose body is still being sent. Received body bytes
are credited back and what the codec has to send is taken after every read.

Invariants, whatever the bytes:
- `receive` returns the codec's own events or raises ConnectionFailed (then a GOAWAY is
  ready in `failure_bytes()` and later reads give nothing), nothing else;
- header blocks and body bytes come only on the streams this side opened (no server push);
- the rest of a request body can still be sent, or the stream reset, on a stream the peer
  has not closed;
- what the codec writes stays within a small multiple of what it read (no amplification).
"""

from __future__ import annotations

from fuzz.targets._support import pieces
from meshproxy.http2.codec import (
    CANCEL,
    PROTOCOL_ERROR,
    Closed,
    Codec,
    ConnectionFailed,
    Data,
    GoAway,
    Headers,
    PeerSettings,
    Reset,
    WindowOpened,
)

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"backend")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/pkg.Svc/Call"),
        (b":authority", b"backend"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
AMPLIFICATION = 8  # as on the server side (fuzz/targets/http2_server.py)
OVERHEAD = 4096


def TestOneInput(data: bytes) -> None:
    codec = Codec(server=False)
    codec.start()
    get = codec.open_stream(GET, end_stream=True)
    post = codec.open_stream(POST)
    codec.send_data(post, b"\x00\x00\x00\x00\x05hello")
    ours = {get, post}
    live = set(ours)  # streams the peer has not closed or reset
    written = len(codec.data_to_send())
    for turn, chunk in enumerate(pieces(data)):
        try:
            events = codec.receive(chunk)
        except ConnectionFailed as failed:
            assert failed.code == PROTOCOL_ERROR, failed.code
            assert isinstance(codec.failure_bytes(), bytes)
            assert codec.receive(b"\x00" * 9) == [], "a failed codec still reads"
            assert codec.finished
            return
        for event in events:
            kind = type(event)
            if kind is Headers:
                assert event.stream_id in ours, f"a header block on stream {event.stream_id}"
                for field in event.fields:
                    assert isinstance(field[0], bytes) and isinstance(field[1], bytes), field
            elif kind is Data:
                assert event.stream_id in ours, f"body bytes on stream {event.stream_id}"
                codec.consumed(event.stream_id, len(event.data))
            elif kind is Reset or kind is Closed:
                assert event.stream_id in ours, f"stream {event.stream_id} closed, never opened"
                live.discard(event.stream_id)
            else:
                assert kind in (GoAway, WindowOpened, PeerSettings), event
        if post in live:
            if turn == 0:
                codec.send_data(post, b"\x00\x00\x00\x00\x05world", end_stream=True)
            elif turn == 1:
                codec.reset(post, CANCEL)
        written += len(codec.data_to_send())
        assert written <= AMPLIFICATION * len(data) + OVERHEAD, f"{written} bytes written for {len(data)} read"
    codec.finished  # noqa: B018 - the connection reads it after every turn
