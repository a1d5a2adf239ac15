"""A mesh with identities for integration tests: the CA and bootstrap tokens on disk, a control
plane that signs certificates, sidecars that get theirs from it, and a TLS client the test
drives itself (with a certificate of its choosing, or none).

    ident = Identities.make(tmp_path / "identity", ["client", "server"])
    write_mesh(folder / "mesh.yaml", services=[meshed("server", backend.port)], policies=["policy.yaml"])
    control = start_control(tmp_path, folder / "mesh.yaml", ident, lifetime="5s")
    server = start_sidecar(tmp_path, control, ident, "server", instance="server-0", app_port=backend.port)
    client = start_sidecar(tmp_path, control, ident, "client")
    wait_for_endpoint(client, "server.default", server.inbound)

Everything is a real process on 127.0.0.1 and every certificate is one the project's CA code
issues; nothing is mocked.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from meshproxy.dataplane.tls import peer_identity
from meshproxy.identity.ca import CertificateAuthority, init_ca
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.tls import Certificate, ssl_contexts
from meshproxy.identity.tokens import BootstrapTokens
from support.control import ControlProcess
from support.proxy import ProxyProcess, wait_for

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "default"


def spiffe(service: str, namespace: str = NAMESPACE) -> str:
    """The SPIFFE ID a sidecar of `service` proves (spec §5, outside Kubernetes)."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service}"


@dataclass
class Identities:
    """The mesh's CA folder and a folder of bootstrap tokens, one per Service."""

    ca_dir: Path
    tokens_dir: Path

    @classmethod
    def make(cls, folder: Path, services: list[str]) -> "Identities":
        init_ca(folder / "ca", TRUST_DOMAIN)
        tokens = BootstrapTokens(folder / "tokens", TRUST_DOMAIN)
        for service in services:
            tokens.issue(NAMESPACE, service)
        return cls(folder / "ca", folder / "tokens")

    def token_file(self, service: str) -> Path:
        return BootstrapTokens(self.tokens_dir, TRUST_DOMAIN).path(NAMESPACE, service)

    def ca(self) -> CertificateAuthority:
        """The mesh's own CA, as the control plane loads it."""
        return CertificateAuthority.load(self.ca_dir)


def meshed(service: str, app_port: int, *, instance: str | None = None, inbound: int | None = None) -> dict:
    """A Service with one meshed instance (app on 127.0.0.1:`app_port`); `inbound` fixes its
    sidecar's inbound port in the file, otherwise the sidecar registers it."""
    entry: dict = {"name": instance or f"{service}-0", "app": {"address": f"127.0.0.1:{app_port}"}}
    if inbound is not None:
        entry["sidecar"] = {"inbound": inbound}
    return {"name": service, "namespace": NAMESPACE, "port": 80, "instances": [entry]}


