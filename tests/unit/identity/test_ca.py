"""The CA: what a workload certificate holds and for how long, whose identity it carries, what
is refused, the files `init_ca` writes, and that chains verify up to the trust anchor (with
cryptography's verifier and with `openssl verify`). The clock is a fake one."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshproxy.identity.ca import (
    CLOCK_SKEW,
    DEFAULT_LIFETIME,
    ISSUER_LIFETIME,
    ROOT_LIFETIME,
    CertificateAuthority,
    init_ca,
)
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.spiffe import CSRError, IdentityError, IdentityMismatch

T0 = 1_700_000_000.0
WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/default/sa/api"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(clock) -> CertificateAuthority:
    return CertificateAuthority.in_memory("cluster.local", clock)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def chain_of(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def verify(ca: CertificateAuthority, chain_pem: bytes, when: float) -> list[x509.GeneralName]:
    """Verify a chain as a TLS client certificate against `ca`'s root at `when`; return the
    leaf's SANs. Raises VerificationError."""
    root = x509.load_pem_x509_certificate(ca.trust_bundle())
    leaf, *intermediates = chain_of(chain_pem)
    verifier = PolicyBuilder().store(Store([root])).time(at(when)).build_client_verifier()
    return verifier.verify(leaf, intermediates).subjects


def csr_for(key, spiffe_id: str | None = None, *, dns: list[str] = ()) -> bytes:
    names = ([x509.UniformResourceIdentifier(spiffe_id)] if spiffe_id else []) + [x509.DNSName(d) for d in dns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


# Validity.

def test_a_leaf_starts_a_minute_back_and_lasts_24_hours_by_default(ca):
    issued = ca.issue(make_csr(new_key()), WEB)
    leaf = chain_of(issued.chain_pem)[0]
    assert leaf.not_valid_before_utc == at(T0 - CLOCK_SKEW)
    assert leaf.not_valid_after_utc == at(T0 + DEFAULT_LIFETIME) == at(T0 + 86400)
    assert (issued.not_before, issued.expires) == (T0 - 60, T0 + 86400)


def test_the_lifetime_asked_for_is_the_one_given(ca):
    issued = ca.issue(make_csr(new_key()), WEB, lifetime=5)
    assert chain_of(issued.chain_pem)[0].not_valid_after_utc == at(T0 + 5)
    assert issued.expires == T0 + 5


def test_a_fraction_of_a_second_rounds_the_expiry_up_never_shortening_the_lifetime(clock, ca):
    clock.now = T0 + 0.4
    issued = ca.issue(make_csr(new_key()), WEB, lifetime=5)
    assert issued.expires == T0 + 6 and issued.expires - clock.now >= 5


@pytest.mark.parametrize("lifetime", [4.99, 0, -1, float("nan")])
def test_a_lifetime_under_five_seconds_is_refused(ca, lifetime):
    with pytest.raises(IdentityError, match="minimum of 5s"):
        ca.issue(make_csr(new_key()), WEB, lifetime=lifetime)


def test_a_leaf_never_outlives_its_issuer(clock, ca):
    clock.now = ca.issuer_expires - 3600
    issued = ca.issue(make_csr(new_key()), WEB)
    assert issued.expires == ca.issuer_expires
    verify(ca, issued.chain_pem, clock.now + 10)


def test_an_expired_issuer_signs_nothing(clock, ca):
    clock.now = ca.issuer_expires - 2
    with pytest.raises(IdentityError, match="issuer certificate has expired"):
        ca.issue(make_csr(new_key()), WEB)


def test_root_and_issuer_lifetimes_and_path_lengths(ca):
    assert ca.root.not_valid_after_utc == at(T0 + ROOT_LIFETIME)
    assert ca.issuer.not_valid_after_utc == at(T0 + ISSUER_LIFETIME)
    root_bc = ca.root.extensions.get_extension_for_class(x509.BasicConstraints)
    issuer_bc = ca.issuer.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (root_bc.critical, root_bc.value.ca, root_bc.value.path_length) == (True, True, 1)
    assert (issuer_bc.critical, issuer_bc.value.ca, issuer_bc.value.path_length) == (True, True, 0)
    assert ca.root.subject == ca.root.issuer and ca.issuer.issuer == ca.root.subject
    for cert in (ca.root, ca.issuer):
        assert isinstance(cert.public_key().curve, ec.SECP256R1)
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


# What a leaf holds.

def test_a_leaf_is_an_end_entity_for_tls_both_ways_with_the_issuer_after_it(ca):
    key = new_key()
    leaf, issuer = chain_of(ca.sign(make_csr(key), WEB))
    assert issuer == ca.issuer
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_cert_sign
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(WEB)]


