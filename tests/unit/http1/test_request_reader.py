"""RequestReader: request bytes from a client in, RequestHead / body / END_OF_MESSAGE / Upgrade out.

Spec §4: HTTP/1.1 per RFC 9112, hop-by-hop headers per RFC 9110 §7.6.1, ambiguous framing
refused (400 bad-request), heads over 64 KiB refused (431 headers-too-large).
"""

from __future__ import annotations

from collections import namedtuple

import pytest

from meshproxy.http1.errors import BadRequest, HeadersTooLarge
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, Upgrade
from meshproxy.http1.reader import MAX_HEADER_BYTES, RequestReader

REQ_FIELDS = (
    "method", "target", "version", "headers", "host", "content_length", "chunked",
    "keep_alive", "upgrade", "connection_tokens", "request_id", "expect_continue",
)
# Every RequestHead field, with the values of `GET / HTTP/1.1` + `Host: a` as defaults.
Req = namedtuple(
    "Req", REQ_FIELDS,
    defaults=(b"GET", b"/", "1.1", [(b"Host", b"a")], b"a", None, False, True, None, (), None,
              False),
)
END = "END_OF_MESSAGE"


def describe(events: list) -> list:
    """Returns the events as comparable values; adjacent body pieces are joined into one."""
    out: list = []
    for event in events:
        if isinstance(event, RequestHead):
            out.append(Req(*(getattr(event, name) for name in REQ_FIELDS)))
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


def feed_whole(data: bytes) -> list:
    """Returns the described events of feeding `data` in one call."""
    return describe(RequestReader().feed(data))


def feed_pieces(data: bytes, size: int) -> list:
    """Returns the described events of feeding `data` `size` bytes at a time.

    Feeding stops at an Upgrade (the reader must not be fed after it); the bytes not fed are
    added to its `rest`, which is what the connection would hand to the tunnel.
    """
    reader = RequestReader()
    events: list = []
    for start in range(0, len(data), size):
        new = reader.feed(data[start:start + size])
        events += new
        if new and isinstance(new[-1], Upgrade):
            events[-1] = Upgrade(new[-1].rest + data[start + size:])
            break
    return describe(events)


def refused(data: bytes, size: int | None = None) -> BaseException:
    """Returns the exception the reader raises on `data` (whole, or `size` bytes per feed)."""
    reader = RequestReader()
    step = size or max(len(data), 1)
    with pytest.raises(Exception) as excinfo:
        for start in range(0, len(data), step):
            reader.feed(data[start:start + step])
    return excinfo.value


# -- heads ---------------------------------------------------------------------------------


def test_simple_get() -> None:
    assert feed_whole(b"GET /index.html?q=1 HTTP/1.1\r\nHost: example\r\n\r\n") == [
        Req(target=b"/index.html?q=1", headers=[(b"Host", b"example")], host=b"example"),
        END,
    ]


@pytest.mark.parametrize(
    ("request_line", "method", "target"),
    [
        (b"GET http://a.b:8080/x?y=1 HTTP/1.1", b"GET", b"http://a.b:8080/x?y=1"),
        (b"OPTIONS * HTTP/1.1", b"OPTIONS", b"*"),
        (b"DELETE /items/7 HTTP/1.1", b"DELETE", b"/items/7"),
        (b"PATCH /items/7 HTTP/1.1", b"PATCH", b"/items/7"),
    ],
)
def test_request_line_forms(request_line: bytes, method: bytes, target: bytes) -> None:
    assert feed_whole(request_line + b"\r\nHost: a\r\n\r\n") == [
        Req(method=method, target=target), END,
    ]


def test_headers_keep_order_case_and_duplicates() -> None:
    data = (
        b"GET / HTTP/1.1\r\nx-lower: 1\r\nHost: a\r\nX-UPPER: 2\r\nX-Mixed-Case: 3\r\n"
        b"x-lower: 4\r\nAccept: */*\r\n\r\n"
    )
    [head, end] = feed_whole(data)
    assert head.headers == [
        (b"x-lower", b"1"), (b"Host", b"a"), (b"X-UPPER", b"2"), (b"X-Mixed-Case", b"3"),
        (b"x-lower", b"4"), (b"Accept", b"*/*"),
    ]
    assert end == END


