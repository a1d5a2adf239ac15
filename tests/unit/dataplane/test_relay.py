"""The byte relay (dataplane/relay.py) between two fake transports, as the two peers see it:
bytes both ways, back-pressure both ways, half-close each way and both, the fallback for a
transport that cannot half-close, a reset and a clean close. Then its two users handing their
transports over: an HTTP Upgrade (after 101) and plain TCP (TcpProxy). No sockets, virtual
time (fakes.py)."""

from __future__ import annotations

import pytest

from fakes import FakeLoop, FakeTransport, Mesh, request

from meshproxy.dataplane import tcpproxy
from meshproxy.dataplane.relay import Relay
from meshproxy.dataplane.tcpproxy import TcpProxy
from meshproxy.dataplane.tcpstats import TcpStats


class Owner:
    """The protocol a transport had before the relay took it over: it must hear nothing more
    but the end (`lost`, through the relay's hook)."""

    def __init__(self) -> None:
        self.heard: list = []  # anything the transport still called on this protocol
        self.lost: list = []  # how the relay said the transport ended

    def data_received(self, data: bytes) -> None:
        self.heard.append(data)

    def eof_received(self) -> bool:
        self.heard.append("eof")
        return True

    def pause_writing(self) -> None:
        self.heard.append("pause_writing")

    def resume_writing(self) -> None:
        self.heard.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.heard.append("connection_lost")

    def ended(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Counts:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class Pair:
    """A client transport and an upstream transport, relayed. `client` and `upstream` are
    the fakes: the test plays the peers on their far sides."""

    def __init__(self, *, client_half_close: bool = True, upstream_half_close: bool = True,
                 counts: Counts | None = None, pending: list[bytes] | None = None,
                 **start) -> None:
        self.loop = FakeLoop()
        self.client_owner, self.upstream_owner = Owner(), Owner()
        self.client = FakeTransport(self.loop, self.client_owner, half_close=client_half_close)
        self.upstream = FakeTransport(self.loop, self.upstream_owner, ("10.0.0.1", 8080),
                                      half_close=upstream_half_close)
        self.relay = Relay(self.client, self.upstream, client_lost=self.client_owner.ended,
                           upstream_lost=self.upstream_owner.ended, counts=counts)
        self.relay.start(pending, **start)

    def settle(self) -> None:
        self.loop.run()

    @property
    def both_closed(self) -> bool:
        return self.client.lost and self.upstream.lost

    def assert_owners_heard_only_the_end(self) -> None:
        assert self.client_owner.heard == [] and self.upstream_owner.heard == []


# --- bytes ------------------------------------------------------------------------------------


def test_bytes_go_both_ways_and_the_previous_protocols_hear_none_of_them() -> None:
    pair = Pair()
    pair.client.feed(b"GET it")
    pair.upstream.feed(b"here it is")
    pair.client.feed(b", and more")
    assert bytes(pair.upstream.data) == b"GET it, and more"
    assert bytes(pair.client.data) == b"here it is"
    pair.settle()
    assert not pair.client.closing and not pair.upstream.closing
    pair.assert_owners_heard_only_the_end()


def test_held_bytes_go_first_then_what_the_client_sends() -> None:
    pair = Pair(pending=[b"held ", b"back "])
    pair.client.feed(b"then live")
    assert bytes(pair.upstream.data) == b"held back then live"


def test_with_counts_the_bytes_are_counted_each_way() -> None:
    counts = Counts()
    pair = Pair(counts=counts, pending=[b"not counted here"])
    pair.client.feed(b"12345")
    pair.upstream.feed(b"123")
    pair.upstream.feed(b"45678")
    assert (counts.sent, counts.received) == (5, 8)


def test_the_client_is_read_again_when_the_relay_starts() -> None:
    loop = FakeLoop()
    client = FakeTransport(loop, Owner())
    upstream = FakeTransport(loop, Owner())
    client.pause_reading()  # e.g. a full buffer of held bytes, or a pipelined request
    client.feed(b"waited")
    Relay(client, upstream).start()
    loop.run()
    assert client.reading and bytes(upstream.data) == b"waited"


# --- back-pressure ----------------------------------------------------------------------------


def test_a_full_upstream_send_buffer_stops_reading_the_client_until_it_drains() -> None:
    pair = Pair()
    pair.upstream.send_buffer_full()
    assert not pair.client.reading
    pair.client.feed(b"wait for it")
    assert bytes(pair.upstream.data) == b""  # not read while the upstream is behind
    pair.upstream.feed(b"the other way still flows")
    assert bytes(pair.client.data) == b"the other way still flows"

    pair.upstream.send_buffer_drained()
    assert pair.client.reading
    pair.settle()
    assert bytes(pair.upstream.data) == b"wait for it"
    pair.assert_owners_heard_only_the_end()


def test_a_full_client_send_buffer_stops_reading_the_upstream_until_it_drains() -> None:
    pair = Pair()
    pair.client.send_buffer_full()
    assert not pair.upstream.reading
    pair.upstream.feed(b"wait for it")
    assert bytes(pair.client.data) == b""
    pair.client.feed(b"the other way still flows")
    assert bytes(pair.upstream.data) == b"the other way still flows"

    pair.client.send_buffer_drained()
    pair.settle()
    assert pair.upstream.reading and bytes(pair.client.data) == b"wait for it"


def test_a_client_already_behind_when_the_relay_starts_keeps_the_upstream_paused() -> None:
    pair = Pair(client_write_paused=True)
    assert not pair.upstream.reading and pair.client.reading
    pair.client.send_buffer_drained()  # its resume_writing now comes to the relay
    assert pair.upstream.reading


# --- half-close -------------------------------------------------------------------------------


def test_the_clients_eof_is_passed_on_and_the_answer_still_comes() -> None:
    pair = Pair()
    pair.client.feed(b"request")
    pair.client.remote_close()
    pair.settle()
    assert pair.upstream.eof_written and not pair.upstream.closing
    assert not pair.client.closing  # half-closed: the other direction goes on

    pair.upstream.feed(b"answer")
    assert bytes(pair.client.data) == b"answer"
    pair.upstream.remote_close()  # now both directions have ended: the pair closes
    pair.settle()
    assert pair.both_closed and not pair.client.aborted and not pair.upstream.aborted
    assert (pair.client_owner.lost, pair.upstream_owner.lost) == ([None], [None])
    pair.assert_owners_heard_only_the_end()


def test_the_upstreams_eof_is_passed_on_and_the_client_may_still_send() -> None:
    pair = Pair()
    pair.upstream.feed(b"greeting")
    pair.upstream.remote_close()
    pair.settle()
    assert pair.client.eof_written and not pair.client.closing and not pair.upstream.closing
    assert bytes(pair.client.data) == b"greeting"

    pair.client.feed(b"last words")
    assert bytes(pair.upstream.data) == b"last words"
    pair.client.remote_close()
    pair.settle()
    assert pair.both_closed and not pair.client.aborted and not pair.upstream.aborted
    assert (pair.client_owner.lost, pair.upstream_owner.lost) == ([None], [None])


def test_eofs_from_both_sides_at_once_close_the_pair() -> None:
    pair = Pair()
    pair.client.remote_close()
    pair.upstream.remote_close()
    pair.settle()
    assert pair.both_closed
    assert pair.upstream.eof_written  # the client's came first and was passed on


def test_eofs_that_came_before_the_relay_started_are_passed_on() -> None:
    pair = Pair(pending=[b"request"], client_eof=True)
    assert bytes(pair.upstream.data) == b"request" and pair.upstream.eof_written
    assert not pair.client.closing

    pair = Pair(client_eof=True, upstream_eof=True)
    pair.settle()
    assert pair.both_closed


def test_a_side_whose_eof_came_before_the_relay_is_not_read_again() -> None:
    """Reading after EOF is undefined in libuv (uvloop reports the EOF once more)."""
    loop = FakeLoop()
    client = FakeTransport(loop, Owner())
    upstream = FakeTransport(loop, Owner(), ("10.0.0.1", 8080))
    client.pause_reading()  # as the previous owner left it after the client's EOF
    upstream.pause_reading()
    Relay(client, upstream).start(client_eof=True)
    assert not client.reading and upstream.reading


# --- a transport that cannot half-close (asyncio's TLS) ------------------------------------


def test_an_upstream_that_cannot_half_close_gets_the_clients_eof_held_back() -> None:
    pair = Pair(upstream_half_close=False)
    pair.client.feed(b"request")
    pair.client.remote_close()
    pair.settle()
    # Not passed on (it cannot be) and not ending anything: the answer is still to come.
    assert not pair.upstream.eof_written and not pair.upstream.closing
    assert not pair.client.closing

    pair.upstream.feed(b"answer")
    pair.upstream.remote_close()  # the pair ends when the upstream closes
    pair.settle()
    assert bytes(pair.client.data) == b"answer"
    assert pair.both_closed and not pair.client.aborted


def test_a_client_that_cannot_half_close_learns_of_the_upstreams_eof_by_a_close() -> None:
    pair = Pair(client_half_close=False)
    pair.upstream.feed(b"the whole answer")
    pair.upstream.remote_close()
    pair.settle()
    # The pair ends; the client's close comes after what was written to it.
    assert pair.both_closed and not pair.client.eof_written and not pair.client.aborted
    assert bytes(pair.client.data) == b"the whole answer"


def test_a_client_that_cannot_half_close_ends_the_pair_with_its_eof() -> None:
    pair = Pair(client_half_close=False)
    pair.client.feed(b"bye")
    pair.client.remote_close()
    pair.settle()
    assert pair.upstream.eof_written  # passed on first, then the client's transport closed
    assert pair.both_closed and not pair.upstream.aborted
    assert bytes(pair.upstream.data) == b"bye"


# --- ends --------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_reset_on_one_side_aborts_the_other(side: str) -> None:
    pair = Pair()
    reset = getattr(pair, side)
    other = pair.upstream if side == "client" else pair.client
    reset.remote_reset()
    assert other.aborted
    pair.settle()
    assert pair.both_closed
    reset_lost, other_lost = ((pair.client_owner.lost, pair.upstream_owner.lost) if side == "client"
                              else (pair.upstream_owner.lost, pair.client_owner.lost))
    assert [type(exc) for exc in reset_lost] == [ConnectionResetError]
    assert other_lost == [None]
    pair.assert_owners_heard_only_the_end()


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_clean_close_on_one_side_closes_the_other_after_its_buffered_bytes(side: str) -> None:
    pair = Pair()
    pair.client.feed(b"to the upstream")
    pair.upstream.feed(b"to the client")
    closing = getattr(pair, side)
    other = pair.upstream if side == "client" else pair.client
    closing.close()  # e.g. the drain timeout, or an error on our side: no reset
    pair.settle()
    assert pair.both_closed and other.closing and not other.aborted
    assert bytes(pair.upstream.data) == b"to the upstream"
    assert bytes(pair.client.data) == b"to the client"
    assert (pair.client_owner.lost, pair.upstream_owner.lost) == ([None], [None])


def test_each_hook_is_called_once_and_the_ends_let_go_of_each_other() -> None:
    pair = Pair()
    pair.client.remote_reset()
    pair.upstream.remote_reset()  # the abort's own connection_lost has not come yet
    pair.settle()
    assert len(pair.client_owner.lost) == 1 and len(pair.upstream_owner.lost) == 1
    assert pair.relay.client.other is None and pair.relay.upstream.other is None
    # Late events on either end touch nothing.
    pair.relay.client.pause_writing()
    pair.relay.upstream.resume_writing()
    assert pair.relay.upstream.eof_received() is False


# --- its users: an HTTP Upgrade ------------------------------------------------------------


UPGRADE = request("GET", "/ws", headers={"connection": "upgrade", "upgrade": "websocket"})
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
            b"upgrade: websocket\r\n\r\n")


