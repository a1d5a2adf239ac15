"""HTTP/2 client connections on the real request path (DownstreamConnection → Http2Downstream
→ an Exchange per stream → Forwarder → HTTP/1.1 upstream), on virtual time and fake
transports (fakes.py). The client is the project's own codec in the client role, so every
byte the proxy writes is read back as HTTP/2 frames.
"""

from __future__ import annotations

from meshproxy.http2.codec import (
    PREFACE,
    Closed,
    Codec,
    Data,
    GoAway,
    Headers,
    Reset,
    Settings,
)
from meshproxy.dataplane.h2stream import QUEUED_LIMIT
from meshproxy.http2.fields import request_head

from fakes import Client, Mesh, response

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


class H2Client:
    """An HTTP/2 client on one fake connection to the proxy's listener."""

    def __init__(self, mesh: Mesh, settings: Settings = Settings(), *, split: bool = False,
                 credit: bool = True) -> None:
        self.mesh = mesh
        self.client = Client(mesh)
        self.codec = Codec(server=False, settings=settings)
        self.codec.start()
        self.read = 0  # bytes of the proxy's output already given to the codec
        self.events: list = []
        self.credit = credit  # give credit back for what is received
        first = self.codec.data_to_send()
        assert first.startswith(PREFACE)
        if split:  # the preface a byte at a time
            for i in range(len(first)):
                self.client.send(first[i:i + 1])
        else:
            self.client.send(first)
        self.pump()

    def request(self, path: str = "/", *, host: str = "shop", method: str = "GET",
                headers: list | None = None, body: bytes | None = None,
                end: bool = True) -> int:
        fields = [(b":method", method.encode()), (b":scheme", b"http"),
                  (b":authority", host.encode()), (b":path", path.encode())]
        fields += headers or []
        stream_id = self.codec.open_stream(fields, end_stream=end and body is None)
        if body is not None:
            self.codec.send_data(stream_id, body, end_stream=end)
        self.pump()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.codec.send_data(stream_id, data, end_stream=end)
        self.pump()

    def pump(self) -> None:
        """Exchange bytes both ways until neither side has anything to say, running the
        loop between."""
        for _ in range(100):
            out = self.codec.data_to_send()
            if out:
                self.client.send(out)
            self.mesh.loop.run()
            data = bytes(self.client.transport.data[self.read:])
            self.read += len(data)
            if data:
                for event in self.codec.receive(data):
                    self.events.append(event)
                    if self.credit and isinstance(event, Data):
                        self.codec.consumed(event.stream_id, len(event.data))
            if not out and not data:
                return

    def headers(self, stream_id: int) -> list[Headers]:
        return [e for e in self.events if isinstance(e, Headers) and e.stream_id == stream_id]

    def status(self, stream_id: int) -> int | None:
        for block in self.headers(stream_id):
            if not block.informational and not block.trailers:
                return int(dict(block.fields)[b":status"])
        return None

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.events
                        if isinstance(e, Data) and e.stream_id == stream_id)

    def ended(self, stream_id: int) -> bool:
        return any(isinstance(e, Closed) and e.stream_id == stream_id for e in self.events)


def shop(**kw) -> Mesh:
    mesh = Mesh.outbound({"shop": ["10.0.0.1:80"], "empty": []}, **kw)
    return mesh


def test_the_preface_turns_the_connection_into_http2_even_a_byte_at_a_time():
    mesh = shop()
    mesh.network.serve("10.0.0.1:80", response(200, b"hello"))
    client = H2Client(mesh, split=True)
    stream = client.request("/a")
    assert client.status(stream) == 200
    assert client.body(stream) == b"hello"
    assert client.ended(stream)
    # The upstream got HTTP/1.1 with the authority as Host.
    [req] = mesh.network.requests_to("10.0.0.1:80")
    assert (req.method, req.target, req.header("host")) == ("GET", "/a", "shop")


def test_streams_of_one_connection_are_requests_of_their_own():
    mesh = shop()
    mesh.network.serve("10.0.0.1:80", lambda req: response(200, req.target.encode()))
    client = H2Client(mesh)
    streams = [client.request(f"/item/{i}", end=False) for i in range(3)]
    for stream in streams:
        client.send(stream, b"", end=True)
    for i, stream in enumerate(streams):
        assert client.status(stream) == 200
        assert client.body(stream) == f"/item/{i}".encode()
    # Each stream is counted, logged and sent upstream like an HTTP/1.1 request.
    assert mesh.metric("meshproxy_requests_total", service="shop.default", code="200") == 3
    assert [r.target for r, _ in mesh.log.records] == [b"/item/0", b"/item/1", b"/item/2"]
    assert len(mesh.network.requests_to("10.0.0.1:80")) == 3


def test_a_request_body_of_unknown_length_is_chunked_to_the_upstream():
    mesh = shop()
    client = H2Client(mesh)
    stream = client.request("/up", method="POST", body=b"abc", end=False)
    client.send(stream, b"def", end=True)
    [req] = mesh.network.requests_to("10.0.0.1:80")
    assert req.head.chunked and req.body == b"abcdef" and req.complete
    mesh.network.last.respond(response(201, b""))
    client.pump()
    assert client.status(stream) == 201


