"""The destination a redirected connection was originally sent to (`SO_ORIGINAL_DST`).

`meshproxy init` installs `REDIRECT` rules: an app's connection to 10.1.2.3:80 arrives at the
proxy's outbound listener, and a peer's connection to the pod's port 8080 at the inbound
listener. Linux keeps the address before NAT in the connection-tracking entry; these socket
options read it back (netfilter's `SO_ORIGINAL_DST` in `linux/netfilter_ipv4.h`, and
`IP6T_SO_ORIGINAL_DST` in `linux/netfilter_ipv6/ip6_tables.h`, both 80).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # level SOL_IP, answers a struct sockaddr_in
IP6T_SO_ORIGINAL_DST = 80  # level SOL_IPV6, answers a struct sockaddr_in6

_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN = 16  # family(2) port(2) address(4) zero(8)
_SOCKADDR_IN6 = 28  # family(2) port(2) flowinfo(4) address(16) scope id(4)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Return `(host, port)` the accepted connection `sock` was addressed to before NAT.

    For an IPv4 connection accepted on a dual-stack IPv6 socket (peer `::ffff:a.b.c.d`) the
    IPv4 entry is read and the host is the plain IPv4 address. A tracked connection that no
    rule rewrote answers its own local address. Raises OSError when the kernel has no
    connection-tracking entry for it (ENOENT: connection tracking is off for this namespace)
    or the socket is not TCP over IPv4/IPv6."""
    if sock.family == socket.AF_INET6 and not _is_v4_mapped(sock):
        raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        return sockaddr_in6(raw)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        port = struct.unpack_from("!H", raw, 2)[0]
        host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        return host, port
    raise OSError(f"no original destination for a socket of family {sock.family!r}")


def sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """Return `(host, port)` of a struct sockaddr_in6. A link-local address keeps its scope
    (`fe80::1%eth0`): without the interface it names no one host, and a connection to it
    fails."""
    port = struct.unpack_from("!H", raw, 2)[0]
    host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    scope = struct.unpack_from("=I", raw, 24)[0]  # host byte order, as the kernel writes it
    if scope and ipaddress.IPv6Address(host).is_link_local:
        try:
            host = f"{host}%{socket.if_indextoname(scope)}"
        except OSError:
            host = f"{host}%{scope}"
    return host, port


def _is_v4_mapped(sock: socket.socket) -> bool:
    """Whether an AF_INET6 socket carries an IPv4 connection (`::ffff:a.b.c.d`)."""
    host = sock.getsockname()[0].split("%", 1)[0]
    mapped = ipaddress.IPv6Address(host).ipv4_mapped
    return mapped is not None
