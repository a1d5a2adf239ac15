"""`scheduler`: turns a delivery request into a scheduled delivery, or undoes what it started.

    POST   /api/deliveryrequests        {deliveryId, ownerId, pickupLocation, dropoffLocation,
                                        packageInfo, thirdPartyPickup, ...}
                                        -> 201 scheduled / 422 refused / 502 a service failed
    GET    /api/deliveryrequests/{id}   the workflow: status and every step's outcome
    DELETE /api/deliveryrequests/{id}   cancel: undo every step -> 200 / 202 (while scheduling)
    GET    /compensations               compensating actions taken (?deliveryId=), with counts
    GET    /stats

The steps, each a synchronous call through the sidecar: `account` (is the owner active?) and
`package` (create it) at the same time, then `drone` (assign one), `preflight` (a gRPC call,
`drone.v1.Telemetry/Position` on `drone-telemetry`: the drone must report that it is assigned
to this delivery, with battery enough), `thirdparty` (book an outside pickup, when asked),
`delivery` (create the record) and `dispatch` (the drone takes off).

A transient failure (no answer, 429, 5xx, or a gRPC status whose HTTP equivalent is one of
those, such as UNAVAILABLE or DEADLINE_EXCEEDED) is tried again `--retries` times with jittered
backoff on top of the sidecar's own retries. A non-transient one (any other 4xx, e.g. a
suspended account's 403) or a transient one that outlasts the retries fails the workflow, and
the steps already done are compensated: the pickup cancelled, the drone released, the package
cancelled, and last the delivery record marked failed. Each compensation is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from aiohttp import web

from meshproxy.demo.common import (
    CLIENT, ID_RE, Reply, ServiceClient, Settings, base_app, error, json_body, propagated,
)
from meshproxy.demo.telemetry import MESH_SERVICE as TELEMETRY, POSITION

log = logging.getLogger("meshproxy.demo")
STEPS = ("account", "package", "drone", "preflight", "thirdparty", "delivery", "dispatch")
MIN_BATTERY = 20.0  # percent a drone needs to take a delivery
PREFLIGHT_DEADLINE = 2.0  # seconds: the preflight call's gRPC deadline (`grpc-timeout`)
KEEP_WORKFLOWS = 10_000
KEEP_COMPENSATIONS = 1_000


@dataclass
class Workflow:
    """One delivery request on its way through the steps."""

    delivery_id: str
    request: dict
    headers: dict[str, str]
    status: str = "scheduling"  # scheduling | scheduled | failed | cancelled
    steps: dict[str, str] = field(default_factory=lambda: dict.fromkeys(STEPS, "pending"))
    reason: str = ""
    package_id: str | None = None
    drone_id: str | None = None
    pickup_id: str | None = None
    drone_telemetry: dict | None = None  # the preflight's answer: where the drone was, who said
    record_created: bool = False
    cancel_requested: bool = False
    non_transient: bool = False  # how it failed: refused (4xx) rather than unavailable
    created: float = field(default_factory=time.time)

    def view(self) -> dict:
        return {"deliveryId": self.delivery_id, "status": self.status, "steps": dict(self.steps),
                "reason": self.reason, "packageId": self.package_id, "droneId": self.drone_id,
                "pickupId": self.pickup_id, "droneTelemetry": self.drone_telemetry}


class StepFailed(Exception):
    def __init__(self, step: str, reply: Reply) -> None:
        super().__init__(f"{step}: {reply.describe()}")
        self.step, self.reply = step, reply


class Scheduler:
    """The workflows, the compensation record, and the calls they make."""

    def __init__(self, client: ServiceClient, retries: int, backoff: float, rng: random.Random) -> None:
        self.client, self.retries, self.backoff, self.rng = client, retries, backoff, rng
        self.workflows: OrderedDict[str, Workflow] = OrderedDict()
        self.compensations: deque[dict] = deque(maxlen=KEEP_COMPENSATIONS)
        self.compensation_counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def remember(self, wf: Workflow) -> None:
        self.workflows[wf.delivery_id] = wf
        while len(self.workflows) > KEEP_WORKFLOWS:
            self.workflows.popitem(last=False)

    async def _retrying(self, attempt_once) -> Reply:
        """Await `attempt_once()`, trying a transient failure again up to `retries` times;
        return the last Reply."""
        for attempt in range(self.retries + 1):
            reply = await attempt_once()
            if reply.ok or not reply.transient or attempt == self.retries:
                return reply
            # Full jitter, so that callers that failed together do not return together.
            await asyncio.sleep(self.rng.uniform(0, self.backoff * 2 ** attempt))
        raise AssertionError("unreachable")

    async def call(self, wf: Workflow, method: str, service: str, path: str, body=None,
                   extra_headers=None) -> Reply:
        """Call over HTTP, trying a transient failure again; return the last Reply."""
        return await self._retrying(lambda: self.client.call(
            method, service, path, headers=wf.headers, json_body=body, extra_headers=extra_headers))

    async def rpc(self, wf: Workflow, service: str, method: str, message: dict,
                  deadline: float | None = None) -> Reply:
        """Make a unary gRPC call (each try with `deadline` seconds, else the client's
        timeout), trying a transient failure again; return the last Reply."""
        return await self._retrying(lambda: self.client.rpc(
            service, method, message, headers=wf.headers, timeout=deadline))

    @staticmethod
    def _outcome(wf: Workflow, name: str, reply: Reply) -> Reply:
        if not reply.ok:
            wf.steps[name] = f"failed: {reply.describe()}"
            raise StepFailed(name, reply)
        wf.steps[name] = "ok"
        return reply

    async def step(self, wf: Workflow, name: str, method: str, service: str, path: str,
                   body=None, extra_headers=None) -> Reply:
        return self._outcome(wf, name, await self.call(wf, method, service, path, body, extra_headers))

    # the workflow ----------------------------------------------------------------------------

    async def schedule(self, wf: Workflow) -> None:
        """Run every step; on a failure, compensate. Leaves the outcome in `wf`."""
        r = wf.request
        try:
            results = await asyncio.gather(self._account(wf), self._package(wf), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            reply = await self.step(wf, "drone", "POST", "drone", "/api/drones/assign", {
                "deliveryId": wf.delivery_id, "pickupLocation": r.get("pickupLocation"),
                "dropoffLocation": r.get("dropoffLocation")})
            wf.drone_id = reply.body["droneId"]
            await self._preflight(wf)
            if r.get("thirdPartyPickup"):
                reply = await self.step(wf, "thirdparty", "POST", "thirdparty", "/api/pickups", {
                    "deliveryId": wf.delivery_id, "pickupLocation": r.get("pickupLocation")})
                wf.pickup_id = reply.body["pickupId"]
            else:
                wf.steps["thirdparty"] = "skipped"
            record = {k: r[k] for k in ("ownerId", "pickupLocation", "dropoffLocation", "packageInfo",
                                        "deadline", "expedited") if k in r}
            record.update(packageId=wf.package_id, droneId=wf.drone_id, pickupId=wf.pickup_id,
                          status="scheduled")
            await self.step(wf, "delivery", "PUT", "delivery", f"/api/deliveries/{wf.delivery_id}", record)
            wf.record_created = True
            await self.step(wf, "dispatch", "POST", "drone", f"/api/drones/{wf.drone_id}/dispatch",
                            {"deliveryId": wf.delivery_id})
        except StepFailed as failure:
            wf.status, wf.reason = "failed", str(failure)
            wf.non_transient = not failure.reply.transient
            done = await self.undo(wf, "failed", f"{failure.step} failed", compensating=True)
            self.outcomes["failed"] += 1
            log.info("delivery %s: %s -> failed (%s); compensated: %s", wf.delivery_id,
                     self._steps(wf), wf.reason, ", ".join(done) or "nothing to undo")
            return
        wf.status = "scheduled"
        self.outcomes["scheduled"] += 1
        log.info("delivery %s: %s -> scheduled", wf.delivery_id, self._steps(wf))
        if wf.cancel_requested:
            await self.cancel(wf)

    async def _account(self, wf: Workflow) -> None:
        reply = await self.step(wf, "account", "GET", "account", f"/api/accounts/{wf.request['ownerId']}")
        if not isinstance(reply.body, dict) or reply.body.get("status") != "active":
            wf.steps["account"] = "failed: account is not active"
            raise StepFailed("account", Reply(422, {"error": "account is not active"}))

    async def _preflight(self, wf: Workflow) -> None:
        """Ask `drone-telemetry`, over gRPC, where the assigned drone is: it must report this
        delivery and battery enough (a refusal is non-transient: 422)."""
        reply = self._outcome(wf, "preflight", await self.rpc(
            wf, TELEMETRY, POSITION, {"droneId": wf.drone_id}, deadline=PREFLIGHT_DEADLINE))
        report = reply.body if isinstance(reply.body, dict) else {}
        problem = None
        if report.get("deliveryId") != wf.delivery_id:
            problem = f"drone {wf.drone_id} reports delivery {report.get('deliveryId')}"
        elif not isinstance(report.get("battery"), (int, float)) or report["battery"] < MIN_BATTERY:
            problem = f"drone {wf.drone_id} reports battery {report.get('battery')}"
        if problem:
            wf.steps["preflight"] = f"failed: {problem}"
            raise StepFailed("preflight", Reply(422, {"error": problem}))
        wf.drone_telemetry = {k: report.get(k) for k in ("lat", "lon", "battery", "servedBy")}

    async def _package(self, wf: Workflow) -> None:
        package_id = f"pkg-{wf.delivery_id}"
        info = wf.request.get("packageInfo") or {}
        # PUT with the id chosen here: creating twice is harmless, so the sidecar may retry it.
        await self.step(wf, "package", "PUT", "package", f"/api/packages/{package_id}",
                        {**info, "deliveryId": wf.delivery_id})
        wf.package_id = package_id

    async def cancel(self, wf: Workflow) -> None:
        """Undo a scheduled delivery at its owner's request."""
        wf.status = "cancelled"
        done = await self.undo(wf, "cancelled", "cancelled by the customer", compensating=False)
        self.outcomes["cancelled"] += 1
        log.info("delivery %s: cancelled; undone: %s", wf.delivery_id, ", ".join(done) or "nothing")

    async def undo(self, wf: Workflow, record_status: str, reason: str, compensating: bool) -> list[str]:
        """Undo the steps done, the delivery record last; return the actions taken."""
        actions = []
        if wf.pickup_id:
            actions.append(("cancel-pickup", "thirdparty", "DELETE", f"/api/pickups/{wf.pickup_id}", None, None))
        if wf.drone_id:
            actions.append(("release-drone", "drone", "POST", f"/api/drones/{wf.drone_id}/release",
                            {"deliveryId": wf.delivery_id}, None))
        if wf.package_id:
            actions.append(("cancel-package", "package", "DELETE", f"/api/packages/{wf.package_id}", None, None))
        if wf.record_created:  # last: once the record says so, everything else is undone
            actions.append(("mark-delivery-" + record_status, "delivery", "PUT",
                            f"/api/deliveries/{wf.delivery_id}", {"status": record_status, "reason": reason},
                            {"If-Match": "*"}))
        done = []
        for action, service, method, path, body, extra in actions:
            reply = await self.call(wf, method, service, path, body, extra)
            # 404/412: nothing left to undo there.
            result = "done" if reply.ok or reply.status in (404, 412) else f"failed: {reply.describe()}"
            done.append(action)
            if compensating:
                self.compensation_counts[action] += 1
                self.compensations.append({"deliveryId": wf.delivery_id, "action": action,
                                           "service": service, "reason": wf.reason, "result": result,
                                           "at": time.time()})
        return done

    @staticmethod
    def _steps(wf: Workflow) -> str:
        return " ".join(f"{name}={outcome.split(':', 1)[0]}" for name, outcome in wf.steps.items())


