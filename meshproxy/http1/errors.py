"""Typed errors the proxy answers itself, and the one place their responses are made (spec §4).

Every response the proxy makes on its own carries `x-meshproxy-error: REASON` and a one-line
body, so a caller (or a test) can tell the proxy's answer from the application's.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar


class ProxyError(Exception):
    """An exchange the proxy ends itself, with a status and a spec §4 reason."""

    # Per class: ClassVar, because compiled, an exception class gets no attribute defaults.
    status: ClassVar[int] = 502
    reason: ClassVar[str] = "upstream-protocol-error"
    overloaded: ClassVar[bool] = False

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail
        # Set by RequestReader.feed on a framing error: the events of the requests that were
        # complete before the bad one, which are still answered. (Assigned here, not as a
        # class-level default: compiled, an exception class gets no attribute defaults.)
        self.completed: list | tuple = ()


class BadRequest(ProxyError):
    status = 400
    reason = "bad-request"


class Unauthorized(ProxyError):
    status = 403
    reason = "unauthorized"


class NoRoute(ProxyError):
    status = 404
    reason = "no-route"


class HeaderTimeout(ProxyError):
    status = 408
    reason = "header-timeout"


class BodyTooLarge(ProxyError):
    status = 413
    reason = "body-too-large"


class HeadersTooLarge(ProxyError):
    status = 431
    reason = "headers-too-large"


class BackendNotFound(ProxyError):
    status = 500
    reason = "backend-not-found"


class ConnectFailure(ProxyError):
    status = 502
    reason = "connect-failure"


class UpstreamReset(ProxyError):
    status = 502
    reason = "upstream-reset"


class UpstreamProtocolError(ProxyError):
    status = 502
    reason = "upstream-protocol-error"


class UnknownDestination(ProxyError):
    status = 502
    reason = "unknown-destination"


class NoEndpoints(ProxyError):
    status = 503
    reason = "no-endpoints"


class NoHealthyEndpoints(ProxyError):
    status = 503
    reason = "no-healthy-endpoints"


class Overloaded(ProxyError):
    status = 503
    reason = "overloaded"
    overloaded = True


class Timeout(ProxyError):
    status = 504
    reason = "timeout"


class LoopDetected(ProxyError):
    """A request that has already passed through this sidecar in the same direction (spec §9):
    forwarding it again would send it round the same loop until something gives up."""

    status = 508
    reason = "loop-detected"


def error_response(error: ProxyError, *, keep_alive: bool) -> bytes:
    """Return the complete HTTP/1.1 response bytes for `error`.

    The body is one line naming the status and reason; `Connection: close` is sent when the
    connection cannot be reused (framing errors leave the stream position unknown).
    """
    phrase = HTTPStatus(error.status).phrase
    body = f"{error.status} {phrase}: {error.reason}\n".encode()
    lines = [
        f"HTTP/1.1 {error.status} {phrase}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        f"x-meshproxy-error: {error.reason}",
    ]
    if error.overloaded:
        lines.append("x-meshproxy-overloaded: true")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
