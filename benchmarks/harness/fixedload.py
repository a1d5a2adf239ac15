"""An exact number of keep-alive requests, for measurements that divide by it (percall.py).

wrk runs for a duration and cannot say how many requests it will send; counting calls per
request needs the count known in advance. Here `connections` keep-alive connections, opened
once and kept across batches, share each batch's requests (each connection sends its share one
after the other, waiting for every answer), and every answer is checked. It runs on the default asyncio loop in the driver, which is on the load
core, so none of its work is counted against the proxy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


class BadResponse(Exception):
    """An answer that is not a complete HTTP/1.1 response with the expected status and body."""


@dataclass
class BatchResult:
    """What a batch did: requests answered as expected, seconds it took."""

    requests: int
    seconds: float


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Return (status, {lower-case header name: value}) of a response head ending in CRLFCRLF.

    Raises BadResponse when the status line is not HTTP/1.x."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadResponse(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def shares(total: int, connections: int) -> list[int]:
    """Split `total` requests over at most `connections` connections as evenly as possible
    (no connection gets zero)."""
    n = max(1, min(connections, total))
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers, up to the empty line
                return body
            body += (await reader.readexactly(size + 2))[:-2]
    if "content-length" not in headers:
        raise BadResponse("answer without Content-Length or chunked body on a keep-alive "
                          "connection")
    return await reader.readexactly(int(headers["content-length"]))


async def _requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes, count: int, expect: tuple[int, bytes],
                    timeout: float) -> None:
    for _ in range(count):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, headers = parse_head(head)
        body = await asyncio.wait_for(_read_body(reader, headers), timeout)
        if (status, body) != expect:
            raise BadResponse(f"answered {status} {body[:80]!r}, expected {expect!r}")
        if headers.get("connection", "").lower() == "close":
            raise BadResponse("the proxy closed a keep-alive connection")


class KeepAliveClient:
    """`connections` keep-alive connections to 127.0.0.1:port, opened once and kept across
    batches (a context manager), so that a batch after a warm-up batch measures requests
    only, not connection set-up.

    Every request is `GET path` with `Host: host`; an answer other than `expect` (status,
    body) raises BadResponse, no answer within `timeout` seconds TimeoutError.
    """

    def __init__(self, port: int, connections: int, *, host: str = "origin", path: str = "/",
                 expect: tuple[int, bytes] = (200, b"ok\n"), timeout: float = 10.0) -> None:
        self.port = port
        self.connections = connections
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        self.expect = expect
        self.timeout = timeout
        self._runner = asyncio.Runner()
        self._streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _open(self) -> None:
        for _ in range(self.connections):
            self._streams.append(await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), self.timeout))

    async def _close(self) -> None:
        for _, writer in self._streams:
            writer.close()
        self._streams.clear()

    def __enter__(self) -> "KeepAliveClient":
        try:
            self._runner.run(self._open())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._runner.run(self._close())
        finally:
            self._runner.close()

    def batch(self, total: int) -> BatchResult:
        """Send exactly `total` requests, spread over the open connections; return once all
        are answered."""
        async def run() -> None:
            await asyncio.gather(*(
                _requests(reader, writer, self.request, n, self.expect, self.timeout)
                for (reader, writer), n in zip(self._streams, shares(total, len(self._streams)))))

        started = time.monotonic()
        self._runner.run(run())
        return BatchResult(total, time.monotonic() - started)
