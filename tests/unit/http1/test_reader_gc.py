"""The events a reader returns stay whole when the reader itself becomes garbage.

A reader and its llhttp parser refer to each other, so a reader dropped while its events are
still used is freed by the cyclic collector. Compiled by mypyc, an attribute annotated again
in a subclass (`self._events: list = []` under a base that declares `_events`) was visited
twice by the collector, which then took the events list for garbage and emptied it under the
caller (found by test_fuzz's split test). This checks it with the collector run by hand.
"""

from __future__ import annotations

import gc

from meshproxy.http1.events import END_OF_MESSAGE, RequestHead, ResponseHead
from meshproxy.http1.reader import RequestReader
from meshproxy.http1.response_reader import ResponseReader


def test_request_events_survive_a_collection() -> None:
    events = RequestReader().feed(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nok")
    gc.collect()
    assert [type(e) for e in events] == [RequestHead, bytes, type(END_OF_MESSAGE)]


def test_response_events_survive_a_collection() -> None:
    reader = ResponseReader()
    reader.expect(False)
    events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    del reader
    gc.collect()
    assert [type(e) for e in events] == [ResponseHead, bytes, type(END_OF_MESSAGE)]
