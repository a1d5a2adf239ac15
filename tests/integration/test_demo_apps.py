"""The drone-delivery demo run for real: `meshproxy up` on config/demo/mesh.yaml (moved to free
ports), requests through ingestion, and what every service and sidecar then shows, including
the gRPC hop: the scheduler's preflight call to `drone-telemetry` (drone.v1.Telemetry)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.output import Lines
from support.proxy import free_ports, wait_for

from meshproxy.demo.rpc import decode, encode
from meshproxy.demo.telemetry import POSITION

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "config" / "demo"
PENDING = ("accepted", "scheduling")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
POINT_A = {"lat": 47.6, "lon": -122.3}
POINT_B = {"lat": 47.7, "lon": -122.2}


class Demo:
    """A running demo: where its apps are, a plain HTTP client, its logs."""

    def __init__(self, mesh: dict, state: Path, out: Lines) -> None:
        self.apps = {i["name"]: f"http://{i['app']['address']}"
                     for s in mesh["spec"]["services"] for i in s.get("instances", [])}
        self.ingestion = self.apps["ingestion-0"]
        self.state = state
        self.out = out
        self.http = requests.Session()
        self.http.trust_env = False  # never through an HTTP_PROXY of the test's environment

    def create(self, owner: str = "acct-0001", headers: dict | None = None, **extra) -> str:
        body = {"ownerId": owner, "pickupLocation": POINT_A, "dropoffLocation": POINT_B,
                "packageInfo": {"size": "small", "weight": 2.5}, **extra}
        r = self.http.post(f"{self.ingestion}/api/deliveries", json=body, headers=headers, timeout=5)
        assert r.status_code == 202, r.text
        assert r.headers["Location"] == f"/api/deliveries/{r.json()['deliveryId']}"
        return r.json()["deliveryId"]

    def status(self, delivery_id: str) -> requests.Response:
        r = self.http.get(f"{self.ingestion}/api/deliveries/{delivery_id}", timeout=5)
        assert r.status_code == 200, r.text
        return r

    def settled(self, delivery_id: str, timeout: float = 15.0) -> dict:
        """Wait until scheduling is over; return the status then."""
        return wait_for(lambda: (b := self.status(delivery_id).json())["status"] not in PENDING and b,
                        timeout, interval=0.05, what=f"{delivery_id} to be scheduled")

    def get(self, instance: str, path: str) -> dict:
        r = self.http.get(self.apps[instance] + path, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def log(self, instance: str) -> str:
        path = self.state / "logs" / f"{instance}_app.log"
        return path.read_text() if path.exists() else ""

    def _table_row(self, instance: str) -> str:
        return next(line for line in self.out.lines if re.match(rf"\S+\s+{instance}\s", line))

    def outbound(self, instance: str) -> str:
        """The `host:port` of the instance's sidecar's outbound listener (from `up`'s table)."""
        return self._table_row(instance).split()[3]

    def control(self) -> str:
        return re.search(r"control plane (http://\S+)/config;", "\n".join(self.out.lines)).group(1)

    def sidecar_metric(self, instance: str, name: str, **labels: str) -> float:
        admin = re.findall(r"http://127\.0\.0\.1:\d+/", self._table_row(instance))[-1]
        text = self.http.get(admin + "metrics", timeout=5).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())


