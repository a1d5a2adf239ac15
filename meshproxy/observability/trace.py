"""Trace context of each request (spec §4), and spans when an exporter is configured.

Every request through a listener gets a TraceContext: the trace it belongs to (continued from
the request's headers, or new when they carry none or a malformed one) and a span id of this
proxy's own, which is sent on in the same header format(s) the request came with (W3C when
none); tracecontext.py reads and writes the headers.

Spans are recorded through opentelemetry-api only when a tracer is configured (an exporter:
see otel.py). Without one, the hot path is a scan of the header names, one random span id and
one formatted header: no span objects, no SDK (the API's extract + inject alone cost ~6 µs,
an SDK span ~20 µs; this ~2-3 µs, see docs/observability.md).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from meshproxy.observability.tracecontext import (
    B3,
    ODD_DIGITS,
    TRACE_HEADERS,
    TRACEPARENT,
    TRACESTATE,
    ZERO_SPAN,
    ZERO_TRACE,
    Incoming,
    Parent,
    Sampler,
    extract,
    format_b3,
    inject,
    parse_b3,
    parse_traceparent,
)

log = logging.getLogger("meshproxy.trace")

_TRACE_NAME_LENGTHS = frozenset(map(len, TRACE_HEADERS))
# A plain version-00 traceparent (W3C §3.2), the usual case, checked in one C call; anything
# else goes through parse_traceparent.
_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]([0-9a-f])").fullmatch
ID_BLOCK = 2048  # random bytes per block of ids: 128 span ids


# -- per request (hot path) -------------------------------------------------------------------

class TraceContext:
    """One request's place in its trace at this proxy: the trace, this hop's span id (the one
    sent on), the caller's span id (None for a new trace), the sampling decision, and the
    OpenTelemetry span when one is being recorded."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "span")

    def __init__(self, trace_id: bytes, span_id: bytes, parent_id: bytes | None,
                 sampled: bool, span=None) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.span = span


