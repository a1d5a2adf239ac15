"""Backends that fail on purpose, for the resilience tests (retries, timeouts, ejection).

- `FaultyBackend`: an `HttpBackend` (same paths, same records) that can be told to answer
  every request with one status, fail only its next N requests, or wait before answering.
  It records the SHA-256 of every request body it read, failed tries included, so a test can
  prove that a retried body arrived intact.
- `KeepAliveCloser`: a raw HTTP/1.1 keep-alive server that closes connections the way real
  apps do: after they were idle for a while, or (the idle race made certain) on the request
  that follows the N answered on a connection, without answering it.

    bad = FaultyBackend("bad").start()
    bad.status = 503            # every request: 503 (the body is read first)
    bad.fail_next(1)            # only the next request fails (with `fail_status`)
    bad.delay = 2.0             # every request waits 2 s before it is handled
    bad.reset()                 # healthy again
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import socketserver
import threading
from dataclasses import dataclass

from aiohttp import web

from support.backend import RECORD, HttpBackend
from support.rawbackend import _request_end


class FaultyBackend(HttpBackend):
    """An HttpBackend with switchable faults; see the module docstring."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.status: int | None = None  # answer every request with this status
        self.fail_status = 503
        self.delay = 0.0  # seconds every request waits before it is handled
        self.read_before_failing = True  # a failure answers after reading the whole body
        self._failures_left = 0
        self.bodies: list[tuple[str, str]] = []  # (method and path, sha256 of the body read)

    def fail_next(self, n: int, status: int = 503) -> None:
        """Make the next `n` requests fail with `status`; later ones are served normally."""
        with self._lock:
            self._failures_left = n
            self.fail_status = status

    def reset(self) -> None:
        """Serve every request normally again and forget what was received."""
        with self._lock:
            self._failures_left = 0
        self.status = None
        self.delay = 0.0
        self.read_before_failing = True
        self.clear()
        with self._lock:
            self.bodies.clear()

    def bodies_for(self, path_prefix: str) -> list[str]:
        """Return the SHA-256 of each body read for requests whose path starts with the prefix."""
        with self._lock:
            return [sha for path, sha in self.bodies if path.startswith(path_prefix)]

    def _failure(self) -> int | None:
        with self._lock:
            if self.status is not None:
                return self.status
            if self._failures_left > 0:
                self._failures_left -= 1
                return self.fail_status
        return None

    @web.middleware
    async def _record(self, request: web.Request, handler):
        async def faulty(req: web.Request) -> web.StreamResponse:
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self._failure()
            if status is None:
                return await handler(req)
            if self.read_before_failing and req.can_read_body:
                body = await req.read()
                req[RECORD].body_len = len(body)
                with self._lock:
                    self.bodies.append((req.path_qs, hashlib.sha256(body).hexdigest()))
            return web.Response(status=status, text=f"failing {status}\n",
                                headers={"x-backend": self.name})

        return await HttpBackend._record(self, request, faulty)

    async def _upload(self, request: web.Request) -> web.Response:
        response = await super()._upload(request)
        record = request[RECORD]
        with self._lock:
            self.bodies.append((record.path, _json_sha(response)))
        return response


def _json_sha(response: web.Response) -> str:
    return json.loads(response.body)["sha256"]


@dataclass
class Answered:
    """One request a KeepAliveCloser answered."""

    method: str
    path: str
    body_sha256: str
    connection: int


def _parse(request: bytes) -> tuple[str, str, bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return method, path, body


def _dechunk(data: bytes) -> bytes:
    out = []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[:size])
        data = data[size + 2:]


class _CloserHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: KeepAliveCloser = self.server.owner  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        with server.lock:
            server.connections += 1
            number = server.connections
        sock.settimeout(server.idle_close)
        buf = b""
        answered_here = 0
        try:
            while True:
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    # Idle too long: close, as apps with a keep-alive timeout do (counted once
                    # closed).
                    sock.close()
                    with server.lock:
                        server.idle_closes += 1
                    return
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while (n := _request_end(buf)) is not None:
                    request, buf = buf[:n], buf[n:]
                    method, path, body = _parse(request)
                    limit = server.answers_per_connection
                    if limit is not None and answered_here >= limit:
                        with server.lock:
                            server.dropped.append((method, path))
                        return  # closed just as the request arrived: it was never processed
                    with server.lock:
                        server.answered.append(
                            Answered(method, path, hashlib.sha256(body).hexdigest(), number))
                        count = len(server.answered)
                    text = f"{count}\n".encode()
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(text), text))
                    answered_here += 1
        finally:
            sock.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class KeepAliveCloser:
    """A threaded HTTP/1.1 server on 127.0.0.1:<free port> answering `200` with the number of
    requests answered so far, keeping connections alive until:

    - `idle_close` seconds pass without a byte from the client (None: never), or
    - `answers_per_connection` requests were answered on the connection (None: no limit): the
      next request on it is read and the connection closed without an answer, recorded in
      `dropped`.
    """

    def __init__(self, *, idle_close: float | None = None,
                 answers_per_connection: int | None = None) -> None:
        self.idle_close = idle_close
        self.answers_per_connection = answers_per_connection
        self.lock = threading.Lock()
        self.connections = 0
        self.idle_closes = 0
        self.answered: list[Answered] = []
        self.dropped: list[tuple[str, str]] = []
        self._server: _Server | None = None
        self.port = 0

    def start(self) -> "KeepAliveCloser":
        self._server = _Server(("127.0.0.1", 0), _CloserHandler)
        self._server.owner = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         kwargs={"poll_interval": 0.05}).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answered_for(self, path_prefix: str) -> list[Answered]:
        with self.lock:
            return [a for a in self.answered if a.path.startswith(path_prefix)]

    def dropped_for(self, path_prefix: str) -> list[tuple[str, str]]:
        with self.lock:
            return [d for d in self.dropped if d[1].startswith(path_prefix)]
