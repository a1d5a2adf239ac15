"""Malformed, ambiguous and hostile input, and broken upstreams (spec §4 error table).

Ambiguous framing must be refused with 400 before a single byte reaches a backend: the raw
backend behind Service `raw` records every connection and byte, and must see none.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import requests

from support.proxy import ProxyProcess, closed_port, mesh_yaml, wait_for
from support.rawbackend import RawBackend
from support.rawhttp import Conn, get

HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def raw() -> RawBackend:
    server = RawBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hangup() -> RawBackend:
    """Accepts, reads a request, and closes without answering."""
    server = RawBackend(None).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def liar() -> RawBackend:
    """Answers whatever broken response a test sets."""
    server = RawBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(request, tmp_path_factory, backend, raw, hangup, liar) -> ProxyProcess:
    mesh = mesh_yaml({
        "web": [backend.address],
        "raw": [raw.address],
        "dead": [f"127.0.0.1:{closed_port()}"],
        "hangup": [hangup.address],
        "liar": [liar.address],
        "empty": [],
    })
    running = ProxyProcess(tmp_path_factory.mktemp(request.param), mesh,
                           uvloop=request.param == "uvloop",
                           extra_args=["--header-timeout", str(HEADER_TIMEOUT),
                                       "--client-idle-timeout", str(IDLE_TIMEOUT)]).start()
    yield running
    running.stop()


def post(headers: str, body: bytes = b"", version: str = "1.1") -> bytes:
    return f"POST /target HTTP/{version}\r\n{headers}\r\n".encode("latin-1") + body


AMBIGUOUS = {
    "content-length-and-chunked": post(
        "Host: raw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "chunked-and-content-length": post(
        "Host: raw\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "differing-content-lengths": post(
        "Host: raw\r\nContent-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    "transfer-encoding-gzip": post("Host: raw\r\nTransfer-Encoding: gzip\r\n", b"xxxxx"),
    "transfer-encoding-gzip-chunked": post(
        "Host: raw\r\nTransfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
    "transfer-encoding-chunked-identity": post(
        "Host: raw\r\nTransfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    "transfer-encoding-on-http10": post(
        "Host: raw\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n", "1.0"),
    "bad-chunk-size": post(
        "Host: raw\r\nTransfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(
        "Host: raw\r\nTransfer-Encoding: chunked\r\n", b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
    "obs-fold": post("Host: raw\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n"),
    "bare-lf": b"GET /target HTTP/1.1\nHost: raw\n\n",
    "bare-lf-in-headers": post("Host: raw\r\nX-A: 1\nX-B: 2\r\nContent-Length: 0\r\n"),
    "bare-cr": post("Host: raw\r\nX-A: 1\rX-B: 2\r\nContent-Length: 0\r\n"),
    "nul-in-value": post("Host: raw\r\nX-A: a\x00b\r\nContent-Length: 0\r\n"),
    "missing-host": post("Content-Length: 0\r\n"),
    "two-hosts": post("Host: raw\r\nHost: web\r\nContent-Length: 0\r\n"),
    "space-before-colon": post(
        "Host: raw\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n", b"0\r\n\r\n"),
    "smuggled-request-cl-te": post(
        "Host: raw\r\nContent-Length: 43\r\nTransfer-Encoding: chunked\r\n",
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: raw\r\n\r\n"),
    "smuggled-request-te-cl": post(
        "Host: raw\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        b"2b\r\nGET /smuggled HTTP/1.1\r\nHost: raw\r\nX: \r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_ambiguous_framing_is_refused_and_never_forwarded(proxy, raw, case):
    before = (raw.connections, raw.data())
    with Conn(proxy.outbound) as conn:
        response = conn.request(AMBIGUOUS[case])
        assert response.status == 400
        assert response.error == "bad-request"
        assert response.header("connection") == "close"
        assert conn.at_eof()
    assert (raw.connections, raw.data()) == before
    assert b"smuggled" not in raw.data()


def test_the_same_request_well_formed_does_reach_the_raw_backend(proxy, raw):
    # The control for the test above: Service `raw` is reachable, so "nothing arrived" means
    # the proxy refused the request, not that it could not have sent it.
    before = raw.requests
    with Conn(proxy.outbound) as conn:
        response = conn.request(post("Host: raw\r\nContent-Length: 5\r\n", b"hello"))
    assert (response.status, response.body) == (200, b"ok")
    assert raw.requests == before + 1


def test_a_bad_request_pipelined_after_good_ones(proxy, raw):
    # The good requests sent before it in the same write are answered; the malformed one is
    # never forwarded, and the connection ends after the last good answer.
    before = raw.requests
    with Conn(proxy.outbound) as conn:
        conn.send(post("Host: raw\r\nContent-Length: 2\r\n", b"ok")
                  + post("Host: raw\r\nContent-Length: 3\r\n", b"two")
                  + AMBIGUOUS["smuggled-request-cl-te"])
        for _ in range(2):
            response = conn.read()
            assert (response.status, response.body) == (200, b"ok")
        assert conn.at_eof()
    assert raw.requests == before + 2
    assert b"smuggled" not in raw.data()


def test_headers_over_64_kib_get_431(proxy, raw):
    before = raw.connections
    filler = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(70))
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("raw", "/", headers=filler))
    assert response.status == 431
    assert response.error == "headers-too-large"
    assert raw.connections == before


def test_headers_just_under_the_limit_pass(proxy, backend):
    filler = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(60))
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/headers", headers=filler))
    assert response.status == 200


def test_a_stalled_request_head_gets_408(proxy, raw):
    before = raw.connections
    with Conn(proxy.outbound) as conn:
        conn.send(b"GET /stall HTTP/1.1\r\nHost: raw\r\n")
        started = time.monotonic()
        response = conn.read()
        waited = time.monotonic() - started
        assert response.status == 408
        assert response.error == "header-timeout"
        assert conn.at_eof()
    assert HEADER_TIMEOUT * 0.8 <= waited < HEADER_TIMEOUT + 3
    assert raw.connections == before


def test_an_idle_client_connection_is_closed_silently(proxy):
    with Conn(proxy.outbound) as conn:
        assert conn.request(get("web", "/echo")).status == 200
        started = time.monotonic()
        assert conn.at_eof(timeout=IDLE_TIMEOUT + 3)  # no 408: nothing was being sent
        assert time.monotonic() - started >= IDLE_TIMEOUT * 0.8


@pytest.mark.parametrize("answer", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
], ids=["garbage", "length-and-chunked", "head-over-64k", "two-lengths"])
def test_a_broken_upstream_response_gets_502_upstream_protocol_error(proxy, liar, answer):
    liar.response, liar.close_after = answer, False
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("liar", "/"))
        assert response.status == 502
        assert response.error == "upstream-protocol-error"
        assert b"garbage" not in response.body and b"vvvv" not in response.body
        # The client's connection was not the one at fault: it goes on.
        assert conn.request(get("web", "/echo")).status == 200


def test_an_upstream_body_cut_short_breaks_the_client_connection(proxy, liar):
    # The head (with its length) was already forwarded: the only honest signal left is a
    # connection that ends before the promised bytes.
    liar.response, liar.close_after = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..", True
    with Conn(proxy.outbound) as conn:
        conn.send(get("liar", "/"))
        with pytest.raises(ConnectionError):
            conn.read()
    assert requests.get(f"http://127.0.0.1:{proxy.outbound}/echo", headers={"Host": "web"},
                        timeout=10).status_code == 200


@pytest.mark.parametrize("when", ["same-write", "while-the-answer-streams"])
def test_bytes_after_a_refused_upgrade_never_reach_the_backend(proxy, liar, when):
    # The backend answers the upgrade request with a plain (large) 200. The client sends a
    # second request on the same connection, with the upgrade request or while the answer
    # streams: after an Upgrade request those bytes belong to a protocol that never started,
    # so they must be dropped.
    body = b"x" * (20 * 1024 * 1024)
    liar.response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    liar.close_after = False
    before = liar.requests
    upgrade = get("liar", "/upgrade", headers="Connection: Upgrade\r\nUpgrade: websocket\r\n")
    with Conn(proxy.outbound) as conn:
        if when == "same-write":
            conn.send(upgrade + get("liar", "/smuggled"))
            assert conn.file.readline().startswith(b"HTTP/1.1 200")
        else:
            conn.send(upgrade)
            assert conn.file.readline().startswith(b"HTTP/1.1 200")
            conn.send(get("liar", "/smuggled"))
        rest = conn.file.read()  # the proxy ends the connection after the refused upgrade
        assert rest.endswith(body)
    # A request after it, through the same pooled upstream connection, marks the point by
    # which anything forwarded earlier has arrived.
    liar.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert requests.get(f"http://127.0.0.1:{proxy.outbound}/after", headers={"Host": "liar"},
                        timeout=10).content == b"ok"
    assert liar.requests == before + 2
    assert b"/smuggled" not in liar.data()


def test_instance_port_closed_gets_502_connect_failure(proxy):
    response = requests.get(f"http://127.0.0.1:{proxy.outbound}/", headers={"Host": "dead"},
                            timeout=10)
    assert response.status_code == 502
    assert response.headers["x-meshproxy-error"] == "connect-failure"


def test_backend_closing_without_an_answer_gets_502_upstream_reset(proxy, hangup):
    before = hangup.requests
    response = requests.get(f"http://127.0.0.1:{proxy.outbound}/", headers={"Host": "hangup"},
                            timeout=10)
    assert response.status_code == 502
    assert response.headers["x-meshproxy-error"] == "upstream-reset"
    assert hangup.requests > before  # the request did reach it


def test_service_without_instances_gets_503_no_endpoints(proxy):
    response = requests.get(f"http://127.0.0.1:{proxy.outbound}/", headers={"Host": "empty"},
                            timeout=10)
    assert response.status_code == 503
    assert response.headers["x-meshproxy-error"] == "no-endpoints"


def _misbehave(port: int) -> socket.socket:
    """Garbage, a client that leaves mid-body, a client that stalls, a client that resets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 8)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(get("web", "/upload", method="POST", headers="Content-Length: 1000000\r\n")
                  + b"x" * 10000)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(get("web", "/upload", method="POST",
                      headers="Transfer-Encoding: chunked\r\n") + b"10\r\n0123")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    stalled.sendall(b"GET /echo HTTP/1.1\r\nHo")
    return stalled


def test_misbehaving_clients_do_not_disturb_others(proxy, backend):
    path = f"/slow/400?{uuid.uuid4().hex}"
    results: list = []

    def normal() -> None:
        response = requests.get(f"http://127.0.0.1:{proxy.outbound}{path}",
                                headers={"Host": "web"}, timeout=10)
        results.append((response.status_code, response.content))

    thread = threading.Thread(target=normal)
    thread.start()
    wait_for(lambda: backend.requests(path), what="the normal request to be in flight")
    stalled = _misbehave(proxy.outbound)
    try:
        thread.join(10)
        assert results == [(200, b"slow 400\n")]
        # The proxy is up and keeps serving new connections.
        assert proxy.process.poll() is None
        assert proxy.admin_get("/ready")[0] == 200
        for _ in range(3):
            response = requests.post(f"http://127.0.0.1:{proxy.outbound}/echo", data=b"after",
                                     headers={"Host": "web"}, timeout=10)
            assert (response.status_code, response.content) == (200, b"after")
    finally:
        stalled.close()
