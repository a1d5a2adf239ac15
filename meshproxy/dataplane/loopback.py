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


def listens_on_ipv6_loopback(table: str, port: int, byteorder: str = sys.byteorder) -> bool:
    """Return whether `/proc/net/tcp6` text `table` shows a socket listening on `port` that
    accepts connections to `::1` (bound to `::` or `::1`). Lines that do not parse are
    skipped."""
    suffix = f":{port:04X}"
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTEN or not fields[1].endswith(suffix):
            continue
        try:
            address = _address(fields[1][:-5], byteorder)
        except ValueError:
            continue
        if address in (_ANY, _LOOPBACK):
            return True
    return False


def app_loopback(port: int, path: str = TCP6_TABLE) -> str:
    """Return the loopback address to reach the local app's `port` from an IPv6 connection:
    `::1` when the app listens there, else `127.0.0.1` (also when the table cannot be read:
    a kernel without IPv6 has none)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return IPV4_LOOPBACK
    return IPV6_LOOPBACK if listens_on_ipv6_loopback(table, port) else IPV4_LOOPBACK
