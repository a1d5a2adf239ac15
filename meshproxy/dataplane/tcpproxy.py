"""Plain TCP proxying (spec §7 "Not all TCP is HTTP"): one upstream connection per client
connection, chosen per connection among the destination's endpoints, bytes copied both ways.

A `TcpProxy` takes over a client transport once detection (dataplane/transparent.py) has
decided the connection is not HTTP/1. It picks an endpoint as a request would (balancer,
circuit breaker; a refused connect is tried on another endpoint), opens the connection with
mTLS to meshed endpoints exactly as the HTTP pools do (the peer must prove the endpoint's
SPIFFE ID), and then hands both transports to the byte relay (dataplane/relay.py), which says
how back-pressure, half-close and the end of either side are handled. The TLS legs between
sidecars are TlsStreams (dataplane/tlsstream.py): unlike asyncio's TLS, they can half-close.

What is TCP's own stays here. Bytes that arrive before the upstream is connected are held up
to PENDING_LIMIT, past which the client is paused; they go first once it is, and a client's
EOF in the meantime goes after them. A server that speaks first may do so before the relay
starts: its bytes go straight to the client. Bytes are counted both ways (the relay counts
them once it has started).

Limits (spec §3): outbound, a proxied connection is one upstream connection of its Service
for as long as it is open (the endpoint pool's `open_count`, which HTTP's `maxConnections`
check reads too) and one being opened while it connects (`connecting`, maxPendingRequests).
Past a limit there is no 503 to send: the client connection is closed at once.

Refused connections: a client connection that gets no upstream one is closed and counted
by reason, the spec §4 reasons where they apply: `overloaded` (a limit), `no-endpoints` (the
Service has no endpoints of its own: HTTPRoute rules apply to HTTP only, so the backends of
a route, e.g. a canary split's, are not used for opaque TCP, as in Istio and Linkerd),
`no-healthy-endpoints`, `connect-failure`, `unknown-destination` (REGISTRY_ONLY),
`unauthorized` (an AuthorizationPolicy, inbound).

There is no idle timeout (long-lived database connections are the common case); a drain
leaves TCP connections alone until the drain timeout aborts them.

Counters: dataplane/tcpstats.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshproxy.dataplane.connect import connect_endpoint, tls_stream
from meshproxy.dataplane.relay import Relay
from meshproxy.dataplane.tcpstats import TcpStats
from meshproxy.http1.errors import ConnectFailure, ProxyError

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.dataplane.destinations import EndpointRuntime, ServiceRuntime
    from meshproxy.dataplane.upstream import ConnectionPool

log = logging.getLogger("meshproxy.tcp")

# Client bytes held while the upstream connection is being opened.
PENDING_LIMIT = 64 * 1024


async def open_upstream(loop: asyncio.AbstractEventLoop, pool: "ConnectionPool", protocol_factory,
                        metrics) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Open a connection to `pool`'s endpoint as ConnectionPool.connect does (mTLS when the
    pool has TLS and the proxy a certificate; the peer must be the pool's expected SPIFFE ID),
    with `protocol_factory`'s protocol. Returns (transport, protocol); raises ConnectFailure."""
    # A TlsStream rather than asyncio's TLS: it can pass a half-close on.
    return await connect_endpoint(loop, pool.host, pool.port, protocol_factory,
                                  timeout=pool.connect_timeout, metrics=metrics, tls=pool.tls,
                                  expected_id=pool.expected_id, tls_leg=tls_stream)


class _Upstream(asyncio.Protocol):
    """The upstream connection's protocol until the relay takes its transport over
    (TcpProxy._attach): the moments between its opening and the connecting task's resuming."""

    __slots__ = ("proxy", "transport", "eof", "lost")

    def __init__(self, proxy: "TcpProxy") -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.eof = False  # the server finished sending already: passed on when the relay starts
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # A server that speaks first (a greeting) may already have.
        proxy = self.proxy
        proxy.counts.received += len(data)
        if proxy.transport is not None:
            proxy.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.proxy.upstream_lost(exc)


