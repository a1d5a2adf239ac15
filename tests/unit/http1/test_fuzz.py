"""Fuzzing the HTTP/1.1 readers: whatever bytes arrive, in whatever pieces, they either yield
well-formed events or raise the reader's own ProxyError (never another exception), and how the
bytes are split never changes the events.

Bounded and derandomized so that a run is repeatable: ~300 examples per property.
"""

from __future__ import annotations

import re
import types

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.http1.errors import BadRequest, HeadersTooLarge, UpstreamProtocolError
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, ResponseHead, Upgrade
from meshproxy.http1.reader import RequestReader
from meshproxy.http1.response_reader import ResponseReader

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
BAD_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
BAD_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")

REQUEST_CORPUS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nHost: svc.ns\r\nAccept: */*\r\nX-Request-Id: r1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
    b"PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nxyz",
    b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: x-hop, close\r\nX-Hop: 1\r\n\r\n",
]

RESPONSE_CORPUS = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;e\r\nhello\r\n0\r\nT: v\r\n\r\n",
     False),
    (b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nclose-delimited", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", False),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n", False),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nab",
     False),
    (b"HTTP/1.0 404 Not Found\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", False),
]

INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b"0", b"\x7f", b"\xff"]


@st.composite
def pieces(draw: st.DrawFn, data: bytes) -> list:
    """Returns `data` cut at up to 8 drawn points."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@st.composite
def mutated(draw: st.DrawFn, corpus: list) -> bytes:
    """Returns a corpus entry with 1-4 edits: byte flips, insertions, deletions, duplicated or
    swapped lines, truncation."""
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup-line", "swap-lines",
                                   "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(INSERTS))
        elif op == "delete" and data:
            del data[at:at + draw(st.integers(1, 3))]
        elif op in ("dup-line", "swap-lines"):
            lines = bytes(data).split(b"\r\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if op == "dup-line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\r\n".join(lines))
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def check_request_head(head: RequestHead) -> None:
    assert head.method and TOKEN_RE.match(head.method), head.method
    assert head.target and not BAD_IN_TARGET.search(head.target), head.target
    assert head.version in ("1.0", "1.1"), head.version
    for name, value in head.headers:
        assert TOKEN_RE.match(name), name
        assert not BAD_IN_VALUE.search(value), value
    assert head.content_length is None or head.content_length >= 0
    assert not (head.chunked and head.content_length is not None)


def check_response_head(head: ResponseHead) -> None:
    assert 100 <= head.status <= 999, head.status
    assert head.version in ("1.0", "1.1"), head.version
    assert not BAD_IN_VALUE.search(head.reason), head.reason
    for name, value in head.headers:
        assert TOKEN_RE.match(name), name
        assert not BAD_IN_VALUE.search(value), value
    assert head.content_length is None or head.content_length >= 0
    assert not (head.chunked and head.content_length is not None)


def run_requests(chunks: list) -> list:
    """Feeds `chunks` to a RequestReader until it raises or upgrades; returns the events, with
    a raised error as the last item. Anything but the reader's own errors propagates."""
    reader = RequestReader()
    events: list = []
    for piece in chunks:
        try:
            new = reader.feed(piece)
        except (BadRequest, HeadersTooLarge) as exc:
            return events + [exc]
        events += new
        if new and isinstance(new[-1], Upgrade):
            break
    return events


def run_responses(chunks: list, head_request: bool) -> list:
    """Feeds `chunks` to a ResponseReader, then EOF; returns the events, with a raised error as
    the last item. Anything but UpstreamProtocolError propagates."""
    reader = ResponseReader()
    reader.expect(head_request)
    events: list = []
    try:
        for piece in chunks:
            new = reader.feed(piece)
            events += new
            if new and isinstance(new[-1], Upgrade):
                return events
        events += reader.feed_eof()
    except UpstreamProtocolError as exc:
        events.append(exc)
    return events


def check_request_events(events: list) -> None:
    for event in events:
        if isinstance(event, RequestHead):
            check_request_head(event)
        else:
            assert event is END_OF_MESSAGE or isinstance(
                event, (bytes, Upgrade, BadRequest, HeadersTooLarge)), event


def check_response_events(events: list) -> None:
    for event in events:
        if isinstance(event, ResponseHead):
            check_response_head(event)
        else:
            assert event is END_OF_MESSAGE or isinstance(
                event, (bytes, Upgrade, UpstreamProtocolError)), event


# -- robustness ----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400).flatmap(pieces))
def test_request_reader_on_random_bytes(chunks: list) -> None:
    check_request_events(run_requests(chunks))


@FUZZ
@given(st.binary(max_size=200).map(lambda b: b"GET / HTTP/1.1\r\n" + b).flatmap(pieces))
def test_request_reader_on_random_fields(chunks: list) -> None:
    check_request_events(run_requests(chunks))


@FUZZ
@given(mutated(REQUEST_CORPUS).flatmap(pieces))
def test_request_reader_on_mutated_requests(chunks: list) -> None:
    check_request_events(run_requests(chunks))


@FUZZ
@given(st.binary(max_size=400).flatmap(pieces), st.booleans())
def test_response_reader_on_random_bytes(chunks: list, head_request: bool) -> None:
    check_response_events(run_responses(chunks, head_request))


@FUZZ
@given(st.binary(max_size=200).map(lambda b: b"HTTP/1.1 200 OK\r\n" + b).flatmap(pieces),
       st.booleans())
def test_response_reader_on_random_fields(chunks: list, head_request: bool) -> None:
    check_response_events(run_responses(chunks, head_request))


@FUZZ
@given(mutated([data for data, _ in RESPONSE_CORPUS]).flatmap(pieces), st.booleans())
def test_response_reader_on_mutated_responses(chunks: list, head_request: bool) -> None:
    check_response_events(run_responses(chunks, head_request))


# -- splitting never changes the events ----------------------------------------------------


def fields(cls: type) -> list[str]:
    """Returns the public data attributes of a head class: its slots and properties in pure
    Python; compiled, mypyc's native classes have no __slots__ and list attributes and
    properties as getset descriptors. A response head's `raw` lines are left out: they are
    its `headers` not yet split, and reading `headers` splits them."""
    return sorted(name for name, value in vars(cls).items()
                  if not name.startswith("_") and name != "raw"
                  and isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType,
                                         property)))


def describe(events: list) -> list:
    """Returns comparable values for events; adjacent body pieces joined, errors by type."""
    out: list = []
    for event in events:
        if isinstance(event, (RequestHead, ResponseHead)):
            out.append((type(event).__name__,
                        *(getattr(event, name) for name in fields(type(event)))))
        elif isinstance(event, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += event
            else:
                out.append(event)
        elif isinstance(event, Upgrade):
            out.append(("Upgrade", event.rest))
        elif isinstance(event, Exception):
            out.append(type(event).__name__)
        else:
            out.append(repr(event))
    return out


FIELD_NAME = st.text(alphabet=TCHAR, min_size=1, max_size=10).map(str.encode).filter(
    lambda n: n.lower() not in {
        b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
        b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-request-id", b"expect"})
FIELD_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                      max_size=16).map(str.encode)
FIELDS = st.lists(st.tuples(FIELD_NAME, FIELD_VALUE), max_size=5)
BODY = st.binary(max_size=40)


def chunked_body(body: bytes, sizes: list) -> bytes:
    """Returns `body` as chunks of the given sizes (cycled), then the last chunk."""
    out, at, i = [], 0, 0
    while at < len(body):
        size = max(1, sizes[i % len(sizes)]) if sizes else len(body)
        part = body[at:at + size]
        out.append(b"%x\r\n%s\r\n" % (len(part), part))
        at += len(part)
        i += 1
    return b"".join(out) + b"0\r\n\r\n"


@st.composite
def request_stream(draw: st.DrawFn) -> tuple[bytes, list]:
    """Returns a stream of 1-3 valid requests (perhaps ending in an upgrade) and their heads."""
    wire, expected = [], []
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
        target = b"/" + draw(st.text(alphabet="abc/._-~?=&", max_size=12)).encode()
        fields = [(b"Host", b"svc")] + draw(FIELDS)
        framing = draw(st.sampled_from(["none", "length", "chunked"]))
        body = draw(BODY) if framing != "none" else b""
        head = b"%s %s HTTP/1.1\r\n" % (method, target) + b"".join(
            n + b": " + v + b"\r\n" for n, v in fields)
        if framing == "length":
            head += b"Content-Length: %d\r\n" % len(body)
            message = head + b"\r\n" + body
        elif framing == "chunked":
            head += b"Transfer-Encoding: chunked\r\n"
            message = head + b"\r\n" + chunked_body(body, draw(st.lists(st.integers(1, 9),
                                                                        max_size=4)))
        else:
            message = head + b"\r\n"
        wire.append(message)
        expected.append((method, target, fields, body))
    if draw(st.booleans()):
        wire.append(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n" + draw(BODY))
        expected.append((b"GET", b"/ws", [(b"Host", b"svc")], b""))
    return b"".join(wire), expected


def feed_requests_split(data: bytes, chunks: list) -> list:
    reader = RequestReader()
    events: list = []
    fed = 0
    for piece in chunks:
        new = reader.feed(piece)
        fed += len(piece)
        events += new
        if new and isinstance(new[-1], Upgrade):
            events[-1] = Upgrade(new[-1].rest + data[fed:])
            break
    return events


@FUZZ
@given(request_stream().flatmap(lambda s: st.tuples(st.just(s), pieces(s[0]))))
def test_request_stream_split_anywhere_gives_the_same_events(case: tuple) -> None:
    (data, expected), chunks = case
    whole = RequestReader().feed(data)
    heads = [e for e in whole if isinstance(e, RequestHead)]
    assert [(h.method, h.target, h.headers) for h in heads] == [e[:3] for e in expected]
    bodies = b"".join(e for e in whole if isinstance(e, bytes))
    upgrade_rest = whole[-1].rest if isinstance(whole[-1], Upgrade) else b""
    assert bodies == b"".join(e[3] for e in expected)
    assert data.endswith(upgrade_rest)
    assert describe(feed_requests_split(data, chunks)) == describe(whole)


@st.composite
def response_exchanges(draw: st.DrawFn) -> list:
    """Returns 1-4 (response bytes, head_request) exchanges of one upstream connection."""
    exchanges = []
    count = draw(st.integers(1, 4))
    for index in range(count):
        last = index == count - 1
        head_request = draw(st.booleans())
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" if draw(st.booleans()) else b""
        status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
        fields = b"".join(n + b": " + v + b"\r\n" for n, v in draw(FIELDS))
        choices = ["length", "chunked"] + (["close"] if last else [])
        framing = draw(st.sampled_from(choices))
        body = draw(BODY)
        bodiless = head_request or status in (204, 304)
        if bodiless:
            body = b""
        start = interim + b"HTTP/1.1 %d Reason\r\n" % status + fields
        if framing == "length":
            data = start + b"Content-Length: %d\r\n\r\n" % len(body) + body
        elif framing == "chunked":
            wire_body = b"" if bodiless else chunked_body(
                body, draw(st.lists(st.integers(1, 9), max_size=4)))
            data = start + b"Transfer-Encoding: chunked\r\n\r\n" + wire_body
        else:
            data = start + b"\r\n" + body
        exchanges.append((data, head_request))
    return exchanges


def run_exchanges(exchanges: list, split: list | None) -> list:
    """Runs the exchanges through one reader, each whole or cut as `split` says; EOF last."""
    reader = ResponseReader()
    events: list = []
    for i, (data, head_request) in enumerate(exchanges):
        reader.expect(head_request)
        for piece in (split[i] if split else [data]):
            events += reader.feed(piece)
    events += reader.feed_eof()
    return events


@FUZZ
@given(response_exchanges().flatmap(
    lambda ex: st.tuples(st.just(ex), st.tuples(*(pieces(data) for data, _ in ex)))))
def test_response_exchanges_split_anywhere_give_the_same_events(case: tuple) -> None:
    exchanges, split = case
    whole = run_exchanges(exchanges, None)
    assert sum(1 for e in whole if e is END_OF_MESSAGE) == len(exchanges)
    check_response_events(whole)
    assert describe(run_exchanges(exchanges, list(split))) == describe(whole)