def test_the_identity_is_the_credentials_when_the_csr_names_none(ca):
    leaf = chain_of(ca.sign(make_csr(new_key()), API))[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(API)])


def test_a_csr_naming_the_same_identity_is_signed(ca):
    leaf = chain_of(ca.sign(make_csr(new_key(), WEB), WEB))[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [WEB]


def test_dns_names_asked_for_are_not_copied(ca):
    leaf = chain_of(ca.sign(csr_for(new_key(), dns=["evil.example.com"]), WEB))[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB)]


@pytest.mark.parametrize("asked", [[API], [WEB, API], ["spiffe://other.domain/ns/default/sa/web"],
                                   ["https://web.default.svc"]])
def test_a_csr_asking_for_another_identity_is_refused(ca, asked):
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in asked]), critical=False)
    pem = builder.sign(new_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityMismatch, match=f"credential proves {WEB}"):
        ca.sign(pem, WEB)


def test_serial_numbers_differ(ca):
    serials = {ca.issue(make_csr(new_key()), WEB).serial for _ in range(5)}
    assert len(serials) == 5


def test_an_identity_of_another_trust_domain_is_not_signed(ca):
    with pytest.raises(IdentityError, match="not in this CA's trust domain cluster.local"):
        ca.sign(make_csr(new_key()), "spiffe://example.org/ns/default/sa/web")


def test_a_malformed_identity_is_not_signed(ca):
    with pytest.raises(IdentityError, match="SPIFFE ID"):
        ca.sign(make_csr(new_key()), "spiffe://cluster.local/web")


# CSRs refused.

@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ed25519.Ed25519PrivateKey.generate,
], ids=["P-384", "RSA", "Ed25519"])
def test_keys_other_than_p256_are_refused(ca, make_key):
    with pytest.raises(CSRError, match="must be ECDSA P-256"):
        ca.sign(csr_for(make_key()), WEB)


@pytest.mark.parametrize("pem", [
    b"",
    b"hello",
    b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    b"x" * 20_000,
])
def test_garbage_is_refused_as_malformed(ca, pem):
    with pytest.raises(CSRError, match="certificate signing request"):
        ca.sign(pem, WEB)


def test_a_certificate_instead_of_a_csr_is_refused(ca):
    with pytest.raises(CSRError):
        ca.sign(ca.trust_bundle(), WEB)


def test_a_csr_whose_signature_does_not_verify_is_refused(ca):
    # The last byte of the DER is the end of the signature: flipped, the CSR still parses but
    # no longer proves that the requester holds the key.
    der = x509.load_pem_x509_csr(make_csr(new_key())).public_bytes(serialization.Encoding.DER)
    forged = der[:-1] + bytes([der[-1] ^ 1])
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(forged) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(CSRError, match="signature does not verify"):
        ca.sign(pem, WEB)


# Chains verify up to the trust anchor.

def test_the_chain_verifies_to_the_root_and_names_the_identity(clock, ca):
    chain = ca.sign(make_csr(new_key()), WEB)
    assert verify(ca, chain, T0 + 1) == [x509.UniformResourceIdentifier(WEB)]


def test_the_chain_does_not_verify_once_expired_or_against_another_root(clock, ca):
    chain = ca.sign(make_csr(new_key()), WEB, lifetime=5)
    with pytest.raises(VerificationError):
        verify(ca, chain, T0 + 6)
    other = CertificateAuthority.in_memory("cluster.local", clock)
    with pytest.raises(VerificationError):
        verify(other, chain, T0 + 1)


