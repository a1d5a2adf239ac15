"""Draining (spec §2 `POST /drain`, §3 "drain on SIGTERM or /drain"): stop accepting, finish
what is in flight, close idle connections, exit 0 within the drain timeout."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid

import pytest
import requests

from support.proxy import ProxyProcess, mesh_yaml, wait_for
from support.rawhttp import Conn, get

DRAIN_TIMEOUT = 8.0
SLOW_MS = 1200


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # A connection that raced the listener's close (accepted into the kernel's backlog,
        # then reset): not an answer yet; the next attempt tells.
        return False
    return False


def start_in_flight(proxy: ProxyProcess, backend, n: int) -> tuple[list, list[threading.Thread]]:
    """Start n slow requests, each on its own connection; return once the backend has all."""
    tag = uuid.uuid4().hex
    results: list = []

    def call(i: int) -> None:
        try:
            response = requests.get(f"http://127.0.0.1:{proxy.outbound}/slow/{SLOW_MS}?{tag}={i}",
                                    headers={"Host": "web"}, timeout=20)
            results.append((response.status_code, response.content,
                            response.headers.get("connection")))
        except requests.RequestException as exc:  # reported by the assertion on results
            results.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(backend.requests(f"/slow/{SLOW_MS}?{tag}")) == n,
             what=f"{n} requests in flight")
    return results, threads


def idle_keep_alive_connection(proxy: ProxyProcess) -> Conn:
    conn = Conn(proxy.outbound)
    assert conn.request(get("web", "/echo")).status == 200
    return conn


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("how", ["SIGTERM", "POST /drain"])
def test_drain_finishes_in_flight_requests_and_exits(proxy_factory, backend, loop, how):
    proxy = proxy_factory(mesh_yaml({"web": [backend.address]}), uvloop=loop == "uvloop",
                          drain_timeout=DRAIN_TIMEOUT)
    idle = idle_keep_alive_connection(proxy)
    results, threads = start_in_flight(proxy, backend, 3)

    started = time.monotonic()
    if how == "SIGTERM":
        proxy.signal(signal.SIGTERM)
    else:
        assert proxy.admin_get("/drain", method="POST")[0] == 202

    # New connections are refused at once; idle keep-alive connections are closed.
    wait_for(lambda: refused(proxy.outbound), timeout=3, what="the outbound port to refuse")
    wait_for(lambda: refused(proxy.inbound), timeout=3, what="the inbound port to refuse")
    assert idle.at_eof(timeout=3)
    idle.close()

    for thread in threads:
        thread.join(15)
    # Every in-flight request completes, and tells its client the connection ends.
    assert results == [(200, b"slow %d\n" % SLOW_MS, "close")] * 3
    assert proxy.wait(DRAIN_TIMEOUT + 2) == 0
    assert time.monotonic() - started < DRAIN_TIMEOUT


def test_drain_timeout_cuts_what_is_still_running(proxy_factory, backend):
    proxy = proxy_factory(mesh_yaml({"web": [backend.address]}), drain_timeout=1.0)
    tag = uuid.uuid4().hex
    outcome: list = []

    def call() -> None:
        try:
            requests.get(f"http://127.0.0.1:{proxy.outbound}/slow/10000?{tag}",
                         headers={"Host": "web"}, timeout=20)
            outcome.append("answered")
        except requests.ConnectionError:
            outcome.append("connection broken")

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: backend.requests(f"/slow/10000?{tag}"), what="the request in flight")
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(10) == 0
    assert time.monotonic() - started < 3
    thread.join(10)
    assert outcome == ["connection broken"]
