"""Which Service a request goes to: the two resolvers a listener asks.

The outbound resolver maps a request's authority (spec §4: NAME, NAME.NS, NAME.NS.svc,
NAME.NS.svc.cluster.local, with or without port; or the authority of an absolute-form target)
to a Service; unknown destinations pass through under ALLOW_ANY or get 502 under
REGISTRY_ONLY. The inbound resolver always answers with the local app, once the Service's
AuthorizationPolicies allow the caller.
"""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from meshproxy.config import Snapshot
from meshproxy.dataplane.destinations import Destinations, ServiceRuntime
from meshproxy.http1.errors import BadRequest, Unauthorized, UnknownDestination
from meshproxy.http1.events import RequestHead


def split_authority(authority: bytes) -> tuple[str, int | None]:
    """Split `host[:port]` (IPv6 in brackets) into (lower-case host, port or None).

    Raises BadRequest for an empty host or a port that is not a number in 1..65535.
    """
    text = authority.decode("latin-1").strip().lower()
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest("bad authority")
        host, rest = text[1:end], text[end + 1:]
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise BadRequest("bad authority")
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise BadRequest("empty host in authority")
    if port is None or port == "":
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest("bad port in authority")
    return host, int(port)


# Transparent mode's resolvers (dataplane/redirected.py, not compiled) subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class Resolver:
    """Which Service a request on a listener goes to (abstract; the listener's context holds
    one). `direction` is the listener's: "outbound" or "inbound"."""

    def __init__(self, direction: str) -> None:
        # An instance attribute, not a class one: compiled, a class attribute is an instance
        # default that an uncompiled subclass (redirected.py) could not change.
        self.direction = direction

    def resolve(self, head: RequestHead, client_id: str | None = None,
                original: tuple[str, int] | None = None) -> tuple[ServiceRuntime, bytes]:
        """Return (the Service, the request target to send upstream) for a request from
        `client_id` (the caller's verified SPIFFE ID, inbound mTLS) on a connection sent to
        `original` (transparent mode's original destination). Raises ProxyError."""
        raise NotImplementedError  # abstract

    def service(self, key: str) -> ServiceRuntime | None:
        """The runtime of Service `key` (a route's backend or mirror), or None."""
        raise NotImplementedError  # abstract


class OutboundResolver(Resolver):
    """Maps an outbound request to its destination Service by authority (spec §4)."""

    def __init__(self, destinations: Destinations, namespace: str,
                 own_addresses: set[tuple[str, int]]) -> None:
        super().__init__("outbound")
        self.destinations = destinations
        self.namespace = namespace
        # The proxy's own listeners: a request addressed to them would loop forever.
        self.own_addresses = own_addresses
        self._cache: dict[bytes, ServiceRuntime] = {}
        self._cache_for: Snapshot | None = None

    def service(self, key: str) -> ServiceRuntime | None:
        """The runtime of Service `key` (a route's backend), or None when it does not exist."""
        return self.destinations.services.get(key)

    def resolve(self, head: RequestHead, client_id: str | None = None,
                original: tuple[str, int] | None = None) -> tuple[ServiceRuntime, bytes]:
        """Return (service, request target to send upstream).

        Raises BadRequest (no usable authority), UnknownDestination (REGISTRY_ONLY, or the
        proxy itself).
        """
        target = head.target
        if target[:1] == b"/" or target == b"*":
            authority = head.host
            if authority is None:
                raise BadRequest("request has no Host header")
        else:
            authority, target = self._absolute_form(head)
        destinations = self.destinations
        if self._cache_for is not destinations.snapshot:
            self._cache = {}
            self._cache_for = destinations.snapshot
        runtime = self._cache.get(authority)
        if runtime is None:
            runtime = self._lookup(authority)
            if len(self._cache) < 4096:
                self._cache[authority] = runtime
        return runtime, target

    def _lookup(self, authority: bytes) -> ServiceRuntime:
        host, port = split_authority(authority)
        destinations = self.destinations
        snapshot = destinations.snapshot
        service = snapshot.resolve_authority(host, self.namespace)
        if service is not None:
            return destinations.services[service.key]
        if snapshot.outbound_traffic_policy == "REGISTRY_ONLY":
            raise UnknownDestination(f"{host} is not a known Service")
        port = port or 80
        if (host, port) in self.own_addresses or (
            host in ("localhost", "127.0.0.1", "::1") and ("127.0.0.1", port) in self.own_addresses
        ):
            raise UnknownDestination("the destination is this proxy")
        return destinations.passthrough_to(host, port)

    @staticmethod
    def _absolute_form(head: RequestHead) -> tuple[bytes, bytes]:
        """Handle `GET http://authority/path` (RFC 9112 §3.2.2): the URI's authority wins
        over Host, which is replaced; the upstream gets the origin form."""
        target = head.target
        if not target[:7].lower() == b"http://":
            raise BadRequest("unsupported request target form")
        rest = target[7:]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        authority, path = rest[:cut], rest[cut:]
        if b"@" in authority:
            raise BadRequest("userinfo in request target")
        if not authority:
            raise BadRequest("empty authority in request target")
        if path[:1] != b"/":
            path = b"/" + path
        head.headers = [(k, v) for k, v in head.headers if k.lower() != b"host"]
        head.headers.insert(0, (b"host", authority))
        head.host = authority
        return authority, path


CLIENT_ID_HEADER = b"x-meshproxy-client-id"


class InboundResolver(Resolver):
    """Every inbound request goes to the local app, under the sidecar's own Service, once the
    Service's AuthorizationPolicies allow it (spec §3, §4).

    `x-meshproxy-client-id` is the verified caller's SPIFFE ID: any copy a request brings is
    removed, and it is set only when the connection is mTLS with a verified client certificate,
    so the app can trust it."""

    def __init__(self, runtime: ServiceRuntime, authorizer=None) -> None:
        super().__init__("inbound")
        self.runtime = runtime
        self.authorizer = authorizer  # None: no policy applies, everything is allowed

    def resolve(self, head: RequestHead, client_id: str | None = None,
                original: tuple[str, int] | None = None) -> tuple[ServiceRuntime, bytes]:
        """Return (the local app's runtime, the target unchanged). Raises Unauthorized when an
        AuthorizationPolicy refuses the request."""
        headers = head.headers
        for name, _ in headers:
            if len(name) == 21 and name.lower() == CLIENT_ID_HEADER:
                head.headers = headers = [h for h in headers if h[0].lower() != CLIENT_ID_HEADER]
                break
        peer = client_id
        authorizer = self.authorizer
        if authorizer is not None:
            decision = authorizer.check(peer, head.method.decode("latin-1"), head.target.decode("latin-1"))
            if not decision.allowed:
                raise Unauthorized(f"{peer or 'an unauthenticated caller'}: {decision.reason}")
        if peer is not None:
            headers.append((CLIENT_ID_HEADER, peer.encode("latin-1")))
        return self.runtime, head.target

    def service(self, key: str) -> ServiceRuntime | None:
        """Inbound requests are never routed to other Services."""
        return None
