"""gRPC through the mesh (spec §9), with real grpcio clients and servers on 127.0.0.1.

- One sidecar in front of three gRPC backends: calls are balanced per call (not per
  connection), every kind of call works, a backend answering UNAVAILABLE is retried on
  another, `grpc-timeout` is the call's deadline, and the proxy's own errors are
  trailers-only answers with spec §9's statuses.
- Two sidecars with identities: the call crosses client sidecar → mTLS HTTP/2 (ALPN `h2`)
  → server sidecar → the gRPC app, and the app learns the verified caller.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from support.grpcapp import GrpcApp, stub
from support.mtlsmesh import (
    Identities,
    spiffe,
    start_control,
    start_sidecar,
    wait_for_endpoint,
    write_mesh,
)
from support.proxy import ProxyProcess, mesh_yaml


@pytest.fixture(scope="module")
def apps():
    started = [GrpcApp(f"app{i}").start() for i in range(3)]
    yield started
    for app in started:
        app.stop()


@pytest.fixture(scope="module")
def silent():
    """A backend that accepts connections (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, apps, silent) -> ProxyProcess:
    mesh = mesh_yaml({"echo": [app.address for app in apps], "nothing": [],
                      "silent": [silent]})
    proxy = ProxyProcess(tmp_path_factory.mktemp("grpc"), mesh, service="client").start()
    yield proxy
    proxy.stop()


