"""Sans-I/O HTTP/1.1 request reader: a client's bytes in, events out (httptools/llhttp
underneath). The upstream side's reader is http1/response_reader.py.

llhttp already refuses the classic smuggling vectors (Content-Length with Transfer-Encoding,
duplicate Content-Length, bad chunk sizes, obs-fold, bare CR or LF, NUL in values, a request
Transfer-Encoding that does not end in chunked). On top of it this reader enforces what a proxy
needs and llhttp leaves open: a 64 KiB head limit (431), Host rules (RFC 9112 §3.2),
Transfer-Encoding on HTTP/1.0 (RFC 9112 §6.1), transfer codings other than plain `chunked`.
"""

from __future__ import annotations

from typing import Final

import httptools

from meshproxy.http1.errors import BadRequest, HeadersTooLarge, ProxyError
from meshproxy.http1.events import END_OF_MESSAGE, HeaderList, RequestHead, Upgrade
from meshproxy.http1.headers import FRAMING_AND_HOP, connection_tokens, drop_connection_named

MAX_HEADER_BYTES: Final = 64 * 1024


class _HeadCollector:
    """Shared header bookkeeping for both directions (called from llhttp callbacks)."""

    __slots__ = (
        "_headers", "_special", "_head_bytes", "_max_head", "_in_body", "_events", "_error",
        "_parser", "_mid_head", "_unparsed",
    )

    # Set by each direction's __init__ (declared here for the methods below).
    _max_head: int
    _events: list
    _error: ProxyError | None
    _mid_head: bool

    def _reset_head(self) -> None:
        self._headers: HeaderList = []
        self._special: HeaderList = []
        self._head_bytes = 0
        self._in_body = False
        # Bytes received while a head was incomplete. httptools holds an unfinished field line
        # internally and only reports it once its line ends, so the 64 KiB limit is also
        # checked against what arrived, not just against the fields reported.
        self._unparsed = 0

    def _count_unfinished(self, data: bytes) -> bool:
        """Call before feeding: returns True when a head was incomplete when `data` came."""
        if self._mid_head:
            self._unparsed += len(data)
            return True
        return False

    def _check_unfinished(self) -> None:
        """Call after feeding: refuse a head that is still incomplete and too large."""
        if self._mid_head and max(self._unparsed, self._head_bytes) > self._max_head:
            raise self._too_large()

    def _head_done(self) -> None:
        self._mid_head = False
        self._unparsed = 0

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def _too_large(self) -> ProxyError:
        """The error for a head over the limit; each direction names its own."""
        return HeadersTooLarge(f"head over {self._max_head} bytes")


