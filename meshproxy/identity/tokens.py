"""Credentials a proxy presents with its CSR, and how the control plane checks them (spec §5).

Each checker has `async verify(token) -> SPIFFE ID | None`: the identity the token proves, or
None when it proves nothing. That is the `verify` the certificate endpoint takes
(meshproxy/control/ca_api.py).

- `BootstrapTokens`, outside Kubernetes (`meshproxy up`): one random token per identity, in a
  file only its owner can read (`STATE_DIR/tokens/NAMESPACE.SERVICE.token`, 0600, folder 0700).
  Whoever can read the file can be that service: the same trust a ServiceAccount token
  mounted into a pod gets.
- `TokenReviewer`, in Kubernetes: the pod's projected ServiceAccount token (audience
  `meshproxy`), checked by the API server with a TokenReview.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

from meshproxy.identity.spiffe import IdentityError, check_trust_domain, spiffe_id

log = logging.getLogger("meshproxy.identity")
TOKEN_BYTES = 32
TOKEN_SUFFIX = ".token"
AUDIENCE = "meshproxy"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class VerifierUnavailable(Exception):
    """The credential could not be checked (the API server is unreachable, or refuses the
    control plane): neither a yes nor a no, so the caller should try again later."""


def _digest(token: str) -> bytes:
    # Compare fixed-length digests: the time taken then says nothing about the token's length.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class BootstrapTokens:
    """One bootstrap token per SPIFFE ID, kept in `folder` (one file per identity)."""

    def __init__(self, folder: str | os.PathLike, trust_domain: str, *,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.folder = Path(folder)
        self.trust_domain = check_trust_domain(trust_domain)
        self.random_bytes = random_bytes
        self._digests: dict[str, bytes] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike, trust_domain: str) -> "BootstrapTokens":
        """Return the tokens already written to `folder` (by another process, such as
        `meshproxy up` for the control plane it starts). Raises IdentityError for a token
        file whose name is not NAMESPACE.SERVICE.token, OSError when the folder cannot be read."""
        tokens = cls(folder, trust_domain)
        for path in sorted(tokens.folder.glob("*" + TOKEN_SUFFIX)):
            namespace, dot, service = path.name[: -len(TOKEN_SUFFIX)].partition(".")
            if not dot:
                raise IdentityError(f"{path}: a token file is named NAMESPACE.SERVICE{TOKEN_SUFFIX}")
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                log.warning("%s is readable by others: chmod 600 it", path)
            tokens._digests[spiffe_id(trust_domain, namespace, service)] = _digest(path.read_text().strip())
        return tokens

    def path(self, namespace: str, service: str) -> Path:
        """Return the file that holds (or will hold) the token of `service` in `namespace`."""
        return self.folder / f"{namespace}.{service}{TOKEN_SUFFIX}"

    def issue(self, namespace: str, service: str) -> Path:
        """Make sure `service` in `namespace` has a token; return its file (0600, in a 0700
        folder). An identity keeps the token it has: instances of one service share it.
        Raises IdentityError for a name a SPIFFE ID cannot hold, OSError when the file cannot
        be written."""
        identity = spiffe_id(self.trust_domain, namespace, service)
        path = self.path(namespace, service)
        if identity in self._digests and path.exists():
            return path
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        token = self.random_bytes(TOKEN_BYTES).hex()
        # Created 0600 rather than narrowed afterwards: never readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, token.encode())
        finally:
            os.close(fd)
        self._digests[identity] = _digest(token)
        return path

    def identities(self) -> list[str]:
        """Return the SPIFFE IDs that have a token, sorted."""
        return sorted(self._digests)

    def check(self, token: str) -> str | None:
        """Return the SPIFFE ID `token` proves, or None.

        Constant time with respect to the token: every known digest is compared, with
        `hmac.compare_digest`, whether or not an earlier one matched."""
        presented = _digest(token or "")
        found = None
        for identity, digest in self._digests.items():
            if hmac.compare_digest(presented, digest) and token:
                found = identity
        return found

    async def verify(self, token: str) -> str | None:
        """`check` as the certificate endpoint calls it."""
        return self.check(token)


class TokenReviewer:
    """Checks projected ServiceAccount tokens with the API server (TokenReview,
    `authentication.k8s.io/v1`); `api_client` is a kubernetes_asyncio ApiClient."""

    def __init__(self, api_client: Any, trust_domain: str, *, audience: str = AUDIENCE,
                 timeout: float = 5.0) -> None:
        import aiohttp  # kubernetes_asyncio's transport, whose errors mean "could not ask"
        from kubernetes_asyncio import client  # optional dependency: only in a cluster

        self._client = client
        self._transport_errors = (OSError, TimeoutError, aiohttp.ClientError)
        self.api = client.AuthenticationV1Api(api_client)
        self.trust_domain = check_trust_domain(trust_domain)
        self.audience = audience
        self.timeout = timeout

    async def verify(self, token: str) -> str | None:
        """Return `spiffe://TD/ns/NS/sa/SA` when the API server authenticates `token` as
        ServiceAccount SA of namespace NS for the `meshproxy` audience, else None.

        Raises VerifierUnavailable when the API server cannot be asked or refuses the
        question (no RBAC for tokenreviews, an error status)."""
        if not token:
            return None
        client = self._client
        body = client.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                    spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            review = await self.api.create_token_review(body, _request_timeout=self.timeout)
        except client.ApiException as exc:
            raise VerifierUnavailable(f"TokenReview answered {exc.status} {exc.reason}") from None
        except self._transport_errors as exc:
            raise VerifierUnavailable(f"TokenReview failed: {exc or type(exc).__name__}") from None
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return None
        # An API server that is not audience-aware answers with no audiences, meaning "valid
        # for the API server itself": such a token (a pod's default one, say) was not meant
        # for the mesh, so it proves nothing here.
        if self.audience not in (status.audiences or []):
            log.info("TokenReview: token of %s is not for audience %s", status.user.username, self.audience)
            return None
        return service_account_id(self.trust_domain, status.user.username or "")


def service_account_id(trust_domain: str, username: str) -> str | None:
    """Return the SPIFFE ID of a ServiceAccount's username (`system:serviceaccount:NS:SA` ->
    `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`), or None for any other user."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace, colon, account = username[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
    if not colon:
        return None
    try:
        return spiffe_id(trust_domain, namespace, account)
    except IdentityError:
        return None
