"""Transparent mode's decisions without sockets (dataplane/redirected.py, transparent.py):
where an original destination goes, how requests on redirected connections resolve, which
connections were redirected, and who may open a TCP connection inbound."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from meshproxy.config.loader import load_text
from meshproxy.config.model.common import ObjectMeta
from meshproxy.config.model.policy import AuthorizationPolicy, AuthzOperation, AuthzRule, AuthzSource
from meshproxy.dataplane.destinations import Destinations
from meshproxy.dataplane.resolvers import OutboundResolver
from meshproxy.dataplane.tls import TLSState
from meshproxy.dataplane.redirected import OriginalDestinations, TransparentOutboundResolver, tcp_allowed
from meshproxy.dataplane.transparent import original_of
from meshproxy.http1.errors import UnknownDestination
from meshproxy.http1.events import RequestHead
from meshproxy.observability.metrics import ProxyMetrics

MESH = """
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  outboundTrafficPolicy: %s
  services:
    - name: web
      port: 80
      addresses: [10.96.0.10, "fd00::a"]
      instances:
        - {name: web-0, app: {address: "10.1.0.5:8080"}}
        - {name: web-1, app: {address: "10.1.0.6:8080"}}
    - name: db
      port: 5432
      instances:
        - {name: db-0, sidecar: false, app: {address: "10.1.0.7:5432"}}
