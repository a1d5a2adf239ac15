"""RequestMirror: a fire-and-forget copy of a request to another Service.

The copy goes out once the original request is complete (its body, up to 64 KiB, kept for it);
its response is read and thrown away, and its failures are only counted. Nothing about the
mirror — slow, down, or answering errors — reaches the caller. At most MAX_IN_FLIGHT copies are
under way at once; past that, copies are skipped rather than queued.
"""

from __future__ import annotations

import asyncio
import logging

from mypy_extensions import mypyc_attr

from meshproxy.dataplane.upstream import ResponseReceiver, UpstreamConnection
from meshproxy.http1.errors import ProxyError
from meshproxy.http1.events import RequestHead, ResponseHead
from meshproxy.http2.grpc import is_grpc

log = logging.getLogger("meshproxy.mirror")

MAX_IN_FLIGHT = 256
MIRROR_TIMEOUT = 10.0
MAX_MIRROR_BODY = 64 * 1024


class _Sink(ResponseReceiver):
    """Stands in for an exchange on the mirror's upstream connection: reads and discards."""

    __slots__ = ("done", "head")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done = loop.create_future()
        self.head: ResponseHead | None = None  # the final response's

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request, read once the response ended:
        `Connection: close` (or HTTP/1.0 without keep-alive, RFC 9112 §9.6), or the reader
        found the server breaking the protocol after the response."""
        return self.head is None or self.head.keep_alive

    def _finish(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)

    def response_head(self, head) -> None:
        if not head.informational:
            self.head = head

    def response_body(self, data: bytes) -> None:
        pass

    def response_trailers(self, fields) -> None:
        pass

    def upstream_refused(self) -> None:
        self._finish(False)

    def flush(self) -> None:
        pass

    def response_end(self) -> None:
        self._finish(True)

    def response_upgrade(self, rest: bytes) -> None:
        self._finish(False)

    def upstream_failed(self, error, reset: bool = False) -> None:
        self._finish(False)

    def upstream_lost(self) -> None:
        self._finish(False)

    def upstream_write_paused(self) -> None:
        pass

    def upstream_write_resumed(self) -> None:
        pass


class MirrorCopy:
    """The copies of one request for its route's mirrors, sent once the request is complete
    with its body (kept up to MAX_MIRROR_BODY; a larger body is not mirrored)."""

    __slots__ = ("mirrors", "runtimes", "head", "target", "body", "size")

    def __init__(self, mirrors: "Mirrors", runtimes: list, head: RequestHead,
                 target: bytes) -> None:
        self.mirrors = mirrors
        self.runtimes = runtimes
        self.head = head
        self.target = target
        self.body: list[bytes] | None = []
        self.size = 0

    def keep(self, data: bytes) -> None:
        """A piece of the request body went by."""
        body = self.body
        if body is not None:
            body.append(data)
            self.size += len(data)
            if self.size > MAX_MIRROR_BODY:
                self.body = None  # too large to keep a copy of: not mirrored

    def request_complete(self) -> None:
        """The request ended: send the copies (unless its body was too large)."""
        body, self.body = self.body, None
        if body is not None:
            for runtime in self.runtimes:
                self.mirrors.send(runtime, self.head, self.target, body)


# Tests record the copies through a subclass; compiled, a class allows that only when it says so.
@mypyc_attr(allow_interpreted_subclasses=True)
class Mirrors:
    """Sends mirror copies for one proxy, bounded in number."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.in_flight = 0
        self.sent = 0
        self.failed = 0
        self.skipped = 0
        # The loop keeps only weak references to tasks: these keep copies under way alive.
        self._tasks: set[asyncio.Task] = set()

    def start(self, runtimes: list, head: RequestHead, target: bytes) -> MirrorCopy | None:
        """Begin the copies of a request to Services `runtimes`: a request without a body is
        copied now (None returned); one whose body may fit the limit gets a MirrorCopy that
        keeps it until the request is complete; a larger one is not mirrored (None)."""
        if not head.has_body:
            for runtime in runtimes:
                self.send(runtime, head, target, None)
            return None
        if head.content_length is None or head.content_length <= MAX_MIRROR_BODY:
            return MirrorCopy(self, runtimes, head, target)
        return None

    def send(self, runtime, head: RequestHead, target: bytes, body: list | None) -> None:
        """Start a copy of the request to Service `runtime`; never raises. `body`: the
        request's body pieces, or None for a request without a body."""
        if self.in_flight >= MAX_IN_FLIGHT:
            self.skipped += 1
            return
        self.in_flight += 1
        task = self.loop.create_task(self._send(runtime, head, target, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, runtime, head: RequestHead, target: bytes, body: list | None) -> None:
        conn: UpstreamConnection | None = None
        sink = None
        ok = False
        try:
            endpoint = runtime.pick()
            copy = RequestHead(head.method, target, head.version, list(head.headers))
            payload = b"".join(body) if body is not None else b""
            copy.content_length = len(payload) if body is not None else None
            copy.request_id = head.request_id
            copy.host = head.host
            if (copy.version == "2" and is_grpc(copy)) or (
                    copy.version != "1.0" and endpoint.pool.speaks_h2()):
                # gRPC needs HTTP/2; towards a sidecar every request goes on HTTP/2.
                conn = await endpoint.h2_pool().open_stream()
            else:
                conn = endpoint.pool.take_idle() or await endpoint.pool.connect()
            sink = _Sink(self.loop)
            conn.begin(sink, copy, target, [payload] if payload else [], complete=True,
                       upgrade=False)
            async with asyncio.timeout(MIRROR_TIMEOUT):
                ok = await sink.done
        except (ProxyError, TimeoutError, OSError) as exc:
            log.debug("mirror to %s failed: %s", runtime.key, exc)
        finally:
            self.in_flight -= 1
            self.sent += 1
            if not ok:
                self.failed += 1
            if conn is not None:
                conn.detach()
                if not ok or conn.reader.in_message:
                    conn.abort()
                else:
                    conn.finish(sink is not None and sink.keep_alive)
