"""A gRPC server for the benchmarks (grpcio), with raw-bytes messages so no generated code is
needed: service `demo.Echo`, method `Unary`, which answers `NAME:REQUEST` (NAME from
`--name`, so a client can tell which backend answered).

    python grpc_app.py --port 0 --name b0      # prints `listening PORT` once it serves

It runs on grpcio's asyncio server (`--server aio`, the cheaper of the two per call on this
machine) or its thread-pool server (`--server sync`). It stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from concurrent import futures

import grpc

SERVICE = "demo.Echo"
METHOD = f"/{SERVICE}/Unary"


def _identity(data: bytes) -> bytes:
    return data


def _handlers(name: bytes, unary) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity)})


OPTIONS = [("grpc.so_reuseport", 0)]


async def serve_aio(args: argparse.Namespace) -> None:
    name = args.name.encode() + b":"

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return name + request

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(name, unary),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=None)


def serve_sync(args: argparse.Namespace) -> None:
    name = args.name.encode() + b":"

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(name, unary),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"listening {port}", flush=True)
    done = futures.Future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.done() or done.set_result(None))
    while not done.done():
        try:
            done.result(timeout=0.5)
        except futures.TimeoutError:
            pass
    server.stop(grace=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--name", default="app", help="prefix of every answer")
    p.add_argument("--server", choices=("aio", "sync"), default="aio")
    p.add_argument("--workers", type=int, default=8, help="threads of the sync server")
    args = p.parse_args(argv)
    if args.server == "aio":
        asyncio.run(serve_aio(args))
    else:
        serve_sync(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
