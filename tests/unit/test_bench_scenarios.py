"""The resilience scenario benchmark's own parts: statistics, configs, backend and client."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from harness import scenario_backend, scenario_load  # noqa: E402
from harness.scenario_cases import AFFECTED, CASES, select, write_mesh  # noqa: E402
from harness.scenario_report import markdown  # noqa: E402
from harness.scenario_stats import (Records, failure_times, percentile, recovery,  # noqa: E402
                                    summarise, timeline)
from meshproxy.config.loader import load  # noqa: E402
from meshproxy.config.snapshot import Snapshot  # noqa: E402


def records(rows: list[tuple[float, float, int, int]], end: float = 10.0) -> Records:
    """Records from (t, latency, status, instance index) rows; instances b0, b1, b2."""
    return Records(start=0.0, end=end, instances=["b0", "b1", "b2"],
                   t=[r[0] for r in rows], lat=[r[1] for r in rows],
                   status=[r[2] for r in rows], inst=[r[3] for r in rows])


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summarise_counts_only_the_window_and_reports_shares_and_failures():
    rec = records([
        (0.5, 0.001, 200, 0),    # before the window: ignored
        (1.0, 0.002, 200, 0),
        (1.5, 0.004, 200, 1),
        (2.0, 0.050, 200, 2),
        (2.5, 0.001, 503, 2),    # a failure answered by b2
        (3.0, 5.0, scenario_load.TIMEOUT, -1),
        (4.0, 0.001, 200, 0),    # at `until`: ignored
    ])
    s = summarise(rec, 1.0, 4.0)
    assert s["requests"] == 5
    assert s["rps"] == pytest.approx(5 / 3)
    assert s["failures"] == 2
    assert s["success_pct"] == pytest.approx(60.0)
    assert s["failures_by_kind"] == {"503": 1, "timeout": 1}
    # Latency percentiles come from the 3 successes only: 2, 4 and 50 ms.
    assert s["p50_ms"] == pytest.approx(4.0)
    assert s["p99_ms"] == pytest.approx(50.0)
    assert s["max_ms"] == pytest.approx(50.0)
    assert s["share"] == {"b0": pytest.approx(0.25), "b1": pytest.approx(0.25),
                          "b2": pytest.approx(0.5)}


def test_summarise_of_an_empty_window_has_no_latency():
    s = summarise(records([(1.0, 0.001, 200, 0)]), 5.0, 6.0)
    assert s["requests"] == 0 and s["success_pct"] is None and s["p99_ms"] is None


def test_recovery_finds_the_last_answer_before_the_kill_and_the_first_after_restart():
    rec = records([
        (1.0, 0.001, 200, 2),
        (1.9, 0.001, 200, 2),    # last answer of b2 before the kill at 2.0
        (2.1, 0.001, 200, 0),
        (2.2, 0.0, scenario_load.CLOSED, -1),
        (12.5, 0.001, 200, 0),
        (13.0, 0.001, 200, 2),   # back: restart accepted at 12.0
        (13.5, 0.001, 200, 1),
        (14.0, 0.001, 200, 2),
    ], end=15.0)
    r = recovery(rec, "b2", killed_at=2.0, back_at=12.0)
    assert r["last_answer_s"] == pytest.approx(-0.1)
    assert r["first_answer_after_restart_s"] == pytest.approx(1.0)
    assert r["share_after_return"] == pytest.approx(2 / 3)
    assert r["failures_after_kill"] == 1
    assert r["failures_after_kill_by_kind"] == {"connection closed": 1}
    assert r["failure_times_s"] == [pytest.approx(0.2)]


def test_recovery_when_the_instance_never_comes_back():
    rec = records([(1.0, 0.001, 200, 2), (5.0, 0.001, 200, 0)])
    r = recovery(rec, "b2", killed_at=2.0, back_at=4.0)
    assert r["first_answer_after_restart_s"] is None and r["share_after_return"] is None


def test_timeline_gives_the_share_per_second():
    rec = records([(0.1, 0, 200, 2), (0.2, 0, 200, 0), (1.5, 0, 200, 0), (2.5, 0, 200, 2)],
                  end=3.0)
    assert timeline(rec, "b2", origin=0.0) == [0.5, 0.0, 1.0]


def test_select_takes_scenario_letters_and_case_keys_in_a_fixed_order():
    assert [c.key for c in select(["c-nginx", "b"])] == ["b-defaults", "b-noretry", "b-nginx",
                                                          "c-nginx"]
    with pytest.raises(ValueError, match="nope"):
        select(["nope"])


@pytest.mark.parametrize("case", [c for c in CASES if c.proxy == "meshproxy"],
                         ids=lambda c: c.key)
def test_every_meshproxy_case_writes_a_config_the_proxy_accepts(case, tmp_path):
    ports = {i.name: 9000 + n for n, i in enumerate(case.instances)}
    result = load([str(p) for p in write_mesh(case, ports, tmp_path)])
    assert not result.errors and not result.warnings
    policy = Snapshot(result.resources).policy_for("backend.default")
    wanted = (case.policy or {}).get("loadBalancer", {}).get("type", "PeakEWMA")
    assert policy.load_balancer.type == wanted
    assert policy.retry.attempts == (case.policy or {}).get("retry", {}).get("attempts", 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _listening(port: int, deadline: float) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)
        else:
            writer.close()
            return


async def test_load_generator_records_status_latency_and_instance_of_the_backend():
    slow, failing = _free_port(), _free_port()
    servers = [asyncio.create_task(scenario_backend.serve("127.0.0.1", slow, "b0", 200, 0.02)),
               asyncio.create_task(scenario_backend.serve("127.0.0.1", failing, AFFECTED, 503,
                                                          0.0))]
    try:
        for port in (slow, failing):
            await _listening(port, time.monotonic() + 5)
        ok = await scenario_load.run("127.0.0.1", slow, "backend", "/", 2, 0.3, 2.0)
        bad = await scenario_load.run("127.0.0.1", failing, "backend", "/", 1, 0.1, 2.0)
    finally:
        for task in servers:
            task.cancel()
        await asyncio.gather(*servers, return_exceptions=True)
    assert ok["instances"] == ["b0"]
    assert set(ok["status"]) == {200} and set(ok["inst"]) == {0}
    # Two connections, 20 ms per answer, 0.3 s: about 30 requests, each at least 20 ms.
    assert 10 <= len(ok["t"]) <= 40
    assert min(ok["lat"]) >= 0.019
    assert all(ok["start"] <= t < ok["end"] for t in ok["t"])
    assert bad["instances"] == [AFFECTED] and set(bad["status"]) == {503}


async def test_load_generator_records_connections_closed_without_an_answer_as_failures():
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await scenario_load.run("127.0.0.1", port, "backend", "/", 1, 0.1, 1.0)
    assert result["t"], "at least one request was made"
    assert set(result["status"]) == {scenario_load.CLOSED}
    assert set(result["inst"]) == {-1} and result["instances"] == []


def test_failure_times_are_relative_sorted_and_limited():
    rec = records([(3.0, 0, 503, 2), (1.0, 0, 200, 0), (2.0, 0, scenario_load.TIMEOUT, -1),
                   (4.0, 0, 503, 2)])
    assert failure_times(rec, origin=1.0, limit=2) == [1.0, 2.0]


def _result(p99: float, share_b2: float, failures: int = 0, success: float = 100.0) -> dict:
    summary = {"requests": 1000, "rps": 100.0, "successes": 1000 - failures,
               "failures": failures, "success_pct": success,
               "failures_by_kind": {"503": failures} if failures else {},
               "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": p99, "max_ms": 60.0,
               "share": {"b0": 0.5 - share_b2 / 2, "b1": 0.5 - share_b2 / 2, "b2": share_b2}}
    cpu = {"proxy_cpu_us_per_req": 80.0, "proxy_core_busy_pct": 90.0,
           "load_core_busy_pct": 70.0, "proxy_core_other_pct": 1.0, "load_core_other_pct": 2.0}
    return {"summary": summary, "metrics": {"retries_total": 3, "budget_exhausted": 0,
                                            "ejections": 1},
            "cpu": cpu, "timeline": [share_b2], "failure_times_s": [0.5] * failures}


def test_report_says_which_goals_are_met_and_which_missed():
    meta = {"date": "today", "command": "python benchmarks/scenarios.py --quick",
            "settings": {"concurrency": 16, "warmup": 1, "duration": 5, "kill_at": 2,
                         "restart_after": 10, "recovery_window": 10, "request_timeout": 5,
                         "proxy_cpu": 0, "load_cpu": 1},
            "machine": {"nproc": "2"}, "busy_before_start": {0: 1.0, 1: 2.0}, "failures": []}
    results = {"a-healthy": _result(p99=2.0, share_b2=0.0),
               "a-peakewma": _result(p99=2.9, share_b2=0.06),
               "b-defaults": _result(p99=3.0, share_b2=0.0, failures=2, success=99.8)}
    text = markdown(meta, results)
    assert "python benchmarks/scenarios.py --quick" in text
    assert "2.90 ms, **met**" in text  # 2.9 <= 1.5 x 2.0
    assert "6.0 %, **missed**" in text  # more than 5 % to the slow instance
    assert "99.800 %, **missed**" in text
    assert "## c." not in text  # a scenario that did not run has no section
