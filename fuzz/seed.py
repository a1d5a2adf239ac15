"""(Re)create the seed corpus of every fuzz target, fuzz/corpus/TARGET/, from the inputs the
tests use: `python3 fuzz/seed.py [TARGET...]`.

- http1_request, http1_response: every request / response bytes literal in the HTTP/1 reader
  tests (tests/unit/http1/), read from their source;
- http2_server, http2_client: the bytes each side sends in the scenarios of
  tests/unit/http2/test_codec.py, made with its own helpers (a client and a server codec
  passing bytes, and its hand-built frames for the floods);
- config: the YAML documents in tests/unit/config/ and tests/spec_examples/;
- ca: the requests of tests/integration/test_identity.py and the CSRs of
  tests/unit/identity/test_ca.py, with fixed keys and deterministic signatures;
- webhook: the AdmissionReview fixture of tests/integration/test_webhook.py, compacted, and the
  reviews and malformed bodies that test sends.

Seeds are named ORIGIN-SHA1PREFIX. Running it again gives the same files.
"""

from __future__ import annotations

import ast
import base64
import copy
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"
CORPUS = HERE / "corpus"
sys.path[:0] = [str(REPO), str(TESTS)]

from fuzz.targets import TARGETS  # noqa: E402 - after the repository is on the path

MAX_SEED = 4096  # bytes: larger literals are left out, the corpus stays small


