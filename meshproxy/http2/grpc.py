"""gRPC as the proxy sees it (spec §9), sans I/O: which requests are gRPC, their deadline
(`grpc-timeout`), the proxy's own errors as trailers-only responses, and the statuses a retry
may follow.

A gRPC call is an HTTP/2 request with `content-type: application/grpc` (or
`application/grpc+proto` and the like). Its status travels in trailers; an error the proxy
makes is a "trailers-only" response: one header block, HTTP 200, carrying `grpc-status` and
`grpc-message` and ending the stream, which every gRPC client reads as the call's status.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final
from urllib.parse import quote

from meshproxy.http1.errors import ProxyError
from meshproxy.http1.events import HeaderList, RequestHead

# gRPC status codes (grpc/doc/statuscodes.md) the proxy makes or reads.
OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
ABORTED: Final = 10
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14

# Spec §9: the status of the proxy's answer per `x-meshproxy-error` reason; any other: 2.
STATUS_FOR_REASON: Final = {
    "unauthorized": PERMISSION_DENIED,
    "no-route": UNIMPLEMENTED,
    "rate-limited": RESOURCE_EXHAUSTED,
    "timeout": DEADLINE_EXCEEDED,
    "loop-detected": ABORTED,
    "bad-request": INTERNAL,
    "connect-failure": UNAVAILABLE,
    "upstream-reset": UNAVAILABLE,
    "no-endpoints": UNAVAILABLE,
    "no-healthy-endpoints": UNAVAILABLE,
    "overloaded": UNAVAILABLE,
}

# Retry conditions (`retry.on`) named after gRPC statuses, read from a trailers-only answer.
RETRY_STATUS_NAMES: Final = {
    CANCELLED: "cancelled",
    DEADLINE_EXCEEDED: "deadline-exceeded",
    RESOURCE_EXHAUSTED: "resource-exhausted",
    UNAVAILABLE: "unavailable",
}

# A gRPC call's retry conditions when the policy names none of its own (spec §9).
DEFAULT_RETRY_ON: Final = frozenset({"connect-failure", "refused-stream", "unavailable"})

_GRPC_TYPE: Final = b"application/grpc"

# grpc-timeout units (PROTOCOL-HTTP2.md): hours, minutes, seconds, milli-, micro-, nanoseconds.
_UNITS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(head: RequestHead) -> bool:
    """True for a gRPC request: content-type `application/grpc`, alone or with a `+` or `;`
    suffix."""
    value = head.header(b"content-type")
    if value is None or not value.startswith(_GRPC_TYPE):
        return False
    rest = value[len(_GRPC_TYPE):]
    return not rest or rest[:1] in (b"+", b";")


def parse_timeout(value: bytes) -> float | None:
    """Return the seconds of a `grpc-timeout` value (1 to 8 digits and a unit), or None when
    it is malformed (then the call has no deadline from it)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def format_timeout(seconds: float) -> bytes:
    """Return a `grpc-timeout` value for `seconds` (at least 1 ms; at most 8 digits, in the
    finest unit that fits)."""
    millis = max(int(seconds * 1000), 1)
    if millis < 100_000_000:
        return b"%dm" % millis
    secs = int(seconds)
    if secs < 100_000_000:
        return b"%dS" % secs
    return b"%dH" % min(int(seconds / 3600), 99_999_999)


def request_timeout(head: RequestHead) -> float | None:
    """The deadline a gRPC request carries (`grpc-timeout`), in seconds, or None."""
    value = head.header(b"grpc-timeout")
    return parse_timeout(value) if value is not None else None


def set_timeout(head: RequestHead, seconds: float) -> None:
    """Set the request's `grpc-timeout` to the time left, `seconds` (replacing any)."""
    value = format_timeout(seconds)
    headers = head.headers
    for i, (name, _) in enumerate(headers):
        if name.lower() == b"grpc-timeout":
            headers[i] = (name, value)
            return
    headers.append((b"grpc-timeout", value))


def status_of(reason: str) -> int:
    """The gRPC status of the proxy's answer for spec §4/§9 `reason`."""
    return STATUS_FOR_REASON.get(reason, UNKNOWN)


def encode_message(text: str) -> bytes:
    """Percent-encode `grpc-message` (PROTOCOL-HTTP2.md: printable ASCII but `%` as is)."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def error_fields(error: ProxyError) -> HeaderList:
    """The trailers-only response the proxy answers a gRPC call with for `error`."""
    fields: HeaderList = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status_of(error.reason)),
        (b"grpc-message", encode_message(f"{error.reason}: {error}")),
        (b"x-meshproxy-error", error.reason.encode("ascii")),
    ]
    if error.overloaded:
        fields.append((b"x-meshproxy-overloaded", b"true"))
    return fields


def http_error(error: ProxyError) -> tuple[HeaderList, bytes]:
    """The header list and body of the proxy's answer for `error` on an HTTP/2 stream: the
    same as on HTTP/1.1 (spec §4)."""
    phrase = HTTPStatus(error.status).phrase
    body = f"{error.status} {phrase}: {error.reason}\n".encode()
    fields: HeaderList = [
        (b":status", b"%d" % error.status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"x-meshproxy-error", error.reason.encode("ascii")),
    ]
    if error.overloaded:
        fields.append((b"x-meshproxy-overloaded", b"true"))
    return fields, body


def trailers_only_status(fields: HeaderList) -> int | None:
    """The `grpc-status` of a response head that carries one (a trailers-only answer), or
    None."""
    for name, value in fields:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else UNKNOWN
    return None
