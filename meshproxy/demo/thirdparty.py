"""`thirdparty`: an outside courier that picks up packages the drones cannot; not meshed.

    POST   /api/pickups        {deliveryId, pickupLocation} -> 201 {"pickupId", ...}
    GET    /api/pickups/{id}   -> 200 / 404
    DELETE /api/pickups/{id}   cancel -> 200 / 404

It has no sidecar: callers' sidecars reach it in plaintext at its address, as they would a
partner's API on the internet.
"""

from __future__ import annotations

import argparse
import itertools
import time

from aiohttp import web

from meshproxy.demo.common import Settings, base_app, error, json_body

PICKUPS = web.AppKey("pickups", dict)
IDS = web.AppKey("ids", itertools.count)
LIMIT = 10_000  # pickups kept; the oldest go first


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own."""


async def create(request: web.Request) -> web.Response:
    body = await json_body(request)
    if not body.get("deliveryId"):
        return error(422, "deliveryId is required")
    pickups = request.app[PICKUPS]
    pickup_id = f"tp-{next(request.app[IDS]):06d}"
    pickups[pickup_id] = {"pickupId": pickup_id, "deliveryId": body["deliveryId"],
                          "pickupLocation": body.get("pickupLocation"), "status": "booked",
                          "created": time.time()}
    while len(pickups) > LIMIT:
        del pickups[next(iter(pickups))]
    return web.json_response(pickups[pickup_id], status=201)


async def get(request: web.Request) -> web.Response:
    pickup = request.app[PICKUPS].get(request.match_info["id"])
    return web.json_response(pickup) if pickup else error(404, "no such pickup")


async def cancel(request: web.Request) -> web.Response:
    pickup = request.app[PICKUPS].get(request.match_info["id"])
    if pickup is None:
        return error(404, "no such pickup")
    pickup["status"] = "cancelled"
    return web.json_response(pickup)


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the third-party courier app."""
    app = base_app(settings)
    app[PICKUPS] = {}
    app[IDS] = itertools.count(1)
    app.router.add_post("/api/pickups", create)
    app.router.add_get("/api/pickups/{id}", get)
    app.router.add_delete("/api/pickups/{id}", cancel)
    return app
