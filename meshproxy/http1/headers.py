"""Header rules a proxy must apply: hop-by-hop fields (RFC 9110 §7.6.1) and framing fields.

Names are compared lower-cased. Framing fields (Content-Length, Transfer-Encoding) are taken
out of the forwarded headers because the proxy writes its own framing for the next hop: bodies
are streamed and may be re-framed (a close-delimited response becomes chunked, for example).
"""

from __future__ import annotations

from typing import Final

from meshproxy.http1.events import HeaderList

# RFC 9110 §7.6.1 names these; Proxy-Connection is the old non-standard spelling clients still
# send; Trailer announces trailer fields, which this proxy does not forward.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)

# Fields the readers look at while collecting headers (framing, routing, correlation).
FRAMING_AND_HOP: Final = HOP_BY_HOP | {b"content-length", b"host", b"x-request-id", b"expect"}


_COMMON_CONNECTION: Final = {b"keep-alive": (b"keep-alive",), b"close": (b"close",),
                             b"Keep-Alive": (b"keep-alive",), b"Close": (b"close",)}


def connection_tokens(values: list[bytes]) -> tuple[bytes, ...]:
    """Return the lower-cased, stripped tokens of one or more Connection header values."""
    if len(values) == 1:
        common = _COMMON_CONNECTION.get(values[0])
        if common is not None:
            return common  # the usual single value, without splitting
    tokens: list[bytes] = []
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.append(token)
    return tuple(tokens)


# Connection tokens that name no field to drop. Host and x-request-id are end to end by their
# nature: a Connection header naming them would let a client strip them between proxies.
_NOT_DROPPED: Final = frozenset({b"close", b"keep-alive", b"upgrade", b"host", b"x-request-id"})


def names_fields(tokens: tuple[bytes, ...]) -> bool:
    """True when Connection `tokens` name fields to drop (anything but the common values)."""
    for token in tokens:
        if token not in _NOT_DROPPED:
            return True
    return False


def drop_connection_named(headers: HeaderList, tokens: tuple[bytes, ...]) -> HeaderList:
    """Return `headers` without the fields that the Connection header names (RFC 9110 §7.6.1).

    The common Connection values (keep-alive, close, upgrade) name nothing, and then the list
    is returned as it is, without a copy.
    """
    if not names_fields(tokens):
        return headers
    named = set(tokens) - _NOT_DROPPED
    return [(k, v) for k, v in headers if k.lower() not in named]
