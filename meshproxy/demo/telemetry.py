"""`telemetry`: where the drones are, over gRPC: the demo's gRPC Service, `drone-telemetry`.

    service drone.v1.Telemetry {
      rpc Position(PositionRequest) returns (Telemetry);       // a drone's last report
      rpc Watch(WatchRequest) returns (stream Telemetry);      // its reports as they come
    }
    PositionRequest {droneId}
    WatchRequest    {droneId, maxUpdates}                      // maxUpdates: optional
    Telemetry       {droneId, state, deliveryId, lat, lon, battery, seq, reportedAt,
                     reportedBy, servedBy}

Messages are JSON objects (meshproxy/demo/rpc.py: no generated code). `drone` writes each
drone's reports (assigned, flying, every position on the way, landed) to a store shared by
every instance of this Service, as an IoT hub lands device telemetry in a database: any
instance answers for any drone, so the mesh may send each call to any of them, and
`servedBy` says which one did.

- Position: NOT_FOUND for a drone that never reported, INVALID_ARGUMENT without a droneId.
- Watch: the drone's report now, then each new one (looked for every `--poll` seconds) until
  the drone is idle again (its flight is over), `maxUpdates` were sent, or the call's deadline.

`--failure-rate R` (env DEMO_FAILURE_RATE) answers UNAVAILABLE to that fraction of calls,
drawn from a seeded source (`--seed`, env DEMO_SEED). Nothing was sent before it, so it is a
trailers-only answer, which the caller's sidecar retries on another instance (spec §9).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from meshproxy.demo.common import ID_RE, Settings
from meshproxy.demo.package import Faults
from meshproxy.demo.rpc import CallInfo, Refuse, serve, server_stream_handler, unary_handler
from meshproxy.demo.store import Store, default_path

log = logging.getLogger("meshproxy.demo")

SERVICE = "drone.v1.Telemetry"
POSITION = f"/{SERVICE}/Position"
WATCH = f"/{SERVICE}/Watch"
# The Mesh Service whose instances serve it (config/demo/mesh.yaml).
MESH_SERVICE = "drone-telemetry"
FIELDS = ("droneId", "state", "deliveryId", "lat", "lon", "battery")


def store_path(explicit: str | None = None) -> Path:
    """Return the reports' store: `explicit`, else the demo's shared data folder's
    `telemetry.sqlite` (the drone app and every telemetry instance find the same file)."""
    return Path(explicit) if explicit else default_path("telemetry")


def record_report(store: Store, report: dict, reported_by: str) -> dict:
    """Store a drone's report (FIELDS) as its latest, numbered after the one before; return
    the stored record."""
    drone_id = report["droneId"]

    def change(old: dict | None) -> dict:
        return {**{k: report.get(k) for k in FIELDS}, "seq": (old or {}).get("seq", 0) + 1,
                "reportedAt": time.time(), "reportedBy": reported_by}

    return store.update(drone_id, change)[1] or {}


class Telemetry:
    """The `drone.v1.Telemetry` methods over the shared store."""

    def __init__(self, store: Store, instance: str, faults: Faults, poll: float) -> None:
        self.store, self.instance, self.faults, self.poll = store, instance, faults, poll

    def _drone_id(self, request: Any) -> str:
        if self.faults.fail_now():
            raise Refuse(grpc.StatusCode.UNAVAILABLE, "telemetry unavailable (injected failure)")
        drone_id = request.get("droneId") if isinstance(request, dict) else None
        if not isinstance(drone_id, str) or not ID_RE.fullmatch(drone_id):
            raise Refuse(grpc.StatusCode.INVALID_ARGUMENT,
                         "droneId must be 1 to 64 letters, digits, '.', '_' or '-'")
        return drone_id

    def _latest(self, drone_id: str) -> dict:
        record = self.store.get(drone_id)
        if record is None:
            raise Refuse(grpc.StatusCode.NOT_FOUND, f"no telemetry from drone {drone_id}")
        return {**record, "servedBy": self.instance}

    async def position(self, request: Any, call: CallInfo) -> dict:
        """Position: the drone's last report."""
        return self._latest(self._drone_id(request))

    async def watch(self, request: Any, call: CallInfo) -> AsyncIterator[dict]:
        """Watch: the drone's reports from now until it is idle again."""
        drone_id = self._drone_id(request)
        limit = request.get("maxUpdates")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        record, sent = self._latest(drone_id), 0
        while True:
            yield record
            sent += 1
            # Idle: landed (or not under way when the call came), so nothing more will come.
            if record.get("state") == "idle" or (limit is not None and sent >= limit):
                return
            seq = record.get("seq")
            while record.get("seq") == seq:
                await asyncio.sleep(self.poll)
                record = self._latest(drone_id)

    def handler(self) -> grpc.GenericRpcHandler:
        """Return the generic handler of `drone.v1.Telemetry` (JSON messages, one log line per call)."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Position": unary_handler(self.instance, POSITION, self.position),
            "Watch": server_stream_handler(self.instance, WATCH, self.watch),
        })


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--failure-rate", type=float,
                        default=float(os.environ.get("DEMO_FAILURE_RATE", "0") or 0),
                        help="fraction of calls answered UNAVAILABLE (env DEMO_FAILURE_RATE)")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("DEMO_SEED", "1") or 1),
                        help="seed of the failure draws (env DEMO_SEED)")
    parser.add_argument("--store", default=None,
                        help="the drones' reports: SQLite file shared with `drone` and every instance")
    parser.add_argument("--poll", type=float, default=0.05,
                        help="seconds between looks for a new report while watching (default 0.05)")


def run(settings: Settings, args: argparse.Namespace) -> None:
    """Serve `drone.v1.Telemetry` on the settings' address until SIGINT or SIGTERM."""
    if not 0 <= args.failure_rate <= 1 or args.poll <= 0:
        raise SystemExit("--failure-rate must be between 0 and 1, --poll positive")
    store = Store(store_path(args.store))
    telemetry = Telemetry(store, settings.instance, Faults(args.failure_rate, random.Random(args.seed)),
                          args.poll)
    try:
        asyncio.run(serve(settings, [telemetry.handler()]))
    finally:
        store.close()
