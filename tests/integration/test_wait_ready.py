"""`meshproxy wait-ready` as the kubelet runs it in a classic sidecar's postStart hook: against
a health port on 127.0.0.1 that is not ready yet, one that is, and a real proxy."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@pytest.fixture
def health():
    """A health port whose /ready answers 503 until `state["ready"]` is set."""
    state = {"ready": False}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/ready" and state["ready"] else 503
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def wait_ready(port: int, timeout: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshproxy", "wait-ready", "--port", str(port),
                           "--timeout", timeout], capture_output=True, text=True, timeout=30)


def test_the_command_exits_1_while_the_proxy_is_not_ready(health):
    port, _ = health
    done = wait_ready(port, "0.5")
    assert done.returncode == 1 and f"127.0.0.1:{port} was not ready within 0.5s" in done.stderr


def test_the_command_exits_0_once_ready_and_loads_nothing_heavy(health):
    port, state = health
    state["ready"] = True
    done = subprocess.run([sys.executable, "-c",
                           "import sys; from meshproxy.cli import main; code = main(sys.argv[1:]); "
                           "print(sorted(m for m in ('aiohttp', 'cryptography', 'rich', 'yaml') if m in sys.modules)); "
                           "sys.exit(code)", "wait-ready", "--port", str(port), "--timeout", "5"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # it runs in the proxy's container, under its memory limit


def test_the_command_against_a_real_proxy(tmp_path):
    from support.proxy import ProxyProcess, mesh_yaml

    proxy = ProxyProcess(tmp_path, mesh_yaml({"web": ["127.0.0.1:9"]})).start()
    try:
        assert wait_ready(proxy.health, "10").returncode == 0
        proxy.signal()  # draining: /ready answers 503 from then on
        proxy.wait(10)
        assert wait_ready(proxy.health, "0.3").returncode == 1
    finally:
        proxy.stop()
