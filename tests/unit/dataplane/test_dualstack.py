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
from meshproxy.dataplane.loopback import app_loopback, listens_on_ipv6_loopback
from meshproxy.dataplane.redirected import (
    APP_LOOPBACK_TTL,
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
    assert listens_on_ipv6_loopback(TCP6, 19000, "little")  # [::1]
    assert listens_on_ipv6_loopback(TCP6, 18082, "little")  # [::]
    assert not listens_on_ipv6_loopback(TCP6, 9000, "little")  # the pod's address only
    assert not listens_on_ipv6_loopback(TCP6, 59912, "little")  # a connection, not a listener
    assert not listens_on_ipv6_loopback(TCP6, 8080, "little")
    # a big-endian kernel writes the words as they are
    big = TCP6.replace("00000000000000000000000001000000:4A38",
                       "00000000000000000000000000000001:4A38")
    assert listens_on_ipv6_loopback(big, 19000, "big")
    assert not listens_on_ipv6_loopback("garbage\n 0: zz:4A38 x 0A\n", 19000, "little")


def test_app_loopback_falls_back_to_ipv4(tmp_path) -> None:
    table = tmp_path / "tcp6"
    table.write_text(TCP6)
    # (this machine's byte order: the sample is little-endian, as on x86 and arm64)
    assert app_loopback(18082, str(table)) == "::1"
    assert app_loopback(8080, str(table)) == "127.0.0.1"
    assert app_loopback(18082, str(tmp_path / "missing")) == "127.0.0.1"  # no IPv6 at all


def inbound_apps(app_host: str = "127.0.0.1", answers: dict | None = None):
    clock = [0.0]
    asked: list[int] = []

    def loopback(port: int) -> str:
        asked.append(port)
        return (answers or {}).get(port, "127.0.0.1")

    d = destinations()
    proxy = SimpleNamespace(
        settings=SimpleNamespace(service_key="web.default", app_host=app_host, instance="web-0",
                                 outbound_port=15001, inbound_port=15006, admin_port=15000,
                                 health_port=15021),
        destinations=d, metrics=d.metrics, rng=random.Random(1),
        loop=SimpleNamespace(time=lambda: clock[0]))
    return InboundApps(proxy, app_loopback=loopback), clock, asked


def test_an_ipv6_connection_reaches_the_app_on_ipv6_loopback_when_it_listens_there() -> None:
    apps, clock, asked = inbound_apps(answers={8082: "::1"})
    assert [e.host for e in apps.at(("fd00:200::2", 8082)).endpoints] == ["::1"]
    assert [e.host for e in apps.at(("fd00:200::2", 8080)).endpoints] == ["127.0.0.1"]
    # IPv4 connections go to 127.0.0.1 without asking
    assert [e.host for e in apps.at(("10.1.0.5", 8082)).endpoints] == ["127.0.0.1"]
    assert asked == [8082, 8080]
    # the answer is kept for a while, then asked again (the app may have restarted)
    runtime = apps.at(("fd00:200::2", 8082))
    assert apps.at(("fd00:200::2", 8082)) is runtime and asked == [8082, 8080]
    clock[0] += APP_LOOPBACK_TTL
    apps.at(("fd00:200::2", 8082))
    assert asked == [8082, 8080, 8082]
    # the proxy's own ports are never a destination
    assert apps.at(("fd00:200::2", 15001)).endpoints == []


def test_an_app_host_that_was_given_is_used_for_both_families() -> None:
    apps, _, asked = inbound_apps(app_host="10.1.0.5", answers={8082: "::1"})
    assert [e.host for e in apps.at(("fd00:200::2", 8082)).endpoints] == ["10.1.0.5"]
    assert asked == []


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
