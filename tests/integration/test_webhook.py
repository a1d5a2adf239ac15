"""`meshproxy webhook` over real HTTPS: AdmissionReviews in, JSON Patches out (spec §7).

The serving certificate is signed by the mesh's own CA (meshproxy.identity.ca), and the client
verifies it against the trust anchor exactly as the API server does with `caBundle`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import time
from pathlib import Path

import aiohttp
import jsonpatch
import pytest
import yaml
from aiohttp import web
from cryptography import x509

from meshproxy.identity.ca import CertificateAuthority
from meshproxy.kube.certs import issue_serving_certificate
from meshproxy.kube.inject import InjectOptions, inject
from meshproxy.kube.webhook import KubernetesNamespaces, StaticNamespaces, serve_webhook

FIXTURE = Path(__file__).parent / "fixtures" / "admissionreview-pod-create.json"
OPTIONS = InjectOptions(proxy_image="registry.test/meshproxy:test", control_url="http://control.test:15010")


def review(*, annotations: dict | None = None, namespace: str = "shop", uid: str | None = None) -> dict:
    """The fixture review (a ReplicaSet's pod being created), changed as asked."""
    out = json.loads(FIXTURE.read_text())
    request = out["request"]
    request["namespace"] = namespace
    request["object"]["metadata"]["namespace"] = namespace
    if annotations is not None:
        request["object"]["metadata"]["annotations"] = annotations
    if uid is not None:
        request["uid"] = uid
    return out


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Webhook:
    """A running webhook on a free port and an HTTPS client that trusts the mesh's CA."""

    def __init__(self, url: str, session: aiohttp.ClientSession, namespaces: StaticNamespaces) -> None:
        self.url = url
        self.session = session
        self.namespaces = namespaces

    async def post(self, body: dict | bytes) -> aiohttp.ClientResponse:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.session.post(self.url + "/inject", data=data,
                                       headers={"Content-Type": "application/json"})

    async def answer(self, body: dict) -> dict:
        async with await self.post(body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "application/json"
            return await resp.json()


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.trust_bundle().decode())


def write_pair(folder: Path, ca: CertificateAuthority) -> tuple[Path, Path, bytes]:
    cert = issue_serving_certificate(ca, ["localhost"], ip_addresses=["127.0.0.1"])
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(cert.chain_pem)
    key_file.write_bytes(cert.key_pem)
    return cert_file, key_file, cert.chain_pem


async def start(tmp_path: Path, namespaces, *, reload_interval: float = 10.0):
    ca = CertificateAuthority.in_memory("cluster.local")
    cert_file, key_file, _ = write_pair(tmp_path, ca)
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_webhook(str(cert_file), str(key_file), "127.0.0.1:0", namespaces=namespaces,
                                             options=OPTIONS, stop=stop, ready=port.set_result,
                                             reload_interval=reload_interval))
    bound = await asyncio.wait_for(asyncio.shield(port), 10)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(ca), force_close=True))
    return ca, f"https://127.0.0.1:{bound}", session, stop, task


@pytest.fixture
async def webhook(tmp_path):
    namespaces = StaticNamespaces({"shop": {"meshproxy.io/inject": "enabled", "kubernetes.io/metadata.name": "shop"},
                                   "plain": {"kubernetes.io/metadata.name": "plain"}})
    _, url, session, stop, task = await start(tmp_path, namespaces)
    yield Webhook(url, session, namespaces)
    await session.close()
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0


def applied(original_review: dict, answer: dict) -> dict:
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    return jsonpatch.apply_patch(original_review["request"]["object"], patch)


async def test_pod_in_an_enabled_namespace_gets_the_patch_inject_makes(webhook):
    sent = review()
    answer = await webhook.answer(sent)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    pod = sent["request"]["object"]
    expected = inject(pod, namespace_labels=webhook.namespaces.namespaces["shop"], options=OPTIONS)
    assert expected != pod
    assert applied(sent, answer) == expected
    names = [c["name"] for c in expected["spec"]["initContainers"]]
    assert names[:2] == ["meshproxy-init", "meshproxy-proxy"]


