"""A minimal HTTP/1.1 server for the proxy's own endpoints (admin, health).

The sidecar keeps aiohttp out of its process: importing aiohttp's server costs about 14 MiB of
memory, as much as the rest of the proxy, for a handful of GET endpoints. This server reuses the
proxy's own sans-I/O request reader, answers each request from a synchronous handler with a
Content-Length body, keeps connections alive, and ignores request bodies.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass, field
from http import HTTPStatus
from collections import deque
from typing import Awaitable, Callable

from meshproxy.http1.errors import ProxyError, error_response
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead
from meshproxy.http1.reader import RequestReader

IDLE_TIMEOUT = 75.0


@dataclass
class Reply:
    """What a handler answers: status, body and headers beyond the framing ones."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, head_request: bool, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
                 f"content-type: {self.content_type}", f"content-length: {len(self.body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if not keep_alive:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_request else head + self.body


# (method, path without query) -> Reply, or a coroutine giving one (an app probe, which asks
# the app); requests on a connection are still answered in order.
Handler = Callable[[bytes, bytes], "Reply | Awaitable[Reply]"]


class _Connection(asyncio.Protocol):
    def __init__(self, server: "LocalHTTPServer") -> None:
        self.server = server
        self.reader = RequestReader()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.head: RequestHead | None = None
        self.waiting: deque[RequestHead] = deque()  # requests behind one being answered
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        self._idle()

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def _idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.transport.close)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.reader.feed(data)
        except ProxyError as exc:
            self.transport.write(error_response(exc, keep_alive=False))
            self.transport.close()
            return
        for event in events:
            if event.__class__ is RequestHead:
                self.head = event
            elif event is END_OF_MESSAGE:
                self._answer(self.head)
            elif event.__class__ is not bytes:  # an Upgrade: not spoken here
                self.transport.close()
                return

    def _answer(self, head: RequestHead) -> None:
        if self.busy:
            self.waiting.append(head)
            return
        path = head.target.split(b"?", 1)[0]
        try:
            reply = self.server.handler(head.method, path)
        except Exception:  # a handler bug must not take the proxy down
            self.server.log_exception()
            reply = Reply(500, b"internal error\n")
        if asyncio.iscoroutine(reply):
            self.busy = True
            task = asyncio.ensure_future(reply)
            task.add_done_callback(lambda done: self._answered(head, done))
            return
        self._send(head, reply)

    def _answered(self, head: RequestHead, done: asyncio.Future) -> None:
        self.busy = False
        if done.cancelled() or done.exception() is not None:
            if not done.cancelled():
                self.server.log_exception()
            reply = Reply(500, b"internal error\n")
        else:
            reply = done.result()
        if self.transport is None or self.transport.is_closing():
            return
        self._send(head, reply)
        while self.waiting and not self.busy and not self.transport.is_closing():
            self._answer(self.waiting.popleft())

    def _send(self, head: RequestHead, reply: Reply) -> None:
        keep = head.keep_alive and not self.server.closing
        self.transport.write(reply.encode(head.method == b"HEAD", keep))
        if keep:
            self._idle()
        else:
            self.transport.close()


class LocalHTTPServer:
    """Serves `handler` on host:port until close()."""

    def __init__(self, handler: Handler, log_exception: Callable[[], None]) -> None:
        self.handler = handler
        self.log_exception = log_exception
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; return the bound port. Raises OSError when it cannot bind."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host or None, port,
                                                reuse_address=True)
        if not self._server.sockets:  # every address skipped: no socket of its family here
            self._server.close()
            raise OSError(errno.EAFNOSUPPORT, f"cannot listen on {host}:{port}")
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every connection."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
