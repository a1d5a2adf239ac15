"""What every connection and request of one listener shares: the listener's context.

A `ListenerContext` is built once per listener, from the configuration, before the listener
exists (`Proxy.make_listener`: settings → context → listener), and is never changed after: the
resolver it holds is already the one the listener's mode needs (transparent or not), the
timeouts are the settings'. Connections and exchanges read it; none of them reaches through
the listener or another connection for these things.

It also keeps the set of open connections and the drain flag, which the listener's drain
reads and every connection updates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random

from meshproxy.dataplane.mirror import Mirrors
from meshproxy.dataplane.resolvers import Resolver
from meshproxy.dataplane.tls import TLSState
from meshproxy.http2.codec import Settings
from meshproxy.observability.metrics import ProxyMetrics
from meshproxy.observability.record import RequestRecord
from meshproxy.observability.trace import Tracing

# Spec §3 "client side": header read timeout and idle keep-alive.
HEADER_TIMEOUT = 10.0
CLIENT_IDLE_TIMEOUT = 75.0

log = logging.getLogger("meshproxy.proxy")

# Every request a sidecar forwards carries its mark for the listener's direction in this
# header, kept by every hop after it (as RFC 9110's Via is): a request that comes back to the
# same sidecar in the same direction brings that sidecar's own mark back, and is a loop.
HOP_HEADER = b"x-meshproxy-hop"
# This process's part of the marks: random, so that no two sidecars share one.
SIDECAR_TOKEN = os.urandom(6).hex().encode()
# Loop sources logged per listener, at most (then loops are only counted).
LOOP_SOURCES_LOGGED = 256


class RequestIds:
    """`x-request-id` values for requests that come without one, shaped like UUID 4.

    The first 20 hex digits are drawn once per proxy (62 random bits, version and variant set),
    the last 12 count up from a random start: unique within a proxy by construction and across
    proxies by the random part, at the cost of a format per request rather than 128 fresh
    random bits and five slices.
    """

    __slots__ = ("_prefix", "_next")

    def __init__(self, rng: random.Random) -> None:
        h = b"%020x" % rng.getrandbits(80)
        variant = b"89ab"[rng.getrandbits(2)]
        self._prefix = b"%s-%s-4%s-%c%s-" % (h[:8], h[8:12], h[13:16], variant, h[17:20])
        self._next = itertools.count(rng.getrandbits(40)).__next__

    def __call__(self) -> bytes:
        """Return the next id."""
        return b"%s%012x" % (self._prefix, self._next() & 0xFFFFFFFFFFFF)


class ListenerContext:
    """One listener's shared parts: loop, direction, resolver, metrics, random source, request
    ids, trace propagation, mirrors, access log, client timeouts, TLS state; and its open
    connections and drain flag."""

    __slots__ = (
        "loop", "direction", "resolver", "metrics", "rng", "request_ids", "trace", "mirrors",
        "access_log", "header_timeout", "idle_timeout", "tick", "tls", "connections",
        "draining", "_idle_waiter", "h2_settings", "hop_mark", "loop_sources",
        "relay_sockets",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, resolver: Resolver,
                 metrics: ProxyMetrics, rng: random.Random, *,
                 tracing: Tracing | None = None, access_log=None,
                 header_timeout: float = HEADER_TIMEOUT,
                 idle_timeout: float = CLIENT_IDLE_TIMEOUT, tls: TLSState | None = None) -> None:
        """`resolver`: maps a request to its Service (dataplane/resolvers.py, or transparent
        mode's); its `direction` is the listener's. `tls`: with it, an inbound listener
        decides per connection between TLS and plaintext (dataplane/tls.py)."""
        self.loop = loop
        self.resolver = resolver
        self.direction: str = resolver.direction
        self.metrics = metrics
        self.rng = rng
        self.request_ids = RequestIds(rng)
        # Trace context of every request (spec §4); spans only with a configured exporter.
        self.trace = (tracing or Tracing()).propagator(self.direction, rng)
        self.mirrors = Mirrors(loop)
        self.access_log = access_log  # observability.accesslog.AccessLog, or None (off)
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        # A connection's one timer fires at least this often (downstream.py's _arm).
        self.tick = min(header_timeout, idle_timeout)
        self.tls = tls
        self.connections: set = set()  # client connections open on this listener
        self.draining = False
        self._idle_waiter: asyncio.Future | None = None
        # What HTTP/2 client connections are offered and held to (http2/codec.py).
        self.h2_settings = Settings()
        # This sidecar's mark in HOP_HEADER for this direction, e.g. b"outbound-3f9a2c1b0d4e".
        self.hop_mark = self.direction.encode() + b"-" + SIDECAR_TOKEN
        self.loop_sources: set[str] = set()  # where loops came from, each logged once
        # The local (host, port) of each TCP connection this listener's relays opened: one
        # that arrives back here from such an address is a loop (dataplane/tcpproxy.py).
        self.relay_sockets: set[tuple] = set()

    def tls_refused(self, reason: str) -> None:
        """Count a connection refused before any request (TLS required, handshake failed)."""
        self.metrics.tls_handshake(self.direction, "refused-" + reason.split(":")[0])

    def connection_opened(self, conn) -> None:
        self.connections.add(conn)

    def connection_closed(self, conn) -> None:
        """`conn` closed: forget it, and wake a drain waiting for the last one."""
        self.connections.discard(conn)
        waiter = self._idle_waiter
        if waiter is not None and not self.connections and not waiter.done():
            waiter.set_result(None)

    def loop_detected(self, source: str | None, what: str) -> None:
        """A request (or TCP connection) came back to this listener: say so once per source,
        with the likely causes, since every pass of a loop looks like the first."""
        source = source.rsplit(":", 1)[0] if source else "an unknown address"
        if source in self.loop_sources or len(self.loop_sources) >= LOOP_SOURCES_LOGGED:
            return
        self.loop_sources.add(source)
        if self.direction == "inbound":
            causes = ("traffic is intercepted (meshproxy init rules) but the sidecar runs "
                      "without --transparent, so it sends the app's traffic back to itself; "
                      "or the app address it forwards to is its own inbound listener")
        else:
            causes = ("a route or Service whose endpoints lead back to this sidecar (its own "
                      "outbound listener), or interception (meshproxy init rules) of the "
                      "sidecar's own connections: run it with --transparent, as the user the "
                      "rules exclude")
        log.warning("request loop: %s from %s came back to this sidecar's %s listener, "
                    "refused with 508 loop-detected; likely cause: %s", what, source,
                    self.direction, causes)

    def request_finished(self, record: RequestRecord, count: bool = True) -> None:
        """A request ended: count it in the metrics (unless not `count`: the client left
        before it was answered), end its span (when one is recorded) and write its access-log
        line (when the log is on), all from its one record."""
        duration = self.loop.time() - record.start
        if count:
            self.metrics.request_finished(record.direction, record.service, record.route,
                                          record.status, duration, record.request_bytes,
                                          record.response_bytes, record.grpc_status)
        trace = record.trace
        if trace is not None and trace.span is not None:
            self.trace.end_request(record)
        if self.access_log is not None:
            self.access_log.log_request(record, duration)

    async def wait_closed(self) -> None:
        """Wait until every open connection has closed."""
        if not self.connections:
            return
        self._idle_waiter = self.loop.create_future()
        await self._idle_waiter
