"""A workload's certificate and its use in TLS between sidecars (spec §5).

`ssl_contexts` turns a Certificate into the server and client `ssl.SSLContext`s of mutual TLS
1.3: both sides present their chain and require the other's, verified up to the trust bundle.
Host names are not checked (`check_hostname=False`): a sidecar's identity is the SPIFFE ID in
its certificate, which `meshproxy.dataplane.tls.peer_identity` reads once the handshake has
verified the chain; the caller compares it with the identity it expects. A rotation makes new
contexts: connections made with the old ones keep going, new ones use the new certificate.

`ssl` loads a certificate and key only from a file. The key is made in memory and should never
touch a disk, so it is handed over in an anonymous memory file (`memfd_create`, Linux): it has
no name in any file system, only this process holds a descriptor, and it is gone once closed,
even if the process dies in between. Where there is no memfd, a file created 0600 in a fresh
0700 temporary folder is used and deleted as soon as it is loaded.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.identity.csr import certificate_spiffe_id, key_pem
from meshproxy.identity.spiffe import IdentityError

ALPN = ["http/1.1"]
# The server side also accepts `h2` (a listener tells the two apart by the preface).
SERVER_ALPN = ["h2", "http/1.1"]
H2_ALPN = ["h2"]


@dataclass(frozen=True)
class Certificate:
    """A workload certificate with its key, as the control plane's CA issued it."""

    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes  # leaf first, then the issuer
    trust_bundle_pem: bytes  # the roots a peer's chain must lead to
    spiffe_id: str
    not_before: float  # unix seconds
    expires: float  # unix seconds (the leaf's NotAfter)
    received: float  # unix seconds: when it arrived, the start of its renewal schedule

    @classmethod
    def from_chain(cls, key: ec.EllipticCurvePrivateKey, chain_pem: bytes, trust_bundle_pem: bytes,
                   received: float) -> "Certificate":
        """Return the Certificate of `key` whose PEM chain is `chain_pem`. Raises IdentityError
        when the chain or bundle does not parse, the leaf is not for `key`, or the leaf
        carries no workload SPIFFE ID."""
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
            x509.load_pem_x509_certificates(trust_bundle_pem)
        except ValueError as exc:
            raise IdentityError(f"unreadable certificate chain or trust bundle: {exc}") from None
        leaf = chain[0]
        if leaf.public_key().public_numbers() != key.public_key().public_numbers():
            raise IdentityError("the certificate issued is not for this proxy's key")
        identity = certificate_spiffe_id(leaf)
        if identity is None:
            raise IdentityError("the certificate issued carries no SPIFFE ID")
        return cls(key, chain_pem, trust_bundle_pem, identity, leaf.not_valid_before_utc.timestamp(),
                   leaf.not_valid_after_utc.timestamp(), received)

    def key_pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM."""
        return key_pem(self.key)

    def valid_at(self, now: float) -> bool:
        """Return True when the certificate is within its validity period at `now`."""
        return self.not_before <= now < self.expires


def _load_chain(contexts: list[ssl.SSLContext], pem: bytes) -> None:
    """Load `pem` (chain then key) into every context, through a memfd or a private file."""
    fd = None
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("meshproxy-certificate", os.MFD_CLOEXEC)
        except OSError:  # a kernel or sandbox without memfd: fall back to a private file
            fd = None
    if fd is not None:
        try:
            _write_all(fd, pem)
            for context in contexts:
                context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshproxy-") as folder:  # mkdtemp: mode 0700
        path = os.path.join(folder, "certificate.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, pem)
        finally:
            os.close(fd)
        for context in contexts:
            context.load_cert_chain(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _context(protocol: int, cert: Certificate, alpn: list[str] = ALPN) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        context.check_hostname = False  # identity is the peer's SPIFFE ID, not a DNS name
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert.trust_bundle_pem.decode("ascii"))
    context.set_alpn_protocols(alpn)
    return context


def ssl_contexts(cert: Certificate) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Return (server context, client context) for mutual TLS 1.3 with `cert`: each presents
    the chain, requires the peer's and verifies it against the trust bundle; ALPN `http/1.1`.

    Raises ssl.SSLError when the key, chain or bundle is refused by OpenSSL."""
    server = _context(ssl.PROTOCOL_TLS_SERVER, cert, SERVER_ALPN)
    client = _context(ssl.PROTOCOL_TLS_CLIENT, cert)
    _load_chain([server, client], cert.chain_pem + cert.key_pem())
    return server, client


def h2_client_context(cert: Certificate) -> ssl.SSLContext:
    """Return the client context for HTTP/2 between sidecars: as `ssl_contexts`' client
    one, offering ALPN `h2` only (the server side accepts `h2` and `http/1.1`)."""
    client = _context(ssl.PROTOCOL_TLS_CLIENT, cert, H2_ALPN)
    _load_chain([client], cert.chain_pem + cert.key_pem())
    return client