class Tracing:
    """What every listener of a proxy shares: the sampler, and the OpenTelemetry tracer (None:
    propagation only, no spans) with the provider to flush at exit."""

    def __init__(self, sampler: Sampler | None = None, tracer=None, provider=None) -> None:
        self.sampler = sampler or Sampler()
        self.tracer = tracer
        self.provider = provider

    def propagator(self, direction: str, rng) -> "Propagator":
        """The per-listener object the exchanges of `direction` (inbound: server spans,
        outbound: client spans) call; `rng` makes the ids."""
        return Propagator(direction, rng, self.sampler, self.tracer)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is still buffered and stop the exporter (blocks; call off the loop)."""
        provider = self.provider
        if provider is None:
            return
        try:
            provider.force_flush(int(timeout * 1000))
            provider.shutdown()
        except Exception:  # an exporter's failure must not fail the proxy's exit
            log.warning("trace exporter shutdown failed", exc_info=True)


class Propagator:
    """Begins and ends the trace part of each request of one listener."""

    __slots__ = ("direction", "sampler", "tracer", "_random_bytes", "_hex", "_pos", "_kind",
                 "_otel")

    def __init__(self, direction: str, rng, sampler: Sampler, tracer=None) -> None:
        self.direction = direction
        self.sampler = sampler
        self.tracer = tracer
        # Ids are slices of a block of random hex digits made ID_BLOCK bytes at a time: a
        # slice costs half of formatting a fresh random number per request.
        self._random_bytes = rng.randbytes
        self._hex = b""
        self._pos = 0
        self._kind: Any = None
        self._otel: Any = None  # observability/otel.py, with a tracer
        if tracer is not None:
            from meshproxy.observability import otel

            self._otel = otel
            self._kind = otel.span_kind(direction)

    def _new_id(self, digits: int) -> bytes:
        """`digits` random lower-case hex digits (16: a span id, 32: a trace id), not all
        zero (W3C §3.2.2)."""
        while True:
            pos = self._pos
            end = pos + digits
            if end > len(self._hex):
                self._hex = self._random_bytes(ID_BLOCK).hex().encode()
                pos, end = 0, digits
            self._pos = end
            value = self._hex[pos:end]
            if value != ZERO_SPAN and value != ZERO_TRACE:
                return value

    def begin(self, head, transport=None) -> TraceContext:
        """Continue (or start) the request's trace: put this hop's span id into its headers
        (`head.headers`, changed in place or replaced) and return the context. `transport`:
        the client connection's, read only for a recorded span (peer address, TLS)."""
        headers = head.headers
        hits: list[int] | None = None
        trace_id: bytes | None
        i = 0
        for name, _ in headers:
            # The length first: it turns most other names away without lower-casing them.
            if len(name) in _TRACE_NAME_LENGTHS and name.lower() in TRACE_HEADERS:
                if hits is None:
                    hits = [i]
                else:
                    hits.append(i)
            i += 1
        if self.tracer is None:
            if hits is None:
                # No context: a new trace, sent on as W3C.
                trace_id = self._new_id(32)
                span_id = self._new_id(16)
                sampled = self.sampler.root(trace_id)
                headers.append((TRACEPARENT, b"00-%s-%s-%s" % (
                    trace_id, span_id, b"01" if sampled else b"00")))
                return TraceContext(trace_id, span_id, None, sampled)
            index = -1  # of the one traceparent, when the others are tracestate
            for i in hits:
                name = headers[i][0].lower()
                if name == TRACEPARENT and index == -1:
                    index = i
                elif name != TRACESTATE:
                    index = -2
                    break
            if index >= 0:
                # The common case: one traceparent, replaced where it stands (tracestate goes
                # on as it came).
                name, value = headers[index]
                match = _TRACEPARENT_00(value)
                if match is not None:
                    trace_id, parent_id, flags = match.group(1, 2, 3)
                    sampled = flags[0] in ODD_DIGITS
                    if trace_id == ZERO_TRACE or parent_id == ZERO_SPAN:
                        trace_id = None
                else:
                    parent = parse_traceparent(value)
                    trace_id = None
                    if parent is not None:
                        trace_id, parent_id = parent.trace_id, parent.span_id
                        sampled = bool(parent.sampled)
                if trace_id is not None:
                    span_id = self._new_id(16)
                    sampler = self.sampler
                    if not sampler.parent_based:
                        sampled = sampler.root(trace_id)
                    headers[index] = (name, b"00-%s-%s-%s" % (
                        trace_id, span_id, b"01" if sampled else b"00"))
                    return TraceContext(trace_id, span_id, parent_id, sampled)
            elif len(hits) == 1 and headers[hits[0]][0].lower() == B3:
                # One b3 header with ids: replaced where it stands, as inject() would write it.
                index = hits[0]
                name, value = headers[index]
                b3 = parse_b3(value)
                if isinstance(b3, Parent):
                    trace_id = b3.trace_id
                    span_id = self._new_id(16)
                    sampled = self.sampler.child(b3.sampled, trace_id)
                    headers[index] = (name, format_b3(
                        trace_id[16:] if b3.b3_short else trace_id, span_id, sampled,
                        b3.debug, b3.span_id))
                    return TraceContext(trace_id, span_id, b3.span_id, sampled)
        incoming = extract(headers, hits or [])
        return self._begin_general(head, incoming, transport)

    def _begin_general(self, head, incoming: Incoming, transport) -> TraceContext:
        parent = incoming.parent
        if parent is not None:
            trace_id = parent.trace_id
            sampled = self.sampler.child(parent.sampled, trace_id)
        else:
            trace_id = self._new_id(32)
            decision = incoming.decision
            sampled = decision if decision is not None else self.sampler.root(trace_id)
        span = None
        span_id = None
        if self.tracer is not None and (sampled or parent is None and incoming.decision is None):
            # Only a span that may be sampled is worth the SDK's time; a new trace without a
            # decision is left to the SDK's own sampler (which makes its id).
            try:
                span = self._otel.start_span(self, head, parent, sampled, transport)
                context = span.get_span_context()
                trace_id = b"%032x" % context.trace_id
                span_id = b"%016x" % context.span_id
                sampled = context.trace_flags.sampled
                if not span.is_recording():
                    span = None
            except Exception:  # a broken SDK or sampler must not fail the request
                log.warning("starting a span failed; propagating only", exc_info=True)
                span = span_id = None
        if span_id is None:
            span_id = self._new_id(16)
        head.headers = inject(head.headers, incoming, trace_id, span_id, sampled)
        return TraceContext(trace_id, span_id, parent.span_id if parent is not None else None,
                            sampled, span)

    def end_request(self, record) -> None:
        """End the span of a finished request (observability/record.py's RequestRecord) with
        its outcome, when one is recorded. Never raises."""
        self.end(record.trace, status=record.status, error=record.error, route=record.route,
                 service=record.service, endpoint=record.endpoint, attempts=record.attempts,
                 request_id=record.request_id)

    def end(self, context: TraceContext, *, status: int, error: str | None, route: str,
            service: str, endpoint: str | None, attempts: int,
            request_id: bytes | None) -> None:
        """End the request's span (when one is recorded) with its outcome. Never raises."""
        span = context.span
        if span is None:
            return
        context.span = None
        self._otel.end_span(self, span, status=status, error=error, route=route,
                            service=service, endpoint=endpoint, attempts=attempts,
                            request_id=request_id)


def tracing_from_env(service_key: str, instance: str | None = None,
                     environ: Mapping[str, str] = os.environ) -> Tracing:
    """The proxy's Tracing from the OTEL_* variables (observability/otel.py); propagation
    only when opentelemetry-api is not installed."""
    try:
        from meshproxy.observability import otel
    except ImportError as exc:
        if any(key.startswith("OTEL_") for key in environ):
            log.warning("spans are not exported: %s (pip install 'meshproxy[otlp]')", exc)
        return Tracing(Sampler.from_env(environ))
    return otel.tracing_from_env(service_key, instance, environ)
