"""Request loops are stopped (spec §9 `508 loop-detected`): a request that comes back to the
sidecar that already forwarded it in the same direction is answered at once, counted, and
logged once per source with the likely cause, instead of going round until something gives
up. Real sidecars on 127.0.0.1, made to loop the two ways a configuration can: a Service whose
endpoint is the sidecar's own outbound listener, and an app address that is its own inbound
listener. (Interception without --transparent, which loops the same way through iptables, is
tested in network namespaces by test_transparent.py.)"""

from __future__ import annotations

import subprocess

from support.proxy import ProxyProcess, free_ports, mesh_yaml, wait_for


def start_with_ports(proxy: ProxyProcess, ports: list[int]) -> ProxyProcess:
    """Start on the ports chosen before the Mesh file (which names one of them) was written."""
    proxy.outbound, proxy.inbound, proxy.admin, proxy.health = ports
    assert proxy._launch(20.0), proxy.stderr().decode(errors="replace")
    return proxy


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    done = subprocess.run(["curl", "-s", "-D", "-", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=20)
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def loop_warnings(proxy: ProxyProcess) -> list[str]:
    return [line for line in proxy.stderr().decode(errors="replace").splitlines()
            if "request loop" in line]


def test_a_service_whose_endpoint_is_the_sidecars_own_outbound_listener_gets_508(tmp_path):
    ports = free_ports(4)
    mesh = mesh_yaml({"itself": [f"127.0.0.1:{ports[0]}"]})
    proxy = ProxyProcess(tmp_path, mesh, service="client")
    start_with_ports(proxy, ports)
    try:
        for _ in range(3):
            status, headers, body = curl("-H", "Host: itself", f"http://127.0.0.1:{proxy.outbound}/x")
            assert status == 508 and headers["x-meshproxy-error"] == "loop-detected", (status, headers)
            assert "loop-detected" in body
        # Each request went round once: the pass that came back was refused (508), and the
        # first pass forwarded that answer. Nothing else.
        assert proxy.metric_sum("meshproxy_requests_total", direction="outbound",
                                service="itself.default", code="508") == 6
        assert proxy.metric_sum("meshproxy_requests_total", direction="outbound") == 6
        [warning] = wait_for(lambda: loop_warnings(proxy), what="the loop's warning")
        assert "WARNING" in warning and "outbound listener" in warning
        assert "a route or Service whose endpoints lead back to this sidecar" in warning
    finally:
        proxy.stop()


def test_an_app_address_that_is_the_sidecars_own_inbound_listener_gets_508(tmp_path):
    ports = free_ports(4)
    proxy = ProxyProcess(tmp_path, mesh_yaml({"web": []}), service="web", app_port=ports[1])
    start_with_ports(proxy, ports)
    try:
        status, headers, _ = curl(f"http://127.0.0.1:{proxy.inbound}/api")
        assert status == 508 and headers["x-meshproxy-error"] == "loop-detected"
        assert proxy.metric_sum("meshproxy_requests_total", direction="inbound", code="508") == 2
        [warning] = wait_for(lambda: loop_warnings(proxy), what="the loop's warning")
        assert "inbound listener" in warning and "without --transparent" in warning
    finally:
        proxy.stop()


def test_a_grpc_call_that_loops_ends_with_status_10_aborted(tmp_path):
    ports = free_ports(4)
    mesh = mesh_yaml({"itself": [f"127.0.0.1:{ports[0]}"]})
    proxy = ProxyProcess(tmp_path, mesh, service="client")
    start_with_ports(proxy, ports)
    try:
        status, headers, _ = curl(
            "--http2-prior-knowledge", "-H", "Host: itself", "-H", "content-type: application/grpc",
            "-H", "te: trailers", "--data-binary", "@/dev/null", f"http://127.0.0.1:{proxy.outbound}/demo.Echo/Unary")
        assert status == 200 and headers["grpc-status"] == "10", headers
        assert headers["x-meshproxy-error"] == "loop-detected"
        assert proxy.metric_sum("meshproxy_requests_total", direction="outbound",
                                grpc_status="10") == 2
    finally:
        proxy.stop()


def test_requests_that_do_not_loop_carry_one_mark_per_sidecar_and_direction(tmp_path, backend):
    """The marks are what an app sees of loop detection: one per hop, none of them repeated."""
    proxy = ProxyProcess(tmp_path, mesh_yaml({"web": [backend.address]}), service="client").start()
    try:
        status, _, _ = curl("-H", "Host: web", "-H", "x-meshproxy-hop: inbound-0123456789ab",
                            f"http://127.0.0.1:{proxy.outbound}/api/marks")
        assert status == 200
        [request] = backend.requests("/api/marks")
        hops = [v for k, v in request.headers if k.lower() == "x-meshproxy-hop"]
        assert hops[0] == "inbound-0123456789ab" and len(hops) == 2
        assert hops[1].startswith("outbound-") and len(hops[1]) == len("outbound-") + 12
    finally:
        proxy.stop()
