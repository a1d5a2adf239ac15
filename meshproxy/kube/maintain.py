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
BUNDLE_EVERY = 60.0  # the caBundle alone, between rounds


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
                   backoff_max: float = BACKOFF_MAX, bundle_every: float = BUNDLE_EVERY) -> None:
    """Run the module's steps for as long as the control plane runs (cancel to stop; it never
    returns otherwise): read or create the CA until that works and hand it to `on_ca` (until
    then each failure goes to `on_problem`, for the certificate endpoint to tell callers);
    then keep the issuer, the webhook's certificate and caBundle current, every
    `recheck_every` seconds (±10%, from `rng`), handing each issuer newly in force to `on_ca`,
    and the caBundle alone every `bundle_every` seconds between. Failures are retried with
    capped, fully jittered exponential backoff, each step on its own."""
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
    # Each step on its own: one that keeps failing (an immutable Secret, a root key that does
    # not match) must not hold back the others. The caBundle is also looked at every
    # `bundle_every` seconds between rounds (one GET): a webhook configuration applied again
    # (kubectl apply -k, a GitOps sync) loses it, and until it is back every new pod starts
    # without a sidecar, silently (failurePolicy: Ignore).
    steps = [
        ("the issuer", ca_secret, lambda ca: ensure_issuer(core, names, ca, clock)),
        ("the webhook's certificate", f"Secret {names.namespace}/{names.webhook_secret}",
         lambda ca: ensure_webhook_certificate(core, ca, names)),
        ("the caBundle", f"MutatingWebhookConfiguration {names.webhook_configuration}",
         lambda ca: ensure_ca_bundle(admission, ca, names)),
    ]
    step_failures: dict[str, int] = {}
    complaints = {what: _Complaints(time.monotonic, REPEAT_COMPLAINT_AFTER) for what, _, _ in steps}
    loop = asyncio.get_running_loop()
    next_round = loop.time()
    while True:
        now = loop.time()
        if now >= next_round:
            wait = recheck_every * rng.uniform(1 - RECHECK_JITTER, 1 + RECHECK_JITTER)
            for what, where, step in steps:
                try:
                    result = await step(ca)
                except Exception as exc:  # API errors, RBAC, an unusable Secret: all retried
                    step_failures[what] = step_failures.get(what, 0) + 1
                    delay = backoff(step_failures[what])
                    wait = min(wait, delay)
                    complaints[what](f"cannot keep {what} ({where}) current: {describe_failure(exc)}", delay)
                    continue
                if step_failures.pop(what, 0):
                    complaints[what].resolved(f"keeping {what} current")
                if isinstance(result, CertificateAuthority) and result is not ca:
                    ca = result
                    on_ca(ca)
                    log.info("the issuer in force is now %s", describe(ca.issuer))
            next_round = loop.time() + wait
        else:
            try:
                await ensure_ca_bundle(admission, ca, names, quiet_when_missing=True)
            except Exception as exc:
                log.debug("looking at the caBundle: %s", describe_failure(exc))  # the rounds say it
        await asyncio.sleep(max(0.0, min(bundle_every, next_round - loop.time())))
