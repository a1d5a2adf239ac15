"""Fakes that run the real request path (DownstreamConnection, Exchange, Forwarder, Attempts,
EndpointTry, ServiceRuntime, ConnectionPool, UpstreamConnection) without sockets and on
virtual time.

- `FakeLoop`: a virtual clock with timers, `call_soon`, futures and tasks that step their
  coroutines with `send`/`throw`; nothing happens until the test runs it (`run`, `advance`).
- `FakeTransport`: both ends of a byte stream: the proxy's side (what it wrote, pause/resume,
  close/abort, half-close, the protocol it is handed over to) and the peer's (`feed`,
  `remote_close`, `remote_reset`, a peer that reads slower: `send_buffer_full`), asyncio's
  ordering kept (connection_lost comes one loop step after close/abort; bytes wait while
  reading is paused). `half_close=False` plays asyncio's TLS: no write_eof, and it closes
  after the peer's EOF whatever the protocol answers.
- `Network`: stands in for the socket layer under each endpoint's real ConnectionPool
  (`ScriptedPool` overrides only `connect()`): it records every dial, refuses, hangs (until
  the pool's connect timeout) or opens a real UpstreamConnection over a FakeTransport, parses
  what the proxy sends on it, and answers with a handler when one is set; otherwise the test
  plays the server through `Upstream`.
- `Mesh`: a real Snapshot → Destinations → resolver → ListenerContext, wired to the above, with
  one seeded `random.Random` shared as the proxy shares its one (balancer, breaker jitter,
  backoff, ids); `Client`: a real DownstreamConnection fed raw request bytes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import random
from collections import deque
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from meshproxy.config.loader import load_text
from meshproxy.config.model.mesh import join_host_port
from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.destinations import Destinations, ServiceRuntime
from meshproxy.dataplane.downstream import DownstreamConnection
from meshproxy.dataplane.localapp import local_app_runtime
from meshproxy.dataplane.resolvers import InboundResolver, OutboundResolver
from meshproxy.dataplane.upstream import ConnectionPool, UpstreamConnection
from meshproxy.http1.errors import ConnectFailure
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, ResponseHead, Upgrade
from meshproxy.http1.reader import RequestReader
from meshproxy.http1.response_reader import ResponseReader
from meshproxy.observability.metrics import ProxyMetrics

START = 100.0  # the virtual clock's first reading (0.0 reads like "never" in places)


# --- the loop ------------------------------------------------------------------------------------


class Handle:
    """What call_soon/call_later/call_at return: cancel() keeps the callback from running."""

    __slots__ = ("_when", "_callback", "_args", "_cancelled")

    def __init__(self, when: float, callback: Callable, args: tuple) -> None:
        self._when = when
        self._callback = callback
        self._args = args
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def when(self) -> float:
        return self._when

    def __repr__(self) -> str:
        name = getattr(self._callback, "__qualname__", repr(self._callback))
        return f"<Handle {name} at {self._when:g}{' cancelled' if self._cancelled else ''}>"


class FakeFuture:
    """The part of asyncio.Future the request path and FakeTask use."""

    def __init__(self, loop: "FakeLoop") -> None:
        self._loop = loop
        self._state = "pending"
        self._result = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable] = []

    def done(self) -> bool:
        return self._state != "pending"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def result(self):
        if self._state == "cancelled":
            raise asyncio.CancelledError()
        if self._state == "pending":
            raise asyncio.InvalidStateError("result is not ready")
        if self._exception is not None:
            raise self._exception
        return self._result

    def set_result(self, value) -> None:
        if self.done():
            raise asyncio.InvalidStateError("already done")
        self._result, self._state = value, "finished"
        self._schedule_callbacks()

    def set_exception(self, exc: BaseException) -> None:
        if self.done():
            raise asyncio.InvalidStateError("already done")
        self._exception, self._state = exc, "finished"
        self._schedule_callbacks()

    def cancel(self, msg=None) -> bool:
        if self.done():
            return False
        self._state = "cancelled"
        self._schedule_callbacks()
        return True

    def add_done_callback(self, callback: Callable, *, context=None) -> None:
        if self.done():
            self._loop.call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def _schedule_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._loop.call_soon(callback, self)

    def __await__(self):
        if not self.done():
            yield self
        return self.result()


class FakeTask(FakeFuture):
    """Steps a coroutine that awaits FakeFutures, as asyncio.Task does: the first step on the
    next loop iteration, a cancel thrown in at the await (or at the start, if it has not
    started), done callbacks scheduled. An exception the coroutine lets out is raised to the
    test at once: in the request path that is always a bug."""

    def __init__(self, loop: "FakeLoop", coro) -> None:
        super().__init__(loop)
        self._coro = coro
        self._waiting: FakeFuture | None = None
        self._must_cancel = False
        loop.call_soon(self._step, None, None)

    def cancel(self, msg=None) -> bool:
        if self.done():
            return False
        waiting = self._waiting
        if waiting is not None and waiting.cancel():
            return True  # its wakeup throws CancelledError into the coroutine
        self._must_cancel = True
        return True

    def _step(self, value, exc: BaseException | None) -> None:
        if self.done():
            return
        if self._must_cancel:
            self._must_cancel = False
            exc = asyncio.CancelledError()
        try:
            yielded = self._coro.throw(exc) if exc is not None else self._coro.send(value)
        except StopIteration as stop:
            super().set_result(stop.value)
        except asyncio.CancelledError:
            super().cancel()
        except BaseException as error:
            super().set_exception(error)
            raise
        else:
            assert isinstance(yielded, FakeFuture), f"a task awaited {yielded!r}"
            self._waiting = yielded
            yielded.add_done_callback(self._wakeup)

    def _wakeup(self, future: FakeFuture) -> None:
        self._waiting = None
        if future.cancelled():
            self._step(None, asyncio.CancelledError())
        elif future._exception is not None:
            self._step(None, future._exception)
        else:
            self._step(future._result, None)


class FakeLoop:
    """A virtual clock and the loop methods the data plane calls. Nothing runs by itself:
    `run()` runs what is ready, `advance(s)` moves the clock, firing due timers in order
    (with what each makes ready) and stopping at exactly the time asked."""

    def __init__(self, start: float = START) -> None:
        self._now = start
        self._ready: deque[Handle] = deque()
        self._timers: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self._now

    def call_soon(self, callback: Callable, *args, context=None) -> Handle:
        handle = Handle(self._now, callback, args)
        self._ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable, *args, context=None) -> Handle:
        return self.call_at(self._now + delay, callback, *args)

    def call_at(self, when: float, callback: Callable, *args, context=None) -> Handle:
        handle = Handle(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), handle))
        return handle

    def create_future(self) -> FakeFuture:
        return FakeFuture(self)

    def create_task(self, coro, *, name=None, context=None) -> FakeTask:
        return FakeTask(self, coro)

    def get_debug(self) -> bool:
        return False

    def run(self) -> None:
        """Run every ready callback, and those they make ready."""
        for _ in range(100_000):
            if not self._ready:
                return
            handle = self._ready.popleft()
            if not handle._cancelled:
                handle._callback(*handle._args)
        raise RuntimeError("the loop never settles")

    def advance(self, seconds: float) -> None:
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        self.run()
        timers = self._timers
        while timers and timers[0][0] <= when:
            at, _, handle = heapq.heappop(timers)
            if handle._cancelled:
                continue
            self._now = max(self._now, at)
            handle._callback(*handle._args)
            self.run()
        self._now = max(self._now, when)

    def timers(self) -> list[Handle]:
        """The timers still to fire, soonest first."""
        return [h for _, _, h in sorted(self._timers) if not h._cancelled]


# --- byte streams ---------------------------------------------------------------------------


class FakeTransport:
    """One connection: the proxy's transport, and the remote peer the test plays."""

    def __init__(self, loop: FakeLoop, protocol, peername=("10.0.0.99", 50000), *,
                 half_close: bool = True) -> None:
        self.loop = loop
        self.protocol = protocol
        self.peername = peername
        self.half_close = half_close
        self.data = bytearray()  # every byte the proxy wrote
        self.writes: list[tuple[float, bytes]] = []  # (loop time, bytes) per write call
        self.reading = True
        self.closing = False  # close() or abort() called (or the peer reset)
        self.aborted = False
        self.lost = False  # connection_lost delivered
        self.eof_written = False
        self.on_write: Callable[[bytes], None] | None = None
        self._inbox: deque = deque()  # what the peer sent while reading was paused

    # the proxy's side
    def write(self, data) -> None:
        self._written(bytes(data))

    def writelines(self, parts) -> None:
        self._written(b"".join(parts))

    def _written(self, data: bytes) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's
        if self.aborted or self.lost or not data:
            return  # abort() discards what is not sent; a lost connection takes nothing
        self.data += data
        self.writes.append((self.loop.time(), data))
        if self.on_write is not None:
            self.on_write(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            if self._inbox:
                self.loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        if not self.closing:
            self.loop.call_soon(self._lose, None)
        self.closing = self.aborted = True

    def _lose(self, exc) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)

    def get_extra_info(self, name: str, default=None):
        return {"peername": self.peername}.get(name, default)

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        if not self.half_close:
            raise NotImplementedError("this transport cannot half-close")
        self.eof_written = True

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    # the peer's side
    def feed(self, data: bytes) -> None:
        """The peer sends `data` (held while the proxy does not read)."""
        self._inbox.append(data)
        if self.reading:
            self._deliver()

    def remote_close(self) -> None:
        """The peer half-closes (FIN), after what it sent."""
        self._inbox.append(None)
        if self.reading:
            self._deliver()

    def send_buffer_full(self) -> None:
        """The peer reads slower than the proxy writes: the send buffer passes its high-water
        mark."""
        self.protocol.pause_writing()

    def send_buffer_drained(self) -> None:
        self.protocol.resume_writing()

    def remote_reset(self) -> None:
        """The peer resets the connection: connection_lost at once, with the error."""
        self._inbox.clear()
        self.closing = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(ConnectionResetError("reset by peer"))

    def _deliver(self) -> None:
        while self._inbox and self.reading and not self.closing:
            item = self._inbox.popleft()
            if item is None:
                # A transport that cannot half-close closes whatever the protocol says.
                if not self.protocol.eof_received() or not self.half_close:
                    self.close()
            else:
                self.protocol.data_received(item)


