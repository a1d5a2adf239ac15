"""The servers of benchmarks/h2.py: HTTP/2 and gRPC backends, nginx doing the same work as
the sidecar, standalone sidecars, and the two-sidecar mTLS paths with their nginx pairs.

Everything listens on 127.0.0.1 on free ports chosen at construction, lives in the run's work
directory, and is started through the Supervisor (stopped at the end whatever happens).
Backends, apps and the control plane run on the load core; nginx and the sidecars on the proxy
core.

- `H2Stack` (cases h2, h2-grpc, spread): one backend nginx with an HTTP/1.1 port answering
  `GET /` with `ok` and an h2c port answering any POST with a fixed gRPC reply (a 2-byte
  message and `grpc-status: 0` in trailers, from memory: a gRPC backend faster than any proxy
  in front of it); three grpcio backends b0, b1, b2 (harness/grpc_app.py); one nginx with two
  h2c listeners (`listen ... http2`, prior knowledge: nginx 1.22's syntax) doing `proxy_pass`
  over pooled HTTP/1.1 to the first port, `grpc_pass` to the h2c port, and `grpc_pass` to the
  three grpcio backends; one standalone sidecar (`meshproxy proxy --config`) whose Mesh names
  them as the Services `origin`, `grpcb` and `echo`.
- `PairStack` (case mtls): an nginx app (1 KiB on `/1k`, as in benchmarks/mtls_pair.py), a
  grpcio app, a control plane with the mesh's CA, three sidecars (the client's; `server`'s in
  front of the nginx app; `echo`'s in front of the grpcio app; STRICT mTLS), an nginx pair
  with TLS and client certificates for HTTP/1.1 (mtls_pair.py's configs) and one for gRPC
  (client side: h2c listener, `grpc_pass grpcs://` with `grpc_ssl_certificate`,
  `grpc_ssl_verify on`; server side: `listen ... ssl http2` with `ssl_verify_client on`,
  `grpc_pass grpc://` to the app).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from harness.mtls_stack import (NAMESPACE, NGINX_CLIENT_SIDE, NGINX_SERVER_SIDE, TRUST_DOMAIN,
                                MeasuredPath, _expect_body, _metric_sum, _status, make_identity)
from harness.procs import Child, Supervisor, die_with_parent
from harness.targets import HOST, TargetFailed, free_ports, render, wait_ready

GRPC_APP = Path(__file__).resolve().parent / "grpc_app.py"
# The static gRPC reply of the backend nginx: uncompressed flag, 4-byte length, `ok`.
GRPC_REPLY = b"\x00\x00\x00\x00\x02ok"
GRPC_METHOD_PATH = "/demo.Echo/Unary"

_HEAD = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # No connection, HTTP/1.1 or HTTP/2, is closed for its number of requests during a run
    # (in nginx 1.19.7+ keepalive_requests also bounds an HTTP/2 connection's streams).
    keepalive_requests 100000000;
    keepalive_timeout 75s;
"""

BACKEND_NGINX = _HEAD + """
    default_type text/plain;

    server {{
        listen 127.0.0.1:{http_port} backlog=4096;
        location = / {{
            return 200 "ok\\n";
        }}
    }}

    # A gRPC backend from memory: every POST is answered with {dir}/www/reply (a gRPC message)
    # and grpc-status 0 in trailers. nginx's static module refuses POST with 405; error_page
    # turns that into the file with 200. The mirror subrequest makes nginx read the whole
    # request first: answered before its end, a call's stream would be reset (NO_ERROR) after
    # the answer, which nginx's grpc_pass takes for a frame on an unknown stream (502).
    # Default http2_max_concurrent_streams: 128.
    server {{
        listen 127.0.0.1:{grpc_port} http2 backlog=4096;
        location = /_read_body {{
            internal;
            return 204;
        }}
        location / {{
            mirror /_read_body;
            root {dir}/www;
            default_type application/grpc;
            try_files /reply =404;
            error_page 405 =200 $uri;
            add_trailer grpc-status 0 always;
        }}
    }}
}}
"""

# nginx as the reference: h2c with prior knowledge on both listeners (nginx 1.22: `listen ...
# http2`; 1.25.1+ would say `http2 on;`), pooled upstream connections, kept for the whole run
# (keepalive 1024: at -c 10 -m 100 up to 1000 requests are in flight, each on its own HTTP/1.1
# or gRPC upstream connection in nginx).
NGINX_H2_PROXY = _HEAD + """
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}
    upstream grpcb {{
        server 127.0.0.1:{grpc_port};
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}
    upstream echo {{
{echo_servers}
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;

        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location /demo.Echo/ {{
            grpc_pass grpc://grpcb;
        }}
    }}

    server {{
        listen 127.0.0.1:{spread_port} http2 backlog=4096;
        location / {{
            grpc_pass grpc://echo;
        }}
    }}
}}
"""

