"""A raw TCP backend: records every byte and connection, and answers exactly as it is told.

For protocol edge cases a real HTTP server would smooth over: a close-delimited body, closing
without an answer, an interim 1xx before the final response, hop-by-hop response headers; and
to prove that a request the proxy refused never reached a backend at all.

    raw = RawBackend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").start()
    raw.close_after = True          # close the connection after answering
    raw.response = None             # close without answering
    raw.connections, raw.data()     # what arrived
"""

from __future__ import annotations

import queue
import socket
import socketserver
import threading


def _request_end(buf: bytes) -> int | None:
    """Return the length of the first complete request in `buf`, or None if incomplete.

    Understands Content-Length and chunked bodies, enough for the requests the proxy sends.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    body_start = end + 4
    if b"transfer-encoding: chunked" in head:
        last = buf.find(b"\r\n0\r\n\r\n", body_start - 2)
        return None if last < 0 else last + 7
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
            return body_start + length if len(buf) >= body_start + length else None
    return body_start


class _Handler(socketserver.BaseRequestHandler):
    """Reads and records without pause; answers are sent by a second thread, so a proxy that
    holds an answer back (back-pressure) never stops the recording of what it sends."""

    def handle(self) -> None:
        backend: RawBackend = self.server.backend  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        with backend.lock:
            backend.connections += 1
            chunks = backend.per_connection.setdefault(len(backend.per_connection), [])
        outbox: queue.Queue = queue.Queue()
        sender = threading.Thread(target=_send, args=(sock, outbox), daemon=True)
        sender.start()
        buf = b""
        answering = True
        try:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with backend.lock:
                    chunks.append(data)
                buf += data
                while answering and (n := _request_end(buf)) is not None:
                    buf = buf[n:]
                    with backend.lock:
                        backend.requests += 1
                        response, close = backend.response, backend.close_after
                    if response is None:
                        return  # close without answering
                    outbox.put((response, close))
                    # After a close-delimited answer, read on (and record) until the peer
                    # closes, so the close is a clean FIN rather than a reset.
                    answering = not close
        finally:
            outbox.put(None)
            sender.join(10)
            sock.close()


def _send(sock: socket.socket, outbox: queue.Queue) -> None:
    while (item := outbox.get()) is not None:
        response, close = item
        try:
            sock.sendall(response)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class RawBackend:
    """A threaded TCP server on 127.0.0.1:<free port>."""

    def __init__(self, response: bytes | None = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                 *, close_after: bool = False) -> None:
        self.response = response
        self.close_after = close_after
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.per_connection: dict[int, list[bytes]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> "RawBackend":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.backend = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def data(self) -> bytes:
        """Every byte received so far, all connections joined in order of arrival."""
        with self.lock:
            return b"".join(b"".join(c) for c in self.per_connection.values())
