"""The proxy's admin server (port 15000) and health server (port 15021), spec §2.

Both are served by ``meshproxy.localhttp`` (not aiohttp, which would double the
sidecar's memory) over an ``AdminState`` that the proxy implements. The admin server, bound to loopback, also shows the configuration
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
from typing import Callable, Protocol

from meshproxy.localhttp import LocalHTTPServer, Reply
from meshproxy.observability.metrics import ProxyMetrics

_log = logging.getLogger(__name__)

_JSON_DUMPS = partial(json.dumps, indent=2, sort_keys=True)


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
    """Answers over one ``AdminState``; also owns the drain task."""

    def __init__(self, state: AdminState) -> None:
        self._state = state
        self._drain_task: asyncio.Task[None] | None = None

    def live(self) -> Reply:
        """200 ``live`` while the proxy is live, else 503."""
        if self._state.is_live():
            return Reply(200, b"live\n")
        return Reply(503, b"not live\n")

    def ready(self) -> Reply:
        """200 ``ready`` once the proxy can serve, else 503 ``not ready``."""
        if self._state.is_ready():
            return Reply(200, b"ready\n")
        return Reply(503, b"not ready\n")

    def metrics(self) -> Reply:
        """The Prometheus text exposition of the proxy's metrics."""
        body, content_type = self._state.metrics.render()
        return Reply(200, body, content_type)

    def config(self) -> Reply:
        """The configuration in force, as JSON."""
        return _json(self._state.config_json())

    def endpoints(self) -> Reply:
        """The balancer state per service, as JSON."""
        return _json(self._state.endpoints_json())

    def drain(self) -> Reply:
        """Start a drain in the background and answer 202 at once.

        A drain already under way is not started again: the answer is the same
        202, so a Job's retried ``POST /drain`` is harmless.
        """
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.ensure_future(self._run_drain())
        return Reply(202, b"draining\n")

    async def _run_drain(self) -> None:
        """Run the proxy's drain; nobody awaits this task, so report failures here."""
        try:
            await self._state.drain()
        except Exception:
            _log.exception("drain failed")


def _json(data: dict) -> Reply:
    return Reply(200, (_JSON_DUMPS(data) + "\n").encode(), "application/json; charset=utf-8")


class _Routes:
    """Path -> {method: answer}; HEAD is answered like GET, other methods get 405."""

    def __init__(self, table: dict[bytes, dict[bytes, Callable[[], Reply]]]) -> None:
        self.table = table

    def __call__(self, method: bytes, path: bytes) -> Reply:
        methods = self.table.get(path)
        if methods is None:
            return Reply(404, b"not found\n")
        answer = methods.get(b"GET" if method == b"HEAD" and b"GET" in methods else method)
        if answer is None:
            allow = ", ".join(m.decode() for m in methods)
            return Reply(405, b"method not allowed\n", headers=[("allow", allow)])
        return answer()


def admin_routes(state: AdminState) -> _Routes:
    """The admin port's routes: probes, ``/metrics``, ``/config``, ``/endpoints``, ``POST /drain``."""
    h = _Handlers(state)
    return _Routes({
        b"/live": {b"GET": h.live}, b"/ready": {b"GET": h.ready},
        b"/metrics": {b"GET": h.metrics}, b"/config": {b"GET": h.config},
        b"/endpoints": {b"GET": h.endpoints}, b"/drain": {b"POST": h.drain},
    })


def health_routes(state: AdminState, app_probes: dict | None = None) -> _Routes:
    """The health port's routes: ``/live``, ``/ready`` and ``/metrics``, and the app's
    rewritten probes (``/app-health/CONTAINER/livez|readyz|startupz``, see appprobes.py);
    nothing that changes state."""
    h = _Handlers(state)
    table = {b"/live": {b"GET": h.live}, b"/ready": {b"GET": h.ready},
             b"/metrics": {b"GET": h.metrics}}
    if app_probes:
        from meshproxy.appprobes import run_probe

        for path, probe in app_probes.items():
            table[path] = {b"GET": lambda probe=probe: run_probe(probe)}
    return _Routes(table)


class AdminServers:
    """The running admin and health servers and the ports they are bound to."""

    def __init__(self, admin: LocalHTTPServer, admin_port: int, health: LocalHTTPServer,
                 health_port: int) -> None:
        self._admin = admin
        self._health = health
        self._more_health: list[LocalHTTPServer] = []
        self.admin_port = admin_port
        self.health_port = health_port

    async def listen_health(self, host: str) -> None:
        """Serve the health port on `host` as well, with the same answers (transparent mode:
        `::` beside `0.0.0.0`, for kubelets that probe over IPv6). Raises OSError when it
        cannot bind; the servers already running go on."""
        server = LocalHTTPServer(self._health.handler, _log_exception)
        await server.start(host, self.health_port)
        self._more_health.append(server)

    async def close(self) -> None:
        """Stop every server."""
        try:
            for server in (*self._more_health, self._health):
                await server.close()
        finally:
            await self._admin.close()


def _log_exception() -> None:
    _log.exception("admin handler failed")


async def start_servers(
    state: AdminState, admin_host: str, admin_port: int, health_host: str, health_port: int,
    app_probes: dict | None = None,
) -> AdminServers:
    """Start the admin and health servers and return them, running.

    Port 0 picks a free port; the chosen ones are ``admin_port`` and
    ``health_port`` on the result. Raises OSError when either address cannot be
    bound, after stopping whatever had started.
    """
    admin = LocalHTTPServer(admin_routes(state), _log_exception)
    admin_port = await admin.start(admin_host, admin_port)
    health = LocalHTTPServer(health_routes(state, app_probes), _log_exception)
    try:
        health_port = await health.start(health_host, health_port)
    except BaseException:
        await admin.close()
        raise
    return AdminServers(admin, admin_port, health, health_port)
