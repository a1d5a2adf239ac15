"""What coverage-guided fuzzing found in the CA's checks (fuzz/targets/ca.py), with the input
it found."""

from __future__ import annotations

import base64

import pytest

from meshproxy.identity.ca import CertificateAuthority
from meshproxy.identity.csr import read_csr
from meshproxy.identity.spiffe import CSRError

WEB = "spiffe://cluster.local/ns/default/sa/web"

# A CSR whose version field is 126: `cryptography` raises InvalidVersion, which is no
# ValueError, so it went past every check up to the certificate endpoint: 500, not 400.
BAD_VERSION_DER = (
    b"0\x7f03\x02\x01~0\x000*0\x05\x06\x03+ep\x03!\x00\xeaJlc\xe2\x9cR\n\xbe\xf5P{\x13.\xc5\xf9\x95Gv\xae\xbe"
    b"\xbe{\x92B\x1e\xeai\x14F\xd2,\xa0\x000\x05\x06\x03+ep\x03A\x00\xe1\x9ar\xc5\xe3q\x94\xcec\x91\x80TW\xf9"
    b"\x1a\x9a\xaf\x88)t\xdd\xfb\x14\xd6\x02T\xadV\xad\xb2\x1bF\x18\xe91\xf7\x96Tm\xeeT\xc8\x88\x00O~b_\x1eV"
    b"\x84B\t%\xbb\x08\xe2\xd7\x99\x8d\xc3\x84\x13\r"
)
BAD_VERSION = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(BAD_VERSION_DER)
               + b"-----END CERTIFICATE REQUEST-----\n")


def test_a_csr_of_an_unknown_version_is_malformed() -> None:
    with pytest.raises(CSRError, match="not a PEM certificate signing request"):
        read_csr(BAD_VERSION)


def test_the_ca_refuses_it_as_a_bad_request() -> None:
    ca = CertificateAuthority.in_memory("cluster.local", clock=lambda: 1_750_000_000.0)
    with pytest.raises(CSRError):  # the certificate endpoint's 400
        ca.issue(BAD_VERSION, WEB)
