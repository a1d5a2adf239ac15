"""Header fields between HTTP/1.1 heads and HTTP/2 header lists (RFC 9113 §8.2, §8.3)."""

from __future__ import annotations

import pytest

from meshproxy.http1.errors import BadRequest, UpstreamProtocolError
from meshproxy.http1.events import RequestHead, ResponseHead
from meshproxy.http1.reader import RequestReader
from meshproxy.http1.response_reader import ResponseReader
from meshproxy.http2.fields import (
    request_fields,
    request_head,
    response_fields,
    response_head,
    trailer_fields,
)

GRPC = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/drone.Tracking/Watch"),
        (b":authority", b"tracking.default:50051"), (b"content-type", b"application/grpc"),
        (b"te", b"trailers"), (b"grpc-timeout", b"100m"), (b"x-request-id", b"abc")]


def test_a_stream_request_reads_like_an_http1_head() -> None:
    head = request_head(GRPC)
    assert (head.method, head.target, head.version) == (b"POST", b"/drone.Tracking/Watch", "2")
    assert head.host == b"tracking.default:50051" and head.request_id == b"abc"
    assert head.header(b"host") == b"tracking.default:50051"  # what resolvers and routes read
    assert head.header(b"grpc-timeout") == b"100m"
    assert head.content_length is None and not head.chunked


def test_host_stands_in_for_a_missing_authority() -> None:
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"shop")]
    assert request_head(fields).host == b"shop"


@pytest.mark.parametrize("fields", [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],  # no :path
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],  # no authority at all
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a"),
     (b"connection", b"close")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a"),
     (b"content-length", b"1"), (b"content-length", b"2")],
    [(b":method", b"CONNECT"), (b":authority", b"a:443")],
])
def test_requests_http2_forbids_are_refused(fields: list) -> None:
    with pytest.raises(BadRequest):
        request_head(fields)


def test_an_http1_request_goes_on_a_stream_without_its_connection_fields() -> None:
    [head, *_] = RequestReader().feed(
        b"POST /up HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
        b"TE: gzip\r\nX-Thing:  v \r\nContent-Length: 3\r\n\r\nabc")
    # Marked as HTTP/1.1, so that a receiving sidecar gives its app HTTP/1.1 (spec §9).
    assert request_fields(head, b"/up") == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"shop"),
        (b":path", b"/up"), (b"x-thing", b"v"), (b"content-length", b"3"),
        (b"x-meshproxy-orig-proto", b"HTTP/1.1")]


def test_an_http1_request_carried_between_sidecars_is_http1_again() -> None:
    [head, *_] = RequestReader().feed(
        b"PUT /item?x=1 HTTP/1.1\r\nHost: shop:8080\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n")
    assert head.chunked
    received = request_head(request_fields(head, b"/item?x=1"))
    assert received.version == "1.1"
    assert (received.method, received.target, received.host) == (b"PUT", b"/item?x=1", b"shop:8080")
    assert received.headers == [(b"host", b"shop:8080"), (b"x-a", b"1")]  # no marker left
    assert received.content_length is None  # the body's length is unknown: chunked again


def test_an_http2_request_is_not_marked() -> None:
    head = request_head([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                         (b":authority", b"a")])
    assert head.version == "2"
    assert (b"x-meshproxy-orig-proto", b"HTTP/1.1") not in request_fields(head, b"/")


def test_te_trailers_is_the_one_te_kept() -> None:
    head = RequestHead(b"POST", b"/x", "1.1", [(b"Host", b"a"), (b"TE", b"trailers")])
    head.host = b"a"
    assert (b"te", b"trailers") in request_fields(head, b"/x")


def test_a_response_header_list_becomes_a_head_and_back() -> None:
    head = response_head([(b":status", b"200"), (b"content-type", b"text/plain"),
                          (b"content-length", b"2")])
    assert (head.status, head.content_length, head.headers) == (
        200, 2, [(b"content-type", b"text/plain")])
    assert response_fields(head) == [(b":status", b"200"), (b"content-type", b"text/plain"),
                                     (b"content-length", b"2")]


def test_an_http1_response_goes_on_a_stream_lower_cased_without_connection_fields() -> None:
    reader = ResponseReader()
    reader.expect(False)
    [head, *_] = reader.feed(b"HTTP/1.1 200 OK\r\nServer: app\r\nConnection: keep-alive\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
    assert response_fields(head) == [(b":status", b"200"), (b"server", b"app")]


@pytest.mark.parametrize("fields", [[], [(b":status", b"20")], [(b":status", b"abc")]])
def test_a_response_without_a_valid_status_is_an_upstream_error(fields: list) -> None:
    with pytest.raises(UpstreamProtocolError):
        response_head(fields)


def test_trailers_drop_pseudo_and_connection_fields() -> None:
    assert trailer_fields([(b"Grpc-Status", b"0"), (b":status", b"200"),
                           (b"connection", b"close"), (b"grpc-message", b" ok ")]) == [
        (b"grpc-status", b"0"), (b"grpc-message", b"ok")]


def test_a_head_without_content_length_gets_none_on_a_stream() -> None:
    head = ResponseHead(204, b"", "1.1", headers=[])
    head.content_length = 0
    assert response_fields(head) == [(b":status", b"204")]
