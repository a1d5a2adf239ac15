"""The control plane's HTTP API (aiohttp, port 15010): the proxies' watch, the proxy list,
`/config`, `/metrics`, `/live`, `/ready`.

`GET /v1/watch?service=NAME&namespace=NS&instance=I&inbound=PORT&admin=ADDR&version=V` is a
stream of JSON lines (`application/x-ndjson`), one per message, each with a `seq` that grows by
one within the watch:

    {"type": "snapshot", "seq": 1, "version": "…", "generation": [ … ], "documents": [ … ]}
    {"type": "heartbeat", "seq": 2}

A snapshot is sent first unless the proxy already holds `version`, then on every change; a
heartbeat when nothing changed for HEARTBEAT_INTERVAL seconds, so a proxy can tell a quiet
control plane from a dead one. A stream rather than long polls: a change reaches a thousand
proxies with one write each, and nothing is lost between two polls.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from meshproxy.control.plane import ControlPlane, ProxyRecord

log = logging.getLogger("meshproxy.control")
HEARTBEAT_INTERVAL = 5.0
PLANE_KEY = web.AppKey("plane", ControlPlane)


class _PlaneCollector:
    """The control plane's metrics, read from its state at scrape time."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def collect(self):
        plane = self.plane
        info = GaugeMetricFamily("meshproxy_config_version_info", "Configuration version in force",
                                 labels=["version"])
        if plane.current is not None:
            info.add_metric([plane.current.version], 1)
        yield info
        yield CounterMetricFamily("meshproxy_config_errors_total", "Refused configuration changes",
                                  value=plane.errors_total)
        yield CounterMetricFamily("meshproxy_control_snapshots_total",
                                  "Configurations put in force", value=plane.snapshots_total)
        yield GaugeMetricFamily("meshproxy_control_watching_proxies", "Proxies watching now",
                                value=sum(1 for r in plane.proxies.values() if r.connected))


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def watch(request: web.Request) -> web.StreamResponse:
    plane = request.app[PLANE_KEY]
    query = request.query
    name = query.get("service") or "unknown"
    namespace = query.get("namespace") or "default"
    instance = query.get("instance") or ""
    inbound = _int(query.get("inbound"))
    held = query.get("version") or None
    service_key = f"{name}.{namespace}"
    if instance and inbound:
        plane.register(namespace, name, instance, inbound)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    record = ProxyRecord(service_key, instance, query.get("admin") or None, request.remote)
    watch_id = plane.proxy_connected(record)
    seq = 0
    try:
        while True:
            snapshot = await plane.wait_for_change(held, HEARTBEAT_INTERVAL)
            seq += 1
            if snapshot is None:
                await response.write(b'{"type":"heartbeat","seq":%d}\n' % seq)
                continue
            head = json.dumps({"type": "snapshot", "seq": seq, "version": snapshot.version,
                               "generation": list(snapshot.generation)}, separators=(",", ":"))
            shared, own = snapshot.view_parts(service_key)
            # Three writes rather than one joined copy: the shared part is one object for every
            # proxy (a 1000-Service mesh's is about 400 KB).
            await response.write(head[:-1].encode() + b',"documents":[')
            await response.write(shared)
            await response.write(own + b"}\n")
            held = record.version = snapshot.version
    except ConnectionResetError:
        # The proxy went away (it stopped, or `up` is stopping everything): the watch ends
        # here, quietly; aiohttp's ClientConnectionResetError is one of these.
        return response
    finally:  # the proxy went away or the server is stopping
        plane.proxy_disconnected(watch_id)


async def proxies(request: web.Request) -> web.Response:
    return web.json_response({"proxies": request.app[PLANE_KEY].proxies_json()})


async def config(request: web.Request) -> web.Response:
    return web.json_response(request.app[PLANE_KEY].config_json(), dumps=lambda d: json.dumps(d, indent=2))


async def live(request: web.Request) -> web.Response:
    return web.Response(text="live\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[PLANE_KEY].current is None:
        return web.Response(status=503, text="no valid configuration yet\n")
    return web.Response(text="ready\n")


def build_app(plane: ControlPlane, *, ca=None, verify=None, cert_lifetime: float = 86_400.0) -> web.Application:
    """Return the aiohttp application of the control plane's API; with `ca` (and `verify`, which
    maps a credential to the SPIFFE ID it proves) it also signs the proxies' certificates."""
    app = web.Application()
    app[PLANE_KEY] = plane
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PlaneCollector(plane))
    if ca is not None:
        from meshproxy.control.ca_api import add_ca_routes

        registry.register(add_ca_routes(app, ca, verify, lifetime=cert_lifetime))

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    app.router.add_get("/v1/watch", watch)
    app.router.add_get("/v1/proxies", proxies)
    app.router.add_get("/config", config)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    return app
