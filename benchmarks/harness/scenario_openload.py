"""Open-loop load generator for the resilience scenarios that records every request.

Request i falls due at START + i / `--rate`, whatever happened to the requests before it (a
slow answer does not slow the load down, unlike scenario_load.py's closed loop). A request
that falls due goes out on an idle keep-alive connection, the idle ones in turn so that every
one of the `--connections` carries traffic, or waits first-in first-out until one is free.
Its latency runs from when it was due to the end of its answer, so time spent waiting behind
a slow answer counts. The records are those of scenario_load.py (one list per field: start
time, latency, status, `x-instance` of the answer), with the due time as the start time, so
harness/scenario_stats.py reads both.

    python scenario_openload.py --port P --host-header backend --rate 300 --connections 32 \\
        --seconds 17 --out records.json

It prints `started MONOTONIC` once its connections are open and load begins, `finished
MONOTONIC` when the last request is done, then writes the records as JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

try:
    from harness.scenario_load import (BAD_RESPONSE, CLOSED, CONNECT_FAILED, TIMEOUT,
                                       BadResponse, ClientConnection, Recorder, _connect,
                                       _cpu_seconds)
except ImportError:  # run as a script: its own folder is on sys.path, benchmarks/ is not
    from scenario_load import (BAD_RESPONSE, CLOSED, CONNECT_FAILED, TIMEOUT,  # type: ignore
                               BadResponse, ClientConnection, Recorder, _connect,
                               _cpu_seconds)


class OpenLoop:
    """The schedule, the idle connections and the queue of requests waiting for one."""

    def __init__(self, host: str, port: int, request: bytes, timeout: float,
                 conns: list[ClientConnection], rec: Recorder) -> None:
        self.host, self.port, self.request, self.timeout = host, port, request, timeout
        self.idle: collections.deque[ClientConnection | None] = collections.deque(conns)
        self.waiting: collections.deque[float] = collections.deque()  # due times
        self.rec = rec
        self.tasks: set[asyncio.Task] = set()

    def due(self, at: float) -> None:
        """A request fell due at `at`: send it now, or queue it until a connection is free."""
        if self.idle:
            self._send(self.idle.popleft(), at)
        else:
            self.waiting.append(at)

    def _send(self, conn: ClientConnection | None, due: float) -> None:
        task = asyncio.get_running_loop().create_task(self._one(conn, due))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, conn: ClientConnection | None, due: float) -> None:
        clock = time.monotonic
        connecting = conn is None or conn.closed
        try:
            if connecting:
                conn = await _connect(self.host, self.port, self.timeout)
                connecting = False
            status, instance, keep_alive = await asyncio.wait_for(
                conn.request(self.request), self.timeout)
        except (TimeoutError, OSError, BadResponse) as exc:
            if isinstance(exc, TimeoutError):
                status = TIMEOUT
            elif isinstance(exc, BadResponse):
                status = BAD_RESPONSE
            else:
                status = CONNECT_FAILED if connecting else CLOSED
            self.rec.add(due, clock() - due, status, None)
            if conn is not None:
                conn.close()
            self._free(None)
            return
        self.rec.add(due, clock() - due, status, instance)
        if not keep_alive:
            conn.close()
            conn = None
        self._free(conn)

    def _free(self, conn: ClientConnection | None) -> None:
        """A connection (None: one to open again) is free: it takes the oldest waiting
        request, or goes to the back of the idle ones."""
        if self.waiting:
            self._send(conn, self.waiting.popleft())
        else:
            self.idle.append(conn)


async def run(host: str, port: int, host_header: str, path: str, rate: float,
              connections: int, seconds: float, timeout: float) -> dict:
    """Open the connections, load at `rate` for `seconds`, return the records as a dict."""
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: scenario-load\r\n"
               "\r\n").encode()
    conns = await asyncio.gather(*(_connect(host, port, timeout) for _ in range(connections)))
    rec = Recorder()
    load = OpenLoop(host, port, request, timeout, list(conns), rec)
    loop = asyncio.get_running_loop()
    cpu0 = _cpu_seconds()
    start = time.monotonic()
    end = start + seconds
    print(f"started {start!r}", flush=True)
    count = int(seconds * rate)
    offset = loop.time() - start  # the loop's clock may differ from time.monotonic()
    i = 0
    while i < count:
        now = time.monotonic()
        # Send every request that fell due (a late wake-up sends several at once) ...
        while i < count and start + i / rate <= now:
            load.due(start + i / rate)
            i += 1
        if i < count:
            # ... and sleep until the next one.
            wake = asyncio.get_running_loop().create_future()
            loop.call_at(start + i / rate + offset, wake.set_result, None)
            await wake
    while load.tasks:
        await asyncio.gather(*list(load.tasks))
    print(f"finished {time.monotonic()!r}", flush=True)
    for conn in load.idle:
        if conn is not None:
            conn.close()
    return {"start": start, "end": end, "finished": time.monotonic(),
            "cpu_s": _cpu_seconds() - cpu0, "instances": rec.instances,
            "t": rec.t, "lat": rec.lat, "status": rec.status, "inst": rec.inst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host-header", default="backend")
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    parser.add_argument("--out", required=True, help="JSON file for the records")
    args = parser.parse_args()
    coro = run(args.host, args.port, args.host_header, args.path, args.rate,
               args.connections, args.seconds, args.timeout)
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
