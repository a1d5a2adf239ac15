"""Reading a struct sockaddr_in6 as `SO_ORIGINAL_DST` gives it (meshproxy.kube.origdst)."""

import socket
import struct

from meshproxy.kube.origdst import sockaddr_in6


def raw(host: str, port: int, scope: int = 0) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope))


def test_a_global_address_and_its_port():
    assert sockaddr_in6(raw("fd00:200::2", 8080)) == ("fd00:200::2", 8080)


def test_a_link_local_address_keeps_its_interface():
    index, name = socket.if_nameindex()[0]  # loopback here; any interface will do
    assert sockaddr_in6(raw("fe80::1", 80, index)) == (f"fe80::1%{name}", 80)
    # an interface that is gone: its number, which getaddrinfo also takes
    assert sockaddr_in6(raw("fe80::1", 80, 987654)) == ("fe80::1%987654", 80)


def test_a_scope_on_a_global_address_is_not_written():
    assert sockaddr_in6(raw("fd00::1", 80, 2)) == ("fd00::1", 80)


class RedirectedSocket:
    """What the outbound listener's accepted socket answers for a connection to `raw`."""

    family = socket.AF_INET6

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def getsockopt(self, level, option, size):
        return self.raw

    def getsockname(self):
        return ("::1", 15001, 0, 0)


def test_the_outbound_side_keeps_a_link_local_destinations_interface():
    from meshproxy.dataplane.transparent import original_of

    index, name = socket.if_nameindex()[0]
    assert original_of(RedirectedSocket(raw("FE80::0001", 8080, index))) == (f"fe80::1%{name}", 8080)
    assert original_of(RedirectedSocket(raw("fd00:200::2", 8080))) == ("fd00:200::2", 8080)
    assert original_of(RedirectedSocket(raw("::1", 15001))) is None  # addressed to the listener
