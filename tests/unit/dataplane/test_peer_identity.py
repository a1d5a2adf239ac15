"""The peer's SPIFFE ID as the proxy reads it from a verified TLS handshake
(dataplane/tls.py `peer_identity`): exactly one URI SAN, of the workload form
`spiffe://TD/ns/NS/sa/SA` (spec §5; SPIFFE X509-SVID §2), else no identity.

The handshakes are real TLS 1.3 handshakes between two `ssl` objects over memory BIOs, with
certificates made here, so what is read is what OpenSSL decoded from a verified chain."""

from __future__ import annotations

import datetime
import ssl
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshproxy.dataplane.tls import peer_identity

NOW = datetime.datetime.now(datetime.timezone.utc)


def _cert(subject: str, key, issuer_key, issuer: str, sans: list, ca: bool) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _cert("test root", key, key, "test root", [], ca=True)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _context(side: int, ca, sans: list | None) -> ssl.SSLContext:
    """A TLS 1.3 context that trusts `ca` and requires the peer's certificate; with `sans`,
    it presents a leaf with those SANs."""
    context = ssl.SSLContext(side)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if side == ssl.PROTOCOL_TLS_CLIENT:
        context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=_pem(ca[1]).decode())
    if sans is not None:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _cert("leaf", key, ca[0], "test root", sans, ca=False)
        pem = _pem(leaf) + key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        with tempfile.NamedTemporaryFile() as f:  # ssl loads a chain from a file only
            f.write(pem)
            f.flush()
            context.load_cert_chain(f.name)
    return context


def handshake(ca, client_sans: list) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a handshake in memory; return (server side, client side) once it is done."""
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, ca, [x509.UniformResourceIdentifier(
        "spiffe://cluster.local/ns/default/sa/web")])
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ca, client_sans)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_side=False)
    done = {id(server): False, id(client): False}
    for _ in range(10):
        for side in (client, server):
            if not done[id(side)]:
                try:
                    side.do_handshake()
                    done[id(side)] = True
                except ssl.SSLWantReadError:
                    pass
        # client out -> server in, server out -> client in
        if bios[3].pending:
            bios[0].write(bios[3].read())
        if bios[1].pending:
            bios[2].write(bios[1].read())
        if all(done.values()):
            # TLS 1.3: the server has the client's certificate once it read its Finished.
            return server, client
    raise AssertionError("the handshake did not complete")


WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/shop/sa/api"
URI = x509.UniformResourceIdentifier


def test_a_workload_spiffe_id_is_read_on_both_sides(ca) -> None:
    server, client = handshake(ca, [URI(API)])
    assert peer_identity(server) == API
    assert peer_identity(client) == WEB


@pytest.mark.parametrize("sans", [
    [URI("spiffe://cluster.local/web")],  # not /ns/NS/sa/SA
    [URI("spiffe://cluster.local/ns/default/sa/web/extra")],
    [URI("spiffe://Cluster.Local/ns/default/sa/web")],  # trust domains are lower case
    [URI("spiffe://cluster.local/ns/../sa/web")],
    [URI("spiffe://cluster.local/ns/default/sa/")],
    [URI("https://cluster.local/ns/default/sa/web")],  # not a SPIFFE ID
    [URI(API), URI(WEB)],  # an X509-SVID has exactly one URI SAN
    [URI(API), URI("https://example.com/")],
    [x509.DNSName("api.shop.svc.cluster.local")],  # no URI SAN at all
    [],
], ids=["no-workload-path", "extra-segment", "upper-case-domain", "dot-dot", "empty-account",
        "https", "two-spiffe-ids", "spiffe-and-https", "dns-only", "no-san"])
def test_anything_but_one_workload_spiffe_id_is_no_identity(ca, sans) -> None:
    server, _ = handshake(ca, sans)
    assert server.getpeercert()  # verified: the chain is fine, only the identity is not
    assert peer_identity(server) is None


def test_no_tls_is_no_identity() -> None:
    assert peer_identity(None) is None