"""


def destinations(policy: str = "ALLOW_ANY", *, transparent: bool = True, tls=None) -> Destinations:
    # No loop is needed to build runtimes: pools only keep it for later connections.
    d = Destinations(None, ProxyMetrics(), random.Random(1), lambda: 0.0, tls=tls,
                     transparent=transparent)
    d.apply(load_text(MESH % policy))
    return d


def test_a_virtual_ip_with_the_services_port_is_the_service() -> None:
    d = destinations()
    originals = OriginalDestinations(d)
    assert originals.lookup("10.96.0.10", 80) is d.services["web.default"]
    assert originals.lookup("fd00::a", 80) is d.services["web.default"]
    # another port of the virtual IP is no port of the Service: passed through
    other = originals.lookup("10.96.0.10", 8080)
    assert other.key == "10.96.0.10:8080" and other is d.passthrough[("10.96.0.10", 8080)]


def test_an_instance_address_is_that_instance_alone() -> None:
    d = destinations()
    originals = OriginalDestinations(d)
    pinned = originals.lookup("10.1.0.6", 8080)
    assert pinned.key == "web.default"  # metrics name the Service
    assert [e.key for e in pinned.endpoints] == ["10.1.0.6:8080"]
    # the same endpoint (pool, load) as the Service's, and the same runtime next time
    assert pinned.endpoints[0] is d.services["web.default"].by_key["10.1.0.6:8080"]
    assert originals.lookup("10.1.0.6", 8080) is pinned
    db = originals.lookup("10.1.0.7", 5432)
    assert db.key == "db.default" and not db.endpoints[0].meshed


def test_unknown_destinations_follow_the_outbound_traffic_policy() -> None:
    allow = OriginalDestinations(destinations("ALLOW_ANY"))
    assert allow.lookup("192.0.2.9", 443).key == "192.0.2.9:443"
    registry = OriginalDestinations(destinations("REGISTRY_ONLY"))
    assert registry.lookup("192.0.2.9", 443) is None
    assert registry.lookup("10.96.0.10", 80) is not None


def test_a_new_snapshot_is_read_at_once() -> None:
    d = destinations()
    originals = OriginalDestinations(d)
    before = originals.lookup("10.96.0.10", 80)
    d.apply(load_text((MESH % "ALLOW_ANY").replace("10.96.0.10", "10.96.0.20")))
    assert originals.lookup("10.96.0.20", 80) is d.services["web.default"] is not before
    assert originals.lookup("10.96.0.10", 80).key == "10.96.0.10:80"


def test_transparent_mode_reaches_meshed_instances_at_their_app_address_with_mtls() -> None:
    tls = TLSState(lambda: "PERMISSIVE")
    web = destinations(transparent=True, tls=tls).services["web.default"].endpoints[0]
    assert (web.key, web.meshed) == ("10.1.0.5:8080", True)
    assert web.pool.expected_id == "spiffe://cluster.local/ns/default/sa/web"
    assert web.pool.tls is tls
    # outside transparent mode, a meshed instance whose sidecar port is unknown is an app
    plain = destinations(transparent=False, tls=tls).services["web.default"].endpoints[0]
    assert (plain.meshed, plain.pool.expected_id) == (False, None)


def head(target: bytes, host: bytes = b"other.example") -> RequestHead:
    h = RequestHead(b"GET", target, "1.1", [(b"host", host)])
    h.host = host
    return h


def resolver(policy: str = "ALLOW_ANY") -> tuple[TransparentOutboundResolver, Destinations]:
    d = destinations(policy)
    base = OutboundResolver(d, "default", set())
    return TransparentOutboundResolver(base, OriginalDestinations(d)), d


def test_the_original_destination_wins_over_the_host_header() -> None:
    r, d = resolver()
    runtime, target = r.resolve(head(b"/x", host=b"db"), original=("10.96.0.10", 80))
    assert runtime is d.services["web.default"] and target == b"/x"


def test_without_an_original_destination_the_host_header_decides() -> None:
    r, d = resolver()
    runtime, _ = r.resolve(head(b"/x", host=b"db"), original=None)
    assert runtime is d.services["db.default"]
    runtime, _ = r.resolve(head(b"/x", host=b"db"))
    assert runtime is d.services["db.default"]


def test_absolute_form_becomes_origin_form_for_the_mesh_only() -> None:
    r, _ = resolver()
    h = head(b"http://web/a?b=1")
    _, target = r.resolve(h, original=("10.96.0.10", 80))
    assert target == b"/a?b=1" and h.host == b"web"
    # to a destination outside the mesh (another proxy, say) it is passed on unchanged
    _, target = r.resolve(head(b"http://x.example/a"), original=("192.0.2.9", 3128))
    assert target == b"http://x.example/a"


def test_registry_only_answers_unknown_destination() -> None:
    r, _ = resolver("REGISTRY_ONLY")
    with pytest.raises(UnknownDestination):
        r.resolve(head(b"/"), original=("192.0.2.9", 80))


class FakeSocket:
    def __init__(self, local, original=None, error: OSError | None = None) -> None:
        self.local, self.original, self.error = local, original, error
        self.family = 2

    def getsockname(self):
        return self.local

    def getsockopt(self, level, name, size):
        import socket
        import struct

        if self.error is not None:
            raise self.error
        host, port = self.original
        return struct.pack("!HH", socket.AF_INET, port) + socket.inet_aton(host) + bytes(8)


def test_original_of_tells_redirected_connections_from_others() -> None:
    assert original_of(FakeSocket(("127.0.0.1", 15001), ("10.96.0.10", 80))) == ("10.96.0.10", 80)
    # addressed to the listener itself (an app using HTTP_PROXY): not redirected
    assert original_of(FakeSocket(("127.0.0.1", 15001), ("127.0.0.1", 15001))) is None
    # no connection tracking for it
    assert original_of(FakeSocket(("127.0.0.1", 15001), error=FileNotFoundError(2, "x"))) is None
    assert original_of(None) is None


def policy(action: str, *rules: AuthzRule) -> AuthorizationPolicy:
    return AuthorizationPolicy(ObjectMeta(f"p-{action.lower()}"), action=action, rules=rules)


CLIENT = "spiffe://cluster.local/ns/default/sa/client"
OTHER = "spiffe://cluster.local/ns/other/sa/intruder"


def test_tcp_is_authorized_on_its_source_alone() -> None:
    assert tcp_allowed((), None)
    by_principal = policy("ALLOW", AuthzRule(from_=(AuthzSource(principals=("cluster.local/ns/default/sa/client",)),)))
    assert tcp_allowed((by_principal,), CLIENT)
    assert not tcp_allowed((by_principal,), OTHER)
    assert not tcp_allowed((by_principal,), None)
    # an ALLOW rule that names HTTP operations cannot match a byte stream
    with_paths = policy("ALLOW", AuthzRule(from_=(AuthzSource(principals=("*",)),),
                                           to=(AuthzOperation(paths=("/*",)),)))
    assert not tcp_allowed((with_paths,), CLIENT)
    # a DENY rule is taken to match on its sources alone: deny more, never less
    deny = policy("DENY", AuthzRule(from_=(AuthzSource(namespaces=("other",)),),
                                    to=(AuthzOperation(methods=("DELETE",)),)))
    assert not tcp_allowed((deny,), OTHER)
    assert tcp_allowed((deny,), CLIENT)
    everyone = policy("ALLOW", AuthzRule())
    assert tcp_allowed((everyone,), None)
    assert not tcp_allowed((deny, everyone), OTHER)
    assert not tcp_allowed((policy("ALLOW"),), CLIENT)  # an ALLOW without rules denies all
