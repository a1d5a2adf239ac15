"""Trace context through two real sidecars in a row (spec §4), with spans exported over OTLP.

    client ──► outbound sidecar (Service `client`) ──► inbound sidecar (Service `web`) ──► app

Both proxies are `meshproxy proxy --config` processes started with the standard variable
OTEL_EXPORTER_OTLP_ENDPOINT pointing at a small OTLP/HTTP receiver in this test, which
decodes the spans the proxies' SDK exports. The app (the shared test backend) answers
`/headers` with the headers it received, so each test sees what an application would.
"""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from support.proxy import ProxyProcess, mesh_yaml, wait_for

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
STATUS_CODE_ERROR = 2


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Collector:
    """An OTLP/HTTP receiver (POST /v1/traces, protobuf) that keeps every span it gets."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    with self.lock:
                        self.spans.append({
                            "service": resource.get("service.name"),
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex() or None,
                            "kind": span.kind,
                            "name": span.name,
                            "status": span.status.code,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        })

    def trace(self, trace_id: str, count: int = 2) -> dict[str, dict]:
        """Wait until `count` spans of `trace_id` arrived; return them by service name."""
        def found():
            with self.lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            return spans if len(spans) >= count else None
        spans = wait_for(found, timeout=15, what=f"{count} spans of trace {trace_id}")
        return {s["service"]: s for s in spans}

    def of_trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def collector():
    running = Collector()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, backend, collector):
    """(outbound proxy, inbound proxy), both exporting spans to `collector`."""
    tmp = tmp_path_factory.mktemp("tracing")
    started = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # ms: spans leave soon after they end
        try:
            inbound = ProxyProcess(tmp, mesh_yaml({}), service="web", app_port=backend.port,
                                   name="inbound").start()
            started.append(inbound)
            mesh = mesh_yaml({"web": [f"127.0.0.1:{inbound.inbound}"], "nowhere": []})
            outbound = ProxyProcess(tmp, mesh, service="client", name="outbound").start()
            started.append(outbound)
            yield outbound, inbound
        finally:
            for proxy in started:
                proxy.stop()


def call(chain, headers: dict[str, str], host: str = "web") -> tuple[int, dict[str, list[str]]]:
    """GET /headers through both sidecars; return (status, the app's headers by lower-case
    name)."""
    outbound, _ = chain
    conn = http.client.HTTPConnection("127.0.0.1", outbound.outbound, timeout=10)
    try:
        conn.request("GET", f"/headers?t={uuid.uuid4().hex}", headers={"Host": host, **headers})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        return response.status, {}
    received: dict[str, list[str]] = {}
    for name, value in json.loads(body):
        received.setdefault(name.lower(), []).append(value)
    return response.status, received


def traceparent(value: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id, flags


def assert_chain(spans: dict[str, dict], trace_id: str, caller: str | None, app_parent: str):
    """The outbound span is the caller's child, the inbound span the outbound's, and the app's
    parent is the inbound span."""
    out, inb = spans["client.default"], spans["web.default"]
    assert out["kind"] == SPAN_KIND_CLIENT and inb["kind"] == SPAN_KIND_SERVER
    assert out["trace_id"] == inb["trace_id"] == trace_id
    assert out["parent_id"] == caller
    assert inb["parent_id"] == out["span_id"]
    assert app_parent == inb["span_id"]
    return out, inb


def test_w3c_context_continues_through_both_sidecars(chain, collector) -> None:
    status, got = call(chain, {"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01",
                               "tracestate": "congo=t61rcWkgMzE"})
    assert status == 200
    [value] = got["traceparent"]
    trace_id, parent, flags = traceparent(value)
    assert trace_id == TRACE and flags == "01"
    assert got["tracestate"] == ["congo=t61rcWkgMzE"]
    assert "b3" not in got and "x-b3-traceid" not in got
    out, inb = assert_chain(collector.trace(TRACE), TRACE, CALLER_SPAN, parent)
    # HTTP semantic conventions, and the mesh's own facts.
    for span in (out, inb):
        a = span["attributes"]
        assert span["name"] == "GET" and a["http.request.method"] == "GET"
        assert a["url.path"] == "/headers" and a["server.address"] == "web"
        assert a["http.response.status_code"] == 200
        assert a["meshproxy.service"] == "web.default" and a["meshproxy.route"] == "default"
        assert a["network.peer.address"] == "127.0.0.1"
        assert a["meshproxy.request_id"] == got["x-request-id"][0]
    assert out["attributes"]["meshproxy.direction"] == "outbound"
    assert inb["attributes"]["meshproxy.direction"] == "inbound"


def test_b3_single_header_continues(chain, collector) -> None:
    short = "80f198ee56343ba8"
    status, got = call(chain, {"b3": f"{short}-{CALLER_SPAN}-1"})
    assert status == 200
    [b3] = got["b3"]
    trace_id, span_id, sampled, parent = b3.split("-")
    assert trace_id == short and sampled == "1"
    assert "traceparent" not in got  # the format received is the format sent
    out, inb = assert_chain(collector.trace("0" * 16 + short), "0" * 16 + short, CALLER_SPAN,
                            span_id)
    assert parent == out["span_id"]


def test_b3_multi_headers_continue(chain, collector) -> None:
    status, got = call(chain, {"X-B3-TraceId": TRACE.replace("0a", "1b"),
                               "X-B3-SpanId": CALLER_SPAN, "X-B3-Sampled": "1"})
    assert status == 200
    trace_id = TRACE.replace("0a", "1b")
    assert got["x-b3-traceid"] == [trace_id] and got["x-b3-sampled"] == ["1"]
    out, inb = assert_chain(collector.trace(trace_id), trace_id, CALLER_SPAN,
                            got["x-b3-spanid"][0])
    assert got["x-b3-parentspanid"] == [out["span_id"]]
    assert "traceparent" not in got and "b3" not in got


@pytest.mark.parametrize("headers", [
    {"traceparent": f"00-{TRACE.upper()}-{CALLER_SPAN}-01", "tracestate": "a=b"},
    {"traceparent": "00-not-a-trace-01", "tracestate": "a=b"},
    {"traceparent": f"00-{'0' * 32}-{CALLER_SPAN}-01"},
    {},
], ids=["upper-case", "garbage", "zero-trace-id", "absent"])
def test_malformed_or_absent_context_starts_a_new_trace(chain, collector, headers) -> None:
    status, got = call(chain, headers)
    assert status == 200
    [value] = got["traceparent"]
    trace_id, parent, flags = traceparent(value)
    assert trace_id not in (TRACE, TRACE.upper(), "0" * 32) and flags == "01"
    assert "tracestate" not in got  # W3C: it went with the broken traceparent
    assert_chain(collector.trace(trace_id), trace_id, None, parent)


def test_unsampled_requests_propagate_without_spans(chain, collector) -> None:
    unsampled = TRACE.replace("0a", "2c")
    status, got = call(chain, {"traceparent": f"00-{unsampled}-{CALLER_SPAN}-00"})
    assert status == 200
    trace_id, parent, flags = traceparent(got["traceparent"][0])
    assert trace_id == unsampled and flags == "00" and parent != CALLER_SPAN
    b3_unsampled = TRACE.replace("0a", "3d")
    status, got = call(chain, {"b3": f"{b3_unsampled}-{CALLER_SPAN}-0"})
    assert got["b3"][0].split("-")[2] == "0"
    # A sampled request sent afterwards is exported; the spans of the unsampled ones, had
    # they been recorded, would have been exported before it.
    sampled = TRACE.replace("0a", "4e")
    call(chain, {"traceparent": f"00-{sampled}-{CALLER_SPAN}-01"})
    collector.trace(sampled)
    assert collector.of_trace(unsampled) == [] and collector.of_trace(b3_unsampled) == []


def test_proxy_error_is_a_failed_client_span(chain, collector) -> None:
    failing = TRACE.replace("0a", "5f")
    status, _ = call(chain, {"traceparent": f"00-{failing}-{CALLER_SPAN}-01"}, host="nowhere")
    assert status == 503
    [span] = collector.trace(failing, count=1).values()
    assert span["kind"] == SPAN_KIND_CLIENT and span["status"] == STATUS_CODE_ERROR
    assert span["attributes"]["error.type"] == "no-endpoints"
    assert span["attributes"]["http.response.status_code"] == 503
    assert span["attributes"]["meshproxy.service"] == "nowhere.default"
