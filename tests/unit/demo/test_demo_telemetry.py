"""The demo's gRPC pieces without sockets: where a channel connects, how a status becomes a
Reply, and what `drone.v1.Telemetry` answers from the drones' reports."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest

from meshproxy.demo.common import Settings
from meshproxy.demo.package import Faults
from meshproxy.demo.rpc import HTTP_STATUS, Refuse, channel_target, decode, encode, error_reply
from meshproxy.demo.store import Store
from meshproxy.demo.telemetry import Telemetry, record_report


def test_a_channel_goes_through_the_sidecar_and_names_the_service() -> None:
    meshed = Settings(role="scheduler", outbound="http://127.0.0.1:15001")
    assert channel_target(meshed, "drone-telemetry") == ("127.0.0.1:15001", "drone-telemetry")
    direct = Settings(role="scheduler", outbound="http://127.0.0.1:15001",
                      upstreams={"drone-telemetry": "http://127.0.0.1:4000"})
    assert channel_target(direct, "drone-telemetry") == ("127.0.0.1:4000", None)
    assert channel_target(Settings(role="scheduler"), "drone-telemetry") == ("drone-telemetry:80", None)


def test_messages_are_json_bytes() -> None:
    assert encode({"droneId": "drone-001"}) == b'{"droneId":"drone-001"}'
    assert decode(b'{"a":[1,2]}') == {"a": [1, 2]} and decode(b"") is None
    with pytest.raises(ValueError):
        decode(b"\x00\x01")


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing=()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return self._trailing


def test_a_status_becomes_a_reply_judged_like_http() -> None:
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503 and HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    reply = error_reply(_Failed(grpc.StatusCode.UNAVAILABLE, "no-endpoints: drone-telemetry.default",
                                (("x-meshproxy-error", "no-endpoints"),)))
    assert reply.status == 503 and reply.transient and reply.grpc_code == "UNAVAILABLE"
    assert reply.describe() == "503 UNAVAILABLE (proxy: no-endpoints)"
    missing = error_reply(_Failed(grpc.StatusCode.NOT_FOUND, "no telemetry from drone drone-9"))
    assert not missing.transient and missing.describe() == "404 NOT_FOUND (no telemetry from drone drone-9)"
    assert error_reply(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")).transient


class _Call:
    metadata: dict = {}
    deadline = None


def _telemetry(tmp_path: Path, rate: float = 0.0) -> tuple[Telemetry, Store]:
    store = Store(tmp_path / "telemetry.sqlite")
    return Telemetry(store, "drone-telemetry-0", Faults(rate, random.Random(3)), poll=0.001), store


def _report(state: str, delivery: str | None, lat: float) -> dict:
    return {"droneId": "drone-001", "state": state, "deliveryId": delivery, "lat": lat, "lon": -122.3,
            "battery": 100.0}


async def test_position_answers_the_last_report_and_who_served_it(tmp_path: Path) -> None:
    telemetry, store = _telemetry(tmp_path)
    first = record_report(store, _report("assigned", "d-1", 47.6), "drone-0")
    second = record_report(store, _report("flying", "d-1", 47.65), "drone-0")
    assert (first["seq"], second["seq"]) == (1, 2) and second["reportedBy"] == "drone-0"
    answer = await telemetry.position({"droneId": "drone-001"}, _Call())
    assert answer["state"] == "flying" and answer["lat"] == 47.65 and answer["seq"] == 2
    assert answer["servedBy"] == "drone-telemetry-0"
    with pytest.raises(Refuse) as refused:
        await telemetry.position({"droneId": "drone-404"}, _Call())
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(Refuse) as refused:
        await telemetry.position({"droneId": "../x"}, _Call())
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    store.close()


async def test_watch_follows_a_flight_until_the_drone_lands(tmp_path: Path) -> None:
    telemetry, store = _telemetry(tmp_path)
    record_report(store, _report("flying", "d-1", 47.60), "drone-0")
    seen: list[dict] = []

    async def watch() -> None:
        async for message in telemetry.watch({"droneId": "drone-001"}, _Call()):
            seen.append(message)

    watching = asyncio.ensure_future(watch())
    for lat in (47.61, 47.62):
        await asyncio.sleep(0.02)
        record_report(store, _report("flying", "d-1", lat), "drone-0")
    await asyncio.sleep(0.02)
    record_report(store, _report("idle", None, 47.62), "drone-0")
    await asyncio.wait_for(watching, 2)
    assert [m["lat"] for m in seen] == [47.60, 47.61, 47.62, 47.62]
    assert [m["state"] for m in seen][-1] == "idle" and [m["seq"] for m in seen] == [1, 2, 3, 4]
    # An idle drone is answered once; maxUpdates caps a watch.
    assert [m["state"] async for m in telemetry.watch({"droneId": "drone-001"}, _Call())] == ["idle"]
    record_report(store, _report("flying", "d-2", 47.7), "drone-0")
    assert len([m async for m in telemetry.watch({"droneId": "drone-001", "maxUpdates": 1}, _Call())]) == 1
    store.close()


async def test_injected_failures_are_unavailable(tmp_path: Path) -> None:
    telemetry, store = _telemetry(tmp_path, rate=1.0)
    record_report(store, _report("idle", None, 47.6), "drone-0")
    with pytest.raises(Refuse) as refused:
        await telemetry.position({"droneId": "drone-001"}, _Call())
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and telemetry.faults.injected == 1
    store.close()
