"""`meshproxy stat` against real proxies in front of a real backend, with known traffic."""

from __future__ import annotations

import argparse
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import requests
from aiohttp import web

from meshproxy.stat_cli import add_parser, run, run_async
from support.proxy import ProxyProcess, closed_port, mesh_yaml, wait_for

SLOW_MS = 60  # every success takes this long at the backend: the (50 ms, 100 ms] bucket


def stat_args(*argv: str) -> argparse.Namespace:
    """Parse `meshproxy stat ARGV...` with the command's own parser."""
    parser = argparse.ArgumentParser(prog="meshproxy")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["stat", *argv])


def admin_flags(*proxies: ProxyProcess) -> list[str]:
    return [flag for proxy in proxies for flag in ("--admin", f"127.0.0.1:{proxy.admin}")]


def send(port: int, paths: list[str], host: str | None = None) -> list[int]:
    """Send GET `paths` to 127.0.0.1:`port`, ten at a time; return the status codes."""
    headers = {"Host": host} if host else {}

    def get(path: str) -> int:
        return requests.get(f"http://127.0.0.1:{port}{path}", headers=headers,
                            timeout=10).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        return list(pool.map(get, paths))


def wait_counted(proxy: ProxyProcess, n: int, direction: str = "inbound") -> None:
    wait_for(lambda: proxy.metric_sum("meshproxy_requests_total", direction=direction) == n,
             timeout=10, what=f"{n} {direction} requests counted")


def web_proxy(proxy_factory, backend) -> ProxyProcess:
    """A sidecar of Service web whose inbound traffic goes to the backend."""
    return proxy_factory(mesh_yaml({"web": [backend.address]}), service="web",
                         app_port=backend.port)


def traffic(proxy: ProxyProcess, successes: int, failures: int) -> None:
    """Inbound requests the backend answers 200 after SLOW_MS, or 500 at once."""
    paths = [f"/slow/{SLOW_MS}"] * successes + ["/status/500"] * failures
    assert sorted(send(proxy.inbound, paths)) == [200] * successes + [500] * failures
    wait_counted(proxy, successes + failures)


def test_totals_of_two_instances_of_a_service(proxy_factory, backend, capsys):
    first, second = web_proxy(proxy_factory, backend), web_proxy(proxy_factory, backend)
    traffic(first, successes=25, failures=5)
    traffic(second, successes=15, failures=5)

    code = run(stat_args("--window", "0", "-o", "json", *admin_flags(first, second)))
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    [row] = json.loads(out)
    assert set(row) == {"service", "direction", "instances", "rps", "success_rate", "p50_ms",
                        "p95_ms", "p99_ms", "requests"}
    assert (row["service"], row["direction"], row["instances"]) == ("web.default", "inbound", 2)
    assert (row["requests"], row["success_rate"], row["rps"]) == (50, 0.8, None)
    # 40 of the 50 took at least SLOW_MS: the median lies in the (50 ms, 100 ms] bucket.
    assert 50 < row["p50_ms"] <= 100
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]


def test_window_counts_only_what_happened_between_the_scrapes(proxy_factory, backend, capsys):
    proxy = web_proxy(proxy_factory, backend)
    traffic(proxy, successes=0, failures=30)  # before the window: must not show
    stop = threading.Event()
    sent = []

    def keep_sending() -> None:
        while not stop.is_set():
            sent.append(requests.get(f"http://127.0.0.1:{proxy.inbound}/status/200",
                                     timeout=10).status_code)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        code = run(stat_args("--window", "1", "-o", "json", *admin_flags(proxy)))
    finally:
        stop.set()
        sender.join(10)
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    [row] = json.loads(out)
    assert row["success_rate"] == 1.0
    assert 0 < row["requests"] <= len(sent)
    assert set(sent) == {200}
    # Requests over the time between the two answers, which is the 1 s window and a little.
    assert row["requests"] / 1.5 < row["rps"] <= row["requests"] / 1.0