def _mesh_on_free_ports(tmp: Path) -> dict:
    mesh = yaml.safe_load((DEMO / "mesh.yaml").read_text())
    instances = [i for s in mesh["spec"]["services"] for i in s.get("instances", [])]
    ports = iter(free_ports(2 * len(instances) + 1))
    for instance in instances:
        instance["app"]["address"] = f"127.0.0.1:{next(ports)}"
        if isinstance(instance.get("sidecar"), dict):  # ingestion's fixed edge port
            instance["sidecar"] = {"inbound": next(ports)}
    mesh["spec"]["controlPlane"] = {"listen": f"127.0.0.1:{next(ports)}"}
    mesh["spec"]["policies"] = [str(DEMO / p) for p in mesh["spec"]["policies"]]
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(mesh, sort_keys=False))
    return mesh


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    mesh = _mesh_on_free_ports(tmp)
    env = dict(os.environ, DEMO_STORE_DIR=str(tmp / "store"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "up", str(tmp / "mesh.yaml"), "--state-dir", str(tmp / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    out = Lines(proc.stdout)
    try:
        wait_for(lambda: any("mesh ready" in line for line in out.lines) or proc.poll() is not None,
                 timeout=40, interval=0.05, what="the demo mesh to be ready")
        assert proc.poll() is None, out.text()
        yield Demo(mesh, tmp / "state", out)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_a_delivery_goes_through_every_service_and_is_flown(demo: Demo) -> None:
    request_id = "req-demo-flow-1"
    delivery_id = demo.create(thirdPartyPickup=True, headers={
        "x-request-id": request_id, "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    assert demo.settled(delivery_id)["status"] in ("scheduled", "in-transit", "delivered")
    workflow = demo.get("scheduler-0", f"/api/deliveryrequests/{delivery_id}")
    assert workflow["status"] == "scheduled"
    assert workflow["steps"] == {"account": "ok", "package": "ok", "drone": "ok", "preflight": "ok",
                                 "thirdparty": "ok", "delivery": "ok", "dispatch": "ok"}
    assert re.search(rf"delivery {delivery_id}: account=ok package=ok drone=ok preflight=ok thirdparty=ok "
                     r"delivery=ok dispatch=ok -> scheduled", demo.log("scheduler-0"))
    # The preflight's gRPC answer: the assigned drone, from one of the telemetry instances.
    assert workflow["droneTelemetry"]["servedBy"].startswith("drone-telemetry-")
    assert workflow["droneTelemetry"]["battery"] == 100.0
    # The drone's location events reach `delivery`; the last one lands it.
    final = wait_for(lambda: (b := demo.status(delivery_id).json())["status"] == "delivered" and b,
                     timeout=15, interval=0.1, what="the drone to arrive")
    assert final["locationEvents"] == 4
    assert final["location"]["lat"] == POINT_B["lat"] and final["location"]["lon"] == POINT_B["lon"]
    assert final["droneId"] == workflow["droneId"] and final["packageId"] == workflow["packageId"]
    # One request id and one trace across every app the request reached, including the
    # drone's background location events.
    def seen_everywhere() -> bool:
        logs = {name: demo.log(name) for name in demo.apps}
        reached = [name for name, text in logs.items()
                   if f"rid={request_id} trace={TRACE_ID}" in text]
        groups = ["ingestion-0", "scheduler-0", "account-0", "drone-0", "thirdparty-0"]
        return (all(g in reached for g in groups)
                and any(n.startswith("package-") for n in reached)
                and any(n.startswith("delivery-") for n in reached)
                and any(n.startswith("drone-telemetry-") for n in reached)  # over gRPC
                and sum(logs[n].count("/location 200") for n in logs if n.startswith("delivery-")) >= 4)
    wait_for(seen_everywhere, timeout=5, what="the request id and trace id in every app's log")


def test_both_delivery_versions_serve_the_split(demo: Demo) -> None:
    delivery_id = demo.create()
    demo.settled(delivery_id)
    seen: dict[str, int] = {}

    def both() -> bool:
        r = demo.status(delivery_id)
        version = r.headers["x-delivery-version"]
        assert r.json()["version"] == version
        seen[version] = seen.get(version, 0) + 1
        return {"v1", "v2"} <= seen.keys()

    wait_for(both, timeout=15, interval=0.01, what="answers from delivery v1 and v2")
    assert set(seen) == {"v1", "v2"}
    assert seen["v1"] + seen["v2"] >= 2


def test_the_flaky_package_instance_is_absorbed_by_retries(demo: Demo) -> None:
    ids = [demo.create(owner=f"acct-{n:04d}") for n in range(1001, 1031)]
    outcomes = [demo.settled(i) for i in ids]
    assert [o.get("reason") for o in outcomes if o["status"] == "failed"] == []
    flaky = demo.get("package-1", "/stats")
    assert flaky["failureRate"] == 0.3
    assert flaky["injectedFailures"] > 0  # it did fail, and nobody saw it
    assert demo.get("package-0", "/stats")["injectedFailures"] == 0
    assert demo.sidecar_metric("scheduler-0", "meshproxy_retries_total", service="package.default") > 0
    for delivery_id in ids:
        steps = demo.get("scheduler-0", f"/api/deliveryrequests/{delivery_id}")["steps"]
        assert steps["package"] == "ok"


def _telemetry_channel(address: str, authority: str | None = None) -> grpc.Channel:
    options = [("grpc.enable_http_proxy", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(address, options=options)


def test_the_grpc_hop_is_balanced_retried_and_counted(demo: Demo) -> None:
    ids = [demo.create(owner=f"acct-{n:04d}") for n in range(2001, 2013)]
    outcomes = [demo.settled(i) for i in ids]
    assert [o.get("reason") for o in outcomes if o["status"] == "failed"] == []
    workflows = [demo.get("scheduler-0", f"/api/deliveryrequests/{i}") for i in ids]
    assert all(w["steps"]["preflight"] == "ok" for w in workflows)
    drone_id = workflows[-1]["droneId"]
    # The same call as the scheduler's, made at its sidecar's outbound port: each call is
    # balanced on its own over the three instances, and drone-telemetry-2's UNAVAILABLE
    # answers are retried on another, so the caller sees none.
    served: Counter[str] = Counter()
    with _telemetry_channel(demo.outbound("scheduler-0"), authority="drone-telemetry") as ch:
        position = ch.unary_unary(POSITION, request_serializer=encode, response_deserializer=decode)
        for _ in range(90):
            served[position({"droneId": drone_id}, timeout=5)["servedBy"]] += 1
    assert set(served) == {"drone-telemetry-0", "drone-telemetry-1", "drone-telemetry-2"}, served
    assert "gRPC /drone.v1.Telemetry/Position UNAVAILABLE" in demo.log("drone-telemetry-2")
    # Timed: the scheduler allows 2 s, the Service's policy 1 s; the app sees what is left of
    # the smaller, as `grpc-timeout` from the sidecar.
    deadlines = [float(d) for d in re.findall(r"Position OK .* deadline=([\d.]+)s", demo.log("drone-telemetry-0"))]
    assert deadlines and all(0 < d <= 1.0 for d in deadlines), deadlines
    assert demo.sidecar_metric("scheduler-0", "meshproxy_retries_total", service="drone-telemetry.default",
                               reason="unavailable") > 0
    assert demo.sidecar_metric("scheduler-0", "meshproxy_requests_total", direction="outbound",
                               service="drone-telemetry.default") >= 90 + len(ids)
    # App to app, without a sidecar: a telemetry instance answers directly too.
    direct = demo.apps["drone-telemetry-0"].removeprefix("http://")
    with _telemetry_channel(direct) as ch:
        position = ch.unary_unary(POSITION, request_serializer=encode, response_deserializer=decode)
        assert position({"droneId": drone_id}, timeout=5)["servedBy"] == "drone-telemetry-0"
    # `meshproxy stat` shows the gRPC Service with its three instances.
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "stat", "--control", demo.control(),
                           "--window", "0", "--direction", "inbound", "-o", "json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["service"]: row for row in json.loads(proc.stdout)}
    assert rows["drone-telemetry.default"]["instances"] == 3
    assert rows["drone-telemetry.default"]["requests"] >= 90


def test_a_suspended_account_is_refused_and_compensated(demo: Demo) -> None:
    delivery_id = demo.create(owner="suspended-42")
    outcome = demo.settled(delivery_id)
    assert outcome["status"] == "failed"
    assert "suspended" in outcome["reason"]
    found = demo.get("scheduler-0", f"/compensations?deliveryId={delivery_id}")
    assert [(c["action"], c["result"]) for c in found["items"]] == [("cancel-package", "done")]
    assert found["byAction"]["cancel-package"] >= 1
    package = demo.get("package-0", f"/api/packages/pkg-{delivery_id}")
    assert package["status"] == "cancelled"
    workflow = demo.get("scheduler-0", f"/api/deliveryrequests/{delivery_id}")
    assert workflow["steps"]["account"].startswith("failed: 403")
    assert workflow["steps"]["drone"] == "pending"


def test_update_and_cancel(demo: Demo) -> None:
    delivery_id = demo.create()
    demo.settled(delivery_id)
    r = demo.http.put(f"{demo.ingestion}/api/deliveries/{delivery_id}",
                      json={"notes": "ring twice"}, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["notes"] == "ring twice"
    r = demo.http.put(f"{demo.ingestion}/api/deliveries/{delivery_id}", json={"status": "delivered"}, timeout=5)
    assert r.status_code == 400
    r = demo.http.delete(f"{demo.ingestion}/api/deliveries/{delivery_id}", timeout=5)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    final = wait_for(lambda: (b := demo.status(delivery_id).json())["status"] == "cancelled" and b,
                     timeout=10, interval=0.05, what="the cancellation")
    assert final["notes"] == "ring twice"
    # An update of a cancelled delivery is a conflict that says why (it was once a 500).
    r = demo.http.put(f"{demo.ingestion}/api/deliveries/{delivery_id}", json={"notes": "x"}, timeout=5)
    assert r.status_code == 409 and r.json() == {"error": "the delivery is cancelled",
                                                 "status": "cancelled"}, r.text
    assert demo.get("package-0", f"/api/packages/pkg-{delivery_id}")["status"] == "cancelled"
    assert demo.http.get(f"{demo.ingestion}/api/deliveries/d-nosuchthing", timeout=5).status_code == 404
    assert demo.http.delete(f"{demo.ingestion}/api/deliveries/d-nosuchthing", timeout=5).status_code == 404


def test_bad_requests_are_refused_at_the_edge(demo: Demo) -> None:
    url = f"{demo.ingestion}/api/deliveries"
    r = demo.http.post(url, data=b"not json", headers={"content-type": "application/json"}, timeout=5)
    assert r.status_code == 400
    r = demo.http.post(url, json={"ownerId": "acct-1", "pickupLocation": "here", "dropoffLocation": POINT_B},
                       timeout=5)
    assert r.status_code == 400 and "pickupLocation" in r.json()["error"]
    assert demo.http.get(f"{demo.ingestion}/healthz", timeout=5).json()["role"] == "ingestion"


def _load_args(*argv: str) -> argparse.Namespace:
    from meshproxy.demo.load import add_parser

    parser = argparse.ArgumentParser(prog="meshproxy")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", "load", *argv])


def test_load_shows_progress_and_a_mostly_successful_summary(demo: Demo, capsys) -> None:
    from meshproxy.demo.load import run

    args = _load_args("--url", demo.ingestion, "--duration", "3", "--rate", "20", "--seed", "3")
    assert args.command == "demo" and args.demo_command == "load"
    assert run(args) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if re.match(r"\s*\d+\.\ds\s+sent \d+\s+ok \d+\s+failed \d+\s+rate", line)]
    assert len(progress) >= 2, out
    m = re.search(r"meshproxy demo load: (\d+) requests in [\d.]+s .* to " + re.escape(demo.ingestion), out)
    assert m, out
    sent = int(m.group(1))
    assert 30 <= sent <= 70, out
    ok, failed = map(int, re.search(r"^  ok (\d+)  failed (\d+)  \(", out, re.M).groups())
    assert ok + failed == sent and failed <= sent * 0.05, out
    assert re.search(r"operations: create \d+ \(\d+ ok\)", out), out
    assert "latency: p50" in out and "deliveries: " in out


def test_load_says_when_ingestion_is_not_there(capsys) -> None:
    from meshproxy.demo.load import run

    port = free_ports(1)[0]
    assert run(_load_args("--url", f"http://127.0.0.1:{port}", "--duration", "1")) == 1
    err = capsys.readouterr().err
    assert f"cannot reach ingestion at http://127.0.0.1:{port}" in err
