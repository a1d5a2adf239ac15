"""The webhook's serving certificate, signed by the mesh's CA (meshproxy.kube.certs)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshproxy.identity.ca import ISSUER_LIFETIME, CertificateAuthority
from meshproxy.identity.spiffe import IdentityError
from meshproxy.kube.certs import issue_serving_certificate, service_dns_names

NOW = 1_700_000_000.0


def test_dns_names_of_a_service_the_api_server_uses_first():
    assert service_dns_names("meshproxy-webhook", "meshproxy-system") == [
        "meshproxy-webhook.meshproxy-system.svc", "meshproxy-webhook.meshproxy-system.svc.cluster.local",
        "meshproxy-webhook.meshproxy-system", "meshproxy-webhook"]


def test_a_server_certificate_for_the_names_chained_to_the_trust_anchor():
    ca = CertificateAuthority.in_memory("cluster.local", clock=lambda: NOW)
    names = service_dns_names("meshproxy-webhook", "meshproxy-system")
    cert = issue_serving_certificate(ca, names, ip_addresses=["127.0.0.1"], lifetime=86400)
    leaf, issuer = x509.load_pem_x509_certificates(cert.chain_pem)
    assert cert.ca_bundle_pem == ca.trust_bundle()
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(x509.load_pem_x509_certificate(cert.ca_bundle_pem))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # not a workload identity
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.expires == leaf.not_valid_after_utc.timestamp() == NOW + 86400
    key = serialization.load_pem_private_key(cert.key_pem, password=None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_never_outlives_the_issuer_and_needs_a_name():
    ca = CertificateAuthority.in_memory("cluster.local", clock=lambda: NOW)
    cert = issue_serving_certificate(ca, ["a.b.svc"], lifetime=10 * ISSUER_LIFETIME)
    assert cert.expires == ca.issuer_expires
    with pytest.raises(IdentityError):
        issue_serving_certificate(ca, [])
    late = CertificateAuthority(ca.root, ca.issuer, ca.issuer_key, clock=lambda: ca.issuer_expires - 1)
    with pytest.raises(IdentityError):
        issue_serving_certificate(late, ["a.b.svc"])
