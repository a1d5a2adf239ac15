"""The webhook's serving certificate: a DNS-name TLS server certificate signed by the mesh's CA.

The API server calls the webhook at `https://SERVICE.NAMESPACE.svc:443/inject` and checks the
certificate against the webhook configuration's `caBundle`; so the certificate names the
Service's DNS names, and `caBundle` is the mesh's trust anchor (the root), with the issuer sent
in the chain. Workload certificates (meshproxy.identity.ca) carry a SPIFFE ID and no DNS name,
which is why this is a separate, narrower kind of leaf: server authentication only.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.identity.ca import CLOCK_SKEW, CertificateAuthority
from meshproxy.identity.csr import key_pem, new_key
from meshproxy.identity.spiffe import IdentityError

SERVING_LIFETIME = 365 * 86400.0


@dataclass(frozen=True)
class ServingCertificate:
    """PEM chain (leaf, then issuer), its key, and the bundle a client verifies it with."""

    chain_pem: bytes
    key_pem: bytes
    ca_bundle_pem: bytes
    expires: float  # unix seconds


def service_dns_names(service: str, namespace: str) -> list[str]:
    """Return the names the API server may use for a Service: `S.NS.svc` first (the one it
    uses), then `S.NS.svc.cluster.local`, `S.NS`, `S`."""
    return [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local",
            f"{service}.{namespace}", service]


def issue_serving_certificate(ca: CertificateAuthority, dns_names: list[str], *,
                              ip_addresses: tuple[str, ...] | list[str] = (), lifetime: float = SERVING_LIFETIME
                              ) -> ServingCertificate:
    """Return a new key and a TLS server certificate for `dns_names` (and `ip_addresses`),
    signed by `ca`'s issuer, valid from a minute ago for `lifetime` seconds but never beyond
    the issuer. Raises IdentityError when no name is given or the issuer is about to expire."""
    if not dns_names and not ip_addresses:
        raise IdentityError("a serving certificate needs at least one DNS name or IP address")
    now = ca.clock()
    not_before = max(math.floor(now - CLOCK_SKEW), ca.issuer.not_valid_before_utc.timestamp())
    not_after = min(math.ceil(now + lifetime), ca.issuer_expires)
    if not_after <= now + 60:
        raise IdentityError("the issuer certificate has expired (or is about to): make a new one")
    key = new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    issuer_ski = ca.issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshproxy"),
                         x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or list(ip_addresses))[0])])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
        .sign(ca.issuer_key, hashes.SHA256())
    )
    chain = (leaf.public_bytes(serialization.Encoding.PEM)
             + ca.issuer.public_bytes(serialization.Encoding.PEM))
    return ServingCertificate(chain, key_pem(key), ca.trust_bundle(), leaf.not_valid_after_utc.timestamp())


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(int(seconds), tz=timezone.utc)
