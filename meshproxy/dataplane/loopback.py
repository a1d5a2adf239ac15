"""Which loopback address the local app listens on, for inbound connections that arrived over
IPv6 (transparent mode, docs/transparent.md "Inbound").

The inbound side forwards a redirected connection to the app on a loopback address and the
original port. For an IPv6 connection the app is reached at `::1` when it listens there (on
`[::]` or `[::1]`), so it sees the family the caller used, as Istio and Linkerd forward in the
caller's family; otherwise at `127.0.0.1`, because many apps listen on `0.0.0.0` only and a
caller that reached the pod over IPv6 should not be refused for it (without a mesh, a dual-stack
client would have fallen back to IPv4). Deciding from the kernel's table of listening sockets,
rather than by trying `::1` and falling back, costs no failed connection to the app and works
the same for HTTP pools and proxied TCP connections.

`/proc/net/tcp6` lists the TCP sockets of the network namespace (the pod's), world-readable:
`sl local_address rem_address st ...`, an address as 32 hex digits (four 32-bit words in host
byte order) and a port as 4 hex digits; state `0A` is LISTEN.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

TCP6_TABLE = "/proc/net/tcp6"
IPV4_LOOPBACK = "127.0.0.1"
IPV6_LOOPBACK = "::1"
_LISTEN = "0A"
_ANY = bytes(16)
_LOOPBACK = bytes(15) + b"\x01"


def _address(text: str, byteorder: str) -> bytes:
    """The 16 bytes of a `/proc/net/tcp6` address (four words in `byteorder`)."""
    raw = bytes.fromhex(text)
    if byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return raw


def ipv6_loopback_ports(lines: Iterable[str], byteorder: str = sys.byteorder) -> frozenset[int]:
    """Return the ports that `/proc/net/tcp6` lines `lines` (heading first) show listening in a
    way that accepts connections to `::1` (bound to `::` or `::1`). The kernel lists
    listening sockets before all others, so reading stops at the first line in another state:
    a pod with thousands of connections costs no more than one with none. Lines that do not
    parse are skipped."""
    ports = set()
    rows = iter(lines)
    next(rows, None)  # the heading
    for line in rows:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[3] != _LISTEN:
            break
        address, _, port = fields[1].rpartition(":")
        try:
            if _address(address, byteorder) in (_ANY, _LOOPBACK):
                ports.add(int(port, 16))
        except ValueError:
            continue
    return frozenset(ports)


def read_ipv6_loopback_ports(path: str = TCP6_TABLE) -> frozenset[int]:
    """`ipv6_loopback_ports` of the pod's table (none when it cannot be read: a kernel
    without IPv6 has none)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return ipv6_loopback_ports(f)
    except OSError:
        return frozenset()


class AppLoopback:
    """The loopback address that reaches the local app's port from an IPv6 connection: `::1`
    when the app listens there, else `127.0.0.1`.

    The answer comes from one read of the table for every port, made again when it is
    `ttl` seconds old (the app may restart and bind differently), or when a port is not in it
    and the read is `miss_ttl` old (an app still starting: it would otherwise be reached at
    the wrong address for the whole `ttl`). So the table is read at most 1/`miss_ttl` times a
    second however many ports callers try."""

    def __init__(self, clock: Callable[[], float], read: Callable[[], frozenset[int]] = read_ipv6_loopback_ports,
                 *, ttl: float = 5.0, miss_ttl: float = 0.5) -> None:
        self.clock = clock
        self.read = read
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self._ports: frozenset[int] = frozenset()
        self._read_at = float("-inf")

    def host(self, port: int) -> str:
        """Return `::1` or `127.0.0.1` for the app's `port` (see the class docstring)."""
        age = self.clock() - self._read_at
        if age >= self.ttl or (port not in self._ports and age >= self.miss_ttl):
            self._ports = self.read()
            self._read_at = self.clock()
        return IPV6_LOOPBACK if port in self._ports else IPV4_LOOPBACK
