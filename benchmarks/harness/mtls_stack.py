"""The servers of the two-proxy mTLS benchmark: the app, a pair of nginx proxies with TLS
between them, and a pair of meshproxy sidecars with their control plane.

    client ─► client-side proxy ─► TLS, both sides authenticated ─► server-side proxy ─► app

Everything listens on 127.0.0.1 on free ports, lives in the run's work directory, and is started
through the Supervisor (stopped at the end whatever happens). Certificates all come from one CA
made with `meshproxy.identity.ca.init_ca`: the sidecars get theirs from the control plane (which
signs with that CA), the nginx pair gets leaves signed here by the same issuer, with a DNS name
(nginx checks the peer's name against `proxy_ssl_name`; a SPIFFE-only certificate has none).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from harness.procs import Child, Supervisor
from harness.targets import HOST, TargetFailed, free_ports, render, wait_ready

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "default"
APP_PATH = "/1k"
BODY_BYTES = 1024
HOST_HEADER = "server"  # the Service the client calls, on every path


@dataclass
class MeasuredPath:
    """One measured path: where the load generator connects, and the proxies it crosses."""

    name: str
    label: str
    port: int
    proxies: dict[str, Child] = field(default_factory=dict)  # role ("client", "server") -> proxy


def fetch(port: int, path: str = APP_PATH, host: str = HOST_HEADER,
          timeout: float = 3.0) -> tuple[int, bytes] | None:
    """Return (status, body) of GET path on the port, or None when it cannot be fetched."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers(port: int, path: str) -> bool:
    got = fetch(port, path, host="localhost", timeout=1.0)
    return got is not None and got[0] == 200


def _expect_body(name: str, port: int) -> None:
    got = fetch(port)
    if got is None or got[0] != 200 or len(got[1]) != BODY_BYTES:
        summary = None if got is None else (got[0], len(got[1]), got[1][:200])
        raise TargetFailed(f"{name}: GET {APP_PATH} with Host: {HOST_HEADER} on port {port} "
                           f"answered {summary!r}, expected 200 with {BODY_BYTES} bytes")


# -- certificates -------------------------------------------------------------------------------

def make_identity(folder: Path, services: Sequence[str]) -> dict[str, Path]:
    """Make the CA, one bootstrap token per Service for the sidecars, and an nginx certificate
    per Service (chain and key files). Return the paths by name: `ca`, `tokens`, `root`,
    `NAME.crt` / `NAME.key` for each Service."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from meshproxy.identity.ca import CertificateAuthority, init_ca
    from meshproxy.identity.csr import key_pem, new_key
    from meshproxy.identity.tokens import BootstrapTokens

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    init_ca(folder / "ca", TRUST_DOMAIN)
    ca = CertificateAuthority.load(folder / "ca")
    tokens = BootstrapTokens(folder / "tokens", TRUST_DOMAIN)
    paths = {"ca": folder / "ca", "tokens": folder / "tokens", "root": folder / "ca" / "root.crt"}
    now = datetime.now(timezone.utc)
    issuer_pem = ca.issuer.public_bytes(serialization.Encoding.PEM)
    for name in services:
        tokens.issue(NAMESPACE, name)
        key = new_key()
        spiffe = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{name}"
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.UniformResourceIdentifier(spiffe)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca.issuer_key, hashes.SHA256())
        )
        crt, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        crt.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + issuer_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem(key))
        paths[f"{name}.crt"], paths[f"{name}.key"] = crt, key_path
    return paths


# -- nginx configs ------------------------------------------------------------------------------

_NGINX_HEAD = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
"""

