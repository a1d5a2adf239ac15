"""`meshproxy demo load`: realistic traffic at the drone-delivery demo's public API.

A mix of what customers do: schedule deliveries (a few for suspended accounts, some with a
third-party pickup), poll their status, change some and cancel a few, at `--rate` requests per
second from `--concurrency` clients, with a one-line progress display and a summary at the end
(per operation, status codes, latency, the deliveries' last states, and which `delivery`
version answered the status polls). Every delivery it creates sets off the whole call chain
behind ingestion, the scheduler's gRPC call to `drone-telemetry` included.

Exit status: 0 when at least half of the requests got the answer expected of them, else 1
(also when ingestion cannot be reached at all).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from meshproxy.local.bundled import SOURCE_CONFIG, bundled_file

if TYPE_CHECKING:  # aiohttp loads when the load runs, not for every `meshproxy` command
    import aiohttp

# The demo's Mesh file: the source tree's, or a built package's copy (local/bundled.py).
DEMO_MESH = bundled_file("demo", "mesh.yaml") or SOURCE_CONFIG / "demo" / "mesh.yaml"
OPERATIONS = ("create", "status", "update", "cancel")
WEIGHTS = (0.35, 0.45, 0.12, 0.08)
# The answers each operation expects; a 409 to a change is the API refusing a race this
# generator itself makes (changing a delivery that is being cancelled, say), not a failure.
EXPECTED = {"create": {202}, "status": {200}, "update": {200, 409}, "cancel": {202}}
FINAL = ("delivered", "failed", "cancelled")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `demo` (with its subcommand `load`) on `subparsers`; return the `demo` parser.

    The parsed arguments have `demo_command == "load"`; pass them to run().
    """
    demo = subparsers.add_parser("demo", help="the drone-delivery demo",
                                 description="The drone-delivery demo (`meshproxy up` runs it).")
    sub = demo.add_subparsers(dest="demo_command", metavar="SUBCOMMAND", required=True)
    load = sub.add_parser("load", help="drive traffic at the demo's ingestion API",
                          description="Schedule, poll, change and cancel deliveries through the "
                          "demo's ingestion API; show progress and a summary.")
    load.add_argument("--url", default=None,
                      help="ingestion's URL (default: its app address in config/demo/mesh.yaml)")
    load.add_argument("--mesh", default=None, metavar="FILE",
                      help="read ingestion's address from this Mesh file instead")
    load.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    load.add_argument("--duration", type=float, default=0.0,
                      help="seconds to run (default 0: until Ctrl-C)")
    load.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    load.add_argument("--seed", type=int, default=None, help="seed of the traffic mix")
    return demo


def default_url(mesh_file: Path | str | None = None) -> str:
    """Return the URL of the first `ingestion` instance of the Mesh file (the demo's by default):
    its sidecar's inbound port when the file fixes one (the mesh's edge), else the app's address.
    Raises ConfigError for an invalid file and LookupError when it has no ingestion."""
    from meshproxy.config import load_config

    snapshot = load_config([str(mesh_file or DEMO_MESH)])
    for service in snapshot.services.values():
        if service.name == "ingestion" and service.instances:
            instance = service.instances[0]
            if instance.meshed and instance.sidecar_ports.inbound:
                return f"http://127.0.0.1:{instance.sidecar_ports.inbound}"
            return f"http://{instance.app_address}"
    raise LookupError(f"{mesh_file or DEMO_MESH}: no 'ingestion' instance")


@dataclass
class Tally:
    """What the run saw; read by the progress line and the summary."""

    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    ok: int = 0
    failed: int = 0
    by_op: Counter = field(default_factory=Counter)
    ok_by_op: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    latencies: deque = field(default_factory=lambda: deque(maxlen=100_000))

    def record(self, op: str, code: int | str, ms: float) -> None:
        self.sent += 1
        self.by_op[op] += 1
        self.codes[code] += 1
        self.latencies.append(ms)
        if code in EXPECTED[op]:
            self.ok += 1
            self.ok_by_op[op] += 1
        else:
            self.failed += 1


