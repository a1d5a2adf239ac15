"""Transparent mode end to end, in network namespaces made here (run as root).

Two dual-stack "pods" joined by a veth pair, each with the nat rules of `meshproxy init` for
IPv4 and IPv6 (`meshproxy.kube.iptables.rules`, fed to iptables-restore and ip6tables-restore
inside the namespace; the host's tables are never touched) and a sidecar running as UID 1337
with `--transparent`:

    client  10.200.0.1   sidecar (service `client`)       curl, redis-cli, psql and a small TCP
            fd00:200::1                                   client (root)
    server  10.200.0.2   sidecar (service `web`,          apps (root): HTTP 8080, 8081 (not in
            fd00:200::2  --pod-ips of the two above)      the Mesh), 8082 (on [::]), 9999
            10.200.0.3   (addresses the sidecar is not    (skipped by the rules); TCP 7000
            fd00:200::3   told of: not this pod's)        (server speaks first), 7001 (echo
                                                          until EOF), 3306 (server speaks
                                                          first, opaque); redis-server 6379;
                                                          postgres 5432 (UID 65534)

The sidecars are standalone (`--config`, a Mesh file naming the Services with their pod
addresses and two virtual IPs): between them the traffic is plaintext, which is what a
standalone proxy speaks; the mTLS leg is what ConnectionPool/open_upstream do for meshed
endpoints with a certificate. Every app answers with the peer address it sees: 127.0.0.1 (or
::1) means it came through the server's sidecar, 10.200.0.1 that it came straight from the
client pod.

The sidecars run as UID 1337 through `setpriv` with CAP_DAC_READ_SEARCH kept as an ambient
capability, only so that UID 1337 can read the Python installation under /root; the
capability does not change how iptables' owner match sees their sockets.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.kube.iptables import InitOptions, parse_ports, rules

REPO = Path(__file__).resolve().parents[2]
CLIENT_IP, SERVER_IP = "10.200.0.1", "10.200.0.2"
CLIENT_IP6, SERVER_IP6 = "fd00:200::1", "fd00:200::2"
# On the server's interface, but not among the addresses its sidecar is given (--pod-ips).
FOREIGN_IP, FOREIGN_IP6 = "10.200.0.3", "fd00:200::3"
WEB_VIP, KV_VIP = "10.96.0.10", "10.96.0.11"
WEB_VIP6, KV_VIP6 = "fd00:96::10", "fd00:96::11"
PROXY_UID = 1337

# Needs root (network namespaces, iptables); CI runs as root, and without it these fail loudly.
pytestmark = [pytest.mark.timeout(120)]

APPS = textwrap.dedent('''
    import json, socket, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Web(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"peer": self.client_address[0], "port": self.server.server_port,
                               "path": self.path, "host": self.headers.get("host"),
                               "client_id": self.headers.get("x-meshproxy-client-id")}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    def serve_tcp(port, handle):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(64)
        def loop():
            while True:
                conn, peer = s.accept()
                threading.Thread(target=handle, args=(conn, peer[0]), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()

    def lines(conn, peer):  # the server speaks first, then answers each line upper-cased
        with conn:
            conn.sendall(f"HELLO {peer}\\n".encode())
            f = conn.makefile("rb")
            for line in f:
                if line.strip() == b"QUIT":
                    return
                conn.sendall(line.upper())

    def echo(conn, peer):  # echoes until the client's EOF, then a trailer, then closes
        with conn:
            total = 0
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                total += len(data)
                conn.sendall(data)
            conn.sendall(f"END {total} {peer}\\n".encode())

    class Web6(ThreadingHTTPServer):  # on [::], which takes IPv4 too
        address_family = socket.AF_INET6

    for port in (8080, 8081, 9999):
        server = ThreadingHTTPServer(("0.0.0.0", port), Web)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    server = Web6(("::", 8082), Web)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    serve_tcp(7000, lines)
    serve_tcp(7001, echo)
    serve_tcp(3306, lines)
    print("ready", flush=True)
    sys.stdin.read()
''')

CLIENT = textwrap.dedent('''
    import json, socket, sys, threading, time

    def recv_line(s):
        data = b""
        while not data.endswith(b"\\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode()

    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {}
    try:
        started = time.monotonic()
        s = socket.create_connection((host, port), timeout=10)
        if cmd == "lines":
            out["greeting"] = recv_line(s).strip()
            out["greeting_s"] = time.monotonic() - started
            s.sendall(b"ping\\n")
            out["reply"] = recv_line(s).strip()
            s.sendall(b"QUIT\\n")
            out["closed"] = s.recv(10) == b""
        elif cmd == "pong":
            s.sendall(b"PING\\r\\n")
            out["reply"] = recv_line(s).strip()
        elif cmd == "echo":
            size = int(sys.argv[4])
            payload = bytes(range(256)) * (size // 256)
            def send():
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)  # half-close: the answer must still arrive
            sender = threading.Thread(target=send)
            sender.start()
            got = bytearray()
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
            sender.join()
            out["echoed"] = bytes(got[:len(payload)]) == payload
            out["trailer"] = bytes(got[len(payload):]).decode(errors="replace").strip()
        elif cmd == "silent":
            data = s.recv(100)
            out["data"] = data.decode(errors="replace")
            out["closed"] = data == b""
        s.close()
    except OSError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
''')


def sh(*argv: str, check: bool = True, timeout: float = 20, input: str | None = None
       ) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def mesh(policy: str = "ALLOW_ANY", web6: bool = True) -> str:
    """The Mesh both sidecars (or the control plane) read. Every Service of the server pod
    runs under the pod's one ServiceAccount, `web`, as in Kubernetes: the identity its
    sidecar proves. `web6=False` leaves out the IPv6 Service `web6`, whose instance's own
    address is the one `web`'s instance lists as a further address (and which wins while
    there)."""
    def service(name, port, address, vip=None, account="web", other=None):
        vips = f"\n    addresses: [\"{vip}\"]" if vip else ""
        others = f", otherAddresses: [\"{other}\"]" if other else ""
        return (f"  - name: {name}\n    port: {port}{vips}\n    instances:\n"
                f"      - name: {name}-0\n        app: {{address: \"{address}\"{others}}}\n"
                f"        labels: {{meshproxy.io/service-account: {account}}}\n")
    return ("apiVersion: meshproxy.io/v1alpha1\nkind: Mesh\nmetadata: {name: transparent}\n"
            f"spec:\n  trustDomain: cluster.local\n  outboundTrafficPolicy: {policy}\n"
            "  services:\n"
            # the server is a dual-stack pod: its instance of `web` at both of its addresses
            + service("web", 80, f"{SERVER_IP}:8080", WEB_VIP, other=SERVER_IP6)
            + service("lines", 7000, f"{SERVER_IP}:7000")
            + service("echo", 7001, f"{SERVER_IP}:7001")
            + service("kv", 6379, f"{SERVER_IP}:6379", KV_VIP)
            + service("db", 3306, f"{SERVER_IP}:3306")
            + service("pg", 5432, f"{SERVER_IP}:5432")
            # IPv6 Services (single-stack, like a Service with ipFamilies [IPv6]) of the same
            # apps at the server's IPv6 address, written in long forms on purpose: the kernel
            # reports fd00:200::2 and the lookups must still find them.
            + (service("web6", 80, "[FD00:200:0:0:0:0:0:2]:8080", "fd00:96:0::10") if web6 else "")
            + service("kv6", 6379, "[fd00:200::0:2]:6379", KV_VIP6)
            + service("client", 8080, f"{CLIENT_IP}:8080", account="client"))


@dataclass
class Pod:
    ns: str
    ip: str
    ip6: str
    service: str
    folder: Path
    mtls: bool
    sidecar: subprocess.Popen | None = None
    procs: list = field(default_factory=list)

    @property
    def config(self) -> Path:
        """The configuration this pod's sidecar follows (with mTLS, the control plane's)."""
        return self.folder / ("control-mesh.yaml" if self.mtls else f"{self.service}-mesh.yaml")

    def run(self, *argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check, timeout=timeout)

    def curl(self, url: str, *extra: str) -> tuple[int, dict, dict]:
        """(status, JSON body or {}, headers) of a GET from this pod's app (root)."""
        done = self.run("curl", "-s", "-m", "10", "-D", "-", *extra, url)
        head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF reads as LF
        lines = head.split("\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        try:
            data = json.loads(body)
        except ValueError:
            data = {"text": body}
        return status, data, headers

    def tcp(self, cmd: str, host: str, port: int, *args: str, uid: int | None = None) -> dict:
        user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        done = self.run(*user, sys.executable, "-I", "-S", str(self.folder / "client.py"), cmd,
                        host, str(port), *args, timeout=30)
        return json.loads(done.stdout)

    def metrics(self) -> dict[tuple, float]:
        """Every sample of the sidecar's /metrics: (name, sorted labels) -> value."""
        text = self.run("curl", "-s", "-m", "5", "http://127.0.0.1:15000/metrics").stdout
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum(v for (n, ls), v in self.metrics().items()
                   if n == name and all((k, want) in ls for k, want in labels.items()))


def _start_sidecar(pod: Pod, identities=None, extra: list[str] = (), env: dict | None = None,
                   transparent: bool = True, as_root: bool = False) -> None:
    """The pod's sidecar as UID 1337: standalone, or (`identities`) on the control plane in
    the server pod, with a bootstrap token for its certificate; `env` added to its
    environment."""
    if identities is None:
        source = ["--config", str(pod.config)]
    else:
        control = "127.0.0.1" if pod.ip == SERVER_IP else SERVER_IP
        source = ["--control", f"http://{control}:15010",
                  "--token-file", str(identities.token_file(pod.service))]
    err = open(pod.folder / f"{pod.service}-sidecar.log", "wb")
    pod.sidecar = subprocess.Popen(
        ["ip", "netns", "exec", pod.ns,
         *([] if as_root else ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
                               "--clear-groups", "--inh-caps=+dac_read_search",
                               "--ambient-caps=+dac_read_search"]),
         sys.executable, "-m", "meshproxy", "proxy", *(["--transparent"] if transparent else []),
         *source,
         "--service", pod.service, "--log-level", "debug", "--drain-timeout", "1", *extra],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
        env={**os.environ, **(env or {})})
    err.close()

    def ready() -> bool:
        assert pod.sidecar.poll() is None, (pod.folder / f"{pod.service}-sidecar.log").read_text()
        done = pod.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                       "http://127.0.0.1:15000/ready", check=False)
        return done.stdout == "200"

    wait_for(ready, 30, f"the sidecar in {pod.ns}")


