"""The HTTP/2 client side (dataplane/h2downstream.py) against a client that falls behind or
floods, on the real DownstreamConnection, Exchange and upstream pool, virtual time and fake
transports (fakes.py): every frame the client sends is built here by hand.

- While the client's socket takes nothing (its send buffer is full), the proxy takes nothing
  from the codec either: acknowledgements of a SETTINGS or PING flood pile up there until the
  codec refuses the client with GOAWAY(ENHANCE_YOUR_CALM), however small the reads; the proxy
  then half-closes after the GOAWAY, and aborts if the client never closes.
- A stream whose client never opens its window (INITIAL_WINDOW_SIZE 0) holds a bounded part of
  its response (the upstream is no longer read) and is reset (RST_STREAM CANCEL) an idle timeout
  after the client last took any of it; its upstream is closed.
"""

from __future__ import annotations

import struct

from fakes import Mesh

from meshproxy.dataplane.h2stream import QUEUED_LIMIT

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB
IDLE = 75.0  # the listener's client idle timeout (ListenerContext's default)
A = "10.0.0.1:8080"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame the proxy wrote."""
    out, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        out.append((data[at + 3], data[at + 4],
                    int.from_bytes(data[at + 5:at + 9], "big") & 0x7FFFFFFF,
                    bytes(data[at + 9:at + 9 + length])))
        at += 9 + length
    return out


def code(payload: bytes) -> int:
    """The error code of a RST_STREAM or GOAWAY payload."""
    return struct.unpack(">I", payload[-4:])[0]


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal without indexing, new name, no Huffman; short strings only."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


GET_SHOP = b"".join(literal(n, v) for n, v in [
    (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/big"), (b":authority", b"shop")])


def connected(mesh: Mesh, settings: bytes = b""):
    """A client that sent the preface, its SETTINGS (`settings` entries) and the
    acknowledgement of the proxy's."""
    client = mesh.client()
    client.send(PREFACE + frame(SETTINGS, 0, 0, settings) + frame(SETTINGS, ACK, 0))
    mesh.loop.run()
    return client


# -- floods of control frames ----------------------------------------------------------------

def test_acknowledgements_wait_in_the_codec_while_the_client_reads_nothing() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client = connected(mesh)
    client.transport.send_buffer_full()  # the client stopped reading
    before = len(client.transport.data)
    for _ in range(20):  # 2,000 PINGs, 100 per read: each read alone is no flood
        client.send(frame(PING, 0, 0, b"12345678") * 100)
    mesh.loop.run()
    sent = frames(client.transport.data[before:])
    assert [(kind, code(payload)) for kind, _, _, payload in sent] == [(GOAWAY, ENHANCE_YOUR_CALM)]
    # The GOAWAY goes, then the proxy's end of the connection: it still reads (and drops)
    # what the client sends, so that closing does not reset the connection under the GOAWAY.
    assert client.transport.eof_written and not client.transport.closing
    client.send(frame(PING, 0, 0, b"12345678") * 100)
    mesh.loop.run()
    assert len(frames(client.transport.data[before:])) == 1
    # A client that never closes is cut off an idle timeout later.
    mesh.loop.advance(IDLE)
    assert client.aborted and client.transport.lost


def test_a_client_that_reads_gets_every_acknowledgement() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client = connected(mesh)
    before = len(client.transport.data)
    for _ in range(20):  # twenty reads, each a turn of the loop, as sockets deliver them
        client.send(frame(PING, 0, 0, b"12345678") * 100)
        mesh.loop.run()
    sent = frames(client.transport.data[before:])
    assert len(sent) == 2000 and {(kind, flags) for kind, flags, _, _ in sent} == {(PING, ACK)}


def test_what_waited_goes_out_once_the_client_reads_again() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client = connected(mesh)
    client.transport.send_buffer_full()
    before = len(client.transport.data)
    client.send(frame(PING, 0, 0, b"12345678") * 100)
    mesh.loop.run()
    assert len(client.transport.data) == before
    client.transport.send_buffer_drained()
    assert len(frames(client.transport.data[before:])) == 100


