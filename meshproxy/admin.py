"""The proxy's admin server (port 15000) and health server (port 15021), spec §2.

Both are small aiohttp applications over an ``AdminState`` that the proxy
implements. The admin server, bound to loopback, also shows the configuration
and balancer state and accepts ``POST /drain``; the health server, reachable
from the kubelet and Prometheus, is read-only and answers ``/live``,
``/ready`` and ``/metrics`` exactly as the admin server does.

Neither is on the request path, but Prometheus scrapes ``/metrics`` every few
seconds, so the access log is off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from typing import Protocol

from aiohttp import web

from meshproxy.observability.metrics import ProxyMetrics

_log = logging.getLogger(__name__)

_JSON_DUMPS = partial(json.dumps, indent=2, sort_keys=True)

#: How long closing waits for requests still being answered (seconds).
_SHUTDOWN_TIMEOUT = 2.0


class AdminState(Protocol):
    """What the admin and health servers ask of the proxy."""

    metrics: ProxyMetrics

    def is_live(self) -> bool:
        """Return whether the proxy's event loop is working."""
        ...

    def is_ready(self) -> bool:
        """Return whether config, endpoints and certificate are in place."""
        ...

    def config_json(self) -> dict:
        """Return the config version and resources in force, JSON-serialisable."""
        ...

    def endpoints_json(self) -> dict:
        """Return the balancer state per service, JSON-serialisable."""
        ...

    async def drain(self) -> None:
        """Stop accepting, finish in-flight requests; the proxy exits afterwards."""
        ...


class _Handlers:
    """Request handlers over one ``AdminState``; also owns the drain task."""

    def __init__(self, state: AdminState) -> None:
        self._state = state
        self._drain_task: asyncio.Task[None] | None = None

    async def live(self, request: web.Request) -> web.Response:
        """200 ``live`` while the proxy is live, else 503."""
        if self._state.is_live():
            return web.Response(text="live\n")
        return web.Response(status=503, text="not live\n")

    async def ready(self, request: web.Request) -> web.Response:
        """200 ``ready`` once the proxy can serve, else 503 ``not ready``."""
        if self._state.is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus text exposition of the proxy's metrics."""
        body, content_type = self._state.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def config(self, request: web.Request) -> web.Response:
        """The configuration in force, as JSON."""
        return web.json_response(self._state.config_json(), dumps=_JSON_DUMPS)

    async def endpoints(self, request: web.Request) -> web.Response:
        """The balancer state per service, as JSON."""
        return web.json_response(self._state.endpoints_json(), dumps=_JSON_DUMPS)

    async def drain(self, request: web.Request) -> web.Response:
        """Start a drain in the background and answer 202 at once.

        A drain already under way is not started again: the answer is the same
        202, so a Job's retried ``POST /drain`` is harmless.
        """
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._run_drain())
        return web.Response(status=202, text="draining\n")

    async def _run_drain(self) -> None:
        """Run the proxy's drain; nobody awaits this task, so report failures here."""
        try:
            await self._state.drain()
        except Exception:
            _log.exception("drain failed")


def _add_probe_routes(app: web.Application, handlers: _Handlers) -> None:
    """Add the read-only routes both servers share. ``add_get`` also answers
    HEAD; any other method on these paths gets 405 from aiohttp's router."""
    app.router.add_get("/live", handlers.live)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/metrics", handlers.metrics)


def build_admin_app(state: AdminState) -> web.Application:
    """Return the admin application: probes, ``/metrics``, ``/config``,
    ``/endpoints`` and ``POST /drain``."""
    handlers = _Handlers(state)
    app = web.Application()
    _add_probe_routes(app, handlers)
    app.router.add_get("/config", handlers.config)
    app.router.add_get("/endpoints", handlers.endpoints)
    app.router.add_post("/drain", handlers.drain)
    return app


def build_health_app(state: AdminState) -> web.Application:
    """Return the health application: ``/live``, ``/ready`` and ``/metrics`` only.

    Rewritten application probes (``/app-health/CONTAINER/livez|readyz|startupz``)
    belong here as further routes; nothing that changes state does.
    """
    handlers = _Handlers(state)
    app = web.Application()
    _add_probe_routes(app, handlers)
    return app


class AdminServers:
    """The running admin and health servers and the ports they are bound to."""

    def __init__(self, admin: web.AppRunner, health: web.AppRunner) -> None:
        self._admin = admin
        self._health = health
        self.admin_port: int = _bound_port(admin)
        self.health_port: int = _bound_port(health)

    async def close(self) -> None:
        """Stop both servers, giving requests being answered a moment to finish."""
        try:
            await self._health.cleanup()
        finally:
            await self._admin.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    """Return the port the runner's first socket is bound to (useful after port 0)."""
    return int(runner.addresses[0][1])


async def _start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app`` on ``host:port`` and return its runner.

    Raises OSError when the address cannot be bound; nothing is left running then.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def start_servers(
    state: AdminState, admin_host: str, admin_port: int, health_host: str, health_port: int
) -> AdminServers:
    """Start the admin and health servers and return them, running.

    Port 0 picks a free port; the chosen ones are ``admin_port`` and
    ``health_port`` on the result. Raises OSError when either address cannot be
    bound, after stopping whatever had started.
    """
    admin = await _start(build_admin_app(state), admin_host, admin_port)
    try:
        health = await _start(build_health_app(state), health_host, health_port)
    except BaseException:
        await admin.cleanup()
        raise
    return AdminServers(admin, health)
