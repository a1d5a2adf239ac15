"""Fuzz target: `POST /v1/certificates` of the control plane's CA (meshproxy/control/ca_api.py),
the handler itself, with bootstrap tokens as the credential check (identity/tokens.py) and the
CSR checks of the CA (identity/csr.py, identity/ca.py).

Input: the first byte chooses the Authorization header (none, Bearer with the token of
default/web, of default/api, or a wrong one); the rest is the request body when it begins with
`{`, else a CSR in DER, sent as `{"csr": PEM}`, so that mutations reach the DER parser rather
than break the base64 around it.

Invariants, whatever the bytes:
- the handler answers, never raises; 200, or 400 / 401 / 403 with a JSON `{"error": ...}`;
- the credential is checked before the CSR: without one that proves an identity, 401 (or 400
  for a body that is not a JSON object) whatever the CSR;
- a certificate is only ever issued for the identity the credential proves, to the key of a
  CSR whose signature verifies, chained to the CA's issuer;
- a ServiceAccount username maps to a SPIFFE ID made of its own parts, or to none.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import shutil
import tempfile

from aiohttp import web
from cryptography import x509
from multidict import CIMultiDict

from fuzz.targets._support import run_to_completion
from meshproxy.control.ca_api import add_ca_routes
from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.csr import read_csr, uri_sans
from meshproxy.identity.spiffe import parse_spiffe_id
from meshproxy.identity.tokens import SERVICE_ACCOUNT_PREFIX, BootstrapTokens, service_account_id

TRUST_DOMAIN = "cluster.local"
NOW = 1_750_000_000.0  # a fixed clock: the same input always gets the same answer
WRONG_TOKEN = "0" * 64


def _token_bytes():
    """Tokens from a counter instead of the random source: default/web gets 01 01 ..., default/api
    02 02 ... (fuzz/seed.py writes them into the seeds)."""
    counter = iter(range(1, 256))
    return lambda n: bytes([next(counter)]) * n


_FOLDER = tempfile.mkdtemp(prefix="meshproxy-fuzz-ca-")
atexit.register(shutil.rmtree, _FOLDER, True)
TOKENS = BootstrapTokens(_FOLDER, TRUST_DOMAIN, random_bytes=_token_bytes())
WEB_TOKEN = TOKENS.issue("default", "web").read_text()
API_TOKEN = TOKENS.issue("default", "api").read_text()
CA = CertificateAuthority.in_memory(TRUST_DOMAIN, clock=lambda: NOW)
_APP = web.Application()
COUNTS = add_ca_routes(_APP, CA, TOKENS.verify)
HANDLER = next(r.handler for r in _APP.router.routes()
               if r.method == "POST" and r.resource.canonical == "/v1/certificates")
HEADERS = (None, "Bearer " + WEB_TOKEN, "Bearer " + API_TOKEN, "Bearer " + WRONG_TOKEN)


class FakeRequest:
    """What the handler reads of an aiohttp request: the body, the headers, the peer."""

    def __init__(self, body: bytes, authorization: str | None) -> None:
        self.body = body
        self.headers: CIMultiDict[str] = CIMultiDict()
        if authorization is not None:
            self.headers["Authorization"] = authorization
        self.remote = "192.0.2.1"

    async def read(self) -> bytes:
        return self.body


def request_of(data: bytes) -> tuple[bytes, str | None]:
    """The body and Authorization header that `data` stands for (see the module docstring)."""
    authorization = HEADERS[data[0] & 3] if data else None
    rest = data[1:]
    if rest[:1] == b"{":
        return rest, authorization
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(rest)
           + b"-----END CERTIFICATE REQUEST-----\n")
    return json.dumps({"csr": pem.decode("ascii")}).encode(), authorization


def proved(body: bytes, authorization: str | None) -> str | None:
    """The identity the credential in this request proves, found independently of the handler."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    token = parsed.get("token") or (authorization or "").partition(" ")[2].strip()
    return TOKENS.check(token) if isinstance(token, str) else None


def check_username(text: str) -> None:
    identity = service_account_id(TRUST_DOMAIN, text)
    if identity is not None:
        trust_domain, namespace, account = parse_spiffe_id(identity)
        assert trust_domain == TRUST_DOMAIN
        assert text == f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{account}", (text, identity)


def TestOneInput(data: bytes) -> None:
    body, authorization = request_of(data)
    check_username(body.decode("utf-8", "replace"))
    before = sum(COUNTS.counts.values())
    logging.disable(logging.CRITICAL)  # the handler logs every refusal: not wanted per input
    try:
        response = run_to_completion(HANDLER(FakeRequest(body, authorization)))
    finally:
        logging.disable(logging.NOTSET)
    assert sum(COUNTS.counts.values()) == before + 1, "an answer not counted once"
    status = response.status
    answer = json.loads(response.body)
    identity = proved(body, authorization)
    if status != 200:
        assert status in (400, 401, 403), status
        assert isinstance(answer, dict) and list(answer) == ["error"] and isinstance(answer["error"], str)
        if identity is None:
            assert status in (400, 401), f"{status} before the credential was checked"
        if status == 403:
            assert identity is not None
        return
    assert identity is not None and answer["spiffe_id"] == identity, (identity, answer["spiffe_id"])
    csr = read_csr(json.loads(body)["csr"].encode())  # raises CSRError if it did not verify
    leaf, issuer = x509.load_pem_x509_certificates(answer["certificate_chain"].encode())
    assert uri_sans(leaf) == [identity], uri_sans(leaf)
    assert leaf.public_key() == csr.public_key(), "a certificate for another key"
    assert issuer == CA.issuer
    leaf.verify_directly_issued_by(issuer)
    assert answer["trust_bundle"].encode() == CA.trust_bundle()