def test_the_client_closing_after_the_goaway_ends_the_connection() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client = connected(mesh)
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, GET_SHOP))
    mesh.loop.run()
    client.send(frame(0x0, 0, 0, b"x"))  # DATA on stream 0: a protocol error (RFC 9113 §6.1)
    mesh.loop.run()
    assert [kind for kind, *_ in frames(client.transport.data)][-1] == GOAWAY
    assert mesh.network.last.closed  # the open stream's upstream is let go
    client.transport.remote_close()
    mesh.loop.run()
    assert client.transport.lost and not client.aborted


# -- a zero window -----------------------------------------------------------------------------

def partial_response(body: int, sent: int) -> bytes:
    """The head of a response of `body` bytes and the first `sent` of them."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % body + b"x" * sent


def stalled(mesh: Mesh):
    """A client with INITIAL_WINDOW_SIZE 0 whose GET the app answers with 4 × QUEUED_LIMIT
    bytes, a little more than QUEUED_LIMIT of them read at once."""
    client = connected(mesh, settings=struct.pack(">HI", 0x4, 0))
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, GET_SHOP))
    mesh.loop.run()
    upstream = mesh.network.last
    upstream.respond(partial_response(4 * QUEUED_LIMIT, QUEUED_LIMIT + 65536))
    mesh.loop.run()
    return client, upstream


def test_a_zero_window_pauses_the_upstream_and_the_stream_is_reset_after_the_idle_timeout() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client, upstream = stalled(mesh)
    [head] = [f for f in frames(client.transport.data) if f[0] == HEADERS]
    assert head[2] == 1
    # Over QUEUED_LIMIT came in one read; no more is read: the upstream is paused.
    assert not upstream.transport.reading and not upstream.closed
    stream = client.conn.h2.streams[1]
    assert client.conn.h2.codec.queued(1) > QUEUED_LIMIT and stream.upstream_paused

    mesh.loop.advance(IDLE - 1)
    assert not [f for f in frames(client.transport.data) if f[0] == RST_STREAM]
    mesh.loop.advance(1)
    [reset] = [f for f in frames(client.transport.data) if f[0] == RST_STREAM]
    assert (reset[2], code(reset[3])) == (1, CANCEL)
    assert upstream.closed and not client.conn.h2.streams
    # With no stream left, the connection idles out like any other.
    mesh.loop.advance(IDLE)
    assert [kind for kind, *_ in frames(client.transport.data)][-1] == GOAWAY
    assert client.transport.closing


def test_a_client_that_takes_some_of_the_response_is_given_another_idle_timeout() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client, upstream = stalled(mesh)
    mesh.loop.advance(IDLE / 2)
    client.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000)))  # 1,000 bytes may go
    mesh.loop.run()
    assert sum(len(p) for kind, _, _, p in frames(client.transport.data) if kind == 0x0) == 1000
    mesh.loop.advance(IDLE / 2)  # an idle timeout since the stall began, not since the bytes
    assert not [f for f in frames(client.transport.data) if f[0] == RST_STREAM]
    mesh.loop.advance(IDLE)
    assert [f[2] for f in frames(client.transport.data) if f[0] == RST_STREAM] == [1]
    assert upstream.closed


def test_a_client_that_reads_nothing_at_all_is_cut_off_after_the_idle_timeout() -> None:
    mesh = Mesh.outbound({"shop": [A]})
    client = connected(mesh)
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, GET_SHOP))
    mesh.loop.run()
    client.transport.send_buffer_full()
    upstream = mesh.network.last
    upstream.respond(partial_response(1 << 20, 1000))  # not even this much can go
    mesh.loop.run()
    mesh.loop.advance(IDLE)
    assert client.aborted and upstream.closed