@pytest.mark.parametrize(
    "line",
    [
        b"Keep-Alive: timeout=5",
        b"Proxy-Connection: keep-alive",
        b"TE: trailers",
        b"Trailer: X-Checksum",
        b"Upgrade: websocket",
        b"Connection: keep-alive",
        b"KEEP-ALIVE: timeout=5",
        b"te: trailers",
    ],
)
def test_hop_by_hop_field_is_removed(line: bytes) -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: r-1\r\n" + line
        + b"\r\nExpect: 100-continue\r\nX-End: e\r\n\r\n"
    )
    [head, _] = feed_whole(data)
    assert head.headers == [
        (b"Host", b"a"), (b"X-Request-Id", b"r-1"), (b"Expect", b"100-continue"),
        (b"X-End", b"e"),
    ]


def test_framing_fields_are_removed_from_headers() -> None:
    [head, *_] = feed_whole(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    )
    assert head.headers == [(b"Host", b"a"), (b"X-A", b"1")]
    [head, *_] = feed_whole(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nab")
    assert head.headers == [(b"Host", b"a"), (b"X-A", b"1")]


@pytest.mark.parametrize(
    ("connection_lines", "kept", "tokens"),
    [
        ([b"Connection: X-Foo"], [(b"X-Bar", b"2"), (b"X-Baz", b"3")], (b"x-foo",)),
        ([b"Connection: x-foo, X-BAR"], [(b"X-Baz", b"3")], (b"x-foo", b"x-bar")),
        ([b"Connection: x-foo", b"connection: x-baz , close"], [(b"X-Bar", b"2")],
         (b"x-foo", b"x-baz", b"close")),
        ([b"Connection: close"], [(b"X-Foo", b"1"), (b"X-Bar", b"2"), (b"X-Baz", b"3")],
         (b"close",)),
    ],
)
def test_fields_named_by_connection_are_removed(
    connection_lines: list, kept: list, tokens: tuple
) -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(line + b"\r\n" for line in connection_lines)
        + b"X-Foo: 1\r\nX-Bar: 2\r\nX-Baz: 3\r\n\r\n"
    )
    [head, _] = feed_whole(data)
    assert head.headers == [(b"Host", b"a")] + kept
    assert head.connection_tokens == tokens


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-request-id\r\nX-Request-Id: r1\r\n\r\n",
         "request_id"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n", "host"),
    ],
    ids=["connection-names-x-request-id", "connection-names-host"],
)
def test_summary_fields_agree_with_forwarded_headers(data: bytes, expected: str) -> None:
    """What the head reports (host, request_id) is what its headers will carry upstream."""
    reader_head = RequestReader().feed(data)[0]
    header_name = {"request_id": b"x-request-id", "host": b"host"}[expected]
    assert getattr(reader_head, expected) == reader_head.header(header_name)


@pytest.mark.parametrize(
    ("head_lines", "body", "fields"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n", b"", {"keep_alive": True}),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n", b"",
         {"keep_alive": False, "connection_tokens": (b"close",)}),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n", b"",
         {"keep_alive": False, "connection_tokens": (b"close",)}),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n", b"",
         {"keep_alive": True, "connection_tokens": (b"keep-alive",)}),
        (b"GET / HTTP/1.0\r\n", b"",
         {"version": "1.0", "headers": [], "host": None, "keep_alive": False}),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n", b"",
         {"version": "1.0", "headers": [], "host": None, "keep_alive": True,
          "connection_tokens": (b"keep-alive",)}),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n", b"",
         {"version": "1.0", "headers": [], "host": None, "keep_alive": True,
          "connection_tokens": (b"keep-alive",)}),
        # Proxy-Connection: the old spelling clients configured with a proxy still send
        (b"GET / HTTP/1.0\r\nProxy-Connection: keep-alive\r\n", b"",
         {"version": "1.0", "headers": [], "host": None, "keep_alive": True}),
        (b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Connection: close\r\n", b"",
         {"keep_alive": False}),
        (b"GET / HTTP/1.0\r\nHost: a\r\n", b"", {"version": "1.0", "keep_alive": False}),
        (b"POST / HTTP/1.0\r\nContent-Length: 3\r\n", b"abc",
         {"method": b"POST", "version": "1.0", "headers": [], "host": None,
          "keep_alive": False, "content_length": 3}),
        (b"POST / HTTP/1.1\r\nHost: a\r\n", b"", {"method": b"POST"}),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n", b"",
         {"method": b"POST", "content_length": 0}),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n", b"abc",
         {"method": b"POST", "content_length": 3}),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3 \r\n", b"abc",
         {"method": b"POST", "content_length": 3}),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n", b"abc",
         {"method": b"POST", "chunked": True}),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n", b"abc",
         {"method": b"POST", "chunked": True}),
    ],
)
def test_framing_and_connection_summary(head_lines: bytes, body: bytes, fields: dict) -> None:
    wire_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if fields.get("chunked") else body
    assert feed_whole(head_lines + b"\r\n" + wire_body) == (
        [Req(**fields), *([body] if body else []), END]
    )


