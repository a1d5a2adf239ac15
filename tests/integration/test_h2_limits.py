"""HTTP/2 limits and the known HTTP/2 attacks against a real sidecar (spec §9;
docs/http2-codec.md, "Attack behaviour"), each refused with the right frame while other
connections are served.

The attacker is a plain socket on 127.0.0.1 sending frames built here by hand: a frame is
its 9-byte header (RFC 9113 §4.1: 24-bit length, type, flags, 31-bit stream id) and its
payload, and header blocks are HPACK literals (RFC 7541 §6.2.2: no indexing, new name, no
Huffman coding), so every byte on the wire is in the test. What the proxy sends back is
parsed frame by frame; a response's `:status` is read from the first field of its block.

While the attacker is refused, a normal client (curl, HTTP/2 with prior knowledge) on
another connection to the same sidecar is answered.

| attack | what the attacker sees |
| --- | --- |
| the 101st concurrent stream | RST_STREAM REFUSED_STREAM on it; the 100 others answered |
| a header list over 64 KiB | a 431 `headers-too-large` answer on that stream |
| one field over 64 KiB | GOAWAY COMPRESSION_ERROR (nghttp2's HPACK limit per field) |
| rapid reset (CVE-2023-44487) | GOAWAY ENHANCE_YOUR_CALM |
| CONTINUATION flood (CVE-2024-27316) | GOAWAY ENHANCE_YOUR_CALM after 8 CONTINUATIONs |
| HPACK bomb | GOAWAY ENHANCE_YOUR_CALM (past 4 × 64 KiB decoded) |
| a smaller HPACK bomb (100 KB decoded) | a 431 answer on that stream |
| SETTINGS / PING flood, never read | GOAWAY ENHANCE_YOUR_CALM |
| zero window, never opened | the upstream paused; RST_STREAM CANCEL after the idle timeout |
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

import pytest

from support.proxy import ProxyProcess, mesh_yaml, wait_for

# -- frames, by hand ---------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x3, 0x4  # SETTINGS identifiers (§6.5.2)
NO_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = (
    0x0, 0x7, 0x8, 0x9, 0xB)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 3-byte length, type, flags, 4-byte stream id, payload (RFC 9113 §4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream) + payload


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """An HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1), `first` its top bits."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A field as an HPACK literal without indexing, new name, no Huffman (§6.2.2)."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def request_block(path: bytes, *extra: tuple[bytes, bytes]) -> bytes:
    """The header block of `GET path` to the Service `web`, and `extra` fields."""
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path),
              (b":authority", b"web"), *extra]
    return b"".join(literal(name, value) for name, value in fields)


def header_frames(stream: int, block: bytes, end_stream: bool = True) -> bytes:
    """`block` as HEADERS and as many CONTINUATION frames as 16 KiB frames need (§6.10)."""
    pieces = [block[at:at + 16384] for at in range(0, len(block), 16384)]
    flags = END_STREAM if end_stream else 0
    out = frame(HEADERS, flags | (END_HEADERS if len(pieces) == 1 else 0), stream, pieces[0])
    for i, piece in enumerate(pieces[1:], 2):
        out += frame(CONTINUATION, END_HEADERS if i == len(pieces) else 0, stream, piece)
    return out


# -- what the proxy answers ----------------------------------------------------------------

@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a RST_STREAM or GOAWAY."""
        return struct.unpack(">I", self.payload[-4:] if self.kind == RST_STREAM
                             else self.payload[4:8])[0]

    @property
    def last_stream(self) -> int:
        """A GOAWAY's last stream id."""
        return struct.unpack(">I", self.payload[:4])[0] & 0x7FFFFFFF


# RFC 7541 Appendix B: the Huffman codes of the digits, all a status value needs.
_HUFFMAN_DIGITS = {"00000": "0", "00001": "1", "00010": "2", "011001": "3", "011010": "4",
                   "011011": "5", "011100": "6", "011101": "7", "011110": "8", "011111": "9"}
# RFC 7541 Appendix A: the static table's :status entries.
_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}


def status_of(block: bytes) -> int:
    """The `:status` of a response header block: its first field (RFC 9113 §8.3), either a
    static table entry or a literal with the name `:status` (static index 8)."""
    at = 0
    while block[at] & 0xE0 == 0x20:  # dynamic table size updates (§6.3) come first
        at += 1
        if block[at - 1] & 0x1F == 0x1F:
            while block[at] & 0x80:
                at += 1
            at += 1
    first = block[at]
    if first & 0x80:
        return _STATIC_STATUS[first & 0x7F]
    assert first in (0x48, 0x08, 0x18), f"not a literal :status: {block[:8]!r}"
    huffman, length = block[at + 1] & 0x80, block[at + 1] & 0x7F
    value = block[at + 2:at + 2 + length]
    if not huffman:
        return int(value)
    bits, digits, code = "".join(f"{b:08b}" for b in value), "", ""
    for bit in bits:
        code += bit
        if code in _HUFFMAN_DIGITS:
            digits += _HUFFMAN_DIGITS[code]
            code = ""
    assert set(code) <= {"1"} and len(code) < 8, "bad Huffman padding"
    return int(digits)


