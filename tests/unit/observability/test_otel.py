"""Spans through the OpenTelemetry SDK (observability/otel.py), read back from its in-memory
exporter, and the choice of exporter from the OTEL_* variables."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshproxy.http1.events import RequestHead
from meshproxy.observability.otel import tracing_from_env
from meshproxy.observability.trace import Tracing

TRACE = b"0af7651916cd43dd8448eb211c80319c"
SPAN = b"b7ad6b7169203331"


class FakeTransport:
    def __init__(self, peer=("10.1.2.3", 40000)) -> None:
        self.peer = peer

    def get_extra_info(self, name: str):
        return self.peer if name == "peername" else None


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def head(*headers, target=b"/api/items?page=2", host=b"web:8080") -> RequestHead:
    h = RequestHead(b"POST", target, "1.1", [(b"host", host), *headers])
    h.host = host
    return h


def header(h: RequestHead, name: bytes) -> bytes | None:
    return h.header(name)


def propagator(provider, direction: str):
    return Tracing(tracer=provider.get_tracer("test")).propagator(direction, random.Random(3))


def test_inbound_server_span_is_child_of_the_caller(spans) -> None:
    provider, exporter = spans
    prop = propagator(provider, "inbound")
    h = head((b"traceparent", b"00-%s-%s-01" % (TRACE, SPAN)), (b"tracestate", b"k=v"))
    ctx = prop.begin(h, FakeTransport())
    assert ctx.span is not None
    assert header(h, b"traceparent") == b"00-%s-%s-01" % (TRACE, ctx.span_id)
    assert header(h, b"tracestate") == b"k=v"
    prop.end(ctx, status=201, error=None, route="default/r/0", service="web.default",
             endpoint="127.0.0.1:9000", attempts=1, request_id=b"rid-1")
    [span] = exporter.get_finished_spans()
    assert span.kind == SpanKind.SERVER and span.name == "POST"
    assert "%032x" % span.context.trace_id == TRACE.decode()
    assert "%016x" % span.context.span_id == ctx.span_id.decode()
    assert "%016x" % span.parent.span_id == SPAN.decode() and span.parent.is_remote
    assert span.context.trace_state.get("k") == "v"
    a = span.attributes
    assert a["http.request.method"] == "POST" and a["url.path"] == "/api/items"
    assert a["url.query"] == "page=2" and a["server.address"] == "web"
    assert a["server.port"] == 8080 and a["http.response.status_code"] == 201
    assert a["network.peer.address"] == "10.1.2.3"
    assert a["meshproxy.route"] == "default/r/0" and a["meshproxy.service"] == "web.default"
    assert a["meshproxy.request_id"] == "rid-1"
    assert span.status.status_code == StatusCode.UNSET


def test_outbound_client_span_new_trace_and_failure(spans) -> None:
    provider, exporter = spans
    prop = propagator(provider, "outbound")
    h = head()
    ctx = prop.begin(h, FakeTransport())
    assert ctx.parent_id is None
    prop.end(ctx, status=503, error="no-endpoints", route="default", service="web.default",
             endpoint=None, attempts=0, request_id=None)
    [span] = exporter.get_finished_spans()
    assert span.kind == SpanKind.CLIENT and span.parent is None
    assert header(h, b"traceparent") == b"00-%032x-%016x-01" % (span.context.trace_id,
                                                               span.context.span_id)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "no-endpoints"
    assert span.attributes["url.full"] == "http://web:8080/api/items?page=2"
    assert "network.peer.address" not in span.attributes  # no upstream was reached


def test_unsampled_caller_records_nothing_but_propagates(spans) -> None:
    provider, exporter = spans
    prop = propagator(provider, "inbound")
    h = head((b"x-b3-traceid", TRACE), (b"x-b3-spanid", SPAN), (b"x-b3-sampled", b"0"))
    ctx = prop.begin(h)
    assert ctx.span is None and ctx.sampled is False
    assert header(h, b"x-b3-spanid") == ctx.span_id and header(h, b"x-b3-sampled") == b"0"
    prop.end(ctx, status=200, error=None, route="default", service="s", endpoint=None,
             attempts=1, request_id=None)
    assert exporter.get_finished_spans() == ()


def test_b3_single_parent_in_span(spans) -> None:
    provider, exporter = spans
    prop = propagator(provider, "outbound")
    h = head((b"b3", b"80f198ee56343ba8-%s-1" % SPAN))
    ctx = prop.begin(h)
    prop.end(ctx, status=200, error=None, route="default", service="s", endpoint="1.2.3.4:80",
             attempts=2, request_id=None)
    [span] = exporter.get_finished_spans()
    assert span.context.trace_id == 0x80F198EE56343BA8
    assert header(h, b"b3") == b"80f198ee56343ba8-%s-1-%s" % (ctx.span_id, SPAN)
    assert span.attributes["network.peer.address"] == "1.2.3.4"
    assert span.attributes["meshproxy.attempts"] == 2


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
    {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
    {"OTEL_TRACES_EXPORTER": "no-such-exporter"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
])
def test_no_exporter_means_no_tracer(env) -> None:
    tracing = tracing_from_env("web.default", None, env)
    assert tracing.tracer is None and tracing.provider is None


def test_otlp_endpoint_alone_turns_export_on() -> None:
    tracing = tracing_from_env("web.prod", "web-0", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_BSP_SCHEDULE_DELAY": "10"})
    try:
        assert tracing.tracer is not None
        resource = tracing.provider.resource.attributes
        assert resource["service.name"] == "web.prod"
        assert resource["service.namespace"] == "prod"
        assert resource["service.instance.id"] == "web-0"
    finally:
        tracing.provider.shutdown()


def test_service_name_from_env_wins(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
    tracing = tracing_from_env("web.default", None, {"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert tracing.provider.resource.attributes["service.name"] == "checkout"
    finally:
        tracing.provider.shutdown()
