"""The HTTP/2 codec, in memory: a client codec and a server codec passing bytes to each other,
and a hand-built attacker for the floods the proxy must refuse (RFC 9113; CVE-2023-44487)."""

from __future__ import annotations

import struct

import pytest

from meshproxy.http2.codec import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    PREFACE,
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

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/pkg.Svc/Call"),
           (b":authority", b"backend"), (b"content-type", b"application/grpc"),
           (b"te", b"trailers")]


def pair(settings: Settings = Settings()) -> tuple[Codec, Codec]:
    client, server = Codec(server=False), Codec(server=True, settings=settings)
    client.start()
    server.start()
    return client, server


def pump(a: Codec, b: Codec) -> tuple[list, list]:
    """Pass bytes both ways until both are quiet; return (events at a, events at b)."""
    got_a: list = []
    got_b: list = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_b and not to_a:
            return got_a, got_b
        if to_b:
            got_b += b.receive(to_b)
        if to_a:
            got_a += a.receive(to_a)


def only(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def test_a_call_with_body_and_trailers_goes_both_ways() -> None:
    client, server = pair()
    stream = client.open_stream(REQUEST)
    client.send_data(stream, b"request", end_stream=True)
    at_client, at_server = pump(client, server)
    [request] = only(at_server, Headers)
    assert request.fields == REQUEST and not request.end_stream
    assert [(d.data, d.end_stream) for d in only(at_server, Data)] == [(b"request", True)]
    assert only(at_client, PeerSettings)[0].max_concurrent_streams == 100

    server.send_headers(stream, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(stream, b"response")
    server.send_trailers(stream, [(b"grpc-status", b"0")])
    at_client, _ = pump(client, server)
    heads = only(at_client, Headers)
    assert [(h.fields[0], h.trailers, h.end_stream) for h in heads] == [
        ((b":status", b"200"), False, False), ((b"grpc-status", b"0"), True, True)]
    assert [d.data for d in only(at_client, Data)] == [b"response"]
    assert [c.stream_id for c in only(at_client, Closed)] == [stream]


def test_received_bytes_are_credited_only_once_passed_on() -> None:
    """Back-pressure: a server that does not pass a stream's bytes on stops its sender at the
    stream window; crediting them lets the rest move."""
    client, server = pair(Settings(initial_window_size=65535))
    stream = client.open_stream(REQUEST)
    client.send_data(stream, b"x" * 200_000, end_stream=True)
    _, at_server = pump(client, server)
    received = sum(len(d.data) for d in only(at_server, Data))
    assert received == 65535
    assert client.queued(stream) == 200_000 - 65535
    server.consumed(stream, received)
    at_client, at_server = pump(client, server)
    assert only(at_client, WindowOpened)
    assert sum(len(d.data) for d in only(at_server, Data)) == 65535
    assert client.queued(stream) == 200_000 - 2 * 65535


def test_a_reset_reaches_the_other_side() -> None:
    client, server = pair()
    stream = client.open_stream(REQUEST)
    pump(client, server)
    client.reset(stream, CANCEL)
    _, at_server = pump(client, server)
    assert [(r.stream_id, r.code) for r in only(at_server, Reset)] == [(stream, CANCEL)]


def test_goaway_names_the_last_stream_the_peer_opened() -> None:
    client, server = pair()
    first = client.open_stream(REQUEST, end_stream=True)
    second = client.open_stream(REQUEST, end_stream=True)
    pump(client, server)
    server.goaway()
    at_client, _ = pump(client, server)
    assert [(g.last_stream_id, g.code) for g in only(at_client, GoAway)] == [(second, 0)]
    assert first < second == server.last_peer_stream
    # The streams already open are still answered after the GOAWAY (a graceful drain).
    server.send_headers(first, [(b":status", b"204")], end_stream=True)
    at_client, _ = pump(client, server)
    assert [h.fields for h in only(at_client, Headers)] == [[(b":status", b"204")]]


# -- a hand-built attacker ----------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def hpack_int(value: int, prefix: int) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((value,))
    out = [limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal field without indexing, new name, no Huffman coding."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def request_block(*extra: tuple[bytes, bytes]) -> bytes:
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
              (b":authority", b"a"), *extra]
    return b"".join(literal(n, v) for n, v in fields)


def attacker() -> Codec:
    server = Codec(server=True)
    server.start()
    server.receive(PREFACE + frame(0x4, 0, 0))  # the preface and empty SETTINGS
    server.data_to_send()
    return server


def test_rapid_reset_is_refused_with_enhance_your_calm() -> None:
    """CVE-2023-44487: streams opened and reset at once, thousands of times."""
    server = attacker()
    flood = b"".join(frame(0x1, 0x5, sid, request_block()) + frame(0x3, 0, sid, struct.pack(">I", CANCEL))
                     for sid in range(1, 2 * 5000, 2))
    with pytest.raises(ConnectionFailed) as failed:
        server.receive(flood)
    assert failed.value.code == ENHANCE_YOUR_CALM
    goaway = server.failure_bytes()
    assert goaway[3] == 0x7 and struct.unpack(">I", goaway[-4:])[0] == ENHANCE_YOUR_CALM


def test_an_endless_continuation_is_refused() -> None:
    """CVE-2024-27316: a header block that never ends must not grow without bound."""
    server = attacker()
    data = frame(0x1, 0x0, 1, request_block())  # HEADERS without END_HEADERS
    data += b"".join(frame(0x9, 0x0, 1, literal(b"x-pad", b"y" * 100)) for _ in range(2000))
    with pytest.raises(ConnectionFailed):
        server.receive(data)


def test_a_header_list_over_the_limit_never_reaches_the_proxy() -> None:
    server = Codec(server=True, settings=Settings(max_header_list_size=8192))
    server.start()
    server.receive(PREFACE + frame(0x4, 0, 0))
    big = request_block((b"x-big", b"v" * 20_000))
    try:
        events = server.receive(frame(0x1, 0x5, 1, big[:16000]) if len(big) <= 16000 else
                                frame(0x1, 0x4, 1, big[:16000]) + frame(0x9, 0x4, 1, big[16000:]))
    except ConnectionFailed:
        return  # refusing the whole connection is a right answer too
    assert not only(events, Headers)


def test_a_drained_connection_finishes_its_streams_then_ends_quietly() -> None:
    client, server = pair()
    stream = client.open_stream(REQUEST, end_stream=True)
    pump(client, server)
    server.goaway()
    server.send_headers(stream, [(b":status", b"200")], end_stream=True)
    at_client, at_server = pump(client, server)  # no ConnectionFailed on either side
    assert [h.fields for h in only(at_client, Headers)] == [[(b":status", b"200")]]
    assert only(at_client, GoAway)


def test_a_protocol_error_of_the_peer_is_answered_with_goaway_and_ends_the_session() -> None:
    """DATA on stream 0 (RFC 9113 §6.1): the library queues GOAWAY(PROTOCOL_ERROR) by itself;
    once it is written the codec says the session is over."""
    server = attacker()
    server.receive(frame(0x0, 0, 0, b"x"))
    out = server.data_to_send()
    assert out[3] == 0x7 and struct.unpack(">I", out[13:17])[0] == 0x1  # GOAWAY, PROTOCOL_ERROR
    assert server.finished