SCHEDULER = web.AppKey("scheduler", Scheduler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retries", type=int, default=2,
                        help="tries again of a transient failure, beyond the sidecar's (default 2)")
    parser.add_argument("--backoff", type=float, default=0.1,
                        help="base of the jittered exponential backoff, seconds (default 0.1)")


def _invalid(body: dict) -> str | None:
    for name in ("deliveryId", "ownerId"):
        if not isinstance(body.get(name), str) or not ID_RE.fullmatch(body[name]):
            return f"{name} must be 1 to 64 letters, digits, '.', '_' or '-'"
    for name in ("pickupLocation", "dropoffLocation"):
        if name not in body:
            return f"{name} is required"
    return None


async def create(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    body = await json_body(request)
    problem = _invalid(body)
    if problem:
        return error(422, problem)
    wf = scheduler.workflows.get(body["deliveryId"])
    if wf is not None:  # the same request again: its outcome so far, not a second delivery
        return web.json_response(wf.view(), status=409 if wf.status == "cancelled" else 200)
    wf = Workflow(body["deliveryId"], body, propagated(request))
    scheduler.remember(wf)
    await scheduler.schedule(wf)
    if wf.status == "failed":
        return web.json_response(wf.view(), status=422 if wf.non_transient else 502)
    return web.json_response(wf.view(), status=201)


async def get_workflow(request: web.Request) -> web.Response:
    wf = request.app[SCHEDULER].workflows.get(request.match_info["id"])
    return web.json_response(wf.view()) if wf else error(404, "no such delivery request")


async def cancel(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    delivery_id = request.match_info["id"]
    wf = scheduler.workflows.get(delivery_id)
    if wf is None:  # cancelled before it arrived: it will not be scheduled
        wf = Workflow(delivery_id, {}, propagated(request), status="cancelled",
                      reason="cancelled before scheduling")
        scheduler.remember(wf)
        return web.json_response(wf.view())
    if wf.status == "scheduling":
        wf.cancel_requested = True
        return web.json_response(wf.view(), status=202)
    if wf.status == "scheduled":
        wf.headers = propagated(request)
        await scheduler.cancel(wf)
    return web.json_response(wf.view())


async def compensations(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    wanted = request.query.get("deliveryId")
    items = [c for c in scheduler.compensations if wanted is None or c["deliveryId"] == wanted]
    return web.json_response({"count": sum(scheduler.compensation_counts.values()),
                              "byAction": dict(scheduler.compensation_counts), "items": items[-100:]})


async def stats(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    busy = sum(1 for wf in scheduler.workflows.values() if wf.status == "scheduling")
    return web.json_response({**{k: scheduler.outcomes[k] for k in ("scheduled", "failed", "cancelled")},
                              "inProgress": busy,
                              "compensations": sum(scheduler.compensation_counts.values())})


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the scheduler app."""
    app = base_app(settings)
    app[SCHEDULER] = Scheduler(app[CLIENT], max(0, args.retries), args.backoff, random.Random())
    app.router.add_post("/api/deliveryrequests", create)
    app.router.add_get("/api/deliveryrequests/{id}", get_workflow)
    app.router.add_delete("/api/deliveryrequests/{id}", cancel)
    app.router.add_get("/compensations", compensations)
    app.router.add_get("/stats", stats)
    return app
