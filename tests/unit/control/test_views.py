"""What the control plane sends each proxy: versions, generations, views, registrations."""

from __future__ import annotations

import json
import textwrap

import pytest

from meshproxy.config import ConfigError, load, load_objects
from meshproxy.control.views import build, is_older, merge_discovered

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: test}
spec:
  services:
    - name: account
      instances:
        - {name: account-0, app: {address: 127.0.0.1:9041, command: [python3, app.py]}}
    - name: scheduler
      instances:
        - {name: scheduler-0, app: {address: 127.0.0.1:9001}}
    - name: weather
      instances:
        - {name: weather-0, sidecar: false, app: {address: 127.0.0.1:9051}}
  policies: [policies.yaml]
"""
POLICIES = """\
apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: account-callers}
spec:
  targetRef: {kind: Service, name: account}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/scheduler]}}]
---
apiVersion: meshproxy.io/v1alpha1
kind: PeerAuthentication
metadata: {name: scheduler-permissive}
spec:
  targetRef: {kind: Service, name: scheduler}
  mtls: {mode: PERMISSIVE}
---
apiVersion: meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {name: account-retries}
spec:
  targetRef: {kind: Service, name: account}
  retry: {attempts: 4}
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "policies.yaml").write_text(POLICIES)
    return load([str(tmp_path / "mesh.yaml")])


def _kinds(view: bytes) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"]) for d in json.loads(view)]


def test_a_proxy_gets_every_outbound_document_and_only_its_own_authorization(files):
    snap = build(files)
    account = _kinds(snap.view("account.default"))
    scheduler = _kinds(snap.view("scheduler.default"))
    assert ("AuthorizationPolicy", "account-callers") in account
    assert ("AuthorizationPolicy", "account-callers") not in scheduler
    for view in (account, scheduler):
        assert ("Mesh", "test") in view and ("TrafficPolicy", "account-retries") in view
        # Callers need every Service's mTLS mode (plaintext where it is disabled).
        assert ("PeerAuthentication", "scheduler-permissive") in view


def test_a_view_loads_into_the_same_policies_the_control_plane_holds(files):
    snap = build(files)
    proxy = load_objects(json.loads(snap.view("account.default")), version=snap.version)
    assert proxy.version == snap.version
    assert proxy.policy_for("account.default").retry.attempts == 4
    assert [p.metadata.name for p in proxy.authorization_policies_for("account.default")] == ["account-callers"]
    assert set(proxy.services) == {"account.default", "scheduler.default", "weather.default"}


def test_commands_and_policy_paths_stay_with_the_control_plane(files):
    mesh = json.loads(build(files).view("x.default"))[0]
    assert "policies" not in mesh["spec"]
    assert all("command" not in i["app"] for s in mesh["spec"]["services"] for i in s["instances"])


def test_the_version_is_the_content_not_the_files(tmp_path, files):
    other = tmp_path / "other"
    other.mkdir()
    (other / "mesh.yaml").write_text("# a comment\n" + MESH.replace("{name: test}", "{name: test}  # same"))
    (other / "policies.yaml").write_text(POLICIES)
    assert build(load([str(other / "mesh.yaml")])).version == build(files).version
    (other / "policies.yaml").write_text(POLICIES.replace("attempts: 4", "attempts: 5"))
    assert build(load([str(other / "mesh.yaml")])).version != build(files).version


def test_registered_sidecar_ports_reach_the_views_and_change_the_version(files):
    plain = build(files)
    registered = build(files, registrations={("default", "account", "account-0"): 41006,
                                             ("default", "weather", "weather-0"): 41007})
    assert registered.version != plain.version
    proxy = load_objects(json.loads(registered.view("scheduler.default")))
    account = proxy.services["account.default"].instances[0]
    assert account.sidecar_ports.inbound == 41006
    weather = proxy.services["weather.default"].instances[0]
    assert not weather.meshed and weather.sidecar_ports.inbound is None  # never for sidecar: false


def test_files_with_errors_are_refused_with_their_position(tmp_path):
    (tmp_path / "mesh.yaml").write_text(MESH.replace("policies: [policies.yaml]", "policies: []"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        apiVersion: meshproxy.io/v1alpha1
        kind: TrafficPolicy
        metadata: {name: x}
        spec:
          retry: {attempts: many}
        """))
    with pytest.raises(ConfigError) as exc:
        build(load([str(tmp_path)]))
    assert f"{bad}:5:" in str(exc.value)


def test_discovered_services_join_the_files_mesh(files):
    discovered = [{"apiVersion": "meshproxy.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "kubernetes"},
                   "spec": {"services": [{"name": "drone", "namespace": "fleet",
                                          "instances": [{"name": "drone-0", "app": {"address": "10.0.0.7:8080"}}]}]}}]
    merged = merge_discovered(files.documents, discovered)
    assert [d["kind"] for d in merged].count("Mesh") == 1
    snap = build(files, discovered, generation=(5, 9))
    assert "drone.fleet" in snap.snapshot.services and "account.default" in snap.snapshot.services
    assert snap.generation == (5, 9)


@pytest.mark.parametrize("candidate, held, older", [
    ((1,), (2,), True),
    ((2,), (2,), False),
    ((3,), (2,), False),
    ((1, 5), (2, 5), True),
    ((1, 6), (2, 5), False),  # newer in one source: not older
    ((1,), (), False),  # nothing held yet
    ((1, 1), (2,), False),  # another set of sources: the version decides
])
def test_older_generations(candidate, held, older):
    assert is_older(candidate, held) is older
