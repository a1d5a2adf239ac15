"""ResponseReader: upstream response bytes in, ResponseHead / body / END_OF_MESSAGE / Upgrade out.

`expect(head_request)` is called before each response, as the data plane does before sending
each request. A response the proxy cannot trust raises UpstreamProtocolError (spec §4: 502
upstream-protocol-error).
"""

from __future__ import annotations

from collections import namedtuple

import pytest

from meshproxy.http1.errors import UpstreamProtocolError
from meshproxy.http1.events import END_OF_MESSAGE, ResponseHead, Upgrade
from meshproxy.http1.reader import MAX_HEADER_BYTES
from meshproxy.http1.response_reader import ResponseReader
from meshproxy.http1.writer import informational_bytes, response_head_bytes

RESP_FIELDS = (
    "status", "reason", "version", "headers", "content_length", "chunked", "keep_alive",
    "upgrade", "close_delimited",
)
# Every ResponseHead field, with the values of `HTTP/1.1 200 OK` as defaults.
Resp = namedtuple(
    "Resp", RESP_FIELDS, defaults=(200, b"OK", "1.1", [], None, False, True, None, False)
)
END = "END_OF_MESSAGE"


def describe(events: list) -> list:
    """Returns the events as comparable values; adjacent body pieces are joined into one."""
    out: list = []
    for event in events:
        if isinstance(event, ResponseHead):
            out.append(Resp(*(getattr(event, name) for name in RESP_FIELDS)))
        elif event is END_OF_MESSAGE:
            out.append(END)
        elif isinstance(event, Upgrade):
            out.append(("Upgrade", event.rest))
        elif isinstance(event, bytes):
            assert event, "a body event never carries zero bytes"
            if out and isinstance(out[-1], bytes):
                out[-1] += event
            else:
                out.append(event)
        else:
            raise AssertionError(f"unexpected event {event!r}")
    return out


def exchange(reader: ResponseReader, data: bytes, *, head_request: bool = False,
             size: int | None = None) -> list:
    """Returns the described events of one response fed after `expect(head_request)`."""
    reader.expect(head_request)
    step = size or max(len(data), 1)
    events: list = []
    for start in range(0, len(data), step):
        new = reader.feed(data[start:start + step])
        events += new
        if new and isinstance(new[-1], Upgrade):
            events[-1] = Upgrade(new[-1].rest + data[start + step:])
            break
    return describe(events)


def one(data: bytes, *, head_request: bool = False, size: int | None = None) -> list:
    return exchange(ResponseReader(), data, head_request=head_request, size=size)


NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Next: 1\r\n\r\nnext"
NEXT_EVENTS = [Resp(headers=[(b"X-Next", b"1")], content_length=4), b"next", END]


# -- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, 1, 5])
def test_content_length_response(size: int | None) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    assert one(data, size=size) == [
        Resp(headers=[(b"Content-Type", b"text/plain")], content_length=5), b"hello", END,
    ]


@pytest.mark.parametrize("size", [None, 1, 5])
def test_chunked_response_drops_extensions_and_trailers(size: int | None) -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 9\r\n\r\n"
    )
    assert one(data, size=size) == [Resp(chunked=True), b"hello world", END]


@pytest.mark.parametrize(
    ("framing", "fields"),
    [
        (b"", {}),
        (b"Transfer-Encoding: gzip\r\n", {}),
        (b"Transfer-Encoding: chunked, gzip\r\n", {}),
        (b"Connection: keep-alive\r\n", {}),
    ],
)
def test_close_delimited_body_ends_at_eof(framing: bytes, fields: dict) -> None:
    reader = ResponseReader()
    reader.expect(False)
    events = reader.feed(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + framing + b"\r\nabc")
    events += reader.feed(b"def")
    assert describe(events) == [
        Resp(headers=[(b"X-A", b"1")], keep_alive=False, close_delimited=True),
        b"abcdef",
    ]
    assert describe(reader.feed_eof()) == [END]


