"""Sans-I/O HTTP/1.1 response reader: an upstream's bytes in, events out (llhttp through
httptools), one exchange at a time.

On top of llhttp it enforces what a proxy needs: a 64 KiB head limit, a status line the
client can be given as it came, responses without a body by request method (HEAD) and
status (1xx, 204, 304), and the framing the proxy must re-frame for its client. The head's
lines go on as the bytes received (see ResponseReader).
"""

from __future__ import annotations

import re
from typing import Final, NoReturn

import httptools

from meshproxy.http1.errors import ProxyError, UpstreamProtocolError
from meshproxy.http1.events import END_OF_MESSAGE, ResponseHead, Upgrade, split_header_lines
from meshproxy.http1.headers import (
    HOP_BY_HOP, connection_tokens, drop_connection_named, names_fields,
)
from meshproxy.http1.reader import MAX_HEADER_BYTES

_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# The framing and hop-by-hop fields of a response (RFC 9110 §7.6.1; Content-Length and
# Transfer-Encoding because the proxy writes the client's framing itself): cut out of the
# lines forwarded, read for the framing.
_RESPONSE_FRAMING_AND_HOP: Final = HOP_BY_HOP | {b"content-length"}
# Lower-cased first letter -> the lengths of the names beginning with it.
_SPECIAL_NAME_LENGTHS: Final[dict[int, tuple[int, ...]]] = {
    initial: tuple(sorted({len(n) for n in _RESPONSE_FRAMING_AND_HOP if n[0] == initial}))
    for initial in {n[0] for n in _RESPONSE_FRAMING_AND_HOP}
}


class _AfterResponse(UpstreamProtocolError):
    """A response began in the same read after the exchange's final response had ended."""


