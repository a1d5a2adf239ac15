"""Identity over real sockets: the CA endpoint over HTTP, credentials checked by bootstrap token
and by TokenReview, the proxy's certificate manager issuing and renewing, and mutual TLS 1.3
between two sidecars' certificates.

No Kubernetes API server runs on the test machines, so TokenReviews go to a fake at the HTTP
boundary (tests/support/faketokenreview.py) that answers as the real one does; the client
side is the real one (kubernetes_asyncio, configured from a kubeconfig file).

Certificate lifetimes here are a few seconds (never under the CA's 5 s minimum) so renewal and
expiry happen within a test; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest

from meshproxy.control.ca_api import add_ca_routes
from meshproxy.control.kubernetes import make_api_client
from meshproxy.dataplane.tls import peer_identity
from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.client import Certificate, CertificateError, CertificateManager, ssl_contexts
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.tokens import BootstrapTokens, TokenReviewer, VerifierUnavailable
from support.faketokenreview import FakeTokenReviewAPI

DEADLINE = 20.0
WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/default/sa/api"


async def until(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll `condition` until it holds; fail naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what}")
        await asyncio.sleep(0.02)


# The CA endpoint.

@dataclass
class CAServer:
    url: str
    ca: CertificateAuthority
    tokens: BootstrapTokens
    counts: object
    runner: web.AppRunner
    unavailable: int = 0  # answer this many next requests 503 (credential cannot be checked)

    def token(self, namespace: str, service: str) -> str:
        return self.tokens.issue(namespace, service).read_text()

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def start(self) -> None:
        """Serve again on the same port after `stop`."""
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", int(self.url.rsplit(":", 1)[1]), reuse_address=True).start()


@asynccontextmanager
async def ca_server(folder, *, lifetime: float = 3600.0,
                    verify: Callable[[str], Awaitable[str | None]] | None = None):
    ca = CertificateAuthority.in_memory("cluster.local")
    tokens = BootstrapTokens(folder / "tokens", "cluster.local")
    server: CAServer | None = None

    async def checked(token: str) -> str | None:
        if server.unavailable:
            server.unavailable -= 1
            raise VerifierUnavailable("API server unreachable")
        return await (verify or tokens.verify)(token)

    app = web.Application()
    counts = add_ca_routes(app, ca, checked, lifetime=lifetime)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, reuse_address=True).start()
    server = CAServer(f"http://127.0.0.1:{runner.addresses[0][1]}", ca, tokens, counts, runner)
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def server(tmp_path):
    async with ca_server(tmp_path) as s:
        yield s


async def post(url: str, body=None, *, data: bytes | None = None, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/certificates", json=body if data is None else None, data=data,
                                headers=headers) as response:
            return response.status, dict(response.headers), await response.json(content_type=None)


async def test_a_csr_with_its_token_gets_a_chain_for_the_tokens_identity(server):
    key = new_key()
    asked = time.time()
    status, _, body = await post(server.url, {"csr": make_csr(key).decode(), "token": server.token("default", "web")})
    assert status == 200, body
    leaf, issuer = x509.load_pem_x509_certificates(body["certificate_chain"].encode())
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [WEB]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert issuer == server.ca.issuer
    assert body["spiffe_id"] == WEB
    assert body["trust_bundle"].encode() == server.ca.trust_bundle()
    assert body["expires"] == leaf.not_valid_after_utc.timestamp()
    answered = time.time()
    # NotAfter is the signing time plus the lifetime, rounded up to a whole second.
    assert asked + 3600 <= body["expires"] <= answered + 3601


async def test_the_token_may_come_as_a_bearer_header(server):
    status, _, body = await post(server.url, {"csr": make_csr(new_key()).decode()},
                                 headers={"Authorization": "Bearer " + server.token("default", "api")})
    assert status == 200 and body["spiffe_id"] == API


async def test_the_trust_bundle_is_served(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/v1/trust-bundle") as response:
            assert response.status == 200
            assert response.content_type == "application/x-pem-file"
            assert await response.read() == server.ca.trust_bundle()


@pytest.mark.parametrize("token", [None, "", "0" * 64, "Bearer"])
async def test_no_credential_or_a_wrong_one_gets_401(server, token):
    server.token("default", "web")
    body = {"csr": make_csr(new_key()).decode()}
    if token is not None:
        body["token"] = token
    status, headers, answer = await post(server.url, body)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert "credential" in answer["error"]


async def test_a_wrong_credential_gets_401_even_with_a_malformed_csr(server):
    status, _, _ = await post(server.url, {"csr": "garbage", "token": "wrong"})
    assert status == 401


async def test_a_csr_for_another_identity_gets_403(server):
    status, _, answer = await post(server.url, {"csr": make_csr(new_key(), API).decode(),
                                                "token": server.token("default", "web")})
    assert status == 403
    assert answer["error"] == f"the CSR asks for {API} but the credential proves {WEB}"


@pytest.mark.parametrize("body", [
    {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"},
    {"csr": "not a csr"},
    {"csr": 42},
    {},
])
async def test_a_malformed_csr_gets_400(server, body):
    status, _, answer = await post(server.url, {**body, "token": server.token("default", "web")})
    assert status == 400 and "certificate signing request" in answer["error"]


async def test_a_body_that_is_not_json_gets_400(server):
    status, _, answer = await post(server.url, data=b"csr=x&token=y",
                                   headers={"Authorization": "Bearer " + server.token("default", "web")})
    assert status == 400 and "JSON" in answer["error"]


async def test_a_credential_that_cannot_be_checked_now_gets_503(server):
    server.unavailable = 1
    status, headers, answer = await post(server.url, {"csr": make_csr(new_key()).decode(),
                                                      "token": server.token("default", "web")})
    assert status == 503 and headers.get("Retry-After") == "1"
    assert "API server unreachable" in answer["error"]


async def test_answers_are_counted_by_result(server):
    token = server.token("default", "web")
    await post(server.url, {"csr": make_csr(new_key()).decode(), "token": token})
    await post(server.url, {"csr": make_csr(new_key()).decode(), "token": "wrong"})
    await post(server.url, {"csr": make_csr(new_key(), API).decode(), "token": token})
    await post(server.url, {"csr": "x", "token": token})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(server.counts)
    text = generate_latest(registry).decode()
    for result in ("issued", "unauthenticated", "forbidden", "bad_request"):
        assert f'meshproxy_control_certificates_total{{result="{result}"}} 1.0' in text
    assert 'meshproxy_control_certificates_total{result="unavailable"} 0.0' in text


# TokenReview.

def write_kubeconfig(folder, url: str) -> str:
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "control-plane-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return str(path)


@pytest.fixture
async def kube(tmp_path):
    fake = FakeTokenReviewAPI()
    await fake.start()
    api_client = await make_api_client(write_kubeconfig(tmp_path, fake.url))
    try:
        yield fake, TokenReviewer(api_client, "cluster.local")
    finally:
        await api_client.close()
        await fake.stop()


async def test_a_serviceaccount_token_for_meshproxy_proves_its_serviceaccount(kube):
    fake, reviewer = kube
    fake.add_token("pod-token", "shop", "checkout", audiences=["meshproxy"])
    assert await reviewer.verify("pod-token") == "spiffe://cluster.local/ns/shop/sa/checkout"
    (body, authorization), = fake.reviews
    assert body["apiVersion"] == "authentication.k8s.io/v1" and body["kind"] == "TokenReview"
    assert body["spec"] == {"token": "pod-token", "audiences": ["meshproxy"]}
    assert authorization == "Bearer control-plane-token"


async def test_tokens_that_prove_no_serviceaccount_for_meshproxy_prove_nothing(kube):
    fake, reviewer = kube
    fake.add_token("default-token", "shop", "checkout")  # bound to the API server's audience only
    fake.add_user_token("admin-token", "kubernetes-admin", audiences=["meshproxy"])
    assert await reviewer.verify("default-token") is None
    assert await reviewer.verify("admin-token") is None
    assert await reviewer.verify("unknown") is None
    assert await reviewer.verify("") is None
    assert len(fake.reviews) == 3  # an empty token is not even sent


async def test_an_answer_without_audiences_proves_nothing(kube):
    """An authenticator that ignores audiences would accept any token of the pod, including
    one meant for the API server: without `meshproxy` among the audiences, no identity."""
    fake, reviewer = kube
    fake.audience_aware = False
    fake.add_token("pod-token", "shop", "checkout", audiences=["meshproxy"])
    assert await reviewer.verify("pod-token") is None


async def test_a_forbidden_or_unreachable_api_server_is_unavailable_not_a_no(kube):
    fake, reviewer = kube
    fake.add_token("pod-token", "shop", "checkout", audiences=["meshproxy"])
    fake.forbidden = True
    with pytest.raises(VerifierUnavailable, match="403"):
        await reviewer.verify("pod-token")
    await fake.stop()
    with pytest.raises(VerifierUnavailable, match="TokenReview failed"):
        await reviewer.verify("pod-token")


async def test_the_ca_endpoint_signs_for_the_serviceaccount_a_tokenreview_proves(kube, tmp_path):
    fake, reviewer = kube
    fake.add_token("pod-token", "shop", "checkout", audiences=["meshproxy"])
    async with ca_server(tmp_path, verify=reviewer.verify) as server:
        status, _, body = await post(server.url, {"csr": make_csr(new_key()).decode(), "token": "pod-token"})
        assert status == 200 and body["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/checkout"
        status, _, body = await post(server.url, {"csr": make_csr(new_key(), WEB).decode(), "token": "pod-token"})
        assert status == 403
        fake.forbidden = True
        status, _, _ = await post(server.url, {"csr": make_csr(new_key()).decode(), "token": "pod-token"})
        assert status == 503


# The proxy's certificate manager.

class Rotations(list):
    """on_rotate that records (certificate, the manager's renewal time for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.manager: CertificateManager | None = None

    def __call__(self, cert: Certificate) -> None:
        self.append((cert, self.manager.renew_at))


def manager_for(server: CAServer, namespace: str, service: str, rotations: Rotations | None = None,
                **kwargs) -> CertificateManager:
    path = server.tokens.issue(namespace, service)
    manager = CertificateManager(server.url, path.read_text, on_rotate=rotations, **kwargs)
    if rotations is not None:
        rotations.manager = manager
    return manager


async def test_ensure_issues_a_certificate_and_keeps_it_until_due(server):
    rotations = Rotations()
    manager = manager_for(server, "default", "web", rotations)
    assert manager.current is None
    cert = await manager.ensure()
    assert manager.current is cert and cert.spiffe_id == WEB
    assert cert.trust_bundle_pem == server.ca.trust_bundle()
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    assert leaf.public_key().public_numbers() == cert.key.public_key().public_numbers()
    assert cert.expires == leaf.not_valid_after_utc.timestamp() and cert.valid_at(time.time())
    assert await manager.ensure() is cert  # not due yet: no new request
    assert [c for c, _ in rotations] == [cert] and server.counts.counts["issued"] == 1


async def test_a_manager_that_expects_its_identity_is_refused_another(server):
    path = server.tokens.issue("default", "web")
    manager = CertificateManager(server.url, path.read_text, expected_id=API)
    with pytest.raises(CertificateError, match="answered 403: the CSR asks for .*sa/api"):
        await manager.ensure()
    assert manager.current is None


async def test_a_refused_or_unreachable_control_plane_is_a_certificate_error(server):
    with pytest.raises(CertificateError, match="answered 401: the credential proves no identity"):
        await CertificateManager(server.url, lambda: "wrong").ensure()
    await server.stop()
    with pytest.raises(CertificateError, match=f"control plane {server.url}"):
        await CertificateManager(server.url, lambda: "wrong").ensure()


async def test_a_credential_file_that_cannot_be_read_is_a_certificate_error(server, tmp_path):
    manager = CertificateManager(server.url, (tmp_path / "absent.token").read_text)
    with pytest.raises(CertificateError, match="cannot read the credential: .*absent.token"):
        await manager.ensure()


async def test_run_renews_at_70_percent_of_the_lifetime(tmp_path):
    async with ca_server(tmp_path, lifetime=5) as server:
        rotations = Rotations()
        task = asyncio.create_task(manager_for(server, "default", "web", rotations).run())
        try:
            await until(lambda: len(rotations) >= 2, "a renewal")
        finally:
            task.cancel()
        (first, first_due), (second, _) = rotations[:2]
        span = first.expires - first.received
        assert 4.5 <= span <= 6.1  # NotAfter is whole seconds after the server's clock
        assert first.received + 0.7 * span <= first_due <= first.received + 0.75 * span + 1e-6
        assert first_due <= second.received < first.expires  # renewed when due, before expiry
        assert second.expires > first.expires and second.spiffe_id == WEB
        assert second.key.public_key().public_numbers() != first.key.public_key().public_numbers()


async def test_a_failed_renewal_is_retried_while_the_certificate_held_is_valid(tmp_path):
    async with ca_server(tmp_path, lifetime=6) as server:
        rotations = Rotations()
        manager = manager_for(server, "default", "web", rotations, backoff_base=0.05, backoff_max=0.3)
        await manager.ensure()
        server.unavailable = 3  # the next three requests get 503
        task = asyncio.create_task(manager.run())
        try:
            await until(lambda: len(rotations) >= 2, "a renewal after three failures")
        finally:
            task.cancel()
        (first, _), (second, _) = rotations[:2]
        assert manager.failures == 3 and server.counts.counts["unavailable"] == 3
        assert second.received < first.expires and manager.current is second


async def test_renewal_resumes_when_the_control_plane_comes_back(tmp_path):
    async with ca_server(tmp_path, lifetime=6) as server:
        rotations = Rotations()
        manager = manager_for(server, "default", "web", rotations, backoff_base=0.05, backoff_max=0.3)
        first = await manager.ensure()
        await server.stop()
        task = asyncio.create_task(manager.run())
        try:
            await until(lambda: manager.failures >= 2, "renewals failing while the control plane is down")
            assert manager.current is first and first.valid_at(time.time())
            await server.start()
            await until(lambda: len(rotations) >= 2, "a renewal once the control plane is back")
        finally:
            task.cancel()
        assert manager.current is rotations[1][0] and rotations[1][0].expires > first.expires


# Mutual TLS with the certificates.

def certificate(ca: CertificateAuthority, identity: str, lifetime: float = 3600.0) -> Certificate:
    key = new_key()
    issued = ca.issue(make_csr(key), identity, lifetime)
    return Certificate.from_chain(key, issued.chain_pem, ca.trust_bundle(), time.time())


@dataclass
class Exchange:
    server_saw: str | None
    client_saw: str | None
    version: str
    alpn: str | None


async def exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Exchange:
    """Connect a client to a server over TLS on 127.0.0.1; the server answers the peer ID it
    verified. Raises what the client sees when the handshake is refused."""
    seen: list[str | None] = []

    async def handle(reader, writer):
        peer = peer_identity(writer.get_extra_info("ssl_object"))
        seen.append(peer)
        writer.write((peer or "-").encode() + b"\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client_ctx), 5)
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            if not line:
                raise ConnectionResetError("the server closed the connection")
            ssl_object = writer.get_extra_info("ssl_object")
            assert line.decode().strip() == (seen[0] or "-")
            return Exchange(seen[0], peer_identity(ssl_object), ssl_object.version(),
                            ssl_object.selected_alpn_protocol())
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_two_sidecars_handshake_mutually_and_see_each_others_identity(loop):
    ca = CertificateAuthority.in_memory("cluster.local")
    web_server, _ = ssl_contexts(certificate(ca, WEB))
    _, api_client = ssl_contexts(certificate(ca, API))
    result = (uvloop.run if loop == "uvloop" else asyncio.run)(exchange(web_server, api_client))
    assert result == Exchange(server_saw=API, client_saw=WEB, version="TLSv1.3", alpn="http/1.1")


async def test_a_certificate_of_another_ca_is_refused_both_ways():
    ours, theirs = (CertificateAuthority.in_memory("cluster.local") for _ in range(2))
    web_server, web_client = ssl_contexts(certificate(ours, WEB))
    intruder_server, intruder_client = ssl_contexts(certificate(theirs, API))
    with pytest.raises(REFUSED):
        await exchange(web_server, intruder_client)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        await exchange(intruder_server, web_client)


async def test_a_client_without_a_certificate_is_refused():
    ca = CertificateAuthority.in_memory("cluster.local")
    web_server, _ = ssl_contexts(certificate(ca, WEB))
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.trust_bundle().decode())
    with pytest.raises(REFUSED):
        await exchange(web_server, anonymous)


async def test_tls_below_1_3_is_refused():
    ca = CertificateAuthority.in_memory("cluster.local")
    web_server, _ = ssl_contexts(certificate(ca, WEB))
    _, old_client = ssl_contexts(certificate(ca, API))
    old_client.minimum_version = ssl.TLSVersion.TLSv1_2
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(REFUSED):
        await exchange(web_server, old_client)


async def test_an_expired_certificate_is_refused_both_ways():
    ca = CertificateAuthority.in_memory("cluster.local")
    expiring = certificate(ca, API, lifetime=5)
    web_server, web_client = ssl_contexts(certificate(ca, WEB))
    old_server, old_client = ssl_contexts(expiring)
    assert (await exchange(web_server, old_client)).server_saw == API  # valid for now
    # OpenSSL checks validity in whole seconds: wait until it is past NotAfter for sure.
    await until(lambda: time.time() > expiring.expires + 1, "the certificate expiring", deadline=15)
    with pytest.raises(REFUSED):
        await exchange(web_server, old_client)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        await exchange(old_server, web_client)


async def test_the_key_reaches_openssl_through_memory_only(monkeypatch, tmp_path):
    loaded = []
    real = ssl.SSLContext.load_cert_chain

    def load_cert_chain(self, certfile, *args, **kwargs):
        loaded.append(certfile)
        return real(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_cert_chain)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ssl_contexts(certificate(CertificateAuthority.in_memory("cluster.local"), WEB))
    assert len(loaded) == 2 and all(path.startswith("/proc/self/fd/") for path in loaded)
    assert list(tmp_path.iterdir()) == []


async def test_without_memfd_the_key_file_is_private_and_deleted_at_once(monkeypatch, tmp_path):
    seen = []
    real = ssl.SSLContext.load_cert_chain

    def load_cert_chain(self, certfile, *args, **kwargs):
        seen.append((os.stat(certfile).st_mode & 0o777, os.stat(os.path.dirname(certfile)).st_mode & 0o777))
        return real(self, certfile, *args, **kwargs)

    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_cert_chain)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ca = CertificateAuthority.in_memory("cluster.local")
    web_server, _ = ssl_contexts(certificate(ca, WEB))
    _, api_client = ssl_contexts(certificate(ca, API))
    assert seen == [(0o600, 0o700)] * 4
    assert list(tmp_path.iterdir()) == []
    assert (await exchange(web_server, api_client)).server_saw == API