# --- HTTP as the test sees it ------------------------------------------------------------------


class Request:
    """A request as an upstream received it."""

    def __init__(self, head: RequestHead) -> None:
        self.head = head
        self.method = head.method.decode()
        self.target = head.target.decode()
        self.body = b""
        self.complete = False

    def header(self, name: str) -> str | None:
        value = self.head.header(name.lower().encode())
        return value.decode() if value is not None else None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} {len(self.body)}B{'' if self.complete else ' ...'}>"


class Response:
    """A response as the client received it."""

    def __init__(self, head: ResponseHead) -> None:
        self.status = head.status
        self.head = head
        self.body = b""
        self.complete = False

    def header(self, name: str) -> str | None:
        value = self.head.header(name.lower().encode())
        return value.decode() if value is not None else None

    @property
    def error(self) -> str | None:
        """The proxy's own error reason (`x-meshproxy-error`), None for an app's response."""
        return self.header("x-meshproxy-error")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.error or ''} {self.body[:40]!r}>"


def parse_responses(data: bytes) -> list[Response]:
    reader = ResponseReader()
    reader.expect(False)
    out: list[Response] = []
    # The proxy's reader takes an upstream's responses one exchange at a time (a second
    # response in the same read is the server breaking the protocol); the bytes a client got
    # hold several responses, so they are fed a byte at a time.
    events: list = []
    for i in range(len(data)):
        events += reader.feed(bytes(data[i:i + 1]))
        if events and events[-1].__class__ is Upgrade:
            break  # what follows is the new protocol's
    for event in events:
        if event.__class__ is ResponseHead:
            out.append(Response(event))
        elif event is END_OF_MESSAGE:
            out[-1].complete = True
        elif event.__class__ is bytes:
            out[-1].body += event
    return out


