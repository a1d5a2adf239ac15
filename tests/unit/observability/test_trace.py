"""Trace context by hand (observability/tracecontext.py and trace.py): what a request's headers say, and what the
proxy sends on, for W3C traceparent/tracestate, B3 single and B3 multi."""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshproxy
import meshproxy.observability.tracecontext as tracecontext_module
from meshproxy.http1.events import RequestHead
from meshproxy.observability.trace import Tracing
from meshproxy.observability.tracecontext import (
    B3_MULTI,
    B3_SINGLE,
    W3C,
    Parent,
    Sampler,
    extract,
    format_b3,
    format_traceparent,
    inject,
    parse_b3,
    parse_b3_multi,
    parse_traceparent,
)

TRACE = b"0af7651916cd43dd8448eb211c80319c"
SPAN = b"b7ad6b7169203331"
TP = b"00-" + TRACE + b"-" + SPAN + b"-01"
TRACEPARENT_RE = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


def head(*headers: tuple[bytes, bytes]) -> RequestHead:
    h = RequestHead(b"GET", b"/x?y=1", "1.1", [(b"host", b"web"), *headers])
    h.host = b"web"
    return h


def values(h: RequestHead, name: bytes) -> list[bytes]:
    return [v for k, v in h.headers if k.lower() == name]


def propagator(sampler: Sampler | None = None, seed: int = 1):
    return Tracing(sampler).propagator("outbound", random.Random(seed))


# -- traceparent ----------------------------------------------------------------------------------

def test_traceparent_valid() -> None:
    assert parse_traceparent(TP) == Parent(TRACE, SPAN, True)
    assert parse_traceparent(TP[:-2] + b"00").sampled is False
    assert parse_traceparent(TP[:-2] + b"03").sampled is True  # other flag bits ignored