MESH_STANDALONE = """\
# The standalone sidecar of benchmarks/h2.py: unmeshed Services (the app address, no
# sidecar), reached by authority: `origin` (HTTP/1.1), `grpcb` (the static gRPC backend,
# h2c), `echo` (three grpcio backends).
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata:
  name: bench-grpc
spec:
  trustDomain: cluster.local
  outboundTrafficPolicy: ALLOW_ANY
  services:
    - name: origin
      namespace: default
      port: 80
      instances:
        - name: origin-0
          sidecar: false
          app: {{address: "127.0.0.1:{origin_port}"}}
    - name: grpcb
      namespace: default
      port: 80
      instances:
        - name: grpcb-0
          sidecar: false
          app: {{address: "127.0.0.1:{grpc_port}"}}
    - name: echo
      namespace: default
      port: 80
      instances:
{echo_instances}
"""


def _accepts(port: int) -> bool:
    import socket
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_get(port: int, path: str, host: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def h2_get(port: int, path: str, authority: str, timeout: float = 3.0) -> tuple[int, bytes] | None:
    """(status, body) of GET path over HTTP/2 with prior knowledge (curl), or None."""
    try:
        done = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "--max-time", str(timeout),
                               "-H", f"Host: {authority}", "-w", "\n%{http_code}",
                               f"http://{HOST}:{port}{path}"], capture_output=True,
                              timeout=timeout + 2)
    except (OSError, subprocess.TimeoutExpired):
        return None
    body, _, code = done.stdout.rpartition(b"\n")
    return (int(code), body) if done.returncode == 0 and code.isdigit() else None