def test_outbound_direction_shows_what_callers_sent(proxy_factory, backend, capsys):
    caller = proxy_factory(mesh_yaml({"web": [backend.address]}), service="client")
    codes = send(caller.outbound, ["/status/200"] * 4 + ["/status/500"] * 2, host="web")
    assert sorted(codes) == [200] * 4 + [500] * 2
    wait_counted(caller, 6, direction="outbound")

    assert run(stat_args("--window", "0", "-o", "json", "--direction", "outbound",
                         *admin_flags(caller))) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["service"], row["direction"], row["instances"]) == ("web.default", "outbound", 1)
    assert (row["requests"], row["success_rate"]) == (6, round(4 / 6, 6))

    assert run(stat_args("--window", "0", "-o", "json", *admin_flags(caller))) == 0
    assert json.loads(capsys.readouterr().out) == []  # the caller served nothing inbound


def test_table_output(proxy_factory, backend, capsys):
    proxy = web_proxy(proxy_factory, backend)
    traffic(proxy, successes=8, failures=2)
    assert run(stat_args("--window", "0", *admin_flags(proxy))) == 0
    out = capsys.readouterr().out
    assert "inbound, since each proxy started" in out
    [line] = [line for line in out.splitlines() if "web.default" in line]
    assert line.split() == ["web.default", "1", "80.00%", "-", *line.split()[4:7], "10"]
    assert all(cell.endswith("ms") for cell in line.split()[4:7])


def test_an_unreachable_proxy_is_reported_and_skipped(proxy_factory, backend, capsys):
    proxy = web_proxy(proxy_factory, backend)
    traffic(proxy, successes=3, failures=0)
    dead = f"127.0.0.1:{closed_port()}"
    code = run(stat_args("--window", "0.2", "-o", "json", "--admin", dead,
                         *admin_flags(proxy)))
    out, err = capsys.readouterr()
    assert code == 0
    assert dead in err and "skipped" in err
    [row] = json.loads(out)
    assert (row["service"], row["instances"], row["requests"]) == ("web.default", 1, 0)


def test_no_reachable_proxy_is_exit_1(capsys):
    dead = f"127.0.0.1:{closed_port()}"
    assert run(stat_args("--admin", dead, "-o", "json", "--timeout", "2")) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert dead in err and "no proxy could be read" in err


async def serve_proxy_list(proxies: list[dict]) -> tuple[web.AppRunner, str]:
    """Stands in for the control plane's proxy list (`GET /v1/proxies`, notes/control-api.md):
    answers `{"proxies": [...]}` with the entries given; returns the runner and its URL."""

    async def list_proxies(request: web.Request) -> web.Response:
        return web.json_response({"proxies": proxies})

    app = web.Application()
    app.router.add_get("/v1/proxies", list_proxies)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def test_proxies_listed_by_the_control_plane(proxy_factory, backend, capsys):
    busy = web_proxy(proxy_factory, backend)
    idle = proxy_factory(mesh_yaml({"api": []}), service="api")
    traffic(busy, successes=4, failures=1)
    dead = f"127.0.0.1:{closed_port()}"
    runner, control = await serve_proxy_list([
        {"service": "web.default", "instance": "web-0", "admin": f"127.0.0.1:{busy.admin}",
         "version": "v1", "connected": True},
        {"service": "web.default", "instance": "web-1", "admin": dead,
         "version": "v1", "connected": False},
        {"service": "api.default", "instance": "api-0", "admin": f"127.0.0.1:{idle.admin}",
         "version": "v1", "connected": True},
    ])
    try:
        code = await run_async(stat_args("--control", control, "--window", "0", "-o", "json"))
    finally:
        await runner.cleanup()
    out, err = capsys.readouterr()
    assert code == 0
    assert f"{dead} (web.default/web-1)" in err
    rows = {row["service"]: row for row in json.loads(out)}
    assert set(rows) == {"api.default", "web.default"}
    assert (rows["web.default"]["instances"], rows["web.default"]["requests"],
            rows["web.default"]["success_rate"]) == (1, 5, 0.8)
    # An instance that served nothing still shows as one of its Service's instances.
    assert (rows["api.default"]["instances"], rows["api.default"]["requests"]) == (1, 0)


async def test_an_unreachable_control_plane_is_exit_1(capsys):
    control = f"http://127.0.0.1:{closed_port()}"
    assert await run_async(stat_args("--control", control, "--timeout", "2")) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"cannot reach the control plane at {control}/v1/proxies" in err