@pytest.mark.parametrize(
    ("status_line", "header_lines", "fields"),
    [
        (b"HTTP/1.1 200 OK", b"", {}),
        (b"HTTP/1.1 200 OK", b"Connection: close\r\n", {"keep_alive": False}),
        (b"HTTP/1.1 200 OK", b"Connection: CLOSE\r\n", {"keep_alive": False}),
        (b"HTTP/1.0 200 OK", b"", {"version": "1.0", "keep_alive": False}),
        (b"HTTP/1.0 200 OK", b"Connection: keep-alive\r\n", {"version": "1.0"}),
        (b"HTTP/1.1 404 Not Found", b"", {"status": 404, "reason": b"Not Found"}),
        (b"HTTP/1.1 200 ", b"", {"reason": b""}),
        (b"HTTP/1.1 200 All Good Here", b"", {"reason": b"All Good Here"}),
        (b"HTTP/1.1 599 Custom", b"", {"status": 599, "reason": b"Custom"}),
    ],
)
def test_status_line_and_keep_alive(status_line: bytes, header_lines: bytes,
                                    fields: dict) -> None:
    data = status_line + b"\r\n" + header_lines + b"Content-Length: 2\r\n\r\nok"
    assert one(data) == [Resp(content_length=2, **fields), b"ok", END]


