"""A stand-in for the Kubernetes API server's TokenReview endpoint, at the HTTP boundary.

No Kubernetes API server runs on the test machines, so this one answers
`POST /apis/authentication.k8s.io/v1/tokenreviews` the way the real one does for bound
ServiceAccount tokens:

- a known token whose audiences meet the review's `spec.audiences` is authenticated, with
  `status.audiences` the audiences they share and `status.user` the ServiceAccount's
  username, uid and groups;
- an unknown token, or one bound to other audiences, gets `authenticated: false` and an
  `error` (HTTP 201 all the same: the review was created, its answer is no);
- `audience_aware = False` answers as an authenticator that ignores audiences does:
  authenticated, with no `status.audiences`;
- `forbidden = True` answers 403 with a Status, as when the caller has no RBAC grant for
  `tokenreviews`.

Every review received is kept in `reviews` (the body and the caller's Authorization header).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass
class BoundToken:
    username: str
    audiences: list[str] = field(default_factory=lambda: [API_AUDIENCE])
    uid: str = "0000-sa"
    groups: list[str] = field(default_factory=list)


class FakeTokenReviewAPI:
    """The fake API server; `add_token` makes tokens it will recognise."""

    def __init__(self) -> None:
        self.tokens: dict[str, BoundToken] = {}
        self.reviews: list[tuple[dict, str | None]] = []
        self.audience_aware = True
        self.forbidden = False
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_token(self, token: str, namespace: str, service_account: str,
                  audiences: list[str] | None = None) -> None:
        """Recognise `token` as ServiceAccount `service_account` of `namespace`, bound to
        `audiences` (the API server's own by default)."""
        username = f"system:serviceaccount:{namespace}:{service_account}"
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
        self.tokens[token] = BoundToken(username, audiences or [API_AUDIENCE], groups=groups)

    def add_user_token(self, token: str, username: str, audiences: list[str] | None = None) -> None:
        """Recognise `token` as a user that is not a ServiceAccount, bound to `audiences`."""
        self.tokens[token] = BoundToken(username, audiences or [API_AUDIENCE], groups=["system:authenticated"])

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(PATH, self._review)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _review(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.reviews.append((body, request.headers.get("Authorization")))
        if self.forbidden:
            return web.json_response({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": 'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:'
                           'meshproxy-system:meshproxy" cannot create resource "tokenreviews"',
                "reason": "Forbidden", "code": 403}, status=403)
        spec = body.get("spec") or {}
        wanted = spec.get("audiences") or [API_AUDIENCE]
        bound = self.tokens.get(spec.get("token", ""))
        status: dict = {"user": {}}
        if bound is None:
            status.update(authenticated=False, error="[invalid bearer token, token lookup failed]")
        elif not self.audience_aware:
            status.update(authenticated=True, user={"username": bound.username, "uid": bound.uid,
                                                    "groups": bound.groups})
        elif shared := [a for a in wanted if a in bound.audiences]:
            status.update(authenticated=True, audiences=shared,
                          user={"username": bound.username, "uid": bound.uid, "groups": bound.groups})
        else:
            status.update(authenticated=False,
                          error="[invalid bearer token, token audiences %s is invalid for the target audiences %s]"
                          % (bound.audiences, wanted))
        return web.json_response({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None}, "spec": spec, "status": status},
                                 status=201)