def grpc_call(port: int, authority: str = "", request: bytes = b"check",
              timeout: float = 3.0) -> tuple[str, bytes]:
    """One unary call of demo.Echo/Unary on 127.0.0.1:port: (status code name, answer)."""
    import grpc
    options = [("grpc.default_authority", authority)] if authority else []
    options.append(("grpc.use_local_subchannel_pool", 1))
    with grpc.insecure_channel(f"{HOST}:{port}", options=options) as channel:
        call = channel.unary_unary(GRPC_METHOD_PATH, request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        try:
            return "OK", call(request, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name, (exc.details() or "").encode()


def _expect_grpc(name: str, port: int, authority: str, prefix: bytes | None = None) -> None:
    code, answer = grpc_call(port, authority)
    ok = code == "OK" and (answer == b"ok" if prefix is None else answer.startswith(prefix))
    if not ok:
        raise TargetFailed(f"{name}: a gRPC call to 127.0.0.1:{port} (authority "
                           f"{authority or '-'}) ended {code} {answer[:200]!r}")


class _Base:
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
        self.started: dict[str, Child] = {}  # everything started, by name

    def _start(self, name: str, argv: Sequence[str], cpu: int | None,
               env: dict[str, str] | None = None) -> Child:
        try:
            child = self.sup.start(name, argv, cpu=cpu, env=env)
        except OSError as exc:
            raise TargetFailed(f"{name}: cannot run {argv[0]!r}: {exc}") from exc
        self.started[name] = child
        return child

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _nginx(self, name: str, text: str, ports: Sequence[int], cpu: int | None) -> Child:
        directory = self._dir(name)
        conf = directory / "nginx.conf"
        conf.write_text(text)
        child = self._start(name, ["nginx", "-p", str(directory), "-c", str(conf)], cpu)
        wait_ready(child, lambda: all(_accepts(p) for p in ports), self.start_timeout,
                   f"accept connections on {', '.join(str(p) for p in ports)}")
        return child

    def _grpc_app(self, name: str, port: int) -> Child:
        argv = [sys.executable, str(GRPC_APP), "--port", str(port), "--name", name,
                "--server", "sync"]
        child = self._start(name, argv, self.load_cpu)
        wait_ready(child, lambda: _accepts(port), self.start_timeout,
                   f"accept connections on {HOST}:{port}")
        _expect_grpc(name, port, "", prefix=name.encode() + b":")
        return child


class H2Stack(_Base):
    """Backends, the nginx proxy and the standalone sidecar of the cases h2, h2-grpc, spread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ports = free_ports(12)
        (self.origin_port, self.grpc_port, self.nginx_port, self.spread_port,
         self.outbound, self.inbound, self.admin, self.health) = ports[:8]
        self.echo_ports = ports[8:11]
        self.backend: Child | None = None
        self.echo: list[Child] = []
        self.nginx: Child | None = None
        self.meshproxy: Child | None = None
        self.restarts = 0  # a restarted proxy logs to NAME-N.log: the stuck one's log stays

    def start_backend(self) -> Child:
        directory = self._dir("backend")
        www = directory / "www"
        www.mkdir(exist_ok=True)
        (www / "reply").write_bytes(GRPC_REPLY)
        for path in (directory, www, www / "reply"):
            path.chmod(0o755)  # nginx workers started by root run as `nobody`
        text = BACKEND_NGINX.format(dir=directory, http_port=self.origin_port,
                                    grpc_port=self.grpc_port)
        self.backend = self._nginx("backend", text, [self.origin_port, self.grpc_port],
                                   self.load_cpu)
        got = _http_get(self.origin_port, "/", "origin")
        if got != (200, b"ok\n"):
            raise TargetFailed(f"backend: GET / answered {got!r}")
        _expect_grpc("backend (static gRPC)", self.grpc_port, "")
        return self.backend

    def start_echo(self) -> list[Child]:
        self.echo = [self._grpc_app(f"b{i}", port) for i, port in enumerate(self.echo_ports)]
        return self.echo

    def _name(self, base: str) -> str:
        return base if not self.restarts else f"{base}-{self.restarts + 1}"

    def start_nginx(self) -> Child:
        servers = "\n".join(f"        server 127.0.0.1:{p};" for p in self.echo_ports)
        directory = self._dir("nginx")
        text = NGINX_H2_PROXY.format(dir=directory, port=self.nginx_port,
                                     spread_port=self.spread_port, origin_port=self.origin_port,
                                     grpc_port=self.grpc_port, echo_servers=servers)
        self.nginx = self._nginx(self._name("nginx"), text, [self.nginx_port, self.spread_port],
                                 self.proxy_cpu)
        return self.nginx

    def start_meshproxy(self) -> Child:
        """Start the standalone sidecar and return it once GET /ready answers 200."""
        directory = self._dir("meshproxy")
        mesh = directory / "mesh.yaml"
        instances = "\n".join(
            f"        - name: b{i}\n          sidecar: false\n"
            f"          app: {{address: \"127.0.0.1:{p}\"}}" for i, p in enumerate(self.echo_ports))
        mesh.write_text(MESH_STANDALONE.format(origin_port=self.origin_port,
                                               grpc_port=self.grpc_port,
                                               echo_instances=instances))
        argv = [*self.meshproxy_cmd, "proxy", "--config", str(mesh), "--service", "bench-client",
                "--outbound-port", str(self.outbound), "--inbound-port", str(self.inbound),
                "--admin-port", str(self.admin), "--health-port", str(self.health),
                "--inbound-bind", HOST, *self.meshproxy_args]
        child = self._start(self._name("meshproxy"), argv, self.proxy_cpu,
                            dict(os.environ, PYTHONUNBUFFERED="1"))
        wait_ready(child, lambda: _status(self.admin, "/ready") == 200, self.start_timeout,
                   f"answer 200 to GET /ready on {HOST}:{self.admin}")
        self.meshproxy = child
        return child

    def restart_meshproxy(self) -> Child:
        """Stop the sidecar (SIGTERM, SIGKILL after 5 s) and start it again."""
        if self.meshproxy is not None:
            self.sup.stop(self.meshproxy)
        self.restarts += 1
        return self.start_meshproxy()

    def restart_nginx(self) -> Child:
        if self.nginx is not None:
            self.sup.stop(self.nginx)
        self.restarts += 1
        return self.start_nginx()

    def check(self, target: str) -> None:
        """Raise TargetFailed unless the target forwards each kind of request."""
        port = self.nginx_port if target == "nginx" else self.outbound
        spread = self.spread_port if target == "nginx" else self.outbound
        got = h2_get(port, "/", "origin")
        if got != (200, b"ok\n"):
            raise TargetFailed(f"{target}: GET / over HTTP/2 with authority origin on {port} "
                               f"answered {got!r}")
        _expect_grpc(f"{target} (to the static gRPC backend)", port, "grpcb")
        if self.echo:
            _expect_grpc(f"{target} (to b0..b2)", spread, "echo", prefix=b"b")

    def ready(self, target: str) -> bool:
        """True when the target still answers its admin (meshproxy) or a request (nginx)."""
        if target == "meshproxy":
            return _status(self.admin, "/ready") == 200
        return h2_get(self.nginx_port, "/", "origin", timeout=2.0) is not None


MESH_PAIR = """\
# The mTLS paths of benchmarks/h2.py: the load generator calls through `client`'s sidecar;
# `server`'s sidecar forwards to an nginx app (HTTP/1.1), `echo`'s to a grpcio app. STRICT.
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata:
  name: bench-grpc-mtls
spec:
  trustDomain: {trust_domain}
  mtls:
    mode: STRICT
  services:
{services}
"""

_SERVICE = """\
    - name: {name}
      namespace: {namespace}
      port: 80
      instances:
        - name: {name}-0
          app: {{address: "127.0.0.1:{app_port}"}}
          sidecar: {{outbound: {outbound}, inbound: {inbound}, admin: {admin}, health: {health}}}
"""

# gRPC over TLS between two nginx, both sides authenticated. Server side: TLS 1.3 and HTTP/2
# (ALPN h2), a client certificate from the mesh's CA required, then h2c to the app over pooled
# connections.
NGINX_GRPC_SERVER_SIDE = _HEAD + """
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive 32;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {root};
        ssl_verify_client on;
        ssl_verify_depth 2;

        location / {{
            grpc_pass grpc://app;
        }}
    }}
}}
"""

# Client side: h2c listener for the app's calls, gRPC over TLS 1.3 with its own certificate to
# the server side, verifying the server's certificate and name, pooled connections.
NGINX_GRPC_CLIENT_SIDE = _HEAD + """
    upstream server_side {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;

        location / {{
            grpc_pass grpcs://server_side;
            grpc_ssl_protocols TLSv1.3;
            grpc_ssl_certificate {cert};
            grpc_ssl_certificate_key {key};
            grpc_ssl_trusted_certificate {root};
            grpc_ssl_verify on;
            grpc_ssl_verify_depth 2;
            grpc_ssl_name {server_name};
            grpc_ssl_server_name on;
            grpc_ssl_session_reuse on;
        }}
    }}
}}
"""


class PairStack(_Base):
    """The apps, the control plane, three sidecars and two nginx pairs of the case mtls."""

    ROLES = ("client", "server", "echo")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ports = free_ports(24)
        (self.app_port, self.grpc_app_port, self.control_port, self.client_app_port) = ports[:4]
        self.nginx_ports = dict(zip(("http_client", "http_server", "grpc_client", "grpc_server"),
                                    ports[4:8]))
        self.mesh_ports = {role: dict(zip(("outbound", "inbound", "admin", "health"),
                                          ports[8 + 4 * i:12 + 4 * i]))
                           for i, role in enumerate(self.ROLES)}
        self.app: Child | None = None
        self.grpc_app: Child | None = None
        self.control: Child | None = None
        self.sidecars: dict[str, Child] = {}
        self.identity: dict[str, Path] = {}

    def start_apps(self) -> None:
        directory = self._dir("app")
        text = render("origin-nginx.conf", {
            "dir": directory, "port": self.app_port, "origin_port": self.app_port,
            "sink_port": 0, "big_file": "/dev/null", "body_1k": "x" * 1024})
        self.app = self._nginx("app", text, [self.app_port], self.load_cpu)
        _expect_body("app", self.app_port)
        self.grpc_app = self._grpc_app("echo", self.grpc_app_port)
        self.identity = make_identity(self.workdir / "identity", list(self.ROLES))

    def start_nginx_pairs(self) -> dict[str, MeasuredPath]:
        ident, p = self.identity, self.nginx_ports
        http_server = self._nginx("nginx-http-server", NGINX_SERVER_SIDE.format(
            dir=self._dir("nginx-http-server"), port=p["http_server"], app_port=self.app_port,
            cert=ident["server.crt"], key=ident["server.key"], root=ident["root"]),
            [p["http_server"]], self.proxy_cpu)
        http_client = self._nginx("nginx-http-client", NGINX_CLIENT_SIDE.format(
            dir=self._dir("nginx-http-client"), port=p["http_client"],
            upstream_port=p["http_server"], cert=ident["client.crt"], key=ident["client.key"],
            root=ident["root"], server_name="server"), [p["http_client"]], self.proxy_cpu)
        _expect_body("nginx HTTP/1.1 pair", p["http_client"])
        grpc_server = self._nginx("nginx-grpc-server", NGINX_GRPC_SERVER_SIDE.format(
            dir=self._dir("nginx-grpc-server"), port=p["grpc_server"],
            app_port=self.grpc_app_port, cert=ident["echo.crt"], key=ident["echo.key"],
            root=ident["root"]), [p["grpc_server"]], self.proxy_cpu)
        grpc_client = self._nginx("nginx-grpc-client", NGINX_GRPC_CLIENT_SIDE.format(
            dir=self._dir("nginx-grpc-client"), port=p["grpc_client"],
            upstream_port=p["grpc_server"], cert=ident["client.crt"], key=ident["client.key"],
            root=ident["root"], server_name="echo"), [p["grpc_client"]], self.proxy_cpu)
        _expect_grpc("nginx gRPC pair", p["grpc_client"], "echo", prefix=b"echo:")
        return {
            "http1": MeasuredPath("nginx", "nginx pair, TLS with client certificates",
                                  p["http_client"], {"client": http_client, "server": http_server}),
            "grpc": MeasuredPath("nginx", "nginx pair, grpc_pass over TLS with client "
                                 "certificates", p["grpc_client"],
                                 {"client": grpc_client, "server": grpc_server}),
        }

    def start_meshproxy(self) -> dict[str, MeasuredPath]:
        """Start the control plane, the `server` and `echo` sidecars, then the client's; check
        both paths end to end and that the server-side sidecars counted TLS handshakes."""
        directory = self._dir("meshproxy")
        mesh = directory / "mesh.yaml"
        apps = {"client": self.client_app_port, "server": self.app_port,
                "echo": self.grpc_app_port}
        services = "".join(_SERVICE.format(name=role, namespace=NAMESPACE, app_port=apps[role],
                                           **self.mesh_ports[role]) for role in self.ROLES)
        mesh.write_text(MESH_PAIR.format(trust_domain=TRUST_DOMAIN, services=services))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        argv = [*self.meshproxy_cmd, "control", "--config", str(mesh),
                "--listen", f"{HOST}:{self.control_port}",
                "--ca-dir", str(self.identity["ca"]), "--tokens-dir", str(self.identity["tokens"]),
                "--log-level", "warning"]
        self.control = self._start("control", argv, self.load_cpu, env)
        wait_ready(self.control, lambda: _status(self.control_port, "/ready") == 200,
                   self.start_timeout, f"answer 200 to GET /ready on {HOST}:{self.control_port}")
        for role in ("server", "echo", "client"):
            ports = self.mesh_ports[role]
            argv = [*self.meshproxy_cmd, "proxy", "--control", f"http://{HOST}:{self.control_port}",
                    "--service", role, "--namespace", NAMESPACE, "--instance", f"{role}-0",
                    "--outbound-port", str(ports["outbound"]),
                    "--inbound-port", str(ports["inbound"]),
                    "--admin-port", str(ports["admin"]), "--health-port", str(ports["health"]),
                    "--inbound-bind", HOST,
                    "--token-file", str(self.identity["tokens"] / f"{NAMESPACE}.{role}.token"),
                    "--default-mtls-mode", "STRICT", *self.meshproxy_args]
            if role != "client":
                argv += ["--app-host", HOST, "--app-port", str(apps[role])]
            child = self._start(f"sidecar-{role}", argv, self.proxy_cpu, env)
            wait_ready(child, lambda p=ports["admin"]: _status(p, "/ready") == 200,
                       self.start_timeout, f"answer 200 to GET /ready on {HOST}:{ports['admin']}")
            self.sidecars[role] = child
        outbound = self.mesh_ports["client"]["outbound"]
        _expect_body("meshproxy HTTP/1.1 pair", outbound)
        _expect_grpc("meshproxy gRPC pair", outbound, "echo", prefix=b"echo:")
        for role in ("server", "echo"):
            if not _metric_sum(self.mesh_ports[role]["admin"], "meshproxy_tls_handshakes"):
                raise TargetFailed(f"meshproxy pair: {role}'s sidecar counts no TLS handshake "
                                   "after a call went through it")
        side = self.sidecars
        return {
            "http1": MeasuredPath("meshproxy", "meshproxy pair, mTLS (STRICT)", outbound,
                                  {"client": side["client"], "server": side["server"]}),
            "grpc": MeasuredPath("meshproxy", "meshproxy pair, mTLS (STRICT), h2 between "
                                 "sidecars", outbound, {"client": side["client"],
                                                        "server": side["echo"]}),
        }


def py_spy_dump(pid: int, timeout: float = 15.0) -> str | None:
    """The Python stacks of a process (py-spy dump), or None without py-spy. For the report
    of a sidecar that stopped answering."""
    import shutil
    if shutil.which("py-spy") is None:
        return None
    try:
        # --native: the compiled (mypyc) modules' frames show as C functions named after them.
        done = subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)],
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=die_with_parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy failed: {exc}"
    return (done.stdout + done.stderr).strip()


