"""The proxy's certificate: asked of the control plane's CA, renewed before it expires (spec §5).

The proxy makes its own ECDSA P-256 key in memory (it never leaves the process), sends a CSR
with its credential to `POST /v1/certificates` (see meshproxy/control/ca_api.py) and keeps the
chain it gets back. `run()` renews at 70% of the certificate's lifetime, plus up to 5% of
jitter so proxies started together do not all renew at once; a failed renewal is retried with
exponential backoff and full jitter, and the certificate held stays in use meanwhile (at 70% of
24 h there are 7 hours to spare). Each new certificate goes to `on_rotate`, which makes new TLS
contexts (tls.ssl_contexts): open connections are not dropped.

A control plane answering 503 (its CA not loaded yet, or the credential not checkable now) is
retried like any failure, waiting at least the `Retry-After` it sends (capped at the backoff's
maximum), so proxies started together do not hammer a control plane that said when to come back.

With `expected_namespace` and `expected_service_account` (in Kubernetes, the pod's own, from
the downward API), a certificate for another identity is refused: a token of another
ServiceAccount mounted by mistake would otherwise make the proxy speak as that account.

The credential is read from `token_source` on every request: a projected ServiceAccount token
is rotated by the kubelet. The control plane is reached in plain HTTP in this version: the
credential is the proof of identity, and the trust bundle comes back with the certificate.

Plain asyncio and httptools rather than aiohttp, as in dataplane/control_client.py: the
sidecar does not load aiohttp at all (its memory is counted per pod).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Callable
from urllib.parse import urlsplit

import httptools

from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.spiffe import IdentityError, parse_spiffe_id
from meshproxy.identity.tls import Certificate, ssl_contexts

__all__ = ["Certificate", "CertificateError", "CertificateManager", "renewal_time",
           "ssl_contexts"]

log = logging.getLogger("meshproxy.proxy.identity")
RENEW_AT = 0.7  # of the lifetime (spec §5)
RENEW_JITTER = 0.05  # of the lifetime, at most, added to RENEW_AT
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 10.0
MAX_RESPONSE = 1_048_576
MAX_SLEEP = 60.0  # re-read the clock at least this often: the wall clock may jump
DEFAULT_CONTROL_PORT = 15010


class CertificateError(Exception):
    """No certificate was obtained: the control plane is unreachable or refused the request.
    `retry_after` is the wait in seconds the control plane asked for, if it did."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """Seconds of a `Retry-After` header in its delay-seconds form (RFC 9110 §10.2.3), else None."""
    # isascii: str.isdigit() also accepts digits such as "²" that float() refuses.
    text = value.strip() if value is not None else ""
    return float(text) if text.isascii() and text.isdigit() else None


def renewal_time(received: float, expires: float, rng: random.Random, *, at: float = RENEW_AT,
                 jitter: float = RENEW_JITTER) -> float:
    """Return when to renew a certificate received at `received` that expires at `expires`
    (unix seconds): `at` of the way through, plus up to `jitter` of the lifetime."""
    span = max(0.0, expires - received)
    return received + span * (at + rng.uniform(0.0, jitter))


def certificates_target(url: str) -> tuple[str, int, str]:
    """Return (host, port, request target) of `POST /v1/certificates` at control-plane `url`;
    raises ValueError for a URL that is not `http://HOST[:PORT][/PREFIX]`."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"control-plane URL must be http://HOST[:PORT], got {url!r}")
    return parts.hostname, parts.port or DEFAULT_CONTROL_PORT, parts.path.rstrip("/") + "/v1/certificates"