@pytest.mark.parametrize("value", [
    b"",
    b"00-" + TRACE + b"-" + SPAN,  # no flags
    b"00-" + TRACE.upper() + b"-" + SPAN + b"-01",  # upper-case hex is invalid
    b"00-" + b"0" * 32 + b"-" + SPAN + b"-01",  # all-zero trace id
    b"00-" + TRACE + b"-" + b"0" * 16 + b"-01",  # all-zero parent id
    b"ff-" + TRACE + b"-" + SPAN + b"-01",  # version ff is forbidden
    b"00-" + TRACE + b"-" + SPAN + b"-01-extra",  # version 00 has exactly four fields
    b"0g-" + TRACE + b"-" + SPAN + b"-01",
    b"00_" + TRACE + b"-" + SPAN + b"-01",
    b"00-" + TRACE[:-1] + b"x-" + SPAN + b"-01",
    b"00-" + TRACE + b"-" + SPAN + b"-0z",
    b"01-" + TRACE + b"-" + SPAN + b"-01x",  # a later version: a field must follow a dash
])
def test_traceparent_malformed(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_traceparent_future_version_read_as_00() -> None:
    assert parse_traceparent(b"cc-" + TRACE + b"-" + SPAN + b"-01-what-ever") == Parent(
        TRACE, SPAN, True)


@given(st.binary(max_size=80))
def test_traceparent_never_raises_and_roundtrips(value: bytes) -> None:
    parent = parse_traceparent(value)
    if parent is not None:
        again = parse_traceparent(format_traceparent(parent.trace_id, parent.span_id,
                                                     parent.sampled))
        assert again == parent


@given(st.binary(min_size=16, max_size=16).map(bytes.hex), st.binary(min_size=8, max_size=8)
       .map(bytes.hex), st.booleans())
def test_traceparent_format_parse(trace: str, span: str, sampled: bool) -> None:
    value = format_traceparent(trace.encode(), span.encode(), sampled)
    parent = parse_traceparent(value)
    if set(trace) == {"0"} or set(span) == {"0"}:
        assert parent is None
    else:
        assert parent == Parent(trace.encode(), span.encode(), sampled)


# -- B3 -------------------------------------------------------------------------------------------

def test_b3_single_forms() -> None:
    short = b"80f198ee56343ba8"
    assert parse_b3(short + b"-" + SPAN + b"-1") == Parent(b"0" * 16 + short, SPAN, True,
                                                           False, True)
    assert parse_b3(TRACE + b"-" + SPAN) == Parent(TRACE, SPAN, None)  # deferred
    assert parse_b3(TRACE + b"-" + SPAN + b"-d").debug is True
    assert parse_b3(TRACE + b"-" + SPAN + b"-0-" + b"e457b5a2e4d86bd1").sampled is False
    assert parse_b3(b"0") is False and parse_b3(b"1") is True and parse_b3(b"d") is True


@pytest.mark.parametrize("value", [
    b"", b"2", b"-", TRACE, TRACE + b"-", TRACE + b"-" + SPAN + b"-2",
    TRACE + b"-" + SPAN + b"-1-zz", TRACE + b"-" + SPAN + b"-1-" + SPAN + b"-x",
    b"abc-" + SPAN + b"-1", TRACE + b"-" + SPAN[:-1] + b"-1", b"0" * 32 + b"-" + SPAN,
])
def test_b3_single_malformed(value: bytes) -> None:
    assert parse_b3(value) is None


def test_b3_multi() -> None:
    fields = {b"x-b3-traceid": TRACE, b"x-b3-spanid": SPAN, b"x-b3-sampled": b"1"}
    assert parse_b3_multi(fields) == Parent(TRACE, SPAN, True)
    assert parse_b3_multi({**fields, b"x-b3-sampled": b"0"}).sampled is False
    assert parse_b3_multi({**fields, b"x-b3-sampled": b"true"}).sampled is True
    debug = parse_b3_multi({b"x-b3-traceid": TRACE, b"x-b3-spanid": SPAN, b"x-b3-flags": b"1"})
    assert debug.sampled is True and debug.debug is True
    assert parse_b3_multi({b"x-b3-traceid": TRACE, b"x-b3-spanid": SPAN}).sampled is None
    assert parse_b3_multi({b"x-b3-sampled": b"0"}) is False  # a decision without ids
    assert parse_b3_multi({b"x-b3-traceid": TRACE}) is None  # half a context
    assert parse_b3_multi({**fields, b"x-b3-parentspanid": b"nothex!!nothex!!"}) is None
    assert parse_b3_multi({**fields, b"x-b3-sampled": b"maybe"}) is None


multi_values = st.one_of(st.binary(max_size=40), st.sampled_from(
    [TRACE, SPAN, TRACE[16:], b"1", b"0", b"d", b"true"]))


@given(st.dictionaries(st.sampled_from([b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
                                        b"x-b3-sampled", b"x-b3-flags"]), multi_values))
def test_b3_multi_never_raises(fields: dict) -> None:
    result = parse_b3_multi(fields)
    assert result is None or isinstance(result, (bool, Parent))
    if isinstance(result, Parent):
        assert len(result.trace_id) == 32 and len(result.span_id) == 16


@given(st.binary(max_size=90))
def test_b3_single_never_raises(value: bytes) -> None:
    result = parse_b3(value)
    if isinstance(result, Parent):
        assert parse_b3(format_b3(result.trace_id, result.span_id, bool(result.sampled),
                                  result.debug)).trace_id == result.trace_id


# -- extract and inject ----------------------------------------------------------------------------

def test_extract_prefers_valid_w3c_and_falls_back_to_b3() -> None:
    b3 = b"80f198ee56343ba8-e457b5a2e4d86bd1-1"
    both = extract([(b"Traceparent", TP), (b"B3", b3)])
    assert both.formats == W3C | B3_SINGLE and both.parent.trace_id == TRACE
    broken = extract([(b"traceparent", b"garbage"), (b"b3", b3), (b"tracestate", b"a=b")])
    assert broken.parent.span_id == b"e457b5a2e4d86bd1"
    assert broken.keep_tracestate is False  # it belonged to the broken traceparent
    twice = extract([(b"traceparent", TP), (b"traceparent", TP)])
    assert twice.parent is None and twice.formats == W3C
    assert extract([(b"X-B3-TraceId", TRACE), (b"X-B3-SpanId", SPAN)]).formats == B3_MULTI


def test_inject_writes_every_format_received() -> None:
    incoming = extract([(b"traceparent", TP), (b"tracestate", b"a=b"), (b"b3", b"1"),
                        (b"x-b3-traceid", TRACE), (b"x-b3-spanid", SPAN), (b"accept", b"*/*")])
    out = inject([(b"traceparent", TP), (b"tracestate", b"a=b"), (b"b3", b"1"),
                  (b"x-b3-traceid", TRACE), (b"x-b3-spanid", SPAN), (b"accept", b"*/*")],
                 incoming, TRACE, b"1111111111111111", True)
    assert (b"accept", b"*/*") in out and (b"tracestate", b"a=b") in out
    assert (b"traceparent", b"00-" + TRACE + b"-1111111111111111-01") in out
    assert (b"b3", TRACE + b"-1111111111111111-1-" + SPAN) in out
    assert (b"x-b3-spanid", b"1111111111111111") in out
    assert (b"x-b3-parentspanid", SPAN) in out
    assert [k for k, _ in out].count(b"traceparent") == 1


# -- the per-request propagator ---------------------------------------------------------------------

def test_no_context_starts_a_w3c_trace() -> None:
    h = head()
    ctx = propagator().begin(h)
    [value] = values(h, b"traceparent")
    assert value == b"00-%s-%s-01" % (ctx.trace_id, ctx.span_id)
    assert ctx.parent_id is None and ctx.sampled is True and ctx.span is None


def test_valid_traceparent_continues_in_place() -> None:
    h = head((b"Traceparent", TP), (b"tracestate", b"congo=t61rcWkgMzE"))
    ctx = propagator().begin(h)
    assert ctx.trace_id == TRACE and ctx.parent_id == SPAN and ctx.span_id != SPAN
    assert h.headers[1] == (b"Traceparent", b"00-%s-%s-01" % (TRACE, ctx.span_id))
    assert values(h, b"tracestate") == [b"congo=t61rcWkgMzE"]


def test_unsampled_caller_is_followed() -> None:
    h = head((b"traceparent", TP[:-2] + b"00"))
    ctx = propagator().begin(h)
    assert ctx.sampled is False and values(h, b"traceparent")[0].endswith(b"-00")


def test_malformed_traceparent_new_trace_without_tracestate() -> None:
    h = head((b"traceparent", b"00-xyz"), (b"tracestate", b"a=b"))
    ctx = propagator().begin(h)
    [value] = values(h, b"traceparent")
    assert TRACEPARENT_RE.match(value) and ctx.trace_id != TRACE and ctx.parent_id is None
    assert values(h, b"tracestate") == []


def test_b3_single_kept_as_b3_with_its_width() -> None:
    h = head((b"b3", b"80f198ee56343ba8-e457b5a2e4d86bd1-1"))
    ctx = propagator().begin(h)
    assert ctx.trace_id == b"0" * 16 + b"80f198ee56343ba8"
    assert values(h, b"b3") == [b"80f198ee56343ba8-%s-1-e457b5a2e4d86bd1" % ctx.span_id]
    assert values(h, b"traceparent") == []


def test_b3_multi_kept_as_multi() -> None:
    h = head((b"X-B3-TraceId", TRACE), (b"X-B3-SpanId", SPAN), (b"X-B3-Sampled", b"0"))
    ctx = propagator().begin(h)
    assert values(h, b"x-b3-traceid") == [TRACE]
    assert values(h, b"x-b3-spanid") == [ctx.span_id]
    assert values(h, b"x-b3-parentspanid") == [SPAN]
    assert values(h, b"x-b3-sampled") == [b"0"] and ctx.sampled is False
    assert values(h, b"traceparent") == []


def test_b3_sampling_only_starts_a_trace_with_that_decision() -> None:
    h = head((b"b3", b"0"))
    ctx = propagator().begin(h)
    assert ctx.sampled is False and ctx.parent_id is None
    assert values(h, b"b3") == [b"%s-%s-0" % (ctx.trace_id, ctx.span_id)]


def test_b3_debug_propagates() -> None:
    h = head((b"x-b3-traceid", TRACE), (b"x-b3-spanid", SPAN), (b"x-b3-flags", b"1"))
    propagator().begin(h)
    assert values(h, b"x-b3-flags") == [b"1"] and values(h, b"x-b3-sampled") == []


header_names = st.sampled_from([b"traceparent", b"Traceparent", b"tracestate", b"b3", b"B3",
                                b"x-b3-traceid", b"X-B3-SpanId", b"x-b3-parentspanid",
                                b"x-b3-sampled", b"x-b3-flags", b"accept"])
header_values = st.one_of(st.binary(max_size=60), st.sampled_from(
    [TP, TP[:-2] + b"00", TRACE, SPAN, b"1", b"0", b"d", TRACE + b"-" + SPAN + b"-1"]))


@settings(max_examples=400)
@given(st.lists(st.tuples(header_names, header_values), max_size=8))
def test_any_headers_give_one_valid_context(headers: list) -> None:
    h = head(*headers)
    ctx = propagator().begin(h)
    assert re.fullmatch(rb"[0-9a-f]{32}", ctx.trace_id) and ctx.trace_id != b"0" * 32
    assert re.fullmatch(rb"[0-9a-f]{16}", ctx.span_id) and ctx.span_id != b"0" * 16
    received_formats = extract(headers).formats
    tps = values(h, b"traceparent")
    if received_formats & W3C or not received_formats:
        assert len(tps) == 1
        match = TRACEPARENT_RE.match(tps[0])
        assert match and match.group(1) == ctx.trace_id and match.group(2) == ctx.span_id
    else:
        assert tps == []
    if received_formats & B3_SINGLE:
        [b3] = values(h, b"b3")
        assert parse_b3(b3).span_id == ctx.span_id
    if received_formats & B3_MULTI:
        assert values(h, b"x-b3-spanid") == [ctx.span_id]
    parent = extract(headers).parent
    if parent is not None:
        assert ctx.trace_id == parent.trace_id and ctx.parent_id == parent.span_id
    else:
        assert ctx.parent_id is None  # a new trace
    # Whatever else came is forwarded untouched.
    assert [x for x in h.headers if x[0] == b"accept"] == [x for x in headers
                                                            if x[0] == b"accept"]


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=70), st.builds(
    lambda a, b, c: b"%s-%s-%s-%s" % (a, b, c, b"01"),
    st.sampled_from([b"00", b"01", b"ff", b"0A"]),
    st.sampled_from([TRACE, TRACE.upper(), b"0" * 32, TRACE[:-1]]),
    st.sampled_from([SPAN, b"0" * 16, SPAN + b"0"]))))
