"""Transparent mode in dual-stack pods, without sockets: IPv6 original destinations in the
outbound lookups, the pod's own addresses, which loopback address reaches the app for an IPv6
connection (dataplane/loopback.py), and start-up where the host has no IPv6
(dataplane/dualstack.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from types import SimpleNamespace

import pytest

from meshproxy.config.loader import load_text
from meshproxy.dataplane.destinations import Destinations
from meshproxy.dataplane.dualstack import counterpart, listen_ipv6
from meshproxy.dataplane.loopback import AppLoopback, ipv6_loopback_ports, read_ipv6_loopback_ports
from meshproxy.dataplane.redirected import (
    InboundApps,
    OriginalDestinations,
    for_this_pod,
    parse_pod_ips,
)
from meshproxy.observability.metrics import ProxyMetrics

MESH = """
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - name: web
      port: 80
      addresses: ["FD00:96:0:0:0:0:0:10"]
      instances:
        - {name: web-0, app: {address: "[FD00:0200:0000:0000:0000:0000:0000:0002]:8080"}}
        - {name: web-1, app: {address: "10.1.0.6:8080"}}
"""


def destinations() -> Destinations:
    d = Destinations(None, ProxyMetrics(), random.Random(1), lambda: 0.0, transparent=True)
    d.apply(load_text(MESH))
    return d


def test_ipv6_destinations_match_whatever_form_the_mesh_wrote() -> None:
    d = destinations()
    originals = OriginalDestinations(d)
    # the kernel reports the canonical (compressed, lower-case) text
    assert originals.lookup("fd00:96::10", 80) is d.services["web.default"]
    pinned = originals.lookup("fd00:200::2", 8080)
    assert pinned.key == "web.default"
    assert [e.instance for e in pinned.endpoints] == ["web-0"]
    # another port of that address is no instance: passed through (ALLOW_ANY)
    assert originals.lookup("fd00:200::2", 9090).key == "[fd00:200::2]:9090"


def test_pod_ips_are_parsed_into_canonical_text() -> None:
    assert parse_pod_ips("10.1.2.3, FD00:0200::0003,,") == frozenset({"10.1.2.3", "fd00:200::3"})
    assert parse_pod_ips(None) == parse_pod_ips(" ") == frozenset()
    with pytest.raises(ValueError, match="'pod-a' is not an IP address"):
        parse_pod_ips("10.1.2.3,pod-a")


def test_an_inbound_connection_is_for_this_pod_when_sent_to_one_of_its_addresses() -> None:
    ips = parse_pod_ips("10.1.2.3,fd00::3")
    assert for_this_pod("10.1.2.3", ips) and for_this_pod("fd00::3", ips)
    assert for_this_pod("127.0.0.1", ips) and for_this_pod("::1", ips)
    assert not for_this_pod("10.1.2.4", ips) and not for_this_pod("fd00::4", ips)
    # pod addresses not known: every address, as without them
    assert for_this_pod("192.0.2.1", frozenset())


# /proc/net/tcp6 as Linux writes it on a little-endian machine: [::1]:19000 and [::]:18082
# listening, [fd00::2]:9000 listening, a connection from ::1 to port 19000.
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:4A38 00000000000000000000000000000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 1467131 2 000000008c09bc2e 100 0 0 10 0
   1: 00000000000000000000000000000000:46A2 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1467130 1 00000000ebf2b607 100 0 0 10 0
   2: 000000FD000000000000000002000000:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1467140 1 00000000ebf2b607 100 0 0 10 0
   3: 00000000000000000000000001000000:EA08 00000000000000000000000001000000:4A38 01 00000000:00000000 00:00000000 00000000     0        0 1467133 2 00000000753217a4 20 0 0 10 -1
"""


