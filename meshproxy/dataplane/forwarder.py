"""Getting one request to an endpoint, try after try, and its response back to the exchange.

A `Forwarder` is the upstream half of an exchange (dataplane/exchange.py). Once the exchange
knows the Service, `start` checks its limits, gives an outbound request its `Attempts`
(retries and timeouts, dataplane/attempts.py) and begins the first try: an endpoint
(dataplane/tries.py), then an idle pooled connection to it or a new one
(dataplane/upstream.py). The head and the body received so far go out, the rest of the body
streams after them; before a connection is ready, body bytes wait in a small buffer that
pauses the client when full.

The forwarder is its upstream connection's `ResponseReceiver`. A try that fails before any of
its response was accepted (connect failure, reset, per-try timeout, a retryable status) ends
its books and goes round again when the Attempts allow; otherwise the failure, or the response,
goes to the exchange through its `ResponseSink` calls (dataplane/sink.py).
"""

from __future__ import annotations

import asyncio

from meshproxy.dataplane.attempts import Attempts, attempts_for
from meshproxy.dataplane.client import PAUSE_BUFFER, PAUSE_UPSTREAM, ClientConnection
from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.destinations import EndpointRuntime, ServiceRuntime
from meshproxy.dataplane.sink import DETACHED, ResponseSink
from meshproxy.dataplane.tries import EndpointTry
from meshproxy.dataplane.upstream import ResponseReceiver, UpstreamConnection
from meshproxy.http1.errors import Overloaded, ProxyError, Timeout, UpstreamReset
from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead
from meshproxy.dataplane.h2upstream import Http2Pool
from meshproxy.http2.grpc import (
    RETRY_STATUS_NAMES,
    is_grpc,
    request_timeout,
    set_timeout,
    trailers_only_status,
)
from meshproxy.policy.retry import (
    CONNECT_FAILURE,
    IDEMPOTENT_METHODS,
    REFUSED_STREAM,
    RESET,
    TIMEOUT,
    grpc_rule,
)

# Request bytes held while the upstream connection is being set up; past this the client is
# paused rather than buffered without bound.
PENDING_BODY_LIMIT = 64 * 1024