def tunnel() -> tuple:
    """A client connection through the real request path, switched to a tunnel by a 101."""
    mesh = Mesh.outbound({"shop": ["10.0.0.1:8080"]})
    client = mesh.call(UPGRADE)
    up = mesh.network.last
    up.transport.on_write = None  # the server speaks the new protocol from here on
    up.respond(SWITCHED + b"first frame")
    mesh.loop.run()
    return mesh, client, up


def test_after_101_the_tunnel_relays_both_ways_and_half_closes() -> None:
    mesh, client, up = tunnel()
    assert client.response.status == 101
    assert mesh.metric("meshproxy_tcp_connections_open", direction="outbound") == 1
    assert client.transport.data.endswith(b"\r\n\r\nfirst frame")
    client.send(b"ping")
    assert bytes(up.transport.data).endswith(b"\r\n\r\nping")
    up.transport.feed(b"pong")
    assert client.transport.data.endswith(b"pong")

    client.transport.remote_close()
    mesh.loop.run()
    assert up.transport.eof_written and not up.closed
    up.transport.feed(b"after the client's EOF")
    assert client.transport.data.endswith(b"after the client's EOF")
    up.close()
    mesh.loop.run()
    # Both closed; the connection and the pool's books closed with them.
    assert client.transport.lost and up.transport.lost and not client.aborted
    assert mesh.context.connections == set()
    assert mesh.service().by_key["10.0.0.1:8080"].pool.open_count == 0
    assert mesh.metric("meshproxy_tcp_connections_open", direction="outbound") == 0


