"""`delivery`: the status of every delivery, and the drones' location events.

    PUT  /api/deliveries/{id}            create or update (fields merged); `If-Match: *` only
                                         updates (412 when missing) -> 201 created / 200
    GET  /api/deliveries/{id}            -> 200 the record / 404
    POST /api/deliveries/{id}/location   a drone's position {droneId, lat, lon, seq, of, event};
                                         `event: arrived` marks it delivered -> 200 / 404 / 409

Every answer says which version served it (`x-delivery-version` header and a `version` field),
so the canary split of the `delivery` Service shows. Version 2 also reports `progress`.
Records live in a Store shared by every instance of every version.
"""

from __future__ import annotations

import argparse
import os
import time

from aiohttp import web

from meshproxy.demo.common import SETTINGS, Settings, base_app, error, json_body
from meshproxy.demo.store import Store, default_path

FIELDS = ("ownerId", "packageId", "droneId", "pickupId", "pickupLocation", "dropoffLocation",
          "packageInfo", "deadline", "expedited", "notes", "status", "reason")
STATUSES = ("scheduled", "in-transit", "delivered", "cancelled", "failed")
FINAL = ("delivered", "cancelled", "failed")

STORE = web.AppKey("store", Store)
VERSION = web.AppKey("version", str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", dest="demo_version", default=os.environ.get("DEMO_VERSION", "v1"),
                        help="the version this instance reports (env DEMO_VERSION, default v1)")
    parser.add_argument("--store", default=None, help="SQLite file shared by every instance")


def _answer(request: web.Request, record: dict, status: int = 200) -> web.Response:
    version = request.app[VERSION]
    body = dict(record)
    if version == "v1":
        body.pop("progress", None)  # v1 predates progress reporting
    body["version"] = version
    body["servedBy"] = request.app[SETTINGS].instance
    return web.json_response(body, status=status)


@web.middleware
async def _version_header(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["x-delivery-version"] = request.app[VERSION]
        raise
    response.headers["x-delivery-version"] = request.app[VERSION]
    return response


async def get_delivery(request: web.Request) -> web.Response:
    record = request.app[STORE].get(request.match_info["id"])
    if record is None:
        return error(404, "no such delivery", version=request.app[VERSION])
    return _answer(request, record)


async def put_delivery(request: web.Request) -> web.Response:
    delivery_id = request.match_info["id"]
    body = await json_body(request)
    status = body.get("status")
    if status is not None and status not in STATUSES:
        return error(422, f"status must be one of {', '.join(STATUSES)}")
    only_update = request.headers.get("If-Match") == "*"
    now = time.time()

    def change(old: dict | None) -> dict | None:
        if old is None and only_update:
            return None
        record = old or {"deliveryId": delivery_id, "status": "scheduled", "created": now,
                         "locationEvents": 0}
        record.update({k: body[k] for k in FIELDS if k in body})
        record["updated"] = now
        return record

    old, new = request.app[STORE].update(delivery_id, change)
    if new is None:
        return error(412, "no such delivery", version=request.app[VERSION])
    return _answer(request, new, status=200 if old is not None else 201)


async def post_location(request: web.Request) -> web.Response:
    delivery_id = request.match_info["id"]
    body = await json_body(request)
    refused: list[str] = []

    def change(old: dict | None) -> dict | None:
        if old is None:
            return None
        if old.get("status") in FINAL:
            refused.append(old["status"])
            return None
        old["location"] = {"lat": body.get("lat"), "lon": body.get("lon"), "at": time.time()}
        old["locationEvents"] = old.get("locationEvents", 0) + 1
        if isinstance(body.get("seq"), int) and isinstance(body.get("of"), int) and body["of"] > 0:
            old["progress"] = round(100 * body["seq"] / body["of"])
        old["status"] = "delivered" if body.get("event") == "arrived" else "in-transit"
        old["updated"] = time.time()
        return old

    old, new = request.app[STORE].update(delivery_id, change)
    if refused:
        return error(409, f"delivery is {refused[0]}", version=request.app[VERSION])
    if new is None:
        return error(404, "no such delivery", version=request.app[VERSION])
    return _answer(request, new)


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"version": request.app[VERSION], "deliveries": request.app[STORE].count()})


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the delivery app (its store is opened here, closed on shutdown)."""
    app = base_app(settings, middlewares=[_version_header])
    app[VERSION] = args.demo_version
    app[STORE] = Store(args.store or default_path("delivery"))

    async def close_store(app: web.Application) -> None:
        app[STORE].close()

    app.on_cleanup.append(close_store)
    app.router.add_get("/api/deliveries/{id}", get_delivery)
    app.router.add_put("/api/deliveries/{id}", put_delivery)
    app.router.add_post("/api/deliveries/{id}/location", post_location)
    app.router.add_get("/stats", stats)
    return app
