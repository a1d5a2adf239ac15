"""The control plane's certificate endpoints (spec §5), added to its aiohttp application.

    POST /v1/certificates   {"csr": PEM, "token": CREDENTIAL}   (or `Authorization: Bearer CREDENTIAL`)
      200 {"spiffe_id": ID, "certificate_chain": PEM, "trust_bundle": PEM, "expires": UNIX_TIME}
      400 the body is not that JSON, or the CSR is malformed, badly signed or not ECDSA P-256
      401 no credential, or one that proves no identity
      403 the CSR asks for another identity than the credential proves
      503 the CA is not loaded yet, or the credential could not be checked now (API server
          unreachable): try again after `Retry-After` seconds
    GET /v1/trust-bundle    the trust anchor, PEM (503 while the CA is not loaded)

Every error answer is JSON `{"error": "..."}`. The credential is checked before the CSR is
read, so a caller without one learns nothing about what the CA would accept. Answers are
counted in `meshproxy_control_certificates_total{result}`, whether the CA is loaded is
`meshproxy_control_ca_ready` (1 or 0), and once it is, when its issuer and trust anchor end is
`meshproxy_control_issuer_expiry_timestamp_seconds` and
`meshproxy_control_trust_anchor_expiry_timestamp_seconds`: register the returned
CertificateCounts in the application's metrics registry.

In a cluster the CA comes from a Secret that may not be readable yet (RBAC, an API server that
is down): the routes then take a `CASlot`, which the set-up fills in later, and answer 503
until it does. Serving configuration does not wait for it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from meshproxy.identity.ca import DEFAULT_LIFETIME, CertificateAuthority
from meshproxy.identity.spiffe import CSRError, IdentityError, IdentityMismatch
from meshproxy.identity.tokens import VerifierUnavailable

log = logging.getLogger("meshproxy.control.ca")
RESULTS = ("issued", "bad_request", "unauthenticated", "forbidden", "unavailable", "error")
MAX_BODY = 65_536  # a CSR and a token fit many times over
PEM_TYPE = "application/x-pem-file"
NOT_READY_RETRY_AFTER = 5  # seconds; loading the CA is retried with a backoff of up to 30 s
UNAVAILABLE_RETRY_AFTER = 1  # seconds; a TokenReview that failed is usually a blip


@dataclass
class CASlot:
    """The CA the endpoints sign with once it is loaded; until then `problem` says why not."""

    ca: CertificateAuthority | None = None
    problem: str = "the CA has not been loaded yet"


@dataclass(eq=False)  # a collector is registered by identity: it must stay hashable
class CertificateCounts:
    """Answers of `POST /v1/certificates` by result, and whether the CA is loaded; a
    prometheus-client collector."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    slot: CASlot = field(default_factory=CASlot)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = CounterMetricFamily("meshproxy_control_certificates", "Certificate requests answered, by result",
                                     labels=["result"])
        for result, value in self.counts.items():
            family.add_metric([result], value)
        yield family
        ca = self.slot.ca
        yield GaugeMetricFamily("meshproxy_control_ca_ready", "1 once the CA is loaded and signs certificates",
                                value=1 if ca is not None else 0)
        # Read from the CA in force at scrape time, so a renewed issuer shows at once.
        if ca is not None:
            yield GaugeMetricFamily("meshproxy_control_issuer_expiry_timestamp_seconds",
                                    "When the issuer that signs certificates ends (unix seconds)",
                                    value=ca.issuer_expires)
            yield GaugeMetricFamily("meshproxy_control_trust_anchor_expiry_timestamp_seconds",
                                    "When the trust anchor (root) ends (unix seconds)", value=ca.root_expires)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _not_ready(slot: CASlot) -> web.Response:
    return _error(503, f"the control plane's CA is not ready yet: {slot.problem}",
                  **{"Retry-After": str(NOT_READY_RETRY_AFTER)})


def add_ca_routes(app: web.Application, ca: CertificateAuthority | CASlot,
                  verify: Callable[[str], Awaitable[str | None]], *,
                  lifetime: float = DEFAULT_LIFETIME) -> CertificateCounts:
    """Add `POST /v1/certificates` and `GET /v1/trust-bundle` to `app`: certificates signed by
    `ca` (or by the CA of the slot, once it holds one) for the identity `verify(token)`
    returns, valid `lifetime` seconds. Return the counters of the answers given."""
    slot = ca if isinstance(ca, CASlot) else CASlot(ca)
    counts = CertificateCounts(slot=slot)

    def answer(result: str, response: web.Response) -> web.Response:
        counts.counts[result] += 1
        return response

    async def certificates(request: web.Request) -> web.Response:
        ca = slot.ca
        if ca is None:
            return answer("unavailable", _not_ready(slot))
        # request.read() stops at the application's client_max_size (413 past it).
        raw = await request.read()
        if len(raw) > MAX_BODY:
            return answer("bad_request", _error(400, f"body over {MAX_BODY} bytes"))
        try:
            body = json.loads(raw or b"null")
        except ValueError:  # UnicodeDecodeError included
            body = None
        if not isinstance(body, dict):
            return answer("bad_request", _error(400, 'body must be JSON {"csr": PEM, "token": CREDENTIAL}'))
        token = body.get("token") or _bearer(request)
        if not isinstance(token, str) or not token:
            return answer("unauthenticated", _error(401, "no credential given", **{"WWW-Authenticate": "Bearer"}))
        try:
            identity = await verify(token)
        except VerifierUnavailable as exc:
            log.warning("cannot check a credential from %s: %s", request.remote, exc)
            return answer("unavailable", _error(503, f"the credential cannot be checked now: {exc}",
                                                **{"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}))
        if identity is None:
            return answer("unauthenticated", _error(401, "the credential proves no identity",
                                                    **{"WWW-Authenticate": "Bearer"}))
        csr = body.get("csr")
        if not isinstance(csr, str):
            return answer("bad_request", _error(400, '"csr" must be a PEM certificate signing request'))
        try:
            issued = ca.issue(csr.encode(), identity, lifetime)
        except CSRError as exc:
            return answer("bad_request", _error(400, str(exc)))
        except IdentityMismatch as exc:
            log.warning("refused a certificate to %s: %s", request.remote, exc)
            return answer("forbidden", _error(403, str(exc)))
        except IdentityError as exc:  # the CA cannot sign for what the verifier proved
            log.error("cannot sign for %s: %s", identity, exc)
            return answer("error", _error(500, str(exc)))
        log.info("issued a certificate for %s (serial %x) until %s to %s", identity, issued.serial,
                 datetime.fromtimestamp(issued.expires, timezone.utc).isoformat(), request.remote)
        return answer("issued", web.json_response({
            "spiffe_id": identity,
            "certificate_chain": issued.chain_pem.decode(),
            "trust_bundle": ca.trust_bundle().decode(),
            "expires": issued.expires,
        }))

    async def trust_bundle(request: web.Request) -> web.Response:
        ca = slot.ca
        if ca is None:
            return _not_ready(slot)
        return web.Response(body=ca.trust_bundle(), content_type=PEM_TYPE)

    app.router.add_post("/v1/certificates", certificates)
    app.router.add_get("/v1/trust-bundle", trust_bundle)
    return counts
