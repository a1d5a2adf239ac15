"""A small app for example meshes: answers who it is, and calls other services through its sidecar.

    GET /                      -> {"service", "instance", "path", "request_id"}
    GET /call/SERVICE/PATH     -> calls http://SERVICE/PATH through the sidecar's outbound port
                                  (MESHPROXY_OUTBOUND) and returns {"via": ..., "answer": ...}

Configured from the environment `meshproxy up` sets: HOST, PORT, MESHPROXY_SERVICE,
MESHPROXY_INSTANCE, MESHPROXY_OUTBOUND.
"""

from __future__ import annotations

import os

import aiohttp
from aiohttp import web


def build_app() -> web.Application:
    service = os.environ.get("MESHPROXY_SERVICE", "echo")
    instance = os.environ.get("MESHPROXY_INSTANCE", service)
    outbound = os.environ.get("MESHPROXY_OUTBOUND", "")

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({
            "service": service, "instance": instance, "path": request.path_qs,
            "request_id": request.headers.get("x-request-id"),
        })

    async def call(request: web.Request) -> web.Response:
        target = request.match_info["service"]
        path = request.match_info["path"]
        # Forward the request id so one id follows the whole call chain.
        headers = {"x-request-id": request.headers.get("x-request-id", "")}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{target}/{path}", proxy=outbound or None,
                                   headers=headers) as response:
                body = await response.text()
                status = response.status
        try:
            import json

            answer = json.loads(body)
        except ValueError:
            answer = body
        return web.json_response({"via": instance, "status": status, "answer": answer},
                                 status=200 if status < 500 else 502)

    app = web.Application()
    app.router.add_get("/call/{service}/{path:.*}", call)
    app.router.add_route("*", "/{tail:.*}", whoami)
    return app


def main() -> None:
    web.run_app(build_app(), host=os.environ.get("HOST", "127.0.0.1"),
                port=int(os.environ.get("PORT", "8080")), access_log=None, print=None)


if __name__ == "__main__":
    main()