@pytest.mark.parametrize(
    ("lines", "upgrade", "tokens"),
    [
        (b"Connection: Upgrade\r\nUpgrade: websocket\r\n", b"websocket", (b"upgrade",)),
        (b"Connection: keep-alive, upgrade\r\nUpgrade: websocket\r\n", b"websocket",
         (b"keep-alive", b"upgrade")),
        (b"Upgrade: websocket\r\n", None, ()),
        (b"Connection: keep-alive\r\nUpgrade: websocket\r\n", None, (b"keep-alive",)),
    ],
)
def test_upgrade_counts_only_when_connection_names_it(
    lines: bytes, upgrade: bytes | None, tokens: tuple
) -> None:
    data = b"GET /chat HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n"
    head = Req(target=b"/chat", upgrade=upgrade, connection_tokens=tokens)
    tail = [("Upgrade", b"")] if upgrade else []
    assert feed_whole(data) == [head, END, *tail]


def test_upgrade_in_http10_request_is_ignored() -> None:
    """RFC 9110 §7.8: a server MUST ignore Upgrade received in an HTTP/1.0 request."""
    data = b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert feed_whole(data) == [
        Req(version="1.0", headers=[], host=None, keep_alive=False,
            connection_tokens=(b"upgrade",)),
        END,
    ]