# Server side: TLS 1.3 listener that requires a client certificate from the mesh's CA, then
# plaintext to the app over pooled keep-alive connections.
NGINX_SERVER_SIDE = _NGINX_HEAD + """
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive 32;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {root};
        ssl_verify_client on;
        ssl_verify_depth 2;

        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""

# Client side: plaintext listener for the app's calls, TLS 1.3 with its own certificate to the
# server side over pooled keep-alive connections, verifying the server's certificate and name.
NGINX_CLIENT_SIDE = _NGINX_HEAD + """
    upstream server_side {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location / {{
            proxy_pass https://server_side;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {cert};
            proxy_ssl_certificate_key {key};
            proxy_ssl_trusted_certificate {root};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {server_name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"""

MESH_YAML = """\
# Two meshed Services on this machine: `client` (the load generator calls through its sidecar)
# and `server` (its sidecar forwards to the app). STRICT: sidecars speak mTLS only.
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata:
  name: bench-mtls
spec:
  trustDomain: {trust_domain}
  mtls:
    mode: STRICT
  services:
    - name: client
      namespace: {namespace}
      port: 80
      instances:
        - name: client-0
          app: {{address: "127.0.0.1:{client_app_port}"}}
          sidecar: {{outbound: {client_outbound}, inbound: {client_inbound}, admin: {client_admin}, health: {client_health}}}
    - name: server
      namespace: {namespace}
      port: 80
      instances:
        - name: server-0
          app: {{address: "127.0.0.1:{app_port}"}}
          sidecar: {{outbound: {server_outbound}, inbound: {server_inbound}, admin: {server_admin}, health: {server_health}}}
"""


class Stack:
    """Starts the app and the proxy pairs of one run. Ports are chosen at construction."""

    def __init__(self, supervisor: Supervisor, workdir: Path, *, proxy_cpu: int | None,
                 load_cpu: int | None, start_timeout: float, meshproxy_cmd: Sequence[str],
                 meshproxy_args: Sequence[str]) -> None:
        self.sup = supervisor
        self.workdir = workdir
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self.start_timeout = start_timeout
        self.meshproxy_cmd = list(meshproxy_cmd)
        self.meshproxy_args = list(meshproxy_args)
        ports = free_ports(16)
        self.app_port, self.nginx_client_port, self.nginx_server_port, self.control_port = ports[:4]
        self.mesh_ports = {
            "client": dict(zip(("outbound", "inbound", "admin", "health"), ports[4:8])),
            "server": dict(zip(("outbound", "inbound", "admin", "health"), ports[8:12])),
        }
        self.client_app_port = ports[12]  # named in the Mesh; nothing listens there
        self.app: Child | None = None
        self.control: Child | None = None
        self.identity: dict[str, Path] = {}

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def make_identity(self) -> None:
        self.identity = make_identity(self.workdir / "identity", ["client", "server"])

    def start_app(self) -> MeasuredPath:
        """Start the app: nginx, one worker, a 1 KiB body from memory on /1k, keep-alive."""
        directory = self._dir("app")
        conf = directory / "nginx.conf"
        conf.write_text(render("origin-nginx.conf", {
            "dir": directory, "port": self.app_port, "origin_port": self.app_port,
            "sink_port": 0, "big_file": "/dev/null", "body_1k": "x" * BODY_BYTES}))
        self.app = self.sup.start("app", ["nginx", "-p", str(directory), "-c", str(conf)],
                                  cpu=self.load_cpu)
        wait_ready(self.app, lambda: _answers(self.app_port, APP_PATH), self.start_timeout,
                   f"answer GET {APP_PATH} on {HOST}:{self.app_port}")
        _expect_body("app", self.app_port)
        return MeasuredPath("direct", "direct", self.app_port)

    # -- nginx pair --

    def _start_nginx(self, name: str, template: str, port: int, **values: object) -> Child:
        directory = self._dir(name)
        conf = directory / "nginx.conf"
        conf.write_text(template.format(dir=directory, port=port, **values))
        child = self.sup.start(name, ["nginx", "-p", str(directory), "-c", str(conf)],
                               cpu=self.proxy_cpu)
        wait_ready(child, lambda: _accepts(port), self.start_timeout,
                   f"accept connections on {HOST}:{port}")
        return child

    def start_nginx_pair(self) -> MeasuredPath:
        """Start the server-side then the client-side nginx; check the path end to end, and that
        the server side refuses a TLS client without a certificate."""
        ident = self.identity
        server = self._start_nginx(
            "nginx-server", NGINX_SERVER_SIDE, self.nginx_server_port, app_port=self.app_port,
            cert=ident["server.crt"], key=ident["server.key"], root=ident["root"])
        client = self._start_nginx(
            "nginx-client", NGINX_CLIENT_SIDE, self.nginx_client_port,
            upstream_port=self.nginx_server_port, cert=ident["client.crt"],
            key=ident["client.key"], root=ident["root"], server_name="server")
        _expect_body("nginx pair", self.nginx_client_port)
        status = _tls_without_client_cert(self.nginx_server_port, ident["root"])
        if status == 200:
            raise TargetFailed("nginx pair: the server side answered 200 to a TLS client without "
                               "a certificate; ssl_verify_client is not in force")
        return MeasuredPath("nginx", "nginx pair, TLS with client certificates", self.nginx_client_port,
                     {"client": client, "server": server})

    # -- meshproxy pair --

    def start_meshproxy_pair(self) -> MeasuredPath:
        """Start the control plane (with the CA and the tokens), the server's sidecar, then
        the client's; check the path end to end, that the server's sidecar refuses plaintext,
        and that its inbound connections were TLS handshakes."""
        directory = self._dir("meshproxy")
        mesh = directory / "mesh.yaml"
        values: dict[str, object] = {
            "trust_domain": TRUST_DOMAIN, "namespace": NAMESPACE, "app_port": self.app_port,
            "client_app_port": self.client_app_port}
        for role, ports in self.mesh_ports.items():
            values.update({f"{role}_{k}": v for k, v in ports.items()})
        mesh.write_text(MESH_YAML.format(**values))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        control_url = f"http://{HOST}:{self.control_port}"
        argv = [*self.meshproxy_cmd, "control", "--config", str(mesh),
                "--listen", f"{HOST}:{self.control_port}",
                "--ca-dir", str(self.identity["ca"]), "--tokens-dir", str(self.identity["tokens"]),
                "--log-level", "warning"]
        try:
            # The control plane is idle once the sidecars have their snapshot and certificate:
            # it stays off the proxies' core.
            self.control = self.sup.start("control", argv, cpu=self.load_cpu, env=env)
        except OSError as exc:
            raise TargetFailed(f"meshproxy control: cannot run {argv[0]!r}: {exc}") from exc
        wait_ready(self.control, lambda: _status(self.control_port, "/ready") == 200,
                   self.start_timeout, f"answer 200 to GET /ready on {HOST}:{self.control_port}")
        proxies = {}
        for role in ("server", "client"):
            ports = self.mesh_ports[role]
            argv = [*self.meshproxy_cmd, "proxy", "--control", control_url,
                    "--service", role, "--namespace", NAMESPACE, "--instance", f"{role}-0",
                    "--outbound-port", str(ports["outbound"]),
                    "--inbound-port", str(ports["inbound"]),
                    "--admin-port", str(ports["admin"]), "--health-port", str(ports["health"]),
                    "--inbound-bind", HOST,
                    "--token-file", str(self.identity["tokens"] / f"{NAMESPACE}.{role}.token"),
                    "--default-mtls-mode", "STRICT", *self.meshproxy_args]
            if role == "server":
                argv += ["--app-host", HOST, "--app-port", str(self.app_port)]
            name = f"sidecar-{role}"
            try:
                child = self.sup.start(name, argv, cpu=self.proxy_cpu, env=env)
            except OSError as exc:
                raise TargetFailed(f"{name}: cannot run {argv[0]!r}: {exc}") from exc
            wait_ready(child, lambda p=ports["admin"]: _status(p, "/ready") == 200,
                       self.start_timeout,
                       f"answer 200 to GET /ready on {HOST}:{ports['admin']} (configuration "
                       "and certificate in force)")
            proxies[role] = child
        client_port = self.mesh_ports["client"]["outbound"]
        _expect_body("meshproxy pair", client_port)
        inbound = self.mesh_ports["server"]["inbound"]
        plain = fetch(inbound)
        if plain is not None:
            raise TargetFailed(f"meshproxy pair: the server's sidecar answered plaintext on its "
                               f"inbound port {inbound} with {plain[0]}; STRICT is not in force")
        handshakes = _metric_sum(self.mesh_ports["server"]["admin"], "meshproxy_tls_handshakes")
        if not handshakes:
            raise TargetFailed("meshproxy pair: the server's sidecar counts no TLS handshake "
                               "(meshproxy_tls_handshakes) after a request went through it")
        return MeasuredPath("meshproxy", "meshproxy pair, mTLS (STRICT)", client_port, proxies)


def _status(port: int, path: str) -> int | None:
    got = fetch(port, path, host="localhost", timeout=1.0)
    return None if got is None else got[0]


def _metric_sum(admin_port: int, name: str) -> float:
    """Sum of every sample of a metric family on a sidecar's /metrics (0 when absent)."""
    got = fetch(admin_port, "/metrics", host="localhost")
    if got is None or got[0] != 200:
        return 0.0
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$")
    for line in got[1].decode(errors="replace").splitlines():
        m = pattern.match(line)
        if m:
            total += float(m.group(1))
    return total


def _tls_without_client_cert(port: int, root: Path) -> int | None:
    """Status nginx answers over TLS to a client that presents no certificate (400 when the
    server side requires one), or None when the handshake or the answer fails."""
    context = ssl.create_default_context(cafile=str(root))
    context.check_hostname = False
    try:
        with socket.create_connection((HOST, port), timeout=3) as raw, \
                context.wrap_socket(raw, server_hostname="server") as tls:
            tls.sendall(f"GET {APP_PATH} HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
                        .encode())
            head = tls.recv(64)
    except (OSError, ssl.SSLError):
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
