"""TLS between sidecars: the inbound side's first-bytes decision put into action (PERMISSIVE,
STRICT, DISABLE), and the contexts in force, swapped in one step when the certificate rotates.

What an accepted inbound connection is (TLS, plaintext, refused) is decided by the pure table
in policy/admission.py (spec §3): in short, STRICT is TLS only, PERMISSIVE lets the first
byte decide (a TLS handshake record is terminated, anything else is plaintext HTTP), DISABLE
is plaintext only. `accept_inbound` only waits, peeks and acts on that decision.

The peek (MSG_PEEK) looks at an accepted socket before any transport owns it, then the socket
goes to the event loop with or without TLS (`connect_accepted_socket`): public asyncio API,
and nothing read has to be put back. The TLS leg is asyncio's own by default, or a TlsStream
(`serve_tls_stream`, which can half-close) in transparent mode.

Connections keep the context they were accepted (or opened) with; a rotation only changes the
context of new ones, so rotating never drops a connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

from meshproxy.dataplane import tlsstream
from meshproxy.identity.spiffe import IdentityError, parse_spiffe_id
from meshproxy.policy.admission import (  # noqa: F401 - STRICT...: re-exported for callers
    DISABLE,
    PERMISSIVE,
    STRICT,
    TLS_HANDSHAKE_RECORD,
    Action,
    after_peek,
    before_peek,
)

log = logging.getLogger("meshproxy.tls")
HANDSHAKE_TIMEOUT = 10.0
# Size of the buffer that asyncio TLS connections decrypt into (TLSState.read_buffer).
TLS_READ_BUFFER = 256 * 1024


@dataclass
class Contexts:
    """The TLS contexts in force: one to accept with, one to connect with, the trust domain
    and this proxy's own SPIFFE ID."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    spiffe_id: str
    trust_domain: str
    # To connect with for HTTP/2 (ALPN `h2`): requests that came as HTTP/2, gRPC.
    client_h2: ssl.SSLContext | None = None


class TLSState:
    """What the listeners and upstream pools read: the contexts in force (None until the first
    certificate), and the inbound mode of this proxy's Service."""

    def __init__(self, mode: Callable[[], str]) -> None:
        self.contexts: Contexts | None = None
        self.mode = mode
        # The HTTP connections over asyncio's TLS read their decrypted bytes into this buffer
        # (their get_buffer) and copy them out at their size. Without it, uvloop's TLS asks
        # the ssl module for 256 KiB per read and shrinks it, which glibc serves with mmap,
        # mremap and munmap: three system calls per request on an mTLS hop. One buffer serves
        # every connection: each read is copied out before another can start.
        self.read_buffer = memoryview(bytearray(TLS_READ_BUFFER))

    def rotate(self, contexts: Contexts) -> None:
        """Put new contexts in force for the connections made from now on."""
        self.contexts = contexts


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bool:
    """Wait until `sock` has bytes (or EOF) to read; False after `timeout` seconds."""
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def peek_first_byte(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                          timeout: float) -> bytes | None:
    """Wait up to `timeout` seconds for `sock`'s first byte and return it without consuming
    it (MSG_PEEK): b"" at end of stream, None when nothing came. Raises OSError."""
    if not await _readable(loop, sock, timeout):
        return None
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return b"?"  # a spurious wake-up: not TLS either; let the HTTP reader decide


# How the TLS leg of an accepted socket is served: (loop, sock, server context, protocol
# factory, on_refused) -> returns once the connection is set up (or handed to a transport that
# reports a failed handshake to on_refused); may raise ssl.SSLError, OSError, TimeoutError.
ServeTls = Callable[[asyncio.AbstractEventLoop, socket.socket, ssl.SSLContext,
                     Callable[[], asyncio.Protocol], Callable[[str], None]], Awaitable[None]]


async def serve_asyncio_tls(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                            context: ssl.SSLContext, protocol_factory: Callable[[], asyncio.Protocol],
                            on_refused: Callable[[str], None]) -> None:
    """Serve TLS on `sock` with asyncio's own TLS transport; returns once the handshake is
    done. Raises ssl.SSLError, OSError, TimeoutError (a failed handshake)."""
    await loop.connect_accepted_socket(protocol_factory, sock, ssl=context,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)


