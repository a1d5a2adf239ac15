"""What coverage-guided fuzzing found in the HTTP/2 codec (fuzz/targets/http2_*.py), with the
inputs it found."""

from __future__ import annotations

from meshproxy.http2.codec import PREFACE, Codec

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"backend")]
PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"


# Once a session is over (`finished`), nghttp2 refuses to read and `receive` let its
# ConnectionStateError out, which is not the ConnectionFailed it promises. A connection
# closes once its codec is finished, so the proxy itself never fed one; bytes that still
# come are now read by nobody, as `reset` and `consumed` already do nothing then.

def test_bytes_after_a_protocol_error_has_been_answered_are_dropped() -> None:
    server = Codec(server=True)
    server.start()
    # The fuzzer's input (a seed of the corpus): DATA on stream 0 (RFC 9113 §6.1).
    server.receive(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    server.data_to_send()  # the library's GOAWAY(PROTOCOL_ERROR)
    assert server.finished
    assert server.receive(PING) == []


def test_bytes_after_a_drained_session_has_ended_are_dropped() -> None:
    server = Codec(server=True)
    server.start()
    server.receive(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    server.goaway()
    server.data_to_send()
    assert server.finished
    assert server.receive(PING) == []


def test_the_fuzzers_input_on_the_client_side() -> None:
    # A SETTINGS frame on stream 8, a protocol error, cut into reads as the target cut it.
    client = Codec(server=False)
    client.start()
    client.open_stream(GET, end_stream=True)
    client.data_to_send()
    for piece in (b"\x00\x01", b"\xb9\x04", b"\x00\x00\x08\x00\x00", b"*\x00"):
        assert client.receive(piece) == []
        client.data_to_send()
    assert client.finished