class Attacker:
    """A raw HTTP/2 client on a plain socket: sends what it is given, reads frames."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect, so that the window it advertises is small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""
        self.frames: list[Frame] = []
        self.closed = False

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False once the proxy has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def read(self, timeout: float) -> None:
        """Read what has come within `timeout` seconds into `frames` (at least one read)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            head, self.buffer = self.buffer[:9 + length], self.buffer[9 + length:]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            self.frames.append(Frame(head[3], head[4], stream, head[9:]))

    def wait(self, condition, timeout: float = 10.0, what: str = "a frame"):
        """Read until `condition(self)` is true (returned) or the connection closes."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition(self)
            if value:
                return value
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s (closed: {self.closed}); "
                                     f"got {[(f.kind, f.stream) for f in self.frames[-20:]]}")
            self.read(min(0.2, max(0.0, deadline - time.monotonic())))

    def read_to_end(self, timeout: float = 20.0) -> None:
        """Read until the proxy closes the connection."""
        self.wait(lambda c: c.closed, timeout, "the end of the connection")

    def goaway(self) -> Frame | None:
        return next((f for f in self.frames if f.kind == GOAWAY), None)

    def of(self, kind: int, stream: int | None = None) -> list[Frame]:
        return [f for f in self.frames if f.kind == kind and (stream is None or f.stream == stream)]

    def close(self) -> None:
        self.sock.close()


def settings_of(payload: bytes) -> dict[int, int]:
    return {int.from_bytes(payload[at:at + 2], "big"): int.from_bytes(payload[at + 2:at + 6], "big")
            for at in range(0, len(payload), 6)}


def ended(client: Attacker, stream: int) -> bool:
    """The stream's response is complete (a frame with END_STREAM) or it was reset."""
    return any(f.stream == stream and (f.kind == RST_STREAM or (
        f.kind in (HEADERS, DATA) and f.flags & END_STREAM)) for f in client.frames)


def body_of(client: Attacker, stream: int) -> bytes:
    return b"".join(f.payload for f in client.of(DATA, stream))


# -- the sidecar and the normal client ---------------------------------------------------------

LOOPS = pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])


@pytest.fixture(params=[True, False], ids=["uvloop", "asyncio"])
def sidecar(request, proxy_factory, backend):
    """A sidecar whose Service `web` is the shared aiohttp backend, on either event loop (how
    a transport pauses, half-closes and closes differs between them)."""
    return proxy_factory(mesh_yaml({"web": [backend.address]}), service="client",
                         uvloop=request.param)


def served(proxy: ProxyProcess) -> None:
    """A normal HTTP/2 client on its own connection gets its answer from the sidecar."""
    done = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-H", "host: web",
         "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
         f"http://127.0.0.1:{proxy.outbound}/status/200"],
        capture_output=True, timeout=15)
    assert done.stdout == b"200 2", (done.stdout, done.stderr)


def connected(proxy: ProxyProcess, settings: bytes = b"", **kwargs) -> Attacker:
    """A client that has sent the preface and its SETTINGS (`settings`: entries, RFC 9113
    §6.5.1) and received the proxy's."""
    client = Attacker(proxy.outbound, **kwargs)
    client.send(PREFACE + frame(SETTINGS, 0, 0, settings))
    client.wait(lambda c: c.of(SETTINGS, 0), what="the proxy's SETTINGS")
    return client


def memory_mib(proxy: ProxyProcess, before_kib: int) -> float:
    """How far the proxy's peak resident memory rose over `before_kib`, in MiB."""
    return (proxy.peak_rss_kib() - before_kib) / 1024


# -- limits ---------------------------------------------------------------------------------------

