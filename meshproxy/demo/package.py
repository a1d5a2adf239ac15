"""`package`: the packages drones carry.

    PUT|POST /api/packages/{id}   create {size, weight, tag}; the same id again -> 200, the
                                  package as it is (so a retried create is harmless) / 201
    GET      /api/packages/{id}   -> 200 / 404
    DELETE   /api/packages/{id}   cancel -> 200 / 404
    GET      /stats               requests served and failures injected

`--failure-rate R` (env DEMO_FAILURE_RATE) makes this instance answer `503` to that fraction
of API requests, drawn from a seeded random source (`--seed`, env DEMO_SEED): the flaky
instance whose failures the callers' sidecars retry and eject.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass

from aiohttp import web

from meshproxy.demo.common import Settings, base_app, error, json_body
from meshproxy.demo.store import Store, default_path

SIZES = ("small", "medium", "large")


@dataclass
class Faults:
    """The injected-failure source and what it did."""

    rate: float
    rng: random.Random
    requests: int = 0
    injected: int = 0

    def fail_now(self) -> bool:
        """Draw once: True when this request is to fail."""
        self.requests += 1
        if self.rate > 0 and self.rng.random() < self.rate:
            self.injected += 1
            return True
        return False


STORE = web.AppKey("store", Store)
FAULTS = web.AppKey("faults", Faults)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--failure-rate", type=float,
                        default=float(os.environ.get("DEMO_FAILURE_RATE", "0") or 0),
                        help="fraction of API requests answered 503 (env DEMO_FAILURE_RATE)")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("DEMO_SEED", "1") or 1),
                        help="seed of the failure draws (env DEMO_SEED)")
    parser.add_argument("--store", default=None, help="SQLite file shared by every instance")


@web.middleware
async def _inject_failures(request: web.Request, handler) -> web.StreamResponse:
    if request.path.startswith("/api/") and request.app[FAULTS].fail_now():
        return error(503, "package store unavailable (injected failure)")
    return await handler(request)


def _check(body: dict) -> str | None:
    if body.get("size", "small") not in SIZES:
        return f"size must be one of {', '.join(SIZES)}"
    weight = body.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 25:
        return "weight must be a number of kilograms, more than 0 and at most 25"
    return None


async def create(request: web.Request) -> web.Response:
    package_id = request.match_info["id"]
    body = await json_body(request)
    problem = _check(body)
    if problem:
        return error(422, problem)

    def change(old: dict | None) -> dict | None:
        if old is not None:
            return None
        return {"packageId": package_id, "size": body.get("size", "small"),
                "weight": body.get("weight", 1), "tag": body.get("tag", ""),
                "deliveryId": body.get("deliveryId"), "status": "created", "created": time.time()}

    old, new = request.app[STORE].update(package_id, change)
    return web.json_response(new if new is not None else old, status=201 if new is not None else 200)


async def get(request: web.Request) -> web.Response:
    record = request.app[STORE].get(request.match_info["id"])
    return web.json_response(record) if record else error(404, "no such package")


async def cancel(request: web.Request) -> web.Response:
    def change(old: dict | None) -> dict | None:
        if old is None:
            return None
        old["status"] = "cancelled"
        return old

    _, new = request.app[STORE].update(request.match_info["id"], change)
    return web.json_response(new) if new else error(404, "no such package")


async def stats(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    return web.json_response({"requests": faults.requests, "injectedFailures": faults.injected,
                              "failureRate": faults.rate, "packages": request.app[STORE].count()})


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the package app."""
    if not 0 <= args.failure_rate <= 1:
        raise SystemExit("--failure-rate must be between 0 and 1")
    app = base_app(settings, middlewares=[_inject_failures])
    app[FAULTS] = Faults(args.failure_rate, random.Random(args.seed))
    app[STORE] = Store(args.store or default_path("package"))

    async def close_store(app: web.Application) -> None:
        app[STORE].close()

    app.on_cleanup.append(close_store)
    for method in ("PUT", "POST"):
        app.router.add_route(method, "/api/packages/{id}", create)
    app.router.add_get("/api/packages/{id}", get)
    app.router.add_delete("/api/packages/{id}", cancel)
    app.router.add_get("/stats", stats)
    return app
