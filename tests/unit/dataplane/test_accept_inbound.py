"""tls.accept_inbound acts on policy/admission.py's decision (the table itself is tested in
tests/unit/policy/test_admission.py): over a socket pair, that it waits as long as the
decision says, starts the right protocol, serves TLS through the given leg, closes and counts
refusals. The TLS leg is a fake: real handshakes are the integration tests'."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from meshproxy.dataplane.tls import Contexts, ServerFirst, TLSState, accept_inbound

SERVER_CONTEXT = object()  # what the fake TLS leg is given: only its identity is checked


class App(asyncio.Protocol):
    def __init__(self, name: str, started: list) -> None:
        self.name = name
        self.started = started

    def connection_made(self, transport) -> None:
        self.started.append(self.name)
        transport.close()


def state(mode: str, certificate: bool) -> TLSState:
    tls = TLSState(lambda: mode)
    if certificate:
        tls.rotate(Contexts(SERVER_CONTEXT, None, "spiffe://cluster.local/ns/default/sa/me",
                            "cluster.local"))
    return tls


async def accept(mode: str, certificate: bool, send: bytes | None, *, server_first=False,
                 tls_error: Exception | None = None, header_timeout: float = 5.0):
    """Accept one connection whose client sends `send` (None: nothing; b"": closes at once).
    Returns (protocols started, refusals, TLS legs served, whether the socket was closed,
    seconds taken)."""
    loop = asyncio.get_running_loop()
    ours, client = socket.socketpair()
    ours.setblocking(False)
    started, refused, served = [], [], []

    async def serve_tls(loop, sock, context, factory, on_refused) -> None:
        served.append(context)
        if tls_error is not None:
            raise tls_error
        sock.close()

    if send:
        client.send(send)
    elif send == b"":
        client.shutdown(socket.SHUT_WR)
    begun = loop.time()
    await accept_inbound(
        loop, ours, state(mode, certificate), lambda: App("app", started),
        first_byte_timeout=header_timeout, on_refused=refused.append, serve_tls=serve_tls,
        server_first=ServerFirst(0.05, lambda: App("server-first", started)) if server_first else None)
    took = loop.time() - begun
    await asyncio.sleep(0.01)  # let a started transport close
    client.settimeout(1)
    try:
        closed = client.recv(1) == b""
    except ConnectionResetError:  # closed with the client's bytes unread
        closed = True
    client.close()
    return started, refused, served, closed, took


async def test_disable_is_plaintext_without_waiting() -> None:
    started, refused, served, _, took = await accept("DISABLE", True, None)
    assert (started, refused, served) == (["app"], [], []) and took < 1


async def test_permissive_without_a_certificate_is_plaintext_without_waiting() -> None:
    started, refused, served, _, took = await accept("PERMISSIVE", False, None, server_first=True)
    assert (started, refused, served) == (["app"], [], []) and took < 1


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
async def test_a_client_hello_is_served_by_the_tls_leg(mode) -> None:
    started, refused, served, closed, _ = await accept(mode, True, b"\x16\x03\x01")
    assert (started, refused, served, closed) == ([], [], [SERVER_CONTEXT], True)


async def test_a_failed_handshake_is_refused_and_closed() -> None:
    _, refused, served, closed, _ = await accept("STRICT", True, b"\x16",
                                                 tls_error=ssl.SSLError("bad"))
    assert (refused, served, closed) == (["handshake: SSLError"], [SERVER_CONTEXT], True)


async def test_plaintext_is_served_in_permissive_and_refused_in_strict() -> None:
    assert (await accept("PERMISSIVE", True, b"GET "))[:3] == (["app"], [], [])
    started, refused, served, closed, _ = await accept("STRICT", True, b"GET ")
    assert (started, refused, served, closed) == ([], ["plaintext"], [], True)


async def test_a_client_hello_without_a_certificate_is_refused() -> None:
    started, refused, _, closed, _ = await accept("STRICT", False, b"\x16")
    assert (started, refused, closed) == ([], ["no-certificate"], True)


async def test_a_client_that_closes_first_is_closed_uncounted() -> None:
    started, refused, served, closed, _ = await accept("STRICT", True, b"")
    assert (started, refused, served, closed) == ([], [], [], True)


async def test_silence_is_refused_after_the_header_timeout() -> None:
    started, refused, _, closed, took = await accept("PERMISSIVE", True, None, header_timeout=0.1)
    assert (started, refused, closed) == ([], ["no-data"], True) and took >= 0.09


async def test_silence_is_a_server_first_client_after_the_detection_timeout() -> None:
    started, refused, _, _, took = await accept("PERMISSIVE", True, None, server_first=True)
    assert (started, refused) == (["server-first"], []) and 0.04 <= took < 1


async def test_strict_refuses_silence_after_the_header_timeout_even_for_server_first() -> None:
    started, refused, _, _, took = await accept("STRICT", True, None, server_first=True,
                                                header_timeout=0.2)
    assert (started, refused) == ([], ["no-data"]) and took >= 0.19