async def test_uid_is_echoed(webhook):
    for uid in ("a", "0b9c7a52-7e4e-4b1f-9f3c-2f0d6e1a9b77"):
        assert (await webhook.answer(review(uid=uid)))["response"]["uid"] == uid


async def test_pod_annotated_disabled_gets_no_patch(webhook):
    answer = await webhook.answer(review(annotations={"meshproxy.io/inject": "disabled"}))
    response = answer["response"]
    assert response["allowed"] is True
    assert "patch" not in response and "patchType" not in response


async def test_namespace_label_or_pod_annotation_decides(webhook):
    # A namespace without the label: only pods that ask for it.
    assert "patch" not in (await webhook.answer(review(namespace="plain")))["response"]
    sent = review(namespace="plain", annotations={"meshproxy.io/inject": "enabled"})
    answer = await webhook.answer(sent)
    assert applied(sent, answer) == inject(sent["request"]["object"], namespace_labels={}, options=OPTIONS)
    # A namespace the webhook cannot find (none of its labels known): the annotation decides.
    assert "patch" not in (await webhook.answer(review(namespace="elsewhere")))["response"]


async def test_injecting_twice_changes_nothing(webhook):
    sent = review()
    injected = applied(sent, await webhook.answer(sent))
    again = copy.deepcopy(sent)
    again["request"]["object"] = injected
    assert "patch" not in (await webhook.answer(again))["response"]


async def test_other_objects_and_operations_are_allowed_unchanged(webhook):
    update = review()
    update["request"]["operation"] = "UPDATE"
    update["request"]["oldObject"] = update["request"]["object"]
    ephemeral = review()
    ephemeral["request"]["subResource"] = "ephemeralcontainers"
    service = review()
    service["request"]["kind"] = {"group": "", "version": "v1", "kind": "Service"}
    service["request"]["resource"] = {"group": "", "version": "v1", "resource": "services"}
    service["request"]["object"] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {}}
    delete = review()
    delete["request"]["operation"] = "DELETE"
    delete["request"]["object"] = None
    for sent in (update, ephemeral, service, delete):
        response = (await webhook.answer(sent))["response"]
        assert response == {"uid": sent["request"]["uid"], "allowed": True}


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1",
                "request": {"uid": "x"}}).encode(),
    json.dumps({"kind": "Pod", "apiVersion": "v1"}).encode(),
    json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}).encode(),
    json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": ""}}).encode(),
    json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": "x"}).encode(),
])
async def test_malformed_review_is_400(webhook, body):
    async with await webhook.post(body) as resp:
        assert resp.status == 400
        assert "AdmissionReview" in await resp.text()


async def test_a_pod_inject_refuses_is_admitted_unchanged_with_a_warning(webhook):
    sent = review(annotations={"config.meshproxy.io/proxy-cpu-request": "lots"})
    response = (await webhook.answer(sent))["response"]
    assert response["allowed"] is True and "patch" not in response
    assert any("proxy-cpu-request" in w for w in response["warnings"])


async def test_healthz_and_only_post_on_inject(webhook):
    async with webhook.session.get(webhook.url + "/healthz") as resp:
        assert resp.status == 200
    async with webhook.session.get(webhook.url + "/inject") as resp:
        assert resp.status == 405


async def test_plaintext_is_not_served(webhook):
    plain = webhook.url.replace("https://", "http://")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(plain + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()


class BrokenNamespaces:
    async def labels(self, namespace: str):
        raise OSError("connection refused")


async def test_unreadable_namespace_falls_back_to_the_annotation(tmp_path):
    _, url, session, stop, task = await start(tmp_path, BrokenNamespaces())
    hook = Webhook(url, session, StaticNamespaces())
    try:
        response = (await hook.answer(review()))["response"]
        assert response["allowed"] is True and "patch" not in response
        assert response["warnings"]
        sent = review(annotations={"meshproxy.io/inject": "enabled"})
        answer = await hook.answer(sent)
        assert applied(sent, answer) == inject(sent["request"]["object"], namespace_labels={}, options=OPTIONS)
    finally:
        await session.close()
        stop.set()
        await task


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path):
    ca, url, session, stop, task = await start(tmp_path, StaticNamespaces(), reload_interval=0.05)
    await session.close()
    try:
        async def serial() -> int:
            host, port = url.removeprefix("https://").split(":")
            _, writer = await asyncio.open_connection(host, int(port), ssl=client_context(ca))
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            return x509.load_der_x509_certificate(der).serial_number

        before = await serial()
        _, _, chain = write_pair_replacing(tmp_path, ca)
        renewed = x509.load_pem_x509_certificate(chain).serial_number
        assert renewed != before

        async def changed() -> bool:
            return await serial() == renewed
        await wait_for(changed)
    finally:
        stop.set()
        await task