def write_mesh(path: Path, services: list[dict], policies: list[str] = ()) -> None:
    doc = {"apiVersion": "meshproxy.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "mtls"},
           "spec": {"trustDomain": TRUST_DOMAIN, "outboundTrafficPolicy": "ALLOW_ANY",
                    "services": services, "policies": list(policies)}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def replace_file(path: Path, text: str) -> None:
    """Save the way editors do: write a new file, rename it over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def peer_authentication(service: str, mode: str) -> dict:
    return {"apiVersion": "meshproxy.io/v1alpha1", "kind": "PeerAuthentication",
            "metadata": {"name": f"{service}-{mode.lower()}", "namespace": NAMESPACE},
            "spec": {"targetRef": {"kind": "Service", "name": service}, "mtls": {"mode": mode}}}


def start_control(tmp_path: Path, mesh_file: Path, identities: Identities, *,
                  lifetime: str = "1h") -> ControlProcess:
    return ControlProcess(tmp_path, [mesh_file], extra_args=[
        "--ca-dir", str(identities.ca_dir), "--tokens-dir", str(identities.tokens_dir),
        "--cert-lifetime", lifetime]).start()


def start_sidecar(tmp_path: Path, control: ControlProcess, identities: Identities, service: str, *,
                  instance: str | None = None, app_port: int | None = None, token: str | None = None,
                  default_mode: str = "STRICT", extra_args: list[str] = ()) -> ProxyProcess:
    """A sidecar of `service` on the control plane, proving its identity with the token of
    `token` (default: its own Service's); ready once it holds a certificate."""
    proxy = ProxyProcess(tmp_path, "", service=service, instance=instance, app_port=app_port,
                         name=instance or service, control=control.url, extra_args=[
                             "--token-file", str(identities.token_file(token or service)),
                             "--default-mtls-mode", default_mode, *extra_args])
    return proxy.start()


def endpoint_addresses(proxy: ProxyProcess, service_key: str) -> list[str]:
    status, body = proxy.admin_get("/endpoints")
    if status != 200:
        return []
    service = json.loads(body).get(service_key) or {}
    return [e["address"] for e in service.get("endpoints", []) if e.get("meshed")]


def wait_for_endpoint(proxy: ProxyProcess, service_key: str, inbound: int, timeout: float = 10.0) -> None:
    """Wait until `proxy` sends `service_key` to a sidecar's inbound port `inbound`."""
    wait_for(lambda: endpoint_addresses(proxy, service_key) == [f"127.0.0.1:{inbound}"], timeout=timeout,
             what=f"{service_key} at its sidecar's inbound port {inbound}")


def request(port: int, path: str, *, host: str, method: str = "GET", headers: dict | list | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One plaintext HTTP/1.1 request on a new connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in (headers.items() if isinstance(headers, dict) else headers or ()):
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def header_values(body: bytes, name: str) -> list[str]:
    """The values of header `name` in a /headers answer of the test backend (as received)."""
    return [value for key, value in json.loads(body) if key.lower() == name.lower()]


# Certificates the test holds itself.

def workload_certificate(ca: CertificateAuthority, spiffe_id: str, *, lifetime: float = 3600.0,
                         trust_bundle: bytes | None = None) -> Certificate:
    """A certificate for `spiffe_id` signed by `ca` (key made here), trusting `trust_bundle`
    (default: `ca`'s own root)."""
    key = new_key()
    issued = ca.issue(make_csr(key), spiffe_id, lifetime)
    return Certificate.from_chain(key, issued.chain_pem, trust_bundle or ca.trust_bundle(), time.time())


def client_context(certificate: Certificate | None, trust_bundle: bytes) -> ssl.SSLContext:
    """A TLS 1.3 client context that trusts `trust_bundle` and presents `certificate` (or none)."""
    if certificate is not None:
        return ssl_contexts(certificate)[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=trust_bundle.decode())
    return context


@dataclass
class TLSOutcome:
    """What a TLS client saw: whether the handshake completed on its side, the error that
    ended the exchange (None when an answer came), the bytes received, the server's SPIFFE ID."""

    handshake: bool
    error: str | None
    data: bytes
    server_id: str | None = None

    @property
    def answered(self) -> bool:
        return self.data.startswith(b"HTTP/1.1 ")


def tls_exchange(port: int, context: ssl.SSLContext, payload: bytes, timeout: float = 10.0) -> TLSOutcome:
    """Connect to 127.0.0.1:`port` with TLS, send `payload`, read until the server closes
    (or an answer with `Connection: close` ends). In TLS 1.3 the client's handshake completes
    before the server has checked the client certificate, so a refusal of that certificate
    shows on the first read."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    handshake, server_id, data = False, None, b""
    try:
        sock = context.wrap_socket(raw, server_hostname=None)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return TLSOutcome(False, f"{type(exc).__name__}: {exc}", b"")
    try:
        handshake = True
        server_id = peer_identity(sock)
        sock.sendall(payload)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return TLSOutcome(handshake, None if data else "closed", data, server_id)
            data += chunk
    except (ssl.SSLError, OSError) as exc:
        return TLSOutcome(handshake, f"{type(exc).__name__}: {exc}", data, server_id)
    finally:
        sock.close()


def closed_without_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read from `sock` until the peer closes it (EOF or reset); return what was received.
    Raises AssertionError when it stays open past `timeout`."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except TimeoutError:
        raise AssertionError(f"the connection stayed open for {timeout}s (received {data[:80]!r})") from None
