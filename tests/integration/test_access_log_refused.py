"""The access log's lines for requests a sidecar answers before they have a complete head:
400 `bad-request` (malformed), 431 `headers-too-large`, 408 `header-timeout` (a head that
stalls). Sent from raw sockets, read from the log file as a user would; each line is found by
the client's own address (`peer`), the one thing such a request is known by.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from support.proxy import ProxyProcess, mesh_yaml, wait_for
from support.rawhttp import Conn, get

HEADER_TIMEOUT = 0.5


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def logged(request, tmp_path_factory, backend):
    """(proxy, its access-log file): Service `web` is the backend; the header timeout short."""
    tmp = tmp_path_factory.mktemp(f"refused-{request.param}")
    log = tmp / "access.log"
    proxy = ProxyProcess(tmp, mesh_yaml({"web": [backend.address]}), service="web",
                         app_port=backend.port, uvloop=request.param == "uvloop",
                         extra_args=["--access-log", str(log),
                                     "--header-timeout", str(HEADER_TIMEOUT)]).start()
    yield proxy, log
    proxy.stop()


def line_from(log: Path, peer: str) -> dict:
    """Wait for the line whose client address is `peer`; return it parsed."""
    def find():
        if not log.exists():
            return None
        for text in log.read_text().splitlines():
            entry = json.loads(text)  # every line is one JSON object
            if entry.get("peer") == peer:
                return entry
        return None
    return wait_for(find, timeout=10, what=f"the access log line of {peer}")


def peer_of(conn: Conn) -> str:
    host, port = conn.sock.getsockname()[:2]
    return f"{host}:{port}"


def assert_refused_line(entry: dict, direction: str, status: int, reason: str,
                        before: float) -> None:
    assert entry["status"] == status and entry["error"] == reason
    assert entry["direction"] == direction
    # Nothing is known of a request without a head: no trace, method, path or upstream.
    assert entry["trace_id"] == entry["span_id"] == entry["method"] == ""
    assert entry["parent_span_id"] is entry["request_id"] is entry["authority"] is None
    assert entry["path"] is None and entry["upstream"] is None
    assert entry["attempts"] == 0 and entry["bytes_in"] == entry["bytes_out"] == 0
    assert entry["service"] == "unknown" and entry["route"] == "default"
    logged = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= logged <= time.time() + 1


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_a_malformed_request_gets_a_400_line(logged, direction) -> None:
    proxy, log = logged
    before = time.time()
    with Conn(proxy.outbound if direction == "outbound" else proxy.inbound) as conn:
        peer = peer_of(conn)
        response = conn.request(b"GET / HTTP/1.1\r\nHost: web\r\nX-A: a\x00b\r\n\r\n")
        assert response.status == 400 and response.error == "bad-request"
        assert conn.at_eof()
    assert_refused_line(line_from(log, peer), direction, 400, "bad-request", before)


def test_headers_over_64_kib_get_a_431_line(logged) -> None:
    proxy, log = logged
    before = time.time()
    filler = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(70))
    with Conn(proxy.outbound) as conn:
        peer = peer_of(conn)
        response = conn.request(get("web", "/", headers=filler))
        assert response.status == 431 and response.error == "headers-too-large"
    assert_refused_line(line_from(log, peer), "outbound", 431, "headers-too-large", before)


def test_a_stalled_request_head_gets_a_408_line(logged) -> None:
    proxy, log = logged
    before = time.time()
    with Conn(proxy.outbound) as conn:
        peer = peer_of(conn)
        conn.send(b"GET /stall HTTP/1.1\r\nHost: web\r\n")
        response = conn.read()
        assert response.status == 408 and response.error == "header-timeout"
    entry = line_from(log, peer)
    assert_refused_line(entry, "outbound", 408, "header-timeout", before)
    # From the head's first bytes to the answer: the header timeout.
    assert HEADER_TIMEOUT * 1000 * 0.8 <= entry["duration_ms"] < (HEADER_TIMEOUT + 3) * 1000


def test_a_complete_request_still_gets_its_usual_line(logged) -> None:
    proxy, log = logged
    path = f"/echo?case={time.monotonic_ns()}"
    with Conn(proxy.inbound) as conn:
        assert conn.request(get("web", path)).status == 200
        client = "%s:%d" % conn.sock.getsockname()[:2]

    def find():
        for text in log.read_text().splitlines() if log.exists() else ():
            entry = json.loads(text)
            if entry["path"] == path:
                return entry
        return None
    entry = wait_for(find, timeout=10, what=f"the access log line of {path}")
    assert entry["status"] == 200 and entry["method"] == "GET" and entry["error"] is None
    assert entry["service"] == "web.default"
    assert entry["peer"] == client
