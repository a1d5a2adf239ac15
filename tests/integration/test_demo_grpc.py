"""The demo's gRPC hop (`drone.v1.Telemetry` on `drone-telemetry`) with the real apps: the
drone reports, a telemetry instance answers, directly and through a sidecar, and the scheduler's
preflight makes the call through its sidecar. (`meshproxy up` on the whole demo, with mTLS
between the sidecars: test_demo_apps.py.)"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest
import requests
import yaml

from support.proxy import ProxyProcess, free_ports, mesh_yaml, wait_for

from meshproxy.demo.common import Reply, Settings
from meshproxy.demo.rpc import GrpcCaller, decode, encode
from meshproxy.demo.telemetry import POSITION, WATCH

REPO = Path(__file__).resolve().parents[2]
# The demo's own policy for the gRPC Service: round robin, retries on UNAVAILABLE, a timeout.
# As text: a YAML 1.1 parser would read its `on:` as True.
POLICY = next(doc for doc in (REPO / "config" / "demo" / "traffic-policy.yaml").read_text().split("\n---\n")
              if yaml.safe_load(doc)["metadata"]["name"] == "drone-telemetry")
POINT_A = {"lat": 47.6, "lon": -122.3}
POINT_B = {"lat": 47.7, "lon": -122.2}


class App:
    """One demo app (`python -m meshproxy.demo ROLE`) on a free port; its log in a file."""

    def __init__(self, tmp: Path, role: str, instance: str, *args: str, env: dict[str, str]) -> None:
        self.port = free_ports(1)[0]
        self.instance = instance
        self.log_path = tmp / f"{instance}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshproxy.demo", role, "--port", str(self.port),
                 "--instance", instance, *args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> "App":
        def listening() -> bool:
            assert self.process.poll() is None, self.log()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(listening, timeout=20, interval=0.05, what=f"{self.instance} to listen")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MESHPROXY_") and k.lower() not in ("http_proxy", "https_proxy", "grpc_proxy")}
    env["DEMO_STORE_DIR"] = str(tmp / "store")  # the drone and every telemetry instance share it
    return env


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A drone app and three telemetry instances sharing the reports' store."""
    tmp = tmp_path_factory.mktemp("demo-grpc")
    env = _env(tmp)
    drone = App(tmp, "drone", "drone-0", "--interval", "0.1", env=env)
    telemetry = [App(tmp, "telemetry", f"drone-telemetry-{i}", env=env) for i in range(3)]
    try:
        for app in (drone, *telemetry):
            app.wait_ready()
        yield tmp, drone, telemetry
    finally:
        for app in (drone, *telemetry):
            app.stop()


@pytest.fixture(scope="module")
def sidecar(fleet):
    """A standalone sidecar whose `drone-telemetry` Service is the three instances, with the
    demo's TrafficPolicy."""
    tmp, _, telemetry = fleet
    proxy = ProxyProcess(tmp, mesh_yaml({"drone-telemetry": [t.address for t in telemetry]},
                                        ports={"drone-telemetry": 50051}, documents=[POLICY]),
                         service="scheduler", name="scheduler-sidecar").start()
    yield proxy
    proxy.stop()


def _http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _assign(drone: App, delivery_id: str) -> str:
    r = _http().post(f"{drone.url}/api/drones/assign", timeout=5, json={
        "deliveryId": delivery_id, "pickupLocation": POINT_A, "dropoffLocation": POINT_B})
    assert r.status_code == 200, r.text
    return r.json()["droneId"]


