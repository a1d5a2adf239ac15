"""First start in a cluster (meshproxy.kube.bootstrap): the CA Secret, the webhook's serving
certificate and the webhook configuration's caBundle, against a stand-in API server that
speaks the few requests involved the way the real one does (409 on a create race or a stale
resourceVersion, 422 on a failed JSON Patch `test`)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import time
from pathlib import Path

import jsonpatch
import pytest
import yaml
from aiohttp import web
from cryptography import x509

from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.spiffe import IdentityError
from meshproxy.kube.bootstrap import RENEW_BEFORE, Names, bootstrap, new_ca_files
from meshproxy.kube.certs import issue_serving_certificate
from meshproxy.kube.webhook import StaticNamespaces, serve_webhook

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NS = "meshproxy-system"
ADMISSION = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"


def _status(code: int, reason: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "reason": reason, "code": code}, status=code)


class StubAPI:
    """Secrets in one namespace and MutatingWebhookConfigurations, in memory."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict] = {}
        self.configs: dict[str, dict] = {}
        self.revision = 100
        self.writes: list[str] = []
        self.conflicts = 0

    def _stamp(self, obj: dict) -> dict:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        return obj

    def install_webhook_configuration(self) -> None:
        docs = yaml.safe_load_all((DEPLOY / "webhook.yaml").read_text())
        config = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
        self.configs[config["metadata"]["name"]] = self._stamp(config)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", self.get_secret)
        app.router.add_post("/api/v1/namespaces/{ns}/secrets", self.create_secret)
        app.router.add_put("/api/v1/namespaces/{ns}/secrets/{name}", self.replace_secret)
        app.router.add_get(ADMISSION, self.get_config)
        app.router.add_patch(ADMISSION, self.patch_config)
        return app

    async def get_secret(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0)  # let concurrent callers interleave, as on a real network
        found = self.secrets.get(request.match_info["name"])
        return web.json_response(found) if found else _status(404, "NotFound")

    async def create_secret(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["metadata"]["name"]
        if name in self.secrets:
            self.conflicts += 1
            return _status(409, "AlreadyExists")
        self.writes.append(f"create {name}")
        self.secrets[name] = self._stamp(body)
        return web.json_response(body, status=201)

    async def replace_secret(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = request.match_info["name"]
        current = self.secrets.get(name)
        if current is None:
            return _status(404, "NotFound")
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return _status(409, "Conflict")
        self.writes.append(f"replace {name}")
        self.secrets[name] = self._stamp(body)
        return web.json_response(body)

    async def get_config(self, request: web.Request) -> web.Response:
        found = self.configs.get(request.match_info["name"])
        return web.json_response(found) if found else _status(404, "NotFound")

    async def patch_config(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json-patch+json"
        name = request.match_info["name"]
        if name not in self.configs:
            return _status(404, "NotFound")
        try:
            patched = jsonpatch.apply_patch(self.configs[name], await request.json())
        except jsonpatch.JsonPatchTestFailed:
            return _status(422, "Invalid")
        self.writes.append(f"patch {name}")
        self.configs[name] = self._stamp(patched)
        return web.json_response(patched)


@pytest.fixture
async def api(tmp_path):
    from meshproxy.control.kubernetes import make_api_client

    stub = StubAPI()
    runner = web.AppRunner(stub.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "t", "user": {"token": "x"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    clients = []

    async def client():
        clients.append(await make_api_client(str(kubeconfig)))
        return clients[-1]

    stub.client = client
    yield stub
    for c in clients:
        await c.close()
    await runner.cleanup()


def secret_data(stub: StubAPI, name: str) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in stub.secrets[name]["data"].items()}


async def test_first_start_makes_the_ca_the_webhook_certificate_and_the_ca_bundle(api, tmp_path):
    api.install_webhook_configuration()
    ca = await bootstrap(await api.client(), trust_domain="cluster.local")
    assert sorted(api.writes) == ["create meshproxy-ca", "create meshproxy-webhook-tls", "patch meshproxy-injector"]
    stored = secret_data(api, "meshproxy-ca")
    assert sorted(stored) == ["issuer.crt", "issuer.key", "root.crt", "root.key"]
    assert stored["root.crt"] == ca.trust_bundle() and ca.trust_domain == "cluster.local"
    tls = api.secrets["meshproxy-webhook-tls"]
    assert tls["type"] == "kubernetes.io/tls" and tls["metadata"]["namespace"] == NS
    [hook] = api.configs["meshproxy-injector"]["webhooks"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca.trust_bundle()

    # The API server's view: the webhook, serving that Secret, checked against caBundle under
    # the Service's DNS name.
    data = secret_data(api, "meshproxy-webhook-tls")
    (tmp_path / "tls.crt").write_bytes(data["tls.crt"])
    (tmp_path / "tls.key").write_bytes(data["tls.key"])
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_webhook(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), "127.0.0.1:0",
                                             namespaces=StaticNamespaces(), stop=stop, ready=port.set_result))
    try:
        context = ssl.create_default_context(cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode())
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", await asyncio.wait_for(asyncio.shield(port), 10), ssl=context,
            server_hostname="meshproxy-webhook.meshproxy-system.svc")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: meshproxy-webhook.meshproxy-system.svc\r\n"
                     b"Connection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        stop.set()
        await task


async def test_a_second_start_changes_nothing(api):
    api.install_webhook_configuration()
    first = await bootstrap(await api.client(), trust_domain="cluster.local")
    writes = list(api.writes)
    second = await bootstrap(await api.client(), trust_domain="cluster.local")
    assert api.writes == writes
    assert second.trust_bundle() == first.trust_bundle()


async def test_replicas_starting_together_share_one_ca(api):
    api.install_webhook_configuration()
    cas = await asyncio.gather(*[bootstrap(await api.client(), trust_domain="cluster.local") for _ in range(3)])
    assert len({ca.trust_bundle() for ca in cas}) == 1
    assert api.writes.count("create meshproxy-ca") == 1
    assert api.conflicts > 0  # they did race
    assert secret_data(api, "meshproxy-ca")["root.crt"] == cas[0].trust_bundle()
    [hook] = api.configs["meshproxy-injector"]["webhooks"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == cas[0].trust_bundle()
    leaf = x509.load_pem_x509_certificates(secret_data(api, "meshproxy-webhook-tls")["tls.crt"])[0]
    leaf.verify_directly_issued_by(cas[0].issuer)


async def test_an_existing_ca_is_used_never_replaced(api):
    files = new_ca_files("example.org", time.time())
    api.secrets["meshproxy-ca"] = api._stamp({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                             "metadata": {"name": "meshproxy-ca", "namespace": NS},
                                             "data": {k: base64.b64encode(v).decode() for k, v in files.items()
                                                      if k != "root.key"}})
    ca = await bootstrap(await api.client(), trust_domain="cluster.local")
    assert ca.trust_domain == "example.org" and ca.trust_bundle() == files["root.crt"]
    assert "create meshproxy-ca" not in api.writes


async def test_an_unusable_ca_secret_is_an_error_and_left_alone(api):
    api.secrets["meshproxy-ca"] = api._stamp({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                             "metadata": {"name": "meshproxy-ca", "namespace": NS},
                                             "data": {"root.crt": base64.b64encode(b"junk").decode()}})
    before = copy.deepcopy(api.secrets)
    with pytest.raises(IdentityError):
        await bootstrap(await api.client(), trust_domain="cluster.local")
    assert api.secrets == before and not api.writes


@pytest.mark.parametrize("why", ["other CA", "expiring", "other names"])
async def test_a_webhook_certificate_that_will_not_do_is_made_anew(api, why):
    api.install_webhook_configuration()
    ca = await bootstrap(await api.client(), trust_domain="cluster.local")
    if why == "other CA":
        cert = issue_serving_certificate(CertificateAuthority.in_memory("cluster.local"),
                                         ["meshproxy-webhook.meshproxy-system.svc"])
    elif why == "expiring":
        cert = issue_serving_certificate(ca, ["meshproxy-webhook.meshproxy-system.svc"], lifetime=RENEW_BEFORE - 60)
    else:
        cert = issue_serving_certificate(ca, ["elsewhere.meshproxy-system.svc"])
    secret = api.secrets["meshproxy-webhook-tls"]
    secret["data"] = {"tls.crt": base64.b64encode(cert.chain_pem).decode(),
                      "tls.key": base64.b64encode(cert.key_pem).decode()}
    api._stamp(secret)
    api.writes.clear()
    await bootstrap(await api.client(), trust_domain="cluster.local")
    assert api.writes == ["replace meshproxy-webhook-tls"]
    leaf = x509.load_pem_x509_certificates(secret_data(api, "meshproxy-webhook-tls")["tls.crt"])[0]
    leaf.verify_directly_issued_by(ca.issuer)


async def test_without_a_webhook_configuration_the_rest_is_still_done(api):
    ca = await bootstrap(await api.client(), trust_domain="cluster.local")
    assert sorted(api.writes) == ["create meshproxy-ca", "create meshproxy-webhook-tls"]
    assert ca.trust_bundle() == secret_data(api, "meshproxy-ca")["root.crt"]


async def test_names_can_be_changed(api):
    names = Names(namespace="mesh", ca_secret="ca", webhook_secret="tls", webhook_service="injector",
                  webhook_configuration="none")
    await bootstrap(await api.client(), trust_domain="cluster.local", names=names)
    assert sorted(api.secrets) == ["ca", "tls"]
    leaf = x509.load_pem_x509_certificates(secret_data(api, "tls")["tls.crt"])[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "injector.mesh.svc" in san.get_values_for_type(x509.DNSName)
    assert json.dumps(api.secrets["ca"]["metadata"]["namespace"]) == '"mesh"'
