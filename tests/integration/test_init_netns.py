"""`meshproxy init` in real network namespaces: what a pod's connections do once it has run.

Two namespaces joined by a veth pair stand for a pod and another machine ("peer"):

    pod   192.0.2.1   2001:db8::1            listeners: 15001 (outbound) 15006 (inbound)
                                                        8080 (app) 15021 (health) 9090 (skipped)
    peer  192.0.2.2   2001:db8::2            listeners: 80, 5432
          198.51.100.2 2001:db8:1::2         (a network the pod's rules skip)

Every listener answers one JSON line: which listener took the connection and the original
destination it reads with `meshproxy.kube.origdst.original_destination`. Each probe is a
client process started in a namespace (as root, or as the proxy's UID 1337 through setpriv)
that prints that answer. The whole run is repeated for iptables-nft and iptables-legacy. The
host's own tables are never read or written: every iptables command runs in a namespace made
here, deleted afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROXY_UID = 1337
POD4, PEER4, FAR4 = "192.0.2.1", "192.0.2.2", "198.51.100.2"
POD6, PEER6, FAR6 = "2001:db8::1", "2001:db8::2", "2001:db8:1::2"
INIT_FLAGS = ["--skip-inbound-ports", "9090", "--skip-outbound-ports", "5432",
              "--skip-outbound-cidrs", "198.51.100.0/24,2001:db8:1::/64"]

pytestmark = pytest.mark.timeout(90)

# Runs in the namespaces with `python3 -I -S` (fast start; as UID 1337 too, so it lives in a
# world-readable folder and needs nothing but the standard library and meshproxy's origdst).
HELPER = textwrap.dedent('''
    import json, selectors, socket, sys

    def listen(repo, role, ports):
        sys.path.insert(0, repo)
        from meshproxy.kube.origdst import original_destination
        sel = selectors.DefaultSelector()
        for port in ports:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", port))
            s.listen(64)
            sel.register(s, selectors.EVENT_READ, port)
        print("ready", flush=True)
        while True:
            for key, _ in sel.select():
                conn, _ = key.fileobj.accept()
                try:
                    orig = list(original_destination(conn))
                except OSError:
                    orig = None
                answer = {"role": role, "port": key.data, "orig": orig}
                conn.sendall(json.dumps(answer).encode() + b"\\n")
                conn.close()

    def connect(host, port):
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                data = b""
                while not data.endswith(b"\\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            print(data.decode().strip() or json.dumps({"error": "closed without an answer"}))
        except OSError as exc:
            print(json.dumps({"error": str(exc)}))

    if sys.argv[1] == "listen":
        listen(sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]])
    else:
        connect(sys.argv[2], sys.argv[3])
''')


def _flavours() -> list[str]:
    found = [f for f in ("nft", "legacy")
             if all(shutil.which(f"{b}-{f}-{t}", path="/usr/sbin:/sbin:" + os.environ["PATH"])
                    for b in ("iptables", "ip6tables") for t in ("save", "restore"))]
    assert found, "neither iptables-nft nor iptables-legacy is installed"
    return found


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done


@cache
def init_command() -> tuple[str, ...]:
    """`meshproxy init` as users type it, once the command is wired into `meshproxy`; until
    then the same parser and run() through the module."""
    real = (sys.executable, "-m", "meshproxy", "init")
    if subprocess.run([*real, "--help"], capture_output=True, timeout=30).returncode == 0:
        return real
    return (sys.executable, "-m", "meshproxy.kube.init_cli")


@dataclass
class Pod:
    """The two namespaces, their listeners and a helper to probe connections."""

    pod: str
    peer: str
    flavour: str
    helper: Path

    def init(self, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.pod, *init_command(), *flags, check=check, timeout=30)

    def probe(self, ns: str, host: str, port: int, uid: int | None = None) -> dict:
        """Connect from namespace `ns` (as `uid`, else root) and return the listener's answer."""
        user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                       "--clear-groups"]
        done = sh("ip", "netns", "exec", ns, *user, sys.executable, "-I", "-S", str(self.helper),
                  "connect", host, str(port))
        return json.loads(done.stdout)

    def saved(self, flavour: str | None = None) -> str:
        """The pod's iptables-save and ip6tables-save output, without the dated comments and
        with packet counters zeroed."""
        flavour = flavour or self.flavour
        text = "".join(
            sh("ip", "netns", "exec", self.pod, f"{tool}-{flavour}-save").stdout
            for tool in ("iptables", "ip6tables"))
        lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                 if not line.startswith("#")]
        return "\n".join(lines)