def test_the_101st_concurrent_stream_is_refused_and_the_others_complete(sidecar):
    client = connected(sidecar)
    [settings] = [f for f in client.of(SETTINGS, 0) if not f.flags & ACK]
    assert settings_of(settings.payload)[MAX_CONCURRENT_STREAMS] == 100  # as advertised
    client.send(frame(SETTINGS, ACK, 0))  # acknowledged: the limit is in force (§6.5.3)
    # 101 requests at once, each answered after a second: the 101st (stream 201) comes
    # while the other 100 are open.
    streams = range(1, 2 * 101, 2)
    client.send(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid,
                               request_block(b"/slow/1000")) for sid in streams))
    client.wait(lambda c: c.of(RST_STREAM, 201), what="RST_STREAM on the 101st stream")
    assert [f.code for f in client.of(RST_STREAM)] == [REFUSED_STREAM]
    served(sidecar)  # meanwhile, on another connection

    client.wait(lambda c: all(ended(c, sid) for sid in streams[:100]), timeout=20,
                what="the 100 answers")
    for sid in streams[:100]:
        [head] = client.of(HEADERS, sid)
        assert status_of(head.payload) == 200 and body_of(client, sid) == b"slow 1000\n"
    assert client.goaway() is None and not client.closed
    # The connection goes on: one more stream is served.
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 203, request_block(b"/status/200")))
    client.wait(lambda c: ended(c, 203), what="the answer on stream 203")
    assert status_of(client.of(HEADERS, 203)[0].payload) == 200
    client.close()


def test_a_header_list_over_64_kib_is_answered_431_and_the_connection_goes_on(sidecar,
                                                                               backend):
    client = connected(sidecar)
    # Five 16,000-byte fields: 80 KiB of header list (each field counts its name, value
    # and 32 bytes, RFC 9113 §6.5.2), over the 64 KiB the proxy advertises, sent as HEADERS
    # and four CONTINUATION frames.
    big = request_block(b"/echo?too-large", *[(b"x-big-%d" % i, b"v" * 16000)
                                               for i in range(5)])
    client.send(header_frames(1, big))
    client.wait(lambda c: ended(c, 1), what="the answer to the large request")
    [head] = client.of(HEADERS, 1)
    assert status_of(head.payload) == 431  # as the HTTP/1.1 path answers a 64 KiB head
    assert b"headers-too-large" in body_of(client, 1)
    assert not backend.requests("/echo?too-large")  # never forwarded
    served(sidecar)
    # Only that stream was refused: the connection (and its HPACK state) goes on.
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 3, request_block(b"/status/200")))
    client.wait(lambda c: ended(c, 3), what="the answer on stream 3")
    assert status_of(client.of(HEADERS, 3)[0].payload) == 200
    assert client.goaway() is None
    client.close()


def test_a_single_field_over_64_kib_ends_the_connection_with_compression_error(sidecar):
    """nghttp2's HPACK decoder takes no name or value over 64 KiB: the block cannot be
    decoded, so the connection's compression state is lost (RFC 9113 §4.3)."""
    client = connected(sidecar)
    client.send(header_frames(1, request_block(b"/echo", (b"x-huge", b"v" * 70_000))))
    goaway = client.wait(lambda c: c.goaway(), what="GOAWAY")
    assert goaway.code == COMPRESSION_ERROR
    client.read_to_end()
    served(sidecar)
    client.close()


# -- attacks ---------------------------------------------------------------------------------------

def test_rapid_reset_gets_goaway_enhance_your_calm(sidecar, backend):
    """CVE-2023-44487: streams opened and reset at once, in a loop."""
    client = connected(sidecar)
    sid = 1
    while client.goaway() is None and not client.closed and sid < 20_000:
        # 20 × (HEADERS with END_STREAM, then RST_STREAM CANCEL) per write.
        batch = b""
        for _ in range(20):
            batch += frame(HEADERS, END_STREAM | END_HEADERS, sid,
                           request_block(b"/echo?rapid-reset"))
            batch += frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL))
            sid += 2
        if not client.send(batch):
            break
        client.read(0)
    goaway = client.wait(lambda c: c.goaway(), what="GOAWAY")
    assert goaway.code == ENHANCE_YOUR_CALM
    # The proxy's own rule (judged after each read, from 100 streams on) refused it before
    # 100 of those requests could have been passed on.
    assert len(backend.requests("/echo?rapid-reset")) < 100
    served(sidecar)
    client.read_to_end()
    client.close()


@pytest.mark.parametrize("pad", [b"", literal(b"x-pad", b"y" * 16000)],
                         ids=["empty", "16-kib"])
def test_a_continuation_flood_gets_goaway_and_memory_stays_bounded(sidecar, pad):
    """CVE-2024-27316: a header block that never ends (CONTINUATION frames without
    END_HEADERS, empty ones or 16 KiB each), sent until the proxy says GOAWAY."""
    before = sidecar.rss_kib()
    client = connected(sidecar)
    client.send(frame(HEADERS, END_STREAM, 1, request_block(b"/echo")))  # no END_HEADERS
    continuation = frame(CONTINUATION, 0, 1, pad)
    sent = 0
    while client.goaway() is None and not client.closed and sent < 64 << 20:
        if not client.send(continuation * 16):
            break
        sent += 16 * len(continuation)
        client.read(0)
    goaway = client.wait(lambda c: c.goaway(), what="GOAWAY")
    assert goaway.code == ENHANCE_YOUR_CALM
    served(sidecar)
    client.read_to_end()
    assert memory_mib(sidecar, before) < 16
    client.close()


