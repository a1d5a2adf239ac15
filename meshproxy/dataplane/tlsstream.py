"""TLS over a transport, with half-close: the TLS leg of transparent mode (spec §7: plain TCP
proxied over mTLS between sidecars).

asyncio's TLS transports (and uvloop's) cannot half-close: `write_eof()` is not implemented,
and a peer's close_notify closes the whole connection. A TCP stream proxied between two
sidecars needs both directions to end separately (a client that sends its request and then
shuts down its side still waits for the answer). TLS 1.3 allows exactly that (RFC 8446 §6.1:
close_notify closes the write side only; the other side may go on sending), and OpenSSL
supports it: SSL_read goes on after SSL_shutdown has sent close_notify, and SSL_write after
close_notify was received.

`TlsStream` is both the protocol of a plain TCP transport and the transport the application
protocol sees: ciphertext in and out through an `ssl.SSLObject` on memory BIOs, as asyncio's
own sslproto does. `write_eof()` sends close_notify (then a TCP FIN); a received close_notify
(or a FIN) is the application's `eof_received()`, and the connection stays open while it
returns True. Flow control passes straight through: pausing reading pauses the TCP transport,
the TCP transport's pause_writing reaches the application.

Used on both ends of a sidecar-to-sidecar leg in transparent mode: `connect()` for the
upstream side (then the caller checks the peer's identity), `accept()` for the inbound side.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Callable

log = logging.getLogger("meshproxy.tls")

_READ_SIZE = 256 * 1024


class TlsStream(asyncio.Transport):
    """One TLS connection over a TCP transport; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext, *,
                 server_side: bool, handshake_timeout: float,
                 on_handshake: Callable[["TlsStream", BaseException | None], None] | None = None) -> None:
        """`on_handshake(stream, error)`: called once, when the handshake succeeded (error
        None) or failed; `handshake` is a future with the same outcome."""
        super().__init__()
        self._loop = loop
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._on_handshake = on_handshake
        self.handshake: asyncio.Future = loop.create_future()
        self._paused = False
        self._eof_sent = False  # close_notify sent: no more writes
        self._eof_seen = False  # the peer's close_notify (or FIN) given to the application
        # Plaintext taken out of the SSL object but not yet given to the (paused) application,
        # and whether the peer's close_notify follows it; see _drain.
        self._plain: deque[bytes] = deque()
        self._plain_end = False
        self._raw_eof = False  # the TCP FIN arrived
        self._closing = False
        self._reading_scheduled = False

    # -- the TCP transport's protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)
        self._do_handshake()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self.handshake.done():
            self._do_handshake()
        elif self._app is not None:
            self._read()

    def eof_received(self) -> bool:
        if not self.handshake.done():
            self._handshake_failed(ConnectionResetError("connection closed during the TLS handshake"))
            return False
        # The TCP FIN, after close_notify or (a truncation) without one: an EOF all the same
        # for a byte stream, given to the application once the bytes before it are. The
        # connection stays open for writing until the application closes it.
        self._raw_eof = True
        if self._app is not None and not self._paused:
            self._read()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.handshake.done():
            self._handshake_failed(exc or ConnectionResetError("connection lost"))
            return
        self._closing = True
        app, self._app = self._app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- TLS -------------------------------------------------------------------------------------

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._handshake_failed(exc)
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.handshake.set_result(None)
        if self._on_handshake is not None:
            self._on_handshake(self, None)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self.handshake.done():
            self._handshake_failed(TimeoutError("TLS handshake timed out"))

    def _handshake_failed(self, exc: BaseException) -> None:
        if self.handshake.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = True
        self.handshake.set_exception(exc)
        self.handshake.exception()  # retrieved: whoever waits gets it; nobody must
        if self._on_handshake is not None:
            self._on_handshake(self, exc)
        if self._raw is not None:
            self._raw.abort()

    def attach(self, protocol: asyncio.Protocol) -> None:
        """After the handshake: `protocol` becomes this connection's application; its
        connection_made is called and the bytes already received are delivered."""
        self._app = protocol
        protocol.connection_made(self)
        if self._readable() and not self._paused:
            self._read()

    def _readable(self) -> bool:
        return bool(self._incoming.pending or self._plain or self._plain_end or self._raw_eof)

    def _drain(self) -> None:
        """Take every complete record out of the SSL object into `_plain`. Done before
        unwrap(): its second SSL_shutdown reads on, looking for the peer's close_notify, and
        would drop application data still waiting there."""
        while not self._plain_end:
            try:
                data = self._ssl.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                data = b""
            except (ssl.SSLError, OSError):
                return  # the next _read meets it again and aborts
            if not data:
                self._plain_end = True
                return
            self._plain.append(data)

    def _read(self) -> None:
        self._reading_scheduled = False
        app = self._app
        ssl_object = self._ssl
        while app is not None and not self._paused and not self._eof_seen:
            if self._plain:
                data = self._plain.popleft()
            elif self._plain_end:
                data = b""
            else:
                try:
                    data = ssl_object.read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    if not self._raw_eof:
                        break
                    data = b""  # nothing more will come
                except ssl.SSLZeroReturnError:
                    data = b""
                except (ssl.SSLError, OSError) as exc:
                    log.debug("TLS stream error: %s", exc)
                    self._flush()
                    self.abort()
                    return
            if not data:
                # The peer's close_notify: its side is done; ours may go on (RFC 8446 §6.1).
                self._eof_seen = True
                self._flush()
                if not app.eof_received():
                    self.close()
                return
            app.data_received(data)
            app = self._app
        self._flush()  # reading may answer (a key update)

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())

    # -- the transport the application sees -----------------------------------------------------

    def write(self, data) -> None:
        if self._eof_sent or self._closing or not data:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS write failed: %s", exc)
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify and a FIN: this side is done; reading goes on."""
        if self._eof_sent or self._closing:
            return
        self._send_close_notify()
        if self._raw.can_write_eof():
            self._raw.write_eof()

    def _send_close_notify(self) -> None:
        self._eof_sent = True
        if not self.handshake.done() or self.handshake.exception() is not None:
            return
        self._drain()
        try:
            self._ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, OSError):
            pass  # close_notify is written; the peer's may come later, or never
        self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._eof_sent:
            self._send_close_notify()
        if self._raw is not None:
            self._raw.close()  # after what is buffered

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._raw is not None:
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._raw is not None and not self._raw.is_closing():
                self._raw.resume_reading()
            # Bytes already decrypted-ready wait in the SSL object; deliver them later, not
            # from inside the application's own call.
            if self._readable() and not self._reading_scheduled:
                self._reading_scheduled = True
                self._loop.call_soon(self._read)

    def is_reading(self) -> bool:
        return not self._paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[return-value]

    def get_write_buffer_size(self) -> int:
        return (self._raw.get_write_buffer_size() if self._raw is not None else 0) + self._outgoing.pending

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._ssl.getpeercert() if self.handshake.done() else default
        if name == "cipher":
            return self._ssl.cipher()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)


async def connect(loop: asyncio.AbstractEventLoop, host: str, port: int, context: ssl.SSLContext,
                  handshake_timeout: float) -> TlsStream:
    """Open a TLS connection to host:port; return the stream once the handshake is done (no
    application protocol yet: `attach` one). Raises OSError, ssl.SSLError, TimeoutError."""
    stream = TlsStream(loop, context, server_side=False, handshake_timeout=handshake_timeout)
    transport, _ = await loop.create_connection(lambda: stream, host, port)
    try:
        await stream.handshake
    except BaseException:
        transport.abort()
        raise
    return stream


async def accept(loop: asyncio.AbstractEventLoop, sock, context: ssl.SSLContext,
                 protocol_factory: Callable[[], asyncio.Protocol], *, handshake_timeout: float,
                 on_failure: Callable[[BaseException], None]) -> None:
    """Serve TLS on the accepted socket `sock`: once the handshake is done, a protocol from
    `protocol_factory` is attached; `on_failure(error)` when it fails. Returns at once."""
    def done(stream: TlsStream, error: BaseException | None) -> None:
        if error is None:
            stream.attach(protocol_factory())
        else:
            on_failure(error)

    await loop.connect_accepted_socket(
        lambda: TlsStream(loop, context, server_side=True, handshake_timeout=handshake_timeout,
                          on_handshake=done), sock)
