"""What the HTTP/1.1 readers hand to the data plane: heads, body bytes, end of message, upgrade.

Body data is passed as plain `bytes` (the common event, kept cheap); the other events are the
small slotted classes below. Header names and values stay `bytes` exactly as received, so a
head that nothing changes is forwarded byte for byte.
"""

from __future__ import annotations

from typing import Final

# Header fields as received: (name, value) tuples, in order, case kept.
HeaderList = list[tuple[bytes, bytes]]


def first_value(headers: HeaderList, name: bytes) -> bytes | None:
    """Return the first value of field `name` (lower-case bytes) in (name, value) pairs."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class RequestHead:
    """A request line and its end-to-end headers (hop-by-hop ones already taken out).

    `headers` keeps the order and case received. Framing is summarised in `content_length`
    (None when absent) and `chunked`; connection handling in `keep_alive`, `upgrade` and
    `connection_tokens` (lower-cased tokens of the Connection header, RFC 9110 §7.6.1).
    """

    __slots__ = (
        "method", "target", "version", "headers", "host", "content_length", "chunked",
        "keep_alive", "upgrade", "connection_tokens", "request_id", "expect_continue",
    )

    def __init__(self, method: bytes, target: bytes, version: str, headers: HeaderList) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade: bytes | None = None
        self.connection_tokens: tuple[bytes, ...] = ()
        self.request_id: bytes | None = None
        self.expect_continue = False

    @property
    def has_body(self) -> bool:
        """True when a body follows the head (RFC 9112 §6.3: chunked or Content-Length > 0)."""
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of header `name` (lower-case bytes), or None."""
        return first_value(self.headers, name)

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r} {self.target!r} HTTP/{self.version})"


class ResponseHead:
    """A status line and its end-to-end headers, with the framing the body will use.

    A head read from an upstream keeps its header lines as the bytes received (`raw`: each
    line with its CRLF, framing and hop-by-hop lines already cut out), so that a head nothing
    changes goes on to the client as those bytes. `headers`, the (name, value) list, is made
    from them the first time something reads it; from then on the list is the head's truth
    (it may be changed in place) and `raw` is None.
    """

    __slots__ = (
        "status", "reason", "version", "raw", "_headers", "content_length", "chunked",
        "keep_alive", "upgrade", "close_delimited",
    )

    def __init__(self, status: int, reason: bytes, version: str,
                 headers: HeaderList | None = None, raw: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.raw = raw if headers is None else None
        self._headers = headers if headers is not None or raw is not None else []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade: bytes | None = None
        # No Content-Length and not chunked on a response that has a body: it ends when the
        # server closes the connection (RFC 9112 §6.3 rule 8).
        self.close_delimited = False

    @property
    def headers(self) -> HeaderList:
        """The end-to-end headers as (name, value) pairs, in the order and case received."""
        headers = self._headers
        if headers is None:
            raw = self.raw
            headers = self._headers = split_header_lines(raw) if raw else []
            self.raw = None
        return headers

    @headers.setter
    def headers(self, headers: HeaderList) -> None:
        self._headers = headers
        self.raw = None

    @property
    def informational(self) -> bool:
        """1xx other than 101: an interim response; the final one follows."""
        return 100 <= self.status < 200 and self.status != 101

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of header `name` (lower-case bytes), or None."""
        return first_value(self.headers, name)

    def __repr__(self) -> str:
        return f"ResponseHead({self.status} {self.reason!r})"


def split_header_lines(raw: bytes) -> HeaderList:
    """Return the (name, value) pairs of header lines as a reader received them (`raw`: lines
    that llhttp has checked, each ending in CRLF), values without the whitespace around them
    (RFC 9110 §5.5)."""
    headers: HeaderList = []
    for line in raw.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
    return headers


class _EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE: Final = _EndOfMessage()


class Upgrade:
    """The connection leaves HTTP: `rest` is what followed the head in the same read."""

    __slots__ = ("rest",)

    def __init__(self, rest: bytes) -> None:
        self.rest = rest

    def __repr__(self) -> str:
        return f"Upgrade({len(self.rest)} bytes)"
