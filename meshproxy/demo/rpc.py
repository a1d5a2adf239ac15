"""gRPC in the drone-delivery demo without generated code: JSON messages on grpcio's generic
handlers, channels that go through the sidecar, and a call's status as the demo's Reply.

A message is a JSON object in UTF-8. grpcio takes any serializer, and the wire stays gRPC's
(length-prefixed messages on HTTP/2, the status in trailers), so neither `.proto` files nor
grpcio-tools are needed and the proxies see exactly what a protobuf service would send.

A meshed app calls a gRPC Service the way it calls an HTTP one, through its sidecar's outbound
port: the channel dials that port (HTTP/2 with prior knowledge) and names the Service as the
calls' `:authority` (`grpc.default_authority`), so the sidecar routes, balances, retries and
times every call on its own, not once per connection. grpcio would otherwise honour the
`http_proxy` that `meshproxy up` sets for the HTTP calls and open a CONNECT tunnel: one TCP
connection, balanced once. The channels turn that off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from meshproxy.demo.common import PROPAGATED, Reply, Settings, trace_id

log = logging.getLogger("meshproxy.demo")

# google/rpc/code.proto gives each status its HTTP equivalent; a Reply carries that, so a
# gRPC answer is transient or not by the same rule as an HTTP one (no answer, 429, 5xx).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def encode(message: Any) -> bytes:
    """Return a message's bytes: compact JSON."""
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    """Return the message of `data` (None for an empty message). Raises ValueError for bytes
    that are not JSON, which grpcio answers with INTERNAL."""
    return json.loads(data) if data else None


# -- the client side ---------------------------------------------------------------------------

def channel_target(settings: Settings, service: str) -> tuple[str, str | None]:
    """Return where a channel to `service` connects and the authority it names (None: the
    target's own): a `--upstream` override directly, else the sidecar's outbound port with
    the Service as authority, else the Service's name on port 80, as the HTTP calls do."""
    base = settings.upstreams.get(service)
    if base is not None:
        return urlsplit(base).netloc, None
    if settings.outbound:
        return urlsplit(settings.outbound).netloc, service
    return f"{service}:80", None


def _metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    # gRPC metadata keys are lowercase; the request id and trace headers pass on as they came.
    return tuple((name.lower(), value) for name, value in headers.items())


def _fields(*metadata: Any) -> dict[str, str]:
    fields: dict[str, str] = {}
    for md in metadata:
        for key, value in md or ():
            if isinstance(value, str):
                fields[key] = value
    return fields


def error_reply(exc: grpc.RpcError) -> Reply:
    """Return the Reply of a failed call: the status's HTTP equivalent, its name, its details
    as the body's `error`, and the metadata (where the proxy's `x-meshproxy-error` is)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    try:
        headers = _fields(exc.initial_metadata(), exc.trailing_metadata())
    except Exception:  # a call that never started has no metadata to read
        headers = {}
    return Reply(HTTP_STATUS.get(code, 500), {"error": details or code.name}, headers,
                 error=f"{code.name}: {details}", grpc_code=code.name)


class GrpcCaller:
    """One channel per Service, opened on first use inside the running loop; calls return a
    Reply (never raise for a status) and streams yield messages."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        """Return the channel to `service`, opening it the first time."""
        channel = self._channels.get(service)
        if channel is None:
            target, authority = channel_target(self.settings, service)
            options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
            if authority:
                options.append(("grpc.default_authority", authority))
            channel = self._channels[service] = grpc.aio.insecure_channel(target, options=options)
        return channel

    async def call(self, service: str, method: str, message: Any, *, headers: Mapping[str, str],
                   timeout: float | None = None) -> Reply:
        """Make the unary call `method` (`/package.Service/Method`) of `service`; return its
        Reply: 200 and the answer, or the status's HTTP equivalent (error_reply)."""
        stub = self.channel(service).unary_unary(method, request_serializer=encode,
                                                 response_deserializer=decode)
        call = stub(message, timeout=self.settings.timeout if timeout is None else timeout,
                    metadata=_metadata(headers))
        try:
            answer = await call
            fields = _fields(await call.initial_metadata(), await call.trailing_metadata())
        except grpc.RpcError as exc:
            return error_reply(exc)
        return Reply(200, answer, fields, grpc_code="OK")

    async def stream(self, service: str, method: str, message: Any, *, headers: Mapping[str, str],
                     timeout: float | None = None) -> AsyncIterator[Any]:
        """Yield the messages of the server-streaming call `method` of `service`. Raises
        grpc.RpcError when the call ends with a status other than OK."""
        stub = self.channel(service).unary_stream(method, request_serializer=encode,
                                                  response_deserializer=decode)
        call = stub(message, timeout=self.settings.timeout if timeout is None else timeout,
                    metadata=_metadata(headers))
        try:
            async for answer in call:
                yield answer
        finally:
            call.cancel()  # the consumer stopped early: end the stream, not just our reading

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


