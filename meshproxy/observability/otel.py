"""Spans through OpenTelemetry, for proxies that export them (imported only then).

`tracing_from_env` decides, once at start-up, whether this proxy records spans:

- a tracer provider already set globally (`opentelemetry-instrument meshproxy proxy ...`, or
  an embedding program) is used as it is;
- otherwise the proxy builds one when the standard variables ask for an exporter:
  OTEL_TRACES_EXPORTER (`otlp`, `console`, or any installed exporter's entry-point name), or
  an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). Unlike
  an instrumented application, a proxy does not export to localhost:4318 by default: with
  nothing set there is no SDK and no span objects, only header propagation (trace.py).
- OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off.

`otlp` uses OTEL_EXPORTER_OTLP(_TRACES)_PROTOCOL: `http/protobuf` (the default the OTLP
specification names) or `grpc`. The SDK reads the rest itself: sampler (OTEL_TRACES_SAMPLER),
batching (OTEL_BSP_*), endpoint, headers, timeouts. service.name defaults to the sidecar's
Service (`NAME.NAMESPACE`); OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override it.

Span attributes follow the OpenTelemetry HTTP semantic conventions (server spans on inbound,
client spans on outbound), plus `meshproxy.*` for the mesh's own facts.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from meshproxy.observability.trace import Tracing
from meshproxy.observability.tracecontext import Parent, Sampler

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.observability.trace import Propagator

log = logging.getLogger("meshproxy.trace")

_EMPTY = Context()


def span_kind(direction: str) -> SpanKind:
    """SERVER for the inbound listener (calls to this instance), CLIENT for outbound."""
    return SpanKind.SERVER if direction == "inbound" else SpanKind.CLIENT


def _authority(host: bytes | None) -> tuple[str | None, int | None]:
    """(host, port or None) of a Host value; an IPv6 literal loses its brackets."""
    if not host:
        return None, None
    text = host.decode("latin-1")
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return address, int(port) if port.isdigit() else None
    name, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return text, None


def start_span(propagator: "Propagator", head, parent: Parent | None, sampled: bool,
               transport=None):
    """Start this hop's span as a child of `parent` (a new trace when None); `transport`: the
    client connection's (its peer address and TLS are recorded)."""
    peer, tls = None, False
    if transport is not None:
        peer = transport.get_extra_info("peername")
        tls = transport.get_extra_info("ssl_object") is not None
    context = _EMPTY
    if parent is not None:
        state = None
        values = [v for k, v in head.headers if k.lower() == b"tracestate"]
        if values:
            state = TraceState.from_header([b",".join(values).decode("latin-1")])
        remote = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0),
                             trace_state=state)
        context = otel_trace.set_span_in_context(NonRecordingSpan(remote), _EMPTY)
    method = head.method.decode("latin-1")
    target = head.target.decode("latin-1")
    scheme = "https" if tls else "http"
    if target[:1] != "/" and "://" in target:  # absolute form
        scheme, _, rest = target.partition("://")
        target = "/" + rest.partition("/")[2]
    path, _, query = target.partition("?")
    host, port = _authority(head.host)
    attributes = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": scheme,
        "network.protocol.version": head.version,
    }
    if query:
        attributes["url.query"] = query
    if host is not None:
        attributes["server.address"] = host
        attributes["server.port"] = port or (443 if scheme == "https" else 80)
    if propagator.direction == "outbound" and host is not None:
        authority = head.host.decode("latin-1")
        attributes["url.full"] = f"{scheme}://{authority}{target}"
    if isinstance(peer, tuple) and propagator.direction == "inbound":
        attributes["network.peer.address"] = str(peer[0])
        if len(peer) > 1:
            attributes["network.peer.port"] = peer[1]
    return propagator.tracer.start_span(method, context=context, kind=propagator._kind,
                                        attributes=attributes)


def end_span(propagator: "Propagator", span, *, status: int, error: str | None, route: str,
             service: str, endpoint: str | None, attempts: int,
             request_id: bytes | None) -> None:
    """Record the outcome on `span` and end it. Never raises."""
    try:
        attributes = {
            "meshproxy.direction": propagator.direction,
            "meshproxy.route": route,
            "meshproxy.service": service,
            "meshproxy.attempts": attempts,
        }
        if status:
            attributes["http.response.status_code"] = status
        if request_id is not None:
            attributes["meshproxy.request_id"] = request_id.decode("latin-1")
        if endpoint is not None:
            attributes["meshproxy.upstream"] = endpoint
            if propagator.direction == "outbound":
                host, _, port = endpoint.rpartition(":")
                attributes["network.peer.address"] = host
                if port.isdigit():
                    attributes["network.peer.port"] = int(port)
        # Semantic conventions: 5xx marks a server span failed; a client span fails from 4xx.
        # Status 0: no response was completed.
        limit = 500 if propagator.direction == "inbound" else 400
        if error is not None or status == 0 or status >= limit:
            attributes["error.type"] = error or (str(status) if status else "incomplete")
            span.set_status(StatusCode.ERROR)
        span.set_attributes(attributes)
        span.end()
    except Exception:  # pragma: no cover - an exporter's bug must not break a request
        log.debug("ending a span failed", exc_info=True)


# -- set-up ------------------------------------------------------------------------------------

def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return ["otlp"] if endpoint else []
    return [n.strip().lower() for n in names.split(",") if n.strip() and n.strip() != "none"]


def _exporter(name: str, environ: Mapping[str, str]):
    if name == "otlp":
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise ValueError(f"OTLP protocol {protocol!r} is not supported "
                             "(http/protobuf or grpc)")
        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout may carry the access log
    from importlib.metadata import entry_points

    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        raise ValueError(f"no trace exporter named {name!r} is installed")
    return found[0].load()()


def _global_provider():
    provider = otel_trace.get_tracer_provider()
    if isinstance(provider, (otel_trace.ProxyTracerProvider, otel_trace.NoOpTracerProvider)):
        return None
    return provider


def tracing_from_env(service_key: str, instance: str | None = None,
                     environ: Mapping[str, str] = os.environ) -> Tracing:
    """Return the proxy's Tracing: with a tracer when spans are to be exported (see the module
    docstring), else propagation only. An exporter that cannot be set up (SDK not installed,
    unknown name) is logged and tracing falls back to propagation only."""
    from meshproxy import __version__

    sampler = Sampler.from_env(environ)
    provider = _global_provider()
    if provider is not None:
        return Tracing(sampler, provider.get_tracer("meshproxy", __version__))
    names = _exporter_names(environ)
    if not names:
        return Tracing(sampler)
    try:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporters = [_exporter(name, environ) for name in names]
    except ImportError as exc:
        log.warning("spans are not exported: %s (pip install 'meshproxy[otlp]')", exc)
        return Tracing(sampler)
    except ValueError as exc:
        log.warning("spans are not exported: %s", exc)
        return Tracing(sampler)
    name, _, namespace = service_key.partition(".")
    defaults = {"service.name": service_key, "service.namespace": namespace}
    if instance:
        defaults["service.instance.id"] = instance
    detected = dict(OTELResourceDetector().detect().attributes)
    provider = TracerProvider(resource=Resource.create({**defaults, **detected}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("exporting spans (%s)", ", ".join(names))
    return Tracing(sampler, provider.get_tracer("meshproxy", __version__), provider)
