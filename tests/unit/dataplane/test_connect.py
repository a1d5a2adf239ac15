"""Connect-and-verify (dataplane/connect.py) over loopback: plaintext, mTLS by either TLS leg
(asyncio's, TlsStream), a peer with the wrong SPIFFE ID, a failed handshake, a refused
connection, a timeout; TCP_NODELAY and the handshake counts."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from meshproxy.dataplane.connect import asyncio_tls, connect_endpoint, tls_stream
from meshproxy.dataplane.tls import Contexts, TLSState
from meshproxy.http1.errors import ConnectFailure
from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.tls import Certificate, ssl_contexts

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
LEGS = [pytest.param(asyncio_tls, id="asyncio-tls"), pytest.param(tls_stream, id="tls-stream")]


def contexts(ca: CertificateAuthority, spiffe_id: str) -> Contexts:
    key = new_key()
    issued = ca.issue(make_csr(key), spiffe_id, 3600)
    server, client = ssl_contexts(Certificate.from_chain(key, issued.chain_pem, ca.trust_bundle(),
                                                         time.time()))
    return Contexts(server, client, spiffe_id, "cluster.local")


def tls_state(ca: CertificateAuthority, spiffe_id: str = CLIENT_ID) -> TLSState:
    state = TLSState(lambda: "STRICT")
    state.rotate(contexts(ca, spiffe_id))
    return state


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.in_memory("cluster.local")


class Handshakes:
    """The `metrics` connect_endpoint counts TLS handshakes with."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str]] = []

    def tls_handshake(self, direction: str, result: str) -> None:
        self.results.append((direction, result))


class Client(asyncio.Protocol):
    made: list["Client"] = []

    def __init__(self) -> None:
        self.transport = None
        self.lost = False
        Client.made.append(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = True


@pytest.fixture(autouse=True)
def _fresh_clients():
    Client.made = []


async def serve(ssl_context=None):
    """A loopback server that accepts and keeps connections; returns (server, port)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=ssl_context)
    return server, server.sockets[0].getsockname()[1]


async def test_plaintext_opens_with_nodelay_and_counts_no_handshake() -> None:
    server, port = await serve()
    metrics, opened = Handshakes(), []
    transport, protocol = await connect_endpoint(
        asyncio.get_running_loop(), "127.0.0.1", port, Client, timeout=5, metrics=metrics,
        on_open=lambda: opened.append(True))
    assert protocol is Client.made[0] and protocol.transport is transport
    sock = transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert transport.get_extra_info("ssl_object") is None
    assert opened == [True] and metrics.results == []
    transport.close()
    server.close()


async def test_tls_without_a_certificate_yet_is_plaintext() -> None:
    server, port = await serve()
    metrics = Handshakes()
    transport, _ = await connect_endpoint(
        asyncio.get_running_loop(), "127.0.0.1", port, Client, timeout=5, metrics=metrics,
        tls=TLSState(lambda: "STRICT"), expected_id=SERVER_ID)
    assert transport.get_extra_info("ssl_object") is None and metrics.results == []
    transport.close()
    server.close()


@pytest.mark.parametrize("leg", LEGS)
async def test_mtls_to_the_expected_peer(ca, leg) -> None:
    server, port = await serve(contexts(ca, SERVER_ID).server)
    metrics = Handshakes()
    transport, protocol = await connect_endpoint(
        asyncio.get_running_loop(), "127.0.0.1", port, Client, timeout=5, metrics=metrics,
        tls=tls_state(ca), expected_id=SERVER_ID, tls_leg=leg)
    assert protocol is Client.made[0] and protocol.transport is transport
    assert transport.get_extra_info("ssl_object").getpeercert()
    assert transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert metrics.results == [("outbound", "ok")]
    transport.close()
    server.close()


@pytest.mark.parametrize("leg", LEGS)
async def test_a_peer_with_another_identity_is_a_connect_failure(ca, leg) -> None:
    server, port = await serve(contexts(ca, "spiffe://cluster.local/ns/default/sa/impostor").server)
    metrics, opened = Handshakes(), []
    with pytest.raises(ConnectFailure, match=f"is .*impostor, expected {SERVER_ID}"):
        await connect_endpoint(
            asyncio.get_running_loop(), "127.0.0.1", port, Client, timeout=5, metrics=metrics,
            tls=tls_state(ca), expected_id=SERVER_ID, tls_leg=leg, on_open=lambda: opened.append(1))
    assert metrics.results == [("outbound", "wrong-identity")]
    # Open before the check (so a count the protocol uncounts on close stays right) ...
    assert opened == [1]
    await asyncio.sleep(0.05)
    if leg is tls_stream:
        assert Client.made == []  # ... and a TlsStream's protocol never sees the wrong peer
    else:
        assert Client.made[0].lost  # asyncio's TLS connected it: the abort closes it
    server.close()


@pytest.mark.parametrize("leg", LEGS)
async def test_a_failed_handshake_is_a_connect_failure(ca, leg) -> None:
    other = CertificateAuthority.in_memory("cluster.local")  # a CA the client does not trust
    server, port = await serve(contexts(other, SERVER_ID).server)
    metrics, opened = Handshakes(), []
    with pytest.raises(ConnectFailure, match="TLS to 127.0.0.1"):
        await connect_endpoint(
            asyncio.get_running_loop(), "127.0.0.1", port, Client, timeout=5, metrics=metrics,
            tls=tls_state(ca), expected_id=SERVER_ID, tls_leg=leg, on_open=lambda: opened.append(1))
    assert metrics.results == [("outbound", "error")] and opened == []
    server.close()


async def test_a_refused_connection_is_a_connect_failure() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectFailure, match=f"connect to 127.0.0.1:{port}: "):
            await connect_endpoint(asyncio.get_running_loop(), "127.0.0.1", port, Client,
                                   timeout=5, metrics=Handshakes())


@pytest.mark.parametrize("leg", LEGS)
async def test_a_peer_that_never_answers_the_handshake_times_out(ca, leg) -> None:
    with socket.socket() as silent:  # the kernel accepts; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        metrics = Handshakes()
        with pytest.raises(ConnectFailure, match="timed out"):
            await connect_endpoint(asyncio.get_running_loop(), "127.0.0.1", port, Client,
                                   timeout=0.2, metrics=metrics, tls=tls_state(ca),
                                   expected_id=SERVER_ID, tls_leg=leg)
        assert metrics.results == []
