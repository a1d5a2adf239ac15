"""A real gRPC server (grpcio) for the tests, with raw-bytes messages, so no generated code is
needed: service `demo.Echo` with one method of each kind, plus the standard health service
and server reflection (grpcio-health-checking, grpcio-reflection).

- `Unary`: answers `NAME:REQUEST` (NAME: the server's name), or, when the request is
  `fail-N`, the status N (as trailers-only, since nothing was sent before);
  `sleep-MS` answers after MS milliseconds; `hang` never answers (until cancelled).
- `ServerStream`: the request is a count N: N messages `NAME:i`.
- `ClientStream`: answers `NAME:` + the number of messages and bytes received.
- `Bidi`: echoes each message as `NAME:message`.
- `Blob`: the request is a count N: N messages of 1 MiB each (bulk streaming).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

SERVICE = "demo.Echo"


def _identity(data: bytes) -> bytes:
    return data


class GrpcApp:
    """A grpcio server on 127.0.0.1:<free port>. Use start()/stop()."""

    def __init__(self, name: str = "app", max_streams: int | None = None) -> None:
        """`max_streams`: the server's SETTINGS_MAX_CONCURRENT_STREAMS (grpcio: no limit)."""
        self.name = name
        self.max_streams = max_streams
        self.port = 0
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []  # each call's deadline, as the app sees it
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _count(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            self.metadata.append({k: v for k, v in context.invocation_metadata()
                                  if isinstance(v, str)})
            self.time_remaining.append(context.time_remaining())

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count(context)
        text = request.decode()
        if text.startswith("fail-"):
            context.abort(grpc.StatusCode(_status(int(text[5:]))), f"{self.name} failed")
        if text.startswith("sleep-"):
            time.sleep(int(text[6:]) / 1000)
        if text == "hang":
            while context.is_active():
                time.sleep(0.01)
            return b""
        return f"{self.name}:{text}".encode()

    def _server_stream(self, request: bytes, context: grpc.ServicerContext):
        self._count(context)
        for i in range(int(request.decode())):
            yield f"{self.name}:{i}".encode()

    def _client_stream(self, requests, context: grpc.ServicerContext) -> bytes:
        self._count(context)
        count = size = 0
        for message in requests:
            count += 1
            size += len(message)
        return f"{self.name}:{count}:{size}".encode()

    def _blob(self, request: bytes, context: grpc.ServicerContext):
        self._count(context)
        chunk = b"\xa5" * (1 << 20)
        for _ in range(int(request.decode())):
            yield chunk

    def _bidi(self, requests, context: grpc.ServicerContext):
        self._count(context)
        for message in requests:
            yield f"{self.name}:".encode() + message

    def start(self) -> "GrpcApp":
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary, _identity, _identity),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream, _identity,
                                                                 _identity),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream, _identity,
                                                                 _identity),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi, _identity, _identity),
            "Blob": grpc.unary_stream_rpc_method_handler(self._blob, _identity, _identity),
        }
        options = [] if self.max_streams is None else [
            ("grpc.max_concurrent_streams", self.max_streams)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        # The standard health service (SERVING) and server reflection, as real apps run them.
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.health = health.HealthServicer()
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None


def _status(code: int) -> tuple:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.value
    raise ValueError(code)


def stub(channel: grpc.Channel, method: str, kind: str = "unary_unary"):
    """A callable for `demo.Echo/METHOD` on `channel` with raw-bytes messages."""
    make = getattr(channel, kind)
    return make(f"/{SERVICE}/{method}", request_serializer=_identity,
                response_deserializer=_identity)


def main() -> None:
    """`python -m support.grpcapp NAME`: a GrpcApp in a process of its own (so that a test
    can kill it, or stop it with SIGTERM: a graceful stop, GOAWAY first); prints its port."""
    import signal
    import sys

    app = GrpcApp(sys.argv[1] if len(sys.argv) > 1 else "app").start()
    print(app.port, flush=True)
    stopped = threading.Event()

    def graceful(*_: object) -> None:
        server = app._server
        if server is not None:
            server.stop(grace=5).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, graceful)
    stopped.wait()


if __name__ == "__main__":
    main()
