"""Keys, certificate signing requests and the identity a certificate carries (pure: bytes and
`cryptography` objects in, values out; no files, no sockets).

Workload keys are ECDSA P-256 (spec §5): small, fast to make and to verify, and what every TLS
1.3 stack supports. A CSR carries the key and, optionally, the SPIFFE ID the workload believes
it has; the CA never takes the identity from the CSR (see ca.py), it only refuses a CSR that
asks for another one.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.identity.spiffe import SCHEME, CSRError, IdentityError, parse_spiffe_id

MAX_CSR_BYTES = 16_384  # a P-256 CSR is well under 1 KiB; anything this big is not one


def new_key() -> ec.EllipticCurvePrivateKey:
    """Return a new ECDSA P-256 private key (from the operating system's random source)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return `key` as an unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str | None = None) -> bytes:
    """Return a PEM CSR for `key`, asking for the URI SAN `spiffe_id` when given.

    The subject is empty: a SPIFFE certificate's identity is its URI SAN alone."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def read_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """Return the parsed CSR; raise CSRError when it is not one PEM CSR, its signature does
    not verify (the requester does not hold the key), or its key is not ECDSA P-256."""
    if not isinstance(pem, bytes) or len(pem) > MAX_CSR_BYTES:
        raise CSRError("not a PEM certificate signing request")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        # InvalidVersion (a version field other than v1) is no ValueError.
        raise CSRError(f"not a PEM certificate signing request: {exc}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CSRError(f"unreadable public key in the CSR: {exc}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        kind = getattr(getattr(public_key, "curve", None), "name", None) or type(public_key).__name__
        raise CSRError(f"the CSR's key must be ECDSA P-256, not {kind}")
    try:
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        signed = False
    if not signed:
        raise CSRError("the CSR's signature does not verify")
    return csr


def requested_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    """Return the URI SANs the CSR asks for (none when it has no SAN extension); raise
    CSRError for a SAN extension that cannot be parsed."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:
        raise CSRError(f"unreadable extensions in the CSR: {exc}") from None
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Return the certificate's URI SANs (an empty list when it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def certificate_spiffe_id(cert: x509.Certificate) -> str | None:
    """Return the workload SPIFFE ID of a leaf certificate: its one SPIFFE URI SAN when that
    is a valid `spiffe://TD/ns/NS/sa/SA`, else None (no SPIFFE ID, or more than one: the
    X.509-SVID standard allows exactly one)."""
    ids = [uri for uri in uri_sans(cert) if uri.startswith(SCHEME)]
    if len(ids) != 1:
        return None
    try:
        parse_spiffe_id(ids[0])
    except IdentityError:
        return None
    return ids[0]
