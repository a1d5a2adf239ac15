"""A real HTTP backend for integration tests: aiohttp on its own loop in a background thread.

It records every request it receives (method, path, headers as received, body length, the
client's peer port so a test can count upstream connections) and serves:

    /echo            any method: the body back, the method in `x-echo-method`
    /status/{code}   that status (no body for 204 and 304)
    /bytes/{n}       n bytes of `pattern(n)`, streamed chunked (`?framing=length`: Content-Length)
    /upload          consumes a streamed body, answers JSON {"bytes": n, "sha256": hex}
    /headers         JSON list of [name, value] pairs exactly as received
    /slow/{ms}       answers after ms milliseconds
    /ws              WebSocket echo (text and binary)
    /head            GET answers "hello head" with Content-Length; HEAD the same head, no body
    /api/{anything}  any method: 200, the backend's name and the path (for routes by path)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

BLOCK = bytes(range(256)) * 256  # 64 KiB


def pattern(n: int) -> bytes:
    """Return the n bytes /bytes/{n} sends (a repeating 0..255 sequence)."""
    whole, rest = divmod(n, len(BLOCK))
    return BLOCK * whole + BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    """Return the hex SHA-256 of `pattern(n)` without building it whole."""
    digest = hashlib.sha256()
    whole, rest = divmod(n, len(BLOCK))
    for _ in range(whole):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


@dataclass
class Received:
    """One request as the backend saw it."""

    method: str
    path: str  # path and query string
    headers: list[tuple[str, str]]
    peer_port: int
    body_len: int = 0
    done: bool = False  # the handler has answered

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


RECORD = web.RequestKey("record", Received)


@dataclass
class HttpBackend:
    """An aiohttp server on 127.0.0.1:<free port> in a daemon thread. Use start()/stop()."""

    name: str = "backend"
    port: int = 0
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # life cycle ------------------------------------------------------------------------------

    def start(self) -> "HttpBackend":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # pragma: no cover - reported to the caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"backend-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("backend did not start within 10 s")
        if failure:
            raise failure[0]
        return self

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record], client_max_size=1 << 40)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/bytes/{n}", self._bytes)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("*", "/headers", self._headers)
        app.router.add_get("/slow/{ms}", self._slow)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/head", self._head)  # add_get also answers HEAD
        app.router.add_route("*", "/api/{tail:.*}", self._api)
        # Stopping does not wait for handlers still sleeping in /slow (a test may leave one).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # what was received -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, path_prefix: str = "") -> list[Received]:
        """Return the requests received so far whose path starts with `path_prefix`."""
        with self._lock:
            return [r for r in self.received if r.path.startswith(path_prefix)]

    def clear(self) -> None:
        with self._lock:
            self.received.clear()

    # handlers ----------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler):
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record = Received(
            method=request.method,
            path=request.path_qs,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            peer_port=peer[1] if peer else 0,
        )
        with self._lock:
            self.received.append(record)
        request[RECORD] = record
        try:
            return await handler(request)
        finally:
            record.done = True

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        request[RECORD].body_len = len(body)
        return web.Response(body=body, headers={"x-echo-method": request.method,
                                                "x-backend": self.name})

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"x-backend": self.name})
        return web.Response(status=code, text=f"status {code}\n", headers={"x-backend": self.name})

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        response = web.StreamResponse(headers={"x-backend": self.name})
        if request.query.get("framing") == "length":
            response.content_length = n
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        whole, rest = divmod(n, len(BLOCK))
        for _ in range(whole):
            await response.write(BLOCK)
        if rest:
            await response.write(BLOCK[:rest])
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        count = 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            count += len(piece)
        request[RECORD].body_len = count
        return web.json_response({"bytes": count, "sha256": digest.hexdigest()},
                                 headers={"x-backend": self.name})

    async def _headers(self, request: web.Request) -> web.Response:
        body = await request.read()
        request[RECORD].body_len = len(body)
        pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
        return web.Response(text=json.dumps(pairs), content_type="application/json",
                            headers={"x-backend": self.name})

    async def _slow(self, request: web.Request) -> web.Response:
        ms = int(request.match_info["ms"])
        await asyncio.sleep(ms / 1000)
        return web.Response(text=f"slow {ms}\n", headers={"x-backend": self.name})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def _api(self, request: web.Request) -> web.Response:
        body = await request.read()
        request[RECORD].body_len = len(body)
        return web.Response(text=f"{self.name} {request.path_qs}\n", headers={"x-backend": self.name})

    async def _head(self, request: web.Request) -> web.Response:
        return web.Response(text="hello head", headers={"x-backend": self.name})
