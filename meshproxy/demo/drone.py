"""`drone`: the fleet. Drones are assigned to deliveries, fly them, and report where they are.

    POST /api/drones/assign          {deliveryId, pickupLocation, dropoffLocation} -> 200
                                     {"droneId", ...}; the same delivery again gets the same
                                     drone; 503 when every drone is busy
    POST /api/drones/{id}/dispatch   {deliveryId} -> 202: the drone takes off and, in the
                                     background, sends `--events` location events to
                                     `delivery` (the last one `arrived`), then is free again
    POST /api/drones/{id}/release    {deliveryId} -> 200: lands it and frees it (compensation)
    GET  /api/drones/{id}, GET /api/drones

Location events carry the request id and trace headers of the dispatch that started the flight.

Every drone also reports its telemetry (state, delivery, position, battery) when it is
assigned, takes off, reaches each position and lands. The reports go to the store that the
`drone-telemetry` Service (meshproxy/demo/telemetry.py) serves over gRPC, as a real drone's
would reach an IoT hub: the scheduler asks it where a drone is before dispatching it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from meshproxy.demo.common import CLIENT, SETTINGS, Settings, base_app, error, json_body, propagated
from meshproxy.demo.store import Store
from meshproxy.demo.telemetry import record_report, store_path

log = logging.getLogger("meshproxy.demo")
# The fleet's pads, where drones wait before their first job: a grid in Seattle.
BASE = (47.60, -122.34)
BATTERY_PER_EVENT = 2.0  # percent used between two position reports; swapped on landing


@dataclass
class Drone:
    """One drone and the delivery it serves."""

    drone_id: str
    state: str = "idle"  # idle | assigned | flying
    delivery_id: str | None = None
    pickup: dict = field(default_factory=dict)
    dropoff: dict = field(default_factory=dict)
    flight: asyncio.Task | None = None
    flights: int = 0
    lat: float = BASE[0]
    lon: float = BASE[1]
    battery: float = 100.0

    def view(self) -> dict:
        return {"droneId": self.drone_id, "state": self.state, "deliveryId": self.delivery_id,
                "flights": self.flights}

    def report(self) -> dict:
        """The drone's telemetry report (meshproxy.demo.telemetry.FIELDS)."""
        return {"droneId": self.drone_id, "state": self.state, "deliveryId": self.delivery_id,
                "lat": self.lat, "lon": self.lon, "battery": self.battery}


@dataclass
class Fleet:
    drones: dict[str, Drone]
    events: int
    interval: float
    by_delivery: dict[str, Drone] = field(default_factory=dict)
    reporter: Callable[[Drone], None] = lambda drone: None  # sends a drone's telemetry

    def free(self, drone: Drone) -> None:
        """Land `drone` and make it available (with a fresh battery)."""
        if drone.flight is not None and drone.flight is not asyncio.current_task():
            drone.flight.cancel()
        drone.flight = None
        if drone.delivery_id is not None and self.by_delivery.get(drone.delivery_id) is drone:
            del self.by_delivery[drone.delivery_id]
        drone.state, drone.delivery_id, drone.battery = "idle", None, 100.0
        self.reporter(drone)


FLEET = web.AppKey("fleet", Fleet)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", type=int, default=100, help="number of drones (default 100)")
    parser.add_argument("--events", type=int, default=4,
                        help="location events per flight, the last one 'arrived' (default 4)")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between location events (default 0.5)")
    parser.add_argument("--telemetry-store", default=None,
                        help="SQLite file of the drones' telemetry, shared with `telemetry` "
                             "(default: telemetry.sqlite in the demo's data folder)")


def _point(value: object) -> dict:
    if isinstance(value, dict):
        lat, lon = value.get("lat"), value.get("lon")
        if isinstance(lat, (int, float)) and isinstance(lon, (int, float)):
            return {"lat": float(lat), "lon": float(lon)}
    return {"lat": 0.0, "lon": 0.0}


