"""W3C Trace Context and B3 headers, read and written by hand (sans-I/O: bytes in, bytes out).

The parsing functions never raise: a malformed value is None, and the caller starts a new
trace. Choices where the specifications leave room:

- W3C wins over B3 when a request carries both and both are valid; every format received is
  written with the same ids.
- A B3 trace id of 64 bits is padded to 128 for W3C (as OpenTelemetry does) and kept at its
  width in B3 headers.
- `tracestate` is passed on unchanged with a valid `traceparent`, dropped otherwise (W3C).
- A request without a sampling decision (a new trace, B3 "defer") is decided by Sampler,
  OpenTelemetry's built-in samplers by their OTEL_TRACES_SAMPLER names (default
  parentbased_always_on: new traces are sampled, a caller's decision is followed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("meshproxy.trace")

# Formats a request carried its context in (bit set).
W3C = 1
B3_SINGLE = 2
B3_MULTI = 4

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
X_B3_TRACEID = b"x-b3-traceid"
X_B3_SPANID = b"x-b3-spanid"
X_B3_PARENTSPANID = b"x-b3-parentspanid"
X_B3_SAMPLED = b"x-b3-sampled"
X_B3_FLAGS = b"x-b3-flags"
_B3_MULTI_NAMES = (X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS)
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE, B3, *_B3_MULTI_NAMES})

HEX_DIGITS = b"0123456789abcdef"
HEX_OR_DASH = HEX_DIGITS + b"-"
ODD_DIGITS = frozenset(b"13579bdf")
ZERO_TRACE = b"0" * 32
ZERO_SPAN = b"0" * 16


def _is_hex(value: bytes) -> bool:
    """True for lower-case hex digits only (one C call: translate deletes them all)."""
    return not value.translate(None, HEX_DIGITS)


class Parent:
    """The caller's span, as a request's headers name it."""

    __slots__ = ("trace_id", "span_id", "sampled", "debug", "b3_short")

    def __init__(self, trace_id: bytes, span_id: bytes, sampled: bool | None,
                 debug: bool = False, b3_short: bool = False) -> None:
        self.trace_id = trace_id  # 32 lower-case hex digits
        self.span_id = span_id  # 16 lower-case hex digits
        self.sampled = sampled  # None: the caller left the decision to us (B3 "defer")
        self.debug = debug  # B3 debug: sampled, and asked to be kept
        self.b3_short = b3_short  # the B3 trace id had 64 bits

    def __eq__(self, other: object) -> bool:
        # Field by field, not through __slots__: a compiled class has none to read.
        return (isinstance(other, Parent) and self.trace_id == other.trace_id
                and self.span_id == other.span_id and self.sampled == other.sampled
                and self.debug == other.debug and self.b3_short == other.b3_short)

    def __repr__(self) -> str:
        return (f"Parent({self.trace_id!r}, {self.span_id!r}, sampled={self.sampled}, "
                f"debug={self.debug})")


# -- parsing (pure) ---------------------------------------------------------------------------

def parse_traceparent(value: bytes) -> Parent | None:
    """Return the parent a `traceparent` value names, or None when it is malformed.

    W3C Trace Context §3.2: `VERSION-TRACEID-PARENTID-FLAGS`, lower-case hex; version ff and
    all-zero ids are invalid; version 00 is exactly 55 characters; a later version may append
    fields after a `-` and is read as version 00.
    """
    if len(value) != 55:
        value = value.strip(b" \t")
        if len(value) < 55:
            return None
    fields = value[:55]
    # Dashes exactly at 2, 35 and 52, and only hex digits besides (checked in C, at once).
    if (fields[2] != 45 or fields[35] != 45 or fields[52] != 45 or fields.count(b"-") != 3
            or fields.translate(None, HEX_OR_DASH)):
        return None
    version = fields[:2]
    if version == b"ff":
        return None
    if len(value) > 55 and (version == b"00" or value[55] != 45):
        return None
    trace_id, span_id = fields[3:35], fields[36:52]
    if trace_id == ZERO_TRACE or span_id == ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, fields[54] in ODD_DIGITS)


def _b3_trace_id(value: bytes) -> tuple[bytes, bool] | None:
    """(32-digit trace id, was 64-bit) for a B3 trace id of 16 or 32 hex digits, else None."""
    value = value.lower()
    if len(value) not in (16, 32) or not _is_hex(value):
        return None
    padded = value.rjust(32, b"0")
    if padded == ZERO_TRACE:
        return None
    return padded, len(value) == 16


def _b3_span_id(value: bytes) -> bytes | None:
    value = value.lower()
    if len(value) != 16 or not _is_hex(value) or value == ZERO_SPAN:
        return None
    return value


# B3 sampling states: accept, deny, debug; "true"/"false" are an old spelling still sent.
_B3_SAMPLED = {b"1": True, b"0": False, b"d": True, b"true": True, b"false": False}


def parse_b3(value: bytes) -> Parent | bool | None:
    """Read a single `b3` header: `TRACEID-SPANID[-SAMPLED[-PARENTSPANID]]` or just `SAMPLED`.

    Returns the Parent, or a bool when the value is only a sampling decision (`0`, `1`, `d`),
    or None when it is malformed.
    """
    value = value.strip(b" \t")
    parts = value.split(b"-")
    if len(parts) == 1:
        decision = _B3_SAMPLED.get(value.lower())
        return None if decision is None else decision
    if len(parts) > 4:
        return None
    trace = _b3_trace_id(parts[0])
    span = _b3_span_id(parts[1])
    if trace is None or span is None:
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        state = parts[2].lower()
        if state not in (b"0", b"1", b"d"):
            return None
        sampled = state != b"0"
        debug = state == b"d"
    if len(parts) == 4 and _b3_span_id(parts[3]) is None:
        return None
    return Parent(trace[0], span, sampled, debug, trace[1])


def parse_b3_multi(fields: Mapping[bytes, bytes]) -> Parent | bool | None:
    """Read the `x-b3-*` headers (lower-case names to values).

    Returns the Parent; a bool when they carry only a sampling decision (`x-b3-sampled` or
    `x-b3-flags: 1` without ids); None when they are malformed or carry nothing usable.
    """
    flags = fields.get(X_B3_FLAGS)
    debug = flags is not None and flags.strip() == b"1"
    sampled: bool | None = None
    raw = fields.get(X_B3_SAMPLED)
    if raw is not None:
        sampled = _B3_SAMPLED.get(raw.strip().lower())
        if sampled is None or raw.strip().lower() == b"d":
            return None
    if debug:
        sampled = True  # B3: debug implies an accept decision
    trace_raw, span_raw = fields.get(X_B3_TRACEID), fields.get(X_B3_SPANID)
    if trace_raw is None and span_raw is None:
        return sampled  # a decision alone, or nothing
    if trace_raw is None or span_raw is None:
        return None
    trace = _b3_trace_id(trace_raw.strip())
    span = _b3_span_id(span_raw.strip())
    if trace is None or span is None:
        return None
    parent = fields.get(X_B3_PARENTSPANID)
    if parent is not None and _b3_span_id(parent.strip()) is None:
        return None
    return Parent(trace[0], span, sampled, debug, trace[1])


class Incoming:
    """What a request's headers say about its trace: the formats present, the parent (None
    for a new trace), a sampling decision carried without ids, and the tracestate to keep."""

    __slots__ = ("formats", "parent", "decision", "keep_tracestate")

    def __init__(self, formats: int, parent: Parent | None, decision: bool | None,
                 keep_tracestate: bool) -> None:
        self.formats = formats
        self.parent = parent
        self.decision = decision
        self.keep_tracestate = keep_tracestate


def extract(headers: list, hits: list[int] | None = None) -> Incoming:
    """Read the trace context of a header list (names in any case). `hits`: the indexes of
    the trace headers, when the caller already found them. Never raises."""
    if hits is None:
        hits = [i for i, (name, _) in enumerate(headers) if name.lower() in TRACE_HEADERS]
    formats = 0
    traceparents: list[bytes] = []
    b3: list[bytes] = []
    multi: dict[bytes, bytes] = {}
    repeated = False
    for i in hits:
        name, value = headers[i]
        name = name.lower()
        if name == TRACEPARENT:
            formats |= W3C
            traceparents.append(value)
        elif name == B3:
            formats |= B3_SINGLE
            b3.append(value)
        elif name != TRACESTATE:
            formats |= B3_MULTI
            repeated = repeated or name in multi
            multi[name] = value
    # W3C §3.2: a repeated traceparent cannot be told apart from a broken one.
    w3c = parse_traceparent(traceparents[0]) if len(traceparents) == 1 else None
    if w3c is not None:
        return Incoming(formats, w3c, None, True)
    decision: bool | None = None
    for candidate in (parse_b3(b3[0]) if len(b3) == 1 else None,
                      parse_b3_multi(multi) if multi and not repeated else None):
        if isinstance(candidate, Parent):
            return Incoming(formats, candidate, None, False)
        if candidate is not None and decision is None:
            decision = candidate
    return Incoming(formats, None, decision, False)


# -- formatting (pure) ------------------------------------------------------------------------

def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool) -> bytes:
    """Return a version-00 `traceparent` value."""
    return b"00-%s-%s-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def format_b3(trace_id: bytes, span_id: bytes, sampled: bool, debug: bool = False,
              parent_id: bytes | None = None) -> bytes:
    """Return a single-header `b3` value (`TRACEID-SPANID-SAMPLED[-PARENTSPANID]`)."""
    state = b"d" if debug else b"1" if sampled else b"0"
    if parent_id is None:
        return b"%s-%s-%s" % (trace_id, span_id, state)
    return b"%s-%s-%s-%s" % (trace_id, span_id, state, parent_id)


def b3_multi_headers(trace_id: bytes, span_id: bytes, sampled: bool, debug: bool = False,
                     parent_id: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """Return the `x-b3-*` headers for a span (debug sends `x-b3-flags: 1` and no
    `x-b3-sampled`, which it implies)."""
    out = [(X_B3_TRACEID, trace_id), (X_B3_SPANID, span_id)]
    if parent_id is not None:
        out.append((X_B3_PARENTSPANID, parent_id))
    out.append((X_B3_FLAGS, b"1") if debug else (X_B3_SAMPLED, b"1" if sampled else b"0"))
    return out


def inject(headers: list, incoming: Incoming, trace_id: bytes, span_id: bytes,
           sampled: bool) -> list:
    """Return `headers` with every trace header replaced by this span's, in each format the
    request came with (W3C when none); `tracestate` stays where `incoming` keeps it."""
    formats = incoming.formats or W3C
    keep_state = incoming.keep_tracestate
    out = [(k, v) for k, v in headers
           if (n := k.lower()) not in TRACE_HEADERS or (n == TRACESTATE and keep_state)]
    parent = incoming.parent
    parent_id = parent.span_id if parent is not None else None
    debug = parent is not None and parent.debug
    b3_trace = trace_id[16:] if parent is not None and parent.b3_short else trace_id
    if formats & W3C:
        out.append((TRACEPARENT, format_traceparent(trace_id, span_id, sampled)))
    if formats & B3_SINGLE:
        out.append((B3, format_b3(b3_trace, span_id, sampled, debug, parent_id)))
    if formats & B3_MULTI:
        out += b3_multi_headers(b3_trace, span_id, sampled, debug, parent_id)
    return out


# -- sampling ---------------------------------------------------------------------------------

class Sampler:
    """OpenTelemetry's built-in samplers, by their OTEL_TRACES_SAMPLER names, for the requests
    this proxy decides about without an SDK (the SDK, when configured, reads the same
    variables)."""

    __slots__ = ("parent_based", "bound", "name")

    NAMES = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")

    def __init__(self, name: str = "parentbased_always_on", arg: str | None = None) -> None:
        if name not in self.NAMES:
            raise ValueError(f"unknown sampler {name!r} (one of {', '.join(self.NAMES)})")
        self.name = name
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            rate = 1.0
        elif root == "always_off":
            rate = 0.0
        else:
            try:
                rate = float(arg) if arg is not None else 1.0
            except ValueError:
                raise ValueError(f"sampler argument {arg!r} is not a number") from None
            rate = min(max(rate, 0.0), 1.0)
        # As OpenTelemetry's TraceIdRatioBased: sampled when the trace id's low 64 bits are
        # below rate * 2**64, so every hop with the same rate decides alike.
        self.bound = round(rate * (1 << 64))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Sampler":
        """The sampler OTEL_TRACES_SAMPLER(_ARG) name; the default for an unknown name, with a
        warning."""
        name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        try:
            return cls(name, environ.get("OTEL_TRACES_SAMPLER_ARG"))
        except ValueError as exc:
            log.warning("OTEL_TRACES_SAMPLER: %s; using parentbased_always_on", exc)
            return cls()

    def root(self, trace_id: bytes) -> bool:
        """Decide for a trace that has no decision yet."""
        bound = self.bound
        if bound >= 1 << 64:
            return True
        return bound > 0 and int(trace_id[16:], 16) < bound

    def child(self, parent_sampled: bool | None, trace_id: bytes) -> bool:
        """Decide for a span whose caller decided `parent_sampled` (None: no decision)."""
        if parent_sampled is None or not self.parent_based:
            return self.root(trace_id)
        return parent_sampled
