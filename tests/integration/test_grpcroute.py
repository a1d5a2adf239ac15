"""GRPCRoute through a real sidecar (spec §9), with grpcio clients and servers on 127.0.0.1: a
call goes to the backend its rule names (Exact service and method, a method alone, a regular
expression with a header), the rule's filters reach the app, and a call no rule matches is the
proxy's own UNIMPLEMENTED (404 no-route)."""

from __future__ import annotations

import time

import grpc
import pytest

from support.grpcapp import GrpcApp, stub
from support.proxy import ProxyProcess, mesh_yaml

ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GRPCRoute",
    "metadata": {"name": "echo", "namespace": "default"},
    "spec": {
        "parentRefs": [{"kind": "Service", "name": "echo"}],
        "rules": [
            {"name": "unary",
             "matches": [{"method": {"service": "demo.Echo", "method": "Unary"}}],
             "filters": [{"type": "RequestHeaderModifier",
                          "requestHeaderModifier": {"set": [{"name": "x-route", "value": "unary"}]}}],
             "backendRefs": [{"name": "echo-v1"}]},
            {"name": "streams",
             "matches": [{"method": {"method": "ServerStream"}}],
             "backendRefs": [{"name": "echo-v2"}]},
            {"name": "canary",
             "matches": [{"method": {"type": "RegularExpression", "service": r"demo\..*"},
                          "headers": [{"name": "x-canary", "value": "true"}]}],
             "backendRefs": [{"name": "echo-v2"}]},
        ],
    },
}


@pytest.fixture(scope="module")
def apps():
    started = {name: GrpcApp(name).start() for name in ("v1", "v2")}
    yield started
    for app in started.values():
        app.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, apps) -> ProxyProcess:
    mesh = mesh_yaml({"echo": [], "echo-v1": [apps["v1"].address], "echo-v2": [apps["v2"].address]},
                     documents=[ROUTE])
    proxy = ProxyProcess(tmp_path_factory.mktemp("grpcroute"), mesh, service="client").start()
    yield proxy
    proxy.stop()


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "echo")])


def test_exact_service_and_method_goes_to_its_backend_with_the_rules_filter(sidecar, apps):
    with channel(sidecar.outbound) as ch:
        # Exact Unary outranks the canary's regular expression, header or not.
        for metadata in ((), (("x-canary", "true"),)):
            assert stub(ch, "Unary")(b"hi", timeout=10, metadata=metadata) == b"v1:hi"
    assert apps["v1"].metadata[-1].get("x-route") == "unary"


def test_a_method_alone_and_a_regex_with_a_header(sidecar, apps):
    with channel(sidecar.outbound) as ch:
        assert list(stub(ch, "ServerStream", "unary_stream")(b"2", timeout=10)) == [b"v2:0", b"v2:1"]
        got = stub(ch, "ClientStream", "stream_unary")(iter([b"a", b"bc"]), timeout=10,
                                                       metadata=(("x-canary", "true"),))
        assert got.startswith(b"v2:")


def test_a_call_no_rule_matches_is_unimplemented(sidecar, apps):
    calls = apps["v1"].calls + apps["v2"].calls
    with channel(sidecar.outbound) as ch:
        with pytest.raises(grpc.RpcError) as raised:
            stub(ch, "ClientStream", "stream_unary")(iter([b"a"]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no-route" in (raised.value.details() or "") or \
        dict(raised.value.trailing_metadata() or ()).get("x-meshproxy-error") == "no-route"
    assert apps["v1"].calls + apps["v2"].calls == calls  # the proxy answered


def test_a_mirror_gets_a_copy_of_each_call_and_weights_split_the_rest(tmp_path):
    """A rule with weighted backends (3:1) and a RequestMirror: the calls split by weight,
    and the mirror, a gRPC server too, gets a copy of every call over HTTP/2, without the
    caller seeing it."""
    started = {name: GrpcApp(name).start() for name in ("a", "b", "shadow")}
    try:
        route = {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "split", "namespace": "default"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "echo"}],
                     "rules": [{"matches": [{"method": {"service": "demo.Echo"}}],
                                "filters": [{"type": "RequestMirror", "requestMirror": {
                                    "backendRef": {"name": "echo-shadow"}}}],
                                "backendRefs": [{"name": "echo-a", "weight": 3},
                                                {"name": "echo-b", "weight": 1}]}]}}
        mesh = mesh_yaml({"echo": [], "echo-a": [started["a"].address],
                          "echo-b": [started["b"].address],
                          "echo-shadow": [started["shadow"].address]}, documents=[route])
        proxy = ProxyProcess(tmp_path, mesh, service="client").start()
        try:
            with channel(proxy.outbound) as ch:
                unary = stub(ch, "Unary")
                answers = [unary(b"%d" % i, timeout=10).split(b":")[0] for i in range(200)]
            assert 110 <= answers.count(b"a") <= 190, answers.count(b"a")
            assert answers.count(b"a") + answers.count(b"b") == 200
            deadline = time.monotonic() + 10
            while started["shadow"].calls < 200:
                assert time.monotonic() < deadline, started["shadow"].calls
                time.sleep(0.02)
        finally:
            proxy.stop()
    finally:
        for app in started.values():
            app.stop()