@pytest.mark.parametrize(
    ("line", "request_id", "expect_continue"),
    [
        (b"X-Request-Id: 7f3a-11", b"7f3a-11", False),
        (b"x-request-id: abc", b"abc", False),
        (b"Expect: 100-continue", None, True),
        (b"Expect: 100-Continue", None, True),
        (b"Expect: something-else", None, False),
    ],
)
def test_request_id_and_expect_continue(
    line: bytes, request_id: bytes | None, expect_continue: bool
) -> None:
    [head, _] = feed_whole(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n")
    name, _, value = line.partition(b": ")
    assert head == Req(headers=[(b"Host", b"a"), (name, value)], request_id=request_id,
                       expect_continue=expect_continue)


def test_trailing_whitespace_is_not_part_of_a_field_value() -> None:
    """RFC 9110 §5.5: a field value excludes leading and trailing whitespace."""
    [head, _] = feed_whole(
        b"GET / HTTP/1.1\r\nHost: a \r\nX-Request-Id: r1\t\r\nX-A:  b c  \r\n\r\n"
    )
    assert head.host == b"a"
    assert head.request_id == b"r1"
    assert head.headers == [(b"Host", b"a"), (b"X-Request-Id", b"r1"), (b"X-A", b"b c")]


def test_connect_is_refused() -> None:
    error = refused(b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n")
    assert type(error) is BadRequest


# -- bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "body", "data"),
    [
        (b"Content-Length: 5\r\n", b"", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"Transfer-Encoding: chunked\r\n", b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        # chunk extensions are read past
        (b"Transfer-Encoding: chunked\r\n", b"5;name=value\r\nhello\r\n0;last\r\n\r\n",
         b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b'5;a="b c";d\r\nhello\r\n0\r\n\r\n', b"hello"),
        # trailer fields are dropped: they change nothing in the head and are not events
        (b"Transfer-Encoding: chunked\r\n",
         b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n", b"hello"),
    ],
)
def test_request_body(framing: bytes, body: bytes, data: bytes) -> None:
    head_bytes = b"POST /upload HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n"
    wire = head_bytes + (body or data)
    chunked = framing.startswith(b"Transfer")
    expected_head = Req(method=b"POST", target=b"/upload", chunked=chunked,
                        content_length=None if chunked else len(data))
    assert feed_whole(wire) == [expected_head, data, END]
    assert feed_pieces(wire, 1) == [expected_head, data, END]


def test_body_events_come_as_bytes_arrive() -> None:
    reader = RequestReader()
    [head] = reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")[:1]
    assert head.content_length == 10
    assert reader.feed(b"defg") == [b"defg"]
    assert reader.feed(b"hij") == [b"hij", END_OF_MESSAGE]


def test_pipelined_requests_in_one_feed() -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"PUT /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /4 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    assert feed_whole(data) == [
        Req(target=b"/1"), END,
        Req(method=b"POST", target=b"/2", content_length=3), b"abc", END,
        Req(method=b"PUT", target=b"/3", chunked=True), b"de", END,
        Req(target=b"/4", headers=[(b"Host", b"b")], host=b"b", keep_alive=False,
            connection_tokens=(b"close",)),
        END,
    ]


def test_pipelined_request_head_ends_in_next_feed() -> None:
    reader = RequestReader()
    first = reader.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHo")
    assert describe(first) == [Req(target=b"/1"), END]
    assert reader.in_message
    assert describe(reader.feed(b"st: a\r\n\r\n")) == [Req(target=b"/2"), END]
    assert not reader.in_message


STREAMS = {
    "get": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "content-length": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    "chunked": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-A: 1\r\n\r\n"
    ),
    "pipelined": (
        b"GET /1 HTTP/1.1\r\nHost: a\r\nX-Request-Id: r1\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
        b"GET /3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    ),
    "upgrade": (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x05hello\r\n\r\nGET / HTTP/1.1\r\n"
    ),
    "after-get-upgrade": (
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nxyz"
    ),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_feeding_in_pieces_gives_the_same_events(name: str, size: int) -> None:
    data = STREAMS[name]
    assert feed_pieces(data, size) == feed_whole(data)


# -- upgrade -------------------------------------------------------------------------------

UPGRADE_HEAD = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


@pytest.mark.parametrize(
    "rest",
    [b"", b"\x81\x85abcd\x00\x01\x02\x03\x04", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"\r\n"],
)
def test_upgrade_hands_over_the_exact_rest(rest: bytes) -> None:
    events = RequestReader().feed(UPGRADE_HEAD + rest)
    assert describe(events) == [
        Req(target=b"/ws", upgrade=b"websocket", connection_tokens=(b"upgrade",)), END,
        ("Upgrade", rest),
    ]


def test_upgrade_rest_is_relative_to_the_feed_that_ends_the_head() -> None:
    reader = RequestReader()
    assert reader.feed(UPGRADE_HEAD[:-3]) == []
    events = reader.feed(UPGRADE_HEAD[-3:] + b"frame")
    assert isinstance(events[-1], Upgrade)
    assert events[-1].rest == b"frame"


def test_upgrade_request_body_is_read_before_the_switch() -> None:
    """The body belongs to the HTTP/1.1 request; only what follows it is the new protocol."""
    data = (
        b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 3\r\n\r\nabcFRAMES"
    )
    assert feed_whole(data) == [
        Req(method=b"POST", target=b"/ws", content_length=3, upgrade=b"h2c",
            connection_tokens=(b"upgrade",)),
        b"abc", END, ("Upgrade", b"FRAMES"),
    ]


# -- refused: ambiguous framing and malformed syntax (RFC 9112) ----------------------------

H = b"Host: a\r\n"
SMUGGLING = {
    "cl-then-te": b"POST / HTTP/1.1\r\n" + H
    + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-then-cl": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "duplicate-cl-same": b"POST / HTTP/1.1\r\n" + H
    + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "duplicate-cl-different": b"POST / HTTP/1.1\r\n" + H
    + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc",
    "te-gzip": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc",
    "te-identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc",
    "te-chunked-gzip": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-gzip-chunked": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-gzip-then-chunked-lines": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-twice": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-two-lines": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-empty": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n\r\n",
    "te-on-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk-size-not-hex": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk-size-0x": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-negative": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-space": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\nabc\r\n",
    "chunk-size-overflow-2^64": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 + b"\r\nabc\r\n",
    "chunk-data-too-long": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    "chunk-bare-lf": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    "chunk-extension-nul": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n3;a\x00\r\nabc\r\n0\r\n\r\n",
    "obs-fold-space": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n\tc\r\n\r\n",
    "obs-fold-first-line": b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    "bare-lf-everywhere": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-lf-request-line": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare-lf-header-line": b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    "bare-lf-end-of-head": b"GET / HTTP/1.1\r\nHost: a\r\n\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n",
    "bare-cr-line-end": b"GET / HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n",
    "bare-cr-end-of-head": b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x01c\r\n\r\n",
    "del-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x7fc\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\n" + H + b"X\x00A: b\r\n\r\n",
    "nul-in-trailer": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: a\x00b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n",
    "space-before-colon-cl": b"POST / HTTP/1.1\r\n" + H + b"Content-Length : 3\r\n\r\nabc",
    "space-before-colon-te": b"POST / HTTP/1.1\r\n" + H
    + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "space-before-colon-host": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "tab-before-colon": b"GET / HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n",
    "empty-field-name": b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n",
    "no-colon": b"GET / HTTP/1.1\r\n" + H + b"X-A b\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n",
    "missing-host-11": b"GET / HTTP/1.1\r\n\r\n",
    "missing-host-11-with-fields": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two-hosts-same": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "two-hosts-different": b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    "two-hosts-http10": b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    "cl-negative": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
    "cl-plus": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\na",
    "cl-hex": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x1\r\n\r\na",
    "cl-empty": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n",
    "cl-inner-space": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\n",
    "cl-overflow": b"POST / HTTP/1.1\r\n" + H
    + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "method-paren": b"G(T / HTTP/1.1\r\n" + H + b"\r\n",
    "method-at": b"G@T / HTTP/1.1\r\n" + H + b"\r\n",
    "method-empty": b" / HTTP/1.1\r\n" + H + b"\r\n",
    "method-nul": b"GET\x00 / HTTP/1.1\r\n" + H + b"\r\n",
    "target-space": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "target-nul": b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n",
    "target-del": b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n",
    "version-minor-letter": b"GET / HTTP/1.x\r\n" + H + b"\r\n",
    "version-major-letter": b"GET / HTTP/x.1\r\n" + H + b"\r\n",
    "version-no-dot": b"GET / HTTP/11\r\n" + H + b"\r\n",
    "version-lower-case": b"GET / http/1.1\r\n" + H + b"\r\n",
    "version-https": b"GET / HTTPS/1.1\r\n" + H + b"\r\n",
    "version-trailing": b"GET / HTTP/1.1x\r\n" + H + b"\r\n",
    "version-two-digits": b"GET / HTTP/1.10\r\n" + H + b"\r\n",
    "version-9.9": b"GET / HTTP/9.9\r\n" + H + b"\r\n",
    "version-2.0": b"GET / HTTP/2.0\r\n" + H + b"\r\n",
    "version-2.0-no-host": b"GET / HTTP/2.0\r\n\r\n",
    "version-0.9-explicit": b"GET / HTTP/0.9\r\n" + H + b"\r\n",
    "version-missing": b"GET /\r\n" + H + b"\r\n",
    # Not here: `GET / RTSP/1.0`. llhttp reports only the version numbers, not the protocol
    # name, so the reader takes it as HTTP/1.0; it is forwarded as a well-formed HTTP/1.1
    # request, which confuses no hop about framing.
    "connect": b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
@pytest.mark.parametrize("size", [None, 1], ids=["whole", "bytewise"])
def test_ambiguous_or_malformed_request_is_refused(name: str, size: int | None) -> None:
    error = refused(SMUGGLING[name], size)
    assert type(error) is BadRequest, f"{type(error).__name__}: {error}"
    assert (error.status, error.reason) == (400, "bad-request")


@pytest.mark.parametrize("size", [None, 1, 7, 40], ids=["whole", "1", "7", "40"])
def test_requests_before_a_bad_one_are_delivered_whatever_the_split(size: int | None) -> None:
    """Requests complete before the bad one are answered: returned by earlier feeds or carried
    by the error (`completed`); nothing of the bad request is handed over."""
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
        b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\n"
    )
    reader = RequestReader()
    step = size or len(data)
    delivered: list = []
    with pytest.raises(BadRequest) as excinfo:
        for start in range(0, len(data), step):
            delivered += reader.feed(data[start:start + step])
    delivered += excinfo.value.completed
    assert describe(delivered) == [
        Req(target=b"/1"), END, Req(method=b"POST", target=b"/2", content_length=2), b"ok", END,
    ]


# -- head size limit (431) -----------------------------------------------------------------


def _head_with_total_size(size: int) -> bytes:
    """Returns a valid request head (through the blank line) of exactly `size` bytes."""
    start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def _field_section_over_limit(lines: int) -> bytes:
    """Returns a request whose field lines alone total MAX_HEADER_BYTES + 1 bytes."""
    fields = [b"Host: a\r\n"]
    left = MAX_HEADER_BYTES + 1 - len(fields[0])
    per_line = left // lines
    for i in range(lines):
        size = per_line if i < lines - 1 else left - per_line * (lines - 1)
        prefix = b"X-F%05d: " % i
        fields.append(prefix + b"v" * (size - len(prefix) - 2) + b"\r\n")
    section = b"".join(fields)
    assert len(section) == MAX_HEADER_BYTES + 1
    return b"GET / HTTP/1.1\r\n" + section + b"\r\n"


def test_head_of_exactly_64_kib_is_accepted() -> None:
    data = _head_with_total_size(64 * 1024)
    assert len(data) == MAX_HEADER_BYTES == 65536
    for size in (len(data), 1000, 1):
        [head, end] = feed_pieces(data, size)
        assert head.headers[1][0] == b"X-Pad"
        assert end == END


@pytest.mark.parametrize("lines", [1, 2, 100])
@pytest.mark.parametrize("size", [None, 1000, 4096], ids=["whole", "1000", "4096"])
def test_head_over_64_kib_is_refused(lines: int, size: int | None) -> None:
    error = refused(_field_section_over_limit(lines), size)
    assert type(error) is HeadersTooLarge
    assert (error.status, error.reason) == (431, "headers-too-large")


@pytest.mark.parametrize("size", [None, 1000], ids=["whole", "1000"])
def test_target_alone_over_64_kib_is_refused(size: int | None) -> None:
    data = b"GET /" + b"a" * MAX_HEADER_BYTES + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert type(refused(data, size)) is HeadersTooLarge


@pytest.mark.parametrize("part", [b"X-Big: ", b""], ids=["value", "name"])
def test_unfinished_field_line_over_64_kib_is_refused_before_it_ends(part: bytes) -> None:
    """The limit holds while bytes arrive, not only once the line ends (memory stays bounded)."""
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + part)
    with pytest.raises(HeadersTooLarge):
        for _ in range(80):  # 80 KiB of one field line, never terminated
            reader.feed(b"x" * 1024)


def test_smaller_limit_is_honoured() -> None:
    reader = RequestReader(max_header_bytes=100)
    with pytest.raises(HeadersTooLarge):
        reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"v" * 100 + b"\r\n\r\n")


# -- in_message ----------------------------------------------------------------------------


def test_in_message_from_first_byte_to_end() -> None:
    reader = RequestReader()
    assert not reader.in_message
    reader.feed(b"G")
    assert reader.in_message
    reader.feed(b"ET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    assert reader.in_message
    reader.feed(b"a")
    assert reader.in_message
    reader.feed(b"b")
    assert not reader.in_message
