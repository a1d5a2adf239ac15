"""Closed-loop load generator for the resilience scenarios that records every request.

`--concurrency` keep-alive connections each send `GET PATH` with `Host: HOST_HEADER`, wait for
the answer and send the next, for `--seconds`. For every request it keeps the start time
(time.monotonic(), the same clock in every process of the machine, so the harness can line
requests up with the moment it killed a backend), the latency, the status and the
`x-instance` header of the answer. A request that gets no complete answer gets a negative
status (see FAILURES) and its connection is opened again.

    python scenario_load.py --port P --host-header backend --concurrency 16 --seconds 25 \\
        --out records.json

It prints `started MONOTONIC` once its connections are open and load begins, `finished
MONOTONIC` when the last request is done, then writes the records as JSON (one list per
field) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

import httptools

# Statuses recorded for requests that got no complete answer.
TIMEOUT, CLOSED, CONNECT_FAILED, BAD_RESPONSE = -1, -2, -3, -4
FAILURES = {TIMEOUT: "timeout", CLOSED: "connection closed", CONNECT_FAILED: "connect failed",
            BAD_RESPONSE: "bad response"}


class BadResponse(Exception):
    """The answer could not be parsed as HTTP/1.1."""


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self._instance: bytes | None = None
        self._parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(str(exc)))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("connection closed before a complete answer"))

    def on_message_begin(self) -> None:
        self._instance = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-instance":
            self._instance = value

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), self._instance,
                               self._parser.should_keep_alive()))

    def request(self, data: bytes) -> asyncio.Future:
        """Send one request; return a future of (status, x-instance or None, keep-alive)."""
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class Recorder:
    """The records of one run, one list per field, and the instance names seen."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.lat: list[float] = []
        self.status: list[int] = []
        self.inst: list[int] = []
        self.instances: list[str] = []
        self._index: dict[bytes | None, int] = {None: -1}

    def add(self, started: float, latency: float, status: int, instance: bytes | None) -> None:
        """Record one request."""
        index = self._index.get(instance)
        if index is None:
            index = self._index[instance] = len(self.instances)
            self.instances.append(instance.decode("latin-1"))
        self.t.append(started)
        self.lat.append(latency)
        self.status.append(status)
        self.inst.append(index)


async def _connect(host: str, port: int, timeout: float) -> ClientConnection:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(ClientConnection, host, port), timeout)
    return conn


async def _worker(host: str, port: int, request: bytes, end: float, timeout: float,
                  conn: ClientConnection | None, rec: Recorder) -> None:
    clock = time.monotonic
    while True:
        started = clock()
        if started >= end:
            break
        connecting = conn is None or conn.closed
        try:
            if connecting:
                conn = await _connect(host, port, timeout)
                connecting = False
            status, instance, keep_alive = await asyncio.wait_for(conn.request(request),
                                                                  timeout)
        except (TimeoutError, OSError, BadResponse) as exc:
            if isinstance(exc, TimeoutError):
                status = TIMEOUT
            elif isinstance(exc, BadResponse):
                status = BAD_RESPONSE
            elif connecting:
                status = CONNECT_FAILED
            else:
                status = CLOSED
            rec.add(started, clock() - started, status, None)
            if conn is not None:
                conn.close()
            conn = None
            if status == CONNECT_FAILED:
                # The target itself is gone: do not spin on refused connections.
                await asyncio.sleep(0.01)
            continue
        rec.add(started, clock() - started, status, instance)
        if not keep_alive:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


async def run(host: str, port: int, host_header: str, path: str, concurrency: int,
              seconds: float, timeout: float) -> dict:
    """Open the connections, load for `seconds`, and return the records as a dict."""
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: scenario-load\r\n"
               "\r\n").encode()
    conns = await asyncio.gather(*(_connect(host, port, timeout) for _ in range(concurrency)))
    rec = Recorder()
    cpu0 = _cpu_seconds()
    start = time.monotonic()
    end = start + seconds
    print(f"started {start!r}", flush=True)
    await asyncio.gather(*(_worker(host, port, request, end, timeout, conn, rec)
                           for conn in conns))
    print(f"finished {time.monotonic()!r}", flush=True)
    return {"start": start, "end": end, "finished": time.monotonic(),
            "cpu_s": _cpu_seconds() - cpu0, "instances": rec.instances,
            "t": rec.t, "lat": rec.lat, "status": rec.status, "inst": rec.inst}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host-header", default="backend")
    parser.add_argument("--path", default="/")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    parser.add_argument("--out", required=True, help="JSON file for the records")
    args = parser.parse_args()
    coro = run(args.host, args.port, args.host_header, args.path, args.concurrency,
               args.seconds, args.timeout)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    with open(args.out, "w") as f:
        json.dump(result, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