@pytest.mark.parametrize("purpose", ["sslserver", "sslclient"])
def test_openssl_verifies_the_chain_strictly(tmp_path, ca, purpose):
    leaf, issuer = chain_of(ca.sign(make_csr(new_key()), WEB))
    (tmp_path / "root.pem").write_bytes(ca.trust_bundle())
    (tmp_path / "issuer.pem").write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    command = ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-attime", str(int(T0 + 10)),
               "-CAfile", str(tmp_path / "root.pem"), "-untrusted", str(tmp_path / "issuer.pem"),
               str(tmp_path / "leaf.pem")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
    expired = subprocess.run(command[:6] + [str(int(T0 + 86400 + 10))] + command[7:], capture_output=True, text=True)
    assert expired.returncode != 0 and "expired" in expired.stdout + expired.stderr


# Files.

def test_init_writes_keys_0600_in_a_0700_folder_whatever_the_umask(tmp_path, clock):
    folder = tmp_path / "ca" / "nested"
    old = os.umask(0)
    try:
        init_ca(folder, "cluster.local", clock=clock)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"root.crt": 0o644, "issuer.crt": 0o644, "root.key": 0o600, "issuer.key": 0o600}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("root.key", "issuer.key"):
        key = serialization.load_pem_private_key((folder / name).read_bytes(), password=None)
        assert isinstance(key.curve, ec.SECP256R1)


def test_init_narrows_an_existing_empty_folder_to_0700(tmp_path, clock):
    folder = tmp_path / "ca"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    init_ca(folder, "cluster.local", clock=clock)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_loaded_ca_signs_chains_that_verify_to_root_crt(tmp_path, clock):
    init_ca(tmp_path / "ca", "mesh.example", clock=clock)
    ca = CertificateAuthority.load(tmp_path / "ca", clock=clock)
    assert ca.trust_domain == "mesh.example"
    assert ca.trust_bundle() == (tmp_path / "ca" / "root.crt").read_bytes()
    chain = ca.sign(make_csr(new_key()), "spiffe://mesh.example/ns/shop/sa/cart")
    assert chain_of(chain)[1].public_bytes(serialization.Encoding.PEM) == (tmp_path / "ca" / "issuer.crt").read_bytes()
    assert verify(ca, chain, T0 + 1) == [x509.UniformResourceIdentifier("spiffe://mesh.example/ns/shop/sa/cart")]


def test_init_never_overwrites_a_ca(tmp_path, clock):
    init_ca(tmp_path, "cluster.local", clock=clock)
    before = (tmp_path / "issuer.key").read_bytes()
    with pytest.raises(IdentityError, match="already holds a CA"):
        init_ca(tmp_path, "cluster.local", clock=clock)
    assert (tmp_path / "issuer.key").read_bytes() == before


def test_init_refuses_an_invalid_trust_domain_and_writes_nothing(tmp_path, clock):
    with pytest.raises(IdentityError, match="invalid trust domain"):
        init_ca(tmp_path / "ca", "Not Valid", clock=clock)
    assert not (tmp_path / "ca").exists()


def test_loading_a_folder_without_a_ca_says_how_to_make_one(tmp_path):
    with pytest.raises(IdentityError, match=r"no CA in .* \(root.crt is missing\).*meshproxy ca init"):
        CertificateAuthority.load(tmp_path)


def test_loading_refuses_a_key_that_is_not_the_issuers(tmp_path, clock):
    init_ca(tmp_path, "cluster.local", clock=clock)
    os.replace(tmp_path / "root.key", tmp_path / "issuer.key")
    with pytest.raises(IdentityError, match="does not belong to the issuer"):
        CertificateAuthority.load(tmp_path)


def test_loading_refuses_an_issuer_of_another_root(tmp_path, clock):
    init_ca(tmp_path / "a", "cluster.local", clock=clock)
    init_ca(tmp_path / "b", "cluster.local", clock=clock)
    for name in ("issuer.crt", "issuer.key"):
        os.replace(tmp_path / "b" / name, tmp_path / "a" / name)
    with pytest.raises(IdentityError, match="not signed by the root"):
        CertificateAuthority.load(tmp_path / "a")


def test_loading_warns_about_a_key_others_can_read(tmp_path, clock, caplog):
    init_ca(tmp_path, "cluster.local", clock=clock)
    os.chmod(tmp_path / "issuer.key", 0o644)
    CertificateAuthority.load(tmp_path)
    assert "issuer.key is readable by others (mode 644)" in caplog.text


def test_in_memory_refuses_an_invalid_trust_domain():
    with pytest.raises(IdentityError, match="invalid trust domain"):
        CertificateAuthority.in_memory("cluster local")
