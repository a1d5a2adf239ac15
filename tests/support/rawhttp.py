"""HTTP/1.1 over blocking sockets, showing the wire as a client receives it.

`read_response` reads exactly one response from a buffered socket file, so pipelined
responses on one connection can be read one after another; interim 1xx responses come back
as responses of their own.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import BinaryIO


@dataclass
class RawResponse:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]  # names lower-cased, in order received
    body: bytes
    framing: str  # "length", "chunked", "close" or "none"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def names(self) -> set[str]:
        return {key for key, _ in self.headers}

    @property
    def error(self) -> str | None:
        """The proxy's own error reason (x-meshproxy-error), or None."""
        return self.header("x-meshproxy-error")


class Conn:
    """One client connection: a socket and the buffered reader over it."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file: BinaryIO = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, method: str = "GET") -> RawResponse:
        return read_response(self.file, method)

    def final(self, method: str = "GET") -> RawResponse:
        """Read responses until a final (non-1xx) one and return it."""
        while True:
            response = self.read(method)
            if response.status >= 200 or response.status == 101:
                return response

    def request(self, data: bytes, method: str = "GET") -> RawResponse:
        self.send(data)
        return self.final(method)

    def at_eof(self, timeout: float = 5.0) -> bool:
        """Return True if the peer closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def get(host: str, path: str = "/echo", *, version: str = "1.1", headers: str = "",
        method: str = "GET", body: bytes = b"") -> bytes:
    """Return request bytes; `headers` are extra raw lines, each ending in CRLF."""
    head = f"{method} {path} HTTP/{version}\r\nHost: {host}\r\n{headers}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


def _line(f: BinaryIO) -> bytes:
    line = f.readline(70000)
    if not line:
        raise ConnectionError("connection closed before a complete response")
    return line


def read_response(f: BinaryIO, method: str = "GET") -> RawResponse:
    """Read one response (head and body) from `f`. Raises ConnectionError on a cut-off."""
    status_line = _line(f).rstrip(b"\r\n").decode("latin-1")
    version, status, *reason = status_line.split(" ", 2)
    status_code = int(status)
    headers: list[tuple[str, str]] = []
    while True:
        line = _line(f)
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(status_code, reason[0] if reason else "", version, headers, b"", "none")
    if method == "HEAD" or status_code < 200 or status_code in (204, 304):
        return response
    te = response.header("transfer-encoding")
    if te is not None and te.lower().endswith("chunked"):
        response.framing = "chunked"
        parts = []
        while True:
            size = int(_line(f).split(b";")[0].strip(), 16)
            if size == 0:
                while _line(f) not in (b"\r\n", b"\n"):
                    pass  # trailers
                break
            parts.append(f.read(size))
            if len(parts[-1]) != size or _line(f) != b"\r\n":
                raise ConnectionError("chunk cut off")
        response.body = b"".join(parts)
    elif response.header("content-length") is not None:
        response.framing = "length"
        length = int(response.header("content-length"))
        response.body = f.read(length)
        if len(response.body) != length:
            raise ConnectionError("body shorter than Content-Length")
    else:
        response.framing = "close"
        response.body = f.read()
    return response
