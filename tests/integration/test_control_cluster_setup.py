"""The control plane in a cluster when its CA cannot be had yet, and over a long life: it serves
configuration at once and answers certificate requests 503 until the CA Secret can be read; the
proxy's certificate manager waits and then gets one; the webhook's serving certificate and the
webhook configuration's caBundle are checked again periodically.

No Kubernetes API server runs on the test machines: every test here uses the fake of
tests/support/fakecluster.py at the HTTP boundary (list + watch, Secrets, the webhook
configuration, TokenReview, RBAC denials answered as the real one answers them). The client
side is the real one (kubernetes_asyncio from a kubeconfig file); the control plane runs in
this process so that its retry and recheck intervals can be short.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Callable

import aiohttp
import pytest
from cryptography import x509

import support.kubefactory as k
from meshproxy.control.kubernetes import make_api_client
from meshproxy.control.run import serve_control
from meshproxy.identity.client import CertificateError, CertificateManager
from meshproxy.kube.bootstrap import RENEW_BEFORE
from meshproxy.kube.maintain import maintain
from meshproxy.kube.certs import issue_serving_certificate
from support.fakecluster import FakeCluster
from support.proxy import free_ports
from support.threadedkube import write_kubeconfig

DEADLINE = 20.0
NS = "meshproxy-system"
WEB = "spiffe://cluster.local/ns/default/sa/web"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE seconds."""
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def cluster():
    fake = FakeCluster()
    await fake.start()
    yield fake
    await fake.stop()


def webhook_leaf(fake: FakeCluster) -> x509.Certificate:
    data = fake.secrets[(NS, "meshproxy-webhook-tls")]["data"]
    return x509.load_pem_x509_certificates(base64.b64decode(data["tls.crt"]))[0]