# -- the server side ---------------------------------------------------------------------------

class Refuse(Exception):
    """Raised by a handler to end its call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class CallInfo:
    """What a handler knows of its call besides the request: its metadata, request id and the
    seconds its deadline left when it arrived (None: no deadline)."""

    __slots__ = ("metadata", "request_id", "context", "deadline")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        self.deadline: float | None = context.time_remaining()
        self.metadata = _fields(context.invocation_metadata())
        # Behind a sidecar every call has one (spec §4); a call made directly starts its own.
        self.metadata.setdefault("x-request-id", uuid.uuid4().hex)
        self.request_id = self.metadata["x-request-id"]

    def propagated(self) -> dict[str, str]:
        """The headers to send on calls made while serving this one."""
        return {name: self.metadata[name] for name in PROPAGATED if name in self.metadata}


Unary = Callable[[Any, CallInfo], Awaitable[Any]]
ServerStream = Callable[[Any, CallInfo], AsyncIterator[Any]]


def _log(instance: str, method: str, code: grpc.StatusCode, started: float, info: CallInfo,
         extra: str = "") -> None:
    # The HTTP apps' line, with the gRPC status where they have the HTTP one, and the deadline
    # the call came with (`grpc-timeout`: the caller's, or less when its sidecar cut it).
    trace = trace_id(info.metadata)
    deadline = f" deadline={info.deadline:.3f}s" if info.deadline is not None else ""
    log.info("%s gRPC %s %s %.1fms rid=%s%s%s%s", instance, method, code.name,
             (time.perf_counter() - started) * 1000, info.request_id,
             f" trace={trace}" if trace else "", deadline, extra)


def unary_handler(instance: str, method: str, fn: Unary) -> grpc.RpcMethodHandler:
    """Return the handler of a unary method: JSON messages, Refuse as the call's status, one
    log line per call."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, info = time.perf_counter(), CallInfo(context)
        try:
            answer = await fn(request, info)
        except Refuse as refusal:
            _log(instance, method, refusal.code, started, info, f" ({refusal.message})")
            await context.abort(refusal.code, refusal.message)
        except asyncio.CancelledError:
            _log(instance, method, grpc.StatusCode.CANCELLED, started, info)
            raise
        except Exception:  # grpcio answers UNKNOWN; the log says why
            _log(instance, method, grpc.StatusCode.UNKNOWN, started, info)
            log.exception("%s %s failed", instance, method)
            raise
        _log(instance, method, grpc.StatusCode.OK, started, info)
        return answer

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=decode,
                                               response_serializer=encode)


def server_stream_handler(instance: str, method: str, fn: ServerStream) -> grpc.RpcMethodHandler:
    """Return the handler of a server-streaming method, as unary_handler does."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started, info = time.perf_counter(), CallInfo(context)
        sent = 0
        try:
            async for answer in fn(request, info):
                sent += 1
                yield answer
        except Refuse as refusal:
            _log(instance, method, refusal.code, started, info, f" ({refusal.message}) sent={sent}")
            await context.abort(refusal.code, refusal.message)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            _log(instance, method, grpc.StatusCode.CANCELLED, started, info, f" sent={sent}")
            raise
        except Exception:
            _log(instance, method, grpc.StatusCode.UNKNOWN, started, info, f" sent={sent}")
            log.exception("%s %s failed", instance, method)
            raise
        _log(instance, method, grpc.StatusCode.OK, started, info, f" sent={sent}")

    return grpc.unary_stream_rpc_method_handler(handle, request_deserializer=decode,
                                                response_serializer=encode)


async def serve(settings: Settings, handlers: list[grpc.GenericRpcHandler],
                on_stop: Callable[[], None] | None = None) -> None:
    """Serve `handlers` on the settings' host and port until SIGINT or SIGTERM, then finish the
    calls in flight (5 s at most). Raises RuntimeError when the port cannot be bound."""
    # grpcio sets SO_REUSEPORT by default: a second server on a taken port would silently
    # share it. Off, a clash fails at start like the HTTP apps'.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(handlers)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.add_insecure_port(f"{host}:{settings.port}")
    await server.start()
    log.info("%s (%s) serving gRPC on %s:%d", settings.instance, settings.role, settings.host,
             settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    if on_stop is not None:
        on_stop()
    await server.stop(grace=5.0)