class ResponseReader:
    """Parses responses from an upstream connection, one exchange at a time.

    Call `expect(head_request)` before each request is sent, so a response to HEAD is known to
    have no body. `feed(data)` returns ResponseHead (interim 1xx ones too), body bytes,
    END_OF_MESSAGE and, after 101, Upgrade(rest). `feed_eof()` returns the events an EOF
    completes (the end of a close-delimited body). Raises UpstreamProtocolError.

    llhttp checks the whole head; this reader has no per-field callback. Once a head is
    complete it takes the header lines from the bytes received, cuts out the framing and
    hop-by-hop ones and keeps the rest as they came (`ResponseHead.raw`): a response head
    goes on to the client as those bytes, without a (name, value) pair per field. A response
    is what the proxy hardly ever changes, unlike a request, whose fields routing and trace
    propagation read.
    """

    __slots__ = (
        "_max_head", "_events", "_error", "_parser", "_no_body", "_renew", "_head",
        "_interim", "_awaiting_final", "_mid_head", "_data", "_start", "_partial",
        "_partial_size", "_last",
    )

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._max_head = max_header_bytes
        self._events: list = []
        self._error: ProxyError | None = None
        self._no_body = False
        self._renew = False
        self._head: ResponseHead | None = None
        self._interim = False
        self._awaiting_final = False  # an interim 1xx came; the final response has not
        self._mid_head = False
        self._data = b""  # the read being parsed (only during feed)
        # Where the head being read began in that read; -1 once a final response has ended
        # in it (what follows in the same read is not this exchange's).
        self._start = 0
        self._partial: list[bytes] = []  # a head begun in earlier reads: its bytes so far
        self._partial_size = 0
        self._last: ResponseHead | None = None  # the last head handed out
        self._parser = httptools.HttpResponseParser(self)

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
        self._data = data
        self._start = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            events.append(Upgrade(data[exc.args[0]:]))
        except httptools.HttpParserError as exc:
            error, self._error = self._error, None
            if isinstance(error, _AfterResponse) or self._start < 0:
                # The exchange's response is complete and goes on as it is; the connection
                # cannot be trusted with another one. (Bytes after it that llhttp finds
                # malformed, say a chunk after the head of a response to HEAD, are no
                # different from a second response: the same whichever read they come in.)
                if self._last is not None:
                    self._last.keep_alive = False
                self._parser = httptools.HttpResponseParser(self)
                self._mid_head = False
                self._data = b""
                return events
            self._data = b""
            if error is not None:
                raise error from None
            raise UpstreamProtocolError(str(exc)) from None
        if self._mid_head:
            # The head goes on in the next read: keep what has arrived of it.
            self._partial.append(data if self._partial else data[self._start:])
            self._partial_size += len(self._partial[-1])
            if self._partial_size > self._max_head:
                self._data = b""
                raise self._too_large()
        self._data = b""
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

    def _too_large(self) -> ProxyError:
        return UpstreamProtocolError(f"response head over {self._max_head} bytes")

    def _fail(self, error: ProxyError) -> NoReturn:
        self._error = error
        raise error

    # llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._start < 0:
            self._fail(_AfterResponse("bytes after the response"))
        self._mid_head = True

    def on_headers_complete(self) -> None:
        data = self._data
        start = self._start
        partial = self._partial
        if partial:
            # The head began in an earlier read (the uncommon case: a head split by TCP).
            before = self._partial_size
            partial.append(data)
            buf = b"".join(partial)
            self._partial = []
            self._partial_size = 0
            start = 0
        else:
            before = 0
            buf = data
        while buf[start] == 13 or buf[start] == 10:  # llhttp skips empty lines before a head
            start += 1
        if buf[start] != 72:
            # llhttp also knows RTSP/ and ICE/ status lines; an HTTP proxy does not.
            self._fail(UpstreamProtocolError("not an HTTP response"))
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:  # llhttp accepts only CRLF line ends (strict mode): not expected
            self._fail(UpstreamProtocolError("malformed response head"))
        if end + 4 - start > self._max_head:
            self._fail(self._too_large())
        # The status line and the header lines; llhttp has checked them all.
        lines = buf[start:end].split(b"\r\n")
        status_line = lines[0]
        # "HTTP/d.d ddd", then the reason phrase after one more space (or nothing).
        reason = status_line[13:]
        parser = self._parser
        status = parser.get_status_code()
        if status < 100 or _BAD_REASON.search(reason) is not None:
            # RFC 9112 §4: a three-digit status 1xx-5xx, and a reason of visible characters,
            # spaces and tabs; anything else would be passed on to the client as it came.
            self._fail(UpstreamProtocolError("malformed status line"))
        if status_line[5] == 49 and status_line[7] == 49:
            version = "1.1"
        elif status_line[5] == 49 and status_line[7] == 48:
            version = "1.0"
        else:
            # llhttp also takes HTTP/0.9 and HTTP/2.0 status lines: neither is an HTTP/1.x
            # response (RFC 9112 §2.3), nor one the proxy may relay as HTTP/1.1.
            self._fail(UpstreamProtocolError("not an HTTP/1.x response"))
        self._mid_head = False
        # The next message in this read (a final response after a 1xx) begins here.
        self._start = end + 4 - before
        self._awaiting_final = 100 <= status < 200 and status != 101
        head = self._make_head(status, reason, version, lines,
                               buf[start + len(status_line) + 2:end + 2],
                               parser.should_keep_alive())
        self._head = self._last = head
        self._events.append(head)
        # llhttp completes a 1xx as a message of its own; it is not the end of the exchange:
        # the final response is still to come (RFC 9110 §15.2), or after 101 the Upgrade event.
        self._interim = status < 200
        if self._no_body and status >= 200 and status != 101:
            self._events.append(END_OF_MESSAGE)
            self._head = None
            self._start = -1
            self._renew = True
            self._no_body = False

    def _make_head(self, status: int, reason: bytes, version: str, lines: list[bytes],
                   raw: bytes, keep_alive: bool) -> ResponseHead:
        """The head of the status line and header `lines` (without their CRLFs), with its
        framing; `raw`: the same header lines as received, each with its CRLF."""
        content_length: int | None = None
        te_values: list[bytes] = []
        conn_values: list[bytes] = []
        upgrade: bytes | None = None
        kept: list[bytes] | None = None  # the pieces of `raw` kept, once one is cut out
        at = 0  # where the line being looked at begins in `raw`
        keep_from = 0  # where the piece being kept begins
        for i in range(1, len(lines)):
            line = lines[i]
            size = len(line)
            # A special field's name ends in a colon at its length (llhttp refuses whitespace
            # before the colon): most lines are turned away by two byte comparisons.
            lengths = _SPECIAL_NAME_LENGTHS.get(line[0] | 0x20)
            if lengths is not None:
                for n in lengths:
                    if size > n and line[n] == 58:
                        name = line[:n].lower()
                        if name in _RESPONSE_FRAMING_AND_HOP:
                            value = line[n + 1:].strip(b" \t")
                            if name == b"content-length":
                                # llhttp checked it is digits, and not repeated otherwise.
                                content_length = int(value)
                            elif name == b"transfer-encoding":
                                te_values.append(value)
                            elif name == b"connection":
                                conn_values.append(value)
                            elif name == b"upgrade":
                                upgrade = value
                            if kept is None:
                                kept = []
                            kept.append(raw[keep_from:at])
                            keep_from = at + size + 2
                        break
            at += size + 2
        if kept is not None:
            kept.append(raw[keep_from:])
            raw = b"".join(kept)
        tokens = connection_tokens(conn_values) if conn_values else ()
        if tokens and names_fields(tokens):
            # Connection names end-to-end fields to drop as well (rare): they go by name.
            head = ResponseHead(status, reason, version,
                                headers=drop_connection_named(split_header_lines(raw), tokens))
        else:
            head = ResponseHead(status, reason, version, raw=raw)
        head.content_length = content_length
        head.upgrade = upgrade
        head.keep_alive = keep_alive
        bodiless = self._no_body or status < 200 or status in (204, 304)
        if bodiless:
            # llhttp judges keep-alive as if a response without framing ran to the close; one
            # that has no body by its request or status ends at its head (RFC 9112 §9.3).
            if version == "1.1":
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
        return head

    def on_body(self, body: bytes) -> None:
        if self._renew:
            # A body after the head of a response to HEAD: the server broke the protocol, as
            # with a second response (the response went on whole at its head; the connection
            # is not reused), however TCP split it.
            self._fail(_AfterResponse("body sent in a response to HEAD"))
        if self._interim:
            # llhttp reads a body for a 1xx it does not know (104-199) that carries
            # Transfer-Encoding; a 1xx ends at its head (RFC 9110 §15.2): what follows it
            # would have to be the next response, and this is not one.
            self._fail(UpstreamProtocolError("a body in an interim (1xx) response"))
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
        self._start = -1
