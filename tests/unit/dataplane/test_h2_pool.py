"""The HTTP/2 connections to one endpoint (dataplane/h2upstream.py), with the server played by
the project's codec in the server role over fake transports (fakes.py): streams go on the
least loaded connection, up to the server's SETTINGS_MAX_CONCURRENT_STREAMS each, then on no
connection (a new one is the caller's to open); a GOAWAY or a rotated certificate takes a
connection out of the choice; a refused stream ends unanswered."""

from __future__ import annotations

from meshproxy.dataplane.h2upstream import Http2Pool, Http2UpstreamConnection
from meshproxy.dataplane.mirror import _Sink
from meshproxy.dataplane.upstream import ConnectionPool
from meshproxy.http1.events import RequestHead
from meshproxy.http2.codec import REFUSED_STREAM, Codec, Headers, Settings
from meshproxy.observability.metrics import ProxyMetrics

from fakes import FakeLoop, FakeTransport


class Server:
    """The far end of one upstream HTTP/2 connection."""

    def __init__(self, loop: FakeLoop, conn: Http2UpstreamConnection, max_streams: int) -> None:
        self.codec = Codec(server=True, settings=Settings(max_concurrent_streams=max_streams))
        self.codec.start()
        self.conn = conn
        self.transport = FakeTransport(loop, conn)
        self.transport.on_write = self._from_proxy
        self.requests: list[Headers] = []
        conn.connection_made(self.transport)
        self.send()

    def _from_proxy(self, data: bytes) -> None:
        for event in self.codec.receive(data):
            if isinstance(event, Headers):
                self.requests.append(event)

    def send(self) -> None:
        out = self.codec.data_to_send()
        if out:
            self.transport.feed(out)


def setup(n: int, max_streams: int):
    loop = FakeLoop()
    pool = ConnectionPool(loop, "10.0.0.1", 80, idle_timeout=60, connect_timeout=1,
                          metrics=ProxyMetrics())
    h2pool = Http2Pool(pool)
    servers = []
    for _ in range(n):
        conn = Http2UpstreamConnection(pool, h2pool, b"http")
        servers.append(Server(loop, conn, max_streams))
        h2pool.conns.append(conn)
    loop.run()
    return loop, h2pool, servers


def call(loop: FakeLoop, h2pool: Http2Pool):
    """Open a stream (if one is to be had) and send a GET on it; returns (stream, sink)."""
    stream = h2pool.take_stream()
    if stream is None:
        return None, None
    sink = _Sink(loop)
    head = RequestHead(b"GET", b"/", "2", [(b"host", b"shop")])
    head.host = b"shop"
    stream.begin(sink, head, b"/", [], complete=True, upgrade=False)
    return stream, sink


def test_streams_spread_over_the_least_loaded_connection_up_to_the_servers_limit():
    loop, h2pool, servers = setup(2, max_streams=2)
    assert [s.conn.max_streams for s in servers] == [2, 2]  # from the servers' SETTINGS
    opened = [call(loop, h2pool)[0] for _ in range(4)]
    loop.run()
    assert all(stream is not None for stream in opened)
    assert [len(s.conn.streams) for s in servers] == [2, 2]
    assert [len(s.requests) for s in servers] == [2, 2]
    assert call(loop, h2pool) == (None, None)  # every connection is full: open another


def test_a_connection_that_received_a_goaway_takes_no_new_stream():
    loop, h2pool, servers = setup(2, max_streams=10)
    call(loop, h2pool)
    loop.run()  # the request is on the wire before the GOAWAY
    servers[0].codec.goaway()
    servers[0].send()
    loop.run()
    for _ in range(3):
        call(loop, h2pool)
    loop.run()
    assert len(servers[0].requests) == 1 and len(servers[1].requests) == 3


def test_a_stream_the_server_refuses_ends_unanswered_and_leaves_its_connection():
    loop, h2pool, servers = setup(1, max_streams=10)
    stream, sink = call(loop, h2pool)
    loop.run()
    server = servers[0]
    server.codec.reset(stream.stream_id, REFUSED_STREAM)
    server.send()
    loop.run()
    assert sink.done.done() and sink.done.result() is False
    assert stream.stream_id not in server.conn.streams
