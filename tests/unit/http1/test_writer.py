"""The writer: exact bytes of forwarded heads and chunks, and the round trip through the readers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, ResponseHead, Upgrade
from meshproxy.http1.reader import RequestReader
from meshproxy.http1.response_reader import ResponseReader
from meshproxy.http1.writer import (
    LAST_CHUNK,
    chunk,
    informational_bytes,
    request_head_bytes,
    response_head_bytes,
)


def request(method: bytes = b"GET", target: bytes = b"/", version: str = "1.1",
            headers: list | None = None, **fields: object) -> RequestHead:
    head = RequestHead(method, target, version,
                       [(b"Host", b"a")] if headers is None else headers)
    for name, value in fields.items():
        setattr(head, name, value)
    return head


def response(status: int = 200, reason: bytes = b"OK", headers: list | None = None,
             **fields: object) -> ResponseHead:
    head = ResponseHead(status, reason, "1.1", headers or [])
    for name, value in fields.items():
        setattr(head, name, value)
    return head


# -- request heads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "target", "extra", "upgrade", "expected"),
    [
        (request(), b"/", None, False, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        (request(target=b"http://a/x?y"), b"/x?y", None, False,
         b"GET /x?y HTTP/1.1\r\nHost: a\r\n\r\n"),
        (request(version="1.0", keep_alive=False), b"/", None, False,
         b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        (request(headers=[(b"Host", b"a"), (b"X-Mixed", b"v"), (b"x-dup", b"1"),
                          (b"x-dup", b"2")]), b"/", None, False,
         b"GET / HTTP/1.1\r\nHost: a\r\nX-Mixed: v\r\nx-dup: 1\r\nx-dup: 2\r\n\r\n"),
        (request(b"POST", content_length=5), b"/p", None, False,
         b"POST /p HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\n"),
        (request(b"POST", content_length=0), b"/p", None, False,
         b"POST /p HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n"),
        (request(b"POST", chunked=True), b"/p", None, False,
         b"POST /p HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n"),
        (request(b"POST", chunked=True),
         b"/p", [(b"x-request-id", b"r1"), (b"traceparent", b"00-ab-cd-01")], False,
         b"POST /p HTTP/1.1\r\nHost: a\r\nx-request-id: r1\r\ntraceparent: 00-ab-cd-01\r\n"
         b"transfer-encoding: chunked\r\n\r\n"),
        (request(upgrade=b"websocket", connection_tokens=(b"upgrade",)), b"/ws", None, True,
         b"GET /ws HTTP/1.1\r\nHost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"),
        (request(upgrade=b"websocket", connection_tokens=(b"upgrade",)), b"/ws", None, False,
         b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n"),
        (request(), b"/", None, True, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ],
    ids=["get", "origin-form", "http10-client", "headers-as-received", "content-length",
         "content-length-0", "chunked", "extra-before-framing", "upgrade", "upgrade-not-asked",
         "upgrade-without-token"],
)
def test_request_head_bytes(head: RequestHead, target: bytes, extra: list | None,
                            upgrade: bool, expected: bytes) -> None:
    assert request_head_bytes(head, target, extra, upgrade=upgrade) == expected


# -- response heads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "chunked", "keep_alive", "client_version", "extra", "expected"),
    [
        (response(content_length=3), False, True, "1.1", None,
         b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n"),
        (response(headers=[(b"Content-Type", b"text/plain"), (b"set-cookie", b"a=1")],
                  content_length=3), False, True, "1.1", None,
         b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nset-cookie: a=1\r\n"
         b"content-length: 3\r\n\r\n"),
        (response(close_delimited=True, keep_alive=False), True, True, "1.1", None,
         b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        (response(chunked=True), True, True, "1.1", None,
         b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        (response(content_length=3), False, False, "1.1", None,
         b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"),
        (response(content_length=3), False, True, "1.0", None,
         b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n"),
        (response(content_length=3), False, False, "1.0", None,
         b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"),
        (response(chunked=True), False, False, "1.0", None,
         b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"),
        (response(content_length=3), False, True, "1.1",
         [(b"x-request-id", b"r1"), (b"server-timing", b"proxy;dur=1")],
         b"HTTP/1.1 200 OK\r\nx-request-id: r1\r\nserver-timing: proxy;dur=1\r\n"
         b"content-length: 3\r\n\r\n"),
        (response(status=404, reason=b"", content_length=0), False, True, "1.1", None,
         b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
        (response(status=299, reason=b"", content_length=0), False, True, "1.1", None,
         b"HTTP/1.1 299 \r\ncontent-length: 0\r\n\r\n"),
        (response(status=200, reason=b"Fine Thanks", content_length=0), False, True, "1.1",
         None, b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 0\r\n\r\n"),
        (response(status=204, reason=b"No Content"), False, True, "1.1", None,
         b"HTTP/1.1 204 No Content\r\n\r\n"),
        (response(status=304, reason=b"Not Modified", headers=[(b"ETag", b'"e"')],
                  content_length=10), False, True, "1.1", None,
         b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\ncontent-length: 10\r\n\r\n'),
        (response(status=101, reason=b"Switching Protocols", upgrade=b"websocket",
                  headers=[(b"Sec-WebSocket-Accept", b"abc=")]), False, True, "1.1", None,
         b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc=\r\n"
         b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"),
        (response(status=101, reason=b"Switching Protocols", upgrade=b"websocket"), False,
         False, "1.0", None,
         b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
         b"\r\n"),
    ],
    ids=["content-length", "headers-as-received", "close-delimited-rechunked", "chunked",
         "close", "http10-keep-alive", "http10-close", "http10-chunked-upstream", "extra",
         "standard-reason", "unknown-status-reason", "own-reason", "204", "304", "101",
         "101-ignores-close"],
)
def test_response_head_bytes(head: ResponseHead, chunked: bool, keep_alive: bool,
                             client_version: str, extra: list | None,
                             expected: bytes) -> None:
    assert response_head_bytes(head, chunked=chunked, keep_alive=keep_alive,
                               client_version=client_version, extra=extra) == expected


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (response(100, b"Continue"), b"HTTP/1.1 100 Continue\r\n\r\n"),
        (response(100, b""), b"HTTP/1.1 100 Continue\r\n\r\n"),
        (response(103, b"Early Hints", headers=[(b"Link", b"</a.css>; rel=preload"),
                                                 (b"Link", b"</b.js>; rel=preload")]),
         b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
         b"Link: </b.js>; rel=preload\r\n\r\n"),
    ],
)
def test_informational_bytes(head: ResponseHead, expected: bytes) -> None:
    assert informational_bytes(head) == expected


# -- chunks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a", b"1\r\na\r\n"),
        (b"hello", b"5\r\nhello\r\n"),
        (b"x" * 10, b"a\r\n" + b"x" * 10 + b"\r\n"),
        (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
        (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
        (b"\r\n0\r\n\r\n", b"7\r\n\r\n0\r\n\r\n\r\n"),
    ],
)
def test_chunk(data: bytes, expected: bytes) -> None:
    pieces = chunk(data)
    assert isinstance(pieces, list)
    assert b"".join(pieces) == expected


def test_empty_chunk_writes_nothing() -> None:
    """A zero-size chunk is the last-chunk: writing one would end the body early."""
    assert b"".join(chunk(b"")) == b""


def test_chunks_and_last_chunk_parse_back() -> None:
    head = request(b"POST", chunked=True)
    wire = request_head_bytes(head, b"/up") + b"".join(
        b"".join(chunk(part)) for part in (b"one", b"two" * 100, b"\x00\xff")
    ) + LAST_CHUNK
    events = RequestReader().feed(wire)
    assert b"".join(e for e in events if isinstance(e, bytes)) == (
        b"one" + b"two" * 100 + b"\x00\xff"
    )
    assert events[-1] is END_OF_MESSAGE


# -- round trips ---------------------------------------------------------------------------


def _request_summary(head: RequestHead) -> tuple:
    return (head.method, head.target, head.headers, head.host, head.content_length,
            head.chunked, head.upgrade, head.request_id, head.expect_continue)


@pytest.mark.parametrize(
    "wire",
    [
        b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Request-Id: r1\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        b"PUT /p HTTP/1.1\r\nhost: a\r\nTransfer-Encoding: chunked\r\nx-A: 1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k==\r\n\r\n",
        b"DELETE /d HTTP/1.1\r\nHost: a\r\nConnection: x-hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n\r\n",
    ],
)
def test_request_round_trip(wire: bytes) -> None:
    [original, *_] = RequestReader().feed(wire)
    again = request_head_bytes(original, original.target, upgrade=True)
    [reparsed, *_] = RequestReader().feed(again)
    assert _request_summary(reparsed) == _request_summary(original)
    assert reparsed.version == "1.1"


def _response_summary(head: ResponseHead) -> tuple:
    return (head.status, head.reason, head.headers, head.content_length, head.chunked,
            head.upgrade)


@pytest.mark.parametrize(
    ("wire", "head_request"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\n", False),
        (b"HTTP/1.1 201 Created\r\nLocation: /x\r\nTransfer-Encoding: chunked\r\n\r\n", False),
        (b"HTTP/1.1 404 Nope\r\nset-cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
         False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", True),
        (b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n", False),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
         b"\r\n", False),
    ],
)
def test_response_round_trip(wire: bytes, head_request: bool) -> None:
    reader = ResponseReader()
    reader.expect(head_request)
    [original, *_] = reader.feed(wire)
    again = response_head_bytes(original, chunked=original.chunked, keep_alive=True,
                                client_version="1.1")
    reader = ResponseReader()
    reader.expect(head_request)
    [reparsed, *_] = reader.feed(again)
    assert _response_summary(reparsed) == _response_summary(original)


TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOKEN = st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.encode)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                max_size=20).map(str.encode)
RESERVED = {b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
            b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-request-id", b"expect"}


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    path=st.text(alphabet="abcxyz0123/._-~?=&%", max_size=30).map(lambda s: b"/" + s.encode()),
    fields=st.lists(st.tuples(TOKEN, VALUE), max_size=8).map(
        lambda fs: [(n, v) for n, v in fs if n.lower() not in RESERVED]),
    framing=st.sampled_from(["none", "length", "chunked"]),
    length=st.integers(0, 10**12),
)
def test_request_round_trip_property(method: bytes, path: bytes, fields: list, framing: str,
                                     length: int) -> None:
    head = request(method, path, headers=[(b"Host", b"svc")] + fields)
    head.host = b"svc"
    if framing == "length":
        head.content_length = length
    elif framing == "chunked":
        head.chunked = True
    events = RequestReader().feed(request_head_bytes(head, path))
    reparsed = events[0]
    assert isinstance(reparsed, RequestHead)
    assert _request_summary(reparsed) == _request_summary(head)


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    reason=st.text(alphabet="abcdefghij XYZ", max_size=20).map(lambda s: s.strip().encode()),
    fields=st.lists(st.tuples(TOKEN, VALUE), max_size=8).map(
        lambda fs: [(n, v) for n, v in fs if n.lower() not in RESERVED]),
    framing=st.sampled_from(["length", "chunked"]),
    length=st.integers(0, 10**12),
)
def test_response_round_trip_property(status: int, reason: bytes, fields: list, framing: str,
                                      length: int) -> None:
    head = response(status, reason or b"X", fields)
    if framing == "length":
        head.content_length = length
    else:
        head.chunked = True
    reader = ResponseReader()
    reader.expect(False)
    events = reader.feed(response_head_bytes(head, chunked=head.chunked, keep_alive=True,
                                             client_version="1.1"))
    assert not any(isinstance(e, Upgrade) for e in events)
    assert _response_summary(events[0]) == _response_summary(head)
