"""The proxy's own error responses (spec §4): status, `x-meshproxy-error`, one-line body."""

from __future__ import annotations

import pytest

from meshproxy.http1 import errors
from meshproxy.http1.errors import ProxyError, error_response
from meshproxy.http1.events import END_OF_MESSAGE, ResponseHead
from meshproxy.http1.response_reader import ResponseReader

# Spec §4 table: class name -> (status, status phrase, REASON).
SPEC_TABLE = {
    "BadRequest": (400, "Bad Request", "bad-request"),
    "Unauthorized": (403, "Forbidden", "unauthorized"),
    "NoRoute": (404, "Not Found", "no-route"),
    "HeaderTimeout": (408, "Request Timeout", "header-timeout"),
    "BodyTooLarge": (413, "Request Entity Too Large", "body-too-large"),
    "HeadersTooLarge": (431, "Request Header Fields Too Large", "headers-too-large"),
    "BackendNotFound": (500, "Internal Server Error", "backend-not-found"),
    "ConnectFailure": (502, "Bad Gateway", "connect-failure"),
    "UpstreamReset": (502, "Bad Gateway", "upstream-reset"),
    "UpstreamProtocolError": (502, "Bad Gateway", "upstream-protocol-error"),
    "UnknownDestination": (502, "Bad Gateway", "unknown-destination"),
    "NoEndpoints": (503, "Service Unavailable", "no-endpoints"),
    "NoHealthyEndpoints": (503, "Service Unavailable", "no-healthy-endpoints"),
    "Overloaded": (503, "Service Unavailable", "overloaded"),
    "Timeout": (504, "Gateway Timeout", "timeout"),
    "LoopDetected": (508, "Loop Detected", "loop-detected"),  # spec §9
}


def all_subclasses(cls: type) -> set:
    """Returns every class derived from `cls`, at any depth."""
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | all_subclasses(sub)
    return found


def parse(data: bytes) -> tuple[ResponseHead, bytes, list]:
    """Returns the head, the body and the events of one complete response in `data`."""
    reader = ResponseReader()
    reader.expect(False)
    events = reader.feed(data)
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert events[-1] is END_OF_MESSAGE
    body = b"".join(e for e in events if isinstance(e, bytes))
    return head, body, events


def test_every_error_class_is_in_the_spec_table() -> None:
    defined = {cls.__name__ for cls in all_subclasses(ProxyError)
               if cls.__module__ == errors.__name__}
    assert defined == set(SPEC_TABLE)


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "close"])
def test_error_response(name: str, keep_alive: bool) -> None:
    status, phrase, reason = SPEC_TABLE[name]
    error = getattr(errors, name)("detail that stays in the logs")
    assert (error.status, error.reason) == (status, reason)

    data = error_response(error, keep_alive=keep_alive)
    assert data.startswith(f"HTTP/1.1 {status} {phrase}\r\n".encode())
    head, body, _ = parse(data)
    assert (head.status, head.reason) == (status, phrase.encode())
    assert body == f"{status} {phrase}: {reason}\n".encode()
    assert body.count(b"\n") == 1
    assert head.content_length == len(body)
    # The head as it was on the wire, names lower-cased (framing fields included).
    raw_head = data[: data.index(b"\r\n\r\n")].decode("latin-1").split("\r\n")[1:]
    fields = [tuple(line.split(": ", 1)) for line in raw_head]
    names = [n for n, _ in fields]
    assert ("x-meshproxy-error", reason) in fields
    assert names.count("x-meshproxy-error") == 1
    assert ("content-length", str(len(body))) in fields
    assert ("content-type", "text/plain; charset=utf-8") in fields
    assert (("x-meshproxy-overloaded", "true") in fields) == (name == "Overloaded")
    assert (("connection", "close") in fields) == (not keep_alive)
    assert head.keep_alive == keep_alive
    assert b"detail" not in data


def test_exact_bytes_of_a_bad_request_that_closes() -> None:
    assert error_response(errors.BadRequest("bad chunk size"), keep_alive=False) == (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: 29\r\n"
        b"x-meshproxy-error: bad-request\r\n"
        b"connection: close\r\n"
        b"\r\n"
        b"400 Bad Request: bad-request\n"
    )


def test_exact_bytes_of_overloaded_kept_alive() -> None:
    assert error_response(errors.Overloaded(), keep_alive=True) == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: 36\r\n"
        b"x-meshproxy-error: overloaded\r\n"
        b"x-meshproxy-overloaded: true\r\n"
        b"\r\n"
        b"503 Service Unavailable: overloaded\n"
    )


def test_detail_never_reaches_the_wire() -> None:
    """Details may quote client bytes; none of them may become a header."""
    error = errors.BadRequest("x\r\nSet-Cookie: stolen=1\r\n\r\nHTTP/1.1 200 OK")
    data = error_response(error, keep_alive=False)
    assert b"Set-Cookie" not in data
    assert b"200 OK" not in data


def test_base_error_is_an_upstream_protocol_error() -> None:
    data = error_response(ProxyError(), keep_alive=True)
    head, body, _ = parse(data)
    assert head.status == 502
    assert (b"x-meshproxy-error", b"upstream-protocol-error") in head.headers
    assert body == b"502 Bad Gateway: upstream-protocol-error\n"


@pytest.mark.parametrize(
    ("error", "text"),
    [(errors.NoRoute(), "no-route"), (errors.NoRoute("no match for /x"), "no match for /x")],
)
def test_error_text_is_the_detail_or_the_reason(error: ProxyError, text: str) -> None:
    assert str(error) == text
    assert error.detail == ("" if text == error.reason else text)
