"""Large bodies stream through the proxy in both directions without being buffered whole.

100 MiB each way with curl, checked byte for byte (SHA-256) at the other end, while the
proxy's peak resident memory (VmHWM) stays within 32 MiB of what it used at start; and a client
that reads slowly holds the upstream back instead of filling the proxy's memory. On uvloop
and on the standard asyncio loop, whose flow-control callbacks differ in timing.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
import uuid

import pytest

from support.backend import BLOCK, pattern_sha256
from support.proxy import ProxyProcess, mesh_yaml

MIB = 1024 * 1024
SIZE = 100 * MIB
HEADROOM_KIB = 32 * 1024


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(request, tmp_path_factory, backend) -> ProxyProcess:
    running = ProxyProcess(tmp_path_factory.mktemp(request.param),
                           mesh_yaml({"web": [backend.address]}),
                           uvloop=request.param == "uvloop").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def start_rss(proxy) -> int:
    """The proxy's resident memory once it is ready, before any large body."""
    return proxy.rss_kib()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[str, str]:
    """A 100 MiB file (not the backend's pattern) and its SHA-256."""
    path = tmp_path_factory.mktemp("body") / "upload.bin"
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    with open(path, "wb") as f:
        for i in range(SIZE // len(block)):
            piece = block[i % 64:] + block[:i % 64]
            f.write(piece)
            digest.update(piece)
    return str(path), digest.hexdigest()


def test_100_mib_chunked_upload(proxy, start_rss, big_file, backend):
    path, sha = big_file
    tag = uuid.uuid4().hex
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "60", "-H", "Host: web",
         "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}",
         f"http://127.0.0.1:{proxy.outbound}/upload?{tag}"],
        capture_output=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"bytes": SIZE, "sha256": sha}
    [seen] = backend.requests(f"/upload?{tag}")
    assert seen.header("transfer-encoding") == "chunked"  # streamed on, not collected
    assert proxy.peak_rss_kib() < start_rss + HEADROOM_KIB, (proxy.peak_rss_kib(), start_rss)


def test_100_mib_download(proxy, start_rss):
    curl = subprocess.Popen(
        ["curl", "-sS", "--fail", "--max-time", "60", "-H", "Host: web",
         f"http://127.0.0.1:{proxy.outbound}/bytes/{SIZE}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    digest = hashlib.sha256()
    received = 0
    while piece := curl.stdout.read(MIB):
        digest.update(piece)
        received += len(piece)
    assert curl.wait(30) == 0, curl.stderr.read()
    assert received == SIZE
    assert digest.hexdigest() == pattern_sha256(SIZE)
    assert proxy.peak_rss_kib() < start_rss + HEADROOM_KIB, (proxy.peak_rss_kib(), start_rss)


def test_a_slow_reader_holds_the_upstream_back(proxy, start_rss):
    sock = socket.socket()
    # A small receive window, so that the proxy, not the kernel, would have to hold the rest.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", proxy.outbound))
    try:
        sock.sendall(f"GET /bytes/{SIZE} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
        first = sock.recv(16 * 1024)
        assert first.startswith(b"HTTP/1.1 200")
        rss = [proxy.rss_kib()]
        received = len(first)
        end = time.monotonic() + 2
        while time.monotonic() < end:  # read about 1 MiB/s for 2 s
            received += len(sock.recv(16 * 1024))
            rss.append(proxy.rss_kib())
            time.sleep(0.015)
        # Without back-pressure the proxy would have read the whole 100 MiB by now.
        assert received < 20 * MIB
        assert max(rss) < start_rss + HEADROOM_KIB, (max(rss), start_rss)
        assert max(rss) - rss[0] < 16 * 1024, rss
    finally:
        sock.close()
    # The proxy serves the next client normally.
    with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as again:
        again.sendall(b"GET /bytes/10 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := again.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert BLOCK[:10] in data
