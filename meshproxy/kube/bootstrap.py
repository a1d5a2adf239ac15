"""What the control plane makes on its first start in a cluster (spec §7), so that one
`kubectl apply -k deploy/` installs the mesh with no secret in the manifests:

1. the Secret `meshproxy-ca` (trust anchor and issuer, the files `meshproxy ca init` writes),
   unless it exists: an existing CA is used as it is, never replaced, and one that cannot be
   read is an error (replacing it would cut every proxy off from every other). Only its issuer
   is ever renewed (`ensure_issuer`): a new one from the same root once the old one is due
   (meshproxy.identity.ca.issuer_renewal_due), which changes nothing for the proxies;
2. the Secret `meshproxy-webhook-tls` (kubernetes.io/tls): the webhook's serving certificate,
   signed by the issuer in force, made again when it is missing, from another issuer (of
   another CA, or the one a renewal replaced), for other names, or within `RENEW_BEFORE` of its
   end. A certificate from the replaced issuer would stay valid (same root), but it is made
   again at once: it then gets a full lifetime instead of ending with the old issuer, and
   nothing keeps depending on a key that was retired, perhaps because it leaked;
3. the trust anchor as `caBundle` of the MutatingWebhookConfiguration's webhooks that call the
   webhook Service (a configuration not installed is logged and skipped).

Every step is safe to run from several replicas at once and again at any time: creation
races end in 409 Conflict for all but one, which then read what the winner wrote; updates carry
the resourceVersion they were based on, so the loser of a race reads again instead of writing
over the winner.

The control plane runs them in the background and again every 12 hours: kube/maintain.py.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshproxy.identity.ca import (
    ISSUER_CERT,
    ISSUER_KEY,
    ROOT_CERT,
    ROOT_KEY,
    CertificateAuthority,
    _make_ca,
    describe,
    issuer_renewal_due,
    renew_issuer_pem,
    trust_anchor_ending,
)
from meshproxy.identity.csr import key_pem
from meshproxy.identity.spiffe import IdentityError
from meshproxy.kube.certs import issue_serving_certificate, service_dns_names

log = logging.getLogger("meshproxy.control.bootstrap")

CA_SECRET = "meshproxy-ca"
WEBHOOK_SECRET = "meshproxy-webhook-tls"
WEBHOOK_SERVICE = "meshproxy-webhook"
WEBHOOK_CONFIGURATION = "meshproxy-injector"
SYSTEM_NAMESPACE = "meshproxy-system"
RENEW_BEFORE = 30 * 86400.0  # a serving certificate this close to its end is made anew
_ATTEMPTS = 5  # conflicts in a row before giving up (each one means another replica wrote)


@dataclass(frozen=True)
class Names:
    """Where the installation's objects are (deploy/ uses the defaults)."""

    namespace: str = SYSTEM_NAMESPACE
    ca_secret: str = CA_SECRET
    webhook_secret: str = WEBHOOK_SECRET
    webhook_service: str = WEBHOOK_SERVICE
    webhook_configuration: str = WEBHOOK_CONFIGURATION


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _data(secret: Any) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _secret(name: str, namespace: str, data: dict[str, bytes], type_: str = "Opaque",
            resource_version: str | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/part-of": "meshproxy"}}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": type_,
            "data": {k: _b64(v) for k, v in data.items()}}


def new_ca_files(trust_domain: str, now: float) -> dict[str, bytes]:
    """Return a new trust anchor and issuer as the four files `meshproxy ca init` writes."""
    root, root_key, issuer, issuer_key = _make_ca(trust_domain, now)
    pem = serialization.Encoding.PEM
    return {ROOT_CERT: root.public_bytes(pem), ROOT_KEY: key_pem(root_key),
            ISSUER_CERT: issuer.public_bytes(pem), ISSUER_KEY: key_pem(issuer_key)}