def _channel(address: str, authority: str | None = None) -> grpc.Channel:
    options = [("grpc.enable_http_proxy", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(address, options=options)


def _position(ch: grpc.Channel):
    return ch.unary_unary(POSITION, request_serializer=encode, response_deserializer=decode)


def _watch(ch: grpc.Channel):
    return ch.unary_stream(WATCH, request_serializer=encode, response_deserializer=decode)


# -- app to app --------------------------------------------------------------------------------

def test_a_telemetry_instance_answers_for_a_drone_the_drone_app_assigned(fleet) -> None:
    _, drone, telemetry = fleet
    drone_id = _assign(drone, "d-direct-1")
    with _channel(telemetry[1].address) as ch:
        answer, call = _position(ch).with_call({"droneId": drone_id}, timeout=5,
                                               metadata=[("x-request-id", "rid-direct-1")])
    assert call.code() == grpc.StatusCode.OK
    assert answer["droneId"] == drone_id and answer["state"] == "assigned"
    assert answer["deliveryId"] == "d-direct-1" and answer["battery"] == 100.0
    assert answer["servedBy"] == "drone-telemetry-1" and answer["reportedBy"] == "drone-0"
    # Any instance answers for any drone: the reports are shared.
    with _channel(telemetry[2].address) as ch:
        assert _position(ch)({"droneId": drone_id}, timeout=5)["servedBy"] == "drone-telemetry-2"
    assert wait_for(lambda: "drone-telemetry-1 gRPC /drone.v1.Telemetry/Position OK" in telemetry[1].log()
                    and "rid=rid-direct-1" in telemetry[1].log(), timeout=5, what="the call's log line")


def test_unknown_drones_and_bad_requests_get_grpc_statuses(fleet) -> None:
    _, _, telemetry = fleet
    with _channel(telemetry[0].address) as ch:
        with pytest.raises(grpc.RpcError) as missing:
            _position(ch)({"droneId": "drone-999"}, timeout=5)
        with pytest.raises(grpc.RpcError) as bad:
            _position(ch)({"droneId": "../etc"}, timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no telemetry from drone drone-999" in missing.value.details()
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_streams_a_flight_until_the_drone_lands(fleet) -> None:
    _, drone, telemetry = fleet
    drone_id = _assign(drone, "d-direct-2")
    r = _http().post(f"{drone.url}/api/drones/{drone_id}/dispatch", json={"deliveryId": "d-direct-2"}, timeout=5)
    assert r.status_code == 202, r.text
    with _channel(telemetry[0].address) as ch:
        updates = list(_watch(ch)({"droneId": drone_id}, timeout=10))
    assert len(updates) >= 3, updates
    assert [u["state"] for u in updates][-1] == "idle" and updates[0]["state"] == "flying"
    assert all(a["seq"] < b["seq"] for a, b in zip(updates, updates[1:]))
    assert (updates[-1]["lat"], updates[-1]["lon"]) == (POINT_B["lat"], POINT_B["lon"])
    assert min(u["battery"] for u in updates) < 100.0  # the battery drained on the way


# -- through a sidecar --------------------------------------------------------------------------

def test_calls_through_the_sidecar_are_balanced_per_call(fleet, sidecar) -> None:
    _, drone, _ = fleet
    drone_id = _assign(drone, "d-mesh-1")
    with _channel(f"127.0.0.1:{sidecar.outbound}", authority="drone-telemetry") as ch:
        position = _position(ch)
        served = Counter(position({"droneId": drone_id}, timeout=5)["servedBy"] for _ in range(150))
    # One client connection, yet the calls are shared out one by one (round robin: a third each).
    assert served == {"drone-telemetry-0": 50, "drone-telemetry-1": 50, "drone-telemetry-2": 50}, served
    counted = sidecar.metric_sum("meshproxy_requests_total", direction="outbound",
                                 service="drone-telemetry.default")
    assert counted >= 150


def test_the_policys_timeout_cuts_the_deadline_the_app_sees(fleet, sidecar) -> None:
    """The caller allows 5 s; the demo's TrafficPolicy gives drone-telemetry 1 s, so the app
    gets a `grpc-timeout` of at most 1 s from the sidecar."""
    _, drone, telemetry = fleet
    drone_id = _assign(drone, "d-mesh-deadline")
    with _channel(f"127.0.0.1:{sidecar.outbound}", authority="drone-telemetry") as ch:
        _position(ch)({"droneId": drone_id}, timeout=5, metadata=[("x-request-id", "rid-deadline")])
    line = wait_for(lambda: next((x for t in telemetry for x in t.log().splitlines() if "rid=rid-deadline" in x), None),
                    timeout=5, what="the call's log line")
    deadline = float(re.search(r"deadline=([\d.]+)s", line).group(1))
    assert 0.5 < deadline <= 1.0, line


def test_a_watch_streams_through_the_sidecar_and_gets_a_request_id(fleet, sidecar) -> None:
    _, drone, telemetry = fleet
    drone_id = _assign(drone, "d-mesh-2")
    r = _http().post(f"{drone.url}/api/drones/{drone_id}/dispatch", json={"deliveryId": "d-mesh-2"}, timeout=5)
    assert r.status_code == 202, r.text
    with _channel(f"127.0.0.1:{sidecar.outbound}", authority="drone-telemetry") as ch:
        updates = list(_watch(ch)({"droneId": drone_id}, timeout=10))
    assert updates[-1]["state"] == "idle" and len(updates) >= 3, updates
    served = updates[0]["servedBy"]
    assert all(u["servedBy"] == served for u in updates)  # one call, one instance
    log = next(t for t in telemetry if t.instance == served).log()
    line = [x for x in log.splitlines() if "/drone.v1.Telemetry/Watch OK" in x][-1]
    assert "rid=" in line  # the sidecar started the request id (spec §4)


def test_the_flaky_instance_is_retried_on_another(fleet) -> None:
    tmp, drone, telemetry = fleet
    env = _env(tmp)
    flaky = App(tmp, "telemetry", "drone-telemetry-flaky", "--failure-rate", "1", env=env)
    proxy = ProxyProcess(tmp, mesh_yaml({"drone-telemetry": [flaky.address, telemetry[0].address]},
                                        documents=[POLICY]),
                         service="scheduler", name="flaky-sidecar")
    try:
        flaky.wait_ready()
        proxy.start()
        drone_id = _assign(drone, "d-mesh-3")
        with _channel(f"127.0.0.1:{proxy.outbound}", authority="drone-telemetry") as ch:
            served = {_position(ch)({"droneId": drone_id}, timeout=5)["servedBy"] for _ in range(40)}
        assert served == {"drone-telemetry-0"}
        assert "UNAVAILABLE" in flaky.log()  # it was called, and failed
        assert proxy.metric_sum("meshproxy_retries_total", service="drone-telemetry.default",
                                reason="unavailable") >= 1
    finally:
        proxy.stop()
        flaky.stop()


def test_the_proxys_own_grpc_error_reaches_the_caller_with_its_reason(fleet) -> None:
    """No telemetry instance at all: the sidecar answers the call itself (trailers-only,
    UNAVAILABLE, `x-meshproxy-error: no-endpoints`), and the demo's client reads it as a
    transient failure that names the proxy's reason, as the scheduler's step would record it."""
    tmp, _, _ = fleet
    proxy = ProxyProcess(tmp, mesh_yaml({"drone-telemetry": []}), service="scheduler",
                         name="empty-sidecar")
    try:
        proxy.start()
        settings = Settings(role="scheduler", outbound=f"http://127.0.0.1:{proxy.outbound}")

        async def call() -> Reply:
            caller = GrpcCaller(settings)
            try:
                return await caller.call("drone-telemetry", POSITION, {"droneId": "drone-001"},
                                         headers={"x-request-id": "rid-empty"}, timeout=5)
            finally:
                await caller.close()

        reply = asyncio.run(call())
        assert reply.grpc_code == "UNAVAILABLE" and reply.status == 503 and reply.transient
        assert reply.describe() == "503 UNAVAILABLE (proxy: no-endpoints)", reply
    finally:
        proxy.stop()


def test_the_schedulers_preflight_goes_through_its_sidecar(fleet) -> None:
    """The scheduler, meshed by a sidecar that knows every Service it calls: a delivery request
    makes its HTTP calls and the gRPC preflight through that sidecar."""
    tmp, drone, telemetry = fleet
    env = _env(tmp)
    others: dict[str, App] = {}
    proxy = scheduler = None
    try:
        for name in ("account", "package", "delivery", "thirdparty"):
            others[name] = App(tmp, name, f"{name}-0", env=env)
        for app in others.values():
            app.wait_ready()
        services = {name: [app.address] for name, app in others.items()}
        services["drone"] = [drone.address]
        services["drone-telemetry"] = [t.address for t in telemetry]
        proxy = ProxyProcess(tmp, mesh_yaml(services), service="scheduler", name="preflight-sidecar").start()
        scheduler = App(tmp, "scheduler", "scheduler-0", "--outbound", f"http://127.0.0.1:{proxy.outbound}",
                        env=env).wait_ready()
        served = set()
        for n in range(6):
            r = _http().post(f"{scheduler.url}/api/deliveryrequests", timeout=10, json={
                "deliveryId": f"d-preflight-{n}", "ownerId": "acct-0001", "pickupLocation": POINT_A,
                "dropoffLocation": POINT_B, "packageInfo": {"size": "small", "weight": 1}})
            assert r.status_code == 201, r.text
            workflow = r.json()
            assert workflow["steps"]["preflight"] == "ok"
            assert workflow["droneTelemetry"]["battery"] == 100.0
            assert all(isinstance(workflow["droneTelemetry"][k], float) for k in ("lat", "lon"))
            served.add(workflow["droneTelemetry"]["servedBy"])
        assert served <= {"drone-telemetry-0", "drone-telemetry-1", "drone-telemetry-2"} and served
        assert proxy.metric_sum("meshproxy_requests_total", direction="outbound",
                                service="drone-telemetry.default") >= 6
        assert proxy.metric_sum("meshproxy_requests_total", direction="outbound", service="drone.default") >= 12
    finally:
        for app in (scheduler, *others.values()):
            if app is not None:
                app.stop()
        if proxy is not None:
            proxy.stop()
