"""Transparent mode's IPv6 listeners, beside the IPv4 ones (docs/transparent.md "IPv6").

In a pod with IPv6, `meshproxy init` redirects IPv6 connections as it does IPv4 ones:
outbound ones arrive at `[::1]:15001` (a REDIRECT in OUTPUT rewrites the destination to the
loopback address of the connection's family), inbound ones at the pod's IPv6 address, port
15006. So a transparent proxy also listens on `[::1]` (outbound), `[::]` (inbound) and `[::]`
(health port: the kubelet of an IPv6 cluster probes over IPv6).

Each is a socket of its own with IPV6_V6ONLY next to the IPv4 one, rather than one dual-stack
socket per port: the IPv4 listeners stay exactly as they were (peers and original
destinations as IPv4 addresses, not `::ffff:a.b.c.d`; no dependence on the host's
`net.ipv6.bindv6only`), the outbound side needs two sockets anyway (`127.0.0.1` and `::1`),
and a host without IPv6 simply does without the second one.

A host without IPv6 must not stop the proxy: where the kernel has none (EAFNOSUPPORT) or IPv6
is disabled (no `::1`: EADDRNOTAVAIL), those listeners are left out, logged once, and the
proxy runs on IPv4 as before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("meshproxy.proxy")

IPV6_LOOPBACK = "::1"
IPV6_ANY = "::"
# What bind() or socket() answer where the host has no usable IPv6.
NO_IPV6 = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})
# The IPv4 binds that get an IPv6 counterpart; an address the user chose gets none.
COUNTERPARTS = {"127.0.0.1": IPV6_LOOPBACK, "0.0.0.0": IPV6_ANY}


def counterpart(ipv4_bind: str) -> str | None:
    """Return the IPv6 address to listen on beside IPv4 address `ipv4_bind` (`::1` for
    `127.0.0.1`, `::` for `0.0.0.0`), or None for any other address."""
    return COUNTERPARTS.get(ipv4_bind)


async def listen_ipv6(binds: Sequence[tuple[str, Callable[[], Awaitable[object]]]], *,
                      has_ipv6: bool = socket.has_ipv6) -> list[str]:
    """Run the `start` of each `(what, start)` of `binds` in order and return the `what` of
    those that are listening. Those that cannot bind because the host has no IPv6
    (`has_ipv6` false, EADDRNOTAVAIL, EAFNOSUPPORT) are left out and named in one log line.
    Raises any other OSError (a port already in use, say), as an IPv4 listener would."""
    if not binds:
        return []
    if not has_ipv6:
        log.info("no IPv6 in this Python: listening on IPv4 only")
        return []
    try:
        # A kernel booted with ipv6.disable=1 still resolves "::1", and create_server then
        # skips the address it cannot open a socket for and returns a server with none: ask
        # the kernel directly first.
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError as exc:
        if exc.errno not in NO_IPV6:
            raise
        log.info("no IPv6 here (%s): %s left out, IPv4 only", os.strerror(exc.errno),
                 ", ".join(what for what, _ in binds))
        return []
    started: list[str] = []
    skipped: list[str] = []
    reason = ""
    for what, start in binds:
        try:
            await start()
        except OSError as exc:
            if exc.errno not in NO_IPV6:
                raise
            skipped.append(what)
            reason = os.strerror(exc.errno)  # asyncio's own message repeats the address
            continue
        started.append(what)
    if skipped:
        log.info("no IPv6 here (%s): %s left out, IPv4 only", reason, ", ".join(skipped))
    return started


async def start_ipv6(proxy, inbound_resolver, own_ports: set[tuple[str, int]]) -> list[str]:
    """Start the IPv6 counterparts of a transparent `proxy`'s default listeners (outbound,
    inbound with `inbound_resolver`, health) on the same ports, once its IPv4 ones and admin
    servers are running; `own_ports` is the outbound resolver's set of the proxy's own
    addresses. Returns what is listening; raises OSError as `listen_ipv6`."""
    from meshproxy.dataplane.resolvers import OutboundResolver

    s = proxy.settings
    binds = []
    for direction, bind, port in (("outbound", s.outbound_bind, s.outbound_port),
                                  ("inbound", s.inbound_bind, s.inbound_port)):
        host = counterpart(bind)
        if host is None:
            continue
        if direction == "outbound":
            resolver, tls = OutboundResolver(proxy.destinations, s.namespace, own_ports), None
        else:
            resolver, tls = inbound_resolver, proxy.tls

        async def start(host=host, port=port, resolver=resolver, tls=tls) -> None:
            listener = proxy.make_listener(resolver, tls)
            await listener.start(host, port)
            proxy.listeners.append(listener)

        binds.append((f"{direction} [{host}]:{port}", start))
    binds.append((f"health [{IPV6_ANY}]:{s.health_port}",
                  lambda: proxy.admin.listen_health(IPV6_ANY)))
    started = await listen_ipv6(binds)
    if started:
        log.info("listening on IPv6 too: %s", ", ".join(started))
    return started