class Customers:
    """Chooses what to do next and remembers the deliveries it created."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rng: random.Random, tally: Tally) -> None:
        self.session, self.url, self.rng, self.tally = session, url.rstrip("/"), rng, tally
        self.deliveries: dict[str, str] = {}  # id -> last status seen
        self.recent: deque[str] = deque(maxlen=500)

    async def one(self) -> None:
        """Do one operation, chosen by the mix, and record its outcome."""
        op = self.rng.choices(OPERATIONS, WEIGHTS)[0] if self.recent else "create"
        if op == "update":
            candidates = [d for d in self.recent if self.deliveries.get(d) in ("scheduled", "in-transit")]
            op = "update" if candidates else "status"
        elif op == "cancel":
            candidates = [d for d in self.recent if self.deliveries.get(d) not in FINAL + ("cancelling",)]
            op = "cancel" if candidates else "create"
        if op == "create":
            await self._send(op, "POST", "/api/deliveries", self._new_delivery())
        elif op == "status":  # customers mostly follow the deliveries still under way
            open_ = [d for d in self.recent if self.deliveries.get(d) not in FINAL]
            pick = open_ if open_ and self.rng.random() < 0.8 else self.recent
            await self._send(op, "GET", f"/api/deliveries/{self.rng.choice(pick)}")
        elif op == "update":
            delivery_id = self.rng.choice(candidates)
            await self._send(op, "PUT", f"/api/deliveries/{delivery_id}",
                             {"notes": self.rng.choice(["leave at the door", "ring twice", "back yard"]),
                              "expedited": self.rng.random() < 0.3})
        else:
            delivery_id = self.rng.choice(candidates)
            if await self._send(op, "DELETE", f"/api/deliveries/{delivery_id}") == 202:
                self.deliveries[delivery_id] = "cancelling"

    def _new_delivery(self) -> dict:
        rng = self.rng
        owner = f"suspended-{rng.randint(1, 9)}" if rng.random() < 0.03 else f"acct-{rng.randint(1, 500):04d}"
        def point() -> dict:
            return {"lat": round(47.5 + rng.random() * 0.3, 5), "lon": round(-122.45 + rng.random() * 0.3, 5)}
        return {"ownerId": owner, "pickupLocation": point(), "dropoffLocation": point(),
                "packageInfo": {"size": rng.choice(["small", "small", "medium", "large"]),
                                "weight": round(rng.uniform(0.2, 10), 1), "tag": f"order-{rng.randint(1, 99999)}"},
                "expedited": rng.random() < 0.2, "thirdPartyPickup": rng.random() < 0.15}

    async def _send(self, op: str, method: str, path: str, body: dict | None = None) -> int | str:
        import aiohttp

        started = time.monotonic()
        try:
            async with self.session.request(method, self.url + path, json=body) as response:
                code: int | str = response.status
                answer = await response.json(content_type=None) if response.status < 500 else None
                version = response.headers.get("x-delivery-version")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            code, answer, version = type(exc).__name__, None, None
        self.tally.record(op, code, (time.monotonic() - started) * 1000)
        if isinstance(answer, dict) and answer.get("deliveryId"):
            if op == "create" and code == 202:
                self.recent.append(answer["deliveryId"])
            if op in ("create", "status", "update") and isinstance(answer.get("status"), str):
                self.deliveries[answer["deliveryId"]] = answer["status"]
        if op == "status" and version:
            self.tally.versions[version] += 1
        return code


def _progress(tally: Tally, last: tuple[float, int]) -> str:
    now = time.monotonic()
    if now - last[0] >= 0.5:
        rate = (tally.sent - last[1]) / (now - last[0])
    else:  # too short a stretch to say (the last line of a run): the average
        rate = tally.sent / max(now - tally.started, 1e-6)
    return (f"{now - tally.started:6.1f}s  sent {tally.sent}  ok {tally.ok}  failed {tally.failed}  "
            f"rate {rate:.1f}/s")


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def summary(tally: Tally, customers: Customers, url: str) -> list[str]:
    """Return the summary lines of a finished run."""
    elapsed = max(time.monotonic() - tally.started, 1e-6)
    share = 100.0 * tally.ok / tally.sent if tally.sent else 0.0
    lat = sorted(tally.latencies)
    states = Counter(customers.deliveries.values())
    ops = ", ".join(f"{op} {tally.by_op[op]} ({tally.ok_by_op[op]} ok)" for op in OPERATIONS if tally.by_op[op])
    lines = [
        f"meshproxy demo load: {tally.sent} requests in {elapsed:.1f}s ({tally.sent / elapsed:.1f}/s) to {url}",
        f"  ok {tally.ok}  failed {tally.failed}  ({share:.1f}% as expected)",
        f"  operations: {ops or 'none'}",
        "  answers: " + (", ".join(f"{code} x{n}" for code, n in sorted(tally.codes.items(), key=str)) or "none"),
        f"  latency: p50 {_percentile(lat, 0.5):.0f}ms  p95 {_percentile(lat, 0.95):.0f}ms  "
        f"p99 {_percentile(lat, 0.99):.0f}ms",
        f"  deliveries: {len(customers.recent)} created; last seen "
        + (", ".join(f"{s} {n}" for s, n in states.most_common()) or "none"),
    ]
    if tally.versions:
        lines.append("  delivery versions answering: "
                     + ", ".join(f"{v} {n}" for v, n in sorted(tally.versions.items())))
    return lines


async def _reachable(session: aiohttp.ClientSession, url: str) -> str | None:
    import aiohttp

    try:
        async with session.get(url.rstrip("/") + "/healthz", timeout=aiohttp.ClientTimeout(total=3)) as r:
            return None if r.status == 200 else f"GET /healthz answered {r.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return str(exc) or type(exc).__name__


async def drive(url: str, rate: float, duration: float, concurrency: int, seed: int | None,
                out: TextIO) -> int:
    """Run the load against `url`; print progress and the summary to `out`; return the exit code."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        problem = await _reachable(session, url)
        if problem:
            print(f"meshproxy demo load: cannot reach ingestion at {url}: {problem}\n"
                  "  (is the demo running? `meshproxy up`)", file=sys.stderr)
            return 1
        tally = Tally()
        customers = Customers(session, url, random.Random(seed), tally)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
                pass
        end = tally.started + duration if duration > 0 else float("inf")
        interval = 1.0 / rate
        next_slot = [time.monotonic()]

        async def client() -> None:
            while not stop.is_set():
                slot = max(next_slot[0], time.monotonic())
                next_slot[0] = slot + interval
                if slot >= end:
                    return
                await asyncio.sleep(slot - time.monotonic())  # pacing to the requested rate
                await customers.one()

        tty = out.isatty()
        clients = [asyncio.ensure_future(client()) for _ in range(concurrency)]
        done = asyncio.ensure_future(asyncio.gather(*clients))
        stopped = asyncio.ensure_future(stop.wait())
        last = (time.monotonic(), 0)
        try:
            while not done.done():
                await asyncio.wait({done, stopped}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    break
                line = _progress(tally, last)
                last = (time.monotonic(), tally.sent)
                print("\r" + line.ljust(72) if tty else line, end="" if tty else "\n", file=out, flush=True)
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(done, return_exceptions=True)
            stopped.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(signum)
                except (RuntimeError, ValueError, NotImplementedError):
                    pass
        if tty:
            print(file=out)
        for line in summary(tally, customers, url):
            print(line, file=out, flush=True)
        return 0 if tally.sent and tally.ok * 2 >= tally.sent else 1


def run(args: argparse.Namespace) -> int:
    """Entry point of `meshproxy demo load` (arguments from add_parser); return the exit code."""
    if args.rate <= 0 or args.concurrency < 1 or args.duration < 0:
        print("meshproxy demo load: --rate must be positive, --concurrency at least 1, "
              "--duration not negative", file=sys.stderr)
        return 2
    url = args.url
    if url is None:
        try:
            url = default_url(args.mesh)
        except Exception as exc:  # ConfigError, LookupError, OSError: all mean "say --url"
            print(f"meshproxy demo load: {exc}\n  (give --url)", file=sys.stderr)
            return 2
    return asyncio.run(drive(url, args.rate, args.duration, args.concurrency, args.seed, sys.stdout))