def test_hop_by_hop_and_framing_fields_are_removed() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Trailer: X-Sum\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nX-Keep: 2\r\n"
        b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    )
    [head, end] = one(data)
    assert head.headers == [(b"X-Keep", b"2"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")]
    assert head.content_length == 0
    assert end == END


# -- responses without a body --------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "content_length"),
    [(b"Content-Length: 1234\r\n", 1234), (b"Transfer-Encoding: chunked\r\n", None),
     (b"", None)],
    ids=["content-length", "chunked", "none"],
)
@pytest.mark.parametrize("size", [None, 1])
def test_head_response_has_no_body_and_next_response_parses(
    framing: bytes, content_length: int | None, size: int | None
) -> None:
    """Content-Length on a HEAD response is the size a GET would get (RFC 9110 §9.3.2):
    reported for forwarding, never read as framing."""
    reader = ResponseReader()
    data = b"HTTP/1.1 200 OK\r\nETag: \"x\"\r\n" + framing + b"\r\n"
    # The method alone sets the length (zero), so the connection stays reusable even when
    # the response names no framing (RFC 9112 §6.3 rule 1, §9.3).
    assert exchange(reader, data, head_request=True, size=size) == [
        Resp(headers=[(b"ETag", b'"x"')], content_length=content_length), END,
    ]
    assert not reader.in_message
    assert exchange(reader, NEXT, size=size) == NEXT_EVENTS
    assert reader.feed_eof() == []


def test_body_bytes_after_a_head_response_end_the_connection_not_the_response() -> None:
    """A server that sends a body with its answer to HEAD: the client gets the response (it
    ended at its head), and the connection is not reused."""
    reader = ResponseReader()
    reader.expect(True)
    events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert describe(events) == [Resp(content_length=5, keep_alive=False), END]


def test_body_bytes_in_a_later_read_after_a_head_response_are_refused() -> None:
    """Split by TCP, the response has ended before the stray bytes come: they are bytes on
    an idle connection (which the upstream connection closes)."""
    reader = ResponseReader()
    reader.expect(True)
    assert describe(reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")) == [
        Resp(content_length=5), END]
    with pytest.raises(UpstreamProtocolError):
        reader.feed(b"hello")


@pytest.mark.parametrize(
    ("status_line", "framing", "content_length"),
    [
        (b"HTTP/1.1 204 No Content", b"", None),
        (b"HTTP/1.1 204 No Content", b"Content-Length: 10\r\n", None),
        (b"HTTP/1.1 304 Not Modified", b"", None),
        # a 304's Content-Length is the size of the selected representation (RFC 9110 §8.6)
        (b"HTTP/1.1 304 Not Modified", b"Content-Length: 10\r\n", 10),
    ],
)
def test_204_and_304_have_no_body(status_line: bytes, framing: bytes,
                                  content_length: int | None) -> None:
    reader = ResponseReader()
    data = status_line + b"\r\nETag: \"e\"\r\n" + framing + b"\r\n"
    _, status, reason = status_line.split(b" ", 2)
    assert exchange(reader, data) == [
        Resp(status=int(status), reason=reason, headers=[(b"ETag", b'"e"')],
             content_length=content_length),
        END,
    ]
    assert exchange(reader, NEXT) == NEXT_EVENTS


# -- interim responses and upgrade ---------------------------------------------------------


@pytest.mark.parametrize("size", [None, 1])
def test_interim_responses_then_final(size: int | None) -> None:
    """1xx heads are passed on; only the final response ends the exchange."""
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert one(data, size=size) == [
        Resp(status=100, reason=b"Continue"),
        Resp(status=103, reason=b"Early Hints", headers=[(b"Link", b"</s.css>; rel=preload")]),
        Resp(content_length=2), b"ok", END,
    ]


def test_interim_response_leaves_the_exchange_open() -> None:
    reader = ResponseReader()
    reader.expect(False)
    [head, *rest] = reader.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert head.informational
    assert rest == []
    assert reader.in_message
    with pytest.raises(UpstreamProtocolError):
        reader.feed_eof()


def test_interim_response_before_head_response() -> None:
    reader = ResponseReader()
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"
    assert exchange(reader, data, head_request=True) == [
        Resp(status=100, reason=b"Continue"), Resp(content_length=7), END,
    ]
    assert exchange(reader, NEXT) == NEXT_EVENTS


@pytest.mark.parametrize("rest", [b"", b"\x81\x02hi", b"HTTP/1.1 200 OK\r\n\r\n"])
@pytest.mark.parametrize("size", [None, 1])
def test_101_switches_to_upgrade_with_the_exact_rest(rest: bytes, size: int | None) -> None:
    data = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" + rest
    )
    assert one(data, size=size) == [
        Resp(status=101, reason=b"Switching Protocols", upgrade=b"websocket",
             headers=[(b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]),
        ("Upgrade", rest),
    ]


# -- truncation and EOF --------------------------------------------------------------------


def test_eof_between_responses_is_clean() -> None:
    reader = ResponseReader()
    assert reader.feed_eof() == []
    exchange(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert not reader.in_message
    assert reader.feed_eof() == []


@pytest.mark.parametrize(
    "data",
    [
        b"H",
        b"HTTP/1.1 20",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
    ],
)
def test_response_cut_short_is_an_upstream_protocol_error(data: bytes) -> None:
    reader = ResponseReader()
    reader.expect(False)
    reader.feed(data)
    assert reader.in_message
    with pytest.raises(UpstreamProtocolError):
        reader.feed_eof()


# -- refused -------------------------------------------------------------------------------

BROKEN = {
    "not-http": b"hello world\r\n\r\n",
    "html": b"<html><body>oops</body></html>",
    "status-letters": b"HTTP/1.1 abc OK\r\n\r\n",
    "status-four-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "status-below-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-zero": b"HTTP/1.1 000 Odd\r\nContent-Length: 0\r\n\r\n",
    "version-bad": b"HTTP/1.x 200 OK\r\nContent-Length: 0\r\n\r\n",
    "nul-in-reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    "ctl-in-reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    "del-in-reason": b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 0\r\n\r\n",
    "lf-in-reason": b"HTTP/1.1 200 OK\nSet-Cookie: a=1\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "bare-cr": b"HTTP/1.1 200 OK\r\nX-A: b\rc\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "duplicate-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "negative-cl": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "plus-cl": b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk-size-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"f" * 17 + b"\r\n",
    "chunk-missing-crlf": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcX\r\n",
    "101-without-connection-upgrade": b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("size", [None, 1], ids=["whole", "bytewise"])
def test_broken_response_is_an_upstream_protocol_error(name: str, size: int | None) -> None:
    with pytest.raises(UpstreamProtocolError) as excinfo:
        one(BROKEN[name], size=size)
    assert excinfo.type is UpstreamProtocolError
    assert (excinfo.value.status, excinfo.value.reason) == (502, "upstream-protocol-error")


# -- head size limit -----------------------------------------------------------------------


def test_response_head_of_exactly_64_kib_is_accepted() -> None:
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: "
    end = b"\r\n\r\n"
    data = start + b"p" * (MAX_HEADER_BYTES - len(start) - len(end)) + end
    assert len(data) == 64 * 1024
    for size in (None, 1000):
        [head, end_event] = one(data, size=size)
        assert head.headers[0][0] == b"X-Pad"
        assert end_event == END


def _over_limit(lines: int) -> bytes:
    """Returns a response whose field lines alone total MAX_HEADER_BYTES + 1 bytes."""
    fields = [b"Content-Length: 0\r\n"]
    left = MAX_HEADER_BYTES + 1 - len(fields[0])
    per_line = left // lines
    for i in range(lines):
        size = per_line if i < lines - 1 else left - per_line * (lines - 1)
        prefix = b"X-F%05d: " % i
        fields.append(prefix + b"v" * (size - len(prefix) - 2) + b"\r\n")
    return b"HTTP/1.1 200 OK\r\n" + b"".join(fields) + b"\r\n"


@pytest.mark.parametrize("lines", [1, 100])
@pytest.mark.parametrize("size", [None, 1000], ids=["whole", "1000"])
def test_response_head_over_64_kib_is_refused(lines: int, size: int | None) -> None:
    with pytest.raises(UpstreamProtocolError):
        one(_over_limit(lines), size=size)


def test_response_reason_over_64_kib_is_refused() -> None:
    data = b"HTTP/1.1 200 " + b"r" * MAX_HEADER_BYTES + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(UpstreamProtocolError):
        one(data, size=1000)


def test_unfinished_response_field_line_over_64_kib_is_refused_before_it_ends() -> None:
    reader = ResponseReader()
    reader.expect(False)
    reader.feed(b"HTTP/1.1 200 OK\r\nX-Big: ")
    with pytest.raises(UpstreamProtocolError):
        for _ in range(80):  # 80 KiB of one field value, never terminated
            reader.feed(b"x" * 1024)


# -- a connection's sequence of exchanges --------------------------------------------------


def test_keep_alive_connection_runs_several_exchanges() -> None:
    reader = ResponseReader()
    assert exchange(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na") == [
        Resp(content_length=1), b"a", END,
    ]
    assert exchange(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                    head_request=True) == [Resp(content_length=9), END]
    assert exchange(reader, b"HTTP/1.1 204 No Content\r\n\r\n") == [
        Resp(status=204, reason=b"No Content"), END,
    ]
    assert exchange(reader, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"1\r\nb\r\n0\r\n\r\n") == [Resp(chunked=True), b"b", END]
    assert exchange(reader, NEXT, size=3) == NEXT_EVENTS
    assert reader.feed_eof() == []


# -- the head goes on as the bytes received ---------------------------------------------------


NGINX_LIKE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-TYPE:  text/plain \r\n"
              b"Content-Length: 2\r\nConnection: keep-alive\r\nX-Odd:\tv1, v2\r\n\r\nok")


@pytest.mark.parametrize("size", [None, 1, 7, 40])
def test_response_head_is_forwarded_as_received_minus_framing_lines(size: int | None) -> None:
    """The client gets the upstream's header lines byte for byte (case, spacing) without the
    framing and hop-by-hop ones, which the proxy writes itself, however TCP split the head."""
    reader = ResponseReader()
    reader.expect(False)
    events: list = []
    step = size or len(NGINX_LIKE)
    for start in range(0, len(NGINX_LIKE), step):
        events += reader.feed(NGINX_LIKE[start:start + step])
    head = events[0]
    assert isinstance(head, ResponseHead)
    out = response_head_bytes(head, chunked=False, keep_alive=True, client_version="1.1")
    assert out == (b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-TYPE:  text/plain \r\n"
                   b"X-Odd:\tv1, v2\r\ncontent-length: 2\r\n\r\n")
    # Read as fields, the same lines give (name, value) pairs without the whitespace around
    # values; from then on the pairs are what is written.
    assert head.headers == [(b"Server", b"nginx"), (b"content-TYPE", b"text/plain"),
                            (b"X-Odd", b"v1, v2")]
    head.headers.append((b"x-added", b"1"))
    assert response_head_bytes(head, chunked=False, keep_alive=True, client_version="1.1") == (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-TYPE: text/plain\r\nX-Odd: v1, v2\r\n"
        b"x-added: 1\r\ncontent-length: 2\r\n\r\n")


def test_fields_named_by_connection_are_not_forwarded() -> None:
    data = (b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nX-Kept: 2\r\n"
            b"Content-Length: 0\r\n\r\n")
    [head, end] = ResponseReader().feed(data)
    out = response_head_bytes(head, chunked=False, keep_alive=False, client_version="1.1")
    assert out == (b"HTTP/1.1 200 OK\r\nX-Kept: 2\r\ncontent-length: 0\r\n"
                   b"connection: close\r\n\r\n")


def test_interim_then_final_in_one_read_each_keep_their_own_lines() -> None:
    data = (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nX-Final: 1\r\nContent-Length: 0\r\n\r\n")
    [early, final, end] = ResponseReader().feed(data)
    assert informational_bytes(early) == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    assert response_head_bytes(final, chunked=False, keep_alive=True, client_version="1.1") == (
        b"HTTP/1.1 200 OK\r\nX-Final: 1\r\ncontent-length: 0\r\n\r\n")
    assert end is END_OF_MESSAGE


def test_a_second_response_in_the_same_read_ends_the_connection_after_the_first() -> None:
    """A server that answers twice cannot be trusted with the next request: the first
    response goes on whole, and its connection is not reused."""
    data = NEXT + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    reader = ResponseReader()
    reader.expect(False)
    assert describe(reader.feed(data)) == [
        Resp(headers=[(b"X-Next", b"1")], content_length=4, keep_alive=False), b"next", END]
