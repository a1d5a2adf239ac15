"""The mesh's certificate authority: a trust anchor, an issuer, and the signing of workload
certificates (spec §5).

Two levels, as Linkerd and Istio have them: a self-signed root (10 years, the trust anchor every
proxy is given) and an intermediate issuer (1 year) that signs the 24 h workload certificates.
The issuer key is the one in daily use on the control plane; the root key is only needed to
make a new issuer, so a new issuer can be made without changing the trust bundle.

The issuer is renewed (`issuer_renewal_due`, `new_issuer`) once two thirds of its life have
passed: a new key and certificate under the same root, so proxies, whose trust bundle is the
root and who get the issuer in the chain with every certificate, notice nothing. An issuer never
outlives its root; a root within ISSUER_LIFETIME of its end (`trust_anchor_ending`) can only
make shortened issuers, and replacing it is an operator's task (docs/security.md).

A workload certificate's only identity is the URI SAN the caller names, the identity its
credential proves (spec §5: "for the identity that the credential proves and no other"). What
the CSR asks for is never copied: a CSR that asks for another identity is refused, so a
mistake or an attack shows as an error instead of as a certificate for someone else.

Files written by `init_ca` (the folder 0700, private keys 0600, created that way rather than
narrowed afterwards, so no key is ever readable by others even for a moment):

    root.crt    the trust anchor (the trust bundle proxies are given)
    root.key    its key
    issuer.crt  the intermediate, signed by the root
    issuer.key  its key

Serial numbers and keys come from the operating system's random source, never from a seeded
generator: they must not be guessable. The clock is passed in (unix seconds), so validity
periods are tested without waiting.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.identity.csr import key_pem, new_key, read_csr, requested_uris, uri_sans
from meshproxy.identity.spiffe import (
    SCHEME,
    IdentityError,
    IdentityMismatch,
    check_trust_domain,
    parse_spiffe_id,
    trust_domain_id,
)

log = logging.getLogger("meshproxy.identity")
Clock = Callable[[], float]

ROOT_LIFETIME = 10 * 365 * 86400.0
ISSUER_LIFETIME = 365 * 86400.0
DEFAULT_LIFETIME = 24 * 3600.0
MIN_LIFETIME = 5.0  # certificate times have one-second resolution; less would be mostly rounding
CLOCK_SKEW = 60.0  # NotBefore is set this far back, so a peer whose clock is behind accepts it
ROOT_CERT, ROOT_KEY, ISSUER_CERT, ISSUER_KEY = "root.crt", "root.key", "issuer.crt", "issuer.key"
# An issuer is renewed once this fraction of its lifetime has passed (cert-manager's default
# too). A fraction rather than a fixed time before the end: it suits an issuer of any lifetime
# an operator brings, and for the 1-year issuer it leaves four months, long enough for a
# person to act on the daily warning and the alert when the renewal is theirs (`--ca-dir`).
ISSUER_RENEW_AT = 2 / 3


@dataclass(frozen=True)
class Issued:
    """A signed workload certificate: the PEM chain (leaf, then issuer) and its validity."""

    chain_pem: bytes
    spiffe_id: str
    not_before: float  # unix seconds
    expires: float  # unix seconds (the leaf's NotAfter)
    serial: int


def _time(seconds: float) -> datetime:
    # Whole seconds: that is all a certificate holds (RFC 5280 §4.1.2.5), so what is
    # reported is exactly what is signed.
    return datetime.fromtimestamp(int(seconds), tz=timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshproxy"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                    issuer_key: ec.EllipticCurvePrivateKey, trust_domain: str, *, path_length: int,
                    not_before: float, not_after: float) -> x509.Certificate:
    """A CA certificate for `key`: self-signed when `issuer` is None."""
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_time(not_before))
        .not_valid_after(_time(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # The trust domain's own ID (X509-SVID §4.1 lets signing certificates carry one):
        # this is how `load` learns the trust domain back from the files.
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]),
                       critical=False)
    )
    signer_public = (issuer.public_key() if issuer is not None else public)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_public), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _make_ca(trust_domain: str, now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey,
                                                     x509.Certificate, ec.EllipticCurvePrivateKey]:
    check_trust_domain(trust_domain)
    root_key, issuer_key = new_key(), new_key()
    start = now - CLOCK_SKEW
    root = _ca_certificate(_name(f"meshproxy root CA {trust_domain}"), root_key, None, root_key, trust_domain,
                           path_length=1, not_before=start, not_after=now + ROOT_LIFETIME)
    issuer = _ca_certificate(_name(f"meshproxy issuer {trust_domain}"), issuer_key, root, root_key, trust_domain,
                             path_length=0, not_before=start, not_after=now + ISSUER_LIFETIME)
    return root, root_key, issuer, issuer_key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a CA that exists; the mode is given at creation (the umask can
    # only narrow it) and set again in case the umask is unusual.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def init_ca(folder: str | os.PathLike, trust_domain: str, *, clock: Clock = time.time) -> None:
    """Make a trust anchor and an issuer for `trust_domain` and write them to `folder`
    (created 0700; keys 0600, certificates 0644).

    Raises IdentityError for an invalid trust domain or when the folder already holds any of
    the four files (a CA is never overwritten: every certificate signed by it would stop being
    trusted), OSError when the folder cannot be written."""
    folder = Path(folder)
    names = (ROOT_CERT, ROOT_KEY, ISSUER_CERT, ISSUER_KEY)
    present = [n for n in names if (folder / n).exists()]
    if present:
        raise IdentityError(f"{folder} already holds a CA ({', '.join(present)}); refusing to overwrite it")
    root, root_key, issuer, issuer_key = _make_ca(trust_domain, clock())
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    _write(folder / ROOT_KEY, key_pem(root_key), 0o600)
    _write(folder / ISSUER_KEY, key_pem(issuer_key), 0o600)
    _write(folder / ROOT_CERT, _pem(root), 0o644)
    _write(folder / ISSUER_CERT, _pem(issuer), 0o644)


def _span(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def issuer_renewal_due(root: x509.Certificate, issuer: x509.Certificate, now: float) -> bool:
    """True when `issuer` should give way to a new one from `root`: ISSUER_RENEW_AT of its
    lifetime has passed (or all of it), and a new issuer would end later than it does. One
    that already ends with the root cannot be bettered: then `trust_anchor_ending` is the news."""
    start, end = _span(issuer)
    if end >= _span(root)[1] - 1:
        return False
    return now >= start + (end - start) * ISSUER_RENEW_AT


def issuer_renewal_time(issuer: x509.Certificate) -> float:
    """Return the unix time at which `issuer` becomes due for renewal (ISSUER_RENEW_AT)."""
    start, end = _span(issuer)
    return start + (end - start) * ISSUER_RENEW_AT


def trust_anchor_ending(root: x509.Certificate, now: float) -> bool:
    """True when `root` has less than ISSUER_LIFETIME left: issuers made from it are cut short
    and it must be replaced, which every proxy has to learn of (an operator's task)."""
    return _span(root)[1] - now < ISSUER_LIFETIME


def new_issuer(root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey,
               now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a new issuer certificate and its new key, signed by `root`: the subject and trust
    domain of the issuer `init_ca` makes, valid from a minute ago for ISSUER_LIFETIME but never
    beyond the root (a certificate cannot outlive the one that signed it).

    Raises IdentityError when `root_key` is not the root's key, the root names no trust domain,
    or the root ends within DEFAULT_LIFETIME (an issuer then would be of no use)."""
    if not isinstance(root_key, ec.EllipticCurvePrivateKey) or (
            root_key.public_key().public_numbers() != root.public_key().public_numbers()):
        raise IdentityError("the root key does not belong to the root certificate")
    trust_domain = _trust_domain_of(root)
    root_start, root_end = _span(root)
    if root_end - now < DEFAULT_LIFETIME:
        raise IdentityError(f"the trust anchor ends on {_time(root_end).isoformat()}: it must be replaced, "
                            "a new issuer under it would be of no use")
    key = new_key()
    issuer = _ca_certificate(_name(f"meshproxy issuer {trust_domain}"), key, root, root_key, trust_domain,
                             path_length=0, not_before=max(now - CLOCK_SKEW, root_start),
                             not_after=min(now + ISSUER_LIFETIME, root_end))
    return issuer, key


def renew_issuer_pem(root_pem: bytes, root_key_pem: bytes, now: float) -> tuple[bytes, bytes]:
    """Return (issuer certificate PEM, issuer key PEM) of a `new_issuer` for the root in these
    PEM documents. Raises IdentityError when they do not parse, or as `new_issuer` does."""
    try:
        root = x509.load_pem_x509_certificate(root_pem)
        root_key = serialization.load_pem_private_key(root_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"unreadable root certificate or key: {exc}") from None
    issuer, key = new_issuer(root, root_key, now)
    return _pem(issuer), key_pem(key)


def describe(cert: x509.Certificate) -> str:
    """Return how logs name a CA certificate: its serial number and the end of its validity."""
    return f"serial {cert.serial_number:x}, until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"


class CertificateAuthority:
    """Signs workload certificates with an issuer under a root. Build it with `load`,
    `from_pem` or `in_memory`."""

    def __init__(self, root: x509.Certificate, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
                 *, clock: Clock = time.time) -> None:
        self.root = root
        self.issuer = issuer
        self.issuer_key = issuer_key
        self.clock = clock
        self.trust_domain = _trust_domain_of(root)
        self._bundle = _pem(root)
        self._issuer_pem = _pem(issuer)

    @classmethod
    def in_memory(cls, trust_domain: str, clock: Clock = time.time) -> "CertificateAuthority":
        """Return a new CA that lives only in this process (for `meshproxy up` and tests);
        raise IdentityError for an invalid trust domain."""
        root, _, issuer, issuer_key = _make_ca(trust_domain, clock())
        return cls(root, issuer, issuer_key, clock=clock)

    @classmethod
    def from_pem(cls, root_pem: bytes, issuer_pem: bytes, issuer_key_pem: bytes, *,
                 clock: Clock = time.time) -> "CertificateAuthority":
        """Return the CA made of these PEM documents (as a Kubernetes Secret holds them).

        Raises IdentityError when they do not parse, the issuer is not signed by the root,
        the key is not the issuer's, or the root carries no trust domain."""
        try:
            root = x509.load_pem_x509_certificate(root_pem)
            issuer = x509.load_pem_x509_certificate(issuer_pem)
            key = serialization.load_pem_private_key(issuer_key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"unreadable CA certificate or key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise IdentityError("the issuer key must be ECDSA P-256")
        if key.public_key().public_numbers() != issuer.public_key().public_numbers():
            raise IdentityError("the issuer key does not belong to the issuer certificate")
        try:
            issuer.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise IdentityError("the issuer certificate is not signed by the root") from None
        return cls(root, issuer, key, clock=clock)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, clock: Clock = time.time) -> "CertificateAuthority":
        """Return the CA `init_ca` wrote to `folder` (the root key is not read).

        Raises IdentityError when a file is missing or the files do not form a CA (see
        `from_pem`). A key file that others may read is used, with a warning."""
        folder = Path(folder)
        try:
            parts = [(folder / n).read_bytes() for n in (ROOT_CERT, ISSUER_CERT, ISSUER_KEY)]
            key_path = folder / ISSUER_KEY
            mode = key_path.stat().st_mode
        except FileNotFoundError as exc:
            raise IdentityError(f"no CA in {folder} ({Path(exc.filename).name} is missing); "
                                f"make one with: meshproxy ca init --dir {folder}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by others (mode %o): chmod 600 it", key_path, stat.S_IMODE(mode))
        return cls.from_pem(*parts, clock=clock)

    @property
    def issuer_expires(self) -> float:
        """Unix time at which the issuer stops being valid (no leaf outlives it)."""
        return self.issuer.not_valid_after_utc.timestamp()

    @property
    def root_expires(self) -> float:
        """Unix time at which the trust anchor stops being valid."""
        return self.root.not_valid_after_utc.timestamp()

    def trust_bundle(self) -> bytes:
        """Return the trust anchor (root certificate) as PEM: what a peer's chain must lead to."""
        return self._bundle

    def sign(self, csr_pem: bytes, spiffe_id: str, lifetime: float = DEFAULT_LIFETIME) -> bytes:
        """Return the PEM chain (leaf, then issuer) of a certificate for `spiffe_id` with the
        CSR's key. Raises as `issue` does."""
        return self.issue(csr_pem, spiffe_id, lifetime).chain_pem

    def issue(self, csr_pem: bytes, spiffe_id: str, lifetime: float = DEFAULT_LIFETIME) -> Issued:
        """Sign a workload certificate whose only identity is `spiffe_id` (the identity the
        caller's credential proved), valid from a minute ago (clock skew) for `lifetime`
        seconds, and never beyond the issuer's own expiry.

        Raises CSRError for a malformed, badly signed or non-P-256 CSR; IdentityMismatch when
        the CSR asks for a URI SAN other than `spiffe_id`; IdentityError when `spiffe_id` is
        not a workload ID of this CA's trust domain, `lifetime` is below MIN_LIFETIME, or the
        issuer has expired."""
        trust_domain = parse_spiffe_id(spiffe_id)[0]
        if trust_domain != self.trust_domain:
            raise IdentityError(f"{spiffe_id} is not in this CA's trust domain {self.trust_domain}")
        if not lifetime >= MIN_LIFETIME:
            raise IdentityError(f"certificate lifetime {lifetime}s is below the minimum of {MIN_LIFETIME:g}s")
        csr = read_csr(csr_pem)
        others = [uri for uri in requested_uris(csr) if uri != spiffe_id]
        if others:
            raise IdentityMismatch(f"the CSR asks for {', '.join(others)} but the credential proves {spiffe_id}")
        now = self.clock()
        # Whole seconds outward, so the certificate lasts at least `lifetime` from now.
        not_before = max(math.floor(now - CLOCK_SKEW), self.issuer.not_valid_before_utc.timestamp())
        not_after = min(math.ceil(now + lifetime), self.issuer_expires)
        if not_after < now + MIN_LIFETIME:
            raise IdentityError("the issuer certificate has expired (or is about to): make a new one")
        leaf = self._leaf(csr.public_key(), spiffe_id, not_before, not_after)
        return Issued(_pem(leaf) + self._issuer_pem, spiffe_id, leaf.not_valid_before_utc.timestamp(),
                      leaf.not_valid_after_utc.timestamp(), leaf.serial_number)

    def _leaf(self, public_key, spiffe_id: str, not_before: float, not_after: float) -> x509.Certificate:
        issuer_ski = self.issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            # X509-SVID §2: the identity is the URI SAN alone; with an empty subject RFC 5280
            # §4.2.1.6 requires the SAN extension to be critical.
            .subject_name(x509.Name([]))
            .issuer_name(self.issuer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_time(not_before))
            .not_valid_after(_time(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                           critical=False)
        )
        return builder.sign(self.issuer_key, hashes.SHA256())


def _trust_domain_of(root: x509.Certificate) -> str:
    """The trust domain named by the root's `spiffe://TD` URI SAN; raises IdentityError."""
    for uri in uri_sans(root):
        if uri.startswith(SCHEME) and "/" not in uri[len(SCHEME):]:
            return check_trust_domain(uri[len(SCHEME):])
    raise IdentityError("the root certificate names no trust domain (a spiffe://TRUST_DOMAIN URI SAN)")