async def assign(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    body = await json_body(request)
    delivery_id = body.get("deliveryId")
    if not isinstance(delivery_id, str) or not delivery_id:
        return error(422, "deliveryId is required")
    drone = fleet.by_delivery.get(delivery_id)
    if drone is None:
        drone = next((d for d in fleet.drones.values() if d.state == "idle"), None)
        if drone is None:
            return web.json_response({"error": "every drone is busy"}, status=503,
                                     headers={"Retry-After": "1"})
        drone.state, drone.delivery_id = "assigned", delivery_id
        drone.pickup, drone.dropoff = _point(body.get("pickupLocation")), _point(body.get("dropoffLocation"))
        fleet.by_delivery[delivery_id] = drone
        fleet.reporter(drone)
    return web.json_response(drone.view())


def _drone(request: web.Request) -> Drone:
    drone = request.app[FLEET].drones.get(request.match_info["id"])
    if drone is None:
        raise web.HTTPNotFound(text='{"error": "no such drone"}', content_type="application/json")
    return drone


async def dispatch(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    drone = _drone(request)
    body = await json_body(request)
    if drone.delivery_id is None or body.get("deliveryId") != drone.delivery_id:
        return error(409, f"drone {drone.drone_id} is not assigned to delivery {body.get('deliveryId')}")
    if drone.state == "assigned":
        drone.state = "flying"
        drone.flights += 1
        drone.lat, drone.lon = drone.pickup["lat"], drone.pickup["lon"]
        fleet.reporter(drone)
        drone.flight = asyncio.ensure_future(
            _fly(request.app, fleet, drone, drone.delivery_id, propagated(request)))
    return web.json_response(drone.view(), status=202)


async def release(request: web.Request) -> web.Response:
    drone = _drone(request)
    body = await json_body(request)
    wanted = body.get("deliveryId")
    if wanted is None or wanted == drone.delivery_id:
        request.app[FLEET].free(drone)
    return web.json_response(drone.view())


async def _fly(app: web.Application, fleet: Fleet, drone: Drone, delivery_id: str,
               headers: dict[str, str]) -> None:
    """Report the drone's position `fleet.events` times on the way, then land and free it."""
    client = app[CLIENT]
    start, end = drone.pickup, drone.dropoff
    try:
        for seq in range(1, fleet.events + 1):
            await asyncio.sleep(fleet.interval)  # flying time between two position reports
            share = seq / fleet.events
            event = {"droneId": drone.drone_id, "seq": seq, "of": fleet.events,
                     "event": "arrived" if seq == fleet.events else "position",
                     "lat": round(start["lat"] + (end["lat"] - start["lat"]) * share, 6),
                     "lon": round(start["lon"] + (end["lon"] - start["lon"]) * share, 6)}
            drone.lat, drone.lon = event["lat"], event["lon"]
            drone.battery = max(0.0, drone.battery - BATTERY_PER_EVENT)
            fleet.reporter(drone)
            reply = await client.call("POST", "delivery", f"/api/deliveries/{delivery_id}/location",
                                      headers=headers, json_body=event)
            if reply.status == 409:  # cancelled meanwhile: turn back
                log.info("drone %s: delivery %s is closed, returning", drone.drone_id, delivery_id)
                break
            if not reply.ok:
                log.warning("drone %s: location event %d for %s failed: %s", drone.drone_id, seq,
                            delivery_id, reply.describe())
    finally:
        if drone.delivery_id == delivery_id:
            fleet.free(drone)


async def get_drone(request: web.Request) -> web.Response:
    return web.json_response(_drone(request).view())


async def list_drones(request: web.Request) -> web.Response:
    drones = request.app[FLEET].drones.values()
    states = {s: sum(1 for d in drones if d.state == s) for s in ("idle", "assigned", "flying")}
    return web.json_response({"drones": len(drones), **states})


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the drone app; flights still in the air are cancelled on shutdown."""
    if args.fleet < 1 or args.events < 1 or args.interval < 0:
        raise SystemExit("--fleet and --events must be at least 1, --interval not negative")
    app = base_app(settings)
    drones = {}
    for i in range(1, args.fleet + 1):  # each on its own pad of a 10-wide grid
        drones[f"drone-{i:03d}"] = Drone(f"drone-{i:03d}", lat=round(BASE[0] + (i - 1) // 10 * 0.002, 6),
                                         lon=round(BASE[1] + (i - 1) % 10 * 0.002, 6))
    app[FLEET] = Fleet(drones, events=args.events, interval=args.interval)

    async def telemetry_ctx(app: web.Application):
        store = Store(store_path(args.telemetry_store))
        instance = app[SETTINGS].instance

        def report(drone: Drone) -> None:
            try:
                record_report(store, drone.report(), instance)
            except sqlite3.Error as exc:  # telemetry is best effort: the flight goes on
                log.warning("drone %s: telemetry report not stored: %s", drone.drone_id, exc)

        app[FLEET].reporter = report
        for drone in app[FLEET].drones.values():  # on its pad, whatever an earlier run left
            report(drone)
        yield
        app[FLEET].reporter = lambda drone: None
        store.close()

    app.cleanup_ctx.append(telemetry_ctx)

    async def land_all(app: web.Application) -> None:
        flights = [d.flight for d in app[FLEET].drones.values() if d.flight is not None]
        for flight in flights:
            flight.cancel()
        await asyncio.gather(*flights, return_exceptions=True)

    app.on_shutdown.append(land_all)
    app.router.add_post("/api/drones/assign", assign)
    app.router.add_post("/api/drones/{id}/dispatch", dispatch)
    app.router.add_post("/api/drones/{id}/release", release)
    app.router.add_get("/api/drones/{id}", get_drone)
    app.router.add_get("/api/drones", list_drones)
    return app
