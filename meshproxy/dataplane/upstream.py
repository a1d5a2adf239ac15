"""Connections to upstream endpoints and the per-endpoint pool of idle keep-alive connections.

An UpstreamConnection carries one exchange at a time (no pipelining towards upstreams: a
failure would otherwise take several requests down with it). It turns bytes into response
events for its exchange and passes back-pressure both ways. After a 101 (an accepted Upgrade)
it carries bytes only: the byte relay (dataplane/relay.py) takes its transport over, and calls
its connection_lost when it ends.

Pools keep idle connections newest-first, since the newest is the least likely to have been
closed by the server, and close them after the idle timeout — short towards apps, which often
close idle connections after 2-5 s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from mypy_extensions import mypyc_attr

from meshproxy.dataplane.connect import connect_endpoint
from meshproxy.dataplane.tls import TLSState
from meshproxy.http1.errors import ConnectFailure, ProxyError
from meshproxy.http1.events import END_OF_MESSAGE, HeaderList, RequestHead, ResponseHead, Upgrade
from meshproxy.http1.response_reader import ResponseReader
from meshproxy.http1.writer import LAST_CHUNK, chunk, request_parts

log = logging.getLogger("meshproxy.upstream")


class ResponseReceiver:
    """What an upstream connection hands a response to: an exchange (dataplane/exchange.py),
    or a mirror's sink that discards it (dataplane/mirror.py). Abstract."""

    __slots__ = ()

    def response_head(self, head: ResponseHead) -> None:
        """A response head (an interim 1xx one, or the final one)."""
        raise NotImplementedError  # abstract

    def response_body(self, data: bytes) -> None:
        raise NotImplementedError  # abstract

    def response_end(self) -> None:
        raise NotImplementedError  # abstract

    def response_trailers(self, fields: HeaderList) -> None:
        """The response's trailer fields (HTTP/2 upstreams); its end follows."""
        raise NotImplementedError  # abstract

    def response_upgrade(self, rest: bytes) -> None:
        """101 Switching Protocols: `rest` is what followed the head in the same read."""
        raise NotImplementedError  # abstract

    def flush(self) -> None:
        """The events of one read have been handed over."""
        raise NotImplementedError  # abstract

    def upstream_failed(self, error: ProxyError, reset: bool = False) -> None:
        """The upstream broke the protocol (or reset) mid-response."""
        raise NotImplementedError  # abstract

    def upstream_lost(self) -> None:
        """The connection closed while carrying this response."""
        raise NotImplementedError  # abstract

    def upstream_refused(self) -> None:
        """An HTTP/2 upstream refused the request's stream before processing it."""
        raise NotImplementedError  # abstract

    def upstream_write_paused(self) -> None:
        raise NotImplementedError  # abstract

    def upstream_write_resumed(self) -> None:
        raise NotImplementedError  # abstract


class UpstreamConnection:
    """One TCP connection to an upstream endpoint, speaking HTTP/1.1 as a client (an asyncio
    protocol: the loop calls its methods by name)."""

    # Set by connection_made, before anything else uses it.
    transport: asyncio.Transport

    __slots__ = (
        "pool", "transport", "reader", "exchange", "requests", "idle_since", "closed",
    )

    def __init__(self, pool: "ConnectionPool", reader: ResponseReader | None = None) -> None:
        """`reader`: given by an HTTP/2 stream, which reads no HTTP/1.1 (the connection's
        one idle reader, so that a stream costs no parser of its own)."""
        self.pool = pool
        self.reader = reader if reader is not None else ResponseReader()
        self.exchange: ResponseReceiver | None = None
        self.requests = 0  # exchanges carried so far; > 0 means the connection is reused
        self.idle_since = 0.0
        self.closed = False

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # meshproxy_tcp_connections_open counts client connections per listener (spec §6:
        # direction inbound/outbound); upstream connections show per endpoint on /endpoints.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the server broke the protocol (or closed with a
            # late 408). The connection cannot be trusted for another request.
            self.close()
            return
        try:
            events = self.reader.feed(data)
        except ProxyError as exc:
            self.exchange = None
            self.close()
            exchange.upstream_failed(exc)
            return
        for event in events:
            if event.__class__ is bytes:
                exchange.response_body(event)
            elif event is END_OF_MESSAGE:
                exchange.response_end()
            elif event.__class__ is ResponseHead:
                exchange.response_head(event)
            elif event.__class__ is Upgrade:
                exchange.response_upgrade(event.rest)
            if self.exchange is not exchange:
                return  # the exchange ended (or failed) on this event
        exchange.flush()

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None:
            try:
                events = self.reader.feed_eof()
            except ProxyError as exc:
                self.exchange = None
                exchange.upstream_failed(exc, reset=True)
                return False
            for event in events:
                exchange.response_end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # Also called by the relay (dataplane/relay.py) that took a tunnel's transport over.
        self.closed = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost()

    def pause_writing(self) -> None:
        # The upstream reads slower than the client sends: stop reading the client.
        if self.exchange is not None:
            self.exchange.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_resumed()

    # used by the forwarder: one request at a time ------------------------------------------
    # (An HTTP/2 stream, dataplane/h2upstream.py, answers the same calls for its stream.)

    def begin(self, receiver: ResponseReceiver, head: RequestHead, target: bytes,
              body: list[bytes], *, complete: bool, upgrade: bool) -> None:
        """Carry `receiver`'s request: send its head to `target` and the body received so far
        (framed as the head says), its end too when `complete`."""
        self.exchange = receiver
        self.requests += 1
        self.reader.expect(head.method == b"HEAD")
        self.writelines(request_parts(head, target, body, complete=complete, upgrade=upgrade))

    def send_body(self, head: RequestHead, data: bytes) -> None:
        """A further piece of the request body."""
        if head.chunked:
            self.writelines(chunk(data))
        else:
            self.transport.write(data)

    def send_end(self, head: RequestHead) -> None:
        """The request's body ended (its trailers, if any, are not carried on HTTP/1.1)."""
        if head.chunked:
            self.transport.write(LAST_CHUNK)

    def finish(self, reusable: bool) -> None:
        """The response ended: back to the pool when `reusable`, else closed."""
        self.exchange = None
        if reusable:
            self.pool.release(self)
        else:
            self.close()

    def detach(self) -> None:
        """The request no longer uses this connection (it is aborted or handed over next)."""
        self.exchange = None

    def pause_reading(self) -> None:
        """Stop reading responses (the client reads slower than they come)."""
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def writelines(self, parts: list) -> None:
        """Send `parts` (one system call)."""
        self.transport.writelines(parts)

    def close(self) -> None:
        """Close the connection; it never goes back to the pool."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding anything not yet sent."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class TlsUpstreamConnection(UpstreamConnection):
    """An upstream connection over asyncio's TLS (mTLS to a meshed endpoint): the same, but
    the transport decrypts into the TLS state's shared buffer (`TLSState.read_buffer`,
    dataplane/tls.py), and each read is copied out at its size (the event loop sees
    get_buffer and reads this protocol as a buffered one)."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        tls = self.pool.tls
        assert tls is not None  # made only by a pool with TLS
        return tls.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        tls = self.pool.tls
        assert tls is not None
        self.data_received(bytes(tls.read_buffer[:nbytes]))

    def writelines(self, parts: list) -> None:
        # One TLS record for a head and the body read so far, or for a chunk and its framing:
        # a record per piece would cost an encryption and 22 bytes each.
        self.transport.write(b"".join(parts))


