"""The codec's limits, in memory, against a hand-built client: what is refused, at which scope
(one stream, or the connection), and with which code (RFC 9113 §5.4, §7).

- MAX_CONCURRENT_STREAMS is advertised as 100 and enforced stream by stream with
  RST_STREAM(REFUSED_STREAM), even once acknowledged (nghttp2 alone would end the connection);
  a client twice over the limit at once loses the connection.
- A request header block over MAX_HEADER_LIST_SIZE is decoded (HPACK state kept) and handed
  on as `OversizedHeaders`; past four times the limit (an HPACK bomb), the connection is
  refused with GOAWAY(ENHANCE_YOUR_CALM).
- Streams refused for the limit count with those the client reset (rapid reset).
- Acknowledgements the connection does not take pile up in the codec until it refuses the
  peer (SETTINGS/PING flood), however small the reads; taken after every read, they do not.
"""

from __future__ import annotations

import struct

import pytest

from meshproxy.http2.codec import (
    ENHANCE_YOUR_CALM,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    Closed,
    Codec,
    ConnectionFailed,
    Headers,
    OversizedHeaders,
    Settings,
)

SETTINGS, HEADERS, RST_STREAM, PING, GOAWAY, CONTINUATION = 0x4, 0x1, 0x3, 0x6, 0x7, 0x9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame in `data`."""
    out, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        out.append((data[at + 3], data[at + 4],
                    int.from_bytes(data[at + 5:at + 9], "big") & 0x7FFFFFFF,
                    data[at + 9:at + 9 + length]))
        at += 9 + length
    return out


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


def literal(name: bytes, value: bytes, indexed: bool = False) -> bytes:
    """An HPACK literal with a new name, no Huffman: without indexing (RFC 7541 §6.2.2), or
    with incremental indexing (§6.2.1) when `indexed`."""
    return (b"\x40" if indexed else b"\x00") + hpack_int(len(name), 7) + name + \
        hpack_int(len(value), 7) + value


def request_block(*extra: bytes) -> bytes:
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
              (b":authority", b"a")]
    return b"".join(literal(n, v) for n, v in fields) + b"".join(extra)


def header_frames(stream: int, block: bytes) -> bytes:
    pieces = [block[at:at + 16384] for at in range(0, len(block), 16384)]
    out = frame(HEADERS, END_STREAM | (END_HEADERS if len(pieces) == 1 else 0), stream,
                pieces[0])
    for i, piece in enumerate(pieces[1:], 2):
        out += frame(CONTINUATION, END_HEADERS if i == len(pieces) else 0, stream, piece)
    return out


def server(settings: Settings = Settings(), ack: bool = True) -> tuple[Codec, bytes]:
    """A server codec that has read the preface and empty SETTINGS (and, with `ack`, the
    acknowledgement of its own): (codec, what it wrote first)."""
    codec = Codec(server=True, settings=settings)
    codec.start()
    first = codec.data_to_send()
    codec.receive(PREFACE + frame(SETTINGS, 0, 0) + (frame(SETTINGS, ACK, 0) if ack else b""))
    codec.data_to_send()
    return codec, first


def only(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# -- concurrent streams ------------------------------------------------------------------------

def test_the_limit_advertised_is_the_one_enforced() -> None:
    _, first = server()
    [(kind, flags, stream, payload)] = [f for f in frames(first) if f[0] == SETTINGS]
    values = {int.from_bytes(payload[at:at + 2], "big"):
              int.from_bytes(payload[at + 2:at + 6], "big") for at in range(0, len(payload), 6)}
    assert values[0x3] == 100 and values[0x6] == 64 * 1024  # MAX_CONCURRENT_STREAMS, list size


@pytest.mark.parametrize("ack", [True, False], ids=["acknowledged", "not-yet-acknowledged"])
def test_the_101st_concurrent_stream_is_refused_alone(ack: bool) -> None:
    codec, _ = server(ack=ack)
    events = codec.receive(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid,
                                          request_block()) for sid in range(1, 203, 2)))
    assert [e.stream_id for e in only(events, Headers)] == list(range(1, 201, 2))
    assert [(f[0], f[2], struct.unpack(">I", f[3])[0]) for f in frames(codec.data_to_send())] \
        == [(RST_STREAM, 201, REFUSED_STREAM)]
    # Once a stream is done, there is room for the next one.
    codec.send_headers(1, [(b":status", b"204")], end_stream=True)
    codec.data_to_send()
    events = codec.receive(frame(HEADERS, END_STREAM | END_HEADERS, 203, request_block()))
    assert [e.stream_id for e in only(events, Headers)] == [203]
    assert codec.refused == 1 and not codec.finished


def test_a_client_twice_over_the_limit_at_once_loses_the_connection() -> None:
    """nghttp2 holds the ceiling (twice the limit) as RFC 9113 §5.1.2's connection error."""
    codec, _ = server()
    with pytest.raises(ConnectionFailed) as failed:
        codec.receive(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block())
                               for sid in range(1, 2 * 201, 2)))
    assert failed.value.code == PROTOCOL_ERROR
    goaway = [f for f in frames(codec.failure_bytes()) if f[0] == GOAWAY]
    assert goaway and struct.unpack(">I", goaway[0][3][4:8])[0] == PROTOCOL_ERROR


