"""Typed errors the proxy answers itself, and the one place their responses are made (spec §4).

Every response the proxy makes on its own carries `x-meshproxy-error: REASON` and a one-line
body, so a caller (or a test) can tell the proxy's answer from the application's.
"""

from __future__ import annotations

from http import HTTPStatus


class ProxyError(Exception):
    """An exchange the proxy ends itself, with a status and a spec §4 reason."""

    status = 502
    reason = "upstream-protocol-error"
    overloaded = False
    # Set by RequestReader.feed on a framing error: the events of the requests that were
    # complete before the bad one, which are still answered.
    completed: list | tuple = ()

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail


class BadRequest(ProxyError):
    status, reason = 400, "bad-request"


class Unauthorized(ProxyError):
    status, reason = 403, "unauthorized"


class NoRoute(ProxyError):
    status, reason = 404, "no-route"


class HeaderTimeout(ProxyError):
    status, reason = 408, "header-timeout"


class BodyTooLarge(ProxyError):
    status, reason = 413, "body-too-large"


class HeadersTooLarge(ProxyError):
    status, reason = 431, "headers-too-large"


class BackendNotFound(ProxyError):
    status, reason = 500, "backend-not-found"


class ConnectFailure(ProxyError):
    status, reason = 502, "connect-failure"


class UpstreamReset(ProxyError):
    status, reason = 502, "upstream-reset"


class UpstreamProtocolError(ProxyError):
    status, reason = 502, "upstream-protocol-error"


class UnknownDestination(ProxyError):
    status, reason = 502, "unknown-destination"


class NoEndpoints(ProxyError):
    status, reason = 503, "no-endpoints"


class NoHealthyEndpoints(ProxyError):
    status, reason = 503, "no-healthy-endpoints"


class Overloaded(ProxyError):
    status, reason, overloaded = 503, "overloaded", True


class Timeout(ProxyError):
    status, reason = 504, "timeout"


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
