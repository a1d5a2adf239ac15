"""A stand-in for the Kubernetes API server that answers everything the control plane asks of a
cluster: the list + watch of tests/support/fakekube.py, plus Secrets, the
MutatingWebhookConfiguration and TokenReviews, at the HTTP boundary.

No Kubernetes API server runs on the test machines. This one answers the way the real one does
for the few requests involved: `GET`/`POST`/`PUT` of Secrets (404 Status when missing, 409 on a
create race or a stale resourceVersion), `GET` and JSON-Patch `PATCH` of a
MutatingWebhookConfiguration (422 when a `test` operation fails), and TokenReviews as
tests/support/faketokenreview.py answers them. `secrets_forbidden = True` answers every Secret
request 403 with the Status an RBAC denial gives.
"""

from __future__ import annotations

from pathlib import Path

import jsonpatch
import yaml
from aiohttp import web

from support.fakekube import FakeKubeAPI, _status
from support.faketokenreview import PATH as TOKENREVIEW_PATH, FakeTokenReviewAPI

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRETS = "/api/v1/namespaces/{namespace}/secrets"
ADMISSION = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
CONTROL_USER = "system:serviceaccount:meshproxy-system:meshproxy-control"


class FakeCluster(FakeKubeAPI):
    """FakeKubeAPI plus Secrets, webhook configurations and TokenReview (`reviews.add_token`)."""

    def __init__(self, crds: tuple[str, ...] | None = None) -> None:
        super().__init__(*(() if crds is None else (crds,)))
        self.secrets: dict[tuple[str, str], dict] = {}
        self.webhook_configurations: dict[str, dict] = {}
        self.reviews = FakeTokenReviewAPI()
        self.secrets_forbidden = False
        self.secret_refusals = 0  # Secret requests answered 403
        self.writes: list[str] = []  # "create NAME", "replace NAME", "patch NAME", in order
        self.secret_reads: list[str] = []  # name of every Secret read (answered or not)

    async def start(self) -> str:
        """Listen (on the same port as before, after a stop); return the base URL."""
        app = web.Application()
        app.router.add_get(SECRETS + "/{name}", self._get_secret)
        app.router.add_post(SECRETS, self._create_secret)
        app.router.add_put(SECRETS + "/{name}", self._replace_secret)
        app.router.add_get(ADMISSION, self._get_configuration)
        app.router.add_patch(ADMISSION, self._patch_configuration)
        app.router.add_post(TOKENREVIEW_PATH, self.reviews._review)
        app.router.add_get("/api/{version}/{plural}", self._handle)
        app.router.add_get("/api/{version}/namespaces/{namespace}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/namespaces/{namespace}/{plural}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        self.port = self._runner.addresses[0][1]
        return self.url

    def install_webhook_configuration(self) -> dict:
        """Store deploy/webhook.yaml's MutatingWebhookConfiguration (no caBundle); return it."""
        docs = yaml.safe_load_all((DEPLOY / "webhook.yaml").read_text())
        config = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
        self.webhook_configurations[config["metadata"]["name"]] = self._stamp(config)
        return config

    def _stamp(self, obj: dict) -> dict:
        self.revision += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.revision)
        return obj

    def _forbidden(self, request: web.Request, verb: str) -> web.Response | None:
        if not self.secrets_forbidden:
            return None
        self.secret_refusals += 1
        name = request.match_info.get("name")
        what = f'secrets "{name}"' if name else "secrets"
        message = (f'{what} is forbidden: User "{CONTROL_USER}" cannot {verb} resource "secrets" in API group "" '
                   f'in the namespace "{request.match_info["namespace"]}"')
        return web.json_response(_status(403, "Forbidden", message), status=403)

    async def _get_secret(self, request: web.Request) -> web.Response:
        self.secret_reads.append(request.match_info["name"])
        if (refused := self._forbidden(request, "get")) is not None:
            return refused
        found = self.secrets.get((request.match_info["namespace"], request.match_info["name"]))
        if found is None:
            return web.json_response(_status(404, "NotFound", "secret not found"), status=404)
        return web.json_response(found)

    async def _create_secret(self, request: web.Request) -> web.Response:
        if (refused := self._forbidden(request, "create")) is not None:
            return refused
        body = await request.json()
        key = (request.match_info["namespace"], body["metadata"]["name"])
        if key in self.secrets:
            return web.json_response(_status(409, "AlreadyExists", "secret already exists"), status=409)
        self.writes.append(f"create {key[1]}")
        self.secrets[key] = self._stamp(body)
        return web.json_response(body, status=201)

    async def _replace_secret(self, request: web.Request) -> web.Response:
        if (refused := self._forbidden(request, "update")) is not None:
            return refused
        body = await request.json()
        key = (request.match_info["namespace"], request.match_info["name"])
        current = self.secrets.get(key)
        if current is None:
            return web.json_response(_status(404, "NotFound", "secret not found"), status=404)
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return web.json_response(_status(409, "Conflict", "the object has been modified"), status=409)
        self.writes.append(f"replace {key[1]}")
        self.secrets[key] = self._stamp(body)
        return web.json_response(body)

    async def _get_configuration(self, request: web.Request) -> web.Response:
        found = self.webhook_configurations.get(request.match_info["name"])
        if found is None:
            return web.json_response(_status(404, "NotFound", "not found"), status=404)
        return web.json_response(found)

    async def _patch_configuration(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.webhook_configurations:
            return web.json_response(_status(404, "NotFound", "not found"), status=404)
        try:
            patched = jsonpatch.apply_patch(self.webhook_configurations[name], await request.json())
        except jsonpatch.JsonPatchTestFailed:
            return web.json_response(_status(422, "Invalid", "the test operation failed"), status=422)
        self.writes.append(f"patch {name}")
        self.webhook_configurations[name] = self._stamp(patched)
        return web.json_response(patched)