class Forwarder(ResponseReceiver):
    """The tries of one request, its upstream connection and the request bytes it sends."""

    # The Service the request goes to: set by start() (before any try).
    service: ServiceRuntime

    __slots__ = (
        "sink", "client", "context", "head", "target", "service", "endpoint_try", "attempts",
        "upstream", "connect_task", "request_complete", "pending", "pending_bytes",
        "tunnel_pending", "upgrading", "fresh_only", "reused_retry_done", "counted",
        "response", "done", "grpc", "deadline", "h2",
    )

    def __init__(self, sink: ResponseSink, client: ClientConnection, head: RequestHead) -> None:
        self.sink = sink
        self.client = client
        self.context: ListenerContext = client.context
        self.head = head
        self.target = head.target
        self.endpoint_try = EndpointTry()  # the current try's endpoint and books
        self.attempts: Attempts | None = None  # retries and timeouts (outbound only)
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task | None = None
        self.request_complete = False
        self.pending: list[bytes] = []  # body bytes waiting for a connection
        self.pending_bytes = 0
        # Bytes after a complete Upgrade request: the new protocol's, held until the upstream
        # agrees (101); never sent as HTTP, dropped if the upstream refuses.
        self.tunnel_pending: list[bytes] = []
        self.upgrading = head.upgrade is not None  # until the upstream refuses the upgrade
        self.fresh_only = False  # the next try must open a new connection
        self.reused_retry_done = False  # the idle race was retried once already
        self.counted = False  # counted in the Service's requests in flight (maxRequests)
        self.response: ResponseHead | None = None  # the final head, once accepted
        self.done = False  # the exchange ended: nothing more is sent or delivered
        # A gRPC call (http2/grpc.py): its deadline, its errors and retry conditions differ.
        self.grpc = head.version == "2" and is_grpc(head)
        self.deadline = 0.0  # loop time a gRPC call's grpc-timeout ends at (0: none)
        # Carried upstream over HTTP/2: gRPC always (it needs HTTP/2); other requests
        # towards another sidecar (h2 by ALPN over mTLS; see _attempt).
        self.h2 = self.grpc

    # -- starting -------------------------------------------------------------------------------

    def start(self, service: ServiceRuntime, target: bytes, route_rule: object) -> None:
        """Send the request to `service` as `target`, with the matched route rule's timeouts
        and retry (None: the Service's). Raises ProxyError (limits, no endpoints)."""
        self.service = service
        self.target = target
        if service.active >= service.max_requests:
            raise Overloaded(f"{service.key}: {service.max_requests} requests in flight")
        service.active += 1
        self.counted = True
        context = self.context
        attempts = self.attempts = attempts_for(service, route_rule, self.head, self.upgrading,
                                                context.loop, context.rng, context.metrics)
        if self.grpc and attempts is not None:
            self._grpc_attempts(attempts)
        if attempts is not None:
            attempts.start_deadline(self._request_timed_out)
            for data in self.pending:  # read while a pipelined request waited its turn
                attempts.keep(data)
        self._attempt()

    def _grpc_attempts(self, attempts: Attempts) -> None:
        """A gRPC call's retry conditions, and its deadline: the smaller of `grpc-timeout`
        and the route's timeout (the time left then goes upstream with each try)."""
        attempts.rule = grpc_rule(attempts.rule)
        timeout = request_timeout(self.head)
        if timeout is not None and (not attempts.timeout or timeout < attempts.timeout):
            attempts.timeout = timeout
        if attempts.timeout:
            self.deadline = self.context.loop.time() + attempts.timeout

    def _attempt(self) -> None:
        """Start one try: pick an endpoint (not one tried already, where there is another),
        then an idle connection to it or a new one. Raises ProxyError."""
        service = self.service
        attempts = self.attempts
        endpoint = self.endpoint_try.begin(service, attempts.tried if attempts is not None else None)
        if attempts is not None:
            attempts.try_started(self._try_timed_out)
        if self.h2 or (not self.upgrading and self.head.version != "1.0"
                       and endpoint.pool.speaks_h2()):
            # gRPC; or a request to another sidecar, which takes HTTP/1.1 requests too on
            # the one HTTP/2 connection between the pair (fields.ORIG_PROTO marks them).
            self._attempt_h2(endpoint)
            return
        conn = None if self.fresh_only else endpoint.pool.take_idle()
        self.fresh_only = False
        if conn is not None:
            self._send(conn)
            return
        if service.at_connection_limit():  # the rule plain TCP connections follow too
            raise Overloaded(f"{service.key}: connection limit reached")
        # Counted from here, not when the task first runs: the other requests of a burst
        # that arrived in the same read are checked before any task has run. The task's
        # done callback uncounts it however it ends, even cancelled before it started.
        service.connecting += 1
        task = self.connect_task = self.context.loop.create_task(self._connect(endpoint))
        task.add_done_callback(service.connect_ended)

    def _attempt_h2(self, endpoint: EndpointRuntime) -> None:
        """A try on a new stream of an HTTP/2 connection to `endpoint` (dataplane/h2upstream.py)."""
        h2pool = endpoint.h2_pool()
        stream = h2pool.take_stream()
        self.fresh_only = False
        if stream is not None:
            self._send(stream)
            return
        service = self.service
        service.connecting += 1
        task = self.connect_task = self.context.loop.create_task(self._connect_h2(h2pool))
        task.add_done_callback(service.connect_ended)

    async def _connect_h2(self, h2pool: Http2Pool) -> None:
        try:
            stream = await h2pool.open_stream()
        except ProxyError as exc:
            self.connect_task = None
            if not self.done:
                self._try_failed(exc, CONNECT_FAILURE)
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        if self.done:
            stream.abort()
            return
        self.endpoint_try.dispatched()
        self._send(stream)

    async def _connect(self, endpoint: EndpointRuntime) -> None:
        try:
            conn = await endpoint.pool.connect()
        except ProxyError as exc:
            self.connect_task = None
            if not self.done:
                self._try_failed(exc, CONNECT_FAILURE)
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        if self.done:
            endpoint.pool.release(conn)
            return
        self.endpoint_try.dispatched()
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        """Send the request (head, and the body received so far) on `conn`."""
        self.upstream = conn
        self.endpoint_try.sent = True
        client = self.client
        if client.writing_paused:
            # The client is still behind on an earlier response: pause_writing() will not be
            # called again for it, so this connection starts paused (resume_writing() resumes).
            conn.pause_reading()
        head = self.head
        if head.request_id is None:
            head.request_id = self.context.request_ids()
            # Kept in the head, so that a retry sends the same id as the first try.
            head.headers.append((b"x-request-id", head.request_id))
        if self.deadline:
            # The time left, not the client's whole timeout (spec §9).
            set_timeout(head, max(self.deadline - self.context.loop.time(), 0.001))
        pending = self.pending
        conn.begin(self, head, self.target, pending, complete=self.request_complete,
                   upgrade=self.upgrading)
        if pending:
            self.pending = []
            # What is left counted is held tunnel bytes (tunnel_pending), if any.
            self.pending_bytes -= sum(map(len, pending))
            if self.pending_bytes <= PENDING_BODY_LIMIT:
                client.resume_reading(PAUSE_BUFFER)

    # -- the request's body (from the exchange) ----------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body (or, after an Upgrade request, tunnel bytes)."""
        if self.upgrading and self.request_complete:
            if not self.done:
                self.tunnel_pending.append(data)
                self._hold(len(data))
            return
        if self.attempts is not None:
            self.attempts.keep(data)
        conn = self.upstream
        if conn is not None:
            conn.send_body(self.head, data)
            return
        if self.done:
            return
        self.pending.append(data)
        self._hold(len(data))

    def _hold(self, size: int) -> None:
        self.pending_bytes += size
        if self.pending_bytes > PENDING_BODY_LIMIT:
            self.client.pause_reading(PAUSE_BUFFER)

    def request_end(self) -> None:
        """The client finished sending the request."""
        self.request_complete = True
        conn = self.upstream
        if conn is not None:
            conn.send_end(self.head)

    def upstream_write_paused(self) -> None:
        self.client.pause_reading(PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self.client.resume_reading(PAUSE_UPSTREAM)

    # -- the response (from the upstream connection) -----------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        """Accept the head and hand it over, or (a retryable status) retry instead."""
        if head.informational:
            self.sink.accept_head(head)
            return
        if self.endpoint_try.open:
            if self.grpc and self.attempts is not None and head.status == 200:
                status = trailers_only_status(head.headers)
                name = RETRY_STATUS_NAMES.get(status) if status is not None else None
                reason = self._reason_to_retry(name) if name is not None else None
                if reason is not None:
                    self._drop_upstream()
                    self._end_try(False)
                    self._schedule_retry(reason)
                    return
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
        if head.status != 101:
            self.upgrading = False  # a refused upgrade is answered as a plain response
        self.sink.accept_head(head)

    def response_body(self, data: bytes) -> None:
        self.sink.accept_body(data)

    def response_trailers(self, fields: HeaderList) -> None:
        self.sink.accept_trailers(fields)

    def flush(self) -> None:
        self.sink.flush()

    def response_end(self) -> None:
        """The response ended: the connection goes back to its pool (or closes)."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            response = self.response
            conn.finish(response is not None and response.keep_alive and self.request_complete)
        self.sink.accept_end()

    def response_upgrade(self, rest: bytes) -> None:
        """101 Switching Protocols: the connection leaves HTTP for the exchange's tunnel."""
        head, conn = self.response, self.upstream
        if head is None or conn is None or head.status != 101 or not self.upgrading:
            self.upstream_failed(ProxyError("unexpected protocol switch"))
            return
        pending, self.tunnel_pending = self.tunnel_pending, []
        conn.detach()
        self.upstream = None
        self.sink.accept_upgrade(conn, rest, pending)

    # -- failures -------------------------------------------------------------------------------

    def _drop_upstream(self) -> None:
        """Abort the upstream connection of this try; it carries nothing more of it."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.detach()
            conn.abort()

    def upstream_failed(self, error: ProxyError, reset: bool = False) -> None:
        """The upstream broke the protocol or the connection mid-exchange."""
        if self.done:
            self._drop_upstream()
        elif self.response is None:
            self._try_failed(UpstreamReset(str(error)) if reset else error, RESET)
        else:
            self._drop_upstream()
            self.sink.response_broken(UpstreamReset.reason if reset else error.reason)

    def upstream_refused(self) -> None:
        """The upstream refused the request's HTTP/2 stream unprocessed (REFUSED_STREAM, or
        above its GOAWAY's last stream id): safe to send again."""
        self.upstream = None
        if self.done:
            return
        if self.response is not None:
            self.sink.response_broken(UpstreamReset.reason)
            return
        # Not the endpoint's failure (it is busy, or going away): the try ends neutral.
        self._try_failed(UpstreamReset("stream refused by the upstream"), REFUSED_STREAM,
                         outcome=None)

    def upstream_lost(self) -> None:
        """The upstream connection closed while this request was using it."""
        conn, self.upstream = self.upstream, None
        if self.done:
            return
        if self.response is not None:
            self.sink.response_broken(UpstreamReset.reason)
            return
        if conn is not None and conn.requests > 1 and self._may_resend_after_idle_close():
            # A reused keep-alive connection that the server had just closed (the idle
            # race): the app did not take the request, so it goes once more on a fresh
            # connection, without counting as a retry or against the endpoint.
            self.reused_retry_done = True
            self._end_try(None)
            self.fresh_only = True
            self._retry()
            return
        self._try_failed(UpstreamReset("upstream closed before responding"), RESET)

    def _may_resend_after_idle_close(self) -> bool:
        """Once per request, not an upgrade, the whole request can be sent again, and the
        method may be repeated (idempotent, or the policy says `nonIdempotent`)."""
        if self.reused_retry_done or self.upgrading:
            return False
        attempts = self.attempts
        if self.head.has_body and (attempts is None or attempts.replay is None
                                   or not self.request_complete):
            return False
        return (attempts is None or attempts.rule.non_idempotent
                or self.head.method.decode("latin-1") in IDEMPOTENT_METHODS)

    def _try_failed(self, error: ProxyError, kind: str, outcome: bool | None = False) -> None:
        """A try failed before any of its response was accepted: retry it when the rules
        and the budget allow, else the exchange answers with `error`. `outcome`: what the
        try counts as for its endpoint (False a failure, None neither way)."""
        self._drop_upstream()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._end_try(outcome)
        if self.done:
            return
        reason = self._reason_to_retry(kind)
        if reason is None:
            self.sink.forward_failed(error)
            return
        self._schedule_retry(reason)

    def _reason_to_retry(self, kind: str) -> str | None:
        attempts = self.attempts
        if attempts is None or self.upgrading:
            return None
        return attempts.reason_to_retry(self.head, kind, sent=self.endpoint_try.sent,
                                        request_complete=self.request_complete)

    def _schedule_retry(self, reason: str) -> None:
        """Retry (after the backoff) away from the endpoint of the try that just failed."""
        attempts, endpoint = self.attempts, self.endpoint_try.endpoint
        assert attempts is not None and endpoint is not None  # there was a reason to retry
        attempts.schedule(reason, endpoint.key, self._retry)

    def _retry(self) -> None:
        if self.done:
            return
        if self.endpoint_try.sent:
            # The failed try took the body received so far: send the kept copy again.
            attempts = self.attempts
            self.pending = attempts.body_to_send_again() if attempts is not None else []
            self.pending_bytes = sum(map(len, self.pending))
        try:
            self._attempt()
        except ProxyError as exc:
            self.sink.forward_failed(exc)

    def _end_try(self, success: bool | None) -> None:
        """Close the current try's books (tries.py) and its per-try timer, if a try is open."""
        if self.endpoint_try.open:
            self.endpoint_try.end(self.service, success, self.context.metrics)
            if self.attempts is not None:
                self.attempts.try_ended()

    def _try_timed_out(self) -> None:
        if self.done or self.response is not None or not self.endpoint_try.open:
            return
        self._try_failed(Timeout("per-try timeout"), TIMEOUT)

    def _request_timed_out(self) -> None:
        if self.done:
            return
        if self.response is None:
            self._end_try(False)
            self.sink.forward_failed(Timeout("request timeout"))
        else:
            self._drop_upstream()
            self.sink.response_broken(Timeout.reason)

    # -- the end --------------------------------------------------------------------------------

    def stop(self) -> None:
        """The exchange ended: drop the connection if it still carries the request; close the
        try's books, the timers and the in-flight count. Idempotent."""
        self.done = True
        self.sink = DETACHED
        self._drop_upstream()
        self._end_try(None)
        if self.attempts is not None:
            self.attempts.cancel()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.counted:
            self.counted = False
            self.service.active -= 1

    def tries_made(self) -> int:
        """How many tries were made (0: none began)."""
        if self.endpoint_try.endpoint is None:
            return 0
        return self.attempts.made + 1 if self.attempts is not None else 1