def test_body_credit_waits_while_the_upstream_connection_is_not_ready():
    """Request bytes beyond the forwarder's buffer are not credited back to the client
    until the upstream connection takes them: the client stops at its window."""
    mesh = shop()
    client = H2Client(mesh)
    body = b"x" * (200 * 1024)
    # Head and body in one read: the upstream connection is still being made.
    stream_id = client.codec.open_stream(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"shop"),
         (b":path", b"/big"), (b"content-length", b"%d" % len(body))])
    client.codec.send_data(stream_id, body, end_stream=True)
    client.client.send(client.codec.data_to_send())
    h2 = client.client.conn.h2
    stream = h2.streams[stream_id]
    assert stream.withheld > 0  # paused: the credit waits
    client.pump()  # the connection opens, the body goes, the credit is given
    assert stream.withheld == 0
    [req] = mesh.network.requests_to("10.0.0.1:80")
    assert req.body == body


def test_a_client_that_does_not_read_slows_the_upstream_down():
    """The client gives no credit: past QUEUED_LIMIT queued for its stream, the upstream
    connection is no longer read; credit resumes it."""
    mesh = shop()
    client = H2Client(mesh, Settings(initial_window_size=65535,
                                     connection_window_size=65535), credit=False)
    stream = client.request("/stream")
    upstream = mesh.network.last
    upstream.respond(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunks = QUEUED_LIMIT // 0x10000 + 4
    for _ in range(chunks):
        upstream.respond(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")  # 64 KiB chunks
    client.pump()
    assert not upstream.transport.reading  # past the limit, 64 KiB admitted: paused
    received = len(client.body(stream))
    assert received <= 65535
    client.codec.consumed(stream, received)
    client.credit = True
    client.pump()
    assert upstream.transport.reading
    upstream.respond(b"0\r\n\r\n")
    client.pump()
    assert len(client.body(stream)) == chunks * 0x10000 and client.ended(stream)


def test_a_reset_stream_stops_its_exchange_and_leaves_the_others():
    mesh = shop()
    client = H2Client(mesh)
    first = client.request("/one")
    second = client.request("/two")
    one, two = mesh.network.connections
    client.codec.reset(first)
    client.pump()
    assert one.closed  # its upstream connection carried a request the client gave up
    two.respond(response(200, b"two"))
    client.pump()
    assert client.body(second) == b"two"
    assert [r.error for r, _ in mesh.log.records] == ["client-disconnected", None]


def test_the_proxys_errors_are_trailers_only_answers_for_grpc():
    mesh = shop()
    client = H2Client(mesh)
    stream = client.request("/demo.Echo/Unary", host="empty", method="POST", headers=GRPC,
                            body=b"\x00\x00\x00\x00\x00")
    [block] = client.headers(stream)
    fields = dict(block.fields)
    assert block.end_stream  # one HEADERS frame ends the call
    assert fields[b":status"] == b"200"
    assert fields[b"grpc-status"] == b"14"
    assert fields[b"x-meshproxy-error"] == b"no-endpoints"
    assert mesh.metric("meshproxy_requests_total", grpc_status="14", code="200",
                       classification="failure") == 1


def test_an_early_answer_waits_for_a_small_body_to_end():
    """An error found from the head is sent once the (small) body has come, not before:
    some clients stall on a response that overtakes their upload."""
    mesh = shop()
    client = H2Client(mesh)
    stream = client.request("/x", host="empty", method="POST",
                            headers=[(b"content-length", b"4")], end=False)
    assert client.status(stream) is None
    client.send(stream, b"abcd", end=True)
    assert client.status(stream) == 503
    assert dict(client.headers(stream)[0].fields)[b"x-meshproxy-error"] == b"no-endpoints"


def test_an_early_answer_does_not_wait_past_the_header_timeout():
    mesh = shop()
    client = H2Client(mesh)
    stream = client.request("/x", host="empty", method="POST",
                            headers=[(b"content-length", b"4")], end=False)
    mesh.loop.advance(mesh.context.header_timeout)
    client.pump()
    assert client.status(stream) == 503


def test_drain_sends_goaway_finishes_the_open_stream_then_closes():
    mesh = shop()
    client = H2Client(mesh)
    stream = client.request("/slow")
    mesh.context.draining = True
    client.client.conn.close_if_idle()
    client.pump()
    assert any(isinstance(e, GoAway) for e in client.events)
    assert not client.client.transport.closing  # the open stream is still answered
    mesh.network.last.respond(response(200, b"done"))
    client.pump()
    assert client.body(stream) == b"done"
    assert client.client.transport.closing


def test_a_request_http2_forbids_is_answered_400_and_the_connection_goes_on():
    mesh = shop()
    mesh.network.serve("10.0.0.1:80", response(200, b"ok"))
    client = H2Client(mesh)
    bad = client.request("/x", headers=[(b"connection", b"close")])
    assert client.status(bad) == 400 or any(
        isinstance(e, Reset) and e.stream_id == bad for e in client.events)
    good = client.request("/y")
    assert client.status(good) == 200


def test_http1_marked_requests_reach_the_upstream_as_http1():
    """Between sidecars an HTTP/1.1 request travels on HTTP/2, marked (spec §9)."""
    mesh = shop()
    mesh.network.serve("10.0.0.1:80", response(200, b"ok"))
    client = H2Client(mesh)
    stream = client.request("/m", headers=[(b"x-meshproxy-orig-proto", b"HTTP/1.1"),
                                           (b"x-a", b"1")])
    assert client.status(stream) == 200
    [req] = mesh.network.requests_to("10.0.0.1:80")
    assert req.header("x-meshproxy-orig-proto") is None
    assert req.header("x-a") == "1"
    head = request_head([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                         (b":authority", b"a"), (b"x-meshproxy-orig-proto", b"HTTP/1.1")])
    assert head.version == "1.1"
