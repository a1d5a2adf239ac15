"""One request's life through the proxy: resolve, pick, send, stream back, record.

An Exchange is driven by events from both connections: the downstream (client) side hands it
the request head, body pieces and the end of the request; the upstream side hands it the
response. Bodies stream straight through; nothing is buffered whole. Before the upstream
connection is ready, request bytes wait in a small buffer that pauses the client when full.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from http import HTTPStatus
from typing import TYPE_CHECKING

from meshproxy.dataplane.attempts import REPLAY_LIMIT, Resilience
from meshproxy.dataplane.mirror import MAX_MIRROR_BODY
from meshproxy.dataplane.routing import Redirect, route
from meshproxy.http1.errors import Overloaded, ProxyError, UpstreamReset
from meshproxy.http1.events import RequestHead, ResponseHead
from meshproxy.http1.writer import (
    LAST_CHUNK,
    chunk,
    informational_bytes,
    request_head_bytes,
    response_head_bytes,
)
from meshproxy.observability.trace import TraceContext
from meshproxy.policy.breaker import PROBING
from meshproxy.policy.filters import modify_headers
from meshproxy.policy.retry import CONNECT_FAILURE, IDEMPOTENT_METHODS, RESET, RetryRule

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.dataplane.destinations import EndpointRuntime, ServiceRuntime
    from meshproxy.dataplane.downstream import DownstreamConnection
    from meshproxy.dataplane.upstream import UpstreamConnection

# Request bytes held while the upstream connection is being set up; past this the client is
# paused rather than buffered without bound.
PENDING_BODY_LIMIT = 64 * 1024

_NO_TRACE = TraceContext(b"", b"", None, False)


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


class Exchange(Resilience):
    """A request and its response between one client connection and one upstream."""

    __slots__ = (
        "down", "head", "service", "endpoint", "upstream", "target", "started_at", "t0",
        "request_complete", "pending", "pending_bytes", "response", "response_chunked",
        "client_keep_alive", "finished", "request_bytes", "response_bytes", "connect_task",
        "upgrading", "reused_retry_done", "status", "out", "route", "response_modifiers",
        "mirrors", "mirror_body", "tunnel_pending", "route_rule", "tried", "retries", "replay",
        "replay_bytes", "sent", "try_open", "try_timer", "deadline_timer", "retry_timer",
        "retry_rule", "per_try", "counted", "fresh_only", "probe", "trace", "error",
    )

    def __init__(self, down: "DownstreamConnection", head: RequestHead) -> None:
        self.down = down
        self.head = head
        self.service: "ServiceRuntime | None" = None
        self.endpoint: "EndpointRuntime | None" = None
        self.upstream: "UpstreamConnection | None" = None
        self.target = head.target
        self.started_at = 0.0  # balancer start time of the current attempt
        self.t0 = down.loop.time()
        self.request_complete = False
        self.pending: list = []
        self.pending_bytes = 0
        # Bytes after a complete Upgrade request: the new protocol's, held until the upstream
        # agrees (101); never sent as HTTP, dropped if the upstream refuses.
        self.tunnel_pending: list = []
        self.response: ResponseHead | None = None
        self.response_chunked = False
        self.client_keep_alive = head.keep_alive
        self.finished = False
        self.request_bytes = 0
        self.response_bytes = 0
        self.connect_task: asyncio.Task | None = None
        self.upgrading = head.upgrade is not None
        self.reused_retry_done = False
        self.status = 0
        # Response bytes produced while handling one read from the upstream; written with one
        # writelines() (one system call) at the end of that read: a head and a small body then
        # leave together, which on these machines costs less than the Python around it.
        self.out: list = []
        self.route = "default"  # spec §6 route label: NAMESPACE/NAME/RULE once a route matched
        self.response_modifiers: list = []  # ResponseHeaderModifier filters of the route
        self.mirrors: list = []  # Services that get a copy of this request (RequestMirror)
        self.mirror_body: list | None = None  # the body kept for the copies, up to 64 KiB
        # Resilience (outbound): the matched route rule, endpoints tried, retries made, the
        # body kept for replay (None once it outgrew REPLAY_LIMIT), and the timers.
        self.route_rule = None
        self.tried: set | None = None
        self.retries = 0
        self.replay: list | None = None
        self.replay_bytes = 0
        self.sent = False  # this try's head was written upstream
        self.try_open = False  # between a try's balancer start and its outcome
        self.try_timer: asyncio.TimerHandle | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.retry_timer: asyncio.TimerHandle | None = None
        self.retry_rule: RetryRule | None = None
        self.per_try: float | None = None
        self.counted = False  # counted in the Service's requests in flight (maxRequests)
        self.fresh_only = False  # the next try must open a new connection
        self.probe = False  # this try is the half-open probe of an ejected endpoint
        self.trace = None  # observability.trace.TraceContext, from start()
        self.error: str | None = None  # spec §4 reason when the proxy ended the exchange

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resolve the destination, apply its routes, pick an endpoint and connect to it."""
        # This hop's span id goes into the head before anything copies it (mirrors, tries).
        self.trace = self.down.listener.trace.begin(self.head, self.down.transport)
        try:
            service, self.target = self.down.resolver.resolve(self.head, self.down)
            if service.routes is not None:
                self.service = service  # metrics name the parent until a backend is chosen
                service = route(self, service)
                if service.__class__ is Redirect:
                    self._redirect(service)
                    return
                if self.mirrors:
                    self._start_mirrors()
            self.service = service
            self._begin(service)
            self._attempt()
        except ProxyError as exc:
            self.fail(exc)

    def _start_mirrors(self) -> None:
        if not self.head.has_body:
            self._send_mirrors(None)
        elif self.head.content_length is None or self.head.content_length <= MAX_MIRROR_BODY:
            self.mirror_body = []  # sent when the request is complete (request_end)
        else:
            self.mirrors = []  # too large to keep a copy of: not mirrored

    def _send_mirrors(self, body: list | None) -> None:
        mirrors, self.mirrors = self.mirrors, []
        send = self.down.listener.mirrors.send
        for runtime in mirrors:
            send(runtime, self.head, self.target, body)

    def _request_read(self) -> bool:
        """True when nothing of the request is still to come from the client: it ended, or it
        has no body (its end is the very next event when the proxy answers from its head)."""
        return self.request_complete or not self.head.has_body

    def _redirect(self, redirect: Redirect) -> None:
        """Answer with the route's redirect; nothing goes upstream."""
        self.status = redirect.status
        keep = self.client_keep_alive and self._request_read() and not self.upgrading
        self.client_keep_alive = keep
        phrase = HTTPStatus(redirect.status).phrase
        head = (f"HTTP/1.1 {redirect.status} {phrase}\r\nlocation: {redirect.location}\r\n"
                f"content-length: 0\r\n{'' if keep else 'connection: close' + chr(13) + chr(10)}"
                "\r\n")
        self.down.write(head.encode("latin-1"))
        self._finish()

    def _attempt(self) -> None:
        """Start one try: pick an endpoint (not one tried already, where there is another),
        then an idle connection to it or a new one. Raises ProxyError."""
        service = self.service
        endpoint = self.endpoint = service.pick(self.tried)
        breaker = service.breaker
        if breaker is not None and not breaker.all_ready:
            # pick() hands out a PROBING endpoint only as its probe.
            self.probe = breaker.health(endpoint.key).state == PROBING
        self.started_at = endpoint.load.start()
        self.try_open = True
        self.sent = False
        if self.per_try:
            self.try_timer = self.down.loop.call_later(self.per_try, self._try_timed_out)
        conn = None if self.fresh_only else endpoint.pool.take_idle()
        self.fresh_only = False
        if conn is not None:
            self._attach(conn)
            return
        if service.at_connection_limit():  # the rule plain TCP connections follow too
            raise Overloaded(f"{service.key}: connection limit reached")
        # Counted from here, not when the task first runs: the other requests of a burst
        # that arrived in the same read are checked before any task has run. The task's
        # done callback uncounts it however it ends, even cancelled before it started.
        service.connecting += 1
        task = self.connect_task = self.down.loop.create_task(self._connect(endpoint))
        task.add_done_callback(service.connect_ended)

    async def _connect(self, endpoint: "EndpointRuntime") -> None:
        try:
            conn = await endpoint.pool.connect()
        except ProxyError as exc:
            self.connect_task = None
            if not self.finished:
                self._try_failed(exc, CONNECT_FAILURE)
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        if self.finished:
            endpoint.pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: "UpstreamConnection") -> None:
        self.upstream = conn
        self.sent = True
        conn.exchange = self
        conn.requests += 1
        if self.down._writing_paused:
            # The client is still behind on an earlier response: pause_writing() will not be
            # called again for it, so this connection starts paused (resume_writing() resumes).
            conn.transport.pause_reading()
        head = self.head
        conn.reader.expect(head.method == b"HEAD")
        if head.request_id is None:
            head.request_id = self.down.listener.request_ids()
            # Kept in the head, so that a retry sends the same id as the first try.
            head.headers.append((b"x-request-id", head.request_id))
        parts = [request_head_bytes(head, self.target, upgrade=self.upgrading)]
        if self.pending:
            pending, self.pending = self.pending, []
            # What is left counted is held tunnel bytes (tunnel_pending), if any.
            self.pending_bytes -= sum(map(len, pending))
            if head.chunked:
                for data in pending:
                    parts += chunk(data)
            else:
                parts += pending
            if self.pending_bytes <= PENDING_BODY_LIMIT:
                self.down.resume_reading(self.down.PAUSE_BUFFER)
        if self.request_complete and head.chunked:
            parts.append(LAST_CHUNK)
        conn.transport.writelines(parts)

    # -- request side (from the downstream connection) ----------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body (or, after an Upgrade request, tunnel bytes) arrived."""
        self.request_bytes += len(data)
        if self.upgrading and self.request_complete:
            if not self.finished:
                self.tunnel_pending.append(data)
                self.pending_bytes += len(data)
                if self.pending_bytes > PENDING_BODY_LIMIT:
                    self.down.pause_reading(self.down.PAUSE_BUFFER)
            return
        if self.replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes <= REPLAY_LIMIT:
                self.replay.append(data)
            else:
                self.replay = None  # past the retry buffer: not retried once bytes were sent
        if self.mirror_body is not None:
            self.mirror_body.append(data)
            if len(self.mirror_body) > 1 and sum(map(len, self.mirror_body)) > MAX_MIRROR_BODY:
                self.mirror_body = None  # too large to keep a copy of: not mirrored
                self.mirrors = []
        conn = self.upstream
        if conn is not None:
            if self.head.chunked:
                conn.transport.writelines(chunk(data))
            else:
                conn.transport.write(data)
            return
        if self.finished:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > PENDING_BODY_LIMIT:
            self.down.pause_reading(self.down.PAUSE_BUFFER)

    def request_end(self) -> None:
        """The client finished sending the request."""
        self.request_complete = True
        if self.mirror_body is not None:
            body, self.mirror_body = self.mirror_body, None
            self._send_mirrors(body)
        conn = self.upstream
        if conn is not None and self.head.chunked:
            conn.transport.write(LAST_CHUNK)

    def upstream_write_paused(self) -> None:
        self.down.pause_reading(self.down.PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self.down.resume_reading(self.down.PAUSE_UPSTREAM)

    # -- response side (from the upstream connection) -----------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        """Forward the response head; interim 1xx responses pass through as they come."""
        down = self.down
        if head.informational:
            self.out.append(informational_bytes(head))
            return
        if self.try_open:
            if head.status >= 500 and self.service.budget is not None:
                reason = self._retry_reason(str(head.status))
                if reason is not None:
                    # Not forwarded: this response is dropped with its connection.
                    conn, self.upstream = self.upstream, None
                    conn.exchange = None
                    conn.abort()
                    self._end_try(False)
                    self._schedule_retry(reason)
                    return
            self._end_try(head.status < 500)
        self.response = head
        self.status = head.status
        for modifier in self.response_modifiers:
            head.headers = modify_headers(head.headers, modifier)
        if head.status == 101:
            return  # the Upgrade event follows at once
        if self.upgrading:
            # The upstream refused the upgrade: answer normally, then the client connection
            # must close, since the client may already have sent non-HTTP bytes.
            self.upgrading = False
            self.client_keep_alive = False
        keep = self.client_keep_alive and not down.closing_after_response()
        has_body = not (self.head.method == b"HEAD" or head.status in (204, 304))
        chunked = False
        if has_body and (head.chunked or head.close_delimited):
            if self.head.version == "1.1":
                chunked = True  # keep the client connection even if the upstream closes
            else:
                keep = False  # HTTP/1.0 client: the end of the body is the close
        self.client_keep_alive = keep
        self.response_chunked = chunked
        self.out.append(response_head_bytes(head, chunked=chunked, keep_alive=keep,
                                            client_version=self.head.version))

    def response_body(self, data: bytes) -> None:
        self.response_bytes += len(data)
        if self.response_chunked:
            self.out += chunk(data)
        else:
            self.out.append(data)

    def flush(self) -> None:
        """Write the response bytes gathered from one upstream read."""
        out = self.out
        if out:
            self.out = []
            self.down.writelines(out)

    def response_end(self) -> None:
        """The response ended: finish the exchange and return the connection to its pool."""
        if self.response_chunked:
            self.out.append(LAST_CHUNK)
        self.flush()
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.exchange = None
            if self.response.keep_alive and self.request_complete:
                self.endpoint.pool.release(conn)
            else:
                conn.close()
        if not self.request_complete:
            # The upstream answered before the request body ended (e.g. 413): the rest of the
            # body has nowhere to go, so the client connection ends after this response.
            self.client_keep_alive = False
        self._finish()

    def response_upgrade(self, rest: bytes) -> None:
        """101 Switching Protocols: both connections become a byte tunnel."""
        head = self.response
        conn = self.upstream
        down = self.down
        if head is None or head.status != 101 or not self.upgrading:
            self.upstream_failed(ProxyError("unexpected protocol switch"))
            return
        self.out.append(response_head_bytes(head, chunked=False, keep_alive=True,
                                            client_version=self.head.version))
        if rest:
            self.out.append(rest)
        self.flush()
        pending, self.tunnel_pending = self.tunnel_pending, []
        conn.exchange = None
        self.upstream = None
        self._record()
        self.finished = True
        down.start_tunnel(conn, pending)

    # -- failures -------------------------------------------------------------------------------

    def upstream_failed(self, error: ProxyError, reset: bool = False) -> None:
        """The upstream broke the protocol or the connection mid-exchange."""
        if self.finished:
            conn, self.upstream = self.upstream, None
            if conn is not None:
                conn.exchange = None
                conn.abort()
            return
        if self.response is None:
            self._try_failed(UpstreamReset(str(error)) if reset else error, RESET)
        else:
            conn, self.upstream = self.upstream, None
            if conn is not None:
                conn.exchange = None
                conn.abort()
            self.error = UpstreamReset.reason if reset else error.reason
            self._abort_client()

    def upstream_lost(self) -> None:
        """The upstream connection closed while this exchange was using it."""
        conn = self.upstream
        if self.finished:
            self.upstream = None
            return
        if self.response is not None:
            self.upstream = None
            self.error = UpstreamReset.reason
            self._abort_client()
            return
        if (conn is not None and conn.requests > 1 and not self.reused_retry_done
                and not self.upgrading and self._replayable()
                and (self.retry_rule is None or self.retry_rule.non_idempotent
                     or self.head.method.decode("latin-1") in IDEMPOTENT_METHODS)):
            # A reused keep-alive connection that the server had just closed (the idle
            # race): the app did not take the request, so it goes once more on a fresh
            # connection, without counting as a retry or against the endpoint.
            self.upstream = None
            self.reused_retry_done = True
            self._end_try(None)
            self.fresh_only = True
            self._retry()
            return
        self._try_failed(UpstreamReset("upstream closed before responding"), RESET)

    def fail(self, error: ProxyError) -> None:
        """End the exchange with the proxy's own error response (spec §4)."""
        if self.finished:
            return
        self.error = error.reason
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.abort()
        if self.response is not None:
            self._abort_client()
            return
        self.status = error.status
        keep = self.client_keep_alive and self._request_read() and not self.upgrading
        self.client_keep_alive = keep
        self.down.write_error(error, keep_alive=keep)
        self._finish()

    def _abort_client(self) -> None:
        # The response already started: the only honest signal left is a broken connection.
        self.flush()
        self.client_keep_alive = False
        self.status = self.status or 502
        self._record()
        self.finished = True
        self.down.exchange_aborted(self)

    def downstream_lost(self) -> None:
        """The client went away: stop the upstream side too."""
        if self.finished:
            return
        self.finished = True
        self._cancel_timers()
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.abort()
        self._end_try(None)
        if self.counted:
            self.counted = False
            self.service.active -= 1
        if self.trace is not None:  # started: its span and log line say the client left
            self.error = "client-disconnected"
            self._observe(self.down.loop.time() - self.t0)

    # -- the end --------------------------------------------------------------------------------

    def _record(self) -> None:
        self._end_try(None)
        if (self.deadline_timer is not None or self.retry_timer is not None
                or self.connect_task is not None):
            self._cancel_timers()
        if self.counted:
            self.counted = False
            self.service.active -= 1
        down = self.down
        service = self.service.key if self.service is not None else "unknown"
        duration = down.loop.time() - self.t0
        down.metrics.request_finished(
            down.direction, service, self.route, self.status, duration,
            self.request_bytes, self.response_bytes,
        )
        trace = self.trace
        if (trace is not None and trace.span is not None) or down.listener.access_log is not None:
            self._observe(duration)

    def _observe(self, duration: float) -> None:
        """End the span (when one is recorded) and write the access-log line (when on)."""
        down = self.down
        listener = down.listener
        trace = self.trace
        service = self.service.key if self.service is not None else "unknown"
        endpoint = self.endpoint.key if self.endpoint is not None else None
        attempts = self.retries + 1 if self.endpoint is not None else 0
        head = self.head
        if trace is not None and trace.span is not None:
            listener.trace.end(trace, status=self.status, error=self.error, route=self.route,
                               service=service, endpoint=endpoint, attempts=attempts,
                               request_id=head.request_id)
        access_log = listener.access_log
        if access_log is not None:
            if trace is None:  # not started (it always is by now): ids left empty
                trace = _NO_TRACE
            access_log.record(
                self.t0, trace.trace_id, trace.span_id, trace.parent_id, head.request_id,
                down.direction, head.method, head.host, head.target, endpoint, attempts,
                self.status, duration, self.request_bytes, self.response_bytes, self.route,
                service, self.error, down.peer_address(),
            )

    def _finish(self) -> None:
        self._record()
        self.finished = True
        self.down.exchange_done(self)
