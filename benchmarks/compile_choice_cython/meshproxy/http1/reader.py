"""Sans-I/O HTTP/1.1 readers: bytes in, events out (httptools/llhttp underneath).

llhttp already refuses the classic smuggling vectors (Content-Length with Transfer-Encoding,
duplicate Content-Length, bad chunk sizes, obs-fold, bare CR or LF, NUL in values, a request
Transfer-Encoding that does not end in chunked). On top of it these readers enforce what a proxy
needs and llhttp leaves open: a 64 KiB head limit (431), Host rules (RFC 9112 §3.2),
Transfer-Encoding on HTTP/1.0 (RFC 9112 §6.1), transfer codings other than plain `chunked`,
and responses without a body by request method (HEAD) and status (1xx, 204, 304).
"""

from __future__ import annotations

import re
from typing import Final

import cython
import httptools

from meshproxy.http1.errors import (
    BadRequest, HeadersTooLarge, ProxyError, UpstreamProtocolError,
)
if cython.compiled:
    from cython.cimports.meshproxy.http1.events import RequestHead, ResponseHead, Upgrade
else:
    from meshproxy.http1.events import RequestHead, ResponseHead, Upgrade
from meshproxy.http1.events import END_OF_MESSAGE, HeaderList
from meshproxy.http1.headers import FRAMING_AND_HOP, connection_tokens, drop_connection_named

MAX_HEADER_BYTES: Final = 64 * 1024
_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@cython.cclass
class _HeadCollector:
    """Shared header bookkeeping for both directions (called from llhttp callbacks)."""

    _headers: list
    _special: list
    _head_bytes: cython.Py_ssize_t
    _max_head: cython.Py_ssize_t
    _in_body: cython.bint
    _events: list
    _error: object
    _parser: object
    _mid_head: cython.bint
    _unparsed: cython.Py_ssize_t

    @cython.cfunc
    def _reset_head(self) -> None:
        self._headers = []
        self._special = []
        self._head_bytes = 0
        self._in_body = False
        # Bytes received while a head was incomplete. httptools holds an unfinished field line
        # internally and only reports it once its line ends, so the 64 KiB limit is also
        # checked against what arrived, not just against the fields reported.
        self._unparsed = 0

    @cython.cfunc
    def _count_unfinished(self, data: bytes) -> cython.bint:
        """Call before feeding: returns True when a head was incomplete when `data` came."""
        if self._mid_head:
            self._unparsed += len(data)
            return True
        return False

    @cython.cfunc
    def _check_unfinished(self) -> None:
        """Call after feeding: refuse a head that is still incomplete and too large."""
        if self._mid_head and max(self._unparsed, self._head_bytes) > self._max_head:
            raise self._too_large()

    @cython.cfunc
    def _head_done(self) -> None:
        self._mid_head = False
        self._unparsed = 0

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
        lname: bytes = name.lower()
        if lname in FRAMING_AND_HOP:
            self._special.append((lname, value))
            if lname in (b"host", b"x-request-id", b"expect"):
                self._headers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    @cython.ccall
    def _too_large(self):
        """The error for a head over the limit; each direction names its own."""
        return HeadersTooLarge(f"head over {self._max_head} bytes")


