"""Mutual TLS between sidecars, end to end: a control plane with the mesh's CA, sidecars that get
their certificates from it with their bootstrap tokens, and clients of every kind at the
sidecars' ports (spec §3 PeerAuthentication, §4 `x-meshproxy-client-id`, §5, §6).

The shared mesh (one control plane, certificates of an hour):

    client (outbound only)  ──mTLS──►  server          STRICT, uvloop     ──►  app "server"
                                       server-asyncio  STRICT, asyncio    ──►  app "server-asyncio"
                                       edge            PERMISSIVE (policy file) ──► app "edge"
                                       victim          inbound port fixed in the Mesh; no sidecar of
                                                       its own (an impostor takes the port in one test)

Both event loops serve the STRICT inbound because the inbound TLS handshake is where uvloop and
asyncio differ. Rotation has a mesh of its own with 5 s certificates. TLS clients that the test
drives itself use certificates the project's CA code issues: from the mesh's CA, from another
CA, expired, or none at all.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from meshproxy.identity.ca import CertificateAuthority
from support.backend import HttpBackend, pattern_sha256
from support.control import ControlProcess
from support.mtlsmesh import (
    Identities,
    client_context,
    closed_without_answer,
    header_values,
    meshed,
    peer_authentication,
    request,
    spiffe,
    start_control,
    start_sidecar,
    tls_exchange,
    wait_for_endpoint,
    workload_certificate,
    write_mesh,
)
from support.proxy import REPO, ProxyProcess, closed_port, free_ports, wait_for

CLIENT_ID = "x-meshproxy-client-id"
HANDSHAKES = "meshproxy_tls_handshakes_total"
OPEN = "meshproxy_tcp_connections_open"
EXPIRY = "meshproxy_cert_expiry_timestamp_seconds"


@dataclass
class Target:
    """A meshed Service with its sidecar and its app."""

    service: str
    proxy: ProxyProcess
    app: HttpBackend

    @property
    def spiffe_id(self) -> str:
        return spiffe(self.service)


@dataclass
class Mesh:
    identities: Identities
    control: ControlProcess
    client: ProxyProcess
    strict: dict[str, Target]  # event loop -> STRICT Service
    edge: Target
    victim_port: int
    trust_bundle: bytes
    mesh_cert: object  # a client certificate from the mesh's CA (spiffe .../sa/client)
    expired_cert: object  # the same, with a 5 s lifetime, issued at set-up


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls")
    apps = {name: HttpBackend(name).start() for name in ("server", "server-asyncio", "edge")}
    services = ["client", "server", "server-asyncio", "edge", "impostor"]
    identities = Identities.make(tmp / "identity", services)
    ca = identities.ca()
    # Issued now, used once it has expired (test_bad_client_certificates...).
    expired_cert = workload_certificate(ca, spiffe("client"), lifetime=5)
    config = tmp / "config"
    config.mkdir()
    victim_port = free_ports(1)[0]
    write_mesh(config / "mesh.yaml", [
        meshed("server", apps["server"].port),
        meshed("server-asyncio", apps["server-asyncio"].port),
        meshed("edge", apps["edge"].port),
        meshed("victim", closed_port(), inbound=victim_port),
    ], policies=["peer-authentication.yaml"])
    (config / "peer-authentication.yaml").write_text(yaml.safe_dump(peer_authentication("edge", "PERMISSIVE")))
    started: list[ProxyProcess] = []
    control = start_control(tmp, config / "mesh.yaml", identities, lifetime="1h")
    try:
        def sidecar(service: str, *extra: str) -> Target:
            proxy = start_sidecar(tmp, control, identities, service, instance=f"{service}-0",
                                  app_port=apps[service].port, extra_args=list(extra))
            started.append(proxy)
            return Target(service, proxy, apps[service])

        strict = {"uvloop": sidecar("server"), "asyncio": sidecar("server-asyncio", "--no-uvloop")}
        # Started with --default-mtls-mode STRICT like the others: PERMISSIVE comes from the file.
        edge = sidecar("edge")
        client = start_sidecar(tmp, control, identities, "client")
        started.append(client)
        for target in (*strict.values(), edge):
            wait_for_endpoint(client, f"{target.service}.default", target.proxy.inbound)
        yield Mesh(identities, control, client, strict, edge, victim_port, ca.trust_bundle(),
                   workload_certificate(ca, spiffe("client")), expired_cert)
    finally:
        for proxy in started:
            proxy.stop()
        control.stop()
        for app in apps.values():
            app.stop()


@pytest.fixture(params=["uvloop", "asyncio"])
def strict(request, mesh) -> Target:
    return mesh.strict[request.param]


def _headers_through_client(mesh: Mesh, host: str, path: str = "/headers", **kwargs):
    return request(mesh.client.outbound, path, host=host, **kwargs)


def _direct(mesh: Mesh, target: Target, certificate, path: str = "/headers"):
    """A request over TLS from the test itself to `target`'s inbound port."""
    payload = f"GET {path} HTTP/1.1\r\nHost: {target.service}\r\nConnection: close\r\n\r\n".encode()
    return tls_exchange(target.proxy.inbound, client_context(certificate, mesh.trust_bundle), payload)


