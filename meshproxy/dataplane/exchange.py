"""One request's life through the proxy, as its client sees it: resolve the Service, route,
hand the request to its `Forwarder` (dataplane/forwarder.py: tries, retries, the upstream
connection), send the response it accepts back to the client, and record the outcome once.

An Exchange is driven by its client connection (dataplane/client.py), which hands it the
request head, body pieces and the end of the request, and by its forwarder, which hands it
the response (the `ResponseSink` calls, dataplane/sink.py). Bodies stream straight through; nothing is buffered
whole. Errors the proxy answers itself (spec §4) are written here, from typed errors.
"""

from __future__ import annotations

from typing import Sequence

from meshproxy.config.model.route import HeaderModifier
from meshproxy.dataplane.client import ClientConnection
from meshproxy.dataplane.context import HOP_HEADER
from meshproxy.dataplane.forwarder import Forwarder
from meshproxy.dataplane.sink import ResponseSink
from meshproxy.dataplane.mirror import MirrorCopy
from meshproxy.dataplane.routing import route
from meshproxy.dataplane.upstream import UpstreamConnection
from meshproxy.http1.errors import LoopDetected, ProxyError
from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead
from meshproxy.http2.grpc import status_of, trailers_only_status
from meshproxy.observability.record import RequestRecord
from meshproxy.policy.filters import modify_headers


def _mark_hop(head: RequestHead, mark: bytes) -> bool:
    """Add this sidecar's mark to the request's hops; True when the mark was already there
    (the request has passed this way before: a loop)."""
    headers = head.headers
    for name, value in headers:
        if len(name) == 15 and name.lower() == HOP_HEADER and mark in value:
            return True
    headers.append((HOP_HEADER, mark))
    return False