def test_the_apps_ipv6_loopback_listeners_are_read_from_the_kernels_table() -> None:
    ports = ipv6_loopback_ports(TCP6.splitlines(), "little")
    # [::1]:19000 and [::]:18082; not [fd00::2]:9000 (the pod's address only), not a connection
    assert ports == {19000, 18082}
    # a big-endian kernel writes the words as they are
    big = TCP6.replace("00000000000000000000000001000000:4A38",
                       "00000000000000000000000000000001:4A38")
    assert 19000 in ipv6_loopback_ports(big.splitlines(), "big")
    assert ipv6_loopback_ports(["heading", " 0: zz:4A38 x 0A"], "little") == frozenset()


def test_reading_stops_at_the_first_socket_that_is_not_listening() -> None:
    """Listeners come first in the kernel's table: a pod with many connections must not make
    every look-up read them all (it runs on the event loop)."""
    read = []

    def lines():
        for line in TCP6.splitlines():
            read.append(line)
            yield line
        raise AssertionError("read past the listeners")  # never reached: connections follow

    assert ipv6_loopback_ports(lines(), "little") == {19000, 18082}
    assert len(read) == 5  # the heading, three listeners, the first connection


def test_the_table_is_read_from_proc(tmp_path) -> None:
    table = tmp_path / "tcp6"
    table.write_text(TCP6)
    # (this machine's byte order: the sample is little-endian, as on x86 and arm64)
    assert read_ipv6_loopback_ports(str(table)) == {19000, 18082}
    assert read_ipv6_loopback_ports(str(tmp_path / "missing")) == frozenset()  # no IPv6 at all


def inbound_apps(app_host: str = "127.0.0.1", ports: frozenset = frozenset()):
    clock = [0.0]
    reads: list[float] = []

    def read() -> frozenset:
        reads.append(clock[0])
        return ports

    d = destinations()
    proxy = SimpleNamespace(
        settings=SimpleNamespace(service_key="web.default", app_host=app_host, instance="web-0",
                                 outbound_port=15001, inbound_port=15006, admin_port=15000,
                                 health_port=15021),
        destinations=d, metrics=d.metrics, rng=random.Random(1),
        loop=SimpleNamespace(time=lambda: clock[0]))
    return InboundApps(proxy, AppLoopback(lambda: clock[0], read)), clock, reads


def test_an_ipv6_connection_reaches_the_app_on_ipv6_loopback_when_it_listens_there() -> None:
    apps, clock, reads = inbound_apps(ports=frozenset({8082}))
    assert [e.host for e in apps.at(("fd00:200::2", 8082)).endpoints] == ["::1"]
    assert [e.host for e in apps.at(("fd00:200::2", 8080)).endpoints] == ["127.0.0.1"]
    # IPv4 connections go to 127.0.0.1 without asking
    assert [e.host for e in apps.at(("10.1.0.5", 8082)).endpoints] == ["127.0.0.1"]
    assert reads == [0.0]  # one read of the table for every port
    # the proxy's own ports are never a destination
    assert apps.at(("fd00:200::2", 15001)).endpoints == []


def test_the_table_is_read_again_when_old_and_sooner_for_a_port_not_in_it() -> None:
    apps, clock, reads = inbound_apps(ports=frozenset({8082}))
    apps.at(("fd00:200::2", 8082))
    clock[0] = 0.4
    apps.at(("fd00:200::2", 8082)), apps.at(("fd00:200::2", 9000))
    assert reads == [0.0]  # a port not listening: not asked again within half a second
    clock[0] = 0.6
    for port in range(9000, 9100):  # a scan of ports: one read, not one per port
        apps.at(("fd00:200::2", port))
    assert reads == [0.0, 0.6]
    clock[0] = 5.7
    apps.at(("fd00:200::2", 8082))  # a hit, but the table is 5 s old: the app may have restarted
    assert reads == [0.0, 0.6, 5.7]


def test_an_app_host_that_was_given_is_used_for_both_families() -> None:
    apps, _, reads = inbound_apps(app_host="10.1.0.5", ports=frozenset({8082}))
    assert [e.host for e in apps.at(("fd00:200::2", 8082)).endpoints] == ["10.1.0.5"]
    assert reads == []


