"""Transparent mode, outbound, without sockets: an original destination that is one of an
instance's `app.otherAddresses` (a dual-stack pod's address of its other family) is that
instance, reached at its own endpoint."""

from __future__ import annotations

import random

from meshproxy.config.loader import load_text
from meshproxy.dataplane.destinations import Destinations
from meshproxy.dataplane.redirected import OriginalDestinations
from meshproxy.observability.metrics import ProxyMetrics

MESH = """
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {{name: m}}
spec:
  outboundTrafficPolicy: {policy}
  services:
    - name: web
      port: 80
      instances:
        - {{name: web-0, app: {{address: "10.1.0.5:8080", otherAddresses: ["FD00:0200::0005"]}}}}
        - {{name: web-1, app: {{address: "10.1.0.6:8080", otherAddresses: [fd00:200::6]}}}}
    - name: web6
      port: 80
      instances:
        # the same pod in an IPv6-only Service: there fd00:200::6 is the instance's own address
        - {{name: web-1.web6.default, app: {{address: "[fd00:200::6]:8080"}}}}
"""


def originals(policy: str = "ALLOW_ANY") -> tuple[OriginalDestinations, Destinations]:
    d = Destinations(None, ProxyMetrics(), random.Random(1), lambda: 0.0, transparent=True)
    d.apply(load_text(MESH.format(policy=policy)))
    return OriginalDestinations(d), d


def test_the_other_address_is_the_same_instance_at_its_own_endpoint() -> None:
    o, d = originals()
    own = o.lookup("10.1.0.5", 8080)
    other = o.lookup("fd00:200::5", 8080)  # the canonical text the kernel reports
    assert other is own  # one pinned runtime (and retry budget) for both addresses
    assert other.key == "web.default"
    [endpoint] = other.endpoints
    assert (endpoint.instance, endpoint.host, endpoint.port) == ("web-0", "10.1.0.5", 8080)
    assert endpoint is next(e for e in d.services["web.default"].endpoints if e.instance == "web-0")


def test_the_other_address_is_known_under_registry_only() -> None:
    o, _ = originals("REGISTRY_ONLY")
    assert [e.instance for e in o.lookup("fd00:200::5", 8080).endpoints] == ["web-0"]
    # another port of that address is no instance
    assert o.lookup("fd00:200::5", 9090) is None


def test_an_address_that_is_an_instances_own_stays_that_instances() -> None:
    o, _ = originals()
    pinned = o.lookup("fd00:200::6", 8080)
    assert pinned.key == "web6.default"
    assert [e.instance for e in pinned.endpoints] == ["web-1.web6.default"]
    assert [e.instance for e in o.lookup("10.1.0.6", 8080).endpoints] == ["web-1"]


def test_a_new_snapshot_is_looked_up_afresh() -> None:
    o, d = originals()
    assert o.lookup("fd00:200::5", 8080).key == "web.default"
    d.apply(load_text(MESH.format(policy="ALLOW_ANY").replace(', otherAddresses: ["FD00:0200::0005"]', "")))
    # now unknown: passed through (ALLOW_ANY) to the original destination
    assert o.lookup("fd00:200::5", 8080).key == "[fd00:200::5]:8080"
