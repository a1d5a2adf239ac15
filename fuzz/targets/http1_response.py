"""Fuzz target: an upstream's bytes into the HTTP/1.1 response reader
(meshproxy/http1/response_reader.py), once as the answer to GET and once to HEAD.

Invariants, whatever the bytes:
- the reader returns events or raises UpstreamProtocolError (502), nothing else, from `feed`
  and from `feed_eof`;
- events follow the grammar: interim 1xx heads, then a final head, its body bytes and
  END_OF_MESSAGE, or a 101 head and Upgrade last;
- a head is well formed (status 100-999, HTTP/1.0 or 1.1, a reason without controls, field
  names tokens, values without controls) and framed one way only;
- a response without a body (to HEAD; 1xx, 204, 304) has no body bytes; a complete body
  framed by Content-Length has exactly that many bytes;
- nothing returned is larger than what was fed;
- cutting the bytes into pieces changes nothing of the exchange's response.
"""

from __future__ import annotations

import re

from fuzz.targets._support import pieces
from fuzz.targets._support import shape as shape_of
from meshproxy.http1.errors import UpstreamProtocolError
from meshproxy.http1.events import END_OF_MESSAGE, ResponseHead, Upgrade
from meshproxy.http1.response_reader import ResponseReader

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
BAD_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A head's attributes by name (compiled with mypyc, the class has no __slots__ to list them);
# `keep_alive` is left out: bytes after the response in the same read (only) make it False.
HEAD_FIELDS = ("status", "reason", "version", "headers", "content_length", "chunked",
               "upgrade", "close_delimited")


def exchange(chunks: list[bytes], head_request: bool) -> tuple[list, Exception | None]:
    """One exchange as the upstream side runs it: feed until the response ends (or the
    connection upgrades), then EOF if it has not. Return (events, error)."""
    reader = ResponseReader()
    reader.expect(head_request)
    events: list = []
    try:
        for i, chunk in enumerate(chunks):
            new = reader.feed(chunk)
            events += new
            reader.in_message  # noqa: B018 - read as the connection reads it, after every feed
            if new and isinstance(new[-1], Upgrade):
                events[-1] = Upgrade(new[-1].rest + b"".join(chunks[i + 1:]))
                return events, None
            if END_OF_MESSAGE in new and not reader.in_message:
                return events, None  # the exchange is over: what follows is not its
        events += reader.feed_eof()
    except UpstreamProtocolError as exc:
        return events, exc
    return events, None


def check_head(head: ResponseHead) -> None:
    assert 100 <= head.status <= 999, head.status
    assert head.version in ("1.0", "1.1"), head.version
    assert not BAD_IN_VALUE.search(head.reason), head.reason
    for name, value in head.headers:
        assert TOKEN.match(name), name
        assert not BAD_IN_VALUE.search(value), value
    assert head.content_length is None or head.content_length >= 0
    assert not (head.chunked and head.content_length is not None), "framed two ways"
    assert not (head.chunked and head.close_delimited), "framed two ways"


def check_events(events: list, size: int, head_request: bool) -> None:
    head: ResponseHead | None = None
    body = 0
    returned = 0
    ended = False
    for at, event in enumerate(events):
        if isinstance(event, ResponseHead):
            assert head is None and not ended, "a head inside a response"
            check_head(event)
            returned += len(event.reason) + sum(len(n) + len(v) for n, v in event.headers)
            if event.informational:
                continue  # the final response is still to come
            head, body = event, 0
        elif isinstance(event, bytes):
            assert head is not None, "body bytes outside a response"
            assert event, "an empty body event"
            assert not (head_request or head.status in (101, 204, 304)), "a body where none may be"
            body += len(event)
            returned += len(event)
        elif event is END_OF_MESSAGE:
            assert head is not None and head.status != 101, "END_OF_MESSAGE outside a response"
            bodiless = head_request or head.status in (204, 304)
            if head.content_length is not None and not bodiless:
                assert body == head.content_length, (body, head.content_length)
            head, ended = None, True
        elif isinstance(event, Upgrade):
            assert at == len(events) - 1, "events after an Upgrade"
            assert head is not None and head.status == 101, "Upgrade without 101"
            returned += len(event.rest)
        else:
            raise AssertionError(f"not an event: {event!r}")
    assert returned <= size, f"{returned} bytes returned for {size} fed"


def shape(events: list) -> list:
    """Comparable values of events: adjacent body pieces joined."""
    return shape_of(events, ResponseHead, HEAD_FIELDS)


def TestOneInput(data: bytes) -> None:
    split_data = pieces(data)
    for head_request in (False, True):
        whole, error = exchange([data], head_request)
        check_events(whole, len(data), head_request)
        split, split_error = exchange(split_data, head_request)
        check_events(split, len(data), head_request)
        assert type(error) is type(split_error), (error, split_error)
        if error is None:
            assert shape(split) == shape(whole), "the response depends on how the bytes were cut"
