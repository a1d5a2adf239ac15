"""Serialising heads and body framing for the next hop (RFC 9112 §§3-7)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead

LAST_CHUNK: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"


def _reason_for(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b""


def request_head_bytes(
    head: RequestHead, target: bytes, extra: HeaderList | None = None, *, upgrade: bool = False
) -> bytes:
    """Return the request head to send upstream: HTTP/1.1, `target`, end-to-end headers,
    then `extra` headers, then the framing the body will be sent with.

    Upstream connections are always keep-alive HTTP/1.1; `upgrade` re-adds the Connection and
    Upgrade fields that a WebSocket handshake needs.
    """
    parts = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in head.headers:
        parts += (name, b": ", value, _CRLF)
    if extra:
        for name, value in extra:
            parts += (name, b": ", value, _CRLF)
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts += (b"content-length: ", b"%d" % head.content_length, _CRLF)
    if upgrade and head.upgrade is not None:
        parts += (b"connection: upgrade\r\nupgrade: ", head.upgrade, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def response_head_bytes(
    head: ResponseHead, *, chunked: bool, keep_alive: bool, client_version: str,
    extra: HeaderList | None = None,
) -> bytes:
    """Return the response head to send to the client.

    `chunked` says the proxy will chunk the body (an HTTP/1.1 client, body of unknown length);
    otherwise Content-Length is repeated when known. `keep_alive` adds `connection: close` when
    false, or `connection: keep-alive` for an HTTP/1.0 client that keeps the connection.
    """
    reason = head.reason or _reason_for(head.status)
    parts = [b"HTTP/1.1 %d " % head.status, reason, _CRLF]
    _add_fields(parts, head)
    if extra:
        for name, value in extra:
            parts += (name, b": ", value, _CRLF)
    if head.status == 101:
        parts += (b"connection: upgrade\r\nupgrade: ", head.upgrade or b"", _CRLF)
    elif chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts += (b"content-length: ", b"%d" % head.content_length, _CRLF)
    if head.status != 101:
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif client_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
    parts.append(_CRLF)
    return b"".join(parts)


def _add_fields(parts: list[bytes], head: ResponseHead) -> None:
    """Add a response's end-to-end header lines: as received when nothing has read them as
    fields (`raw`), else one line per (name, value)."""
    raw = head.raw
    if raw is not None:
        parts.append(raw)
        return
    for name, value in head.headers:
        parts += (name, b": ", value, _CRLF)


def redirect_bytes(status: int, location: str, *, keep_alive: bool) -> bytes:
    """Return a redirect response without a body (a route's RequestRedirect filter)."""
    return b"HTTP/1.1 %d %s\r\nlocation: %s\r\ncontent-length: 0\r\n%s\r\n" % (
        status, _reason_for(status), location.encode("latin-1"),
        b"" if keep_alive else b"connection: close\r\n")


def informational_bytes(head: ResponseHead) -> bytes:
    """Return an interim 1xx response (e.g. 100 Continue) as the client should see it."""
    reason = head.reason or _reason_for(head.status)
    parts = [b"HTTP/1.1 %d " % head.status, reason, _CRLF]
    _add_fields(parts, head)
    parts.append(_CRLF)
    return b"".join(parts)


def chunk(data: bytes) -> list:
    """Return the pieces of one chunk carrying `data` (for transport.writelines).

    Empty data gives no pieces: a zero-size chunk is the last-chunk marker and would end the
    body early (RFC 9112 §7.1).
    """
    if not data:
        return []
    return [b"%x\r\n" % len(data), data, _CRLF]


def last_chunk_with(trailers: HeaderList) -> bytes:
    """Return the last chunk carrying trailer fields (RFC 9112 §7.1.2)."""
    parts = [b"0\r\n"]
    for name, value in trailers:
        parts += (name, b": ", value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def request_parts(head: RequestHead, target: bytes, body: list[bytes], *, complete: bool,
                  upgrade: bool) -> list[bytes]:
    """Return what a try sends first (for transport.writelines): the head, the body pieces
    received so far framed as the head says (chunks when chunked), and the last chunk when
    the request is already `complete`."""
    parts = [request_head_bytes(head, target, upgrade=upgrade)]
    if body:
        if head.chunked:
            for data in body:
                parts += chunk(data)
        else:
            parts += body
    if complete and head.chunked:
        parts.append(LAST_CHUNK)
    return parts


def response_framing(request: RequestHead, response: ResponseHead,
                     keep_alive: bool) -> tuple[bool, bool]:
    """Return (chunked, keep_alive) for sending `response` on to the client of `request`
    that the connection would otherwise keep (`keep_alive`). A body of unknown length
    (chunked, or ended by the upstream's close: RFC 9112 §6.3) is chunked for an HTTP/1.1
    client, so its connection outlives the upstream's; an HTTP/1.0 client learns the end of
    such a body from the close."""
    has_body = not (request.method == b"HEAD" or response.status in (204, 304))
    if has_body and (response.chunked or response.close_delimited):
        if request.version == "1.1":
            return True, keep_alive
        return False, False
    return False, keep_alive
