"""Open-loop HTTP/1.1 load generator: requests at fixed intervals, latency from the schedule.

Request i is due at T0 + i / RATE, whatever happened to the requests before it. A timerfd
(CLOCK_MONOTONIC, nanosecond resolution, watched by the event loop like a socket) wakes the
generator when requests fall due; each one goes out on an idle keep-alive connection, or waits
in a first-in first-out queue until one is free. Its latency runs from when it was *due* to the
end of its answer, so time spent waiting behind a slow answer counts (no coordinated omission).
Idle connections are used in turn, so all `--connections` carry traffic.

    python openloop.py --port P --host-header server --path /1k --rate 1000 \\
        --connections 16 --warmup 2 --seconds 20

Once its connections are open it prints `t0 SECONDS` (the due time of request 0 on the
`time.monotonic()` clock, shared by every process of the machine, so a harness can time its
CPU readings to the measured window), then, when the last request is answered or timed out,
one line of JSON with the figures of the requests due in the measured window (the warm-up is
left out). Exit status 2 when the connections cannot be opened.

A request without a complete 2xx answer with exactly `--expect-bytes` of body is an error:
`status NNN`, `short body`, `closed` (the connection ended first), `timeout` (no answer
`--timeout` seconds after it was sent) or `unanswered` (still without an answer when the
generator stops, `--timeout` seconds after the last request fell due). A connection that
failed is opened again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import math
import os
import resource
import socket
import sys
import time
from array import array

import httptools

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
PR_SET_TIMERSLACK = 29

# Per-request outcome codes (array 'b'); 1 is success.
PENDING, OK, BAD_STATUS, SHORT_BODY, CLOSED, TIMEOUT, UNANSWERED = 0, 1, 2, 3, 4, 5, 6
ERROR_NAMES = {BAD_STATUS: "status", SHORT_BODY: "short body", CLOSED: "closed",
               TIMEOUT: "timeout", UNANSWERED: "unanswered"}


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def periodic_timerfd(first_ns: int, interval_ns: int) -> int:
    """Return a non-blocking timerfd that expires at `first_ns` (CLOCK_MONOTONIC) and every
    `interval_ns` after; reading it gives the number of expirations since the last read."""
    libc = _libc()
    fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create failed")
    spec = _Itimerspec(_Timespec(*divmod(interval_ns, 1_000_000_000)),
                       _Timespec(*divmod(first_ns, 1_000_000_000)))
    if libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, "timerfd_settime failed")
    return fd


def tighten_timer_slack() -> None:
    """Ask the kernel to wake this process within 1 ns of its timers (default slack: 50 µs)."""
    try:
        _libc().prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def percentile(sorted_values, q: float):
    """Nearest-rank q-th percentile (0 < q <= 100) of sorted values; None when empty."""
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(q / 100 * len(sorted_values))) - 1]


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, gen: "Generator") -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.request = -1  # index of the request in flight, -1 when idle
        self.sent_ns = 0
        self.body = 0
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.failed(self, CLOSED)

    def on_message_begin(self) -> None:
        self.body = 0

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.gen.answered(self, self.parser.get_status_code(), self.body,
                          self.parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class Generator:
    """The schedule, the connections, and one record per request."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.interval_ns = round(1e9 / args.rate)
        self.total = round((args.warmup + args.seconds) * 1e9 / self.interval_ns)
        self.first_measured = round(args.warmup * 1e9 / self.interval_ns)
        self.request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header}\r\n"
                        f"User-Agent: meshproxy-openloop\r\n\r\n").encode()
        self.latency = array("q", [-1]) * self.total  # ns from due time to answer
        self.timer_lag = array("q", [0]) * self.total  # ns from due time to being handled
        self.outcome = array("b", [PENDING]) * self.total
        self.statuses: collections.Counter[int] = collections.Counter()
        self.idle: collections.deque[Connection] = collections.deque()
        self.waiting: collections.deque[int] = collections.deque()
        self.busy: set[Connection] = set()
        self.queued = 0  # requests that found no idle connection
        self.max_waiting = 0
        self.next = 0
        self.t0_ns = 0
        self.finished = self.loop.create_future()

    def due(self, i: int) -> int:
        return self.t0_ns + i * self.interval_ns

    async def connect(self) -> Connection:
        _, conn = await self.loop.create_connection(
            lambda: Connection(self), self.args.host, self.args.port)
        return conn

    async def reconnect(self) -> None:
        """Open a connection in place of one given up (retrying until it opens), and use it."""
        while not self.finished.done():
            try:
                conn = await self.connect()
            except OSError:
                await asyncio.sleep(0.05)
                continue
            self.free(conn)
            return

    def free(self, conn: Connection) -> None:
        """The connection can carry a request: send the oldest waiting one, or park it."""
        if self.waiting:
            self.send(conn, self.waiting.popleft())
        else:
            self.idle.append(conn)

    def send(self, conn: Connection, i: int) -> None:
        conn.request = i
        conn.sent_ns = time.monotonic_ns()
        self.busy.add(conn)
        conn.transport.write(self.request)

    def on_timer(self) -> None:
        try:
            expirations = int.from_bytes(os.read(self.timer_fd, 8), "little")
        except BlockingIOError:
            return
        now = time.monotonic_ns()
        for _ in range(expirations):
            i = self.next
            if i >= self.total:
                break
            self.next = i + 1
            self.timer_lag[i] = now - self.due(i)
            if self.idle:
                self.send(self.idle.popleft(), i)
            else:
                self.queued += 1
                self.waiting.append(i)
                if len(self.waiting) > self.max_waiting:
                    self.max_waiting = len(self.waiting)
        if self.next >= self.total:
            self.loop.remove_reader(self.timer_fd)
            os.close(self.timer_fd)
            self.loop.call_later(self.args.timeout, self.stop)
            self.check_done()

    def answered(self, conn: Connection, status: int, body: int, keep_alive: bool) -> None:
        now = time.monotonic_ns()
        i = conn.request
        if i < 0:
            return
        conn.request = -1
        self.busy.discard(conn)
        self.statuses[status] += 1
        if not 200 <= status < 300:
            self.outcome[i] = BAD_STATUS
        elif self.args.expect_bytes >= 0 and body != self.args.expect_bytes:
            self.outcome[i] = SHORT_BODY
        else:
            self.outcome[i] = OK
            self.latency[i] = now - self.due(i)
        if keep_alive:
            self.free(conn)
        else:
            conn.gen = _Detached()
            conn.transport.close()
            asyncio.ensure_future(self.reconnect())
        self.check_done()

    def failed(self, conn: Connection, outcome: int) -> None:
        """The request in flight on `conn` failed: record it, drop the connection, open another."""
        i = conn.request
        conn.request = -1
        self.busy.discard(conn)
        if i >= 0 and self.outcome[i] == PENDING:
            self.outcome[i] = outcome
        conn.gen = _Detached()
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.transport is not None:
            conn.transport.abort()
        asyncio.ensure_future(self.reconnect())
        self.check_done()

    def lost(self, conn: Connection) -> None:
        self.failed(conn, CLOSED)

    def sweep(self) -> None:
        """Fail requests that have waited longer than --timeout for their answer."""
        limit = time.monotonic_ns() - int(self.args.timeout * 1e9)
        for conn in [c for c in self.busy if c.request >= 0 and c.sent_ns < limit]:
            self.failed(conn, TIMEOUT)
        if not self.finished.done():
            self.loop.call_later(0.1, self.sweep)

    def check_done(self) -> None:
        if self.next >= self.total and not self.busy and not self.waiting \
                and not self.finished.done():
            self.finished.set_result(None)

    def stop(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    async def run(self) -> dict:
        conns = [await self.connect() for _ in range(self.args.connections)]
        self.idle.extend(conns)
        tighten_timer_slack()
        gc.collect()
        gc.freeze()
        gc.disable()  # a collection pause would show as latency of whatever path is measured
        self.t0_ns = time.monotonic_ns() + 100_000_000
        print(f"t0 {self.t0_ns / 1e9:.9f}", flush=True)
        self.timer_fd = periodic_timerfd(self.t0_ns, self.interval_ns)
        self.loop.add_reader(self.timer_fd, self.on_timer)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        self.loop.call_later(0.1, self.sweep)
        await self.finished
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        gc.enable()
        for conn in list(self.busy):
            if conn.request >= 0 and self.outcome[conn.request] == PENDING:
                self.outcome[conn.request] = UNANSWERED
        for i in self.waiting:
            self.outcome[i] = UNANSWERED
        cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        return self.summary(cpu)

    def summary(self, cpu_s: float) -> dict:
        a = self.args
        lo, hi = self.first_measured, self.total
        ms = 1e-6
        lat = sorted(self.latency[i] for i in range(lo, hi) if self.outcome[i] == OK)
        lag = sorted(self.timer_lag[i] for i in range(lo, hi))
        errors: collections.Counter[str] = collections.Counter()
        for i in range(lo, hi):
            if self.outcome[i] not in (OK, PENDING):
                errors[ERROR_NAMES[self.outcome[i]]] += 1
            elif self.outcome[i] == PENDING:
                errors["unanswered"] += 1
        # One-second slices of the measured window: a path that cannot hold the rate shows as
        # latency growing from slice to slice.
        per_slice = max(1, round(1e9 / self.interval_ns))
        slices = []
        for start in range(lo, hi, per_slice):
            part = sorted(self.latency[i] for i in range(start, min(hi, start + per_slice))
                          if self.outcome[i] == OK)
            slices.append({"p50_ms": percentile(part, 50) * ms if part else None,
                           "p99_ms": percentile(part, 99) * ms if part else None,
                           "ok": len(part)})
        # A queue that grows without bound lifts the median of every later slice; a stall of
        # the machine lifts a few slices' tails. Compare the medians of the first and last
        # quarters of the window.
        quarter = max(1, len(slices) // 4)
        first = sorted(s["p50_ms"] for s in slices[:quarter] if s["p50_ms"] is not None)
        last = sorted(s["p50_ms"] for s in slices[-quarter:] if s["p50_ms"] is not None)
        growing = bool(first and last) and (
            percentile(last, 50) > 2 * percentile(first, 50) + 5.0)
        n = hi - lo
        return {
            "rate": 1e9 / self.interval_ns,
            "connections": a.connections,
            "warmup_s": lo * self.interval_ns / 1e9,
            "seconds": n * self.interval_ns / 1e9,
            "t0": self.t0_ns / 1e9,
            "window": [self.due(lo) / 1e9, self.due(hi) / 1e9],
            "scheduled": n,
            "ok": len(lat),
            "errors": sum(errors.values()),
            "errors_by_kind": dict(errors.most_common()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": percentile(lat, 50) * ms if lat else None,
            "p90_ms": percentile(lat, 90) * ms if lat else None,
            "p99_ms": percentile(lat, 99) * ms if lat else None,
            "p999_ms": percentile(lat, 99.9) * ms if lat else None,
            "max_ms": lat[-1] * ms if lat else None,
            "mean_ms": sum(lat) / len(lat) * ms if lat else None,
            "timer_lag_p50_ms": percentile(lag, 50) * ms if lag else None,
            "timer_lag_p99_ms": percentile(lag, 99) * ms if lag else None,
            "timer_lag_max_ms": lag[-1] * ms if lag else None,
            "queued": self.queued,  # warm-up included
            "max_waiting": self.max_waiting,
            "held": len(lat) == n and not growing,
            "latency_growing": growing,
            "slices": slices,
            "generator_cpu_s": cpu_s,
        }


class _Detached:
    """Stands in for the generator on a connection that was given up: ignores its events."""

    def answered(self, *args: object) -> None:
        pass

    def failed(self, *args: object) -> None:
        pass

    def lost(self, *args: object) -> None:
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to connect to")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default="localhost")
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds measured")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an answer may take")
    p.add_argument("--expect-bytes", type=int, default=-1,
                   help="body size every answer must have (-1: any)")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.connections < 1 or args.seconds <= 0 or args.warmup < 0:
        p.error("--rate, --connections and --seconds must be positive, --warmup at least 0")
    return args


async def amain(args: argparse.Namespace) -> int:
    gen = Generator(args)
    try:
        summary = await gen.run()
    except OSError as exc:
        print(f"openloop: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
