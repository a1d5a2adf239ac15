"""`ingestion`: the public REST API, the mesh's edge.

    POST   /api/deliveries        {ownerId, pickupLocation: {lat, lon}, dropoffLocation: {lat, lon},
                                  packageInfo: {size, weight, tag}, deadline, expedited,
                                  thirdPartyPickup} -> 202 {"deliveryId", "status": "accepted"};
                                  the scheduler gets it in the background; 503 when the queue is full
    GET    /api/deliveries/{id}   the delivery's status, from `delivery` (its `version` shows which
                                  version answered), or this service's own while it is scheduled
    PUT    /api/deliveries/{id}   change {dropoffLocation, deadline, expedited, notes} -> 200
    DELETE /api/deliveries/{id}   cancel -> 202, done in the background
    GET    /stats

Work goes to the scheduler through a bounded queue served by `--workers` tasks: a burst is
absorbed up to `--queue` requests and refused beyond, never buffered without bound. What it
accepted is kept in its store (`--store`, demo/store.py) as well as in memory, so that an
instance that is killed and started again still knows each delivery, and sends on the creates
it had accepted but not yet scheduled (the scheduler takes a delivery id it knows as done).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass

from aiohttp import web

from meshproxy.demo.common import (
    CLIENT, ID_RE, ServiceClient, Settings, base_app, error, json_body, propagated,
)
from meshproxy.demo.store import Store, default_path

log = logging.getLogger("meshproxy.demo")
KEEP = 20_000  # deliveries whose local state is remembered
UPDATABLE = ("dropoffLocation", "deadline", "expedited", "notes")
PENDING = ("accepted", "scheduling")


@dataclass(frozen=True)
class Job:
    kind: str  # create | cancel
    delivery_id: str
    body: dict
    headers: dict[str, str]


class Ingestion:
    """The queue to the scheduler, its workers, and what this instance knows of each delivery."""

    def __init__(self, client: ServiceClient, queue_size: int, store: Store | None = None) -> None:
        self.client = client
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.known: OrderedDict[str, dict] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.store = store

    def note(self, delivery_id: str, status: str, reason: str = "", job: Job | None = None) -> None:
        """Remember the delivery's state here; in the store too, with the create `job` while
        it is still to be scheduled (what a restarted instance sends on)."""
        entry = {"status": status, "reason": reason}
        self.known[delivery_id] = entry
        self.known.move_to_end(delivery_id)
        while len(self.known) > KEEP:
            self.known.popitem(last=False)
        if self.store is not None:
            def change(old: dict | None) -> dict:
                pending = job or (old or {}).get("job") if status in PENDING else None
                return {**entry, "job": {"body": pending.body, "headers": pending.headers}
                        if isinstance(pending, Job) else pending}
            self.store.update(delivery_id, change)

    def entry(self, delivery_id: str) -> dict | None:
        """{status, reason} of a delivery this service accepted, or None."""
        entry = self.known.get(delivery_id)
        if entry is None and self.store is not None:
            stored = self.store.get(delivery_id)
            if stored is not None:
                entry = {"status": stored["status"], "reason": stored.get("reason", "")}
        return entry

    def status(self, delivery_id: str) -> str | None:
        entry = self.entry(delivery_id)
        return entry["status"] if entry else None

    def recover(self) -> int:
        """Queue again the creates accepted before a restart and not yet scheduled; return how
        many (as many as the queue holds)."""
        if self.store is None:
            return 0
        queued = 0
        for delivery_id, record in self.store.items():
            job = record.get("job")
            if record.get("status") not in PENDING or not isinstance(job, dict):
                continue
            try:
                self.queue.put_nowait(Job("create", delivery_id, job["body"], job["headers"]))
            except asyncio.QueueFull:
                break
            self.known[delivery_id] = {"status": "accepted", "reason": ""}
            queued += 1
        return queued

    async def work(self) -> None:
        """Serve the queue until cancelled."""
        while True:
            job = await self.queue.get()
            try:
                if job.kind == "create":
                    await self._create(job)
                else:
                    await self._cancel(job)
            except Exception:  # one bad job must not stop the worker
                log.exception("ingestion: %s %s failed", job.kind, job.delivery_id)
            finally:
                self.queue.task_done()

    async def _create(self, job: Job) -> None:
        if self.status(job.delivery_id) not in PENDING:
            return  # cancelled while it waited
        self.note(job.delivery_id, "scheduling")
        reply = await self.client.call("POST", "scheduler", "/api/deliveryrequests", headers=job.headers,
                                       json_body={**job.body, "deliveryId": job.delivery_id})
        body = reply.body if isinstance(reply.body, dict) else {}
        if self.status(job.delivery_id) != "scheduling":
            # A cancel came meanwhile: it decides the state, unless there is nothing to cancel.
            if not reply.ok:
                self.note(job.delivery_id, "cancelled")
            return
        if reply.ok:
            self.counts["scheduled"] += 1
            self.note(job.delivery_id, body.get("status", "scheduled"))
        else:
            self.counts["failed"] += 1
            reason = body.get("reason") or f"scheduler: {reply.describe()}"
            self.note(job.delivery_id, "failed", reason)
            log.info("delivery %s not scheduled: %s", job.delivery_id, reason)

    async def _cancel(self, job: Job) -> None:
        reply = await self.client.call("DELETE", "scheduler", f"/api/deliveryrequests/{job.delivery_id}",
                                       headers=job.headers)
        if reply.status == 202:
            self.note(job.delivery_id, "cancelling")
        elif reply.ok:
            self.counts["cancelled"] += 1
            self.note(job.delivery_id, "cancelled")
        else:
            log.info("delivery %s: cancel failed: %s", job.delivery_id, reply.describe())


INGESTION = web.AppKey("ingestion", Ingestion)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", type=int, default=200, help="requests waiting for the scheduler, at most")
    parser.add_argument("--workers", type=int, default=16, help="scheduler calls at a time")
    parser.add_argument("--store", default=None, help="SQLite file of the deliveries accepted")


def _point_error(name: str, value: object) -> str | None:
    if not isinstance(value, dict) or not all(
            isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool) for k in ("lat", "lon")):
        return f"{name} must be an object with numbers lat and lon"
    return None


def _create_error(body: dict) -> str | None:
    owner = body.get("ownerId")
    if not isinstance(owner, str) or not ID_RE.fullmatch(owner):
        return "ownerId must be 1 to 64 letters, digits, '.', '_' or '-'"
    for name in ("pickupLocation", "dropoffLocation"):
        if problem := _point_error(name, body.get(name)):
            return problem
    if "packageInfo" in body and not isinstance(body["packageInfo"], dict):
        return "packageInfo must be an object"
    return None


def _delivery_id(request: web.Request) -> str:
    delivery_id = request.match_info["id"]
    if not ID_RE.fullmatch(delivery_id):
        raise web.HTTPNotFound(text='{"error": "no such delivery"}', content_type="application/json")
    return delivery_id


async def create(request: web.Request) -> web.Response:
    ingestion = request.app[INGESTION]
    body = await json_body(request)
    if problem := _create_error(body):
        return error(400, problem)
    delivery_id = "d-" + uuid.uuid4().hex[:16]
    try:
        ingestion.queue.put_nowait(Job("create", delivery_id, body, propagated(request)))
    except asyncio.QueueFull:
        ingestion.counts["rejected"] += 1
        return web.json_response({"error": "too many requests in progress, try again"}, status=503,
                                 headers={"Retry-After": "1"})
    ingestion.counts["accepted"] += 1
    ingestion.note(delivery_id, "accepted", job=Job("create", delivery_id, body, propagated(request)))
    return web.json_response({"deliveryId": delivery_id, "status": "accepted"}, status=202,
                             headers={"Location": f"/api/deliveries/{delivery_id}"})


async def get_status(request: web.Request) -> web.Response:
    ingestion = request.app[INGESTION]
    delivery_id = _delivery_id(request)
    reply = await ingestion.client.call("GET", "delivery", f"/api/deliveries/{delivery_id}",
                                        headers=propagated(request))
    if reply.ok:
        version = reply.headers.get("x-delivery-version", "")
        return web.json_response(reply.body, headers={"x-delivery-version": version} if version else None)
    local = ingestion.entry(delivery_id)
    if reply.status == 404 and local is not None:
        return web.json_response({"deliveryId": delivery_id, **local})
    if reply.status == 404:
        return error(404, "no such delivery")
    return error(502, f"delivery service: {reply.describe()}")


async def update(request: web.Request) -> web.Response:
    ingestion = request.app[INGESTION]
    delivery_id = _delivery_id(request)
    body = await json_body(request)
    unknown = sorted(set(body) - set(UPDATABLE))
    if unknown or not body:
        return error(400, f"only these can change: {', '.join(UPDATABLE)}")
    if "dropoffLocation" in body and (problem := _point_error("dropoffLocation", body["dropoffLocation"])):
        return error(400, problem)
    local = ingestion.status(delivery_id)
    if local in PENDING:
        return error(409, "the delivery is still being scheduled; try again shortly", status=local)
    if local in ("failed", "cancelling", "cancelled"):
        return error(409, f"the delivery is {local}", status=local)
    reply = await ingestion.client.call("PUT", "delivery", f"/api/deliveries/{delivery_id}",
                                        headers=propagated(request), json_body=body,
                                        extra_headers={"If-Match": "*"})
    if reply.ok:
        return web.json_response(reply.body)
    if reply.status in (404, 412):
        return error(404, "no such delivery")
    return error(502, f"delivery service: {reply.describe()}")


async def cancel(request: web.Request) -> web.Response:
    ingestion = request.app[INGESTION]
    delivery_id = _delivery_id(request)
    if ingestion.status(delivery_id) is None:
        reply = await ingestion.client.call("GET", "delivery", f"/api/deliveries/{delivery_id}",
                                            headers=propagated(request))
        if reply.status == 404:
            return error(404, "no such delivery")
    try:
        ingestion.queue.put_nowait(Job("cancel", delivery_id, {}, propagated(request)))
    except asyncio.QueueFull:
        ingestion.counts["rejected"] += 1
        return web.json_response({"error": "too many requests in progress, try again"}, status=503,
                                 headers={"Retry-After": "1"})
    ingestion.note(delivery_id, "cancelling")
    return web.json_response({"deliveryId": delivery_id, "status": "cancelling"}, status=202)


async def stats(request: web.Request) -> web.Response:
    ingestion = request.app[INGESTION]
    return web.json_response({**{k: ingestion.counts[k] for k in
                                 ("accepted", "rejected", "scheduled", "failed", "cancelled")},
                              "queued": ingestion.queue.qsize()})


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the ingestion app; its workers start and stop with it."""
    if args.queue < 1 or args.workers < 1:
        raise SystemExit("--queue and --workers must be at least 1")
    app = base_app(settings)
    app[INGESTION] = Ingestion(app[CLIENT], args.queue, Store(args.store or default_path("ingestion")))

    async def workers(app: web.Application):
        recovered = app[INGESTION].recover()
        if recovered:
            log.info("ingestion: %d accepted deliveries queued again after a restart", recovered)
        tasks = [asyncio.ensure_future(app[INGESTION].work()) for _ in range(args.workers)]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.append(workers)
    app.router.add_post("/api/deliveries", create)
    app.router.add_get("/api/deliveries/{id}", get_status)
    app.router.add_put("/api/deliveries/{id}", update)
    app.router.add_delete("/api/deliveries/{id}", cancel)
    app.router.add_get("/stats", stats)
    return app
