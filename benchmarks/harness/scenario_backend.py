"""Backend for the resilience scenarios: a tiny HTTP/1.1 server that says which instance it is.

Every response carries `x-instance: NAME` and the body `ok\\n` (or the status's reason phrase).
`--delay-ms` holds each answer back that long (without blocking other connections); with
`--delay-first N` only the first N requests the instance receives are held back, and it prints
`delay over MONOTONIC` when the Nth of them is answered (an instance that is slow for a while,
then as fast as the others). `--status` answers every request with that status. Keep-alive,
one small write per response: it costs far less CPU per request than the proxy in front of it.

    python scenario_backend.py --port 9001 --name b0 [--delay-ms 50 [--delay-first 30]] \
        [--status 503]

It prints `listening PORT` once it accepts connections and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import time

import httptools


def response(status: int, name: str, keep_alive: bool) -> bytes:
    """Return the complete response bytes for one request."""
    body = b"ok\n" if status == 200 else http.HTTPStatus(status).phrase.encode() + b"\n"
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"x-instance: {name}\r\n" + ("" if keep_alive else "Connection: close\r\n") + "\r\n")
    return head.encode() + body


class Delay:
    """How long the next answer waits: `seconds` for the first `first` requests of the
    instance (all connections together), or for every request when `first` is 0."""

    def __init__(self, seconds: float, first: int) -> None:
        self.seconds = seconds
        self.left = first if seconds > 0 else 0
        self.always = first == 0

    def next(self) -> float:
        """Return the delay for the request just received."""
        if self.always:
            return self.seconds
        if self.left <= 0:
            return 0.0
        self.left -= 1
        return self.seconds


class BackendProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer each (after its delay) in order."""

    # No on_body callback: httptools then skips request bodies without a Python call.

    def __init__(self, keep: bytes, close: bytes, delay: Delay) -> None:
        self._keep = keep
        self._close = close
        self._delay = delay
        self._due = 0.0  # when the last answer on this connection leaves (loop time)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        delay = self._delay.next()
        last = self._delay.left == 0 and delay > 0 and not self._delay.always
        now = self.loop.time()
        if delay > 0 or self._due > now:
            # A pipelined answer never overtakes a held-back one on the same connection.
            self._due = max(now + delay, self._due)
            self.loop.call_at(self._due, self._answer, keep_alive, last)
        else:
            self._answer(keep_alive, last)

    def _answer(self, keep_alive: bool, last_delayed: bool = False) -> None:
        if last_delayed:
            print(f"delay over {time.monotonic()!r}", flush=True)
        if self.transport.is_closing():
            return
        self.transport.write(self._keep if keep_alive else self._close)
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int, name: str, status: int, delay: float,
                delay_first: int = 0) -> None:
    """Serve until cancelled; print `listening PORT` once the socket accepts connections.

    `delay` (seconds) holds back every answer, or only the first `delay_first` ones."""
    loop = asyncio.get_running_loop()
    keep, close = response(status, name, True), response(status, name, False)
    held = Delay(delay, delay_first)
    # reuse_address (the asyncio default on Unix) lets a restarted instance bind the same
    # port while connections of the killed one are still in TIME_WAIT.
    server = await loop.create_server(lambda: BackendProtocol(keep, close, held), host, port,
                                      backlog=1024, reuse_address=True)
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True, help="value of the x-instance header")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each answer")
    parser.add_argument("--delay-first", type=int, default=0,
                        help="hold back only the first N requests (0: every request)")
    parser.add_argument("--status", type=int, default=200, help="status of every answer")
    args = parser.parse_args()
    run = serve(args.host, args.port, args.name, args.status, args.delay_ms / 1000,
                args.delay_first)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run)
    else:
        uvloop.run(run)


if __name__ == "__main__":
    main()