def test_the_ipv6_counterparts_of_the_default_binds() -> None:
    assert counterpart("127.0.0.1") == "::1" and counterpart("0.0.0.0") == "::"
    assert counterpart("10.1.2.3") is None  # an address the user chose gets none


def test_a_host_without_ipv6_starts_on_ipv4_only(caplog) -> None:
    started: list[str] = []

    def bind(what: str, error: int | None = None):
        async def start() -> None:
            if error is not None:
                raise OSError(error, "Cannot assign requested address")
            started.append(what)
        return what, start

    caplog.set_level(logging.INFO, "meshproxy.proxy")
    binds = [bind("outbound", errno.EADDRNOTAVAIL), bind("inbound"),
             bind("health", errno.EAFNOSUPPORT)]
    assert asyncio.run(listen_ipv6(binds)) == ["inbound"] == started
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "outbound, health" in lines[0] and "IPv4 only" in lines[0]

    # no IPv6 in this Python at all: nothing is tried
    started.clear()
    assert asyncio.run(listen_ipv6([bind("inbound")], has_ipv6=False)) == [] == started

    # any other error is the proxy's to report, as for IPv4
    with pytest.raises(OSError) as raised:
        asyncio.run(listen_ipv6([bind("inbound", errno.EADDRINUSE)]))
    assert raised.value.errno == errno.EADDRINUSE


def test_a_kernel_booted_without_ipv6_is_found_before_any_listener(caplog, monkeypatch) -> None:
    """With ipv6.disable=1, "::1" still resolves and create_server returns a server with no
    socket instead of failing: the kernel is asked first."""
    import meshproxy.dataplane.dualstack as dualstack

    real = dualstack.socket.socket

    def no_ipv6(family=-1, *args, **kwargs):
        if family == dualstack.socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(dualstack.socket, "socket", no_ipv6)
    caplog.set_level(logging.INFO, "meshproxy.proxy")
    tried: list[str] = []

    async def start() -> None:
        tried.append("outbound")

    assert asyncio.run(listen_ipv6([("outbound", start)])) == [] and tried == []
    assert "Address family not supported" in caplog.records[-1].getMessage()


def test_a_listener_that_gets_no_socket_says_so() -> None:
    from meshproxy.dataplane.listener import Listener

    class NoSockets:
        sockets: list = []
        closed = False

        def close(self) -> None:
            self.closed = True

    server = NoSockets()

    async def create_server(*args, **kwargs):
        return server

    context = SimpleNamespace(loop=SimpleNamespace(create_server=create_server), tls=None,
                              direction="outbound")
    listener = Listener(context, protocol_factory=object)
    with pytest.raises(OSError) as raised:
        asyncio.run(listener.start("::1", 15001))
    assert raised.value.errno == errno.EAFNOSUPPORT and server.closed


def test_pod_ips_come_from_the_flag_or_the_environment(monkeypatch) -> None:
    from meshproxy.cli import build_parser

    monkeypatch.delenv("MESHPROXY_POD_IPS", raising=False)
    monkeypatch.setenv("MESHPROXY_POD_IP", "10.1.2.3")
    assert build_parser().parse_args(["proxy"]).pod_ips == "10.1.2.3"
    monkeypatch.setenv("MESHPROXY_POD_IPS", "10.1.2.3,fd00::3")
    assert build_parser().parse_args(["proxy"]).pod_ips == "10.1.2.3,fd00::3"
    args = build_parser().parse_args(["proxy", "--pod-ips", "fd00::4"])
    assert args.pod_ips == "fd00::4"


def test_a_bad_pod_ip_stops_the_proxy_before_it_starts(tmp_path, monkeypatch, capsys) -> None:
    from meshproxy.cli import main

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    monkeypatch.delenv("MESHPROXY_POD_IP", raising=False)
    monkeypatch.delenv("MESHPROXY_POD_IPS", raising=False)
    assert main(["proxy", "--config", str(mesh), "--service", "web", "--pod-ips", "pod-a"]) == 2
    assert "--pod-ips: 'pod-a' is not an IP address" in capsys.readouterr().err