def _start_control(pod: Pod, identities) -> None:
    """The control plane with the mesh's CA, in the server pod (its port is skipped)."""
    err = open(pod.folder / "control.log", "wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.ns, sys.executable, "-m", "meshproxy", "control",
         "--config", str(pod.config), "--listen", "0.0.0.0:15010",
         "--ca-dir", str(identities.ca_dir), "--tokens-dir", str(identities.tokens_dir)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    err.close()
    pod.procs.append(proc)

    def ready() -> bool:
        assert proc.poll() is None, (pod.folder / "control.log").read_text()
        done = pod.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                       "http://127.0.0.1:15010/ready", check=False)
        return done.stdout == "200"

    wait_for(ready, 30, "the control plane")


def _start_redis(pod: Pod) -> None:
    """A real redis-server in `pod` on 0.0.0.0:6379 (IPv4 only), in the test's folder."""
    log = open(pod.folder / "redis.log", "wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.ns, "redis-server", "--port", "6379", "--bind", "0.0.0.0",
         "--save", "", "--appendonly", "no", "--protected-mode", "no",
         "--dir", str(pod.folder)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    pod.procs.append(proc)

    def ready() -> bool:
        assert proc.poll() is None, (pod.folder / "redis.log").read_text()
        return pod.run("redis-cli", "-p", "6379", "PING", check=False).stdout.strip() == "PONG"

    wait_for(ready, 15, "redis-server")


POSTGRES = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
NOBODY = 65534


def _start_postgres(pod: Pod) -> None:
    """A real PostgreSQL server in `pod` on every address (`*`: 0.0.0.0 and ::), port 5432,
    trust authentication, its cluster made by initdb as UID 65534 in the test's folder."""
    assert POSTGRES, "PostgreSQL is not installed (scripts/install-test-deps.sh installs it)"
    bin_dir = Path(POSTGRES[-1]).parent
    data = pod.folder / "pgdata"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    sh(*as_nobody, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
       "--no-locale", "-E", "UTF8", "--no-sync", timeout=60)
    log = open(pod.folder / "postgres.log", "wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.ns, *as_nobody, str(bin_dir / "postgres"), "-D", str(data),
         "-p", "5432", "-c", "listen_addresses=*", "-c", f"unix_socket_directories={data}",
         "-c", "fsync=off"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    pod.procs.append(proc)

    def ready() -> bool:
        assert proc.poll() is None, (pod.folder / "postgres.log").read_text()
        return pod.run("pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432", check=False
                       ).returncode == 0

    wait_for(ready, 30, "postgres")


def _start_apps(pod: Pod) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", pod.ns, sys.executable, "-I", "-S",
                             str(pod.folder / "apps.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pod.procs.append(proc)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=15) or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(f"apps in {pod.ns} did not start: {proc.communicate()[1]}")


@pytest.fixture(scope="module", params=["plaintext", "mtls", "mtls-asyncio"])
def pods(request: pytest.FixtureRequest) -> Iterator[tuple[Pod, Pod]]:
    """The two pods; "plaintext": standalone sidecars; "mtls": sidecars on a control plane
    with a CA, mTLS between them; "-asyncio": the sidecars on asyncio's loop, not uvloop."""
    mtls = request.param.startswith("mtls")
    loop_args = ["--no-uvloop"] if request.param.endswith("asyncio") else []
    with pod_pair(mtls, loop_args) as pair:
        yield pair


@contextlib.contextmanager
def pod_pair(mtls: bool, loop_args: list[str], transparent: bool = True,
             client_as_root: bool = False) -> Iterator[tuple[Pod, Pod]]:
    """Make the two pods, their apps and sidecars (`transparent` False: the sidecars run
    without --transparent, under the same rules; `client_as_root`: the client's sidecar runs
    as root, a user the rules do not exclude); take everything down after."""
    tag = secrets.token_hex(3)
    folder = Path(tempfile.mkdtemp(prefix="mp-transparent-"))
    folder.chmod(0o755)
    (folder / "apps.py").write_text(APPS)
    (folder / "client.py").write_text(CLIENT)
    for path in folder.iterdir():
        path.chmod(0o644)
    client = Pod(f"mp-tp-{tag}-client", CLIENT_IP, CLIENT_IP6, "client", folder, mtls)
    server = Pod(f"mp-tp-{tag}-server", SERVER_IP, SERVER_IP6, "web", folder, mtls)
    created: list[str] = []
    options = InitOptions(skip_inbound_ports=parse_ports("9999,15010"),
                          skip_outbound_ports=parse_ports("9999"), ipv6=True)
    identities = None
    if mtls:
        from support.mtlsmesh import Identities

        identities = Identities.make(folder / "identity", ["client", "web"])
    try:
        for pod in (client, server):
            sh("ip", "netns", "add", pod.ns)
            created.append(pod.ns)
            sh("ip", "-n", pod.ns, "link", "set", "lo", "up")
        # made inside one namespace with its other end in the other: nothing on the host
        sh("ip", "-n", client.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", server.ns)
        for pod in (client, server):
            sh("ip", "-n", pod.ns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
            sh("ip", "-n", pod.ns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", pod.ns, "link", "set", "eth0", "up")
            # virtual IPs are routed like a cluster's Service range
            sh("ip", "-n", pod.ns, "route", "add", "10.96.0.0/16", "dev", "eth0")
            sh("ip", "-n", pod.ns, "-6", "route", "add", "fd00:96::/64", "dev", "eth0")
            for family, tool in (("ipv4", "iptables-restore"), ("ipv6", "ip6tables-restore")):
                sh("ip", "netns", "exec", pod.ns, tool, "--noflush", input=rules(options)[family])
            pod.config.write_text(mesh())
            pod.config.chmod(0o644)
        sh("ip", "-n", server.ns, "addr", "add", f"{FOREIGN_IP}/24", "dev", "eth0")
        sh("ip", "-n", server.ns, "addr", "add", f"{FOREIGN_IP6}/64", "dev", "eth0", "nodad")
        _start_apps(server)
        _start_redis(server)
        _start_postgres(server)
        if mtls:
            _start_control(server, identities)
        # The server's sidecar is told its pod's addresses as injection does (a flag here);
        # the client's reads MESHPROXY_POD_IP, the single-address fallback.
        _start_sidecar(client, identities, loop_args, env={"MESHPROXY_POD_IP": CLIENT_IP},
                       transparent=transparent, as_root=client_as_root)
        _start_sidecar(server, identities,
                       [*loop_args, "--pod-ips", f"{SERVER_IP}, {SERVER_IP6}"],
                       transparent=transparent)
        yield client, server
    finally:
        for pod in (client, server):
            if pod.sidecar is not None:
                pod.sidecar.terminate()
                try:
                    pod.sidecar.wait(10)
                except subprocess.TimeoutExpired:
                    pod.sidecar.kill()
                    pod.sidecar.wait(5)
                print(f"--- sidecar {pod.ns}\n" + (folder / f"{pod.service}-sidecar.log").read_text(
                    errors="replace")[-20000:])
            for proc in pod.procs:
                proc.terminate()  # postgres and redis shut down cleanly on SIGTERM
                try:
                    proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(folder, ignore_errors=True)



def requests(pod: Pod, direction: str, service: str) -> float:
    return pod.value("meshproxy_requests_total", direction=direction, service=service)


def handshakes(pod: Pod, direction: str) -> float:
    return pod.value("meshproxy_tls_handshakes_total", direction=direction, result="ok")


def tcp_opened(pod: Pod, direction: str, service: str | None = None) -> float:
    labels = {"direction": direction, **({"service": service} if service else {})}
    return pod.value("meshproxy_tcp_connections_opened_total", **labels)


def test_http_goes_app_sidecar_sidecar_app(pods) -> None:
    client, server = pods
    out0, in0 = requests(client, "outbound", "web.default"), requests(server, "inbound", "web.default")

    # a Service's virtual IP: balanced across the Service; the Host header stays as sent
    status, body, _ = client.curl(f"http://{WEB_VIP}/hello")
    assert status == 200
    # with mTLS the server's sidecar tells the app who called, as verified
    caller = "spiffe://cluster.local/ns/default/sa/client" if client.mtls else None
    assert body == {"peer": "127.0.0.1", "port": 8080, "path": "/hello", "host": WEB_VIP,
                    "client_id": caller}
    # an instance's own address: that instance
    status, body, _ = client.curl(f"http://{SERVER_IP}:8080/pod")
    assert status == 200 and body["peer"] == "127.0.0.1" and body["path"] == "/pod"

    # both sidecars counted both requests: app -> client sidecar -> server sidecar -> app
    assert requests(client, "outbound", "web.default") == out0 + 2
    assert requests(server, "inbound", "web.default") == in0 + 2
    if client.mtls:  # and between the sidecars it was mTLS, the server proving `web`
        assert handshakes(client, "outbound") >= 1 and handshakes(server, "inbound") >= 1


def test_http2_with_prior_knowledge_is_served_per_request_not_as_tcp(pods) -> None:
    """An h2c connection (gRPC's, curl --http2-prior-knowledge's) under interception gets the
    mesh per request: counted as requests by both sidecars, and no TCP stream is proxied.
    (One URL per curl: Debian 12's curl 7.88 fails a second request on a reused
    prior-knowledge connection, curl/curl#10634.)"""
    client, server = pods
    out0, in0 = requests(client, "outbound", "web.default"), requests(server, "inbound", "web.default")
    tcp0 = tcp_opened(client, "outbound")
    for path in ("/one", "/two"):
        done = client.run("curl", "-s", "-m", "10", "--http2-prior-knowledge", "-o", "/dev/null",
                          "-w", "%{http_code} %{http_version}", f"http://{WEB_VIP}{path}")
        assert done.stdout == "200 2"
    assert requests(client, "outbound", "web.default") == out0 + 2
    assert requests(server, "inbound", "web.default") == in0 + 2
    assert tcp_opened(client, "outbound") == tcp0


def test_unknown_destination_passes_through_and_inbound_goes_to_the_original_port(pods) -> None:
    client, server = pods
    in0 = server.value("meshproxy_requests_total", direction="inbound")
    # 8081 is in no Service: ALLOW_ANY passes it through to 10.200.0.2:8081, where the server's
    # sidecar (no --app-port) sends it on to 127.0.0.1:8081
    status, body, _ = client.curl(f"http://{SERVER_IP}:8081/other")
    assert status == 200 and body["port"] == 8081 and body["peer"] == "127.0.0.1"
    assert requests(client, "outbound", f"{SERVER_IP}:8081") >= 1
    assert server.value("meshproxy_requests_total", direction="inbound") == in0 + 1


def test_an_app_that_addresses_the_proxy_is_routed_by_host(pods) -> None:
    client, _ = pods
    before = requests(client, "outbound", "web.default")
    # HTTP_PROXY-style: not redirected (loopback), so the Host header names the Service
    status, body, _ = client.curl("http://web/by-host", "-x", "http://127.0.0.1:15001")
    assert status == 200 and body["path"] == "/by-host" and body["peer"] == "127.0.0.1"
    assert requests(client, "outbound", "web.default") == before + 1


def test_tcp_server_first_is_detected_by_silence(pods) -> None:
    client, server = pods
    out0, in0 = tcp_opened(client, "outbound", "lines.default"), tcp_opened(server, "inbound")
    tls0 = handshakes(client, "outbound"), handshakes(server, "inbound")
    got = client.tcp("lines", SERVER_IP, 7000)
    assert got["greeting"] == "HELLO 127.0.0.1"  # through the server's sidecar
    assert got["reply"] == "PING" and got["closed"]
    # each sidecar waited for the detection timeout (100 ms) before it took this for TCP
    assert got["greeting_s"] >= 0.2
    assert tcp_opened(client, "outbound", "lines.default") == out0 + 1
    assert tcp_opened(server, "inbound") == in0 + 1
    assert client.value("meshproxy_tcp_sent_bytes_total", direction="outbound",
                        service="lines.default") >= len("ping\nQUIT\n")
    if client.mtls:  # one mTLS connection between the sidecars for this TCP connection
        assert (handshakes(client, "outbound"), handshakes(server, "inbound")) == (
            tls0[0] + 1, tls0[1] + 1)


def test_opaque_port_skips_detection(pods) -> None:
    client, server = pods
    # 3306 is opaque by default: the server's greeting arrives without the detection wait
    got = client.tcp("lines", SERVER_IP, 3306)
    assert got["greeting"] == "HELLO 127.0.0.1" and got["reply"] == "PING"
    assert got["greeting_s"] < 0.15, got
    # a client-first protocol on an opaque port, through a virtual IP
    assert client.tcp("pong", KV_VIP, 6379) == {"reply": "+PONG"}
    assert tcp_opened(client, "outbound", "kv.default") >= 1
    assert tcp_opened(client, "outbound", "db.default") >= 1


def test_tcp_half_close_and_back_pressure(pods) -> None:
    client, server = pods
    size = 8 << 20
    got = client.tcp("echo", SERVER_IP, 7001, str(size))
    # 8 MiB echoed while being sent (both directions at once), then the client's EOF reached
    # the server through both sidecars and the server's answer still came back
    assert got == {"echoed": True, "trailer": f"END {size} 127.0.0.1"}
    assert client.value("meshproxy_tcp_received_bytes_total", direction="outbound",
                        service="echo.default") >= size


def test_skipped_port_bypasses_the_sidecars(pods) -> None:
    client, server = pods
    before = (client.metrics(), server.metrics())
    status, body, _ = client.curl(f"http://{SERVER_IP}:9999/direct")
    assert status == 200
    assert body["peer"] == CLIENT_IP  # straight from the client pod, no sidecar in between
    after = (client.metrics(), server.metrics())
    for old, new in zip(before, after):
        changed = {k for k in new if k[0] in ("meshproxy_requests_total",
                                              "meshproxy_tcp_connections_opened_total")
                   and new[k] != old.get(k)}
        assert not changed


def test_the_sidecars_own_traffic_is_not_redirected(pods) -> None:
    client, server = pods
    for pod in (client, server):
        status = Path(f"/proc/{pod.sidecar.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(PROXY_UID)] * 4
    # a connection made as UID 1337 in the client pod leaves it as it is (the server's
    # sidecar still takes it inbound); one made by the app (root) goes through the sidecar
    before = tcp_opened(client, "outbound")
    got = client.tcp("lines", SERVER_IP, 3306, uid=PROXY_UID)
    assert got["greeting"] == "HELLO 127.0.0.1"
    assert tcp_opened(client, "outbound") == before
    client.tcp("lines", SERVER_IP, 3306)
    assert tcp_opened(client, "outbound") == before + 1
    # and the sidecar's upstream connections never came back to it: each request above was
    # counted once per sidecar (test_http_goes_app_sidecar_sidecar_app), none is refused as
    # addressed to the proxy itself
    assert client.value("meshproxy_requests_total", code="502") == 0


def _reconfigure(pod: Pod, text: str, ready) -> None:
    """Write the file `pod`'s sidecar follows and wait until `ready(config JSON)` holds."""
    pod.config.write_text(text)

    def applied() -> bool:
        done = pod.run("curl", "-s", "http://127.0.0.1:15000/config", check=False)
        try:
            return ready(json.loads(done.stdout)["config"])
        except (ValueError, KeyError):
            return False

    wait_for(applied, 10, "the new configuration")


def test_authorization_applies_to_tcp_too(pods) -> None:
    client, server = pods
    deny_all_but_nobody = textwrap.dedent("""
        ---
        apiVersion: meshproxy.io/v1alpha1
        kind: AuthorizationPolicy
        metadata: {name: only-nobody}
        spec:
          targetRef: {kind: Service, name: web}
          action: ALLOW
          rules:
            - from: [{source: {principals: [cluster.local/ns/default/sa/nobody]}}]
        """)
    _reconfigure(server, mesh() + deny_all_but_nobody,
                 lambda c: c["services"]["web.default"]["authorizationPolicies"])
    try:
        status, _, headers = client.curl(f"http://{WEB_VIP}/denied")
        assert status == 403 and headers["x-meshproxy-error"] == "unauthorized"
        # a byte stream is no way around it: closed before the app's greeting
        assert client.tcp("silent", SERVER_IP, 7000) == {"data": "", "closed": True}
    finally:
        _reconfigure(server, mesh(),
                     lambda c: not c["services"]["web.default"]["authorizationPolicies"])
    assert client.tcp("lines", SERVER_IP, 7000)["greeting"] == "HELLO 127.0.0.1"


def test_registry_only_refuses_unknown_destinations(pods) -> None:
    client, _ = pods
    _reconfigure(client, mesh("REGISTRY_ONLY"),
                 lambda c: c["outboundTrafficPolicy"] == "REGISTRY_ONLY")
    try:
        status, _, headers = client.curl(f"http://{SERVER_IP}:8081/other")
        assert status == 502 and headers["x-meshproxy-error"] == "unknown-destination"
        # TCP to an unknown destination: closed without a byte
        assert client.tcp("silent", SERVER_IP, 8081) == {"data": "", "closed": True}
        # known destinations still work
        assert client.curl(f"http://{WEB_VIP}/still")[0] == 200
        assert client.tcp("pong", KV_VIP, 6379) == {"reply": "+PONG"}
    finally:
        _reconfigure(client, mesh(), lambda c: c["outboundTrafficPolicy"] == "ALLOW_ANY")


# -- IPv6 ------------------------------------------------------------------------------------------


def test_ipv6_http_goes_app_sidecar_sidecar_app(pods) -> None:
    client, server = pods
    out0 = requests(client, "outbound", "web6.default")
    in0 = requests(server, "inbound", "web.default")
    tls0 = handshakes(client, "outbound"), handshakes(server, "inbound")
    caller = "spiffe://cluster.local/ns/default/sa/client" if client.mtls else None

    # the pod's IPv6 address, an instance of the IPv6 Service `web6` (written in a long form in
    # the Mesh): the app's calls reach the client's sidecar at [::1]:15001, the server's at
    # [::]:15006; the app listens on 0.0.0.0 only, so the server's sidecar reaches it over IPv4
    status, body, _ = client.curl(f"http://[{SERVER_IP6}]:8080/v6", "-6", "-g")
    assert status == 200
    assert body == {"peer": "127.0.0.1", "port": 8080, "path": "/v6",
                    "host": f"[{SERVER_IP6}]:8080", "client_id": caller}
    # an IPv6 virtual IP: balanced across that Service
    status, body, _ = client.curl(f"http://[{WEB_VIP6}]/vip6", "-g")
    assert status == 200 and body["peer"] == "127.0.0.1" and body["client_id"] == caller

    assert requests(client, "outbound", "web6.default") == out0 + 2
    assert requests(server, "inbound", "web.default") == in0 + 2
    if client.mtls:
        assert handshakes(client, "outbound") >= tls0[0] + 1
        assert handshakes(server, "inbound") >= tls0[1] + 1


def test_a_call_to_a_dual_stack_pods_other_address_goes_to_its_instance(pods) -> None:
    client, server = pods
    caller = "spiffe://cluster.local/ns/default/sa/client" if client.mtls else None
    # `web`'s instance lists the pod's IPv6 address as a further address. While `web6` has an
    # instance whose own address it is, that one wins (the test above); without it, and under
    # REGISTRY_ONLY so that an unknown destination would be refused, the address is `web-0`.
    _reconfigure(client, mesh("REGISTRY_ONLY", web6=False),
                 lambda c: c["outboundTrafficPolicy"] == "REGISTRY_ONLY" and "web6.default" not in c["services"])
    try:
        out0, in0 = requests(client, "outbound", "web.default"), requests(server, "inbound", "web.default")
        status, body, _ = client.curl(f"http://[{SERVER_IP6}]:8080/other-family", "-g")
        assert status == 200
        # to the instance's endpoint (10.200.0.2:8080, mTLS when meshed): the server's sidecar
        # verified the caller and reached the app on IPv4 loopback
        assert body == {"peer": "127.0.0.1", "port": 8080, "path": "/other-family",
                        "host": f"[{SERVER_IP6}]:8080", "client_id": caller}
        assert requests(client, "outbound", "web.default") == out0 + 1
        assert requests(server, "inbound", "web.default") == in0 + 1
        # another port of that address is no instance: refused
        status, _, headers = client.curl(f"http://[{SERVER_IP6}]:8081/", "-g")
        assert status == 502 and headers["x-meshproxy-error"] == "unknown-destination"
    finally:
        _reconfigure(client, mesh(), lambda c: c["outboundTrafficPolicy"] == "ALLOW_ANY"
                     and "web6.default" in c["services"])


def test_ipv6_inbound_reaches_an_app_on_ipv6_loopback_when_it_listens_there(pods) -> None:
    client, _ = pods
    # 8082 listens on [::]: an IPv6 connection reaches it at ::1, an IPv4 one at 127.0.0.1
    status, body, _ = client.curl(f"http://[{SERVER_IP6}]:8082/", "-g")
    assert status == 200 and body["peer"] == "::1"
    status, body, _ = client.curl(f"http://{SERVER_IP}:8082/")
    assert status == 200 and body["peer"] == "::ffff:127.0.0.1"


def test_ipv6_tcp(pods) -> None:
    client, server = pods
    out0, in0 = tcp_opened(client, "outbound"), tcp_opened(server, "inbound")
    got = client.tcp("lines", SERVER_IP6, 7000)
    assert got["greeting"] == "HELLO 127.0.0.1" and got["reply"] == "PING" and got["closed"]
    size = 1 << 20
    assert client.tcp("echo", SERVER_IP6, 7001, str(size)) == {
        "echoed": True, "trailer": f"END {size} 127.0.0.1"}
    assert tcp_opened(client, "outbound") == out0 + 2
    assert tcp_opened(server, "inbound") == in0 + 2


def test_health_port_answers_on_ipv6(pods) -> None:
    client, server = pods
    # as a kubelet would probe it: from outside the pod (UID 1337: not through the client's
    # sidecar), to the pod's IPv6 address, which the rules never redirect on this port
    done = client.run("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                      "curl", "-s", "-m", "5", "-g", f"http://[{SERVER_IP6}]:15021/ready")
    assert done.stdout == "ready\n"
    assert server.run("curl", "-s", "-m", "5", "-g", "http://[::1]:15021/live").stdout == "live\n"


# -- the pod's own addresses ---------------------------------------------------------------------


def refused(pod: Pod) -> float:
    return pod.value("meshproxy_inbound_connections_refused_total", reason="not-this-pod")


def config_of(pod: Pod) -> dict:
    return json.loads(pod.run("curl", "-s", "-m", "5", "http://127.0.0.1:15000/config").stdout)


def test_the_sidecars_know_their_pods_addresses(pods) -> None:
    client, server = pods
    assert config_of(server)["podIPs"] == sorted([SERVER_IP, SERVER_IP6])
    assert config_of(client)["podIPs"] == [CLIENT_IP]  # from MESHPROXY_POD_IP


def test_inbound_connections_to_another_address_are_refused(pods) -> None:
    client, server = pods
    before = refused(server)
    in0 = server.value("meshproxy_tcp_connections_opened_total", direction="inbound")
    as_proxy = {"uid": PROXY_UID}  # straight out of the client pod, no client sidecar
    for own, foreign in ((SERVER_IP, FOREIGN_IP), (SERVER_IP6, FOREIGN_IP6)):
        # the server's sidecar takes the connection either way (the redirect takes every
        # address); it forwards the one sent to its pod's address to the app ...
        assert client.tcp("lines", own, 7000, **as_proxy)["greeting"] == "HELLO 127.0.0.1"
        # ... and closes the other at once, before the app hears of it
        assert client.tcp("silent", foreign, 7000, **as_proxy) == {"data": "", "closed": True}
    assert refused(server) == before + 2
    assert server.value("meshproxy_tcp_connections_opened_total", direction="inbound") == in0 + 2
    # an app's HTTP call to such an address: the client's sidecar passes it through, the
    # server's refuses it, and the app gets the proxy's 502
    inbound0 = server.value("meshproxy_requests_total", direction="inbound")
    status, _, headers = client.curl(f"http://{FOREIGN_IP}:8080/not-mine")
    assert status == 502 and headers["x-meshproxy-error"] in ("upstream-reset", "connect-failure")
    assert refused(server) > before + 2
    assert server.value("meshproxy_requests_total", direction="inbound") == inbound0


# -- real servers: Redis and PostgreSQL ---------------------------------------------------------


def redis(pod: Pod, host: str, *args: str, input: str | None = None) -> str:
    done = sh("ip", "netns", "exec", pod.ns, "redis-cli", "-h", host, "-p", "6379", *args,
              input=input, timeout=30)
    return done.stdout.strip()


def test_redis_cli_through_both_sidecars(pods) -> None:
    client, server = pods
    out0 = tcp_opened(client, "outbound", "kv.default")
    out6 = tcp_opened(client, "outbound", "kv6.default")
    in0 = tcp_opened(server, "inbound")
    key = f"k-{secrets.token_hex(4)}"

    assert redis(client, KV_VIP, "SET", key, "hello world") == "OK"
    assert redis(client, SERVER_IP, "GET", key) == "hello world"
    # the server saw the connection come from its sidecar, not from the client pod
    assert "addr=127.0.0.1:" in redis(client, KV_VIP, "CLIENT", "INFO")
    # 100 commands one after the other on one connection, then 500 pipelined in one write
    redis(client, KV_VIP, "-r", "100", "INCR", f"{key}:n")
    assert redis(client, KV_VIP, "GET", f"{key}:n") == "100"
    batch = "".join(f"*2\r\n$4\r\nINCR\r\n${len(key) + 2}\r\n{key}:p\r\n" for _ in range(500))
    report = redis(client, KV_VIP, "--pipe", input=batch)
    assert "errors: 0, replies: 500" in report, report
    # over IPv6 (the IPv6 Service `kv6`), the same server and data
    assert redis(client, SERVER_IP6, "GET", f"{key}:p") == "500"
    assert redis(client, KV_VIP6, "DEL", key, f"{key}:n", f"{key}:p") == "3"

    # 6 connections through the VIP or pod IPv4, 2 over IPv6: each a TCP connection on both sidecars
    assert tcp_opened(client, "outbound", "kv.default") == out0 + 6
    assert tcp_opened(client, "outbound", "kv6.default") == out6 + 2
    assert tcp_opened(server, "inbound") == in0 + 8
    assert client.value("meshproxy_tcp_sent_bytes_total", direction="outbound",
                        service="kv.default") >= len(batch)


def psql(pod: Pod, host: str, sql: str) -> str:
    done = sh("ip", "netns", "exec", pod.ns, "psql", "-h", host, "-p", "5432", "-U", "postgres",
              "-d", "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, timeout=30)
    return done.stdout.strip()


def test_psql_through_both_sidecars(pods) -> None:
    client, server = pods
    out0, in0 = tcp_opened(client, "outbound", "pg.default"), tcp_opened(server, "inbound")
    table = f"t_{secrets.token_hex(4)}"
    assert psql(client, SERVER_IP, f"CREATE TABLE {table} (n int); "
                f"INSERT INTO {table} SELECT generate_series(1, 10000); "
                f"SELECT sum(n) FROM {table}").endswith("50005000")
    # through the server's sidecar; postgres listens on :: too, so IPv6 callers reach it on ::1
    assert psql(client, SERVER_IP, "SELECT inet_client_addr()") == "127.0.0.1"
    assert psql(client, SERVER_IP6,
                f"SELECT count(*), inet_client_addr() FROM {table}") == "10000|::1"
    assert psql(client, SERVER_IP, f"DROP TABLE {table}") == "DROP TABLE"
    assert tcp_opened(client, "outbound", "pg.default") == out0 + 3
    assert tcp_opened(server, "inbound") == in0 + 4


def test_a_pod_without_ipv6_still_gets_a_working_sidecar(tmp_path) -> None:
    """IPv6 disabled in the pod (no ::1): the sidecar says so once and runs on IPv4."""
    ns = f"mp-tp-{secrets.token_hex(3)}-v4only"
    (tmp_path / "mesh.yaml").write_text(mesh())
    log = tmp_path / "sidecar.log"
    sh("ip", "netns", "add", ns)
    proc = None
    try:
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "meshproxy", "proxy",
                 "--transparent", "--config", str(tmp_path / "mesh.yaml"), "--service", "web"],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return sh("ip", "netns", "exec", ns, "curl", "-s", "-m", "5",
                      "http://127.0.0.1:15021/ready", check=False).stdout == "ready\n"

        wait_for(ready, 30, "the sidecar without IPv6")
        # (with IPv6 disabled, [::] can still be bound: only ::1 is missing)
        lines = [line for line in log.read_text().splitlines() if "no IPv6 here" in line]
        assert len(lines) == 1, log.read_text()
        assert "(Cannot assign requested address): outbound [::1]:15001 left out" in lines[0]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        sh("ip", "netns", "del", ns, check=False)


def test_sidecars_without_transparent_under_the_rules_refuse_the_loop_with_508() -> None:
    """The mistake of starting sidecars without --transparent under `meshproxy init`'s rules
    (or losing the variable that says so): the server's sidecar forwards an inbound request
    to its app at the pod's address, the rules send that connection back to its own inbound
    listener, and the request went round until the client gave up. Now the second pass is
    refused with 508 loop-detected and the sidecar says why, once."""
    with pod_pair(False, [], transparent=False) as (client, server):
        for _ in range(3):
            status, data, headers = client.curl(f"http://{SERVER_IP}:8080/", "-H", "Host: web")
            assert status == 508 and headers["x-meshproxy-error"] == "loop-detected", (status, data)
        assert server.value("meshproxy_requests_total", direction="inbound", code="508") == 6
        log = (server.folder / "web-sidecar.log").read_text()
        warnings = [line for line in log.splitlines() if "request loop" in line]
        assert len(warnings) == 1 and "without --transparent" in warnings[0], warnings


def test_a_sidecar_whose_own_connections_are_intercepted_refuses_http_and_tcp_loops() -> None:
    """The client's sidecar runs as root, which the rules do not exclude: each connection it
    opens is redirected back to its own outbound listener. An HTTP request comes back marked
    (508 loop-detected); a TCP connection comes back from the address of the relay that
    opened it, and is closed at once, counted and logged, instead of relaying to itself until
    it runs out of ports."""
    with pod_pair(False, [], client_as_root=True) as (client, server):
        status, data, headers = client.curl(f"http://{SERVER_IP}:8080/")
        assert status == 508 and headers["x-meshproxy-error"] == "loop-detected", (status, data)
        got = client.tcp("echo", SERVER_IP, 7001, "1024")
        assert got == {"echoed": False, "trailer": ""}, got  # ended without an answer
        assert client.value("meshproxy_tcp_connections_refused_total", direction="outbound",
                            reason="loop-detected") == 1
        assert client.value("meshproxy_tcp_connections_opened_total", direction="outbound") == 2
        log = (client.folder / "client-sidecar.log").read_text()
        warnings = [line for line in log.splitlines() if "request loop" in line]
        assert len(warnings) == 1 and "own connections" in warnings[0], warnings