class Exchange(ResponseSink):
    """A request and its response between one client connection and one upstream."""

    __slots__ = (
        "client", "context", "head", "record", "forwarder", "response",
        "client_keep_alive", "finished", "response_modifiers", "mirror",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        context = self.context = client.context
        self.client = client
        self.head = head
        self.record = RequestRecord(context.loop.time(), context.direction)
        self.forwarder = Forwarder(self, client, head)
        self.response: ResponseHead | None = None  # the final head sent to the client
        self.client_keep_alive = head.keep_alive
        self.finished = False
        self.response_modifiers: Sequence[HeaderModifier] = ()  # the route's
        self.mirror: MirrorCopy | None = None  # copies waiting for the request's body

    @property
    def upgrading(self) -> bool:
        """True while the request asks for a protocol switch the upstream has not refused."""
        return self.forwarder.upgrading

    def upstream_connection(self) -> UpstreamConnection | None:
        """The connection carrying the request now, if any (for back-pressure)."""
        return self.forwarder.upstream

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resolve the destination, apply its routes, and forward the request."""
        context = self.context
        head = self.head
        record = self.record
        client = self.client
        # This hop's span id goes into the head before anything copies it (mirrors, tries).
        record.trace = context.trace.begin(head, client.transport)
        try:
            looped = _mark_hop(head, context.hop_mark)
            service, target = context.resolver.resolve(head, client.peer_id, client.original)
            record.service = service.key  # metrics name the parent until a backend is chosen
            if looped:
                context.loop_detected(client.peer_address(), "a request for %s" % service.key)
                raise LoopDetected("passed through this sidecar in this direction before")
            route_rule = None
            if service.routes is not None:
                routed = route(head, target, service, context.resolver, context.rng)
                record.route = routed.label
                target = routed.target
                if routed.redirect is not None:
                    self._redirect(routed.redirect.status, routed.redirect.location)
                    return
                if routed.failure is not None:
                    raise routed.failure
                if routed.mirrors:
                    self._start_mirrors(routed.mirrors, target)
                self.response_modifiers = routed.response_modifiers
                route_rule = routed.rule
                backend = routed.service
                assert backend is not None  # neither a redirect nor a failure
                service = backend
                record.service = service.key
            self.forwarder.start(service, target, route_rule)
        except ProxyError as exc:
            self.fail(exc)

    def _start_mirrors(self, runtimes: list, target: bytes) -> None:
        mirror = self.context.mirrors.start(runtimes, self.head, target)
        if mirror is None:
            return
        forwarder = self.forwarder
        for data in forwarder.pending:  # read while a pipelined request waited its turn
            mirror.keep(data)
        if forwarder.request_complete:
            mirror.request_complete()
        else:
            self.mirror = mirror

    def _request_read(self) -> bool:
        """True when nothing of the request is still to come from the client: it ended, or it
        has no body (its end is the very next event when the proxy answers from its head)."""
        return self.forwarder.request_complete or not self.head.has_body

    def _redirect(self, status: int, location: str) -> None:
        """Answer with the route's redirect; nothing goes upstream."""
        self.record.status = status
        keep = self.client_keep_alive and self._request_read() and not self.upgrading
        self.client_keep_alive = keep
        self.client.send_redirect(status, location, keep_alive=keep)
        self._finish()

    # -- the request (from the client connection) ---------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body (or, after an Upgrade request, tunnel bytes) arrived."""
        self.record.request_bytes += len(data)
        if self.mirror is not None:
            self.mirror.keep(data)
        self.forwarder.request_body(data)

    def request_end(self) -> None:
        """The client finished sending the request."""
        if self.mirror is not None:
            mirror, self.mirror = self.mirror, None
            mirror.request_complete()
        self.forwarder.request_end()

    # -- the response (ResponseSink: from the forwarder) --------------------------------------

    def accept_head(self, head: ResponseHead) -> None:
        """Send the head on; interim 1xx responses pass through as they come."""
        if head.informational:
            self.client.send_informational(head)
            return
        self.response = head
        self.record.status = head.status
        if self.forwarder.grpc:
            status = trailers_only_status(head.headers)  # a trailers-only answer's
            if status is not None:
                self.record.grpc_status = status
        for modifier in self.response_modifiers:
            head.headers = modify_headers(head.headers, modifier)
        if head.status == 101:
            return  # the Upgrade follows at once (accept_upgrade)
        if self.head.upgrade is not None:
            # The upstream refused the upgrade: answer normally, then the client connection
            # must close, since the client may already have sent non-HTTP bytes.
            self.client_keep_alive = False
        self.client_keep_alive = self.client.send_head(self.head, head, self.client_keep_alive)

    def accept_body(self, data: bytes) -> None:
        self.record.response_bytes += len(data)
        self.client.send_body(data)

    def accept_trailers(self, fields: HeaderList) -> None:
        if self.forwarder.grpc:
            status = trailers_only_status(fields)
            if status is not None:
                self.record.grpc_status = status
        self.client.send_trailers(fields)

    def flush(self) -> None:
        """Write what one upstream read produced."""
        self.client.flush()

    def accept_end(self) -> None:
        """The response ended: finish the exchange."""
        self.client.send_end()
        if not self.forwarder.request_complete:
            # The upstream answered before the request body ended (e.g. 413): the rest of the
            # body has nowhere to go, so the client connection ends after this response.
            self.client_keep_alive = False
        self._finish()

    def accept_upgrade(self, conn: UpstreamConnection, rest: bytes, pending: list[bytes]) -> None:
        """101 Switching Protocols: both connections become a byte tunnel."""
        head = self.response
        assert head is not None  # accept_head had the 101
        self.client.send_switch(head, rest)
        self._record()
        self.finished = True
        self.client.start_tunnel(conn, pending)

    def forward_failed(self, error: ProxyError) -> None:
        self.fail(error)

    def response_broken(self, reason: str) -> None:
        self.record.error = reason
        self._abort_client()

    # -- failures -------------------------------------------------------------------------------

    def fail(self, error: ProxyError) -> None:
        """End the exchange with the proxy's own error response (spec §4), or, when a response
        has already started, by cutting the client connection."""
        if self.finished:
            return
        self.record.error = error.reason
        self.forwarder.stop()
        if self.response is not None:
            self._abort_client()
            return
        if self.forwarder.grpc:
            # A trailers-only answer: HTTP 200, the failure in its gRPC status (spec §9).
            self.record.status = 200
            self.record.grpc_status = status_of(error.reason)
        else:
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
        self.forwarder.stop()
        if self.record.trace is not None:  # started: its span and log line say the client left
            self.record.error = "client-disconnected"
            self.context.request_finished(self._completed_record(), count=False)

    # -- the end --------------------------------------------------------------------------------

    def _completed_record(self) -> RequestRecord:
        record = self.record
        head = self.head
        record.method = head.method
        record.authority = head.host
        record.target = head.target
        record.request_id = head.request_id
        if self.context.access_log is not None:  # the only reader of the client's address
            record.peer = self.client.peer_address()
        endpoint = self.forwarder.endpoint_try.endpoint
        if endpoint is not None:
            record.endpoint = endpoint.key
            record.attempts = self.forwarder.tries_made()
        return record

    def _record(self) -> None:
        self.forwarder.stop()
        self.context.request_finished(self._completed_record())

    def _finish(self) -> None:
        self._record()
        self.finished = True
        self.client.exchange_done(self)
