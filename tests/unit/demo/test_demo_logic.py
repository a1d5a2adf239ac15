"""The demo apps' decisions without sockets: the scheduler's retries and compensations, the
shared store, the injected failures, request checks, the drone telemetry that the gRPC Service
serves, and what `meshproxy demo load` reads."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.demo.account import is_suspended
from meshproxy.demo.common import Reply, trace_id
from meshproxy.demo.ingestion import _create_error
from meshproxy.demo.load import default_url
from meshproxy.demo.package import Faults
from meshproxy.demo.scheduler import Scheduler, Workflow
from meshproxy.demo.store import Store

REPO = Path(__file__).resolve().parents[3]
POINT = {"lat": 1.0, "lon": 2.0}


class ScriptedClient:
    """Answers calls from a script: (method, service) -> list of Replies, the last one repeated.
    gRPC calls are scripted and recorded with the method "RPC" and their method path."""

    def __init__(self, script: dict[tuple[str, str], list[Reply]]) -> None:
        self.script = script
        self.calls: list[tuple[str, str, str, dict]] = []
        self.rpc_messages: list[tuple[dict, float | None]] = []

    async def call(self, method, service, path, *, headers, json_body=None, extra_headers=None) -> Reply:
        self.calls.append((method, service, path, dict(headers)))
        answers = self.script.get((method, service), [Reply(200, {})])
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async def rpc(self, service, method, message, *, headers, timeout=None) -> Reply:
        self.rpc_messages.append((message, timeout))
        return await self.call("RPC", service, method, headers=headers)


TELEMETRY_OK = Reply(200, {"droneId": "drone-007", "state": "assigned", "deliveryId": "d-1", "lat": 47.6,
                           "lon": -122.34, "battery": 100.0, "servedBy": "drone-telemetry-1"}, grpc_code="OK")
UNAVAILABLE = Reply(503, {"error": "telemetry unavailable"}, error="UNAVAILABLE: telemetry unavailable",
                    grpc_code="UNAVAILABLE")


def _ok_script(changes: dict | None = None) -> dict:
    script = {
        ("GET", "account"): [Reply(200, {"status": "active"})],
        ("PUT", "package"): [Reply(201, {})],
        ("POST", "drone"): [Reply(200, {"droneId": "drone-007"})],
        ("RPC", "drone-telemetry"): [TELEMETRY_OK],
        ("POST", "thirdparty"): [Reply(201, {"pickupId": "tp-1"})],
        ("PUT", "delivery"): [Reply(201, {})],
    }
    script.update(changes or {})
    return script


def _workflow(**request) -> Workflow:
    body = {"deliveryId": "d-1", "ownerId": "acct-1", "pickupLocation": POINT, "dropoffLocation": POINT,
            **request}
    return Workflow("d-1", body, {"x-request-id": "rid-1", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})


async def _schedule(script: dict, retries: int = 2, **request) -> tuple[Scheduler, Workflow, ScriptedClient]:
    client = ScriptedClient(script)
    scheduler = Scheduler(client, retries=retries, backoff=0.0, rng=random.Random(1))
    wf = _workflow(**request)
    await scheduler.schedule(wf)
    return scheduler, wf, client


async def test_every_step_runs_and_passes_on_the_request_headers() -> None:
    scheduler, wf, client = await _schedule(_ok_script(), thirdPartyPickup=True)
    assert wf.status == "scheduled"
    assert wf.steps == dict.fromkeys(
        ("account", "package", "drone", "preflight", "thirdparty", "delivery", "dispatch"), "ok")
    assert {c[1] for c in client.calls} == {"account", "package", "drone", "drone-telemetry", "thirdparty",
                                            "delivery"}
    assert all(c[3]["x-request-id"] == "rid-1" and c[3]["traceparent"].startswith("00-aaa") for c in client.calls)
    assert ("POST", "drone", "/api/drones/drone-007/dispatch") in [c[:3] for c in client.calls]
    assert not scheduler.compensations and scheduler.outcomes["scheduled"] == 1
    # The preflight: one gRPC call, after the drone is assigned and before it is dispatched.
    methods = [c[2] for c in client.calls]
    assert methods.index("/drone.v1.Telemetry/Position") == methods.index("/api/drones/assign") + 1
    assert client.rpc_messages == [({"droneId": "drone-007"}, 2.0)]
    assert wf.view()["droneTelemetry"] == {"lat": 47.6, "lon": -122.34, "battery": 100.0,
                                           "servedBy": "drone-telemetry-1"}


async def test_without_a_third_party_pickup_that_step_is_skipped() -> None:
    _, wf, client = await _schedule(_ok_script())
    assert wf.steps["thirdparty"] == "skipped" and wf.status == "scheduled"
    assert "thirdparty" not in {c[1] for c in client.calls}


async def test_a_suspended_account_is_not_retried_and_the_package_is_cancelled() -> None:
    script = _ok_script({("GET", "account"): [Reply(403, {"status": "suspended", "error": "suspended"})]})
    scheduler, wf, client = await _schedule(script)
    assert wf.status == "failed" and wf.non_transient
    assert wf.reason == "account: 403 (suspended)"
    assert [c[:3] for c in client.calls].count(("GET", "account", "/api/accounts/acct-1")) == 1
    assert [(c["action"], c["result"]) for c in scheduler.compensations] == [("cancel-package", "done")]
    assert ("DELETE", "package", "/api/packages/pkg-d-1") in [c[:3] for c in client.calls]
    assert wf.steps["drone"] == "pending"


async def test_transient_failures_are_retried_then_compensated_when_they_last() -> None:
    busy = Reply(503, {"error": "every drone is busy"})
    scheduler, wf, client = await _schedule(_ok_script({("POST", "drone"): [busy]}), retries=2)
    assert [c[:2] for c in client.calls].count(("POST", "drone")) == 3  # 1 try + 2 retries
    assert wf.status == "failed" and not wf.non_transient
    assert [c["action"] for c in scheduler.compensations] == ["cancel-package"]
    assert scheduler.compensation_counts == {"cancel-package": 1}


async def test_a_transient_failure_that_clears_does_not_fail_the_delivery() -> None:
    script = _ok_script({("PUT", "package"): [Reply(0, error="ServerDisconnectedError"), Reply(201, {})]})
    scheduler, wf, _ = await _schedule(script)
    assert wf.status == "scheduled" and not scheduler.compensations


async def test_a_failure_late_in_the_workflow_undoes_everything_before_it() -> None:
    script = _ok_script({("POST", "drone"): [Reply(200, {"droneId": "drone-007"}), Reply(409, {"error": "no"})]})
    scheduler, wf, client = await _schedule(script, thirdPartyPickup=True)
    assert wf.steps["dispatch"].startswith("failed: 409")
    assert [c["action"] for c in scheduler.compensations] == [
        "cancel-pickup", "release-drone", "cancel-package", "mark-delivery-failed"]
    mark = [c for c in client.calls if c[:2] == ("PUT", "delivery")][-1]
    assert mark[2] == "/api/deliveries/d-1"


async def test_a_cancel_while_scheduling_is_carried_out_afterwards() -> None:
    client = ScriptedClient(_ok_script())
    scheduler = Scheduler(client, retries=0, backoff=0.0, rng=random.Random(1))
    wf = _workflow()
    wf.cancel_requested = True
    await scheduler.schedule(wf)
    assert wf.status == "cancelled"
    assert not scheduler.compensations  # a cancellation is not a compensation
    assert ("POST", "drone", "/api/drones/drone-007/release") in [c[:3] for c in client.calls]


async def test_an_unavailable_preflight_is_tried_again() -> None:
    script = _ok_script({("RPC", "drone-telemetry"): [UNAVAILABLE, TELEMETRY_OK]})
    scheduler, wf, client = await _schedule(script)
    assert wf.status == "scheduled" and wf.steps["preflight"] == "ok"
    assert [c[:2] for c in client.calls].count(("RPC", "drone-telemetry")) == 2


async def test_a_preflight_that_lasts_unavailable_releases_the_drone() -> None:
    scheduler, wf, _ = await _schedule(_ok_script({("RPC", "drone-telemetry"): [UNAVAILABLE]}), retries=1)
    assert wf.status == "failed" and not wf.non_transient
    assert wf.steps["preflight"] == "failed: 503 UNAVAILABLE (telemetry unavailable)"
    assert [c["action"] for c in scheduler.compensations] == ["release-drone", "cancel-package"]


@pytest.mark.parametrize("report, problem", [
    ({"deliveryId": "d-other", "battery": 90.0}, "drone drone-007 reports delivery d-other"),
    ({"deliveryId": "d-1", "battery": 12.0}, "drone drone-007 reports battery 12.0"),
])
async def test_a_drone_whose_telemetry_disagrees_is_not_dispatched(report, problem) -> None:
    script = _ok_script({("RPC", "drone-telemetry"): [Reply(200, report, grpc_code="OK")]})
    scheduler, wf, client = await _schedule(script)
    assert wf.status == "failed" and wf.non_transient and wf.steps["preflight"] == f"failed: {problem}"
    assert [c["action"] for c in scheduler.compensations] == ["release-drone", "cancel-package"]
    assert "/api/drones/drone-007/dispatch" not in [c[2] for c in client.calls]


def test_reply_classification() -> None:
    assert Reply(0, error="x").transient and Reply(503).transient and Reply(429).transient
    assert not Reply(403).transient and not Reply(200).transient and Reply(204).ok
    assert Reply(503, headers={"x-meshproxy-error": "overloaded"}).describe() == "503 (proxy: overloaded)"
    assert Reply(0, error="ClientConnectorError").describe() == "no answer (ClientConnectorError)"
    # A gRPC status is judged by its HTTP equivalent and named in descriptions.
    assert UNAVAILABLE.transient and not Reply(404, grpc_code="NOT_FOUND").transient
    assert Reply(503, headers={"x-meshproxy-error": "no-endpoints"}, grpc_code="UNAVAILABLE").describe() == \
        "503 UNAVAILABLE (proxy: no-endpoints)"


def test_trace_ids_from_w3c_and_b3() -> None:
    assert trace_id({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) == "1" * 32
    assert trace_id({"b3": "abc-def-1"}) == "abc"
    assert trace_id({"x-b3-traceid": "f00"}) == "f00"
    assert trace_id({}) == ""


def test_the_store_is_shared_by_every_instance(tmp_path: Path) -> None:
    first, second = Store(tmp_path / "s.sqlite"), Store(tmp_path / "s.sqlite")
    old, new = first.update("k", lambda old: {"n": 1} if old is None else None)
    assert (old, new) == (None, {"n": 1})
    old, new = second.update("k", lambda old: {"n": old["n"] + 1})
    assert old == {"n": 1} and first.get("k") == {"n": 2}
    assert second.update("missing", lambda old: None) == (None, None) and first.get("missing") is None
    with pytest.raises(ZeroDivisionError):
        first.update("k", lambda old: 1 / 0)
    assert second.get("k") == {"n": 2} and first.count() == 1
    first.close(), second.close()


def test_injected_failures_follow_the_seed() -> None:
    draws = random.Random(7)
    expected = [draws.random() < 0.3 for _ in range(50)]
    faults = Faults(0.3, random.Random(7))
    assert [faults.fail_now() for _ in range(50)] == expected
    assert faults.injected == sum(expected) > 0 and faults.requests == 50
    never = Faults(0.0, random.Random(7))
    assert not any(never.fail_now() for _ in range(100))


def test_suspended_accounts() -> None:
    assert is_suspended("suspended-3", frozenset()) and is_suspended("acct-0013", frozenset({"acct-0013"}))
    assert not is_suspended("acct-0001", frozenset({"acct-0013"}))


def test_ingestion_checks_new_deliveries() -> None:
    good = {"ownerId": "acct-1", "pickupLocation": POINT, "dropoffLocation": POINT}
    assert _create_error(good) is None
    assert "ownerId" in _create_error({**good, "ownerId": "../etc"})
    assert "dropoffLocation" in _create_error({**good, "dropoffLocation": {"lat": True, "lon": 1}})
    assert "packageInfo" in _create_error({**good, "packageInfo": [1]})


def test_load_defaults_to_the_demo_ingestion_address(tmp_path: Path) -> None:
    assert default_url() == "http://127.0.0.1:18000"  # the edge: ingestion's sidecar
    other = tmp_path / "mesh.yaml"
    other.write_text("apiVersion: meshproxy.io/v1alpha1\nkind: Mesh\nmetadata: {name: x}\nspec:\n"
                     "  services:\n    - name: ingestion\n      instances:\n"
                     "        - {name: i-0, app: {address: '127.0.0.1:4321'}}\n")
    assert default_url(other) == "http://127.0.0.1:4321"


def test_the_demo_configuration_checks_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "check", "--strict", str(REPO / "config" / "demo")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: 4 files") and "0 warnings" in proc.stdout
