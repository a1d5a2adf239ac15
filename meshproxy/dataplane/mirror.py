"""RequestMirror: a fire-and-forget copy of a request to another Service.

The copy goes out once the original request is complete (its body, up to 64 KiB, kept for it);
its response is read and thrown away, and its failures are only counted. Nothing about the
mirror — slow, down, or answering errors — reaches the caller. At most MAX_IN_FLIGHT copies are
under way at once; past that, copies are skipped rather than queued.
"""

from __future__ import annotations

import asyncio
import logging

from meshproxy.http1.errors import ProxyError
from meshproxy.http1.events import RequestHead
from meshproxy.http1.writer import request_head_bytes

log = logging.getLogger("meshproxy.mirror")

MAX_IN_FLIGHT = 256
MIRROR_TIMEOUT = 10.0
MAX_MIRROR_BODY = 64 * 1024


class _Sink:
    """Stands in for an exchange on the mirror's upstream connection: reads and discards."""

    __slots__ = ("done", "keep_alive")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done = loop.create_future()
        self.keep_alive = True

    def _finish(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)

    def response_head(self, head) -> None:
        if not head.informational:
            # `Connection: close` (or HTTP/1.0 without keep-alive): the connection must not
            # carry another request (RFC 9112 §9.6).
            self.keep_alive = head.keep_alive

    def response_body(self, data: bytes) -> None:
        pass

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
        conn = None
        sink = None
        ok = False
        try:
            endpoint = runtime.pick()
            conn = endpoint.pool.take_idle() or await endpoint.pool.connect()
            sink = _Sink(self.loop)
            conn.exchange = sink
            conn.reader.expect(head.method == b"HEAD")
            copy = RequestHead(head.method, target, head.version, list(head.headers))
            payload = b"".join(body) if body is not None else b""
            copy.content_length = len(payload) if body is not None else None
            copy.request_id = head.request_id
            conn.transport.write(request_head_bytes(copy, target) + payload)
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
                conn.exchange = None
                if not ok or conn.reader.in_message:
                    conn.abort()
                elif sink.keep_alive:
                    conn.pool.release(conn)
                else:
                    conn.close()


