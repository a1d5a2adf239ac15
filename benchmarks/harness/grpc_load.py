"""gRPC load generator (grpcio's asyncio API): unary calls at a fixed rate, or as fast as a
fixed number of calls in flight allows, over one channel (one HTTP/2 connection).

Open loop (`--rate`): call i is due at T0 + i / RATE whatever happened to the calls before it
(a timerfd wakes the generator, as in openloop.py); its latency runs from when it was *due* to
its answer, so time spent queued behind a slow answer counts. Once the channel is connected it
prints `t0 SECONDS` (the due time of call 0 on the machine-wide `time.monotonic()` clock, for a
harness timing its CPU readings), then one line of JSON with the figures of the calls due in
the measured window (the warm-up left out).

Closed loop (`--concurrency N --calls M`): N callers, each making its next call when its last
one is answered, until M calls are made; prints `t0` when they start and the same JSON.

    python grpc_load.py --port P --authority server --rate 1000 --warmup 2 --seconds 20
    python grpc_load.py --port P --authority echo --concurrency 32 --calls 30000

Every answer is `NAME:REQUEST` (harness/grpc_app.py): a call counts as successful when its
status is OK and its answer ends with the request; the JSON counts answers per NAME (which
backend answered). A failed call is counted by its status code name (`UNAVAILABLE`,
`DEADLINE_EXCEEDED`, ...) or `bad answer`; the first few distinct error details are kept.
`--authority` is the channel's `grpc.default_authority`: a sidecar routes on it, as on a Host
header.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import resource
import sys
import time
from array import array
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.grpc_app import METHOD  # noqa: E402
from harness.openloop import percentile, periodic_timerfd, tighten_timer_slack  # noqa: E402

PENDING, OK = 0, 1
MAX_DETAILS = 5


def _identity(data: bytes) -> bytes:
    return data


class Load:
    """The channel, the schedule (or the callers), and one record per call."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        options = [("grpc.default_authority", args.authority)] if args.authority else []
        # No retries or keep-alive pings of grpcio's own: every call is one attempt.
        options += [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.aio.insecure_channel(f"{args.host}:{args.port}", options=options)
        self.call = self.channel.unary_unary(METHOD, request_serializer=_identity,
                                             response_deserializer=_identity)
        self.request = (b"x" * args.request_bytes)[:args.request_bytes]
        if args.rate:
            self.interval_ns = round(1e9 / args.rate)
            self.total = round((args.warmup + args.seconds) * 1e9 / self.interval_ns)
            self.first_measured = round(args.warmup * 1e9 / self.interval_ns)
        else:
            self.interval_ns = 0
            self.total = args.calls
            self.first_measured = 0
        self.latency = array("q", [-1]) * self.total  # ns from due (or sent) time to answer
        self.timer_lag = array("q", [0]) * self.total
        self.outcome = array("b", [PENDING]) * self.total
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_at: list[tuple[int, str]] = []  # (call index, kind) of each failure
        self.details: list[str] = []
        self.backends: collections.Counter[str] = collections.Counter()
        self.backends_measured: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.next = 0
        self.t0_ns = 0
        self.end_ns = 0
        self.finished = self.loop.create_future()

    def due(self, i: int) -> int:
        return self.t0_ns + i * self.interval_ns

    def start(self, i: int, started_ns: int) -> None:
        """Start call i (counted in flight from now, before its task first runs)."""
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        asyncio.ensure_future(self.one(i, started_ns))

    async def one(self, i: int, started_ns: int) -> None:
        try:
            answer = await self.call(self.request, timeout=self.args.timeout)
        except grpc.aio.AioRpcError as exc:
            self._failed(i, exc.code().name, f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # noqa: BLE001 - any failure of a call is a figure
            self._failed(i, type(exc).__name__, repr(exc))
        else:
            now = time.monotonic_ns()
            name, sep, echoed = answer.partition(b":")
            if not sep or echoed != self.request:
                self._failed(i, "bad answer", repr(answer[:80]))
            else:
                self.outcome[i] = OK
                self.latency[i] = now - started_ns
                backend = name.decode(errors="replace")
                self.backends[backend] += 1
                if i >= self.first_measured:
                    self.backends_measured[backend] += 1
        finally:
            self.in_flight -= 1
            self._check_done()

    def _failed(self, i: int, kind: str, detail: str) -> None:
        self.outcome[i] = 2
        self.errors[kind] += 1
        self.error_at.append((i, kind))
        if detail not in self.details and len(self.details) < MAX_DETAILS:
            self.details.append(detail)

    def _check_done(self) -> None:
        if self.next >= self.total and not self.in_flight and not self.finished.done():
            self.end_ns = time.monotonic_ns()
            self.finished.set_result(None)

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
            due = self.due(i)
            self.timer_lag[i] = now - due
            self.start(i, due)
        if self.next >= self.total:
            self.loop.remove_reader(self.timer_fd)
            os.close(self.timer_fd)
            self._check_done()

    async def caller(self) -> None:
        while self.next < self.total:
            i = self.next
            self.next = i + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await self.one(i, time.monotonic_ns())

    async def run(self) -> dict:
        await asyncio.wait_for(self.channel.channel_ready(), self.args.connect_timeout)
        # One call before the clock starts: the channel's first stream, not counted.
        await self.call(self.request, timeout=self.args.timeout)
        tighten_timer_slack()
        gc.collect()
        gc.freeze()
        gc.disable()  # a collection pause would show as latency of whatever path is measured
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        if self.interval_ns:
            self.t0_ns = time.monotonic_ns() + 100_000_000
            print(f"t0 {self.t0_ns / 1e9:.9f}", flush=True)
            self.timer_fd = periodic_timerfd(self.t0_ns, self.interval_ns)
            self.loop.add_reader(self.timer_fd, self.on_timer)
        else:
            self.t0_ns = time.monotonic_ns()
            print(f"t0 {self.t0_ns / 1e9:.9f}", flush=True)
            for _ in range(self.args.concurrency):
                asyncio.ensure_future(self.caller())
        await self.finished
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        gc.enable()
        await self.channel.close()
        cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        return self.summary(cpu)

    def summary(self, cpu_s: float) -> dict:
        lo, hi = self.first_measured, self.total
        ms = 1e-6
        lat = sorted(self.latency[i] for i in range(lo, hi) if self.outcome[i] == OK)
        n = hi - lo
        errors = sum(1 for i in range(lo, hi) if self.outcome[i] != OK)
        result = {
            "mode": "open" if self.interval_ns else "closed",
            "scheduled": n,
            "ok": len(lat),
            "errors": errors,
            "errors_by_kind": dict(self.errors.most_common()),  # warm-up included
            "error_details": self.details,
            "first_errors_s": [round((i * self.interval_ns) / 1e9, 3)
                               for i, _ in self.error_at[:10]] if self.interval_ns else [],
            "p50_ms": percentile(lat, 50) * ms if lat else None,
            "p90_ms": percentile(lat, 90) * ms if lat else None,
            "p99_ms": percentile(lat, 99) * ms if lat else None,
            "p999_ms": percentile(lat, 99.9) * ms if lat else None,
            "max_ms": lat[-1] * ms if lat else None,
            "mean_ms": sum(lat) / len(lat) * ms if lat else None,
            "max_in_flight": self.max_in_flight,
            "backends": dict(sorted(self.backends_measured.items())),
            "generator_cpu_s": cpu_s,
            "t0": self.t0_ns / 1e9,
        }
        if self.interval_ns:
            lag = sorted(self.timer_lag[i] for i in range(lo, hi))
            result.update({
                "rate": 1e9 / self.interval_ns,
                "warmup_s": lo * self.interval_ns / 1e9,
                "seconds": n * self.interval_ns / 1e9,
                "window": [self.due(lo) / 1e9, self.due(hi) / 1e9],
                "timer_lag_p99_ms": percentile(lag, 99) * ms if lag else None,
                "held": len(lat) == n,
            })
        else:
            wall = (self.end_ns - self.t0_ns) / 1e9
            result.update({"wall_s": wall, "calls_per_s": n / wall if wall > 0 else None,
                           "concurrency": self.args.concurrency})
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--authority", default="", help="grpc.default_authority of the channel")
    p.add_argument("--rate", type=float, default=0.0, help="calls per second (open loop)")
    p.add_argument("--warmup", type=float, default=2.0, help="open loop: seconds not counted")
    p.add_argument("--seconds", type=float, default=20.0, help="open loop: seconds measured")
    p.add_argument("--concurrency", type=int, default=0, help="closed loop: calls in flight")
    p.add_argument("--calls", type=int, default=0, help="closed loop: calls in all")
    p.add_argument("--request-bytes", type=int, default=32, help="size of each request message")
    p.add_argument("--timeout", type=float, default=5.0, help="each call's deadline, seconds")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    if bool(args.rate) == bool(args.concurrency):
        p.error("give either --rate (open loop) or --concurrency and --calls (closed loop)")
    if args.concurrency and args.calls < 1:
        p.error("--concurrency needs --calls")
    if args.rate and (args.rate < 0 or args.seconds <= 0 or args.warmup < 0):
        p.error("--rate and --seconds must be positive, --warmup at least 0")
    return args


async def amain(args: argparse.Namespace) -> int:
    load = Load(args)
    try:
        summary = await load.run()
    except (asyncio.TimeoutError, grpc.aio.AioRpcError) as exc:
        print(f"grpc_load: no answer from {args.host}:{args.port}: {exc!r}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