def test_module(relative: str) -> ModuleType:
    """Import a test module by its path (tests are not a package)."""
    path = TESTS / relative
    spec = importlib.util.spec_from_file_location(f"_seed_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def literals(relative_folder: str, kind: type, accept: re.Pattern) -> Iterable[tuple[str, bytes | str]]:
    """(test file stem, literal) for every bytes or str literal in the test files of a folder
    that `accept` matches at its start."""
    for path in sorted((TESTS / relative_folder).glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, kind) and accept.match(node.value):
                yield path.stem, node.value


# -- HTTP/1 -------------------------------------------------------------------------------

def http1_request() -> Iterable[tuple[str, bytes]]:
    yield from literals("unit/http1", bytes, re.compile(rb"[A-Z]+ \S* HTTP/"))


def http1_response() -> Iterable[tuple[str, bytes]]:
    yield from literals("unit/http1", bytes, re.compile(rb"HTTP/\d"))


# -- HTTP/2 -------------------------------------------------------------------------------

def _h2_scenarios(server_settings) -> Iterable[tuple[str, bytes, bytes]]:
    """(name, client bytes, server bytes) of conversations between two codecs."""
    tc = test_module("unit/http2/test_codec.py")
    from meshproxy.http2.codec import CANCEL, Codec, ConnectionFailed

    def talk(script) -> tuple[bytes, bytes]:
        """Run `script(client, server, turn)` over two codecs, passing bytes both ways."""
        client, server = Codec(server=False), Codec(server=True, settings=server_settings)
        client.start()
        server.start()
        sent_by_client, sent_by_server = [], []
        for turn in range(3):
            script(client, server, turn)
            for _ in range(10):
                to_server, to_client = client.data_to_send(), server.data_to_send()
                if not to_server and not to_client:
                    break
                sent_by_client.append(to_server)
                sent_by_server.append(to_client)
                try:
                    # A side that is finished has closed its connection: it reads no more.
                    if to_server and not server.finished:
                        server.receive(to_server)
                    if to_client and not client.finished:
                        client.receive(to_client)
                except ConnectionFailed:
                    break
        return b"".join(sent_by_client), b"".join(sent_by_server)

    from fuzz.targets.http2_client import GET, POST

    def call(client, server, turn):
        # The client target's own calls: a GET that has ended, a POST with a body.
        if turn == 0:
            get = client.open_stream(GET, end_stream=True)
            post = client.open_stream(POST)
            client.send_data(post, b"\x00\x00\x00\x00\x05hello")
            assert (get, post) == (1, 3)
        elif turn == 1:
            client.send_data(3, b"\x00\x00\x00\x00\x05world", end_stream=True)
            server.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
            server.send_data(1, b"ok", end_stream=True)
            server.send_informational(3, [(b":status", b"103"), (b"link", b"</a>")])
        else:
            server.send_headers(3, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            server.send_data(3, b"\x00\x00\x00\x00\x02hi")
            server.send_trailers(3, [(b"grpc-status", b"0")])

    def reset_and_goaway(client, server, turn):
        if turn == 0:
            client.open_stream(tc.REQUEST, end_stream=True)
            client.open_stream(tc.REQUEST)
        elif turn == 1:
            client.reset(3, CANCEL)
            server.send_headers(1, [(b":status", b"204")], end_stream=True)
        else:
            server.goaway()
            client.goaway()

    def flow_control(client, server, turn):
        if turn == 0:
            stream = client.open_stream(tc.REQUEST)
            client.send_data(stream, b"x" * 1500, end_stream=True)
        elif turn == 1:
            server.consumed(1, 1500)
            server.send_headers(1, [(b":status", b"200")])
            server.send_data(1, b"y" * 1500, end_stream=True)
        else:
            client.consumed(1, 1500)

    for name, script in (("call", call), ("reset-goaway", reset_and_goaway), ("flow", flow_control)):
        to_server, to_client = talk(script)
        yield name, to_server, to_client

    # The hand-built attacker's frames (test_codec.py), a few of each rather than thousands.
    frame, block, literal = tc.frame, tc.request_block, tc.literal
    settings = frame(0x4, 0, 0)
    start = tc.PREFACE + settings
    yield "rapid-reset", start + b"".join(frame(0x1, 0x5, sid, block()) + frame(0x3, 0, sid, CANCEL.to_bytes(4, "big"))
                                          for sid in range(1, 16, 2)), b""
    yield "continuation", start + frame(0x1, 0x0, 1, block()) + b"".join(
        frame(0x9, 0x0, 1, literal(b"x-pad", b"y" * 40)) for _ in range(4)) + frame(0x9, 0x4, 1, b""), b""
    yield "oversized", start + frame(0x1, 0x5, 1, block((b"x-big", b"v" * 1200))), b""
    yield "data-on-stream-0", start + frame(0x0, 0, 0, b"x"), b""
    yield "ping-window-priority", start + frame(0x6, 0, 0, b"12345678") + frame(0x8, 0, 0, b"\x00\x01\x00\x00") \
        + frame(0x2, 0, 1, b"\x00\x00\x00\x00\x10") + frame(0x1, 0x25, 1, b"\x00\x00\x00\x00\x10" + block()), b""


def http2_server() -> Iterable[tuple[str, bytes]]:
    from fuzz.targets.http2_server import SETTINGS

    for name, to_server, _ in _h2_scenarios(SETTINGS):
        if to_server:
            yield name, to_server


def http2_client() -> Iterable[tuple[str, bytes]]:
    from meshproxy.http2.codec import Settings

    for name, _, to_client in _h2_scenarios(Settings()):
        if to_client:
            yield name, to_client


# -- configuration ------------------------------------------------------------------------

def config() -> Iterable[tuple[str, bytes]]:
    for origin, text in literals("unit/config", str, re.compile(r"(?s).*\bkind:")):
        yield origin, text.encode()
    # The spec's examples in one file: the cross-document checks then have something to check.
    examples = sorted((TESTS / "spec_examples").glob("*.yaml"))
    yield "spec-examples", b"\n---\n".join(p.read_bytes() for p in examples)


# -- the CA -------------------------------------------------------------------------------

def ca() -> Iterable[tuple[str, bytes]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from fuzz.targets.ca import API_TOKEN, WEB_TOKEN

    web, api = "spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/default/sa/api"

    def csr(key, uris=(), dns=()) -> bytes:
        """A CSR as test_ca.py's csr_for makes it, signed deterministically; DER."""
        names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            signed = builder.sign(key, None)
        else:
            signed = builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
        return signed.public_bytes(serialization.Encoding.DER)

    p256 = ec.derive_private_key(0x5EED, ec.SECP256R1())
    plain = csr(p256)
    ders = {
        "csr-plain": plain,
        "csr-web": csr(p256, [web]),
        "csr-api": csr(p256, [api]),
        "csr-dns": csr(p256, dns=["evil.example.com"]),
        "csr-two": csr(p256, [web, api]),
        "csr-p384": csr(ec.derive_private_key(0x5EED, ec.SECP384R1())),
        "csr-ed25519": csr(ed25519.Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)),
        "csr-forged": plain[:-1] + bytes([plain[-1] ^ 1]),
    }
    # First byte: 1 is `Authorization: Bearer` the token of default/web (fuzz/targets/ca.py).
    for name, der in ders.items():
        yield name, b"\x01" + der
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(plain)
           + b"-----END CERTIFICATE REQUEST-----\n").decode()
    bodies = {
        "body-token": ({"csr": pem, "token": WEB_TOKEN}, 0),
        "body-bearer-api": ({"csr": pem}, 2),
        "body-wrong-token": ({"csr": pem, "token": "0" * 64}, 0),
        "body-no-token": ({"csr": pem}, 0),
        "body-malformed-csr": ({"csr": "not a csr", "token": API_TOKEN}, 0),
        "body-csr-number": ({"csr": 42, "token": WEB_TOKEN}, 0),
        "body-empty": ({}, 1),
    }
    for name, (body, header) in bodies.items():
        yield name, bytes([header]) + json.dumps(body).encode()
    yield "body-form", b"\x01csr=x&token=y"


# -- the webhook --------------------------------------------------------------------------

def webhook() -> Iterable[tuple[str, bytes]]:
    fixture = json.loads((TESTS / "integration/fixtures/admissionreview-pod-create.json").read_text())

    def compact(value) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    yield "pod-create", compact(fixture)
    # The test's other reviews change the fixture; here they change a small one, so that the
    # corpus stays small: one pod with one container, in the namespace labelled for injection.
    small = {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {
        "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "shop",
        "operation": "CREATE", "object": {"metadata": {"name": "p", "labels": {"app": "p"}}, "spec": {
            "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}}}

    def changed(change) -> bytes:
        review = copy.deepcopy(small)
        change(review["request"])
        return compact(review)

    yield "small-pod", compact(small)
    yield "annotated-disabled", changed(lambda r: r["object"]["metadata"].update(
        annotations={"meshproxy.io/inject": "disabled"}))
    yield "other-namespace-enabled", changed(lambda r: (r.update(namespace="other"), r["object"]["metadata"].update(
        namespace="other", annotations={"meshproxy.io/inject": "enabled"})))
    yield "refused-annotation", changed(lambda r: r["object"]["metadata"].update(
        annotations={"config.meshproxy.io/proxy-cpu-request": "lots"}))
    yield "delete", changed(lambda r: r.update(operation="DELETE", object=None))
    for i, body in enumerate([
        b"not json",
        b"[1, 2]",
        compact({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "x"}}),
        compact({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}),
        compact({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": ""}}),
    ]):
        yield f"malformed-{i}", body


SOURCES = {
    "http1_request": http1_request, "http1_response": http1_response,
    "http2_server": http2_server, "http2_client": http2_client,
    "config": config, "ca": ca, "webhook": webhook,
}


def write(target: str) -> tuple[int, int]:
    """Replace fuzz/corpus/TARGET/ with the target's seeds; return (files, bytes)."""
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    seen: set[bytes] = set()
    size = 0
    for origin, data in SOURCES[target]():
        if data in seen or len(data) > max(MAX_SEED, TARGETS[target].max_len // 2):
            continue
        seen.add(data)
        (folder / f"{origin}-{hashlib.sha1(data).hexdigest()[:10]}").write_bytes(data)
        size += len(data)
    return len(seen), size


def main(argv: list[str]) -> int:
    targets = argv or list(TARGETS)
    for target in targets:
        if target not in SOURCES:
            print(f"unknown target {target!r} (known: {', '.join(SOURCES)})", file=sys.stderr)
            return 2
        files, size = write(target)
        print(f"{target}: {files} seeds, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
