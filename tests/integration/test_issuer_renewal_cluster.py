"""The issuer's renewal in a cluster: an issuer near its end in the Secret `meshproxy-ca` is
replaced by a new one from the same root (the Secret updated with its resourceVersion; a lost
race means the winner's issuer is used), every replica switches to the issuer the Secret holds,
and proxy certificates and the webhook's serving certificate chain to it while the trust
bundle stays the same.

No Kubernetes API server runs on the test machines: every test here uses the fake of
tests/support/fakecluster.py at the HTTP boundary (Secrets with resourceVersions and 409 on a
stale one, the webhook configuration, TokenReview, list + watch). The client side is the real
one (kubernetes_asyncio from a kubeconfig file); the control planes run in this process so that
their recheck period can be 0.2 s instead of 12 h."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from meshproxy.control.kubernetes import make_api_client
from meshproxy.control.run import serve_control
from meshproxy.identity.ca import CertificateAuthority, issuer_renewal_due, renew_issuer_pem
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.spiffe import IdentityError
from meshproxy.kube.bootstrap import Names, ensure_issuer, new_ca_files
from meshproxy.kube.certs import issue_serving_certificate, service_dns_names
from support.fakecluster import FakeCluster
from support.polling import until as poll_until
from support.proxy import free_ports
from support.threadedkube import write_kubeconfig

DEADLINE = 20.0
DAY = 86400.0
NS = "meshproxy-system"
CA_KEY = (NS, "meshproxy-ca")
WEBHOOK_KEY = (NS, "meshproxy-webhook-tls")


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    await poll_until(condition, what, DEADLINE)


def stored(fake: FakeCluster, key: tuple[str, str]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in fake.secrets[key]["data"].items()}


def put_secret(fake: FakeCluster, key: tuple[str, str], data: dict[str, bytes], type_: str = "Opaque") -> None:
    fake.secrets[key] = fake._stamp({"apiVersion": "v1", "kind": "Secret", "type": type_,
                                     "metadata": {"name": key[1], "namespace": key[0]},
                                     "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})


def ca_of(files: dict[str, bytes]) -> CertificateAuthority:
    return CertificateAuthority.from_pem(files["root.crt"], files["issuer.crt"], files["issuer.key"])


def issuer_in_secret(fake: FakeCluster) -> x509.Certificate:
    return x509.load_pem_x509_certificate(stored(fake, CA_KEY)["issuer.crt"])


def verifies_with(bundle: bytes, chain: list[x509.Certificate]) -> None:
    verifier = (PolicyBuilder().store(Store(x509.load_pem_x509_certificates(bundle)))
                .time(datetime.now(timezone.utc)).build_client_verifier())
    verifier.verify(chain[0], chain[1:])


@pytest.fixture
async def cluster():
    fake = FakeCluster()
    await fake.start()
    fake.install_webhook_configuration()
    fake.reviews.add_token("web-token", "default", "web", audiences=["meshproxy"])
    yield fake
    await fake.stop()


class Replicas:
    """Control planes in this process against the fake cluster, each on its own port."""

    def __init__(self, fake: FakeCluster, tmp_path) -> None:
        self.kubeconfig = write_kubeconfig(tmp_path, fake.url)
        self.urls: list[str] = []
        self.tasks: list[asyncio.Task] = []
        self.stop = asyncio.Event()

    def start(self, n: int) -> None:
        for port in free_ports(n):
            listen = f"127.0.0.1:{port}"
            self.urls.append(f"http://{listen}")
            self.tasks.append(asyncio.create_task(serve_control(
                [], listen, kubernetes=True, kubeconfig=self.kubeconfig, stop=self.stop,
                webhook_recheck_every=0.2, ca_retry_max=0.2)))

    async def close(self) -> None:
        self.stop.set()
        assert await asyncio.wait_for(asyncio.gather(*self.tasks), 10) == [0] * len(self.tasks)


@pytest.fixture
async def replicas(cluster, tmp_path):
    r = Replicas(cluster, tmp_path)
    yield r
    await r.close()


async def chain_from(url: str) -> list[x509.Certificate] | None:
    """A proxy's certificate request to the control plane at `url`: the chain, or None while
    it cannot give one (not listening yet, CA not loaded)."""
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/certificates", json={"csr": make_csr(new_key()).decode(),
                                                                 "token": "web-token"}) as response:
                if response.status != 200:
                    return None
                body = await response.json()
    except aiohttp.ClientError:
        return None
    return x509.load_pem_x509_certificates(body["certificate_chain"].encode())


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as response:
            text = await response.text()
    [value] = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


async def test_an_issuer_near_its_end_is_renewed_once_and_both_replicas_sign_with_the_new_one(
        cluster, replicas, caplog):
    caplog.set_level(logging.INFO, logger="meshproxy")
    files = new_ca_files("cluster.local", time.time() - 300 * DAY)  # 65 days left: due
    put_secret(cluster, CA_KEY, files)
    cluster.secrets[CA_KEY]["metadata"]["annotations"] = {"owner": "platform-team"}  # an operator's
    old = ca_of(files)
    # The webhook's certificate from the old issuer, otherwise current (it would last 65 days).
    serving = issue_serving_certificate(old, service_dns_names("meshproxy-webhook", NS))
    put_secret(cluster, WEBHOOK_KEY, {"tls.crt": serving.chain_pem, "tls.key": serving.key_pem,
                                      "ca.crt": serving.ca_bundle_pem}, "kubernetes.io/tls")
    replicas.start(2)

    async def both_sign_with_the_secrets_issuer() -> bool:
        issuer = issuer_in_secret(cluster)
        chains = [await chain_from(url) for url in replicas.urls]
        return issuer != old.issuer and all(c is not None and c[1] == issuer for c in chains)

    await until(both_sign_with_the_secrets_issuer, "both replicas on a new issuer")
    new = issuer_in_secret(cluster)
    after = stored(cluster, CA_KEY)
    # One renewal, whatever the race between the replicas; the root and its key untouched.
    assert cluster.writes.count("replace meshproxy-ca") == 1
    assert (after["root.crt"], after["root.key"]) == (files["root.crt"], files["root.key"])
    assert cluster.secrets[CA_KEY]["metadata"]["annotations"] == {"owner": "platform-team"}  # kept
    new.verify_directly_issued_by(x509.load_pem_x509_certificate(files["root.crt"]))
    assert not issuer_renewal_due(old.root, new, time.time())
    assert new.not_valid_after_utc.timestamp() - time.time() > 364 * DAY
    # A proxy that holds the trust bundle from before accepts a certificate issued now.
    chain = await chain_from(replicas.urls[0])
    verifies_with(old.trust_bundle(), chain)
    for url in replicas.urls:
        assert await metric(url, "meshproxy_control_issuer_expiry_timestamp_seconds") == \
            new.not_valid_after_utc.timestamp()

    # The webhook's certificate follows the new issuer, and the caBundle stays the root.
    async def webhook_from_new_issuer() -> bool:
        leaf = x509.load_pem_x509_certificates(stored(cluster, WEBHOOK_KEY)["tls.crt"])[0]
        try:
            leaf.verify_directly_issued_by(new)
        except Exception:
            return False
        return True

    await until(webhook_from_new_issuer, "the webhook's certificate from the new issuer")
    webhook_chain = x509.load_pem_x509_certificates(stored(cluster, WEBHOOK_KEY)["tls.crt"])
    assert webhook_chain[1] == new
    [hook] = cluster.webhook_configurations["meshproxy-injector"]["webhooks"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == files["root.crt"]
    renewed = [r.getMessage() for r in caplog.records if "renewed the issuer in Secret" in r.getMessage()]
    assert len(renewed) == 1 and f"serial {new.serial_number:x}" in renewed[0]
    assert f"was serial {old.issuer.serial_number:x}" in renewed[0]


async def test_replicas_switch_to_an_issuer_another_replica_put_in_the_secret(cluster, replicas):
    files = new_ca_files("cluster.local", time.time())
    put_secret(cluster, CA_KEY, files)
    first = ca_of(files).issuer
    replicas.start(2)

    async def all_sign_with(issuer: x509.Certificate) -> bool:
        chains = [await chain_from(url) for url in replicas.urls]
        return all(c is not None and c[1] == issuer for c in chains)

    await until(lambda: all_sign_with(first), "both replicas on the first issuer")
    # Another replica (or an operator) put a new issuer in the Secret.
    issuer_pem, key_pem = renew_issuer_pem(files["root.crt"], files["root.key"], time.time())
    put_secret(cluster, CA_KEY, {**files, "issuer.crt": issuer_pem, "issuer.key": key_pem})
    second = x509.load_pem_x509_certificate(issuer_pem)
    await until(lambda: all_sign_with(second), "both replicas on the issuer in the Secret")
    assert "replace meshproxy-ca" not in cluster.writes  # it was not due: nobody renewed it again


class RacingCluster(FakeCluster):
    """The fake cluster where another replica renews the issuer just before our update lands."""

    def __init__(self) -> None:
        super().__init__()
        self.theirs: bytes | None = None

    async def _replace_secret(self, request: web.Request) -> web.Response:
        if request.match_info["name"] == "meshproxy-ca" and self.theirs is None:
            files = stored(self, CA_KEY)
            issuer_pem, key_pem = renew_issuer_pem(files["root.crt"], files["root.key"], time.time())
            self.theirs = issuer_pem
            put_secret(self, CA_KEY, {**files, "issuer.crt": issuer_pem, "issuer.key": key_pem})
        return await super()._replace_secret(request)


async def test_a_renewal_race_lost_uses_the_winners_issuer(tmp_path, caplog):
    from kubernetes_asyncio import client

    caplog.set_level(logging.INFO, logger="meshproxy")
    fake = RacingCluster()
    await fake.start()
    api = await make_api_client(write_kubeconfig(tmp_path, fake.url))
    try:
        files = new_ca_files("cluster.local", time.time() - 300 * DAY)
        put_secret(fake, CA_KEY, files)
        ca = await ensure_issuer(client.CoreV1Api(api), Names(), ca_of(files), time.time)
        assert fake.theirs is not None and ca.issuer == x509.load_pem_x509_certificate(fake.theirs)
        assert "replace meshproxy-ca" not in fake.writes  # ours was refused (409), theirs stands
        assert stored(fake, CA_KEY)["issuer.crt"] == fake.theirs
        assert any("another replica changed" in r.getMessage() for r in caplog.records)
    finally:
        await api.close()
        await fake.stop()


async def test_a_due_issuer_without_the_root_key_is_an_error_and_stays(cluster, tmp_path, caplog):
    from kubernetes_asyncio import client

    files = new_ca_files("cluster.local", time.time() - 300 * DAY)
    del files["root.key"]
    put_secret(cluster, CA_KEY, files)
    api = await make_api_client(write_kubeconfig(tmp_path, cluster.url))
    try:
        old = ca_of(files)
        ca = await ensure_issuer(client.CoreV1Api(api), Names(), old, time.time)
        assert ca is old and not cluster.writes
        [error] = [r for r in caplog.records if "due for renewal" in r.getMessage()]
        assert error.levelno == logging.ERROR and "no root.key" in error.getMessage()
        # A Secret that is gone keeps the issuer in use (the caller logs and retries).
        del cluster.secrets[CA_KEY]
        with pytest.raises(IdentityError, match="meshproxy-ca is gone"):
            await ensure_issuer(client.CoreV1Api(api), Names(), old, time.time)
    finally:
        await api.close()
