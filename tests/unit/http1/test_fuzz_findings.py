"""What coverage-guided fuzzing found in the HTTP/1.1 readers (fuzz/targets/http1_*.py), each
with the input it found and, where that is hard to read, the same case written by hand."""

from __future__ import annotations

import pytest

from meshproxy.http1.errors import BadRequest, UpstreamProtocolError
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, ResponseHead, Upgrade
from meshproxy.http1.reader import RequestReader
from meshproxy.http1.response_reader import ResponseReader


def heads(events: list) -> list[tuple[bytes, bytes]]:
    return [(e.method, e.target) for e in events if isinstance(e, RequestHead)]


def body(events: list) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


def one_byte_at_a_time(reader: RequestReader | ResponseReader, data: bytes) -> list:
    events: list = []
    for i in range(len(data)):
        events += reader.feed(data[i:i + 1])
    return events


# -- requests ------------------------------------------------------------------------------

# llhttp takes an HTTP/1.0 request with `Connection: upgrade` and `Upgrade` for an upgrade
# and skips its body; the reader does not upgrade HTTP/1.0 (RFC 9110 §7.8) and went on
# parsing at the body, so the body came out as a second request: one smuggled past every
# hop that reads it as this request's body.
SMUGGLED = (b"POST / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 36\r\n\r\n"
            b"GET /admin HTTP/1.1\r\nHost: inner\r\n\r\n"
            b"GET /next HTTP/1.0\r\n\r\n")


def test_the_body_of_an_http10_request_that_asks_to_upgrade_is_its_body_not_a_request() -> None:
    for events in (RequestReader().feed(SMUGGLED), one_byte_at_a_time(RequestReader(), SMUGGLED)):
        assert heads(events) == [(b"POST", b"/"), (b"GET", b"/next")]
        assert body(events) == b"GET /admin HTTP/1.1\r\nHost: inner\r\n\r\n"
        assert events[-1] is END_OF_MESSAGE and not any(isinstance(e, Upgrade) for e in events)


def test_the_fuzzers_input_for_it_gives_the_declared_body() -> None:
    data = (b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websock\x81\x81\x81\x81P/1.0\r\n"
            b"Connection: upgrade\r\nUpgrade: webso\x81!\x81\x81 a\r\nContent-Length: 2\r\n\r\nokGET /3 HT\n"
            b"Connection: upgrade\r\nUpgrade: webso\x81!\x81\x81\x81" + b"3" * 126 + b"\x81" * 12 + b"et\r\n\r\n")
    reader = RequestReader()
    with pytest.raises(BadRequest) as raised:
        reader.feed(data)
    # The first request, with its two body bytes, is answered; what follows is no request.
    completed = list(raised.value.completed)
    assert heads(completed) == [(b"GET", b"/")] and body(completed) == b"ok"
    assert completed[-1] is END_OF_MESSAGE


# A request refused after its head (an upgrade with a chunked body) was raised without the
# requests complete before it in the same read: a pipelining client got none of their answers,
# though it did when TCP had cut the read between them. (libFuzzer's minimized form of the
# 2.5 KB input it found.)
CHUNKED_UPGRADE_AFTER_ONE = (b"GET / HTTP/1.0\r\nConnection:upgrade\r\nUpgrade:a\r\n\r\n"
                             b"POST /x HTTP/1.1\r\nHost:\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection:upgrade\r\nUpgrade::\r\n\r\n")


@pytest.mark.parametrize("data", [
    CHUNKED_UPGRADE_AFTER_ONE,
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: upgrade\r\nUpgrade: h2c\r\n\r\n0\r\n\r\n",
], ids=["fuzzer", "pipelined"])
def test_requests_before_a_refused_upgrade_are_still_answered(data: bytes) -> None:
    with pytest.raises(BadRequest, match="upgrade request with a chunked body") as raised:
        RequestReader().feed(data)
    completed = list(raised.value.completed)
    assert heads(completed) == [(b"GET", b"/")] and completed[-1] is END_OF_MESSAGE


# -- responses -----------------------------------------------------------------------------


def read_response(data: bytes, head_request: bool, pieces: list[int] | None = None) -> list:
    reader = ResponseReader()
    reader.expect(head_request)
    events: list = []
    at = 0
    for size in pieces or [len(data)]:
        events += reader.feed(data[at:at + size])
        at += size
        if END_OF_MESSAGE in events:
            break
    return events


# A response to HEAD ends at its head. Bytes after it in the same read that llhttp finds
# malformed (here, as a chunked body) failed the whole read with 502, while the same bytes
# in a later read left the response whole: it depended on how TCP cut them.
AFTER_HEAD = (b"HTTP/1.1 201 OK\r\nTransfer-Encoding: chunked\r\nSrailer: X-Sum\r\n\r\n"
              b"5;ext=1\xf3\xf5\x97\x90llo\r\n6\r\n wolrld\r\n0\r\nX-Sum: 9\r\n\r\n")


@pytest.mark.parametrize("pieces", [None, [14, 15, 35, 42]], ids=["one read", "four reads"])
def test_malformed_bytes_after_a_response_to_head_leave_the_response_whole(pieces) -> None:
    events = read_response(AFTER_HEAD, head_request=True, pieces=pieces)
    assert [type(e) for e in events] == [ResponseHead, type(END_OF_MESSAGE)]
    assert events[0].status == 201


def test_malformed_bytes_after_a_response_to_head_mean_the_connection_is_not_reused() -> None:
    [head, _] = read_response(AFTER_HEAD, head_request=True)
    assert head.keep_alive is False


@pytest.mark.parametrize("version", [b"2.0", b"0.9"])
def test_a_status_line_that_is_not_http_1x_is_refused(version: bytes) -> None:
    # llhttp takes both; the fuzzer's input was `HTTP/2.0 200 OK` and an empty head.
    reader = ResponseReader()
    reader.expect(False)
    with pytest.raises(UpstreamProtocolError, match="not an HTTP/1.x response"):
        reader.feed(b"HTTP/" + version + b" 200 OK\r\n\r\n")


# llhttp knows that 100-103 have no body, but reads one for a 1xx it does not know that
# carries Transfer-Encoding; the reader handed those bytes on after an interim head.
INTERIM_WITH_BODY = (b"HTTP/1.1 104 Conti" + b"," * 41 + b"HTTP/1.1 200 OK\r\nTransfer-Encoding:nsfe\xff\xff\xff\xff"
                     b"\r\n\r\nzz\r\n" + b"," * 30 + b"nue\r\n\r\nHTTP/1.1 103 Eartsue\r\n\r\nHTTP/3")


@pytest.mark.parametrize("data", [
    INTERIM_WITH_BODY,
    b"HTTP/1.1 150 Unknown\r\nTransfer-Encoding: gzip\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 199 Unknown\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n",
], ids=["fuzzer", "close-delimited", "chunked"])
def test_an_interim_response_with_a_body_is_refused(data: bytes) -> None:
    for head_request in (False, True):
        reader = ResponseReader()
        reader.expect(head_request)
        with pytest.raises(UpstreamProtocolError, match="interim"):
            reader.feed(data)
        with pytest.raises(UpstreamProtocolError, match="interim"):
            reader = ResponseReader()
            reader.expect(head_request)
            one_byte_at_a_time(reader, data)

