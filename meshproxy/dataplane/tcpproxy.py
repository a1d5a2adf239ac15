"""Plain TCP proxying (spec §7 "Not all TCP is HTTP"): one upstream connection per client
connection, chosen per connection among the destination's endpoints, bytes copied both ways.

A `TcpProxy` takes over a client transport once detection (dataplane/transparent.py) has
decided the connection is not HTTP/1. It picks an endpoint as a request would (balancer,
circuit breaker; a refused connect is tried on another endpoint), opens the connection with
mTLS to meshed endpoints exactly as the HTTP pools do (the peer must prove the endpoint's
SPIFFE ID), and then relays:

- back-pressure: when one side's send buffer is full, the other side stops being read
  (pause_reading) until it drains (resume_reading), so a fast sender cannot make the proxy
  buffer without bound; bytes that arrive before the upstream is connected are held up to
  PENDING_LIMIT, past which the client is paused too;
- half-close: an EOF from one side is passed on as an EOF (shutdown of the write side) to
  the other, and the connection lives on until both directions have ended. The TLS legs
  between sidecars are TlsStreams (dataplane/tlsstream.py), which half-close with TLS 1.3's
  close_notify. A transport that cannot half-close (asyncio's own TLS) gets this fallback: a
  client's EOF is held back (a request-then-EOF client still gets its answer) and the pair
  ends when the upstream closes; an upstream's EOF ends the pair;
- errors: a reset on one side aborts the other; a clean close closes it once its buffered
  bytes are sent.

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
from meshproxy.dataplane.tcpstats import TcpStats
from meshproxy.http1.errors import ConnectFailure, ProxyError

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.dataplane.destinations import EndpointRuntime, ServiceRuntime
    from meshproxy.dataplane.upstream import ConnectionPool

log = logging.getLogger("meshproxy.tcp")

# Client bytes held while the upstream connection is being opened.
PENDING_LIMIT = 64 * 1024

_PAUSE_PENDING = 1  # waiting for the upstream connection, buffer full
_PAUSE_UPSTREAM = 2  # the upstream's send buffer is full


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
    """The upstream side of a TcpProxy."""

    __slots__ = ("proxy", "transport")

    def __init__(self, proxy: "TcpProxy") -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        proxy.counts.received += len(data)
        if proxy.transport is not None:
            proxy.transport.write(data)

    def eof_received(self) -> bool:
        return self.proxy.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.proxy.pause(_PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        self.proxy.resume(_PAUSE_UPSTREAM)


class TcpProxy(asyncio.Protocol):
    """A client connection proxied as plain TCP to one endpoint of `runtime`.

    Made by the detection step, which then calls connection_made and hands over the bytes
    already read. `runtime` None: the connection is refused (an unknown destination under
    REGISTRY_ONLY, or an AuthorizationPolicy): closed at once."""

    __slots__ = (
        "context", "loop", "direction", "runtime", "transport", "tls", "counts", "upstream",
        "pending", "pending_bytes", "_paused", "client_eof", "upstream_ended", "closed",
        "endpoint", "task",
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
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._paused = 0
        self.client_eof = False
        self.upstream_ended = False
        self.closed = False
        self.endpoint: "EndpointRuntime | None" = None
        self.task: asyncio.Task | None = None

    # -- client side --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.tls = transport.get_extra_info("ssl_object") is not None
        if self.tls:
            self.context.metrics.tls_handshake(self.direction, "ok")
        self.context.connection_opened(self)
        self.context.metrics.connection_opened(self.direction, self.tls)
        self.counts.opened += 1
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
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)
            return
        if self.closed:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > PENDING_LIMIT:
            self.pause(_PAUSE_PENDING)

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_ended:
                return False  # both directions have ended: close
            if upstream.transport.can_write_eof():
                upstream.transport.write_eof()
            # else the EOF is held back (a request-then-EOF client still gets its answer);
            # the pair ends when the upstream closes.
        # A transport that cannot half-close (asyncio's TLS) closes after an EOF whatever
        # this returns (and warns about True): the pair then ends.
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.transport = None
        self.closed = True
        self.context.metrics.connection_closed(self.direction, self.tls)
        self.counts.closed += 1
        if self.task is not None:
            self.task.cancel()
            self.task = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            if exc is None:
                upstream.transport.close()  # after the bytes still buffered
            else:
                upstream.transport.abort()
        self._release()
        self.context.connection_closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream.
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

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
        if self.transport is None:  # the client left while connecting
            upstream.transport.close()
            self._release_endpoint()
            return
        self.upstream = upstream
        transport = upstream.transport
        if self.pending:
            pending, self.pending = self.pending, []
            self.pending_bytes = 0
            transport.writelines(pending)
            self.resume(_PAUSE_PENDING)
        if self.client_eof:
            if transport.can_write_eof():
                transport.write_eof()

    def upstream_eof(self) -> bool:
        self.upstream_ended = True
        client = self.transport
        if client is None or self.client_eof or not client.can_write_eof():
            # Both directions have ended, or the client cannot be half-closed: the server
            # is done, so the pair ends (closing the upstream closes the client once its
            # buffered bytes are sent).
            return False
        client.write_eof()
        upstream = self.upstream
        return upstream is not None and upstream.transport.can_write_eof()

    def upstream_lost(self, exc: Exception | None) -> None:
        self._release_endpoint()
        self.upstream = None
        client = self.transport
        if client is None:
            return
        self.closed = True
        if exc is None:
            client.close()  # after the bytes still buffered
        else:
            client.abort()

    def _release_endpoint(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None:
            return
        endpoint.pool.open_count -= 1
        if endpoint.load.in_flight > 0:
            endpoint.load.in_flight -= 1

    def _release(self) -> None:
        self.pending = []
        self.pending_bytes = 0