@cython.cclass
class RequestReader(_HeadCollector):
    """Parses requests from a client connection.

    `feed(data)` returns a list of events: RequestHead, body `bytes`, END_OF_MESSAGE and, for
    an accepted Upgrade or CONNECT, Upgrade(rest) — after which the reader must not be fed.
    Raises BadRequest or HeadersTooLarge; the connection is then unusable (close it once the
    requests in the error's `completed` events, complete before the bad one, are answered).
    """

    _url_parts: list
    _head: object
    _last_head: object
    _upgrade_body: cython.Py_ssize_t

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._max_head = max_header_bytes
        self._events = []
        self._error = None
        self._head = None
        self._last_head = None
        self._url_parts = []
        self._mid_head = False
        self._upgrade_body = 0  # body bytes of an upgrade request still to come
        self._reset_head()
        self._parser = httptools.HttpRequestParser(self)

    @cython.ccall
    def _too_large(self):
        return HeadersTooLarge(f"request head over {self._max_head} bytes")

    @property
    def in_message(self) -> bool:
        """True between the first byte of a request and its end (for timeouts and EOF)."""
        return self._mid_head or self._head is not None or self._upgrade_body > 0

    def feed(self, data: bytes) -> list:
        """Parse `data`; return the events it completes. Raises BadRequest, HeadersTooLarge."""
        events = self._events = []
        if self._upgrade_body:
            self._take_upgrade_body(data, events)
            return events
        self._count_unfinished(data)
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = data[exc.args[0]:]
                head = self._last_head
                if head is not None and head.upgrade is None:
                    # llhttp switched, but the request does not upgrade by our rules (HTTP/1.0,
                    # RFC 9110 §7.8): go on parsing HTTP with a fresh parser.
                    self._parser = httptools.HttpRequestParser(self)
                    data = rest
                    continue
                self._upgraded(head, rest, events)
            except httptools.HttpParserError as exc:
                self._failed(exc, events)
            break
        self._check_unfinished()
        return events

    @cython.cfunc
    def _upgraded(self, head: RequestHead | None, rest: bytes, events: list) -> None:
        if head is not None and head.chunked:
            raise BadRequest("an upgrade request with a chunked body")
        if head is not None and head.content_length:
            # llhttp skips an upgrade request's body, but it is still this request's: only
            # what follows it belongs to the new protocol.
            if events and events[-1] is END_OF_MESSAGE:
                events.pop()
            self._upgrade_body = head.content_length
            self._take_upgrade_body(rest, events)
        else:
            events.append(Upgrade(rest))

    @cython.cfunc
    def _take_upgrade_body(self, data: bytes, events: list) -> None:
        step = min(self._upgrade_body, len(data))
        if step:
            events.append(data[:step])
            self._upgrade_body -= step
        if not self._upgrade_body:
            events.append(END_OF_MESSAGE)
            events.append(Upgrade(data[step:]))

    @cython.cfunc
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

    def on_url(self, url: bytes) -> None:
        self._url_parts.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            self._error = self._too_large()
            raise self._error

    def on_headers_complete(self) -> None:
        parser = self._parser
        head: RequestHead
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


@cython.cfunc
def _apply_request_rules(head: RequestHead, special: list, keep_alive: cython.bint) -> None:
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