def _only_marker_since(mesh: Mesh, target: Target, seen: int, marker: str) -> None:
    """Send a marker request through the client's sidecar and check that it is the one
    request `target`'s app received since it had received `seen`: whatever the test sent
    before it never reached the app."""
    status, _, _ = _headers_through_client(mesh, target.service, f"/headers?{marker}")
    assert status == 200
    assert [r.path for r in target.app.requests()[seen:]] == [f"/headers?{marker}"]


def test_a_call_between_sidecars_is_mutual_tls_and_the_app_learns_the_caller(mesh):
    server = mesh.strict["uvloop"]
    status, headers, body = _headers_through_client(mesh, "server")
    assert status == 200 and headers["x-backend"] == "server"
    assert header_values(body, CLIENT_ID) == ["spiffe://cluster.local/ns/default/sa/client"]
    assert mesh.client.metric_sum(HANDSHAKES, direction="outbound", result="ok") >= 1
    assert mesh.client.metric_sum(HANDSHAKES, direction="outbound") == \
        mesh.client.metric_sum(HANDSHAKES, direction="outbound", result="ok")
    assert server.proxy.metric_sum(HANDSHAKES, direction="inbound", result="ok") >= 1
    # The client's sidecar keeps the connection for the next call: it is open, and it is TLS.
    assert server.proxy.metric_sum(OPEN, direction="inbound", tls="true") >= 1
    assert server.proxy.metric_sum(OPEN, direction="inbound", tls="false") == 0
    now = time.time()
    for proxy in (mesh.client, server.proxy):
        expiry = proxy.metric_sum(EXPIRY)
        assert now < expiry <= now + 3601, expiry  # the control plane's --cert-lifetime 1h


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_bodies_larger_than_the_tls_read_buffer_cross_both_sidecars_intact(mesh, strict, framing):
    """8 MiB each way over the mTLS hop: more than the 256 KiB buffer the sidecars decrypt
    into (several reads fill it), chunked uploads framed one TLS record per chunk."""
    size = 8 * 1024 * 1024
    status, headers, body = request(
        mesh.client.outbound, f"/bytes/{size}?framing={framing}", host=strict.service,
        timeout=60)
    assert status == 200 and headers["x-backend"] == strict.service
    assert len(body) == size and hashlib.sha256(body).hexdigest() == pattern_sha256(size)

    conn = http.client.HTTPConnection("127.0.0.1", mesh.client.outbound, timeout=60)
    try:
        conn.putrequest("POST", "/upload", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", strict.service)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        sent = hashlib.sha256()
        for i in range(size // 65536):
            piece = bytes([i % 251]) * 65536
            sent.update(piece)
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200
    assert answer == {"bytes": size, "sha256": sent.hexdigest()}


def test_the_server_sidecar_proves_its_own_identity(mesh):
    outcome = _direct(mesh, mesh.strict["uvloop"], mesh.mesh_cert)
    assert outcome.server_id == "spiffe://cluster.local/ns/default/sa/server"
    assert outcome.answered and outcome.data.startswith(b"HTTP/1.1 200 "), outcome


def test_a_forged_client_id_is_replaced_by_the_verified_one(mesh):
    forged = spiffe("admin")
    headers = [(CLIENT_ID, forged), ("X-Meshproxy-Client-Id", forged + "/2")]
    status, _, body = _headers_through_client(mesh, "server", headers=headers)
    assert status == 200
    assert header_values(body, CLIENT_ID) == [spiffe("client")]
    # The same over mTLS to the PERMISSIVE edge.
    status, _, body = _headers_through_client(mesh, "edge", headers=headers)
    assert status == 200 and header_values(body, CLIENT_ID) == [spiffe("client")]


def test_a_client_id_sent_in_plaintext_is_removed(mesh):
    status, headers, body = request(mesh.edge.proxy.inbound, "/headers", host="edge",
                                    headers=[(CLIENT_ID, spiffe("client")), ("X-MESHPROXY-CLIENT-ID", "me")])
    assert status == 200 and headers["x-backend"] == "edge"
    assert header_values(body, CLIENT_ID) == []


def test_strict_inbound_closes_a_plaintext_connection_without_an_answer(mesh, strict):
    proxy = strict.proxy
    refused = proxy.metric_sum(HANDSHAKES, direction="inbound", result="refused-plaintext")
    seen = len(strict.app.requests())
    with socket.create_connection(("127.0.0.1", proxy.inbound), timeout=5) as sock:
        sock.sendall(f"GET /headers HTTP/1.1\r\nHost: {strict.service}\r\n\r\n".encode())
        assert closed_without_answer(sock) == b""
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        request(proxy.inbound, "/headers", host=strict.service)
    wait_for(lambda: proxy.metric_sum(HANDSHAKES, direction="inbound", result="refused-plaintext") == refused + 2,
             timeout=5, what="two plaintext connections counted as refused")
    assert proxy.metric_sum(OPEN, direction="inbound", tls="false") == 0
    _only_marker_since(mesh, strict, seen, "after-plaintext")


def test_permissive_inbound_serves_plaintext_and_mtls_on_one_port(mesh):
    edge = mesh.edge.proxy
    plain = http.client.HTTPConnection("127.0.0.1", edge.inbound, timeout=5)
    try:
        plain.request("GET", "/headers", headers={"Host": "edge"})
        response = plain.getresponse()
        assert response.status == 200 and header_values(response.read(), CLIENT_ID) == []
        # Kept alive: counted open, as plaintext.
        assert edge.metric_sum(OPEN, direction="inbound", tls="false") >= 1
    finally:
        plain.close()
    status, headers, body = _headers_through_client(mesh, "edge")
    assert status == 200 and headers["x-backend"] == "edge"
    assert header_values(body, CLIENT_ID) == [spiffe("client")]
    assert edge.metric_sum(HANDSHAKES, direction="inbound", result="ok") >= 1
    assert edge.metric_sum(OPEN, direction="inbound", tls="true") >= 1
    assert edge.metric_sum(HANDSHAKES, direction="inbound", result="refused-plaintext") == 0


@pytest.mark.parametrize("kind", ["another CA", "no certificate", "expired"])
def test_bad_client_certificates_fail_the_handshake_and_reach_nothing(mesh, strict, kind):
    if kind == "another CA":
        other = CertificateAuthority.in_memory("cluster.local")
        # Same trust domain and identity, and it trusts the mesh's root: only the issuer differs.
        certificate = workload_certificate(other, spiffe("client"), trust_bundle=mesh.trust_bundle)
    elif kind == "no certificate":
        certificate = None
    else:
        certificate = mesh.expired_cert
        wait_for(lambda: time.time() > certificate.expires + 1, timeout=10, what="the certificate to expire")
    proxy = strict.proxy
    refused = proxy.metric_sum(HANDSHAKES, direction="inbound", result="refused-handshake")
    seen = len(strict.app.requests())
    outcome = _direct(mesh, strict, certificate)
    assert not outcome.answered and outcome.data == b"" and outcome.error is not None, outcome
    wait_for(lambda: proxy.metric_sum(HANDSHAKES, direction="inbound", result="refused-handshake") == refused + 1,
             timeout=5, what="the failed handshake counted")
    # The sidecar is still up and serves the real client.
    assert proxy.process.poll() is None
    _only_marker_since(mesh, strict, seen, "after-bad-certificate")
    good = _direct(mesh, strict, mesh.mesh_cert)
    assert good.data.startswith(b"HTTP/1.1 200 "), good


def _client_hello(mesh: Mesh) -> bytes:
    """The first flight of a real TLS 1.3 client of the mesh: a ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(mesh.mesh_cert, mesh.trust_bundle).wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100
    return hello


def test_malformed_tls_never_takes_the_sidecar_down(mesh, strict):
    proxy = strict.proxy
    hello = _client_hello(mesh)
    refused = proxy.metric_sum(HANDSHAKES, direction="inbound", result="refused-handshake")
    seen = len(strict.app.requests())
    # A handshake that stalls halfway holds no one else up.
    stalled = socket.create_connection(("127.0.0.1", proxy.inbound), timeout=5)
    try:
        stalled.sendall(hello[:len(hello) // 2])
        cases = {
            "garbage after 0x16": (b"\x16\x03\x01\x02\x00" + b"\xff" * 512, False),
            "plaintext after 0x16": (b"\x16GET /headers HTTP/1.1\r\nHost: server\r\n\r\n", False),
            "a record longer than allowed": (b"\x16\x03\x01\xff\xff" + hello[5:], False),
            "truncated ClientHello, then EOF": (hello[:len(hello) // 2], True),
            "0x16 alone, then EOF": (b"\x16", True),
        }
        for name, (data, eof) in cases.items():
            with socket.create_connection(("127.0.0.1", proxy.inbound), timeout=5) as sock:
                sock.sendall(data)
                if eof:
                    sock.shutdown(socket.SHUT_WR)
                assert b"HTTP/" not in closed_without_answer(sock), name
        # A whole ClientHello, the server's first answer read, then a reset mid-handshake.
        with socket.create_connection(("127.0.0.1", proxy.inbound), timeout=5) as sock:
            sock.sendall(hello)
            assert sock.recv(5)[:1] == b"\x16"  # the ServerHello record starts
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: proxy.metric_sum(HANDSHAKES, direction="inbound", result="refused-handshake")
                 >= refused + len(cases) + 1, timeout=5, what="every broken handshake counted")
        assert proxy.process.poll() is None
        _only_marker_since(mesh, strict, seen, "after-malformed")
        good = _direct(mesh, strict, mesh.mesh_cert)
        assert good.data.startswith(b"HTTP/1.1 200 "), good
    finally:
        stalled.close()
    assert proxy.admin_get("/ready")[0] == 200


def test_the_caller_refuses_a_server_that_is_not_who_the_endpoint_should_be(mesh, tmp_path):
    # A real sidecar of the mesh, with a certificate for its own Service, on the inbound port
    # the Mesh gives to `victim`.
    impostor = start_sidecar(tmp_path, mesh.control, mesh.identities, "impostor",
                             app_port=mesh.strict["uvloop"].app.port,
                             extra_args=["--inbound-port", str(mesh.victim_port)])
    try:
        proof = tls_exchange(mesh.victim_port, client_context(mesh.mesh_cert, mesh.trust_bundle),
                             b"GET /headers HTTP/1.1\r\nHost: victim\r\nConnection: close\r\n\r\n")
        assert proof.server_id == spiffe("impostor") and proof.answered, proof
        app = mesh.strict["uvloop"].app
        seen = len(app.requests())
        before = mesh.client.metric_sum(HANDSHAKES, direction="outbound", result="wrong-identity")
        status, headers, body = _headers_through_client(mesh, "victim")
        assert status == 502, body
        assert headers["x-meshproxy-error"] == "connect-failure"
        assert mesh.client.metric_sum(HANDSHAKES, direction="outbound", result="wrong-identity") > before
        assert app.requests()[seen:] == []
    finally:
        impostor.stop()


# Rotation.

ROTATION_POLICY = """\
apiVersion: meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {name: server, namespace: default}
spec:
  targetRef: {kind: Service, name: server}
  # Idle upstream connections go after 200 ms, so bursts of calls keep opening new mTLS
  # connections (with whatever certificates are in force) next to the long-lived one.
  connectionPool: {idleTimeout: 200ms}
  # No retries: a failed handshake would show as a failed call, not be hidden by a retry.
  retry: {attempts: 0}
"""


def test_certificates_rotate_under_load_without_losing_a_request(tmp_path):
    app = HttpBackend("server").start()
    identities = Identities.make(tmp_path / "identity", ["client", "server"])
    write_mesh(tmp_path / "mesh.yaml", [meshed("server", app.port)], policies=["traffic.yaml"])
    (tmp_path / "traffic.yaml").write_text(ROTATION_POLICY)
    control = start_control(tmp_path, tmp_path / "mesh.yaml", identities, lifetime="5s")
    started: list[ProxyProcess] = []
    stop = threading.Event()
    statuses: Counter = Counter()
    failures: list[str] = []
    keepalive_ports: set[int] = set()
    lock = threading.Lock()
    try:
        server = start_sidecar(tmp_path, control, identities, "server", instance="server-0", app_port=app.port)
        started.append(server)
        client = start_sidecar(tmp_path, control, identities, "client")
        started.append(client)
        wait_for_endpoint(client, "server.default", server.inbound)
        direct_cert = workload_certificate(identities.ca(), spiffe("client"))
        bundle = identities.ca().trust_bundle()

        def record(what: str, status: int | None, body: bytes = b"") -> None:
            with lock:
                statuses[status] += 1
                if status != 200:
                    failures.append(f"{what}: {status} {body[:200]!r}")

        def keep_alive() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", client.outbound, timeout=10)
            try:
                while not stop.is_set():
                    conn.request("GET", "/headers", headers={"Host": "server"})
                    response = conn.getresponse()
                    body = response.read()
                    keepalive_ports.add(conn.sock.getsockname()[1])
                    ok = response.status == 200 and header_values(body, CLIENT_ID) == [spiffe("client")]
                    record("keep-alive", response.status if ok else None, body)
            except (OSError, http.client.HTTPException) as exc:
                record("keep-alive", None, repr(exc).encode())
            finally:
                conn.close()

        def one_new(path: str) -> None:
            try:
                status, _, body = request(client.outbound, path, host="server")
                record("new connection", status, body)
            except (OSError, http.client.HTTPException) as exc:
                record("new connection", None, repr(exc).encode())

        def bursts() -> None:
            # Four calls at once on new connections; every 300 ms, longer than the idle timeout.
            with ThreadPoolExecutor(4) as pool:
                while not stop.is_set():
                    list(pool.map(one_new, ["/slow/50"] * 4))
                    stop.wait(0.3)

        def direct() -> None:
            # A new TLS connection of the test's own each time: the server's current certificate
            # must verify against the trust bundle.
            while not stop.is_set():
                outcome = tls_exchange(server.inbound, client_context(direct_cert, bundle),
                                       b"GET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
                ok = outcome.data.startswith(b"HTTP/1.1 200 ") and outcome.server_id == spiffe("server")
                record("direct TLS", 200 if ok else None, outcome.error.encode() if outcome.error else outcome.data)
                stop.wait(0.2)

        expiries = {"client": [client.metric_sum(EXPIRY)], "server": [server.metric_sum(EXPIRY)]}
        handshakes_at_rotation: list[float] = []
        workers = [threading.Thread(target=f, daemon=True) for f in (keep_alive, bursts, direct)]
        started_at = time.monotonic()
        for worker in workers:
            worker.start()
        while True:
            for name, proxy in (("client", client), ("server", server)):
                value = proxy.metric_sum(EXPIRY)
                if value != expiries[name][-1]:
                    expiries[name].append(value)
                    if name == "client":
                        handshakes_at_rotation.append(
                            client.metric_sum(HANDSHAKES, direction="outbound", result="ok"))
            elapsed = time.monotonic() - started_at
            if elapsed >= 12 and min(len(v) for v in expiries.values()) >= 3:
                break
            assert elapsed < 25, f"fewer than two rotations on each sidecar in 25 s: {expiries}"
            assert not failures, failures[:5]
            time.sleep(0.1)
        stop.set()
        for worker in workers:
            worker.join(15)
        assert not failures, failures[:5]
        assert set(statuses) == {200} and statuses[200] > 100, statuses
        # One connection from the client all along, through every rotation.
        assert len(keepalive_ports) == 1
        # New mTLS connections were made with each certificate of the client: between the
        # sidecars one HTTP/2 connection carries every call, and after a rotation it takes
        # no new call (the next goes on a connection made with the new certificate).
        assert client.metric_sum(HANDSHAKES, direction="outbound", result="ok") >= \
            len(expiries["client"])
        assert handshakes_at_rotation
        for proxy, direction in ((client, "outbound"), (server, "inbound")):
            total = proxy.metric_sum(HANDSHAKES, direction=direction)
            assert total == proxy.metric_sum(HANDSHAKES, direction=direction, result="ok"), proxy.metrics()
        assert client.metric_sum("meshproxy_retries_total") == 0
        # Each new certificate lasts longer than the one before it.
        for values in expiries.values():
            assert values == sorted(values) and len(set(values)) == len(values)
    finally:
        stop.set()
        for proxy in started:
            proxy.stop()
        control.stop()
        app.stop()


# Key material on disk.

MAKE_IDENTITIES = """\
import os, sys
from pathlib import Path
from meshproxy.local.up import PlannedInstance, make_identities

os.umask(0)  # the modes must come from the code, not from a careful umask
state = Path(sys.argv[1])
state.mkdir(mode=0o700)
planned = [PlannedInstance(service=s, namespace="default", name=f"{s}-0", app_host="127.0.0.1",
                           app_port=9000 + i, command=None, outbound=0, inbound=0, admin=0, health=0,
                           meshed=m)
           for i, (s, m) in enumerate([("client", True), ("server", True), ("outside", False)])]
make_identities(state, "cluster.local", planned)
"""


def _private_files(root: Path) -> dict[str, tuple[int, set[int]]]:
    """Every *.key and *.token under `root`: (its mode, the modes of its folders up to root)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".key", ".token"):
            folders = {stat.S_IMODE((root / parent).stat().st_mode) for parent in path.relative_to(root).parents}
            found[str(path.relative_to(root))] = (stat.S_IMODE(path.stat().st_mode), folders)
    return found


def test_no_private_key_or_token_is_readable_by_others(tmp_path):
    state = tmp_path / "state"
    subprocess.run([sys.executable, "-c", MAKE_IDENTITIES, str(state)], cwd=REPO, check=True, timeout=30)
    found = _private_files(state)
    assert set(found) == {"identity/ca/root.key", "identity/ca/issuer.key",
                          "identity/tokens/default.client.token", "identity/tokens/default.server.token"}
    for name, (mode, folders) in found.items():
        assert mode == 0o600, f"{name}: {oct(mode)}"
        assert folders == {0o700}, f"{name}: folders {sorted(map(oct, folders))}"


def test_meshproxy_ca_init_writes_private_keys_only_its_owner_can_read(tmp_path):
    folder = tmp_path / "ca"
    result = subprocess.run([sys.executable, "-m", "meshproxy", "ca", "init", "--dir", str(folder)],
                            cwd=REPO, capture_output=True, text=True, timeout=30,
                            preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    assert "cluster.local" in result.stdout
    found = _private_files(tmp_path)
    assert set(found) == {"ca/root.key", "ca/issuer.key"}
    for name, (mode, _) in found.items():
        assert mode == 0o600, f"{name}: {oct(mode)}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