def test_an_hpack_bomb_gets_goaway_enhance_your_calm(sidecar):
    """A 4,000-byte field put in the dynamic table once, then referenced 12,000 times: 16 KB
    on the wire that would decode to 48 MB."""
    before = sidecar.rss_kib()
    client = connected(sidecar)
    entry = b"\x40" + hpack_int(6, 7) + b"x-bomb" + hpack_int(4000, 7) + b"z" * 4000  # §6.2.1
    bomb = request_block(b"/echo") + entry + b"\xbe" * 12_000  # §6.1: index 62, the entry
    assert len(bomb) <= 16384
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, bomb))
    goaway = client.wait(lambda c: c.goaway(), what="GOAWAY")
    assert goaway.code == ENHANCE_YOUR_CALM
    served(sidecar)
    client.read_to_end()
    assert memory_mib(sidecar, before) < 16
    client.close()


def test_a_smaller_hpack_bomb_is_answered_431(sidecar):
    """The same entry referenced 25 times: 100 KB decoded, over the limit but under the
    ceiling up to which the proxy decodes: that stream alone is refused."""
    client = connected(sidecar)
    entry = b"\x40" + hpack_int(6, 7) + b"x-bomb" + hpack_int(4000, 7) + b"z" * 4000
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1,
                      request_block(b"/echo") + entry + b"\xbe" * 25))
    client.wait(lambda c: ended(c, 1), what="the answer")
    assert status_of(client.of(HEADERS, 1)[0].payload) == 431
    assert client.goaway() is None
    client.close()


@pytest.mark.parametrize("flood", [frame(SETTINGS, 0, 0), frame(PING, 0, 0, b"12345678")],
                         ids=["settings", "ping"])
def test_a_control_frame_flood_never_read_gets_goaway_enhance_your_calm(sidecar, flood):
    """Empty SETTINGS (9 bytes each) or PINGs (17 bytes each), 4 MiB of them, from a client
    that reads nothing meanwhile: each calls for an acknowledgement, which the proxy may not
    queue without bound (nghttp2 counts those not yet taken from it; the proxy takes none
    while the client does not read)."""
    before = sidecar.rss_kib()
    # A small receive buffer: the proxy's writes back up after a few kilobytes.
    client = connected(sidecar, rcvbuf=4096)
    count = (4 << 20) // len(flood)
    chunk = flood * 256
    for _ in range(count // 256):
        if not client.send(chunk):
            break
    served(sidecar)  # while the flood's answers are still unread
    client.read_to_end(timeout=30)
    goaway = client.goaway()
    assert goaway is not None and goaway.code == ENHANCE_YOUR_CALM
    acks = [f for f in client.frames if f.kind == flood[3] and f.flags & ACK]
    assert len(acks) < count // 4  # the proxy stopped answering long before the end
    assert memory_mib(sidecar, before) < 16
    client.close()


@LOOPS
def test_a_zero_window_stall_pauses_the_upstream_and_ends_after_the_idle_timeout(
        proxy_factory, backend, uvloop):
    """INITIAL_WINDOW_SIZE 0 and never a WINDOW_UPDATE, for a 64 MiB response: the proxy
    holds a bounded part of it (the upstream is no longer read), and resets the stream once
    the client has taken nothing for the idle timeout (1 s here)."""
    proxy = proxy_factory(mesh_yaml({"web": [backend.address]}), service="client",
                          uvloop=uvloop, extra_args=["--client-idle-timeout", "1"])
    before = proxy.rss_kib()
    client = connected(proxy, settings=struct.pack(">HI", INITIAL_WINDOW_SIZE, 0))
    client.send(frame(SETTINGS, ACK, 0))
    path = b"/bytes/67108864?stall-%s" % (b"uvloop" if uvloop else b"asyncio")
    client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, request_block(path)))
    client.wait(lambda c: c.of(HEADERS, 1), what="the response head")
    started = time.monotonic()
    assert status_of(client.of(HEADERS, 1)[0].payload) == 200
    [upstream] = wait_for(lambda: backend.requests(path.decode()))
    assert not upstream.done  # paused: the backend cannot finish its 64 MiB
    served(proxy)  # while the stall holds

    reset = client.wait(lambda c: c.of(RST_STREAM, 1), what="RST_STREAM")[0]
    waited = time.monotonic() - started
    assert reset.code == CANCEL
    assert 0.8 <= waited < 5, waited
    assert not client.of(DATA, 1)  # the window never admitted a byte
    # The upstream was let go, and then the idle connection ends with a GOAWAY.
    wait_for(lambda: upstream.done, what="the backend's handler to end")
    client.read_to_end()
    assert client.goaway().code == NO_ERROR
    assert memory_mib(proxy, before) < 16
    client.close()
