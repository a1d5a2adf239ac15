"""h2load (Debian `nghttp2-client`, libnghttp2's load generator) through a real sidecar:
many streams on a few HTTP/2 connections, every one answered by the backend, none failed,
each counted as a request. Not a measurement (benchmarks/h2.py measures); a client that
multiplexes harder than curl or grpcio do."""

from __future__ import annotations

import re
import subprocess

from support.grpcapp import GrpcApp
from support.proxy import ProxyProcess, mesh_yaml


def h2load(port: int, *args: str, path: str = "/api/h2load") -> dict[str, int]:
    done = subprocess.run(["h2load", *args, f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    found = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored", done.stdout)
    assert found, done.stdout
    codes = re.search(r"status codes: (\d+) 2xx", done.stdout)
    assert codes, done.stdout
    total, _, finished, succeeded, failed, errored = map(int, found.groups())
    return {"total": total, "done": finished, "succeeded": succeeded, "failed": failed,
            "errored": errored, "2xx": int(codes.group(1))}


def test_h2load_streams_all_succeed_through_the_sidecar(tmp_path, backend, backend_b):
    mesh = mesh_yaml({"web": [backend.address, backend_b.address]})
    proxy = ProxyProcess(tmp_path, mesh, service="client").start()
    try:
        before = proxy.metric_sum("meshproxy_requests_total", service="web.default", code="200")
        # 4 connections with 25 streams each in flight; :authority names the Service.
        result = h2load(proxy.outbound, "-n", "4000", "-c", "4", "-m", "25",
                        "-H", ":authority: web")
        assert result == {"total": 4000, "done": 4000, "succeeded": 4000, "failed": 0,
                          "errored": 0, "2xx": 4000}
        after = proxy.metric_sum("meshproxy_requests_total", service="web.default", code="200")
        assert after - before == 4000
        # Balanced per request over both backends, not per connection.
        assert len(backend.requests("/api/h2load")) > 500 and len(backend_b.requests("/api/h2load")) > 500
    finally:
        proxy.stop()


def test_h2load_grpc_calls_fill_the_upstreams_stream_limit_and_all_succeed(tmp_path):
    """gRPC calls, 200 in flight, to an app that allows 8 streams per connection: the
    sidecar opens as many HTTP/2 connections as it needs and none fails (it once spun for
    ever here, waiting on a connection that was already full)."""
    app = GrpcApp("limited", max_streams=8).start()
    try:
        proxy = ProxyProcess(tmp_path, mesh_yaml({"echo": [app.address]}), service="client").start()
        try:
            message = tmp_path / "message"
            message.write_bytes(b"\x00\x00\x00\x00\x02hi")  # one gRPC message: b"hi"
            result = h2load(proxy.outbound, "-n", "3000", "-c", "4", "-m", "50",
                            "-d", str(message), "-H", ":authority: echo",
                            "-H", "content-type: application/grpc", "-H", "te: trailers",
                            path="/demo.Echo/Unary")
            assert result == {"total": 3000, "done": 3000, "succeeded": 3000, "failed": 0,
                              "errored": 0, "2xx": 3000}
            assert proxy.metric_sum("meshproxy_requests_total", service="echo.default",
                                    grpc_status="0") == 3000
            assert app.calls == 3000
        finally:
            proxy.stop()
    finally:
        app.stop()
