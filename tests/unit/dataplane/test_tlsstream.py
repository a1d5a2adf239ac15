"""TlsStream (dataplane/tlsstream.py) over an in-memory wire: mutual TLS 1.3, both directions,
half-close each way (close_notify), flow control, a failed handshake. No sockets."""

from __future__ import annotations

import asyncio

import pytest

from meshproxy.dataplane.tls import peer_identity
from meshproxy.dataplane.tlsstream import TlsStream
from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.tls import Certificate, ssl_contexts

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


def contexts(ca: CertificateAuthority, spiffe_id: str):
    key = new_key()
    issued = ca.issue(make_csr(key), spiffe_id, 3600)
    import time

    return ssl_contexts(Certificate.from_chain(key, issued.chain_pem, ca.trust_bundle(), time.time()))


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.in_memory("cluster.local")


class Wire(asyncio.Transport):
    """One end of an in-memory TCP connection: bytes and the FIN arrive at the other end on
    the next loop iteration; reading can be paused."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: Wire | None = None
        self.protocol = None
        self.closed = self.eof_sent = self.paused = False
        self.held: list = []

    def write(self, data) -> None:
        assert not self.eof_sent and not self.closed
        self.loop.call_soon(self.peer._arrive, bytes(data))

    def write_eof(self) -> None:
        self.eof_sent = True
        self.loop.call_soon(self.peer._arrive, None)

    def can_write_eof(self) -> bool:
        return True

    def _arrive(self, data) -> None:
        if self.closed:
            return
        if self.paused:
            self.held.append(data)
        elif data is None:
            if not self.protocol.eof_received():
                self.close()
        else:
            self.protocol.data_received(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for data in held:
            self._arrive(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return default


class App(asyncio.Protocol):
    def __init__(self, keep_open: bool = True) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost = asyncio.get_running_loop().create_future()
        self.keep_open = keep_open
        self.transport = None
        self.got = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.got.set()
        return self.keep_open

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def until(condition, what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def pair(ca, *, client_ca=None, server_app=None):
    """A connected (client stream, client app, server app, server failures)."""
    loop = asyncio.get_running_loop()
    server_ctx, _ = contexts(ca, SERVER_ID)
    _, client_ctx = contexts(client_ca or ca, CLIENT_ID)
    failures: list = []
    server_app = server_app or App()

    def on_handshake(stream, error) -> None:
        if error is None:
            stream.attach(server_app)
        else:
            failures.append(error)

    client = TlsStream(loop, client_ctx, server_side=False, handshake_timeout=5)
    server = TlsStream(loop, server_ctx, server_side=True, handshake_timeout=5,
                       on_handshake=on_handshake)
    a, b = Wire(loop), Wire(loop)
    a.peer, b.peer, a.protocol, b.protocol = b, a, client, server
    server.connection_made(b)
    client.connection_made(a)
    return client, server_app, failures


async def test_mutual_tls_and_half_close_from_the_client(ca) -> None:
    client, server_app, _ = await pair(ca)
    await client.handshake
    assert peer_identity(client.get_extra_info("ssl_object")) == SERVER_ID
    app = App()
    client.attach(app)
    await until(lambda: server_app.transport is not None, "the server's app")
    assert peer_identity(server_app.transport.get_extra_info("ssl_object")) == CLIENT_ID

    client.write(b"request")
    client.write_eof()  # close_notify: the client is done sending
    await until(lambda: server_app.eof, "the server's EOF")
    assert bytes(server_app.data) == b"request"
    # the server may still answer after the client's close_notify (RFC 8446 §6.1)
    server_app.transport.write(b"answer")
    server_app.transport.write_eof()
    await until(lambda: app.eof, "the client's EOF")
    assert bytes(app.data) == b"answer"
    server_app.transport.close()
    client.close()
    await asyncio.wait_for(asyncio.gather(app.lost, server_app.lost), 5)


async def test_half_close_from_the_server_and_reading_after_it(ca) -> None:
    client, server_app, _ = await pair(ca)
    await client.handshake
    app = App()
    client.attach(app)
    await until(lambda: server_app.transport is not None, "the server's app")
    server_app.transport.write(b"greeting")
    server_app.transport.write_eof()
    await until(lambda: app.eof, "the client's EOF")
    assert bytes(app.data) == b"greeting"
    client.write(b"still talking")  # the client's side is open
    await until(lambda: bytes(server_app.data) == b"still talking", "the client's bytes")
    client.write_eof()
    await until(lambda: server_app.eof, "the server's EOF")


async def test_paused_reading_holds_bytes_in_order(ca) -> None:
    client, server_app, _ = await pair(ca)
    await client.handshake
    app = App()
    client.attach(app)
    await until(lambda: server_app.transport is not None, "the server's app")
    client.pause_reading()
    payload = bytes(range(256)) * 4096  # 1 MiB in many records
    for i in range(0, len(payload), 50_000):
        server_app.transport.write(payload[i:i + 50_000])
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(app.data) < len(payload)
    client.resume_reading()
    await until(lambda: len(app.data) == len(payload), "every byte")
    assert bytes(app.data) == payload


async def test_a_peer_from_another_ca_fails_the_handshake(ca) -> None:
    other = CertificateAuthority.in_memory("cluster.local")
    client, _, failures = await pair(ca, client_ca=other)
    with pytest.raises(OSError):  # ssl.SSLError, or the connection reset by the server
        await client.handshake
    await until(lambda: failures, "the server's failure")


async def test_half_closing_while_paused_loses_nothing(ca) -> None:
    client, server_app, _ = await pair(ca)
    await client.handshake
    app = App()
    client.attach(app)
    await until(lambda: server_app.transport is not None, "the server's app")
    payload = bytes(range(256)) * 2048
    # the application falls behind at its first bytes: the other records, and the peer's
    # close_notify, wait in the SSL object
    app.data_received = lambda data: (app.data.extend(data), client.pause_reading())
    server_app.transport.write(payload)
    server_app.transport.write_eof()
    await until(lambda: app.data, "the first bytes")
    assert len(app.data) < len(payload) and client._incoming.pending
    client.write_eof()  # close_notify while records and the peer's close_notify are pending
    del app.data_received
    client.resume_reading()
    await until(lambda: app.eof, "the client's EOF")
    assert bytes(app.data) == payload
    await until(lambda: server_app.eof, "the server's EOF")
