"""TLS between sidecars: the inbound side's first-bytes decision (PERMISSIVE, STRICT, DISABLE)
and the contexts in force, swapped in one step when the certificate rotates.

Inbound, a PeerAuthentication mode decides what a connection may be (spec §3):

- STRICT: TLS only; a connection whose first byte is not a TLS handshake record is closed.
- PERMISSIVE: the first bytes decide, on the one port: a TLS ClientHello (record type 0x16)
  is terminated, anything else is read as plaintext HTTP.
- DISABLE: plaintext only (a ClientHello then fails as a malformed request: 400).

The decision peeks (MSG_PEEK) at an accepted socket before any transport owns it, then hands the
socket to the event loop with or without TLS (`connect_accepted_socket`): public asyncio API,
and nothing read has to be put back. A connection that sends nothing within the header timeout
is closed, as one that sends no request head would be.

Connections keep the context they were accepted (or opened) with; a rotation only changes the
context of new ones, so rotating never drops a connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Callable

from meshproxy.identity.spiffe import IdentityError, parse_spiffe_id

log = logging.getLogger("meshproxy.tls")
TLS_HANDSHAKE_RECORD = 0x16
HANDSHAKE_TIMEOUT = 10.0
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"


@dataclass
class Contexts:
    """The TLS contexts in force: one to accept with, one to connect with, the trust domain
    and this proxy's own SPIFFE ID."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    spiffe_id: str
    trust_domain: str


class TLSState:
    """What the listeners and upstream pools read: the contexts in force (None until the first
    certificate), and the inbound mode of this proxy's Service."""

    def __init__(self, mode: Callable[[], str]) -> None:
        self.contexts: Contexts | None = None
        self.mode = mode

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


async def accept_inbound(loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: TLSState,
                         protocol_factory: Callable[[], asyncio.Protocol], *, first_byte_timeout: float,
                         on_refused: Callable[[str], None]) -> None:
    """Decide what the accepted `sock` is and start its protocol: with TLS, in plaintext, or
    not at all (closed, `on_refused(reason)` told why). Never raises."""
    try:
        mode = tls.mode()
        contexts = tls.contexts
        if mode == DISABLE or contexts is None and mode == PERMISSIVE:
            await loop.connect_accepted_socket(protocol_factory, sock)
            return
        if not await _readable(loop, sock, first_byte_timeout):
            on_refused("no-data")
            sock.close()
            return
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            first = b"?"  # a spurious wake-up: not TLS either; let the HTTP reader decide
        if not first:
            sock.close()
            return
        if first[0] != TLS_HANDSHAKE_RECORD:
            if mode == STRICT:
                on_refused("plaintext")
                sock.close()
                return
            await loop.connect_accepted_socket(protocol_factory, sock)
            return
        if contexts is None:
            on_refused("no-certificate")
            sock.close()
            return
        await loop.connect_accepted_socket(protocol_factory, sock, ssl=contexts.server,
                                           ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
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
