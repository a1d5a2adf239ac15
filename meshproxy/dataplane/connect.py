"""Opening a connection to an upstream endpoint, and proving who answered: the one place both
the HTTP pools (dataplane/upstream.py) and plain TCP proxying (dataplane/tcpproxy.py) connect.

With the proxy's client TLS context (mTLS towards a meshed endpoint, once the proxy has a
certificate) the server must prove the SPIFFE ID the endpoint should have (spec §5): a peer
that is someone else is dropped as a connect failure, as one that fails the handshake is.
Identity is that SPIFFE ID, not a DNS name, so no SNI is sent and no hostname is checked.

How the TLS leg is made is the caller's: asyncio's own TLS (`asyncio_tls`, HTTP) or a
TlsStream (`tls_stream`, dataplane/tlsstream.py), which can pass a half-close on, as a proxied
TCP stream needs. A TlsStream's application protocol is attached only once the peer is
proven, so a wrong peer never reaches it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Awaitable, Callable

from meshproxy.dataplane import tlsstream
from meshproxy.dataplane.tls import TLSState, peer_identity
from meshproxy.http1.errors import ConnectFailure

# Any object with the protocol methods (the loop calls them by name): compiled protocols such
# as UpstreamConnection do not subclass asyncio.Protocol.
ProtocolFactory = Callable[[], Any]
# (loop, host, port, client context, protocol factory, timeout) -> (transport, its protocol, or
# None when the caller is to attach one once the peer is proven). Raises OSError (ssl.SSLError
# for a failed handshake), TimeoutError.
TlsLeg = Callable[[asyncio.AbstractEventLoop, str, int, ssl.SSLContext, ProtocolFactory, float],
                  Awaitable[tuple[asyncio.Transport, "asyncio.Protocol | None"]]]


async def asyncio_tls(loop: asyncio.AbstractEventLoop, host: str, port: int, context: ssl.SSLContext,
                      protocol_factory: ProtocolFactory, timeout: float
                      ) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """The TLS leg by asyncio's own TLS: returns (transport, protocol), the protocol connected.
    Raises OSError, ssl.SSLError."""
    # server_hostname "": the peer is checked by SPIFFE ID afterwards, not by name.
    return await loop.create_connection(protocol_factory, host, port, ssl=context,
                                        server_hostname="")


async def tls_stream(loop: asyncio.AbstractEventLoop, host: str, port: int, context: ssl.SSLContext,
                     protocol_factory: ProtocolFactory, timeout: float) -> tuple[asyncio.Transport, None]:
    """The TLS leg by a TlsStream, which can half-close: returns (stream, None), no protocol
    attached yet. Raises OSError, ssl.SSLError, TimeoutError (`timeout` bounds the handshake)."""
    return await tlsstream.connect(loop, host, port, context, timeout), None


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on `transport`'s TCP socket (nothing for other sockets):
    a request, or an interactive protocol's query and reply, must not wait for Nagle's timer."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect_endpoint(loop: asyncio.AbstractEventLoop, host: str, port: int,
                           protocol_factory: ProtocolFactory, *, timeout: float, metrics,
                           tls: TLSState | None = None, expected_id: str | None = None,
                           tls_leg: TlsLeg = asyncio_tls,
                           on_open: Callable[[], None] | None = None
                           ) -> tuple[asyncio.Transport, Any]:
    """Open a connection to host:port within `timeout` seconds, with a protocol from
    `protocol_factory`, and return (transport, protocol), TCP_NODELAY set.

    With `tls` and a certificate in force, the connection is mTLS (its leg made by `tls_leg`)
    and, when `expected_id` is given, the peer must prove that SPIFFE ID; each handshake is
    counted (`metrics.tls_handshake("outbound", "ok" | "error" | "wrong-identity")`).
    `on_open` is called once the connection is open, before its peer is checked: a caller
    whose protocol uncounts it when it closes counts it there (a wrong peer is closed too).

    Raises ConnectFailure: refused, unreachable, timed out, a failed TLS handshake, or a peer
    that is not `expected_id`."""
    contexts = tls.contexts if tls is not None else None
    try:
        async with asyncio.timeout(timeout):
            if contexts is None:
                transport, protocol = await loop.create_connection(protocol_factory, host, port)
            else:
                transport, protocol = await tls_leg(loop, host, port, contexts.client,
                                                    protocol_factory, timeout)
    except TimeoutError:
        raise ConnectFailure(f"connect to {host}:{port} timed out") from None
    except ssl.SSLError as exc:
        metrics.tls_handshake("outbound", "error")
        raise ConnectFailure(f"TLS to {host}:{port}: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConnectFailure(f"connect to {host}:{port}: {exc.strerror or exc}") from None
    if on_open is not None:
        on_open()
    if contexts is not None:
        peer = peer_identity(transport.get_extra_info("ssl_object"))
        if expected_id is not None and peer != expected_id:
            metrics.tls_handshake("outbound", "wrong-identity")
            transport.abort()
            raise ConnectFailure(f"{host}:{port} is {peer}, expected {expected_id}")
        metrics.tls_handshake("outbound", "ok")
        if protocol is None:
            protocol = protocol_factory()
            transport.attach(protocol)
    set_nodelay(transport)
    return transport, protocol
