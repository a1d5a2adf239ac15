"""One request's life through the proxy, in the order it happens: resolve the Service, route,
pick an endpoint, connect (or take a pooled connection), send the head and stream the body,
stream the response back, and record the outcome once. Failed tries go round again through
the request's `Attempts` (outbound only).

An Exchange is driven by events from both connections: its client connection
(dataplane/client.py) hands it the request head, body pieces and the end of the request; the
upstream connection (dataplane/upstream.py) hands it the response. Bodies stream straight
through; nothing is buffered whole. Before the upstream connection is ready, request bytes
wait in a small buffer that pauses the client when full.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from meshproxy.dataplane.attempts import Attempts, attempts_for
from meshproxy.dataplane.client import PAUSE_BUFFER, PAUSE_UPSTREAM, ClientConnection
from meshproxy.dataplane.destinations import EndpointRuntime, ServiceRuntime
from meshproxy.dataplane.mirror import MirrorCopy
from meshproxy.dataplane.routing import route
from meshproxy.dataplane.tries import EndpointTry
from meshproxy.dataplane.upstream import ResponseReceiver, UpstreamConnection
from meshproxy.http1.errors import Overloaded, ProxyError, Timeout, UpstreamReset
from meshproxy.http1.events import RequestHead, ResponseHead
from meshproxy.http1.writer import (
    LAST_CHUNK,
    chunk,
    informational_bytes,
    redirect_bytes,
    request_parts,
    response_framing,
    response_head_bytes,
)
from meshproxy.config.model.route import HeaderModifier
from meshproxy.observability.record import RequestRecord
from meshproxy.policy.filters import modify_headers
from meshproxy.policy.retry import CONNECT_FAILURE, IDEMPOTENT_METHODS, RESET, TIMEOUT

# Request bytes held while the upstream connection is being set up; past this the client is
# paused rather than buffered without bound.
PENDING_BODY_LIMIT = 64 * 1024


class Exchange(ResponseReceiver):
    """A request and its response between one client connection and one upstream."""

    # The Service the request goes to: set by start() before any try (the route's backend
    # for a routed request).
    service: ServiceRuntime

    __slots__ = (
        "client", "context", "head", "record", "service", "endpoint_try", "upstream",
        "target", "request_complete", "pending", "pending_bytes", "tunnel_pending", "response",
        "response_chunked", "client_keep_alive", "finished", "connect_task", "upgrading",
        "reused_retry_done", "out", "response_modifiers", "mirror", "attempts", "counted",
        "fresh_only",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        context = self.context = client.context
        self.client = client
        self.head = head
        self.record = RequestRecord(context.loop.time(), context.direction)
        self.endpoint_try = EndpointTry()  # the current try's endpoint and books
        self.upstream: UpstreamConnection | None = None
        self.target = head.target
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
        self.connect_task: asyncio.Task | None = None
        self.upgrading = head.upgrade is not None
        self.reused_retry_done = False
        # Response bytes produced while handling one read from the upstream; written with one
        # writelines() (one system call) at the end of that read: a head and a small body then
        # leave together, which on these machines costs less than the Python around it.
        self.out: list = []
        self.response_modifiers: Sequence[HeaderModifier] = ()  # the route's ResponseHeaderModifiers
        self.mirror: MirrorCopy | None = None  # copies waiting for the request's body
        self.attempts: Attempts | None = None  # retries and timeouts (outbound only)
        self.counted = False  # counted in the Service's requests in flight (maxRequests)
        self.fresh_only = False  # the next try must open a new connection

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resolve the destination, apply its routes, pick an endpoint and connect to it."""
        context = self.context
        head = self.head
        record = self.record
        # This hop's span id goes into the head before anything copies it (mirrors, tries).
        record.trace = context.trace.begin(head, self.client.transport)
        try:
            client = self.client
            service, self.target = context.resolver.resolve(head, client.peer_id, client.original)
            record.service = service.key  # metrics name the parent until a backend is chosen
            route_rule = None
            if service.routes is not None:
                routed = route(head, self.target, service, context.resolver, context.rng)
                record.route = routed.label
                self.target = routed.target
                if routed.redirect is not None:
                    self._redirect(routed.redirect.status, routed.redirect.location)
                    return
                if routed.failure is not None:
                    raise routed.failure
                if routed.mirrors:
                    self.mirror = context.mirrors.start(routed.mirrors, head, self.target)
                self.response_modifiers = routed.response_modifiers
                route_rule = routed.rule
                backend = routed.service
                assert backend is not None  # neither a redirect nor a failure
                service = backend
                record.service = service.key
            self.service = service
            if service.active >= service.max_requests:
                raise Overloaded(f"{service.key}: {service.max_requests} requests in flight")
            service.active += 1
            self.counted = True
            attempts = self.attempts = attempts_for(service, route_rule, head, self.upgrading,
                                                    context.loop, context.rng, context.metrics)
            if attempts is not None:
                attempts.start_deadline(self._request_timed_out)
            self._attempt()
        except ProxyError as exc:
            self.fail(exc)

    def _request_read(self) -> bool:
        """True when nothing of the request is still to come from the client: it ended, or it
        has no body (its end is the very next event when the proxy answers from its head)."""
        return self.request_complete or not self.head.has_body

    def _redirect(self, status: int, location: str) -> None:
        """Answer with the route's redirect; nothing goes upstream."""
        self.record.status = status
        keep = self.client_keep_alive and self._request_read() and not self.upgrading
        self.client_keep_alive = keep
        self.client.write(redirect_bytes(status, location, keep_alive=keep))
        self._finish()

    def _attempt(self) -> None:
        """Start one try: pick an endpoint (not one tried already, where there is another),
        then an idle connection to it or a new one. Raises ProxyError."""
        service = self.service
        attempts = self.attempts
        endpoint = self.endpoint_try.begin(service, attempts.tried if attempts is not None else None)
        if attempts is not None:
            attempts.try_started(self._try_timed_out)
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
        task = self.connect_task = self.context.loop.create_task(self._connect(endpoint))
        task.add_done_callback(service.connect_ended)

    async def _connect(self, endpoint: EndpointRuntime) -> None:
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

    def _attach(self, conn: UpstreamConnection) -> None:
        """Send the request (head, and the body received so far) on `conn`."""
        self.upstream = conn
        self.endpoint_try.sent = True
        conn.exchange = self
        conn.requests += 1
        client = self.client
        if client.writing_paused:
            # The client is still behind on an earlier response: pause_writing() will not be
            # called again for it, so this connection starts paused (resume_writing() resumes).
            conn.transport.pause_reading()
        head = self.head
        conn.reader.expect(head.method == b"HEAD")
        if head.request_id is None:
            head.request_id = self.context.request_ids()
            # Kept in the head, so that a retry sends the same id as the first try.
            head.headers.append((b"x-request-id", head.request_id))
        pending = self.pending
        conn.transport.writelines(request_parts(head, self.target, pending,
                                                complete=self.request_complete,
                                                upgrade=self.upgrading))
        if pending:
            self.pending = []
            # What is left counted is held tunnel bytes (tunnel_pending), if any.
            self.pending_bytes -= sum(map(len, pending))
            if self.pending_bytes <= PENDING_BODY_LIMIT:
                client.resume_reading(PAUSE_BUFFER)

    # -- request side (from the client connection) ----------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body (or, after an Upgrade request, tunnel bytes) arrived."""
        self.record.request_bytes += len(data)
        if self.upgrading and self.request_complete:
            if not self.finished:
                self.tunnel_pending.append(data)
                self.pending_bytes += len(data)
                if self.pending_bytes > PENDING_BODY_LIMIT:
                    self.client.pause_reading(PAUSE_BUFFER)
            return
        if self.attempts is not None:
            self.attempts.keep(data)
        if self.mirror is not None:
            self.mirror.keep(data)
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
            self.client.pause_reading(PAUSE_BUFFER)

    def request_end(self) -> None:
        """The client finished sending the request."""
        self.request_complete = True
        if self.mirror is not None:
            mirror, self.mirror = self.mirror, None
            mirror.request_complete()
        conn = self.upstream
        if conn is not None and self.head.chunked:
            conn.transport.write(LAST_CHUNK)

    def upstream_write_paused(self) -> None:
        self.client.pause_reading(PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self.client.resume_reading(PAUSE_UPSTREAM)

    # -- response side (from the upstream connection) -----------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        """Forward the response head; interim 1xx responses pass through as they come."""
        if head.informational:
            self.out.append(informational_bytes(head))
            return
        if self.endpoint_try.open:
            if head.status >= 500 and self.attempts is not None:
                reason = self._reason_to_retry(str(head.status))
                if reason is not None:
                    # Not forwarded: this response is dropped with its connection.
                    self._drop_upstream()
                    self._end_try(False)
                    self._schedule_retry(reason)
                    return
            self._end_try(head.status < 500)
        self.response = head
        self.record.status = head.status
        for modifier in self.response_modifiers:
            head.headers = modify_headers(head.headers, modifier)
        if head.status == 101:
            return  # the Upgrade event follows at once
        if self.upgrading:
            # The upstream refused the upgrade: answer normally, then the client connection
            # must close, since the client may already have sent non-HTTP bytes.
            self.upgrading = False
            self.client_keep_alive = False
        chunked, keep = response_framing(
            self.head, head, self.client_keep_alive and not self.client.closing_after_response())
        self.client_keep_alive = keep
        self.response_chunked = chunked
        self.out.append(response_head_bytes(head, chunked=chunked, keep_alive=keep,
                                            client_version=self.head.version))

    def response_body(self, data: bytes) -> None:
        self.record.response_bytes += len(data)
        if self.response_chunked:
            self.out += chunk(data)
        else:
            self.out.append(data)

    def flush(self) -> None:
        """Write the response bytes gathered from one upstream read."""
        out = self.out
        if out:
            self.out = []
            self.client.writelines(out)

    def response_end(self) -> None:
        """The response ended: finish the exchange and return the connection to its pool."""
        if self.response_chunked:
            self.out.append(LAST_CHUNK)
        self.flush()
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.exchange = None
            response = self.response
            if response is not None and response.keep_alive and self.request_complete:
                conn.pool.release(conn)
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
        if head is None or conn is None or head.status != 101 or not self.upgrading:
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
        self.client.start_tunnel(conn, pending)

    # -- failures -------------------------------------------------------------------------------

    def _drop_upstream(self) -> None:
        """Abort the upstream connection of this try; it carries nothing more of it."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.abort()

    def upstream_failed(self, error: ProxyError, reset: bool = False) -> None:
        """The upstream broke the protocol or the connection mid-exchange."""
        if self.finished:
            self._drop_upstream()
            return
        if self.response is None:
            self._try_failed(UpstreamReset(str(error)) if reset else error, RESET)
        else:
            self._drop_upstream()
            self.record.error = UpstreamReset.reason if reset else error.reason
            self._abort_client()

    def upstream_lost(self) -> None:
        """The upstream connection closed while this exchange was using it."""
        conn = self.upstream
        if self.finished:
            self.upstream = None
            return
        if self.response is not None:
            self.upstream = None
            self.record.error = UpstreamReset.reason
            self._abort_client()
            return
        attempts = self.attempts
        if (conn is not None and conn.requests > 1 and not self.reused_retry_done
                and not self.upgrading and self._replayable()
                and (attempts is None or attempts.rule.non_idempotent
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

    def _replayable(self) -> bool:
        """Whether the whole request can be sent again: no body, or all of it kept."""
        if not self.head.has_body:
            return True
        attempts = self.attempts
        return attempts is not None and attempts.replay is not None and self.request_complete

    def _try_failed(self, error: ProxyError, kind: str) -> None:
        """A try failed before any of its response reached the client: retry it when the
        rules and the budget allow, else answer with `error`."""
        self._drop_upstream()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._end_try(False)
        if self.finished:
            return
        reason = self._reason_to_retry(kind)
        if reason is None:
            self.fail(error)
            return
        self._schedule_retry(reason)

    def _schedule_retry(self, reason: str) -> None:
        """Retry (after the backoff) away from the endpoint of the try that just failed."""
        attempts, endpoint = self.attempts, self.endpoint_try.endpoint
        assert attempts is not None and endpoint is not None  # there was a reason to retry
        attempts.schedule(reason, endpoint.key, self._retry)

    def _reason_to_retry(self, kind: str) -> str | None:
        attempts = self.attempts
        if attempts is None or self.upgrading:
            return None
        return attempts.reason_to_retry(self.head, kind, sent=self.endpoint_try.sent,
                                        request_complete=self.request_complete)

    def _retry(self) -> None:
        if self.finished:
            return
        if self.endpoint_try.sent:
            # The failed try took the body received so far: send the kept copy again.
            attempts = self.attempts
            self.pending = attempts.body_to_send_again() if attempts is not None else []
            self.pending_bytes = sum(map(len, self.pending))
        try:
            self._attempt()
        except ProxyError as exc:
            self.fail(exc)

    def _end_try(self, success: bool | None) -> None:
        """Close the current try's books (tries.py) and its per-try timer, if a try is open."""
        if self.endpoint_try.open:
            self.endpoint_try.end(self.service, success, self.context.metrics)
            if self.attempts is not None:
                self.attempts.try_ended()

    def _try_timed_out(self) -> None:
        if self.finished or self.response is not None or not self.endpoint_try.open:
            return
        self._try_failed(Timeout("per-try timeout"), TIMEOUT)

    def _request_timed_out(self) -> None:
        if self.finished:
            return
        if self.response is None:
            self._end_try(False)
            self.fail(Timeout("request timeout"))
        else:
            self._drop_upstream()
            self.record.error = Timeout.reason
            self._abort_client()

    def fail(self, error: ProxyError) -> None:
        """End the exchange with the proxy's own error response (spec §4)."""
        if self.finished:
            return
        self.record.error = error.reason
        self._drop_upstream()
        if self.response is not None:
            self._abort_client()
            return
        self.record.status = error.status
        keep = self.client_keep_alive and self._request_read() and not self.upgrading
        self.client_keep_alive = keep
        self.client.write_error(error, keep_alive=keep)
        self._finish()

    def _abort_client(self) -> None:
        # The response already started: the only honest signal left is a broken connection.
        self.flush()
        self.client_keep_alive = False
        self.record.status = self.record.status or 502
        self._record()
        self.finished = True
        self.client.exchange_aborted(self)

    def downstream_lost(self) -> None:
        """The client went away: stop the upstream side too."""
        if self.finished:
            return
        self.finished = True
        self._drop_upstream()
        self._close_books()
        if self.record.trace is not None:  # started: its span and log line say the client left
            self.record.error = "client-disconnected"
            self.context.request_finished(self._completed_record(), count=False)

    # -- the end --------------------------------------------------------------------------------

    def _close_books(self) -> None:
        """End the try, the timers and the in-flight count."""
        self._end_try(None)
        if self.attempts is not None:
            self.attempts.cancel()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.counted:
            self.counted = False
            self.service.active -= 1

    def _completed_record(self) -> RequestRecord:
        record = self.record
        head = self.head
        record.method = head.method
        record.authority = head.host
        record.target = head.target
        record.request_id = head.request_id
        record.peer = self.client.peer_address()
        endpoint = self.endpoint_try.endpoint
        if endpoint is not None:
            record.endpoint = endpoint.key
            record.attempts = self.attempts.retries + 1 if self.attempts is not None else 1
        return record

    def _record(self) -> None:
        self._close_books()
        self.context.request_finished(self._completed_record())

    def _finish(self) -> None:
        self._record()
        self.finished = True
        self.client.exchange_done(self)