def test_streams_refused_for_the_limit_count_as_a_rapid_reset() -> None:
    """A client that keeps opening streams over the limit makes the proxy reset each: after
    100 streams, half of them refused is refused as a flood."""
    codec, _ = server()
    codec.receive(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block())
                           for sid in range(1, 201, 2)))
    codec.data_to_send()
    with pytest.raises(ConnectionFailed) as failed:
        for sid in range(201, 2000, 2):
            codec.receive(frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block()))
            codec.data_to_send()
    assert failed.value.code == ENHANCE_YOUR_CALM
    assert codec.refused == 100 == codec.peer_streams - 100


def test_a_burst_of_resets_in_one_read_gets_one_goaway_enhance_your_calm() -> None:
    """5,000 × (HEADERS, RST_STREAM) in a single read: the proxy's rule decides, not
    nghttp2's own reset limit (1,000, which would say INTERNAL_ERROR first)."""
    codec, _ = server()
    flood = b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block())
                     + frame(RST_STREAM, 0, sid, struct.pack(">I", 0x8))
                     for sid in range(1, 2 * 5000, 2))
    with pytest.raises(ConnectionFailed) as failed:
        codec.receive(flood)
    assert failed.value.code == ENHANCE_YOUR_CALM
    goaways = [f for f in frames(codec.failure_bytes()) if f[0] == GOAWAY]
    assert [struct.unpack(">I", f[3][4:8])[0] for f in goaways] == [ENHANCE_YOUR_CALM]


# -- header list size ----------------------------------------------------------------------------

def test_a_header_list_over_the_limit_is_handed_on_as_oversized() -> None:
    codec, _ = server()
    big = request_block(*[literal(b"x-big-%d" % i, b"v" * 16000) for i in range(5)])
    [event] = codec.receive(header_frames(1, big))
    assert isinstance(event, OversizedHeaders) and event.end_stream
    assert event.size == sum(len(n) + len(v) + 32 for n, v in event.fields) > 64 * 1024
    # Just under the limit, a request is a request.
    fits = request_block(literal(b"x-fits", b"v" * (64 * 1024 - 300)))
    [event] = codec.receive(header_frames(3, fits))
    assert isinstance(event, Headers)