class RequestReader(_HeadCollector):
    """Parses requests from a client connection.

    `feed(data)` returns a list of events: RequestHead, body `bytes`, END_OF_MESSAGE and, for
    an accepted Upgrade or CONNECT, Upgrade(rest) — after which the reader must not be fed.
    Raises BadRequest or HeadersTooLarge; the connection is then unusable (close it once the
    requests in the error's `completed` events, complete before the bad one, are answered).
    """

    __slots__ = ("_url_parts", "_head", "_last_head", "_upgrade_body", "_resume")

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._max_head = max_header_bytes
        self._events = []
        self._error = None
        self._head: RequestHead | None = None
        self._last_head: RequestHead | None = None
        self._url_parts: list = []
        self._mid_head = False
        self._upgrade_body = 0  # body bytes of an upgrade request still to come
        self._resume = False  # after that body, HTTP goes on (an upgrade not taken)
        self._reset_head()
        self._parser = httptools.HttpRequestParser(self)

    def _too_large(self) -> ProxyError:
        return HeadersTooLarge(f"request head over {self._max_head} bytes")

    @property
    def in_message(self) -> bool:
        """True between the first byte of a request and its end (for timeouts and EOF)."""
        return self._mid_head or self._head is not None or self._upgrade_body > 0

    def feed(self, data: bytes) -> list:
        """Parse `data`; return the events it completes. Raises BadRequest, HeadersTooLarge."""
        events = self._events = []
        if self._upgrade_body:
            resumed = self._take_upgrade_body(data, events)
            if resumed is None:
                return events
            data = resumed
        self._count_unfinished(data)
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = data[exc.args[0]:]
                head = self._last_head
                if head is not None and head.upgrade is None:
                    # llhttp switched, but the request does not upgrade by our rules (HTTP/1.0,
                    # RFC 9110 §7.8): go on parsing HTTP with a fresh parser, after the body
                    # llhttp skipped: parsed as a request, it would be one smuggled past
                    # every hop that reads it as this request's body.
                    self._parser = httptools.HttpRequestParser(self)
                    if head.content_length:
                        if events and events[-1] is END_OF_MESSAGE:
                            events.pop()
                        self._upgrade_body = head.content_length
                        self._resume = True
                        resumed = self._take_upgrade_body(rest, events)
                        if resumed is None:
                            break
                        rest = resumed
                    data = rest
                    continue
                self._upgraded(head, rest, events)
            except httptools.HttpParserError as exc:
                self._failed(exc, events)
            break
        self._check_unfinished()
        return events

    def _upgraded(self, head: RequestHead | None, rest: bytes, events: list) -> None:
        if head is not None and head.chunked:
            # Nothing of this request is handed over; the requests complete before it in
            # this read still are, as with any error (see _failed).
            for i in range(len(events) - 1, -1, -1):
                if events[i] is head:
                    del events[i:]
                    break
            self._error = BadRequest("an upgrade request with a chunked body")
            self._failed(self._error, events)
        if head is not None and head.content_length:
            # llhttp skips an upgrade request's body, but it is still this request's: only
            # what follows it belongs to the new protocol.
            if events and events[-1] is END_OF_MESSAGE:
                events.pop()
            self._upgrade_body = head.content_length
            self._take_upgrade_body(rest, events)
        else:
            events.append(Upgrade(rest))

    def _take_upgrade_body(self, data: bytes, events: list) -> bytes | None:
        """Take what `data` holds of the body llhttp skipped; return what follows it when
        HTTP goes on after it (None: the body is not over, or the connection upgraded)."""
        step = min(self._upgrade_body, len(data))
        if step:
            events.append(data[:step])
            self._upgrade_body -= step
        if self._upgrade_body:
            return None
        events.append(END_OF_MESSAGE)
        if self._resume:
            self._resume = False
            return data[step:]
        events.append(Upgrade(data[step:]))
        return None

    def _failed(self, exc: Exception, events: list) -> None:
        """Raise the error llhttp (or a rule) found, with the requests completed before it."""
        error, self._error = self._error, None
        if error is None:
            error = BadRequest(str(exc))
        # Requests that ended before the bad one in the same data are well-formed: they go
        # with the error, so that a pipelining client still gets their answers whatever the
        # TCP segmentation was. Nothing of the bad request itself is handed over.
        for i in range(len(events) - 1, -1, -1):
            if events[i] is END_OF_MESSAGE:
                error.completed = events[:i + 1]
                break
        raise error from None

    # llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()
        self._mid_head = True
        self._url_parts = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            # Trailer fields (after a chunked body). They are not forwarded: the proxy drops
            # the Trailer header too, so the next hop is never promised any.
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            self._error = self._too_large()
            raise self._error
        # llhttp drops the whitespace before a value, not after it (RFC 9110 §5.5: OWS is not
        # part of the value).
        value = value.rstrip(b" \t")
        lname = name.lower()
        if lname in FRAMING_AND_HOP:
            self._special.append((lname, value))
            if lname in (b"host", b"x-request-id", b"expect"):
                self._headers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_url(self, url: bytes) -> None:
        self._url_parts.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            self._error = self._too_large()
            raise self._error

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        target = b"".join(self._url_parts)
        head = RequestHead(parser.get_method(), target, version, self._headers)
        try:
            _apply_request_rules(head, self._special, parser.should_keep_alive())
        except BadRequest as exc:
            self._error = exc
            raise
        self._head_done()
        self._in_body = True
        self._head = self._last_head = head
        self._events.append(head)

    def on_message_complete(self) -> None:
        self._events.append(END_OF_MESSAGE)
        self._head = None
        self._url_parts = []


def _apply_request_rules(head: RequestHead, special: HeaderList, keep_alive: bool) -> None:
    """Fill the head's framing and connection fields from the special headers; raise BadRequest."""
    hosts = 0
    te_values: list[bytes] = []
    conn_values: list[bytes] = []
    for name, value in special:
        if name == b"host":
            hosts += 1
            head.host = value
        elif name == b"content-length":
            head.content_length = int(value)  # llhttp checked it is digits and not repeated
        elif name == b"transfer-encoding":
            te_values.append(value)
        elif name == b"connection":
            conn_values.append(value)
        elif name == b"upgrade":
            head.upgrade = value
        elif name == b"x-request-id":
            head.request_id = value
        elif name == b"expect":
            head.expect_continue = value.strip().lower() == b"100-continue"
    if head.version not in ("1.1", "1.0"):
        # HTTP/0.9 has no head to check, and HTTP/2 does not come as an HTTP/1 request line.
        raise BadRequest(f"HTTP/{head.version} is not HTTP/1.x")
    if head.version == "1.1" and hosts != 1:
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1; two could route differently per hop.
        raise BadRequest("HTTP/1.1 request needs exactly one Host header")
    if hosts > 1:
        raise BadRequest("more than one Host header")
    if te_values:
        if head.version != "1.1":
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = b",".join(te_values).replace(b" ", b"").replace(b"\t", b"").lower()
        if codings != b"chunked":
            # Anything but plain chunked would have to be decoded or passed on with a meaning
            # the next hop may read differently.
            raise BadRequest("unsupported Transfer-Encoding")
        head.chunked = True
    head.keep_alive = keep_alive
    if conn_values:
        head.connection_tokens = tokens = connection_tokens(conn_values)
        head.headers = drop_connection_named(head.headers, tokens)
    if head.upgrade is not None and (
        b"upgrade" not in head.connection_tokens or head.version != "1.1"
    ):
        # RFC 9110 §7.8: Upgrade counts only when Connection names it, and only in HTTP/1.1
        # (an HTTP/1.0 proxy on the way could have passed it on without understanding it).
        head.upgrade = None
    if head.method == b"CONNECT":
        raise BadRequest("CONNECT is not supported")