def test_single_traceparent_fast_path_agrees_with_the_parser(value: bytes) -> None:
    ctx = propagator().begin(head((b"traceparent", value)))
    parent = parse_traceparent(value)
    assert ctx.parent_id == (parent.span_id if parent is not None else None)
    if parent is not None:
        assert ctx.trace_id == parent.trace_id and ctx.sampled == parent.sampled


# -- sampling ----------------------------------------------------------------------------------------

def test_sampler_from_env() -> None:
    assert Sampler.from_env({}).name == "parentbased_always_on"
    off = Sampler.from_env({"OTEL_TRACES_SAMPLER": "always_off"})
    assert off.child(True, TRACE) is False and off.root(TRACE) is False
    parent_off = Sampler.from_env({"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    assert parent_off.child(True, TRACE) is True and parent_off.root(TRACE) is False
    assert Sampler.from_env({"OTEL_TRACES_SAMPLER": "nonsense"}).name == "parentbased_always_on"


def test_ratio_sampler_decides_by_trace_id_like_opentelemetry() -> None:
    half = Sampler("traceidratio", "0.5")
    assert half.root(b"f" * 16 + b"0" * 16) is True  # low 64 bits small
    assert half.root(b"0" * 16 + b"f" * 16) is False
    rng = random.Random(7)
    ids = [b"%032x" % rng.getrandbits(128) for _ in range(4000)]
    share = sum(map(half.root, ids)) / len(ids)
    assert 0.45 < share < 0.55
    new_traces = propagator(Sampler("parentbased_traceidratio", "0.25"))
    sampled = sum(new_traces.begin(head()).sampled for _ in range(4000)) / 4000
    assert 0.2 < sampled < 0.3


def test_header_module_is_sans_io() -> None:
    # The source by its place in the package: a compiled module's __file__ is its extension.
    source = Path(meshproxy.__file__).parent / "observability" / "tracecontext.py"
    tree = ast.parse(source.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"asyncio", "socket", "ssl", "selectors"}