async def serve_tls_stream(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                           context: ssl.SSLContext, protocol_factory: Callable[[], asyncio.Protocol],
                           on_refused: Callable[[str], None]) -> None:
    """Serve TLS on `sock` with a TlsStream (dataplane/tlsstream.py), which can half-close (a
    TCP stream on it needs that); returns at once, and a failed handshake is reported to
    `on_refused` later. Raises OSError."""
    await tlsstream.accept(
        loop, sock, context, protocol_factory, handshake_timeout=HANDSHAKE_TIMEOUT,
        on_failure=lambda exc: on_refused(f"handshake: {exc.__class__.__name__}"))


@dataclass(frozen=True)
class ServerFirst:
    """Where silence is a server-first client (transparent mode): how long a PERMISSIVE
    client may stay silent before it is taken as one (the protocol-detection timeout), and the
    protocol such a client gets."""

    timeout: float
    protocol_factory: Callable[[], asyncio.Protocol]


async def accept_inbound(loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: TLSState,
                         protocol_factory: Callable[[], asyncio.Protocol], *, first_byte_timeout: float,
                         on_refused: Callable[[str], None], server_first: ServerFirst | None = None,
                         serve_tls: ServeTls = serve_asyncio_tls,
                         tls_protocol_factory: Callable[[], asyncio.Protocol] | None = None) -> None:
    """Decide what the accepted `sock` is (policy/admission.py) and start its protocol: with
    TLS (served by `serve_tls`, with `tls_protocol_factory`'s protocol when given), in
    plaintext, or not at all (closed, `on_refused(reason)` told why). `first_byte_timeout`: how long a client may stay silent (the header timeout);
    `server_first`: silence is a server-first client instead (see ServerFirst). Never raises."""
    try:
        mode = tls.mode()
        contexts = tls.contexts
        has_certificate = contexts is not None
        silence_is_tcp = server_first is not None
        action = before_peek(mode, has_certificate, silence_is_tcp)
        if action is not Action.PLAINTEXT:
            wait = server_first.timeout if action is Action.PEEK_BRIEFLY else first_byte_timeout
            first = await peek_first_byte(loop, sock, wait)
            action = after_peek(mode, first, has_certificate, silence_is_tcp)
        if action is Action.PLAINTEXT:
            await loop.connect_accepted_socket(protocol_factory, sock)
        elif action is Action.TLS:
            await serve_tls(loop, sock, contexts.server, tls_protocol_factory or protocol_factory,
                            on_refused)
        elif action is Action.PLAINTEXT_SILENT:
            await loop.connect_accepted_socket(server_first.protocol_factory, sock)
        else:  # Action.CLOSE, or a Refusal
            if action is not Action.CLOSE:
                on_refused(action.value)
            sock.close()
    except (OSError, TimeoutError, ConnectionError) as exc:  # ssl.SSLError is an OSError
        # A failed handshake (another CA, an expired or missing client certificate,
        # garbage after 0x16) costs this connection only.
        on_refused(f"handshake: {exc.__class__.__name__}")
        log.debug("inbound TLS refused: %s", exc)
        sock.close()
    except Exception:  # pragma: no cover - a bug must not stop the accept loop
        log.exception("inbound connection setup failed")
        sock.close()


def peer_identity(ssl_object) -> str | None:
    """Return the workload SPIFFE ID of the verified peer certificate of a TLS connection
    (`transport.get_extra_info("ssl_object")`, an SSLObject or SSLSocket), or None when there
    is no TLS, no peer certificate, or the certificate does not carry exactly one URI SAN of
    the form `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT` (spec §5; X.509-SVID
    allows one). Never raises.

    Read from `getpeercert()`'s dictionary, which OpenSSL has already decoded, rather than by
    parsing the DER certificate again: this runs for every mTLS connection. `getpeercert()`
    gives that dictionary only for a certificate the handshake verified, and the contexts
    require one (CERT_REQUIRED), so what this returns was proven by the peer."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        return None
    try:
        parse_spiffe_id(uris[0])
    except IdentityError:
        return None
    return uris[0]
