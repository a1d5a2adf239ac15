"""Keeping the cluster's side of the mesh current while the control plane runs (kube/bootstrap.py
has the steps).

`maintain` is how the control plane runs them: in the background, so that configuration is
served while the CA cannot be had yet (an RBAC rule missing, the API server down); step 1 until
it works, then the issuer's renewal and steps 2 and 3 at once and again every `RECHECK_EVERY`
(so a control plane that runs for a year renews the issuer and the webhook's certificate before
they end). Each round every replica loads the issuer the Secret holds when it is not the one in
use, so all of them sign with a renewed issuer within one recheck period. Failures are retried
with backoff and logged, the same complaint at most once a minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, Callable

from meshproxy.identity.ca import CertificateAuthority, describe
from meshproxy.kube.bootstrap import Names, ensure_ca, ensure_ca_bundle, ensure_issuer, ensure_webhook_certificate

log = logging.getLogger("meshproxy.control.bootstrap")

# Steps 2 and 3 again this often (each ±RECHECK_JITTER, so replicas do not keep in step): two
# reads when nothing is due; far inside RENEW_BEFORE, so a certificate is renewed in time.
RECHECK_EVERY = 12 * 3600.0
RECHECK_JITTER = 0.1
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
REPEAT_COMPLAINT_AFTER = 60.0  # seconds before the same failure is logged again


def describe_failure(exc: BaseException) -> str:
    """A one-line account of why a step failed: the API server's message for an API error
    (with a hint for 403, which means an RBAC grant is missing), else the exception."""
    from kubernetes_asyncio.client.exceptions import ApiException

    if not isinstance(exc, ApiException):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    message = ""
    try:
        status = json.loads(exc.body) if exc.body else None
        message = status.get("message", "") if isinstance(status, dict) else ""
    except (ValueError, TypeError):
        pass
    text = f"HTTP {exc.status} {(exc.reason or '').strip()}" + (f": {message}" if message else "")
    if exc.status == 403:
        text += " (the control plane's ServiceAccount lacks an RBAC grant: see deploy/rbac.yaml)"
    return text


class _Complaints:
    """Logs failures, the same one at most once per `every` seconds (a missing RBAC grant
    fails the same way on every retry until someone fixes it)."""

    def __init__(self, clock: Callable[[], float], every: float) -> None:
        self.clock = clock
        self.every = every
        self._last: tuple[str, float] | None = None

    def __call__(self, text: str, retry_in: float) -> None:
        now = self.clock()
        if self._last is not None and self._last[0] == text and now - self._last[1] < self.every:
            log.debug("%s; retrying in %.1fs", text, retry_in)
            return
        self._last = (text, now)
        log.warning("%s; retrying in %.1fs", text, retry_in)

    def resolved(self, what: str) -> None:
        if self._last is not None:
            log.info("%s now works", what)
        self._last = None


async def maintain(api_client: Any, *, trust_domain: str, on_ca: Callable[[CertificateAuthority], None],
                   on_problem: Callable[[str], None] | None = None, names: Names = Names(),
                   rng: random.Random | None = None, clock: Callable[[], float] = time.time,
                   recheck_every: float = RECHECK_EVERY, backoff_base: float = BACKOFF_BASE,
                   backoff_max: float = BACKOFF_MAX) -> None:
    """Run the module's steps for as long as the control plane runs (cancel to stop; it never
    returns otherwise): read or create the CA until that works and hand it to `on_ca` (until
    then each failure goes to `on_problem`, for the certificate endpoint to tell callers);
    then keep the issuer, the webhook's certificate and caBundle current, every
    `recheck_every` seconds (±10%, from `rng`), handing each issuer newly in force to `on_ca`. Failures are retried with capped, fully jittered exponential backoff."""
    from kubernetes_asyncio import client

    rng = rng or random.Random()
    core = client.CoreV1Api(api_client)
    admission = client.AdmissionregistrationV1Api(api_client)
    ca_secret = f"Secret {names.namespace}/{names.ca_secret}"
    complain = _Complaints(time.monotonic, REPEAT_COMPLAINT_AFTER)

    def backoff(failures: int) -> float:
        return rng.uniform(0, min(backoff_max, backoff_base * 2 ** min(failures - 1, 30)))

    failures = 0
    while True:
        try:
            ca = await ensure_ca(core, names, trust_domain, clock)
            break
        except Exception as exc:  # API errors, RBAC, an unusable Secret: all retried
            failures += 1
            problem = f"cannot read or create the CA ({ca_secret}): {describe_failure(exc)}"
            if on_problem is not None:
                on_problem(problem)
            delay = backoff(failures)
            complain(problem, delay)
            await asyncio.sleep(delay)
    complain.resolved(f"reading the CA from {ca_secret}")
    on_ca(ca)
    log.info("the CA (trust domain %s) is loaded from %s; issuer %s", ca.trust_domain, ca_secret,
             describe(ca.issuer))
    failures = 0
    while True:
        try:
            current = await ensure_issuer(core, names, ca, clock)
            if current is not ca:
                ca = current
                on_ca(ca)
                log.info("the issuer in force is now %s", describe(ca.issuer))
            await ensure_webhook_certificate(core, ca, names)
            await ensure_ca_bundle(admission, ca, names)
        except Exception as exc:
            failures += 1
            delay = backoff(failures)
            complain(f"cannot keep the issuer ({ca_secret}), the webhook's certificate "
                     f"({names.namespace}/{names.webhook_secret}) or caBundle ({names.webhook_configuration}) "
                     f"current: {describe_failure(exc)}", delay)
            await asyncio.sleep(delay)
            continue
        if failures:
            complain.resolved("keeping the issuer, the webhook's certificate and caBundle current")
        failures = 0
        await asyncio.sleep(recheck_every * rng.uniform(1 - RECHECK_JITTER, 1 + RECHECK_JITTER))