async def test_configuration_is_served_before_the_ca_and_certificates_follow_it(cluster, tmp_path, caplog):
    cluster.apply(k.service("web"))
    cluster.apply(k.pod("web-0", service_account="web"))
    cluster.apply(k.endpoint_slice("web", [k.endpoint("10.244.0.1", "web-0")]))
    cluster.reviews.add_token("web-token", "default", "web", audiences=["meshproxy"])
    cluster.secrets_forbidden = True  # the Role for the control plane's Secrets is missing
    caplog.set_level(logging.INFO, logger="meshproxy")
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    stop = asyncio.Event()
    control = asyncio.create_task(serve_control(
        [], url.removeprefix("http://"), kubernetes=True, kubeconfig=write_kubeconfig(tmp_path, cluster.url),
        stop=stop, ca_retry_max=0.2))
    manager = CertificateManager(url, lambda: "web-token", backoff_base=0.05, backoff_max=0.2)
    renewing: asyncio.Task | None = None
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> tuple[int, str]:
                try:
                    async with http.get(url + path) as response:
                        return response.status, await response.text()
                except aiohttp.ClientError:
                    return 0, ""

            end = time.monotonic() + DEADLINE
            while (await get("/ready"))[0] != 200:
                assert time.monotonic() < end, "the control plane never became ready"
                await asyncio.sleep(0.02)
            # Ready, with the cluster's Services, while the CA Secret still cannot be read.
            status, text = await get("/config")
            assert status == 200 and "web.default" in text
            assert cluster.secret_refusals >= 1 and not cluster.secrets
            async with http.post(url + "/v1/certificates", json={"csr": "x", "token": "web-token"}) as response:
                body = await response.json()
                assert response.status == 503 and response.headers["Retry-After"] == "5"
            assert "CA is not ready yet" in body["error"] and "HTTP 403" in body["error"]
            assert "meshproxy-ca" in body["error"]
            assert (await get("/v1/trust-bundle"))[0] == 503
            assert "meshproxy_control_ca_ready 0.0" in (await get("/metrics"))[1]

            # The proxy's side: a 503 is an error it may retry, with the wait the plane asked for.
            with pytest.raises(CertificateError, match="answered 503: the control plane's CA is not ready") as info:
                await manager.ensure()
            assert info.value.retry_after == 5
            renewing = asyncio.create_task(manager.run())
            await until(lambda: cluster.secret_refusals >= 6 and manager.failures >= 2, "retries on both sides")
            # Retried, but said once (the same 403 again and again is not news).
            complaints = [r.getMessage() for r in caplog.records
                          if r.name == "meshproxy.control.bootstrap" and r.levelno >= logging.WARNING]
            assert len(complaints) == 1, complaints
            assert "meshproxy-system/meshproxy-ca" in complaints[0] and "HTTP 403" in complaints[0]
            assert "RBAC" in complaints[0]

            cluster.secrets_forbidden = False  # the Role is applied
            await until(lambda: manager.current is not None, "a certificate once the CA is there")
            assert manager.current.spiffe_id == WEB
            assert (NS, "meshproxy-ca") in cluster.secrets and (NS, "meshproxy-webhook-tls") in cluster.secrets
            assert "meshproxy_control_ca_ready 1.0" in (await get("/metrics"))[1]
            assert (await get("/v1/trust-bundle"))[0] == 200
    finally:
        if renewing is not None:
            renewing.cancel()
        stop.set()
        assert await asyncio.wait_for(control, 10) == 0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_long_running_control_plane_keeps_the_webhook_certificate_and_ca_bundle(cluster, tmp_path):
    cluster.install_webhook_configuration()
    clock = Clock()
    cas = []
    api_client = await make_api_client(write_kubeconfig(tmp_path, cluster.url))
    task = asyncio.create_task(maintain(api_client, trust_domain="cluster.local", on_ca=cas.append,
                                        rng=random.Random(3), clock=clock, recheck_every=0.05, backoff_max=0.1))

    def rounds_after(mark: int, n: int) -> Callable[[], bool]:
        return lambda: cluster.secret_reads[mark:].count("meshproxy-webhook-tls") >= n

    try:
        await until(lambda: "patch meshproxy-injector" in cluster.writes, "the first start's steps")
        [ca] = cas
        # A certificate made long ago: 2 days left before the renewal window. Rounds leave it.
        dns = ["meshproxy-webhook.meshproxy-system.svc", "meshproxy-webhook.meshproxy-system.svc.cluster.local",
               "meshproxy-webhook.meshproxy-system", "meshproxy-webhook"]
        old = issue_serving_certificate(ca, dns, lifetime=RENEW_BEFORE + 2 * 86400)
        secret = cluster.secrets[(NS, "meshproxy-webhook-tls")]
        secret["data"].update({"tls.crt": base64.b64encode(old.chain_pem).decode(),
                               "tls.key": base64.b64encode(old.key_pem).decode()})
        cluster._stamp(secret)
        writes = list(cluster.writes)
        await until(rounds_after(len(cluster.secret_reads), 2), "two more rounds")
        assert cluster.writes == writes
        # Three days later it is inside the window: the next round makes a new one.
        clock.now += 3 * 86400
        await until(lambda: "replace meshproxy-webhook-tls" in cluster.writes, "the certificate renewed")
        leaf = webhook_leaf(cluster)
        leaf.verify_directly_issued_by(ca.issuer)
        assert leaf.not_valid_after_utc.timestamp() - clock.now > RENEW_BEFORE
        # Someone cleared the caBundle: a later round sets it again.
        config = cluster.webhook_configurations["meshproxy-injector"]
        config["webhooks"][0]["clientConfig"].pop("caBundle")
        cluster._stamp(config)
        await until(lambda: "caBundle" in cluster.webhook_configurations["meshproxy-injector"]["webhooks"][0]
                    ["clientConfig"], "the caBundle set again")
        bundle = cluster.webhook_configurations["meshproxy-injector"]["webhooks"][0]["clientConfig"]["caBundle"]
        assert base64.b64decode(bundle) == ca.trust_bundle()
        # Near the issuer's own end a new certificate could not last longer (it ends with its
        # issuer): rounds then leave the one there instead of writing it again each time. (The
        # Secret loses its root key first, or the issuer itself would be renewed: see
        # test_issuer_renewal.py.)
        ca_secret = cluster.secrets[(NS, "meshproxy-ca")]
        del ca_secret["data"]["root.key"]
        cluster._stamp(ca_secret)
        clock.now = ca.issuer_expires - 10 * 86400
        writes = list(cluster.writes)
        await until(rounds_after(len(cluster.secret_reads), 3), "three more rounds")
        assert cluster.writes == writes
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await api_client.close()


async def test_a_ca_bundle_lost_to_a_reapplied_configuration_is_back_within_a_minute(cluster, tmp_path):
    """`kubectl apply -k deploy/` again (or a GitOps sync) puts back the configuration without
    a caBundle; with failurePolicy: Ignore new pods would start without sidecars, silently.
    The caBundle is looked at between the 12-hour rounds (every `bundle_every`, 60 s in a
    cluster, here 0.05 s) and set again; the rounds themselves are far apart here."""
    cluster.install_webhook_configuration()
    cas = []
    api_client = await make_api_client(write_kubeconfig(tmp_path, cluster.url))
    task = asyncio.create_task(maintain(api_client, trust_domain="cluster.local", on_ca=cas.append,
                                        rng=random.Random(3), recheck_every=3600, bundle_every=0.05))

    def bundle() -> str | None:
        hooks = cluster.webhook_configurations["meshproxy-injector"]["webhooks"]
        return hooks[0]["clientConfig"].get("caBundle")

    try:
        await until(lambda: bool(bundle()), "the first start's caBundle")
        reads = len(cluster.secret_reads)
        cluster.install_webhook_configuration()  # applied again: no caBundle
        assert not bundle()
        await until(lambda: bool(bundle()), "the caBundle set again")
        assert base64.b64decode(bundle()) == cas[-1].trust_bundle()
        assert len(cluster.secret_reads) == reads  # no round ran: the bundle alone was looked at
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api_client.close()
