"""HTTP/1.1 forwarding through a real `meshproxy proxy` process (spec §4), as a client sees it.

Every test runs against the proxy on uvloop (the default) and on the standard asyncio loop.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import websockets.sync.client

from support.backend import pattern
from support.proxy import ProxyProcess, mesh_yaml, wait_for
from support.rawbackend import RawBackend
from support.rawhttp import Conn, get

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HOP_BY_HOP = {"connection", "keep-alive", "te", "upgrade", "proxy-connection", "trailer",
              "transfer-encoding"}


@pytest.fixture(scope="module")
def raw() -> RawBackend:
    """One raw backend for the module; each test sets how it answers."""
    server = RawBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(request, tmp_path_factory, backend, backend_b, raw) -> ProxyProcess:
    """A proxy for Service `web` (instance web-0 is the backend, so inbound goes there too)."""
    mesh = mesh_yaml({
        "web": [backend.address],
        "pair": [backend.address, backend_b.address],
        "raw": [raw.address],
        "empty": [],
    })
    running = ProxyProcess(tmp_path_factory.mktemp(request.param), mesh, service="web",
                           instance="web-0", uvloop=request.param == "uvloop").start()
    yield running
    running.stop()


@pytest.fixture
def fresh_raw(raw) -> RawBackend:
    raw.response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    raw.close_after = False
    return raw


def url(proxy: ProxyProcess, path: str, port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or proxy.outbound}{path}"


def marker() -> str:
    return uuid.uuid4().hex


# -- destination ------------------------------------------------------------------------------

@pytest.mark.parametrize("authority", [
    "web", "web:80", "web.default", "web.default:80", "web.default.svc", "web.default.svc:80",
    "web.default.svc.cluster.local", "web.default.svc.cluster.local:80", "WEB.Default.Svc",
])
def test_every_authority_form_reaches_the_service(proxy, backend, authority):
    tag = marker()
    response = requests.get(url(proxy, f"/echo?{tag}"), headers={"Host": authority}, timeout=10)
    assert response.status_code == 200
    assert response.headers["x-backend"] == "a"
    [seen] = backend.requests(f"/echo?{tag}")
    # The authority sent upstream is the one received (spec §3).
    assert seen.header("host") == authority


def test_absolute_form_works_as_http_proxy(proxy, backend):
    tag = marker()
    response = requests.get(f"http://web.default/echo?{tag}", timeout=10,
                            proxies={"http": f"http://127.0.0.1:{proxy.outbound}"})
    assert response.status_code == 200
    [seen] = backend.requests(f"/echo?{tag}")
    assert seen.path == f"/echo?{tag}"  # origin form upstream
    assert seen.header("host") == "web.default"


def test_inbound_goes_to_this_instances_app(proxy, backend):
    tag = marker()
    response = requests.post(url(proxy, f"/echo?{tag}", proxy.inbound), data=b"to the app",
                             timeout=10)
    assert response.status_code == 200
    assert response.content == b"to the app"
    assert response.headers["x-backend"] == "a"
    assert backend.requests(f"/echo?{tag}")[0].body_len == 10


def test_unknown_host_passes_through_under_allow_any(proxy, fresh_raw):
    before = fresh_raw.requests
    response = requests.get(url(proxy, "/anything"), headers={"Host": fresh_raw.address},
                            timeout=10)
    assert (response.status_code, response.content) == (200, b"ok")
    assert fresh_raw.requests == before + 1
    assert f"Host: {fresh_raw.address}".encode() in fresh_raw.data()


def test_unknown_host_is_502_under_registry_only(proxy_factory, raw_backend, backend, proxy):
    # A fresh proxy (REGISTRY_ONLY, inbound to --app-port), so its counters hold exactly the
    # requests of this test.
    raw = raw_backend()
    strict = proxy_factory(mesh_yaml({"web": [backend.address]}, policy="REGISTRY_ONLY"),
                           service="front", app_port=backend.port, uvloop=proxy.uvloop)
    response = requests.get(url(strict, "/x"), headers={"Host": raw.address}, timeout=10)
    assert response.status_code == 502
    assert response.headers["x-meshproxy-error"] == "unknown-destination"
    assert raw.connections == 0
    assert requests.get(url(strict, "/echo"), headers={"Host": "web"}, timeout=10).ok
    inbound = requests.get(url(strict, "/echo", strict.inbound), timeout=10)
    assert (inbound.status_code, inbound.headers["x-backend"]) == (200, "a")

    def requests_total():
        return {(dict(labels)["direction"], dict(labels)["service"], dict(labels)["code"]): value
                for (name, labels), value in strict.metrics().items()
                if name == "meshproxy_requests_total"}

    wait_for(lambda: sum(requests_total().values()) == 3, timeout=5, what="3 requests counted")
    counts = requests_total()
    assert counts[("outbound", "web.default", "200")] == 1
    assert counts[("inbound", "front.default", "200")] == 1
    assert [code for (direction, _, code), n in counts.items()
            if direction == "outbound" and n and code != "200"] == ["502"]


def test_load_is_spread_over_both_instances(proxy, backend, backend_b):
    tag = marker()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda i: requests.get(url(proxy, f"/slow/300?{tag}={i}"), headers={"Host": "pair"},
                                   timeout=10).status_code,
            range(8)))
    assert codes == [200] * 8
    on_a, on_b = len(backend.requests(f"/slow/300?{tag}")), len(backend_b.requests(f"/slow/300?{tag}"))
    assert on_a + on_b == 8
    assert on_a >= 2 and on_b >= 2, (on_a, on_b)


# -- headers ----------------------------------------------------------------------------------

def test_request_id_added_when_absent_and_kept_when_present(proxy, backend):
    with requests.Session() as session:
        added = session.get(url(proxy, "/headers"), headers={"Host": "web"}, timeout=10).json()
        kept = session.get(url(proxy, "/headers"), headers={"Host": "web",
                                                            "X-Request-Id": "abc-123"},
                           timeout=10).json()
    ids = [v for k, v in added if k.lower() == "x-request-id"]
    assert len(ids) == 1 and UUID.match(ids[0]), ids
    assert [v for k, v in kept if k.lower() == "x-request-id"] == ["abc-123"]


def test_hop_by_hop_request_headers_are_not_forwarded(proxy, backend):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/headers", headers=(
            "Connection: keep-alive, X-Hop-Named\r\n"
            "Keep-Alive: timeout=5\r\n"
            "TE: trailers\r\n"
            "Upgrade: h2c\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "X-Hop-Named: secret\r\n"
            "X-End-To-End: kept\r\n")))
    assert response.status == 200
    received = {k.lower(): v for k, v in json.loads(response.body)}
    assert received["x-end-to-end"] == "kept"
    assert not received.keys() & (HOP_BY_HOP | {"x-hop-named"}), received


def test_hop_by_hop_response_headers_are_not_forwarded(proxy, fresh_raw):
    fresh_raw.response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Resp-Hop\r\n"
        b"X-Resp-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n"
        b"Trailer: X-Checksum\r\n"
        b"X-End-To-End: kept\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("raw", "/"))
        assert (response.status, response.body) == (200, b"ok")
        assert response.header("x-end-to-end") == "kept"
        assert not response.names & (HOP_BY_HOP - {"connection"} | {"x-resp-hop"})
        assert "x-resp-hop" not in (response.header("connection") or "").lower()
        # The client connection is still usable.
        assert conn.request(get("raw", "/")).body == b"ok"


# -- connections ------------------------------------------------------------------------------

def test_one_upstream_connection_serves_many_sequential_requests(proxy, backend):
    tag = marker()
    with Conn(proxy.outbound) as conn:
        for i in range(50):
            response = conn.request(get("web", f"/echo?{tag}={i}", method="POST", body=b"%d" % i))
            assert (response.status, response.body) == (200, b"%d" % i)
    seen = backend.requests(f"/echo?{tag}")
    assert len(seen) == 50
    assert len({r.peer_port for r in seen}) == 1


def test_pipelined_requests_are_answered_in_order(proxy, backend):
    with Conn(proxy.outbound) as conn:
        conn.send(get("web", "/slow/100") + get("web", "/echo", method="POST", body=b"second")
                  + get("web", "/status/201"))
        first, second, third = conn.read(), conn.read(), conn.read()
    assert (first.status, first.body) == (200, b"slow 100\n")
    assert (second.status, second.body) == (200, b"second")
    assert second.header("x-echo-method") == "POST"
    assert third.status == 201


def test_http10_client_without_keep_alive_is_closed_after_the_response(proxy):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/echo", version="1.0", method="POST", body=b"ten"))
        assert (response.status, response.body) == (200, b"ten")
        assert conn.at_eof()


def test_http10_client_with_keep_alive_keeps_its_connection(proxy):
    with Conn(proxy.outbound) as conn:
        for body in (b"one", b"two"):
            response = conn.request(get("web", "/echo", version="1.0", method="POST", body=body,
                                        headers="Connection: keep-alive\r\n"))
            assert (response.status, response.body) == (200, body)
            assert response.header("connection").lower() == "keep-alive"
            assert response.framing == "length"


def test_http10_client_gets_a_chunked_upstream_body_delimited_by_close(proxy):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/bytes/100000", version="1.0",
                                    headers="Connection: keep-alive\r\n"))
        assert response.status == 200
        assert response.framing == "close"
        assert response.body == pattern(100000)


# -- bodies -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,status", [("HEAD", "/head", 200),
                                                ("GET", "/status/204", 204),
                                                ("GET", "/status/304", 304)])
def test_responses_without_body(proxy, method, path, status):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", path, method=method), method=method)
        assert response.status == status
        if method == "HEAD":
            assert response.header("content-length") == "10"
        # No stray body bytes: the next response on the connection reads cleanly.
        follow = conn.request(get("web", "/head"))
        assert (follow.status, follow.body) == (200, b"hello head")


def test_chunked_response_arrives_chunked_and_complete(proxy):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/bytes/300001"))
    assert response.framing == "chunked"
    assert response.body == pattern(300001)


def test_content_length_response_keeps_its_length(proxy):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/bytes/300001?framing=length"))
    assert response.framing == "length"
    assert response.header("content-length") == "300001"
    assert response.body == pattern(300001)


def test_close_delimited_response_is_rechunked_for_http11(proxy, fresh_raw):
    body = b"".join(b"line %d\n" % i for i in range(5000))
    fresh_raw.response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + body
    fresh_raw.close_after = True
    with Conn(proxy.outbound) as conn:
        first = conn.request(get("raw", "/one"))
        assert first.framing == "chunked"
        assert first.body == body
        # The client's connection outlives the upstream one.
        second = conn.request(get("raw", "/two"))
        assert second.body == body


def test_close_delimited_response_is_close_delimited_for_http10(proxy, fresh_raw):
    body = b"x" * 70000
    fresh_raw.response = b"HTTP/1.1 200 OK\r\n\r\n" + body
    fresh_raw.close_after = True
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("raw", "/", version="1.0"))
        assert response.framing == "close"
        assert response.body == body


def test_upstream_connection_close_is_honoured_and_the_client_kept(proxy, fresh_raw):
    fresh_raw.response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    fresh_raw.close_after = True
    before = fresh_raw.connections
    with Conn(proxy.outbound) as conn:
        for _ in range(3):
            response = conn.request(get("raw", "/"))
            assert (response.status, response.body) == (200, b"ok")
            assert response.header("connection") is None  # the client's connection stays
    assert fresh_raw.connections == before + 3


def test_http10_upstream_response(proxy, fresh_raw):
    fresh_raw.response = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    fresh_raw.close_after = True
    with Conn(proxy.outbound) as conn:
        for _ in range(2):
            response = conn.request(get("raw", "/"))
            assert (response.status, response.version, response.body) == (200, "HTTP/1.1", b"hello")


def test_interim_103_and_final_response(proxy, fresh_raw):
    fresh_raw.response = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
    with Conn(proxy.outbound) as conn:
        conn.send(get("raw", "/"))
        interim = conn.read()
        assert (interim.status, interim.header("link")) == (103, "</style.css>; rel=preload")
        final = conn.read()
        assert (final.status, final.body) == (200, b"final")
        assert conn.request(get("raw", "/")).body == b"final"  # the connection goes on


def test_client_connection_close_is_honoured(proxy):
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", "/echo", headers="Connection: close\r\n"))
        assert (response.status, response.header("connection")) == (200, "close")
        assert conn.at_eof()


def test_client_half_close_after_pipelined_requests(proxy):
    with Conn(proxy.outbound) as conn:
        conn.send(get("web", "/echo", method="POST", body=b"1")
                  + get("web", "/echo", method="POST", body=b"2"))
        conn.sock.shutdown(socket.SHUT_WR)
        assert [conn.read().body, conn.read().body] == [b"1", b"2"]
        assert conn.at_eof()


def test_chunked_request_trailers_are_dropped(proxy, backend):
    tag = marker()
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", f"/echo?{tag}", method="POST", headers=(
            "Transfer-Encoding: chunked\r\nTrailer: X-Sum\r\n")) + b"3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")
        assert (response.status, response.body) == (200, b"abc")
    [seen] = backend.requests(f"/echo?{tag}")
    assert "x-sum" not in seen.header_names() and "trailer" not in seen.header_names()


def test_chunked_request_body_is_streamed_to_the_backend(proxy, backend):
    pieces = [b"a" * 1000, b"b" * 70000, b"c"]
    response = requests.post(url(proxy, "/upload"), data=iter(pieces), headers={"Host": "web"},
                             timeout=10)
    whole = b"".join(pieces)
    assert response.json() == {"bytes": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


def test_expect_100_continue_with_curl(proxy, tmp_path):
    data = pattern(2_000_000)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    done = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "20", "-H", "Expect: 100-continue", "-H", "Host: web",
         "--data-binary", f"@{path}", url(proxy, "/upload")],
        capture_output=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert b"< HTTP/1.1 100 Continue" in done.stderr
    assert json.loads(done.stdout) == {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_websocket_echo_through_the_proxy(proxy):
    def open_client_connections():
        return proxy.metric_sum("meshproxy_tcp_connections_open", direction="outbound")

    before = open_client_connections()
    sock = socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10)
    with websockets.sync.client.connect("ws://web/ws", sock=sock, open_timeout=10) as ws:
        ws.send("hello through the mesh")
        assert ws.recv(timeout=10) == "hello through the mesh"
        ws.send(b"\x00\x01binary" * 1000)
        assert ws.recv(timeout=10) == b"\x00\x01binary" * 1000
    # Once both sides have closed, the proxy lets go of the tunnel's sockets.
    wait_for(lambda: open_client_connections() == before, timeout=5,
             what="the tunnel's client connection to be closed")


def test_bytes_sent_with_the_upgrade_request_arrive_after_the_switch(proxy):
    mask = b"\x01\x02\x03\x04"
    frame = b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi"))
    with Conn(proxy.outbound) as conn:
        conn.send(get("web", "/ws", headers=(
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")) + frame)
        switched = conn.read()
        assert switched.status == 101
        assert switched.header("upgrade").lower() == "websocket"
        assert conn.file.read(4) == b"\x81\x02hi"  # the echo, unmasked from the server


# -- metrics ----------------------------------------------------------------------------------

def test_requests_total_counts_every_request(proxy):
    def count(**labels):
        return proxy.metric_sum("meshproxy_requests_total", direction="outbound",
                                service="web.default", **labels)

    before, before_404 = count(), count(code="404")
    with requests.Session() as session:
        for _ in range(5):
            assert session.get(url(proxy, "/echo"), headers={"Host": "web"}, timeout=10).ok
        for _ in range(2):
            assert session.get(url(proxy, "/status/404"), headers={"Host": "web"},
                               timeout=10).status_code == 404
    # The count is recorded when the response ends, which the client may see first.
    wait_for(lambda: count() == before + 7, timeout=5, what="7 more requests counted")
    assert count(code="404") == before_404 + 2


def test_requests_to_an_empty_service_get_503(proxy):
    response = requests.get(url(proxy, "/"), headers={"Host": "empty"}, timeout=10)
    assert response.status_code == 503
    assert response.headers["x-meshproxy-error"] == "no-endpoints"
