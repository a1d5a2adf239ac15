"""Protocol detection (meshproxy.policy.detect): first bytes in, HTTP/1 or TCP out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.policy.detect import (
    DEFAULT_OPAQUE_PORTS,
    H2_PREFACE_START,
    HTTP1,
    MAX_DETECT_BYTES,
    METHODS,
    TCP,
    decide,
    detect,
    opaque_ports,
    parse_ports,
)


@pytest.mark.parametrize("method", METHODS)
def test_every_known_method_followed_by_a_space_is_http(method: bytes) -> None:
    line = method + b" /path HTTP/1.1\r\n"
    assert detect(line) == HTTP1
    assert detect(method + b" ") == HTTP1
    # every strict prefix of `METHOD ` waits for more bytes
    for cut in range(1, len(method) + 1):
        assert detect(line[:cut]) is None, line[:cut]


def test_the_http2_preface_goes_to_the_http_path() -> None:
    """Prior-knowledge HTTP/2 (gRPC, h2c) is served per request, not proxied as TCP; the
    HTTP path tells it from HTTP/1.1 by the whole preface."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert detect(preface) == HTTP1
    for cut in range(1, len(H2_PREFACE_START)):
        assert detect(preface[:cut]) is None, preface[:cut]
    assert detect(b"PRI * HTTP/1.1\r\n") == TCP


@pytest.mark.parametrize("first", [
    b"\x16\x03\x01\x02\x00",            # a TLS ClientHello
    b"*1\r\n$4\r\nPING\r\n",             # Redis
    b"PING\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"get / HTTP/1.1\r\n",               # methods are case-sensitive (RFC 9110 §9.1)
    b"GETX / HTTP/1.1\r\n",
    b"GET\t/ HTTP/1.1\r\n",
    b"POSTAL",
    b" GET / HTTP/1.1",
    b"\r\nGET / HTTP/1.1\r\n",
    b"HELO mail.example\r\n",            # SMTP's client verbs are not HTTP methods
])
def test_anything_else_is_tcp(first: bytes) -> None:
    assert detect(first) == TCP
    assert decide(first) == TCP


def test_decide_waits_then_gives_up_on_silence_and_prefixes() -> None:
    assert decide(b"") is None
    assert decide(b"", final=True) == TCP  # a server-first protocol: the client said nothing
    assert decide(b"GE") is None
    assert decide(b"GE", final=True) == TCP
    assert decide(b"GET /", final=True) == HTTP1


def test_opaque_skips_detection() -> None:
    assert decide(b"GET / HTTP/1.1\r\n", opaque=True) == TCP
    assert decide(b"", opaque=True) == TCP


def test_a_decision_needs_at_most_max_detect_bytes() -> None:
    assert MAX_DETECT_BYTES == len(b"PRI * HTTP/2.0\r\n")
    assert detect(b"PROPPATCH" + b"x" * 100) == TCP


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_a_decision_does_not_change_with_more_bytes(first: bytes, more: bytes) -> None:
    verdict = detect(first)
    if verdict is not None:
        assert detect(first + more) == verdict


@given(st.binary(max_size=20))
def test_http_exactly_when_a_method_and_a_space_or_the_http2_preface_lead(data: bytes) -> None:
    leads = [m + b" " for m in METHODS] + [b"PRI * HTTP/2.0\r\n"]
    starts = any(data.startswith(lead) for lead in leads)
    prefix = any(lead.startswith(data) and len(data) < len(lead) for lead in leads)
    expected = HTTP1 if starts else (None if prefix else TCP)
    assert detect(data) == expected


def test_parse_ports() -> None:
    assert parse_ports(None) == frozenset()
    assert parse_ports(" 3306, 8000-8002,,9000 ") == {3306, 8000, 8001, 8002, 9000}
    for bad in ("0", "65536", "http", "10-5", "1-x", "-3"):
        with pytest.raises(ValueError, match=repr(bad).strip("'")):
            parse_ports(bad)


def test_default_opaque_ports_are_the_specs_and_extra_ones_add_to_them() -> None:
    assert DEFAULT_OPAQUE_PORTS == {25, 587, 3306, 4444, 5432, 6379, 9300, 11211}
    assert opaque_ports() == DEFAULT_OPAQUE_PORTS
    assert opaque_ports("8080,9000-9001") == DEFAULT_OPAQUE_PORTS | {8080, 9000, 9001}