def request(method: str = "GET", path: str = "/", host: str = "shop", body: bytes | None = None,
            headers: dict | None = None, chunked: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if chunked:
        lines.append("transfer-encoding: chunked")
        framed = b"" if body is None else b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + framed
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def response(status: int = 200, body: bytes = b"ok", headers: dict | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- upstreams ------------------------------------------------------------------------------


class Upstream:
    """One upstream connection, from the server's end: what it received, and how it answers."""

    def __init__(self, network: "Network", key: str, conn: UpstreamConnection,
                 transport: FakeTransport) -> None:
        self.network = network
        self.key = key  # the endpoint, HOST:PORT
        self.conn = conn
        self.transport = transport
        self.requests: list[Request] = []
        self._reader = RequestReader()
        transport.on_write = self._received

    def _received(self, data: bytes) -> None:
        for event in self._reader.feed(data):
            if event.__class__ is RequestHead:
                req = Request(event)
                self.requests.append(req)
                self.network.sent.append((self.network.loop.time(), self.key, req))
            elif event.__class__ is bytes:
                self.requests[-1].body += event
            elif event is END_OF_MESSAGE:
                req = self.requests[-1]
                req.complete = True
                handler = self.network.handlers.get(self.key)
                if handler is not None:
                    self.network.loop.call_soon(self._answer, handler, req)

    def _answer(self, handler, req: Request) -> None:
        if not self.transport.closing:
            answer = handler(req)
            if answer is not None:
                self.respond(answer)

    def respond(self, raw: bytes) -> None:
        self.transport.feed(raw)

    def close(self) -> None:
        """The server closes its end (FIN), as a keep-alive timeout does."""
        self.transport.remote_close()

    def reset(self) -> None:
        self.transport.remote_reset()

    @property
    def closed(self) -> bool:
        return self.transport.closing

    def __repr__(self) -> str:
        return f"<Upstream {self.key} {self.requests}{' closed' if self.closed else ''}>"


class Network:
    """The socket layer under the pools: dials, refusals, hangs, open connections."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.dials: list[str] = []  # endpoint keys, in the order connect() was called
        self.dial_times: list[tuple[float, str]] = []  # (loop time, endpoint key) per dial
        self.connections: list[Upstream] = []  # opened, in order
        self.sent: list[tuple[float, str, Request]] = []  # (loop time, endpoint, request) per head
        self.refusing: set[str] = set()  # endpoints whose connects fail at once
        self.hanging: set[str] = set()  # endpoints whose connects never complete
        self.handlers: dict[str, Callable[[Request], bytes | None]] = {}

    def install(self, runtime: ServiceRuntime) -> None:
        for endpoint in runtime.endpoints:
            if not isinstance(endpoint.pool, ScriptedPool):
                endpoint.pool = ScriptedPool(self, endpoint.pool)

    def serve(self, key: str, handler: Callable[[Request], bytes | None] | bytes) -> None:
        """Answer every complete request to endpoint `key` (on the next loop step)."""
        self.handlers[key] = handler if callable(handler) else (lambda req: handler)

    async def connect(self, pool: ConnectionPool) -> UpstreamConnection:
        key = join_host_port(pool.host, pool.port)
        self.dials.append(key)
        self.dial_times.append((self.loop.time(), key))
        done = self.loop.create_future()

        def settle(error: Exception | None) -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(None)

        if key in self.refusing:
            self.loop.call_soon(settle, ConnectFailure(f"connect to {key}: refused"))
        elif key in self.hanging:
            # ConnectionPool.connect's asyncio.timeout(connect_timeout), on virtual time.
            self.loop.call_later(pool.connect_timeout, settle,
                                 ConnectFailure(f"connect to {key} timed out"))
        else:
            self.loop.call_soon(settle, None)
        await done
        conn = UpstreamConnection(pool)
        transport = FakeTransport(self.loop, conn, peername=(pool.host, pool.port))
        pool.open_count += 1  # ConnectionPool.connect's on_open
        conn.connection_made(transport)
        self.connections.append(Upstream(self, key, conn, transport))
        return conn

    def to(self, key: str) -> list[Upstream]:
        return [u for u in self.connections if u.key == key]

    def requests_to(self, key: str) -> list[Request]:
        return [r for u in self.to(key) for r in u.requests]

    def tries(self, target: str | None = None) -> list[str]:
        """The endpoint of every request head sent upstream (for `target` only, if given), in
        the order they were sent."""
        return [key for _, key, req in self.sent if target is None or req.target == target]

    @property
    def last(self) -> Upstream:
        return self.connections[-1]


class ScriptedPool(ConnectionPool):
    """The endpoint's real pool (idle list, reuse, release, sweep, counts) with `connect()`
    played by the Network."""

    __slots__ = ("network",)

    def __init__(self, network: Network, like: ConnectionPool) -> None:
        super().__init__(like.loop, like.host, like.port, idle_timeout=like.idle_timeout,
                         connect_timeout=like.connect_timeout, metrics=like.metrics,
                         tls=like.tls, expected_id=like.expected_id)
        self.network = network

    async def connect(self) -> UpstreamConnection:
        return await self.network.connect(self)


# --- the proxy ----------------------------------------------------------------------------------


def mesh_config(services: dict[str, list[str]], policies: dict[str, dict] | None = None,
                routes: list[dict] | None = None) -> str:
    """A Mesh of unmeshed instances (`name: [HOST:PORT, ...]`) in namespace default, with a
    TrafficPolicy per Service in `policies`, as JSON documents (YAML reads them)."""
    docs: list[dict] = [{
        "apiVersion": "meshproxy.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "m"},
        "spec": {"outboundTrafficPolicy": "REGISTRY_ONLY", "services": [
            {"name": name, "instances": [
                {"name": f"{name}-{i}", "sidecar": False, "app": {"address": address}}
                for i, address in enumerate(addresses)]}
            for name, addresses in services.items()]},
    }]
    for name, spec in (policies or {}).items():
        docs.append({"apiVersion": "meshproxy.io/v1alpha1", "kind": "TrafficPolicy",
                     "metadata": {"name": name, "namespace": "default"},
                     "spec": {"targetRef": {"kind": "Service", "name": name}, **spec}})
    docs += routes or []
    return "\n---\n".join(json.dumps(d) for d in docs)


class RecordingLog:
    """The listener's access log: keeps each request's record (what its log line and span are
    made from) with its duration."""

    def __init__(self) -> None:
        self.records: list = []  # observability.record.RequestRecord, as handed over

    def log_request(self, record, duration: float) -> None:
        self.records.append((record, duration))


class Client:
    """A client connection to the proxy's listener."""

    def __init__(self, mesh: "Mesh", peer=("10.0.0.99", 50000)) -> None:
        self.mesh = mesh
        self.conn = DownstreamConnection(mesh.context)
        self.transport = FakeTransport(mesh.loop, self.conn, peername=peer)
        self.conn.connection_made(self.transport)

    def send(self, raw: bytes) -> "Client":
        self.transport.feed(raw)
        return self

    def responses(self) -> list[Response]:
        return parse_responses(self.transport.data)

    @property
    def response(self) -> Response | None:
        """The one response so far (None before it started)."""
        got = self.responses()
        assert len(got) <= 1, got
        return got[0] if got else None

    def answered_at(self) -> float:
        """The loop time of the first byte written to the client."""
        return self.transport.writes[0][0]

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    def leave(self) -> None:
        """The client goes away (a reset): connection_lost at once."""
        self.transport.remote_reset()


class Mesh:
    """One listener of the proxy over real destinations, on a FakeLoop and a Network."""

    def __init__(self, config: str, *, seed: int = 7) -> None:
        self.loop = FakeLoop()
        self.rng = random.Random(seed)
        self.metrics = ProxyMetrics()
        self.network = Network(self.loop)
        self.destinations = Destinations(self.loop, self.metrics, self.rng, self.loop.time)
        self.destinations.apply(load_text(config))
        for runtime in self.destinations.services.values():
            self.network.install(runtime)
        resolver = OutboundResolver(self.destinations, "default", set())
        self.log = RecordingLog()
        self.context = ListenerContext(self.loop, resolver, self.metrics, self.rng,
                                       access_log=self.log)

    @classmethod
    def outbound(cls, services: dict[str, list[str]], policies: dict[str, dict] | None = None,
                 **kw) -> "Mesh":
        return cls(mesh_config(services, policies), **kw)

    def service(self, name: str = "shop") -> ServiceRuntime:
        return self.destinations.services[f"{name}.default"]

    def client(self, **kw) -> Client:
        return Client(self, **kw)

    def call(self, raw: bytes) -> Client:
        """A new client connection sending `raw`, run until nothing more is ready."""
        client = Client(self).send(raw)
        self.loop.run()
        return client

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples of `name` whose labels include `labels`, as scraped."""
        text = self.metrics.render()[0].decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total


class InboundMesh(Mesh):
    """The inbound listener: the local app as the one endpoint, no Attempts."""

    def __init__(self, app: tuple[str, int] = ("127.0.0.1", 8080), *, seed: int = 7) -> None:
        self.loop = FakeLoop()
        self.rng = random.Random(seed)
        self.metrics = ProxyMetrics()
        self.network = Network(self.loop)
        policy = load_text(mesh_config({"shop": []})).policy_for("shop.default")
        self.app = local_app_runtime("shop.default", policy, app, instance="shop-0", old=None,
                                     loop=self.loop, metrics=self.metrics, rng=self.rng)
        self.network.install(self.app)
        self.log = RecordingLog()
        self.context = ListenerContext(self.loop, InboundResolver(self.app), self.metrics,
                                       self.rng, access_log=self.log)

    def service(self, name: str = "shop") -> ServiceRuntime:
        return self.app