def channel(port: int, authority: str = "echo") -> grpc.Channel:
    """A channel to the sidecar's port that names the Service as its authority (as a client
    in a cluster names `echo:80`)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}",
                                 options=[("grpc.default_authority", authority)])


def test_one_channel_spreads_its_calls_over_every_backend(sidecar, apps):
    before = [app.calls for app in apps]
    with channel(sidecar.outbound) as ch:
        unary = stub(ch, "Unary")
        answers = Counter(unary(b"hi", timeout=10).split(b":")[0] for _ in range(300))
    # One client connection, yet the calls reach every backend: balanced per call, not per
    # connection. (How evenly depends on each backend's latency, PeakEWMA's measure: the
    # even split under load is a figure of benchmarks/RESULTS.md.)
    assert set(answers) == {b"app0", b"app1", b"app2"}, answers
    assert [app.calls - b for app, b in zip(apps, before)] == [
        answers[b"app0"], answers[b"app1"], answers[b"app2"]]


def test_every_kind_of_call_passes_through(sidecar):
    with channel(sidecar.outbound) as ch:
        assert stub(ch, "Unary")(b"one", timeout=10).endswith(b":one")
        streamed = list(stub(ch, "ServerStream", "unary_stream")(b"50", timeout=10))
        assert len(streamed) == 50 and streamed[-1].endswith(b":49")
        # Client streaming: 200 messages of 16 KiB each (more than any flow-control window).
        counted = stub(ch, "ClientStream", "stream_unary")(
            iter([b"x" * 16384] * 200), timeout=20)
        assert counted.split(b":")[1:] == [b"200", str(200 * 16384).encode()]
        echoed = list(stub(ch, "Bidi", "stream_stream")(iter([b"a", b"b", b"c"]), timeout=10))
        assert [m.split(b":", 1)[1] for m in echoed] == [b"a", b"b", b"c"]


def test_a_status_from_the_app_reaches_the_client_unchanged(sidecar):
    with channel(sidecar.outbound) as ch:
        with pytest.raises(grpc.RpcError) as raised:
            stub(ch, "Unary")(b"fail-5", timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details().endswith("failed")


def test_unavailable_is_retried_on_another_backend(tmp_path, apps):
    """A backend that answers UNAVAILABLE (trailers-only) is retried; the client never sees
    it while a healthy backend is left."""
    failing = GrpcApp("failing")
    failing._unary = lambda request, context: context.abort(grpc.StatusCode.UNAVAILABLE, "down")
    failing.start()
    try:
        mesh = mesh_yaml({"echo": [failing.address, apps[0].address]})
        proxy = ProxyProcess(tmp_path, mesh, service="client").start()
        try:
            with channel(proxy.outbound) as ch:
                answers = [stub(ch, "Unary")(b"hi", timeout=10) for _ in range(40)]
            assert all(answer.startswith(b"app0:") for answer in answers)
            retried = proxy.metric_sum("meshproxy_retries_total", reason="unavailable")
            assert retried >= 1
        finally:
            proxy.stop()
    finally:
        failing.stop()


def grpc_curl(port: int, path: str, *headers: str, authority: str = "echo",
              timeout: float = 10) -> tuple[dict[str, str], float]:
    """One gRPC call by curl over HTTP/2 with prior knowledge, with headers of the test's
    choosing (a grpc-timeout without a client-side deadline): (response fields, seconds)."""
    args = ["curl", "-s", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"host: {authority}", "--data-binary", "@-"]
    for header in headers:
        args += ["-H", header]
    started = time.monotonic()
    # A gRPC message: uncompressed flag, 4-byte length, the bytes.
    message = b"\x00" + len(b"hang").to_bytes(4, "big") + b"hang"
    done = subprocess.run(args + [f"http://127.0.0.1:{port}{path}"], input=message,
                          capture_output=True, timeout=timeout)
    elapsed = time.monotonic() - started
    fields = {}
    for line in done.stdout.decode().splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("HTTP/"):
            fields[name.strip().lower()] = value.strip()
        elif line.startswith("HTTP/"):
            fields[":status"] = line.split()[1]
    assert ":status" in fields, (done.returncode, done.stderr.decode())
    return fields, elapsed


def test_grpc_timeout_is_the_deadline_and_the_proxy_answers_deadline_exceeded(sidecar):
    fields, elapsed = grpc_curl(sidecar.outbound, "/demo.Echo/Unary", "grpc-timeout: 100m",
                                authority="silent")
    assert fields[":status"] == "200"
    assert fields["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert fields["x-meshproxy-error"] == "timeout"
    assert 0.09 <= elapsed < 1.0


def test_the_route_timeout_caps_the_deadline_sent_upstream(tmp_path, apps):
    """A route timeout shorter than the call's grpc-timeout is the deadline, and the time left
    goes upstream as grpc-timeout: the app sees the route's 2 s, not the client's 30 s."""
    policy = {"apiVersion": "meshproxy.io/v1alpha1", "kind": "TrafficPolicy",
              "metadata": {"name": "echo", "namespace": "default"},
              "spec": {"targetRef": {"kind": "Service", "name": "echo"},
                       "timeouts": {"request": "2s"}}}
    mesh = mesh_yaml({"echo": [apps[0].address]}, documents=[policy])
    proxy = ProxyProcess(tmp_path, mesh, service="client").start()
    try:
        with channel(proxy.outbound) as ch:
            assert stub(ch, "Unary")(b"deadline", timeout=30).endswith(b":deadline")
        remaining = apps[0].time_remaining[-1]
        assert remaining is not None and 1.0 < remaining <= 2.0
        with channel(proxy.outbound) as ch:
            stub(ch, "Unary")(b"short", timeout=0.5)
        remaining = apps[0].time_remaining[-1]
        assert remaining is not None and remaining <= 0.55  # the client's, the smaller
    finally:
        proxy.stop()


@pytest.mark.parametrize("authority, status, reason", [
    ("nothing", "14", "no-endpoints"),
    ("nowhere.invalid", "14", "connect-failure"),
])
def test_the_proxys_own_errors_are_trailers_only_grpc_answers(sidecar, authority, status, reason):
    fields, _ = grpc_curl(sidecar.outbound, "/demo.Echo/Unary", authority=authority)
    assert fields[":status"] == "200"
    assert fields["content-type"] == "application/grpc"
    assert fields["grpc-status"] == status
    assert fields["x-meshproxy-error"] == reason
    assert reason in fields["grpc-message"]


def test_grpcio_sees_the_proxys_status(sidecar):
    with channel(sidecar.outbound, authority="nothing") as ch:
        with pytest.raises(grpc.RpcError) as raised:
            stub(ch, "Unary")(b"hi", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(raised.value.initial_metadata() or ()).get("x-meshproxy-error") == \
        "no-endpoints" or "no-endpoints" in raised.value.details()


# -- between two sidecars, over mTLS ---------------------------------------------------------

@pytest.fixture(scope="module")
def mtls_mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc-mtls")
    app = GrpcApp("server").start()
    identities = Identities.make(tmp / "identity", ["client", "server"])
    services = [{"name": "server", "namespace": "default", "port": 80,
                 "instances": [{"name": "server-0",
                                "app": {"address": f"127.0.0.1:{app.port}"}}]}]
    write_mesh(tmp / "mesh.yaml", services)
    control = start_control(tmp, tmp / "mesh.yaml", identities)
    server = start_sidecar(tmp, control, identities, "server", instance="server-0",
                           app_port=app.port)
    client = start_sidecar(tmp, control, identities, "client")
    wait_for_endpoint(client, "server.default", server.inbound)
    yield client, server, app
    client.stop()
    server.stop()
    control.stop()
    app.stop()


def test_calls_cross_both_sidecars_over_mtls_h2(mtls_mesh):
    client, server, app = mtls_mesh
    with channel(client.outbound, authority="server") as ch:
        assert stub(ch, "Unary")(b"over-mtls", timeout=10) == b"server:over-mtls"
        streamed = list(stub(ch, "ServerStream", "unary_stream")(b"20", timeout=10))
        assert len(streamed) == 20
        counted = stub(ch, "ClientStream", "stream_unary")(iter([b"ab"] * 300), timeout=10)
        assert counted == b"server:300:600"
        echoed = list(stub(ch, "Bidi", "stream_stream")(iter([b"p", b"q"]), timeout=10))
        assert echoed == [b"server:p", b"server:q"]
    # The app learns the verified caller from the server sidecar (spec §5).
    assert app.metadata[-1].get("x-meshproxy-client-id") == spiffe("client")
    # The hop between the sidecars was mutual TLS, negotiated as h2.
    assert server.metric_sum("meshproxy_tls_handshakes_total", direction="inbound",
                             result="ok") >= 1


def test_one_connection_between_the_sidecars_carries_many_calls(mtls_mesh):
    client, server, _ = mtls_mesh
    with channel(client.outbound, authority="server") as ch:
        unary = stub(ch, "Unary")
        for i in range(50):
            assert unary(b"%d" % i, timeout=10) == b"server:%d" % i
    opened = server.metric_sum("meshproxy_tcp_connections_opened_total", direction="inbound")
    assert opened <= 2


def test_calls_are_counted_with_their_grpc_status(sidecar):
    """meshproxy_requests_total carries each answer's gRPC status (spec §9): read from the
    app's trailers, from a trailers-only answer, or the proxy's own; UNAVAILABLE counts as a
    failure, NOT_FOUND (the app's answer to the caller) does not."""
    def count(**labels: str) -> float:
        return sidecar.metric_sum("meshproxy_requests_total", direction="outbound", **labels)

    before = {status: count(grpc_status=status) for status in ("0", "5", "14")}
    with channel(sidecar.outbound) as ch:
        stub(ch, "Unary")(b"ok", timeout=10)
        with pytest.raises(grpc.RpcError):
            stub(ch, "Unary")(b"fail-5", timeout=10)
    with channel(sidecar.outbound, authority="nothing") as ch:
        with pytest.raises(grpc.RpcError):
            stub(ch, "Unary")(b"hi", timeout=10)
    assert count(grpc_status="0") == before["0"] + 1
    assert count(grpc_status="5", classification="success") == before["5"] + 1
    # The proxy's own answer: HTTP 200, gRPC UNAVAILABLE, a failure.
    assert count(grpc_status="14", code="200", classification="failure",
                 service="nothing.default") >= 1
    assert count(grpc_status="14") == before["14"] + 1


# -- backends that go away under load ------------------------------------------------------

TESTS = Path(__file__).resolve().parents[1]


def app_process(name: str) -> tuple[subprocess.Popen, int]:
    """A gRPC app in a process of its own (support/grpcapp.py): (process, port)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    proc = subprocess.Popen([sys.executable, "-m", "support.grpcapp", name], cwd=TESTS,
                            env=env, stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def load_until(port: int, enough: threading.Event, done: threading.Event,
               workers: int = 8) -> tuple[Counter, list]:
    """Unary calls from `workers` threads on one channel until `done`; `enough` is set
    after the first 200. Returns (answers by app, failures)."""
    answers: Counter = Counter()
    failures: list = []
    lock = threading.Lock()
    with channel(port) as ch:
        unary = stub(ch, "Unary")

        def work() -> None:
            while not done.is_set():
                try:
                    answer = unary(b"sleep-5", timeout=10)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append((exc.code(), exc.details()))
                    continue
                with lock:
                    answers[answer.split(b":")[0]] += 1
                    if sum(answers.values()) >= 200:
                        enough.set()

        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return answers, failures


@pytest.mark.parametrize("how", ["drained", "killed"])
def test_a_backend_that_goes_away_mid_load_fails_no_call(tmp_path, how):
    """Drained (SIGTERM: the app's GOAWAY, its calls in flight finish, new ones are refused
    and retried elsewhere; a call grpcio had taken but not started when it stopped comes
    back CANCELLED, retried where the policy says `cancelled`), or killed (its connection
    resets under calls in flight, retried where the policy allows `reset` for gRPC's
    POSTs): no call fails."""
    procs = [app_process(f"p{i}") for i in range(3)]
    try:
        policy = {"apiVersion": "meshproxy.io/v1alpha1", "kind": "TrafficPolicy",
                  "metadata": {"name": "echo", "namespace": "default"},
                  "spec": {"targetRef": {"kind": "Service", "name": "echo"},
                           "retry": {"attempts": 3, "nonIdempotent": True,
                                     "on": ["connect-failure", "refused-stream", "unavailable",
                                            "cancelled", "reset"]}}}
        mesh = mesh_yaml({"echo": [f"127.0.0.1:{port}" for _, port in procs]},
                         documents=[policy])
        proxy = ProxyProcess(tmp_path, mesh, service="client").start()
        try:
            enough, done = threading.Event(), threading.Event()
            result: list = []
            loader = threading.Thread(target=lambda: result.append(
                load_until(proxy.outbound, enough, done)), daemon=True)
            loader.start()
            assert enough.wait(30), "no load"
            victim = procs[0][0]
            if how == "drained":
                victim.send_signal(signal.SIGTERM)
            else:
                victim.kill()
            victim.wait(15)
            after = threading.Event()
            # Keep the load on for 300 more calls after the backend went.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not after.is_set():
                status, body = proxy.admin_get("/endpoints")
                if proxy.metric_sum("meshproxy_requests_total", service="echo.default") \
                        >= 500:
                    after.set()
                else:
                    time.sleep(0.05)
            done.set()
            loader.join(60)
            answers, failures = result[0]
            assert not failures, failures[:5]
            assert answers[b"p1"] and answers[b"p2"], answers
        finally:
            proxy.stop()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_a_stream_four_times_the_memory_bound_crosses_both_sidecars_with_flat_memory(mtls_mesh):
    """256 MiB of server-streamed messages, app → server sidecar → mTLS HTTP/2 → client
    sidecar → client: everything arrives, and neither sidecar's memory grows with it (flow
    control is the back-pressure; nothing is buffered whole). Four times the bound below is
    enough to tell flat from buffered; benchmarks/ streams 1 GiB."""
    client, server, _ = mtls_mesh
    before = {p: p.rss_kib() for p in (client, server)}
    received = 0
    with channel(client.outbound, authority="server") as ch:
        for message in stub(ch, "Blob", "unary_stream")(b"256", timeout=300):
            received += len(message)
    assert received == 256 << 20
    for proxy in (client, server):
        # Flat: the peak stays within 64 MiB of what the sidecar held before the stream.
        assert proxy.peak_rss_kib() - before[proxy] < 64 * 1024, (before[proxy],
                                                                   proxy.peak_rss_kib())


def test_sigterm_lets_calls_in_flight_finish_and_the_client_moves_on(tmp_path, apps):
    """SIGTERM: each HTTP/2 client connection gets a GOAWAY; the calls in flight on it are
    answered, then the sidecar exits 0 within its drain timeout."""
    mesh = mesh_yaml({"echo": [apps[0].address]})
    proxy = ProxyProcess(tmp_path, mesh, service="client").start()
    try:
        with channel(proxy.outbound) as ch:
            unary = stub(ch, "Unary")
            assert unary(b"warm", timeout=10).endswith(b":warm")  # the connection is open
            before = apps[0].calls
            calls = [unary.future(b"sleep-800", timeout=10) for _ in range(5)]
            deadline = time.monotonic() + 10
            while apps[0].calls < before + 5:  # all five reached the app
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proxy.signal(signal.SIGTERM)
            assert [c.result() for c in calls] == [b"app0:sleep-800"] * 5
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()


def test_health_checking_and_reflection_cross_both_sidecars(mtls_mesh):
    """The standard services real gRPC apps run: grpc.health.v1 (unary Check, streaming
    Watch) and server reflection (a bidirectional stream), through client sidecar → mTLS
    h2 → server sidecar."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client, _, app = mtls_mesh
    with channel(client.outbound, authority="server") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        answer = health.Check(health_pb2.HealthCheckRequest(service="demo.Echo"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service="demo.Echo"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        [listed] = list(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"demo.Echo", "grpc.health.v1.Health"} <= names