def _start_listeners(ns: str, helper: Path, role: str, ports: list[int]) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-I", "-S", str(helper), "listen", str(REPO),
         role, *map(str, ports)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return proc
            if not line:
                break
    proc.kill()
    raise AssertionError(f"listeners in {ns} did not start: {proc.communicate()[1]}")


@pytest.fixture(params=_flavours())
def pod(request: pytest.FixtureRequest) -> Iterator[Pod]:
    flavour = request.param
    tag = secrets.token_hex(3)
    pod_ns, peer_ns = f"mp-test-{tag}-pod", f"mp-test-{tag}-peer"
    helper_dir = Path(tempfile.mkdtemp(prefix="mp-init-"))
    helper_dir.chmod(0o755)  # the UID 1337 client reads the helper too
    helper = helper_dir / "netns_helper.py"
    helper.write_text(HELPER)
    helper.chmod(0o644)
    procs: list[subprocess.Popen] = []
    created: list[str] = []
    try:
        for ns in (pod_ns, peer_ns):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # made inside the pod namespace with its other end in the peer's: nothing on the host
        sh("ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", peer_ns)
        for ns, v4, v6 in ((pod_ns, POD4, POD6), (peer_ns, PEER4, PEER6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", peer_ns, "addr", "add", f"{FAR4}/32", "dev", "eth0")
        sh("ip", "-n", peer_ns, "addr", "add", f"{FAR6}/128", "dev", "eth0", "nodad")
        sh("ip", "-n", pod_ns, "route", "add", "198.51.100.0/24", "via", PEER4)
        sh("ip", "-n", pod_ns, "route", "add", "2001:db8:1::/64", "via", PEER6)
        procs.append(_start_listeners(pod_ns, helper, "pod", [15001, 15006, 8080, 15021, 9090]))
        procs.append(_start_listeners(peer_ns, helper, "peer", [80, 5432]))
        yield Pod(pod_ns, peer_ns, flavour, helper)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(helper_dir, ignore_errors=True)


def at(port: int, role: str = "pod", orig: tuple[str, int] | None = None) -> dict:
    """What a listener answers; `orig` is only compared when given."""
    return {"role": role, "port": port, **({"orig": list(orig)} if orig else {})}


def answer(result: dict, with_orig: bool) -> dict:
    if "error" in result:
        return result
    return {k: v for k, v in result.items() if with_orig or k != "orig"}


def test_init_captures_a_pods_traffic(pod: Pod) -> None:
    def expect(ns: str, host: str, port: int, want: dict, uid: int | None = None) -> None:
        got = answer(pod.probe(ns, host, port, uid), with_orig="orig" in want)
        who = f"UID {uid}" if uid is not None else "root"
        assert got == want, f"{ns} as {who} -> [{host}]:{port}"

    nothing = pod.saved()
    assert "MESHPROXY" not in nothing

    # --dry-run prints the rules and changes nothing
    dry = pod.init("--dry-run", "--iptables", pod.flavour, *INIT_FLAGS)
    assert "-A PREROUTING -p tcp -j MESHPROXY_INBOUND" in dry.stdout
    assert "-A MESHPROXY_OUTPUT -d 198.51.100.0/24 -j RETURN" in dry.stdout
    assert "-A MESHPROXY_OUTPUT -d 2001:db8:1::/64 -j RETURN" in dry.stdout
    assert pod.saved() == nothing
    expect(pod.peer, POD4, 8080, at(8080))

    # the pod has a global IPv6 address: --ipv6 auto captures IPv6 as well
    first = pod.init("--iptables", pod.flavour, *INIT_FLAGS)
    assert f"ipv4 (iptables-{pod.flavour})" in first.stdout
    assert f"ipv6 (ip6tables-{pod.flavour})" in first.stdout
    installed = pod.saved()
    for chain in ("MESHPROXY_INBOUND", "MESHPROXY_IN_REDIRECT", "MESHPROXY_OUTPUT",
                  "MESHPROXY_REDIRECT"):
        assert installed.count(f":{chain} - [0:0]") == 2  # IPv4 and IPv6

    # inbound: captured with the original destination, except the health and skipped ports
    expect(pod.peer, POD4, 8080, at(15006, orig=(POD4, 8080)))
    expect(pod.peer, POD6, 8080, at(15006, orig=(POD6, 8080)))
    expect(pod.peer, POD4, 15021, at(15021))
    expect(pod.peer, POD6, 15021, at(15021))
    expect(pod.peer, POD4, 9090, at(9090))

    # outbound from the app (any UID but the proxy's): captured with the original destination
    expect(pod.pod, PEER4, 80, at(15001, orig=(PEER4, 80)))
    expect(pod.pod, PEER6, 80, at(15001, orig=(PEER6, 80)))
    expect(pod.pod, PEER4, 80, at(15001, orig=(PEER4, 80)), uid=1000)
    # the proxy's own connections go straight out
    expect(pod.pod, PEER4, 80, at(80, "peer"), uid=PROXY_UID)
    expect(pod.pod, PEER6, 80, at(80, "peer"), uid=PROXY_UID)
    # skipped port and skipped networks
    expect(pod.pod, PEER4, 5432, at(5432, "peer"))
    expect(pod.pod, PEER6, 5432, at(5432, "peer"))
    expect(pod.pod, FAR4, 80, at(80, "peer"))
    expect(pod.pod, FAR6, 80, at(80, "peer"))
    # loopback and the app's own pod IP are left alone
    expect(pod.pod, "127.0.0.1", 8080, at(8080))
    expect(pod.pod, "::1", 8080, at(8080))
    expect(pod.pod, POD4, 8080, at(8080))
    expect(pod.pod, "127.0.0.1", 8080, at(8080), uid=PROXY_UID)
    # the proxy dialling its own pod's IP goes through its inbound, as a peer's call would,
    # except to the health port and skipped inbound ports
    expect(pod.pod, POD4, 8080, at(15006, orig=(POD4, 8080)), uid=PROXY_UID)
    expect(pod.pod, POD6, 8080, at(15006, orig=(POD6, 8080)), uid=PROXY_UID)
    expect(pod.pod, POD4, 9090, at(9090), uid=PROXY_UID)
    expect(pod.pod, POD4, 15021, at(15021), uid=PROXY_UID)

    # a second run (auto picks the flavour already in use) leaves the same tables
    again = pod.init(*INIT_FLAGS)
    assert f"ipv4 (iptables-{pod.flavour})" in again.stdout
    assert pod.saved() == installed
    other = "legacy" if pod.flavour == "nft" else "nft"
    if other in _flavours():
        assert "MESHPROXY" not in pod.saved(other)
    # --dry-run changes nothing with the rules in force either
    pod.init("--dry-run", *INIT_FLAGS)
    assert pod.saved() == installed

    # --cleanup removes every chain and jump; traffic flows as before
    removed = pod.init("--cleanup")
    assert "rules removed" in removed.stdout
    after = pod.saved()
    assert "MESHPROXY" not in after
    expect(pod.peer, POD4, 8080, at(8080))
    expect(pod.pod, PEER4, 80, at(80, "peer"))
    expect(pod.pod, PEER6, 80, at(80, "peer"))
    # and again: nothing to do, still success
    twice = pod.init("--cleanup", "--iptables", pod.flavour)
    assert "no rules to remove" in twice.stdout
    assert pod.saved() == after


def test_init_refuses_bad_options_and_changes_nothing(pod: Pod) -> None:
    before = pod.saved()
    bad = pod.init("--iptables", pod.flavour, "--skip-outbound-cidrs", "10.0.0.0/33", check=False)
    assert bad.returncode == 2
    assert "--skip-outbound-cidrs: '10.0.0.0/33'" in bad.stderr
    bad = pod.init("--iptables", pod.flavour, "--skip-inbound-ports", "http", check=False)
    assert bad.returncode == 2
    assert pod.saved() == before