def test_the_hpack_state_stays_in_step_after_an_oversized_block() -> None:
    """The refused block put a field in the dynamic table; the next request refers to it."""
    codec, _ = server(Settings(max_header_list_size=8192))
    entry = literal(b"x-kept", b"k" * 100, indexed=True)  # dynamic table entry 62
    [event] = codec.receive(header_frames(1, request_block(entry, literal(b"x-pad", b"p" * 9000))))
    assert isinstance(event, OversizedHeaders)
    [event] = codec.receive(header_frames(3, request_block(b"\xbe")))  # indexed: 62
    assert isinstance(event, Headers) and event.fields[-1] == (b"x-kept", b"k" * 100)


def test_an_hpack_bomb_is_refused_with_enhance_your_calm() -> None:
    """One 4,000-byte field in the dynamic table, referenced 12,000 times: 16 KB that would
    decode to 48 MB. Decoding stops at four times the limit."""
    codec, _ = server()
    entry = literal(b"x-bomb", b"z" * 4000, indexed=True)
    with pytest.raises(ConnectionFailed) as failed:
        codec.receive(frame(HEADERS, END_STREAM | END_HEADERS, 1,
                            request_block(entry, b"\xbe" * 12_000)))
    assert failed.value.code == ENHANCE_YOUR_CALM
    [goaway] = [f for f in frames(codec.failure_bytes()) if f[0] == GOAWAY]
    assert struct.unpack(">I", goaway[3][4:8])[0] == ENHANCE_YOUR_CALM


def test_a_client_codec_keeps_the_limit_as_its_ceiling() -> None:
    """Only a server decodes past its limit (to answer 431); a client refuses at once."""
    client = Codec(server=False, settings=Settings(max_header_list_size=8192))
    peer = Codec(server=True)
    client.start()
    peer.start()
    stream = client.open_stream([(b":method", b"GET"), (b":scheme", b"http"),
                                 (b":path", b"/"), (b":authority", b"a")], end_stream=True)
    peer.receive(client.data_to_send())
    client.receive(peer.data_to_send())
    peer.receive(client.data_to_send())
    peer.send_headers(stream, [(b":status", b"200"), (b"x-big", b"v" * 9000)], end_stream=True)
    with pytest.raises(ConnectionFailed) as failed:
        client.receive(peer.data_to_send())
    assert failed.value.code == ENHANCE_YOUR_CALM


# -- acknowledgements not taken ------------------------------------------------------------------

@pytest.mark.parametrize("flood", [frame(SETTINGS, 0, 0), frame(PING, 0, 0, b"12345678")],
                         ids=["settings", "ping"])
def test_acknowledgements_not_taken_are_refused_as_a_flood_even_in_small_reads(flood) -> None:
    """What Http2Downstream relies on: while the client does not read (its socket's send
    buffer is full), the proxy takes nothing from the codec, which then refuses the 1,001st
    acknowledgement waiting, 100 frames per read or not."""
    codec, _ = server()
    with pytest.raises(ConnectionFailed) as failed:
        for _ in range(20):
            codec.receive(flood * 100)
    assert failed.value.code == ENHANCE_YOUR_CALM
    [goaway] = [f for f in frames(codec.failure_bytes()) if f[0] == GOAWAY]
    assert struct.unpack(">I", goaway[3][4:8])[0] == ENHANCE_YOUR_CALM


def test_acknowledgements_taken_after_every_read_are_no_flood() -> None:
    codec, _ = server()
    for _ in range(100):
        codec.receive(frame(PING, 0, 0, b"12345678") * 100)
        assert len(codec.data_to_send()) == 100 * 17
    assert not codec.finished


def test_a_refused_stream_closes_without_reaching_the_proxy() -> None:
    codec, _ = server()
    codec.receive(b"".join(frame(HEADERS, END_HEADERS, sid, request_block())
                           for sid in range(1, 203, 2)))
    codec.data_to_send()  # the RST_STREAM goes out: the stream closes
    events = codec.receive(frame(RST_STREAM, 0, 201, struct.pack(">I", 0x8)))
    assert not only(events, Headers) and 201 not in [e.stream_id for e in only(events, Closed)
                                                     if e.code != REFUSED_STREAM]