def test_a_tunnel_whose_upstream_resets_aborts_the_client() -> None:
    mesh, client, up = tunnel()
    up.reset()
    assert client.aborted
    mesh.loop.run()
    assert mesh.context.connections == set()
    assert mesh.service().by_key["10.0.0.1:8080"].pool.open_count == 0


def test_a_tunnel_is_not_closed_by_a_drain() -> None:
    mesh, client, up = tunnel()
    mesh.context.draining = True
    for conn in list(mesh.context.connections):
        conn.close_if_idle()
    mesh.loop.run()
    assert not client.transport.closing
    client.send(b"still here")
    assert bytes(up.transport.data).endswith(b"still here")


# --- its users: plain TCP --------------------------------------------------------------------


class Dialer:
    """Stands in for tcpproxy.open_upstream: a dial waits until the test opens it, which
    makes the upstream transport (the server may speak before the proxy's task resumes)."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.waiting: list = []

    async def __call__(self, loop, pool, protocol_factory, metrics):
        done = self.loop.create_future()
        self.waiting.append((done, protocol_factory, pool))
        return await done

    def open(self) -> FakeTransport:
        done, protocol_factory, pool = self.waiting.pop(0)
        protocol = protocol_factory()
        transport = FakeTransport(self.loop, protocol, (pool.host, pool.port))
        protocol.connection_made(transport)
        done.set_result((transport, protocol))
        return transport


@pytest.fixture
def tcp(monkeypatch):
    mesh = Mesh.outbound({"shop": ["10.0.0.1:5432"]})
    dialer = Dialer(mesh.loop)
    monkeypatch.setattr(tcpproxy, "open_upstream", dialer)
    stats = TcpStats(mesh.metrics.registry)
    proxy = TcpProxy(mesh.context, mesh.service(), stats)
    client = FakeTransport(mesh.loop, proxy)
    proxy.connection_made(client)
    mesh.loop.run()
    return mesh, dialer, proxy, client, stats.counts("outbound", "shop.default")


def test_tcp_bytes_and_an_eof_sent_while_connecting_go_upstream_in_order(tcp) -> None:
    mesh, dialer, proxy, client, counts = tcp
    client.feed(b"query")
    client.remote_close()
    assert not client.closing  # held: the upstream is not there yet
    upstream = dialer.open()
    mesh.loop.run()
    assert bytes(upstream.data) == b"query" and upstream.eof_written
    upstream.feed(b"rows")
    upstream.remote_close()
    mesh.loop.run()
    assert bytes(client.data) == b"rows"
    assert client.lost and upstream.lost
    assert (counts.sent, counts.received, counts.opened, counts.closed) == (5, 4, 1, 1)
    assert mesh.context.connections == set()
    assert mesh.service().by_key["10.0.0.1:5432"].pool.open_count == 0


def test_tcp_a_server_speaking_first_reaches_the_client_before_and_after_the_handover(tcp) -> None:
    mesh, dialer, proxy, client, counts = tcp
    upstream = dialer.open()
    upstream.feed(b"220 hello ")  # before the connecting task has resumed
    mesh.loop.run()
    upstream.feed(b"ready")
    client.feed(b"QUIT")
    assert bytes(client.data) == b"220 hello ready" and bytes(upstream.data) == b"QUIT"
    assert (counts.sent, counts.received) == (4, 15)
    client.remote_reset()
    assert upstream.aborted
    mesh.loop.run()
    assert mesh.service().by_key["10.0.0.1:5432"].pool.open_count == 0
    assert counts.closed == 1


def test_tcp_a_full_buffer_of_held_bytes_pauses_the_client_until_the_relay_starts(tcp) -> None:
    mesh, dialer, proxy, client, counts = tcp
    big = b"x" * (tcpproxy.PENDING_LIMIT + 1)
    client.feed(big)
    assert not client.reading
    upstream = dialer.open()
    mesh.loop.run()
    assert client.reading and bytes(upstream.data) == big


def test_tcp_an_upstream_that_ends_while_connecting_ends_the_client(tcp) -> None:
    mesh, dialer, proxy, client, counts = tcp
    upstream = dialer.open()
    upstream.remote_reset()
    mesh.loop.run()
    assert client.aborted and client.lost
    assert mesh.service().by_key["10.0.0.1:5432"].pool.open_count == 0
    assert mesh.context.connections == set()
