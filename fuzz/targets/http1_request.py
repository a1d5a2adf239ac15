"""Fuzz target: a client's bytes into the HTTP/1.1 request reader (meshproxy/http1/reader.py).

Invariants, whatever the bytes:
- the reader returns events or raises BadRequest (400) / HeadersTooLarge (431), nothing else;
- events follow the grammar head, body bytes, END_OF_MESSAGE, ..., with Upgrade last and only
  after a head whose upgrade the reader accepted;
- a head is well formed (method a token, target without controls or spaces, HTTP/1.0 or 1.1,
  field names tokens, values without controls) and framed one way only; a complete message
  framed by Content-Length has exactly that many body bytes;
- an error's `completed` events finish whole requests: with the events before them, they
  follow the same grammar;
- nothing returned is larger than what was fed (memory stays bounded by the input);
- cutting the bytes into pieces changes nothing but where the events come out: the same
  whole requests, the same error;
- with a small head limit, a head over it is refused with 431 (or 400), never accepted.
"""

from __future__ import annotations

import re

from fuzz.targets._support import pieces
from fuzz.targets._support import shape as shape_of
from meshproxy.http1.errors import BadRequest, HeadersTooLarge
from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, Upgrade
from meshproxy.http1.reader import RequestReader

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
BAD_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
BAD_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
SMALL_LIMIT = 96  # a head limit the fuzzer reaches within its input sizes
# A head's attributes by name (compiled with mypyc, the class has no __slots__ to list them).
HEAD_FIELDS = ("method", "target", "version", "headers", "host", "content_length", "chunked",
               "keep_alive", "upgrade", "connection_tokens", "request_id", "expect_continue")


def feed(chunks: list[bytes], limit: int | None = None) -> tuple[list, Exception | None]:
    """Feed `chunks` to one reader as a connection would; return (events, error), the events
    of a failed read being the `completed` ones its error carries (whole requests the
    connection still answers). After an Upgrade the reader is not fed again: what followed
    goes into the Upgrade's `rest`."""
    reader = RequestReader() if limit is None else RequestReader(limit)
    events: list = []
    for i, chunk in enumerate(chunks):
        try:
            new = reader.feed(chunk)
        except (BadRequest, HeadersTooLarge) as exc:
            return events + list(exc.completed), exc
        events += new
        reader.in_message  # noqa: B018 - read as the connection reads it, after every feed
        if new and isinstance(new[-1], Upgrade):
            events[-1] = Upgrade(new[-1].rest + b"".join(chunks[i + 1:]))
            break
    return events, None


def check_head(head: RequestHead) -> None:
    assert head.method and TOKEN.match(head.method), head.method
    assert head.target and not BAD_IN_TARGET.search(head.target), head.target
    assert head.version in ("1.0", "1.1"), head.version
    for name, value in head.headers:
        assert TOKEN.match(name), name
        assert not BAD_IN_VALUE.search(value), value
    assert head.content_length is None or head.content_length >= 0
    assert not (head.chunked and head.content_length is not None), "framed two ways"
    assert head.method != b"CONNECT"


def check_events(events: list, size: int) -> None:
    """The grammar of a request stream; `size`: how many bytes were fed."""
    head: RequestHead | None = None
    last: RequestHead | None = None
    body = 0
    returned = 0
    for at, event in enumerate(events):
        if isinstance(event, RequestHead):
            assert head is None, "a head inside a message"
            check_head(event)
            head, body = event, 0
            returned += len(event.target) + sum(len(n) + len(v) for n, v in event.headers)
        elif isinstance(event, bytes):
            assert head is not None, "body bytes outside a message"
            assert event, "an empty body event"
            body += len(event)
            returned += len(event)
        elif event is END_OF_MESSAGE:
            assert head is not None, "END_OF_MESSAGE outside a message"
            if head.content_length is not None:
                assert body == head.content_length, (body, head.content_length)
            last, head = head, None
        elif isinstance(event, Upgrade):
            assert at == len(events) - 1, "events after an Upgrade"
            upgraded = head if head is not None else last
            assert upgraded is not None and upgraded.upgrade is not None, "Upgrade not asked for"
            returned += len(event.rest)
        else:
            raise AssertionError(f"not an event: {event!r}")
    assert returned <= size, f"{returned} bytes returned for {size} fed"


def shape(events: list) -> list:
    """Comparable values of events: adjacent body pieces joined."""
    return shape_of(events, RequestHead, HEAD_FIELDS)


def complete(events: list) -> list:
    """The events of the whole requests among `events` (up to the last END_OF_MESSAGE, or an
    Upgrade): what the connection answers, or tunnels."""
    for at in range(len(events) - 1, -1, -1):
        if events[at] is END_OF_MESSAGE or isinstance(events[at], Upgrade):
            return events[:at + 1]
    return []


def TestOneInput(data: bytes) -> None:
    whole, error = feed([data])
    check_events(whole, len(data))
    split, split_error = feed(pieces(data))
    check_events(split, len(data))
    assert type(error) is type(split_error), (error, split_error)
    # Whole requests are the same whatever the cut; a request cut off by an error may have
    # begun in an earlier read, and is not answered either way.
    assert shape(complete(split)) == shape(complete(whole)), "the requests depend on how the bytes were cut"
    if error is None:
        assert shape(split) == shape(whole), "the events depend on how the bytes were cut"
    small, small_error = feed([data], SMALL_LIMIT)
    check_events(small, len(data))
    for event in small:
        if isinstance(event, RequestHead):
            head_size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            assert head_size <= SMALL_LIMIT, f"a {head_size}-byte head passed a {SMALL_LIMIT}-byte limit"