class TcpProxy(asyncio.Protocol):
    """A client connection proxied as plain TCP to one endpoint of `runtime`.

    Made by the detection step, which then calls connection_made and hands over the bytes
    already read. `runtime` None: the connection is refused (an unknown destination under
    REGISTRY_ONLY, or an AuthorizationPolicy): closed at once.

    The client transport's protocol until the relay starts; after that the relay calls
    connection_lost."""

    __slots__ = (
        "context", "loop", "direction", "runtime", "transport", "tls", "counts", "pending",
        "pending_bytes", "client_eof", "client_write_paused", "closed", "endpoint", "task",
        "relay_socket",
    )

    def __init__(self, context, runtime: "ServiceRuntime | None", stats: TcpStats) -> None:
        """`context`: the listener's ListenerContext (dataplane/context.py)."""
        self.context = context
        self.loop = context.loop
        self.direction = context.direction
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.tls = False
        key = runtime.key if runtime is not None else "unknown"
        self.counts = stats.counts(self.direction, key)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.client_eof = False  # the client finished sending before the relay started
        self.client_write_paused = False  # the client's send buffer is full (a greeting)
        self.closed = False
        self.endpoint: "EndpointRuntime | None" = None
        self.task: asyncio.Task | None = None
        self.relay_socket: tuple | None = None  # the upstream's local address, while open

    # -- client side, until the relay starts ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.tls = transport.get_extra_info("ssl_object") is not None
        if self.tls:
            self.context.metrics.tls_handshake(self.direction, "ok")
        self.context.connection_opened(self)
        self.context.metrics.connection_opened(self.direction, self.tls)
        self.counts.opened += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer[:2] in self.context.relay_sockets:
            # One of this listener's own relays connected here: forwarding would open
            # another, and another. (Detection reads the first bytes or waits out its
            # timeout first, so the relay that sent it has registered its address by now.)
            self.context.loop_detected(f"{peer[0]}:{peer[1]}", "a TCP connection")
            self._refuse("loop-detected", "the connection came back to the listener that sent it")
            return
        runtime = self.runtime
        if runtime is None:
            # tcp_destination's only refusals: REGISTRY_ONLY outbound, authorization inbound.
            if self.direction == "outbound":
                self._refuse("unknown-destination", "not a known destination (REGISTRY_ONLY)")
            else:
                self._refuse("unauthorized", "refused by an AuthorizationPolicy")
            return
        if not runtime.endpoints:
            self._refuse("no-endpoints", "the Service has no endpoints of its own" + (
                " (its HTTPRoutes' backends are for HTTP only)" if runtime.routes is not None
                else ""))
            return
        if runtime.at_connection_limit():
            outbound = runtime.outbound
            self._refuse("overloaded", f"connection limit reached ({outbound.max_connections} "
                         f"open, {outbound.max_pending} being opened at most)")
            return
        # Being opened from here (maxPendingRequests, and maxConnections until it is open);
        # the done callback uncounts it however the task ends.
        runtime.connecting += 1
        self.task = self.loop.create_task(self._connect())
        self.task.add_done_callback(runtime.connect_ended)

    def _refuse(self, reason: str, why: str) -> None:
        """Close the client connection at once, without an upstream one; count `reason`."""
        refused = self.counts.refused
        refused[reason] = refused.get(reason, 0) + 1
        log.debug("%s TCP connection to %s refused: %s: %s", self.direction,
                  self.runtime.key if self.runtime is not None else "an unknown destination",
                  reason, why)
        self.closed = True
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.counts.sent += len(data)
        if self.closed:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > PENDING_LIMIT:
            # Until the relay starts (it reads the client again).
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # Passed on after the held bytes, when the relay starts.
        self.client_eof = True
        # A transport that cannot half-close (asyncio's TLS) closes after an EOF whatever
        # this returns (and warns about True): the pair then ends.
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        # Once the relay has started, it calls this after ending the upstream.
        if self.transport is None:
            return
        self.transport = None
        self.closed = True
        self.context.metrics.connection_closed(self.direction, self.tls)
        self.counts.closed += 1
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.pending = []
        self.pending_bytes = 0
        self.context.connection_closed(self)

    def pause_writing(self) -> None:
        # Only a server's first bytes reach the client before the relay starts: it takes
        # this on (no upstream to stop reading yet).
        self.client_write_paused = True

    def resume_writing(self) -> None:
        self.client_write_paused = False

    def close_if_idle(self) -> None:
        """Drain: a byte stream has no point at which it is idle; it goes on until it ends
        or the drain timeout aborts it."""

    # -- upstream side ------------------------------------------------------------------------

    async def _connect(self) -> None:
        runtime = self.runtime
        tried: set[str] = set()
        attempts = 1 + (runtime.outbound.retry_rule.attempts if runtime.outbound is not None else 0)
        error: ProxyError | None = None
        while len(tried) < attempts:
            try:
                endpoint = runtime.pick(tried)
            except ProxyError as exc:
                error = exc
                break
            if endpoint.key in tried:
                break  # every endpoint was tried: no other to go to
            tried.add(endpoint.key)
            load = endpoint.load
            started = load.start()
            try:
                transport, upstream = await open_upstream(
                    self.loop, endpoint.pool, lambda: _Upstream(self), self.context.metrics)
            except ConnectFailure as exc:
                load.finish(started)
                runtime.record_outcome(endpoint.key, False, self.context.metrics)
                error = exc
                continue
            except asyncio.CancelledError:
                load.finish(started)
                raise
            # The connect time is the RTT sample; the connection then counts as in flight
            # for as long as it is open (the balancer's load is per connection here), and as
            # one of the Service's open connections (maxConnections, shared with HTTP).
            load.finish(started)
            load.in_flight += 1
            endpoint.pool.open_count += 1
            self.endpoint = endpoint
            runtime.record_outcome(endpoint.key, True, self.context.metrics)
            self.task = None
            self._attach(upstream)
            return
        self.task = None
        log.info("%s TCP connection to %s failed: %s", self.direction, runtime.key, error)
        if error is not None:
            refused = self.counts.refused
            refused[error.reason] = refused.get(error.reason, 0) + 1
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def _attach(self, upstream: _Upstream) -> None:
        """The upstream connection is open: relay from now on."""
        client = self.transport
        if client is None or self.closed or upstream.lost:
            # The client left while connecting, or the upstream already ended (which ended
            # the client: upstream_lost).
            upstream.transport.close()
            self._release_endpoint()
            return
        local = upstream.transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.relay_socket = local[:2]
            self.context.relay_sockets.add(self.relay_socket)
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        relay = Relay(client, upstream.transport, client_lost=self.connection_lost,
                      upstream_lost=self._upstream_ended, counts=self.counts)
        relay.start(pending, client_eof=self.client_eof, upstream_eof=upstream.eof,
                    client_write_paused=self.client_write_paused)

    def upstream_lost(self, exc: Exception | None) -> None:
        """The upstream connection ended before the relay started: so does the client's."""
        self._release_endpoint()
        client = self.transport
        if client is None or self.closed:
            return
        self.closed = True
        if exc is None:
            client.close()  # after the bytes still buffered
        else:
            client.abort()

    def _upstream_ended(self, exc: Exception | None) -> None:
        # The relay's hook: it has already ended the client connection.
        self._release_endpoint()

    def _release_endpoint(self) -> None:
        if self.relay_socket is not None:
            self.context.relay_sockets.discard(self.relay_socket)
            self.relay_socket = None
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None:
            return
        endpoint.pool.open_count -= 1
        if endpoint.load.in_flight > 0:
            endpoint.load.in_flight -= 1
