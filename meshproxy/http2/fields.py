"""Header fields between HTTP/1.1 heads and HTTP/2 header lists (RFC 9113 §8), sans I/O.

An HTTP/2 stream is carried through the proxy as a request like any other: its header list
becomes a `RequestHead` (http1/events.py) that routing, trace propagation and the access log
read as they read an HTTP/1.1 head, and a response head becomes a header list again. What
differs between the two versions is settled here, once:

- the request line is the pseudo-header fields `:method`, `:scheme`, `:authority`, `:path`;
  the status line is `:status` (RFC 9113 §8.3);
- field names are lower case on HTTP/2, and connection-specific fields (`connection`,
  `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other than
  `trailers`) must not be sent (§8.2.2): they are dropped on the way out, as the HTTP/1.1
  path drops hop-by-hop fields;
- a value must not contain CR, LF or NUL, nor start or end with whitespace (§8.2.1): the
  codec checks what it receives; what the proxy sends from an HTTP/1.1 head has been
  checked by llhttp already, and values are stripped of surrounding whitespace here.
"""

from __future__ import annotations

from typing import Final

from meshproxy.http1.errors import BadRequest, UpstreamProtocolError
from meshproxy.http1.events import HeaderList, RequestHead, ResponseHead

# RFC 9113 §8.2.2: fields that are about one connection, never sent on HTTP/2. `host` is
# replaced by `:authority`; `te` is kept only as `te: trailers` (gRPC sends it).
CONNECTION_SPECIFIC: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})

# Marks an HTTP/2 request head: RequestHead.version of a request received as a stream.
VERSION: Final = "2"

# Between sidecars, HTTP/1.1 requests travel on the HTTP/2 connection too, marked with this
# field so that the receiving sidecar gives the app HTTP/1.1 (spec §9; Linkerd's
# `l5d-orig-proto`). Field names arrive lower-cased, as HTTP/2 has them.
ORIG_PROTO: Final = b"x-meshproxy-orig-proto"
ORIG_HTTP11: Final = b"HTTP/1.1"


def request_head(fields: HeaderList) -> RequestHead:
    """Return the RequestHead of a received request's header list (pseudo-header fields
    first, as the codec checked). Raises BadRequest for what HTTP/2 forbids and the codec
    lets through, and for CONNECT, which the proxy does not carry."""
    method = scheme = authority = path = None
    headers: HeaderList = []
    content_length: int | None = None
    version = VERSION
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
            continue
        if name in CONNECTION_SPECIFIC:
            raise BadRequest(f"connection-specific field {name.decode()!r} in an HTTP/2 request")
        if name == b"content-length":
            if not value.isdigit() or (content_length is not None
                                       and content_length != int(value)):
                raise BadRequest("invalid content-length")
            content_length = int(value)
            continue  # framing: written again from `content_length`, as HTTP/1.1 heads do
        elif name == b"host":
            if authority is None:
                authority = value  # RFC 9113 §8.3.1: Host when there is no :authority
            continue  # written again from the authority
        elif name == ORIG_PROTO:
            if value == ORIG_HTTP11:
                version = "1.1"  # an HTTP/1.1 request carried between sidecars
            continue
        headers.append((name, value))
    if method is None or scheme is None or path is None:
        raise BadRequest("an HTTP/2 request without :method, :scheme or :path")
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not supported")
    if authority is None:
        raise BadRequest("an HTTP/2 request without :authority or host")
    # The authority goes first, as a Host field would come in an HTTP/1.1 head: the mesh's
    # resolvers and routes read `host`.
    headers.insert(0, (b"host", authority))
    head = RequestHead(method, path, version, headers)
    head.host = authority
    head.content_length = content_length
    for name, value in headers:
        if name == b"x-request-id":
            head.request_id = value
            break
    return head


def request_fields(head: RequestHead, target: bytes, scheme: bytes = b"http") -> HeaderList:
    """Return the header list that sends `head` (to `target`) on an HTTP/2 stream: pseudo-
    header fields, then its end-to-end fields lower-cased, without connection-specific ones
    and without Host (it is the `:authority`)."""
    authority = head.host or b""
    fields: HeaderList = [(b":method", head.method), (b":scheme", scheme),
                          (b":authority", authority), (b":path", target)]
    for name, value in head.headers:
        lname = name.lower()
        if lname in CONNECTION_SPECIFIC or lname == b"host":
            continue
        if lname == b"te" and value.strip().lower() != b"trailers":
            continue
        fields.append((lname, value.strip(b" \t")))
    if head.content_length is not None and not head.chunked:
        fields.append((b"content-length", b"%d" % head.content_length))
    if head.version != VERSION:
        fields.append((ORIG_PROTO, ORIG_HTTP11))
    return fields


def response_head(fields: HeaderList) -> ResponseHead:
    """Return the ResponseHead of a received response's header list. Raises
    UpstreamProtocolError for a missing or malformed `:status`."""
    status = None
    headers: HeaderList = []
    content_length: int | None = None
    for name, value in fields:
        if name == b":status":
            status = value
        elif name[:1] != b":":
            if name == b"content-length" and value.isdigit():
                content_length = int(value)
            elif name not in CONNECTION_SPECIFIC:
                headers.append((name, value))
    if status is None or len(status) != 3 or not status.isdigit():
        raise UpstreamProtocolError("an HTTP/2 response without a valid :status")
    head = ResponseHead(int(status), b"", VERSION, headers=headers)
    head.content_length = content_length
    return head


def response_fields(head: ResponseHead) -> HeaderList:
    """Return the header list that sends `head` on an HTTP/2 stream: `:status`, then its
    end-to-end fields lower-cased, without connection-specific ones; Content-Length when
    the body's length is known."""
    fields: HeaderList = [(b":status", b"%d" % head.status)]
    for name, value in head.headers:
        lname = name.lower()
        if lname in CONNECTION_SPECIFIC or lname == b"te":
            continue
        fields.append((lname, value))
    if head.content_length is not None and head.status != 204 and head.status >= 200:
        fields.append((b"content-length", b"%d" % head.content_length))
    return fields


def trailer_fields(fields: HeaderList) -> HeaderList:
    """Return trailer fields to send on HTTP/2: lower-cased, no pseudo-header or
    connection-specific fields (RFC 9113 §8.1)."""
    out: HeaderList = []
    for name, value in fields:
        lname = name.lower()
        if lname[:1] == b":" or lname in CONNECTION_SPECIFIC:
            continue
        out.append((lname, value.strip(b" \t")))
    return out