def write_pair_replacing(folder: Path, ca: CertificateAuthority):
    # As the kubelet updates a mounted Secret: new files renamed into place.
    staging = folder / "new"
    staging.mkdir()
    cert_file, key_file, chain = write_pair(staging, ca)
    key_file.replace(folder / "tls.key")
    cert_file.replace(folder / "tls.crt")
    return folder / "tls.crt", folder / "tls.key", chain


async def test_kubernetes_namespaces_reads_and_caches_labels(tmp_path):
    """Labels come from `GET /api/v1/namespaces/NAME`; a missing namespace has none; each is
    asked for once per cache period."""
    asked: list[str] = []

    async def read(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        asked.append(name)
        if name == "shop":
            return web.json_response({"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": "shop", "labels": {"meshproxy.io/inject": "enabled"}}})
        if name == "broken":
            return web.json_response({"kind": "Status", "code": 500}, status=500)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                  "code": 404}, status=404)

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{name}", read)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "t", "user": {"token": "x"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    from meshproxy.control.kubernetes import make_api_client

    api = await make_api_client(str(kubeconfig))
    now = [100.0]
    try:
        namespaces = KubernetesNamespaces(api, ttl=5.0, clock=lambda: now[0])
        assert await namespaces.labels("shop") == {"meshproxy.io/inject": "enabled"}
        assert await namespaces.labels("shop") == {"meshproxy.io/inject": "enabled"}
        assert await namespaces.labels("gone") is None
        assert asked == ["shop", "gone"]
        now[0] += 6
        await namespaces.labels("shop")
        assert asked == ["shop", "gone", "shop"]
        with pytest.raises(Exception):
            await namespaces.labels("broken")
    finally:
        await api.close()
        await runner.cleanup()


def test_run_reports_a_bad_listen_address_and_an_unreadable_certificate(tmp_path, capsys):
    import argparse

    from meshproxy.kube import webhook

    parser = argparse.ArgumentParser()
    webhook.add_parser(parser.add_subparsers())
    missing = str(tmp_path / "missing.crt")
    args = parser.parse_args(["webhook", "--tls-cert", missing, "--tls-key", missing, "--listen", "nowhere",
                              "--no-kubernetes"])
    assert webhook.run(args) == 2
    args = parser.parse_args(["webhook", "--tls-cert", missing, "--tls-key", missing, "--listen", "127.0.0.1:0",
                              "--no-kubernetes"])
    assert webhook.run(args) == 1
    assert "cannot load the certificate" in capsys.readouterr().err


def test_injection_options_come_from_flags_and_environment(monkeypatch):
    import argparse

    from meshproxy.kube import webhook

    monkeypatch.setenv("MESHPROXY_PROXY_IMAGE", "registry.test/meshproxy:env")
    monkeypatch.setenv("MESHPROXY_CONTROL", "http://control.test:15010")
    parser = argparse.ArgumentParser()
    webhook.add_parser(parser.add_subparsers())
    options = webhook.options_from_args(parser.parse_args(["webhook", "--tls-cert", "c", "--tls-key", "k"]))
    assert options == InjectOptions(proxy_image="registry.test/meshproxy:env",
                                    control_url="http://control.test:15010", native_sidecar=True)
    options = webhook.options_from_args(parser.parse_args(["webhook", "--tls-cert", "c", "--tls-key", "k",
                                                           "--proxy-image", "x:1", "--no-native-sidecar"]))
    assert options.proxy_image == "x:1" and options.native_sidecar is False
