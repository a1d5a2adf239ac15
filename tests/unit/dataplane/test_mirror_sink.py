"""A mirror's upstream connection goes back to its pool only when the response allows it,
judged when the response has ended (mirror.py's _Sink, fed as UpstreamConnection feeds it)."""

from __future__ import annotations

import asyncio

import pytest

from meshproxy.dataplane.mirror import _Sink
from meshproxy.http1.events import END_OF_MESSAGE, ResponseHead
from meshproxy.http1.response_reader import ResponseReader


def feed(reads: list[bytes]) -> _Sink:
    loop = asyncio.new_event_loop()
    try:
        sink = _Sink(loop)
        reader = ResponseReader()
        reader.expect(False)
        for data in reads:
            for event in reader.feed(data):
                if event.__class__ is ResponseHead:
                    sink.response_head(event)
                elif event is END_OF_MESSAGE:
                    sink.response_end()
        assert sink.done.done() and sink.done.result() is True
        return sink
    finally:
        loop.close()


@pytest.mark.parametrize("reads", [
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
     b"okHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
])
def test_a_second_response_keeps_the_connection_out_of_the_pool(reads: list[bytes]) -> None:
    assert feed(reads).keep_alive is False


def test_a_clean_response_lets_the_connection_be_reused() -> None:
    assert feed([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok"]).keep_alive is True


def test_connection_close_keeps_the_connection_out_of_the_pool() -> None:
    reads = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"]
    assert feed(reads).keep_alive is False