# Subclassed by tests' scripted pools; compiled, a class allows that only when it says so.
@mypyc_attr(allow_interpreted_subclasses=True)
class ConnectionPool:
    """Idle keep-alive connections to one endpoint (host, port), newest first."""

    __slots__ = (
        "loop", "host", "port", "idle_timeout", "connect_timeout", "metrics", "idle",
        "_sweep", "open_count", "tls", "expected_id",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, *,
                 idle_timeout: float, connect_timeout: float, metrics,
                 tls: "TLSState | None" = None, expected_id: str | None = None) -> None:
        """With `tls`, connections are mTLS (once the proxy has a certificate) and the server
        must prove `expected_id`, the SPIFFE ID the endpoint should have (spec §5)."""
        self.tls = tls
        self.expected_id = expected_id
        self.loop = loop
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.idle: list[UpstreamConnection] = []
        self._sweep: asyncio.TimerHandle | None = None
        self.open_count = 0

    def speaks_h2(self) -> bool:
        """True when requests that came as HTTP/2 go on as HTTP/2: towards another sidecar
        over mTLS, which offers `h2` by ALPN."""
        tls = self.tls
        return tls is not None and tls.contexts is not None and tls.contexts.client_h2 is not None

    def take_idle(self) -> UpstreamConnection | None:
        """Return the newest idle connection still within its idle timeout, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if self.loop.time() - conn.idle_since >= self.idle_timeout:
                conn.close()
                continue
            conn.transport.resume_reading()
            return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a new connection. Raises ConnectFailure (refused, unreachable, timed out, or a
        TLS peer that failed the handshake or is not who the endpoint should be)."""
        def opened() -> None:
            # Counted as soon as it is open: closing it (a wrong peer, or later) is what
            # uncounts it (UpstreamConnection.connection_lost -> forget).
            self.open_count += 1

        tls = self.tls
        if tls is not None and tls.contexts is not None:  # connect_endpoint's test for mTLS
            factory: Callable[[], UpstreamConnection] = lambda: TlsUpstreamConnection(self)
        else:
            factory = lambda: UpstreamConnection(self)
        _, conn = await connect_endpoint(
            self.loop, self.host, self.port, factory,
            timeout=self.connect_timeout, metrics=self.metrics, tls=self.tls,
            expected_id=self.expected_id, on_open=opened)
        assert isinstance(conn, UpstreamConnection)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Put a connection whose exchange ended cleanly back for reuse."""
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            return
        conn.exchange = None
        conn.idle_since = self.loop.time()
        # Reading stays on while idle so that a server's close is noticed at once
        # (connection_lost removes it), but a paused transport from back-pressure is resumed.
        conn.transport.resume_reading()
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.idle_timeout, self._sweep_idle)

    def close_oldest_idle(self) -> bool:
        """Close the connection that has been idle longest; return False when none is idle."""
        idle = self.idle
        while idle:
            conn = idle.pop(0)  # newest last: the first is the oldest
            if not conn.closed:
                conn.close()
                return True
        return False

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it from the idle list if it is there."""
        self.open_count -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.loop.time()
        keep = []
        for conn in self.idle:
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep
        if keep:
            next_expiry = min(c.idle_since for c in keep) + self.idle_timeout - now
            self._sweep = self.loop.call_later(max(next_expiry, 0.01), self._sweep_idle)

    def close_idle(self) -> None:
        """Close every idle connection (drain, or the endpoint went away)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