class _Response:
    """httptools callbacks collecting one response: status and body."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status: int | None = None
        self.body = bytearray()
        self.complete = False
        self.retry_after: str | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body += body  # the caller checks the size after each feed

    def on_message_complete(self) -> None:
        self.complete = True


class CertificateManager:
    """Holds the proxy's certificate from the control plane at `control_url` and renews it."""

    def __init__(self, control_url: str, token_source: Callable[[], str], *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 on_rotate: Callable[[Certificate], None] | None = None, expected_id: str | None = None,
                 expected_namespace: str | None = None, expected_service_account: str | None = None,
                 backoff_base: float = BACKOFF_BASE, backoff_max: float = BACKOFF_MAX,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        """`expected_id`: the whole SPIFFE ID the certificate must carry (asked for in the CSR);
        `expected_namespace`, `expected_service_account`: the parts of it that must match when
        the trust domain is not known (each checked when given, e.g. from MESHPROXY_NAMESPACE
        and MESHPROXY_SERVICE_ACCOUNT)."""
        self.target = certificates_target(control_url)  # a bad URL is refused at start
        self.control_url = control_url
        self.token_source = token_source
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_rotate = on_rotate
        self.expected_id = expected_id
        self.expected_namespace = expected_namespace or None
        self.expected_service_account = expected_service_account or None
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.renewals = 0
        self.failures = 0
        self._current: Certificate | None = None
        self._renew_at = 0.0

    @property
    def current(self) -> Certificate | None:
        """The certificate in use (key, chain, trust bundle, SPIFFE ID, expiry), or None yet."""
        return self._current

    @property
    def renew_at(self) -> float:
        """Unix time at which the current certificate is due for renewal (0 without one)."""
        return self._renew_at

    async def ensure(self) -> Certificate:
        """Return the current certificate when it is not yet due for renewal, else a new one
        (see `renew`). Raises CertificateError when a new one is needed and cannot be had."""
        if self._current is not None and self.clock() < self._renew_at:
            return self._current
        return await self.renew()

    async def renew(self) -> Certificate:
        """Make a new key and CSR, have it signed, make the result current, pass it to
        `on_rotate` and return it. Raises CertificateError when the control plane cannot be
        reached or refuses (the certificate held, if any, stays current)."""
        key = new_key()
        try:
            token = self.token_source()
        except OSError as exc:  # a token file not mounted yet, say: retried like any failure
            raise CertificateError(f"cannot read the credential: {exc}") from None
        payload = json.dumps({"csr": make_csr(key, self.expected_id).decode(), "token": token}).encode()
        try:
            status, body, retry_after = await self._post(payload)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            raise CertificateError(f"control plane {self.control_url}: {exc or type(exc).__name__}") from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status != 200 or not isinstance(answer, dict):
            reason = answer.get("error") if isinstance(answer, dict) else body[:200].decode("utf-8", "replace")
            raise CertificateError(f"control plane {self.control_url} answered {status}: {reason}",
                                   _retry_after(retry_after) if status in (429, 503) else None)
        try:
            cert = Certificate.from_chain(key, str(answer["certificate_chain"]).encode(),
                                          str(answer["trust_bundle"]).encode(), self.clock())
        except (KeyError, IdentityError) as exc:
            raise CertificateError(f"control plane {self.control_url}: unusable answer: {exc}") from None
        if self.expected_id is not None and cert.spiffe_id != self.expected_id:
            raise CertificateError(f"certificate issued for {cert.spiffe_id}, not {self.expected_id}")
        self._check_account(cert.spiffe_id)
        self._current = cert
        self._renew_at = renewal_time(cert.received, cert.expires, self.rng)
        self.renewals += 1
        log.info("certificate for %s until %s, renewing in %.0fs", cert.spiffe_id,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.expires)), self._renew_at - cert.received)
        if self.on_rotate is not None:
            try:
                self.on_rotate(cert)
            except Exception:  # one bad callback must not stop the renewals
                log.exception("installing the new certificate failed")
        return cert

    def _check_account(self, spiffe_id: str) -> None:
        """Raise CertificateError when `spiffe_id` is not of the expected namespace and
        service account (those given)."""
        if self.expected_namespace is None and self.expected_service_account is None:
            return
        try:
            _, namespace, account = parse_spiffe_id(spiffe_id)
        except IdentityError as exc:
            raise CertificateError(f"certificate issued for {spiffe_id}: {exc}") from None
        if (self.expected_namespace or namespace, self.expected_service_account or account) == (namespace, account):
            return
        expected = f"ns/{self.expected_namespace or '*'}/sa/{self.expected_service_account or '*'}"
        raise CertificateError(
            f"certificate issued for {spiffe_id}, but this proxy runs as {expected}: refused. The "
            "credential it presents (its token file) belongs to another ServiceAccount; mount "
            "the pod's own projected token")

    async def run(self) -> None:
        """Keep a certificate: get one, renew it when due, retry with backoff after a failure;
        cancel to stop."""
        attempts = 0
        while True:
            now = self.clock()
            if self._current is not None and now < self._renew_at:
                await asyncio.sleep(min(self._renew_at - now, MAX_SLEEP))
                continue
            try:
                await self.renew()
                attempts = 0
                continue
            except CertificateError as exc:
                attempts += 1
                self.failures += 1
                delay = self.retry_delay(attempts, exc.retry_after)
                cert = self._current
                if cert is not None and cert.valid_at(self.clock()):
                    log.warning("renewing the certificate failed (%s); the one held is valid %.0fs more; "
                                "retrying in %.1fs", exc, cert.expires - self.clock(), delay)
                else:
                    log.error("no valid certificate: %s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)

    def retry_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Return the wait before attempt `attempts + 1`: full jitter over an exponential
        backoff, but at least `retry_after` (the control plane's; capped at `backoff_max`)."""
        # The exponent is capped: 2 ** 1100 no longer converts to a float (hours of outage).
        delay = self.rng.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** min(attempts, 30)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    async def _post(self, payload: bytes) -> tuple[int, bytes, str | None]:
        """POST `payload` to the certificates endpoint; return (status, body, Retry-After)."""
        host, port, path = self.target
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            response = _Response()
            async with asyncio.timeout(self.timeout):
                while not response.complete:
                    data = await reader.read(65_536)
                    if not data:
                        raise CertificateError("the control plane closed the connection mid-answer")
                    response.parser.feed_data(data)
                    if len(response.body) > MAX_RESPONSE:
                        raise CertificateError(f"the control plane's answer is over {MAX_RESPONSE} bytes")
            return response.status or 0, bytes(response.body), response.retry_after
        finally:
            writer.close()
