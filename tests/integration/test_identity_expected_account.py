"""The proxy checks that the certificate the CA returns is for its own namespace and
ServiceAccount (in Kubernetes, MESHPROXY_NAMESPACE and MESHPROXY_SERVICE_ACCOUNT), and waits
at least as long as a 503's Retry-After before asking again.

The CA endpoint is the real one (meshproxy.control.ca_api) on 127.0.0.1, with bootstrap tokens
as the credential: a token of another account stands for a projected token mounted by mistake.
"""

from __future__ import annotations

import json
import random

import pytest
from aiohttp import web

from meshproxy.control.ca_api import add_ca_routes
from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.client import CertificateError, CertificateManager
from meshproxy.identity.tokens import BootstrapTokens


@pytest.fixture
async def ca_url(tmp_path):
    ca = CertificateAuthority.in_memory("cluster.local")
    tokens = BootstrapTokens(tmp_path / "tokens", "cluster.local")
    app = web.Application()
    add_ca_routes(app, ca, tokens.verify)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", tokens
    await runner.cleanup()


async def test_a_certificate_for_the_proxys_own_account_is_taken(ca_url):
    url, tokens = ca_url
    token = tokens.issue("shop", "web").read_text()
    manager = CertificateManager(url, lambda: token, expected_namespace="shop", expected_service_account="web")
    cert = await manager.ensure()
    assert cert.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web" and manager.current is cert


@pytest.mark.parametrize("namespace, account", [("shop", "web"), ("shop", None), (None, "web")])
async def test_a_certificate_for_another_account_is_refused(ca_url, namespace, account):
    url, tokens = ca_url
    token = tokens.issue("billing", "api").read_text()  # another workload's token, mounted by mistake
    rotated = []
    manager = CertificateManager(url, lambda: token, on_rotate=rotated.append,
                                 expected_namespace=namespace, expected_service_account=account)
    with pytest.raises(CertificateError) as info:
        await manager.ensure()
    message = str(info.value)
    assert "certificate issued for spiffe://cluster.local/ns/billing/sa/api" in message
    assert f"this proxy runs as ns/{namespace or '*'}/sa/{account or '*'}" in message
    assert "belongs to another ServiceAccount" in message
    assert manager.current is None and rotated == []


async def test_a_503_with_retry_after_sets_the_shortest_wait(unused_tcp_port):
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "the control plane's CA is not ready yet: x"}, status=503,
                                 headers={"Retry-After": "4"})

    app = web.Application()
    app.router.add_post("/v1/certificates", busy)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        manager = CertificateManager(f"http://127.0.0.1:{unused_tcp_port}", lambda: "t", rng=random.Random(5),
                                     backoff_base=0.5, backoff_max=30.0)
        with pytest.raises(CertificateError, match="answered 503") as info:
            await manager.ensure()
        assert info.value.retry_after == 4.0
        # Full jitter alone would often retry within a second; the plane asked for 4.
        assert min(manager.retry_delay(1, info.value.retry_after) for _ in range(200)) >= 4.0
        assert min(manager.retry_delay(1) for _ in range(200)) < 1.0
        # A Retry-After longer than the backoff's ceiling is capped by it.
        assert max(manager.retry_delay(1, 3600.0) for _ in range(200)) <= 30.0
    finally:
        await runner.cleanup()


def test_meshproxy_proxy_refuses_a_token_of_another_account(tmp_path):
    """End to end: `meshproxy proxy --service-account` (MESHPROXY_SERVICE_ACCOUNT in a pod)
    with the token of another account gets no certificate and never becomes ready; with its
    own account's token it does."""
    from support.mtlsmesh import Identities, meshed, start_control, write_mesh
    from support.proxy import ProxyProcess

    identities = Identities.make(tmp_path / "identity", ["web", "billing"])
    write_mesh(tmp_path / "mesh.yaml", [meshed("web", 1), meshed("billing", 2)])
    control = start_control(tmp_path, tmp_path / "mesh.yaml", identities)
    own = ProxyProcess(tmp_path, "", service="web", name="own", control=control.url, extra_args=[
        "--token-file", str(identities.token_file("web")), "--service-account", "web"])
    # billing's token mounted in web's pod
    wrong = ProxyProcess(tmp_path, "", service="web", name="wrong", control=control.url, extra_args=[
        "--token-file", str(identities.token_file("billing")), "--service-account", "web"])
    try:
        # the right account: ready, with a certificate for it
        own.start()
        status, body = own.admin_get("/config")
        assert status == 200
        assert json.loads(body)["identity"]["spiffeId"] == "spiffe://cluster.local/ns/default/sa/web"
        # the wrong one: refused, and said so
        with pytest.raises(AssertionError) as refused:
            wrong.start(timeout=5)
        assert b"another ServiceAccount" in wrong.stderr(), wrong.stderr().decode(errors="replace")
        assert "did not become ready" in str(refused.value)
    finally:
        own.stop()
        wrong.kill()
        control.stop()
