"""Transparent mode (`meshproxy proxy --transparent`): connections redirected to the proxy by
iptables (`meshproxy init`), each with its original destination, and any protocol on them.

Each accepted connection is first handled by a `Sniffer`, which:

1. reads the original destination (SO_ORIGINAL_DST, meshproxy.kube.origdst). A connection
   that was not redirected (its original destination is the listener itself, or the kernel
   tracks no NAT for it) keeps today's behaviour: on the outbound listener it is an app
   using the proxy explicitly (HTTP_PROXY), routed by its Host header;
2. decides the protocol from the first bytes (meshproxy.policy.detect): HTTP/1 goes to the
   L7 path (a DownstreamConnection that remembers the original destination), anything else,
   or silence for `detect_timeout` (server-first protocols), to plain TCP proxying
   (dataplane/tcpproxy.py). Opaque ports skip detection;
3. hands the transport over (`set_protocol`) with the bytes already read.

Where each connection then goes is dataplane/redirected.py's decision. Inbound, a
redirected connection whose original destination is not one of the pod's addresses is refused
first (closed, counted in meshproxy_inbound_connections_refused_total{reason="not-this-pod"}),
before any TLS handshake; then TLS is decided (tls.py's rules, with a TlsStream, which can
half-close), and the protocol detection runs on the decrypted bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from prometheus_client import Counter

from meshproxy.dataplane.context import ListenerContext
from meshproxy.dataplane.destinations import ServiceRuntime
from meshproxy.dataplane.downstream import DownstreamConnection
from meshproxy.dataplane.redirected import (
    MAX_CACHED,
    InboundApps,
    OriginalDestinations,
    TransparentInboundResolver,
    TransparentOutboundResolver,
    canonical_ip,
    for_this_pod,
    tcp_allowed,
)
from meshproxy.dataplane.tcpproxy import TcpProxy
from meshproxy.dataplane.tcpstats import TcpStats
from meshproxy.dataplane.tls import ServerFirst, accept_inbound, peer_identity, serve_tls_stream
from meshproxy.kube.origdst import original_destination
from meshproxy.policy.detect import HTTP1, decide

log = logging.getLogger("meshproxy.transparent")

def original_of(sock) -> tuple[str, int] | None:
    """Return the (host, port) an accepted socket was sent to before a REDIRECT, or None when
    it was not redirected (addressed to the listener itself, or no NAT entry)."""
    if sock is None:
        return None
    try:
        host, port = original_destination(sock)
        local = sock.getsockname()
    except OSError:
        return None
    if port == local[1] and canonical_ip(host) == canonical_ip(local[0]):
        return None
    # A link-local destination keeps its interface (`fe80::1%eth0`): without it the address
    # names no one host, and the passthrough connection would fail.
    scope = host.partition("%")[2]
    return canonical_ip(host) + (f"%{scope}" if scope else ""), port


# -- the detection step ---------------------------------------------------------------------------


class Sniffer(asyncio.Protocol):
    """A transparent connection until its protocol is known; then the transport goes to a
    DownstreamConnection (HTTP/1) or a TcpProxy (anything else)."""

    __slots__ = ("mode", "context", "transport", "original", "buffer", "timer", "silent")

    def __init__(self, mode: "Transparent", context: ListenerContext, silent: bool = False) -> None:
        """`silent`: the client has already been silent for the detection timeout (inbound
        PERMISSIVE waits for a TLS ClientHello that long): TCP at once."""
        self.mode = mode
        self.context = context
        self.silent = silent
        self.transport: asyncio.Transport | None = None
        self.original: tuple[str, int] | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        original = self.original = original_of(transport.get_extra_info("socket"))
        context = self.context
        if original is None and context.direction == "outbound":
            # Not redirected: an app that addresses the proxy itself (HTTP_PROXY).
            self._switch(DownstreamConnection(context))
            return
        # An inbound listener with TLS checked this before the handshake (_accept_inbound).
        if (context.tls is None and context.direction == "inbound"
                and not self.mode.for_this_pod(original)):
            self.transport = None
            transport.close()
            return
        if self.silent or original is not None and original[1] in self.mode.opaque_ports:
            self._to_tcp()
            return
        self.timer = self.context.loop.call_later(self.mode.detect_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._decide(False)

    def eof_received(self) -> bool:
        protocol = self._decide(True)
        return protocol.eof_received() if protocol is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is not None:
            self._decide(True)

    def _decide(self, final: bool) -> asyncio.Protocol | None:
        verdict = decide(self.buffer, final=final)
        if verdict is None:
            return None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if verdict == HTTP1:
            return self._switch(DownstreamConnection(self.context, self.original))
        return self._to_tcp()

    def _to_tcp(self) -> asyncio.Protocol:
        runtime = self.mode.tcp_destination(self.context, self.original, self.transport)
        return self._switch(TcpProxy(self.context, runtime, self.mode.stats))

    def _switch(self, protocol: asyncio.Protocol) -> asyncio.Protocol:
        transport = self.transport
        self.transport = None  # from here on this object hears nothing more
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer and not transport.is_closing():
            protocol.data_received(self.buffer)
        self.buffer = b""
        return protocol


class Transparent:
    """Transparent mode of one Proxy: wraps its listeners' resolvers, detects protocols,
    proxies TCP."""

    def __init__(self, proxy, opaque_ports: frozenset[int], detect_timeout: float) -> None:
        self.proxy = proxy
        self.opaque_ports = opaque_ports
        self.detect_timeout = detect_timeout
        self.stats = TcpStats(proxy.metrics.registry)
        self.originals = OriginalDestinations(proxy.destinations)
        self.apps = InboundApps(proxy) if proxy.settings.app_port is None else None
        self.pod_ips = proxy.settings.pod_ips
        refused = Counter("meshproxy_inbound_connections_refused",
                          "Redirected inbound connections refused before reaching the app.",
                          ["reason"], registry=proxy.metrics.registry)
        self._not_this_pod = refused.labels("not-this-pod")  # shown from 0 on
        self._policies = None
        self._tcp_allowed: dict[str | None, bool] = {}
        log.info("transparent mode: by original destination; protocol detection (%.0f ms); "
                 "opaque ports %s", detect_timeout * 1000,
                 ",".join(map(str, sorted(opaque_ports))))

    def resolver_for(self, resolver):
        """The resolver a transparent listener uses in place of `resolver` (an
        OutboundResolver or InboundResolver): by original destination where there is one."""
        if resolver.direction == "outbound":
            return TransparentOutboundResolver(resolver, self.originals)
        return TransparentInboundResolver(resolver, self.apps)

    def listener_parts(self, context: ListenerContext) -> tuple:
        """(protocol factory, accept-socket coroutine function) of a transparent listener
        with `context`: each connection starts with a Sniffer; inbound sockets are set up by
        `_accept_inbound` (the outbound listener has no TLS, so gets None)."""
        def sniffer() -> Sniffer:
            return Sniffer(self, context)

        if context.direction == "outbound":
            return sniffer, None
        return sniffer, lambda loop, sock: self._accept_inbound(context, sniffer, loop, sock)

    def apply(self, snapshot) -> None:
        """A new configuration snapshot is in force."""
        if self.apps is not None:
            self.apps.apply()

    def close_idle(self) -> None:
        if self.apps is not None:
            self.apps.close_idle()

    def for_this_pod(self, original: tuple[str, int] | None) -> bool:
        """Whether an inbound connection with `original` destination (None: not redirected,
        addressed to the listener itself) is for this pod; counts and logs a refusal."""
        if original is None or for_this_pod(original[0], self.pod_ips):
            return True
        self._not_this_pod.inc()
        log.debug("inbound connection to %s:%d refused: not one of this pod's addresses (%s)",
                  original[0], original[1], ", ".join(sorted(self.pod_ips)))
        return False

    def tcp_destination(self, context: ListenerContext, original,
                        transport) -> ServiceRuntime | None:
        """The runtime a TCP connection goes to, or None when it is refused."""
        if context.direction == "outbound":
            return self.originals.lookup(*original)
        if not self._authorized(peer_identity(transport.get_extra_info("ssl_object"))):
            log.info("inbound TCP connection refused by an AuthorizationPolicy")
            return None
        base = context.resolver
        if original is not None and base.apps is not None:
            return base.apps.at(original)
        return base.base.runtime

    def _authorized(self, peer: str | None) -> bool:
        proxy = self.proxy
        policies = proxy.destinations.snapshot.authorization_policies_for(proxy.settings.service_key)
        if policies is not self._policies:
            self._policies, self._tcp_allowed = policies, {}
        allowed = self._tcp_allowed.get(peer)
        if allowed is None:
            allowed = tcp_allowed(policies, peer)
            if len(self._tcp_allowed) < MAX_CACHED:
                self._tcp_allowed[peer] = allowed
        return allowed

    async def _accept_inbound(self, context: ListenerContext, sniffer, loop: asyncio.AbstractEventLoop,
                              sock: socket.socket) -> None:
        """tls.accept_inbound for transparent mode: a connection not for this pod is refused
        first; in PERMISSIVE, a client silent for the detection timeout is a plaintext
        server-first one (not refused); TLS is a TlsStream, which can half-close. Never
        raises."""
        if not self.for_this_pod(original_of(sock)):
            sock.close()
            return
        await accept_inbound(
            loop, sock, context.tls, sniffer,
            first_byte_timeout=context.header_timeout, on_refused=context.tls_refused,
            server_first=ServerFirst(self.detect_timeout, lambda: Sniffer(self, context, silent=True)),
            serve_tls=serve_tls_stream)
