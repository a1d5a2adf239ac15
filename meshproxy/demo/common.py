"""What every drone-delivery app shares: settings, one log line per request, `/healthz`, and
calls to other services through the sidecar that pass on the request id and trace headers.

A meshed app never learns where other services run: it sends `http://SERVICE/PATH` to its
sidecar's outbound address (MESHPROXY_OUTBOUND, set by `meshproxy up`) as a forward proxy,
and the sidecar balances, retries and routes. gRPC calls (`ServiceClient.rpc`) go to the same
port with the Service as their authority (meshproxy/demo/rpc.py). Without a sidecar,
`--upstream NAME=HOST:PORT` points a service name straight at an app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp
from aiohttp import web

log = logging.getLogger("meshproxy.demo")

# Headers an app must copy from the request it serves onto the calls it makes, so that the
# proxies' spans join into one trace and one request id follows the whole call chain.
PROPAGATED = (
    "x-request-id", "traceparent", "tracestate", "b3",
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
)
_PROPAGATE = "meshproxy.demo.propagate"
# Ids end up in URL paths of other services: letters, digits, `.`, `_`, `-` only.
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Settings:
    """Where an app listens, who it is, and how it reaches other services."""

    role: str
    host: str = "127.0.0.1"
    port: int = 8080
    service: str = ""
    instance: str = ""
    outbound: str | None = None  # the sidecar's outbound URL, `http://127.0.0.1:PORT`
    upstreams: Mapping[str, str] = field(default_factory=dict)  # service -> `http://host:port`
    timeout: float = 10.0


def propagated(request: web.Request) -> dict[str, str]:
    """Return the headers to send on calls made while serving `request` (a copy)."""
    return dict(request.get(_PROPAGATE) or {})


def trace_id(headers: Mapping[str, str]) -> str:
    """Return the trace id of W3C or B3 headers, or "" when there is none."""
    parent = headers.get("traceparent", "")
    if len(parent) >= 35 and parent[2] == "-":
        return parent[3:35]
    if headers.get("b3"):
        return headers["b3"].split("-", 1)[0]
    return headers.get("x-b3-traceid", "")


@web.middleware
async def _request_log(request: web.Request, handler) -> web.StreamResponse:
    """One line per request: instance, method, path, status, duration, request and trace id."""
    headers = {name: request.headers[name] for name in PROPAGATED if name in request.headers}
    # An app called directly (the edge, or a test) starts the request id itself.
    headers.setdefault("x-request-id", uuid.uuid4().hex)
    request[_PROPAGATE] = headers
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        settings: Settings = request.app[SETTINGS]
        ms = (time.perf_counter() - started) * 1000
        trace = trace_id(headers)
        log.info("%s %s %s %d %.1fms rid=%s%s", settings.instance, request.method, request.path_qs,
                 status, ms, headers["x-request-id"], f" trace={trace}" if trace else "")


def error(status: int, message: str, /, **extra: Any) -> web.Response:
    """Return a JSON error answer `{"error": message, ...}`. (Positional-only: `extra` may
    hold a field named `status`, such as a delivery's.)"""
    return web.json_response({"error": message, **extra}, status=status)


async def json_body(request: web.Request) -> dict:
    """Return the request's JSON object. Raises HTTPBadRequest when it is not one."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "expected a JSON object"}),
                                 content_type="application/json")
    return body


@dataclass(frozen=True)
class Reply:
    """The answer to one call: status 0 when none came (connect failure, reset, timeout).

    A gRPC call's Reply has its status's name in `grpc_code` and its HTTP equivalent in
    `status` (200 for OK, 503 for UNAVAILABLE, ...), so both kinds of call are judged alike.
    """

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str = ""
    grpc_code: str = ""

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status < 300

    @property
    def transient(self) -> bool:
        """True when trying again later may succeed: no answer, 429 or a 5xx."""
        return self.status == 0 or self.status == 429 or self.status >= 500

    def describe(self) -> str:
        """A short reason for logs and failure records, e.g. `503 (proxy: overloaded)`."""
        if self.status == 0:
            return f"no answer ({self.error})"
        status = f"{self.status} {self.grpc_code}" if self.grpc_code else str(self.status)
        reason = self.headers.get("x-meshproxy-error")
        if reason:
            return f"{status} (proxy: {reason})"
        if isinstance(self.body, dict) and self.body.get("error"):
            return f"{status} ({self.body['error']})"
        return status


class ServiceClient:
    """Calls other services by name, over HTTP or gRPC, through the sidecar (or a `--upstream`
    override)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._grpc: Any = None  # meshproxy.demo.rpc.GrpcCaller, made on the first gRPC call

    async def start(self) -> None:
        """Open the connection pool (inside the running loop)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            connector=aiohttp.TCPConnector(limit=256),
        )

    async def close(self) -> None:
        """Close the connection pool and the gRPC channels."""
        if self._session is not None:
            await self._session.close()
        if self._grpc is not None:
            await self._grpc.close()

    def grpc(self) -> Any:
        """Return the gRPC caller (meshproxy.demo.rpc.GrpcCaller): one channel per Service."""
        if self._grpc is None:
            from meshproxy.demo.rpc import GrpcCaller  # grpcio loads in the apps that call

            self._grpc = GrpcCaller(self.settings)
        return self._grpc

    async def rpc(self, service: str, method: str, message: Any, *, headers: Mapping[str, str],
                  timeout: float | None = None) -> Reply:
        """Make the unary gRPC call `method` (`/package.Service/Method`) of `service` with a
        JSON message; return its Reply (never raises for a status or a network error)."""
        return await self.grpc().call(service, method, message, headers=headers, timeout=timeout)

    async def call(self, method: str, service: str, path: str, *, headers: Mapping[str, str],
                   json_body: Any = None, extra_headers: Mapping[str, str] | None = None) -> Reply:
        """Send one request to `service` and return its Reply; never raises for network errors."""
        assert self._session is not None, "ServiceClient.start() was not called"
        base = self.settings.upstreams.get(service)
        proxy = None
        if base is None:
            base = f"http://{service}"
            proxy = self.settings.outbound or None
        send = dict(headers)
        if extra_headers:
            send.update(extra_headers)
        try:
            async with self._session.request(method, base + path, headers=send, json=json_body,
                                             proxy=proxy) as response:
                text = await response.text()
                try:
                    body: Any = json.loads(text) if text else None
                except ValueError:
                    body = text
                return Reply(response.status, body, dict(response.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Reply(0, error=type(exc).__name__ + (f": {exc}" if str(exc) else ""))


SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", ServiceClient)


async def _healthz(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({"status": "ok", "role": s.role, "service": s.service,
                              "instance": s.instance})


def base_app(settings: Settings, middlewares=()) -> web.Application:
    """Return an app with the request log, `GET /healthz` and a ServiceClient at `app[CLIENT]`."""
    app = web.Application(middlewares=[_request_log, *middlewares])
    app[SETTINGS] = settings
    app[CLIENT] = ServiceClient(settings)

    async def client_ctx(app: web.Application):
        await app[CLIENT].start()
        yield
        await app[CLIENT].close()

    app.cleanup_ctx.append(client_ctx)
    app.router.add_get("/healthz", _healthz)
    return app


def serve(app: web.Application, settings: Settings) -> None:
    """Run `app` until SIGINT or SIGTERM."""
    log.info("%s (%s) listening on %s:%d%s", settings.instance, settings.role, settings.host,
             settings.port, f", calls out through {settings.outbound}" if settings.outbound else "")
    web.run_app(app, host=settings.host, port=settings.port, access_log=None, print=None,
                shutdown_timeout=5.0)
