"""The access log of real sidecars (`meshproxy proxy --access-log PATH|-`), read as a user
would: one JSON object per line, per request.

Two sidecars in a row, without any span exporter (propagation only), each logging to a file:

    client ──► outbound sidecar (Service `client`) ──► inbound sidecar (Service `web`) ──► app
"""

from __future__ import annotations

import http.client
import json
import re
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from support.proxy import ProxyProcess, closed_port, mesh_yaml, wait_for

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
FIELDS = {"time", "trace_id", "span_id", "parent_span_id", "request_id", "direction", "method",
          "authority", "path", "upstream", "attempts", "status", "duration_ms", "bytes_in",
          "bytes_out", "route", "service", "error", "peer"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, backend):
    """(outbound proxy, its log file, inbound proxy, its log file)."""
    tmp = tmp_path_factory.mktemp("accesslog")
    in_log, out_log = tmp / "inbound.log", tmp / "outbound.log"
    started = []
    try:
        inbound = ProxyProcess(tmp, mesh_yaml({}), service="web", app_port=backend.port,
                               name="inbound", extra_args=["--access-log", str(in_log)]).start()
        started.append(inbound)
        mesh = mesh_yaml({"web": [f"127.0.0.1:{inbound.inbound}"], "nowhere": [],
                          "down": [f"127.0.0.1:{closed_port()}"]})
        outbound = ProxyProcess(tmp, mesh, service="client", name="outbound",
                                extra_args=["--access-log", str(out_log)]).start()
        started.append(outbound)
        yield outbound, out_log, inbound, in_log
    finally:
        for proxy in started:
            proxy.stop()


def request(port: int, method: str, path: str, host: str, body: bytes = b"",
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def line_for(log: Path, path: str) -> dict:
    """Wait for the line of the request to `path` and return it parsed."""
    def find():
        if not log.exists():
            return None
        for text in log.read_text().splitlines():
            entry = json.loads(text)  # every line is one JSON object
            if entry["path"] == path:
                return entry
        return None
    return wait_for(find, timeout=10, what=f"access log line for {path} in {log.name}")


def assert_time_recent(entry: dict, before: float) -> None:
    assert entry["time"].endswith("Z")
    logged = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= logged <= time.time() + 1


def test_a_request_through_both_sidecars(chain, backend) -> None:
    outbound, out_log, inbound, in_log = chain
    path = f"/echo?case={uuid.uuid4().hex}"
    before = time.time()
    status, headers, body = request(outbound.outbound, "POST", path, "web", body=b"x" * 1234,
                                    headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c"
                                             "-b7ad6b7169203331-01"})
    assert status == 200 and body == b"x" * 1234
    out, inb = line_for(out_log, path), line_for(in_log, path)
    for entry in (out, inb):
        assert set(entry) == FIELDS
        assert_time_recent(entry, before)
        assert entry["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        assert HEX16.match(entry["span_id"])
        assert entry["method"] == "POST" and entry["authority"] == "web"
        assert entry["attempts"] == 1 and entry["status"] == 200
        assert entry["bytes_in"] == 1234 and entry["bytes_out"] == 1234
        assert entry["route"] == "default" and entry["service"] == "web.default"
        assert entry["error"] is None and entry["duration_ms"] >= 0
        # the caller: the test's client for the outbound proxy, the outbound proxy for the inbound
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["peer"]), entry["peer"]
    assert out["direction"] == "outbound" and inb["direction"] == "inbound"
    assert out["upstream"] == f"127.0.0.1:{inbound.inbound}"
    assert inb["upstream"] == backend.address
    # One request id for the whole way (added by the first sidecar, kept by the second), and
    # the span ids chain: caller -> outbound -> inbound -> app.
    assert out["request_id"] == inb["request_id"]
    [received] = backend.requests(path)
    assert received.header("x-request-id") == out["request_id"]
    assert out["parent_span_id"] == "b7ad6b7169203331"
    assert inb["parent_span_id"] == out["span_id"]
    assert received.header("traceparent") == (
        f"00-0af7651916cd43dd8448eb211c80319c-{inb['span_id']}-01")


def test_new_trace_without_an_exporter_continues_too(chain, backend) -> None:
    outbound, out_log, _, in_log = chain
    path = f"/echo?case={uuid.uuid4().hex}"
    assert request(outbound.outbound, "GET", path, "web", headers={"x-request-id": "mine-1"})[0] == 200
    out, inb = line_for(out_log, path), line_for(in_log, path)
    assert HEX32.match(out["trace_id"]) and out["parent_span_id"] is None
    assert inb["trace_id"] == out["trace_id"] and inb["parent_span_id"] == out["span_id"]
    assert out["request_id"] == inb["request_id"] == "mine-1"  # kept when present
    [received] = backend.requests(path)
    assert received.header("traceparent") == f"00-{out['trace_id']}-{inb['span_id']}-01"


def test_proxy_answers_carry_their_reason(chain) -> None:
    outbound, out_log, _, _ = chain
    status, headers, _ = request(outbound.outbound, "GET", "/a?no-endpoints", "nowhere")
    assert status == 503
    entry = line_for(out_log, "/a?no-endpoints")
    assert entry["status"] == 503 and entry["error"] == "no-endpoints"
    assert entry["upstream"] is None and entry["attempts"] == 0
    assert entry["service"] == "nowhere.default"

    status, headers, _ = request(outbound.outbound, "GET", "/a?refused", "down")
    assert status == 502 and headers["x-meshproxy-error"] == "connect-failure"
    entry = line_for(out_log, "/a?refused")
    assert entry["status"] == 502 and entry["error"] == "connect-failure"
    assert entry["attempts"] == 3  # the first try and the default 2 retries
    assert entry["upstream"].startswith("127.0.0.1:") and entry["bytes_out"] == 0


def test_access_log_to_stdout(tmp_path, backend) -> None:
    proxy = ProxyProcess(tmp_path, mesh_yaml({"web": [backend.address]}), service="client",
                         extra_args=["--access-log"]).start()  # no value: stdout
    try:
        path = f"/headers?case={uuid.uuid4().hex}"
        assert request(proxy.outbound, "GET", path, "web")[0] == 200

        def find():
            # The test harness sends the proxy's stdout and stderr to one file.
            for text in proxy.stderr().decode().splitlines():
                if text.startswith("{") and json.loads(text)["path"] == path:
                    return json.loads(text)
            return None
        entry = wait_for(find, timeout=10, what="the access log line on stdout")
        assert entry["status"] == 200 and entry["direction"] == "outbound"
    finally:
        proxy.stop()


def test_unwritable_access_log_is_refused(tmp_path) -> None:
    proxy = ProxyProcess(tmp_path, mesh_yaml({}), service="client",
                         extra_args=["--access-log", str(tmp_path / "no" / "such" / "dir.log")])
    with pytest.raises(AssertionError):
        proxy.start(timeout=10)
    assert b"--access-log" in proxy.stderr()
    assert proxy.process.returncode == 2
