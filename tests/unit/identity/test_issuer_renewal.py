"""Renewing the CA's issuer (meshproxy.identity.ca): when it is due, what the new issuer is, and
that proxies holding the old trust bundle accept what the new issuer signs. The clock is a fake
one; chains are checked with cryptography's verifier and with `openssl verify`."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshproxy.identity.ca import (
    DEFAULT_LIFETIME,
    ISSUER_LIFETIME,
    CertificateAuthority,
    _ca_certificate,
    _make_ca,
    _name,
    issuer_renewal_due,
    issuer_renewal_time,
    new_issuer,
    renew_issuer_pem,
    trust_anchor_ending,
)
from meshproxy.identity.csr import key_pem, make_csr, new_key
from meshproxy.identity.spiffe import IdentityError

T0 = 1_700_000_000.0
DAY = 86400.0
WEB = "spiffe://cluster.local/ns/default/sa/web"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def verify_chain(bundle_pem: bytes, chain_pem: bytes, when: float) -> None:
    """Verify a chain as a sidecar does (client certificate against the trust bundle); raises
    VerificationError."""
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    store = Store(x509.load_pem_x509_certificates(bundle_pem))
    verifier = PolicyBuilder().store(store).time(datetime.fromtimestamp(when, timezone.utc)).build_client_verifier()
    verifier.verify(leaf, intermediates)


@pytest.fixture
def made():
    """(root, root key, issuer, issuer key) made at T0."""
    return _make_ca("cluster.local", T0)


# When an issuer is due.

def test_a_one_year_issuer_is_due_after_two_thirds_of_its_life_and_stays_due(made):
    root, _, issuer, _ = made
    start = issuer.not_valid_before_utc.timestamp()
    due_at = start + (issuer.not_valid_after_utc.timestamp() - start) * 2 / 3
    assert issuer_renewal_time(issuer) == pytest.approx(due_at)
    assert 243 * DAY < due_at - T0 < 244 * DAY  # four months before the end of a one-year issuer
    assert not issuer_renewal_due(root, issuer, T0)
    assert not issuer_renewal_due(root, issuer, due_at - 1)
    assert issuer_renewal_due(root, issuer, due_at)
    assert issuer_renewal_due(root, issuer, T0 + ISSUER_LIFETIME + 30 * DAY)  # ended: still due


def test_the_rule_scales_with_an_issuer_of_another_lifetime(made):
    root, root_key, one_year, _ = made
    # A 90-day issuer, as an operator's own might be: due after 60 days, where a one-year one
    # is far from due.
    ninety = _ca_certificate(_name("meshproxy issuer cluster.local"), new_key(), root, root_key, "cluster.local",
                             path_length=0, not_before=T0, not_after=T0 + 90 * DAY)
    assert not issuer_renewal_due(root, ninety, T0 + 59 * DAY)
    assert issuer_renewal_due(root, ninety, T0 + 60 * DAY)
    assert not issuer_renewal_due(root, one_year, T0 + 60 * DAY)


def test_an_issuer_that_ends_with_its_root_is_never_due_but_the_root_is_ending(made):
    root, root_key, _, _ = made
    late = root.not_valid_after_utc.timestamp() - 200 * DAY
    capped, _ = new_issuer(root, root_key, late)
    assert capped.not_valid_after_utc == root.not_valid_after_utc
    # A new one could not last longer: renewing on every round would change nothing.
    assert not issuer_renewal_due(root, capped, late + 190 * DAY)
    assert trust_anchor_ending(root, late)


def test_the_trust_anchor_is_ending_once_it_has_less_than_an_issuers_lifetime_left(made):
    root = made[0]
    end = root.not_valid_after_utc.timestamp()
    assert not trust_anchor_ending(root, T0)
    assert not trust_anchor_ending(root, end - ISSUER_LIFETIME)
    assert trust_anchor_ending(root, end - ISSUER_LIFETIME + 1)


# The new issuer.

def test_a_new_issuer_is_a_fresh_key_under_the_same_root_for_a_year(made):
    root, root_key, old, old_key = made
    now = T0 + 250 * DAY
    issuer, key = new_issuer(root, root_key, now)
    issuer.verify_directly_issued_by(root)
    assert key.public_key().public_numbers() == issuer.public_key().public_numbers()
    assert key.public_key().public_numbers() != old_key.public_key().public_numbers()
    assert issuer.serial_number != old.serial_number
    assert issuer.subject == old.subject and issuer.issuer == root.subject
    assert issuer.not_valid_before_utc.timestamp() == now - 60
    assert issuer.not_valid_after_utc.timestamp() == now + ISSUER_LIFETIME
    constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert issuer.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    # The trust domain is read back from it as from the first one.
    ca = CertificateAuthority(root, issuer, key, clock=Clock(now))
    assert ca.trust_domain == "cluster.local"


def test_a_leaf_of_the_new_issuer_verifies_against_the_old_trust_bundle(made):
    root, root_key, old, old_key = made
    clock = Clock(T0 + 250 * DAY)
    before = CertificateAuthority(root, old, old_key, clock=clock)
    bundle = before.trust_bundle()  # what every proxy holds
    issuer, key = new_issuer(root, root_key, clock.now)
    after = CertificateAuthority(root, issuer, key, clock=clock)
    assert after.trust_bundle() == bundle
    new_chain = after.sign(make_csr(new_key()), WEB)
    old_chain = before.sign(make_csr(new_key()), WEB)
    assert x509.load_pem_x509_certificates(new_chain)[1] == issuer
    # Both kinds of leaf are accepted while both issuers are in date: nothing breaks mid-way.
    verify_chain(bundle, new_chain, clock.now + 1)
    verify_chain(bundle, old_chain, clock.now + 1)
    # A leaf presented with the wrong issuer does not verify (the chain is what proves it).
    leaf = x509.load_pem_x509_certificates(new_chain)[0]
    with pytest.raises(VerificationError):
        verify_chain(bundle, pem(leaf) + pem(old), clock.now + 1)


def test_openssl_accepts_the_new_issuers_chain_strictly(tmp_path, made):
    root, root_key, _, _ = made
    now = T0 + 250 * DAY
    issuer, key = new_issuer(root, root_key, now)
    leaf, sent_issuer = x509.load_pem_x509_certificates(
        CertificateAuthority(root, issuer, key, clock=Clock(now)).sign(make_csr(new_key()), WEB))
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "issuer.pem").write_bytes(pem(sent_issuer))
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    result = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-attime",
                             str(int(now + 10)), "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                             str(tmp_path / "issuer.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_a_new_issuer_never_outlives_its_root_and_leaves_never_outlive_it(made):
    root, root_key, _, _ = made
    root_end = root.not_valid_after_utc.timestamp()
    now = root_end - 100 * DAY
    issuer, key = new_issuer(root, root_key, now)
    assert issuer.not_valid_after_utc.timestamp() == root_end
    ca = CertificateAuthority(root, issuer, key, clock=Clock(root_end - 3600))
    leaf = x509.load_pem_x509_certificates(ca.sign(make_csr(new_key()), WEB))[0]
    assert leaf.not_valid_after_utc.timestamp() == root_end


def test_a_root_that_ends_within_a_day_makes_no_issuer(made):
    root, root_key, _, _ = made
    with pytest.raises(IdentityError, match="trust anchor ends on .* must be replaced"):
        new_issuer(root, root_key, root.not_valid_after_utc.timestamp() - DEFAULT_LIFETIME + 1)
    issuer, _ = new_issuer(root, root_key, root.not_valid_after_utc.timestamp() - DEFAULT_LIFETIME - 1)
    assert issuer.not_valid_after_utc == root.not_valid_after_utc


def test_a_key_that_is_not_the_roots_makes_no_issuer(made):
    root, _, _, issuer_key = made
    with pytest.raises(IdentityError, match="root key does not belong to the root certificate"):
        new_issuer(root, issuer_key, T0)
    with pytest.raises(IdentityError, match="root key does not belong"):
        renew_issuer_pem(pem(root), key_pem(_make_ca("cluster.local", T0)[1]), T0)


def test_renewal_from_pem_gives_a_ca_that_loads(made):
    root, root_key, _, _ = made
    issuer_pem, issuer_key_pem = renew_issuer_pem(pem(root), key_pem(root_key), T0 + DAY)
    ca = CertificateAuthority.from_pem(pem(root), issuer_pem, issuer_key_pem, clock=Clock(T0 + DAY))
    assert ca.issuer_expires == T0 + DAY + ISSUER_LIFETIME
    assert ca.root_expires == root.not_valid_after_utc.timestamp()


@pytest.mark.parametrize("root_pem, key", [(b"junk", b"junk"), (None, b"-----BEGIN PRIVATE KEY-----\nAA\n")])
def test_unreadable_root_files_are_refused(made, root_pem, key):
    with pytest.raises(IdentityError, match="unreadable root certificate or key"):
        renew_issuer_pem(root_pem or pem(made[0]), key, T0)
