"""Protocol detection for transparent mode (spec §7 "Not all TCP is HTTP"). Pure: bytes in,
a decision out.

A redirected connection may carry anything. Its first bytes decide: a known HTTP/1 method
token followed by a space (RFC 9112 §3: `request-line = method SP request-target SP
HTTP-version`) means HTTP/1, handled by the L7 path; anything else means plain TCP, proxied
byte for byte. Server-first protocols (MySQL, SMTP, Redis' replies aside, most databases)
send nothing until the server greets them, so a connection that stays silent for a short
time is TCP too; opaque ports skip the wait altogether.

The HTTP/2 connection preface (`PRI * HTTP/2.0`, prior knowledge) goes to the same L7 path,
which tells the two versions apart by the whole preface (dataplane/downstream.py): gRPC and
h2c calls are balanced, retried and counted per request, not proxied as one opaque stream.
"""

from __future__ import annotations

HTTP1 = "http1"
TCP = "tcp"

# How long a transparent connection may stay silent before it is taken to be server-first.
DETECT_TIMEOUT = 0.1

# Spec §7: SMTP (25, 587), MySQL (3306), 4444 (Galera SST, and a common plain-TCP admin
# port), PostgreSQL (5432), Redis (6379), Elasticsearch transport (9300), memcached (11211).
DEFAULT_OPAQUE_PORTS: frozenset[int] = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})

# RFC 9110 §9 methods, PATCH (RFC 5789) and the WebDAV methods (RFC 4918, 3253, 5323) that
# clients send in practice. Method tokens are case-sensitive (RFC 9110 §9.1).
METHODS: tuple[bytes, ...] = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"SEARCH",
)
# The start of the HTTP/2 client connection preface (RFC 9113 §3.4).
H2_PREFACE_START = b"PRI * HTTP/2.0\r\n"
_PREFIXES: tuple[bytes, ...] = tuple(m + b" " for m in METHODS) + (H2_PREFACE_START,)

#: The most bytes `detect` ever needs to decide (the longest method token and its space).
MAX_DETECT_BYTES = max(map(len, _PREFIXES))


def detect(first: bytes) -> str | None:
    """Return HTTP1 when `first` (the connection's first bytes, as many as have arrived)
    begins with a known method and a space, or the HTTP/2 preface (HTTP1 names the HTTP
    path, which serves both versions), TCP when it cannot, and None when it is a
    strict prefix of one (wait for more bytes, or decide TCP once the wait is over)."""
    head = first[:MAX_DETECT_BYTES]
    undecided = False
    for prefix in _PREFIXES:
        if head.startswith(prefix):
            return HTTP1
        if prefix.startswith(head):
            undecided = True
    return None if undecided else TCP


def decide(first: bytes, *, opaque: bool = False, final: bool = False) -> str | None:
    """Return HTTP1 or TCP for a connection, or None to keep waiting.

    `opaque`: the destination port skips detection (TCP at once). `final`: no more bytes
    will be waited for (the detection timeout passed, or the client half-closed), so an
    undecided prefix, or nothing at all, is TCP."""
    if opaque:
        return TCP
    verdict = detect(first) if first else None
    if verdict is None and final:
        return TCP
    return verdict


def parse_ports(text: str | None) -> frozenset[int]:
    """Parse `3306,8000-8010` (blanks and empty items ignored) into a set of ports.

    Raises ValueError naming the item that is not a port (1-65535) or a low-high range."""
    ports: set[int] = set()
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        low, sep, high = item.partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            raise ValueError(f"{item!r} is not a port or a range like 8000-8010") from None
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"{item!r} is not within 1-65535 (low to high)")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def opaque_ports(extra: str | None = None) -> frozenset[int]:
    """Return the default opaque ports plus those `extra` lists (`parse_ports` syntax).
    Raises ValueError for a bad item."""
    return DEFAULT_OPAQUE_PORTS | parse_ports(extra)