async def _read(call, *args) -> Any | None:
    """The object, or None on 404."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        return await call(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _conflict(exc: Exception) -> bool:
    from kubernetes_asyncio.client.exceptions import ApiException

    return isinstance(exc, ApiException) and exc.status == 409


async def ensure_ca(core: Any, names: Names, trust_domain: str, clock: Callable[[], float]) -> CertificateAuthority:
    """Return the CA of the Secret, creating the Secret first when it does not exist.

    Raises IdentityError when the Secret exists but does not hold a usable CA (it is left as
    it is), ApiException for API errors other than a lost creation race."""
    for _ in range(_ATTEMPTS):
        secret = await _read(core.read_namespaced_secret, names.ca_secret, names.namespace)
        if secret is not None:
            data = _data(secret)
            missing = [k for k in (ROOT_CERT, ISSUER_CERT, ISSUER_KEY) if k not in data]
            if missing:
                raise IdentityError(f"Secret {names.namespace}/{names.ca_secret} has no {', '.join(missing)}; "
                                    "it is left as it is: fix or delete it")
            return CertificateAuthority.from_pem(data[ROOT_CERT], data[ISSUER_CERT], data[ISSUER_KEY], clock=clock)
        files = new_ca_files(trust_domain, clock())
        try:
            await core.create_namespaced_secret(names.namespace, _secret(names.ca_secret, names.namespace, files))
            log.info("created the mesh's CA (trust domain %s) in Secret %s/%s", trust_domain, names.namespace,
                     names.ca_secret)
        except Exception as exc:
            if not _conflict(exc):
                raise
            log.info("another replica created Secret %s/%s first; using it", names.namespace, names.ca_secret)
    raise IdentityError(f"Secret {names.namespace}/{names.ca_secret} keeps changing; giving up for now")


async def ensure_issuer(core: Any, names: Names, in_use: CertificateAuthority,
                        clock: Callable[[], float]) -> CertificateAuthority:
    """Return the CA the Secret holds now (`in_use` itself when that is the same), after
    replacing its issuer with a new one from its root when the issuer is due. Replaced with the
    resourceVersion read: when another replica wrote first, its issuer is read and used.

    A due issuer that cannot be renewed (the Secret has no root.key) and a trust anchor near
    its end are logged as errors; the CA is returned as it is. Raises IdentityError when the
    Secret is gone, unusable or of another trust domain (the CA in use is then kept),
    ApiException for API errors other than a lost race."""
    where = f"Secret {names.namespace}/{names.ca_secret}"
    for _ in range(_ATTEMPTS):
        secret = await _read(core.read_namespaced_secret, names.ca_secret, names.namespace)
        if secret is None:
            raise IdentityError(f"{where} is gone; the issuer in use ({describe(in_use.issuer)}) stays")
        data = _data(secret)
        missing = [k for k in (ROOT_CERT, ISSUER_CERT, ISSUER_KEY) if k not in data]
        if missing:
            raise IdentityError(f"{where} has no {', '.join(missing)}; the issuer in use stays")
        ca = CertificateAuthority.from_pem(data[ROOT_CERT], data[ISSUER_CERT], data[ISSUER_KEY], clock=clock)
        if ca.trust_domain != in_use.trust_domain:
            raise IdentityError(f"{where} now holds a CA of trust domain {ca.trust_domain}, not "
                                f"{in_use.trust_domain}: restart the control plane to change trust domain")
        if (ca.root, ca.issuer) == (in_use.root, in_use.issuer):
            ca = in_use
        elif ca.root != in_use.root:
            log.warning("the trust anchor in %s changed (%s): proxies that hold the old one refuse certificates "
                        "of the new one until they renew theirs", where, describe(ca.root))
        now = clock()
        if trust_anchor_ending(ca.root, now):
            log.error("the trust anchor in %s ends on %s: replace it (see docs/security.md); issuers made from it "
                      "end with it", where, time.strftime("%Y-%m-%d", time.gmtime(ca.root_expires)))
        if not issuer_renewal_due(ca.root, ca.issuer, now):
            return ca
        if ROOT_KEY not in data:
            log.error("the issuer in %s (%s) is due for renewal, but the Secret has no root.key to make a new "
                      "one: add it, or put a new issuer.crt and issuer.key there yourself", where,
                      describe(ca.issuer))
            return ca
        issuer_pem, issuer_key_pem = renew_issuer_pem(data[ROOT_CERT], data[ROOT_KEY], now)
        # The object as read, only the two keys changed: whatever else an operator put on the
        # Secret stays, and its resourceVersion makes the write fail if anyone wrote meanwhile.
        secret.data = {**secret.data, ISSUER_CERT: _b64(issuer_pem), ISSUER_KEY: _b64(issuer_key_pem)}
        try:
            await core.replace_namespaced_secret(names.ca_secret, names.namespace, secret)
        except Exception as exc:
            if not _conflict(exc):
                raise
            log.info("another replica changed %s first; reading it again", where)
            continue
        renewed = CertificateAuthority.from_pem(data[ROOT_CERT], issuer_pem, issuer_key_pem, clock=clock)
        log.info("renewed the issuer in %s: %s (was %s)", where, describe(renewed.issuer), describe(ca.issuer))
        return renewed
    raise IdentityError(f"{where} keeps changing; giving up for now")


def serving_certificate_current(data: dict[str, bytes], ca: CertificateAuthority, dns_names: list[str],
                                now: float) -> bool:
    """True when `data` (a kubernetes.io/tls Secret's) holds a certificate and key from `ca`
    for every name in `dns_names`, valid for more than RENEW_BEFORE from `now`."""
    try:
        leaf = x509.load_pem_x509_certificates(data["tls.crt"])[0]
        key = serialization.load_pem_private_key(data["tls.key"], password=None)
        leaf.verify_directly_issued_by(ca.issuer)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (KeyError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():
        return False
    if not set(dns_names) <= set(san.get_values_for_type(x509.DNSName)):
        return False
    ends = leaf.not_valid_after_utc.timestamp()
    # Certificates end with their issuer at the latest: one that already does cannot be
    # bettered, and writing it again on every round would only restart the webhook's TLS.
    return ends - now > RENEW_BEFORE or (ends >= ca.issuer_expires - 1 and ends > now)


async def ensure_webhook_certificate(core: Any, ca: CertificateAuthority, names: Names) -> bool:
    """Make sure the webhook's Secret holds a current serving certificate from `ca`; return
    True when this call wrote one."""
    dns_names = service_dns_names(names.webhook_service, names.namespace)
    for _ in range(_ATTEMPTS):
        secret = await _read(core.read_namespaced_secret, names.webhook_secret, names.namespace)
        if secret is not None and serving_certificate_current(_data(secret), ca, dns_names, ca.clock()):
            return False
        cert = issue_serving_certificate(ca, dns_names)
        body = _secret(names.webhook_secret, names.namespace,
                       {"tls.crt": cert.chain_pem, "tls.key": cert.key_pem, "ca.crt": cert.ca_bundle_pem},
                       "kubernetes.io/tls", None if secret is None else secret.metadata.resource_version)
        try:
            if secret is None:
                await core.create_namespaced_secret(names.namespace, body)
            else:
                await core.replace_namespaced_secret(names.webhook_secret, names.namespace, body)
        except Exception as exc:
            if not _conflict(exc):
                raise
            continue  # another replica wrote it: look at what it wrote
        log.info("wrote the webhook's serving certificate to Secret %s/%s (until %s)", names.namespace,
                 names.webhook_secret, time.strftime("%Y-%m-%d", time.gmtime(cert.expires)))
        return True
    raise IdentityError(f"Secret {names.namespace}/{names.webhook_secret} keeps changing; giving up for now")


async def ensure_ca_bundle(admission: Any, ca: CertificateAuthority, names: Names, *,
                           quiet_when_missing: bool = False) -> bool:
    """Set `caBundle` to the trust anchor on every webhook of the configuration that calls the
    webhook Service; return True when it was changed. A configuration that is not installed
    is logged (at debug with `quiet_when_missing`: the caller said so already) and skipped."""
    config = await _read(admission.read_mutating_webhook_configuration, names.webhook_configuration)
    if config is None:
        log.log(logging.DEBUG if quiet_when_missing else logging.WARNING,
                "MutatingWebhookConfiguration %s is not installed: no sidecar injection", names.webhook_configuration)
        return False
    bundle = _b64(ca.trust_bundle())
    patch: list[dict] = [{"op": "test", "path": "/metadata/resourceVersion",
                          "value": config.metadata.resource_version}]
    for i, hook in enumerate(config.webhooks or []):
        service = hook.client_config.service if hook.client_config is not None else None
        if service is None or (service.name, service.namespace) != (names.webhook_service, names.namespace):
            continue
        current = hook.client_config.ca_bundle
        if current != bundle:
            patch.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle})
    if len(patch) == 1:
        return False
    try:
        await admission.patch_mutating_webhook_configuration(names.webhook_configuration, patch)
    except Exception as exc:
        # 422 from the `test`: changed meanwhile (another replica): the next round looks again.
        from kubernetes_asyncio.client.exceptions import ApiException

        if isinstance(exc, ApiException) and exc.status in (409, 422):
            return False
        raise
    log.info("set the caBundle of MutatingWebhookConfiguration %s", names.webhook_configuration)
    return True


async def bootstrap(api_client: Any, *, trust_domain: str, names: Names = Names(),
                    clock: Callable[[], float] = time.time) -> CertificateAuthority:
    """Run the three steps of this module's docstring (the issuer renewed when due); return the
    mesh's CA.

    Raises IdentityError when the CA Secret is unusable, ApiException when the API server
    refuses (RBAC) or fails; the caller retries with backoff."""
    from kubernetes_asyncio import client

    core = client.CoreV1Api(api_client)
    ca = await ensure_issuer(core, names, await ensure_ca(core, names, trust_domain, clock), clock)
    await ensure_webhook_certificate(core, ca, names)
    await ensure_ca_bundle(client.AdmissionregistrationV1Api(api_client), ca, names)
    return ca