@cython.cclass
class ResponseReader(_HeadCollector):
    """Parses responses from an upstream connection, one exchange at a time.

    Call `expect(head_request)` before each request is sent, so a response to HEAD is known to
    have no body. `feed(data)` returns ResponseHead (interim 1xx ones too), body bytes,
    END_OF_MESSAGE and, after 101, Upgrade(rest). `feed_eof()` returns the events an EOF
    completes (the end of a close-delimited body). Raises UpstreamProtocolError.
    """

    _no_body: cython.bint
    _renew: cython.bint
    _head: object
    _reason: bytes
    _interim: cython.bint
    _awaiting_final: cython.bint

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._max_head = max_header_bytes
        self._events = []
        self._error = None
        self._no_body = False
        self._renew = False
        self._head = None
        self._reason = b""
        self._interim = False
        self._awaiting_final = False  # an interim 1xx came; the final response has not
        self._mid_head = False
        self._reset_head()
        self._parser = httptools.HttpResponseParser(self)

    @cython.ccall
    def _too_large(self):
        return UpstreamProtocolError(f"response head over {self._max_head} bytes")

    @property
    def in_message(self) -> bool:
        """True while a response has started and not ended."""
        return self._mid_head or self._head is not None or self._awaiting_final

    def expect(self, head_request: bool) -> None:
        """Prepare for the response to the next request; `head_request` for method HEAD."""
        self._no_body = head_request

    def feed(self, data: bytes) -> list:
        """Parse `data`; return the events it completes. Raises UpstreamProtocolError."""
        events = self._events = []
        self._count_unfinished(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            events.append(Upgrade(data[exc.args[0]:]))
        except httptools.HttpParserError as exc:
            error, self._error = self._error, None
            if error is not None:
                raise error from None
            raise UpstreamProtocolError(str(exc)) from None
        self._check_unfinished()
        if self._renew:
            # A response to HEAD ended at its head; llhttp would have read a body by its
            # Content-Length, so the next response gets a fresh parser.
            self._renew = False
            self._parser = httptools.HttpResponseParser(self)
        return events

    def feed_eof(self) -> list:
        """The upstream closed. Return [END_OF_MESSAGE] if that ends a close-delimited body.

        Raises UpstreamProtocolError when a response was cut short (mid-head, or before its
        Content-Length or last chunk arrived).
        """
        head = self._head
        if head is not None and head.close_delimited:
            self._head = None
            return [END_OF_MESSAGE]
        if self.in_message:
            raise UpstreamProtocolError("upstream closed mid-response")
        return []

    # llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()
        self._mid_head = True
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._head_bytes += len(reason)
        if self._head_bytes > self._max_head:
            self._error = self._too_large()
            raise self._error

    def on_headers_complete(self) -> None:
        parser = self._parser
        status: cython.int = parser.get_status_code()
        head: ResponseHead
        reason = self._reason
        if status < 100 or _BAD_REASON.search(reason) is not None:
            # RFC 9112 §4: a three-digit status 1xx-5xx, and a reason of visible characters,
            # spaces and tabs; anything else would be passed on to the client as it came.
            self._error = UpstreamProtocolError("malformed status line")
            raise self._error
        self._head_done()
        self._awaiting_final = 100 <= status < 200 and status != 101
        head = ResponseHead(status, reason, parser.get_http_version(), self._headers)
        te_values: list[bytes] = []
        conn_values: list[bytes] = []
        for name, value in self._special:
            if name == b"content-length":
                head.content_length = int(value)
            elif name == b"transfer-encoding":
                te_values.append(value)
            elif name == b"connection":
                conn_values.append(value)
            elif name == b"upgrade":
                head.upgrade = value
            elif name == b"host" or name == b"x-request-id" or name == b"expect":
                pass  # kept in headers as received
        head.keep_alive = parser.should_keep_alive()
        tokens = connection_tokens(conn_values) if conn_values else ()
        if tokens:
            head.headers = drop_connection_named(head.headers, tokens)
        bodiless = self._no_body or status < 200 or status in (204, 304)
        if bodiless:
            # llhttp judges keep-alive as if a response without framing ran to the close; one
            # that has no body by its request or status ends at its head (RFC 9112 §9.3).
            if head.version == "1.1":
                head.keep_alive = b"close" not in tokens
            else:
                head.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
            # Content-Length of a response to HEAD, or of a 304, is the size the full response
            # would have had (RFC 9110 §8.6, §9.3.2, §15.4.5): it is forwarded, never read as
            # framing. 1xx and 204 must not carry it at all.
            if status < 200 or status == 204:
                head.content_length = None
        elif te_values:
            last = b",".join(te_values).split(b",")[-1].strip().lower()
            if last == b"chunked":
                head.chunked = True
            else:
                # RFC 9112 §6.3 rule 4: a final coding other than chunked is read until close.
                head.close_delimited = True
                head.keep_alive = False
        elif head.content_length is None:
            head.close_delimited = True
            head.keep_alive = False
        self._in_body = True
        self._head = head
        self._events.append(head)
        # llhttp completes a 1xx as a message of its own; it is not the end of the exchange:
        # the final response is still to come (RFC 9110 §15.2), or after 101 the Upgrade event.
        self._interim = status < 200
        if self._no_body and status >= 200 and status != 101:
            self._events.append(END_OF_MESSAGE)
            self._head = None
            self._head_bytes = 0
            self._renew = True
            self._no_body = False

    def on_body(self, body: bytes) -> None:
        if self._renew:
            self._error = UpstreamProtocolError("body sent in a response to HEAD")
            raise self._error
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self._renew:
            return  # already ended at the head (HEAD request)
        if self._interim:
            # The exchange stays open (in_message; an EOF now is a cut-off response).
            self._interim = False
            return
        self._events.append(END_OF_MESSAGE)
        self._head = None
        self._head_bytes = 0
