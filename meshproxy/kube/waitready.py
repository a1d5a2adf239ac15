"""`meshproxy wait-ready`: wait until the proxy in this pod is ready.

A classic sidecar (a pod without native sidecars) is an ordinary container: the kubelet starts
the app right after it, and the app's first outbound connections would be redirected to a proxy
that is not listening yet, or has no configuration or certificate yet. The kubelet starts the
containers of a pod in order and holds the next one until the previous one's `postStart` hook
has returned, so injection gives the classic proxy this command as its `postStart` hook: the
app starts once the proxy answers `/ready` on its health port (spec §2: 15021), or the hook
fails after `--timeout` and the kubelet restarts the proxy container.

Plain `http.client`: the hook runs in the proxy's container, under its memory limit, and should
cost next to nothing.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from typing import Callable, TextIO

DEFAULT_HEALTH_PORT = 15021
POLL_INTERVAL = 0.2


def ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether GET /ready on host:port answers 200 now (any failure: False)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_until_ready(host: str, port: int, timeout: float, *,
                     probe: Callable[[str, int], bool] = ready,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> bool:
    """Poll `probe` every POLL_INTERVAL seconds; return True once it answers True, False when
    `timeout` seconds have passed without it."""
    deadline = clock() + timeout
    while True:
        if probe(host, port):
            return True
        if clock() >= deadline:
            return False
        sleep(min(POLL_INTERVAL, max(deadline - clock(), 0.0)))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "wait-ready",
        help="wait until the pod's proxy is ready (a classic sidecar's postStart hook)",
        description="Poll the proxy's GET /ready on the health port until it answers 200. "
        "Exit 0 when it does, 1 after --timeout.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_HEALTH_PORT, help="the proxy's health port")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    return p


def run(args: argparse.Namespace, *, err: TextIO = sys.stderr) -> int:
    """Entry point of `meshproxy wait-ready`; return the exit code."""
    if wait_until_ready(args.host, args.port, args.timeout):
        return 0
    print(f"meshproxy wait-ready: the proxy at {args.host}:{args.port} was not ready within "
          f"{args.timeout:g}s", file=err)
    return 1
