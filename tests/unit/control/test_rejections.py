"""One invalid object from the cluster is skipped alone: screened out (or held at its last valid
version), reported once (log, `/config`, `meshproxy_config_errors_total`), while every other
object goes on being applied. Files keep the whole-change rule. Pure: no sockets, no API server
(the objects are built as the API server's JSON has them, by tests/support/kubefactory.py)."""

from __future__ import annotations

import logging

import pytest

import support.kubefactory as k
from meshproxy.config import ConfigError, load
from meshproxy.control.clusterstate import ClusterState
from meshproxy.control.kubeobjects import documents_from_cluster
from meshproxy.control.plane import ControlPlane
from meshproxy.control.screening import Rejection, Screening, build_discovered


def cluster(*objects: dict) -> ClusterState:
    state = ClusterState()
    for obj in objects:
        state.upsert(obj)
    return state


def base() -> list[dict]:
    return [k.service("web"), k.service("api", cluster_ip="10.96.0.20"), k.pod("web-0", service_account="web"),
            k.endpoint_slice("web", [k.endpoint("10.244.0.1", "web-0")]),
            k.endpoint_slice("api", [k.endpoint("10.244.0.2")])]


def route(name: str, header: str = "v1", path_type: str = "PathPrefix") -> dict:
    obj = k.http_route(name, "web", [("web", 80)])
    match = obj["spec"]["rules"][0]
    match["matches"][0]["path"]["type"] = path_type
    match["filters"] = [{"type": "ResponseHeaderModifier",
                         "responseHeaderModifier": {"set": [{"name": "x-route", "value": header}]}}]
    return obj


def deny(name: str, action: str = "DENY") -> dict:
    return k.policy("AuthorizationPolicy", name, {"targetRef": {"kind": "Service", "name": "web"}, "action": action,
                                                  "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]})


def docs(*objects: dict) -> list[dict]:
    return documents_from_cluster(cluster(*base(), *objects))


def route_header(plane: ControlPlane, name: str) -> str | None:
    for r in plane.current.snapshot.routes_for("web.default"):
        if r.metadata.name == name:
            return r.rules[0].filters[0].response_header_modifier.set[0].value
    return None


def screen(discovered: list[dict], before: list[dict] | None = None, files=None):
    """build_discovered of `discovered` after `before` was in force; (documents, rejections)."""
    screening = Screening()
    if before is not None:
        build_discovered(files, before, screening)
    snapshot, rejected = build_discovered(files, discovered, screening)
    return list(snapshot.documents), rejected


def test_an_invalid_route_is_left_out_and_the_rest_is_kept():
    found, rejected = screen(docs(route("good"), route("typo", path_type="Prefix")))
    assert [(d["kind"], d["metadata"]["name"]) for d in found] == [("Mesh", "kubernetes"), ("HTTPRoute", "good")]
    [r] = rejected
    assert (r.kind, r.namespace, r.name, r.kept) == ("HTTPRoute", "default", "typo", False)
    assert str(r).startswith("HTTPRoute default/typo: spec.rules[0].matches[0].path.type: unknown value 'Prefix'")
    assert {s["name"] for s in found[0]["spec"]["services"]} == {"web", "api"}


def test_an_object_that_becomes_invalid_keeps_its_last_valid_version():
    before = docs(route("good", header="v1"), deny("no-deletes"))
    broken = docs(route("good", header="v2", path_type="Prefix"), deny("no-deletes", action="DENY-ALL"))
    found, rejected = screen(broken, before)
    assert {(r.kind, r.name, r.kept) for r in rejected} == {("HTTPRoute", "good", True),
                                                             ("AuthorizationPolicy", "no-deletes", True)}
    kept = {d["metadata"]["name"]: d for d in found[1:]}
    assert kept["good"]["spec"]["rules"][0]["filters"][0]["responseHeaderModifier"]["set"][0]["value"] == "v1"
    # A typo in a DENY policy must not open what it closed.
    assert kept["no-deletes"]["spec"]["action"] == "DENY"


def test_an_invalid_authorization_policy_with_no_valid_version_denies_everything_to_its_target():
    """A replica that has just started holds no last valid version: leaving a broken DENY out
    would open what it closed (and the replicas would disagree), so it stands in as DENY-all."""
    broken = deny("no-deletes")
    broken["spec"]["rules"][0]["to"][0]["operation"]["paths"] = ["/a*b"]  # a wildcard in the middle
    found, rejected = screen(docs(broken))
    [r] = rejected
    assert (r.kind, r.name, r.kept, r.fail_closed) == ("AuthorizationPolicy", "no-deletes", False, True)
    assert str(r).endswith("(in force as DENY of every request to its target until fixed)")
    assert r.to_json()["failClosed"] is True
    [policy] = [d for d in found if d["kind"] == "AuthorizationPolicy"]
    assert policy["spec"] == {"targetRef": {"kind": "Service", "name": "web"}, "action": "DENY", "rules": [{}]}


def test_an_invalid_allow_policy_also_stands_in_as_deny_all():
    # Left out, the only ALLOW policy of a Service would open it to every caller.
    broken = deny("only-scheduler", action="ALLOW")
    broken["spec"]["rules"][0]["to"][0]["operation"]["methods"] = "GET"  # not a list
    found, rejected = screen(docs(broken))
    [policy] = [d for d in found if d["kind"] == "AuthorizationPolicy"]
    assert rejected[0].fail_closed and policy["spec"]["action"] == "DENY"


def test_an_invalid_peer_authentication_with_no_valid_version_stands_in_as_strict():
    broken = k.policy("PeerAuthentication", "web-mtls", {"targetRef": {"kind": "Service", "name": "web"},
                                                         "mtls": {"mode": "STRICT", "portLevel": 1}})
    found, rejected = screen(docs(broken))
    assert [(r.name, r.fail_closed) for r in rejected] == [("web-mtls", True)]
    [policy] = [d for d in found if d["kind"] == "PeerAuthentication"]
    assert policy["spec"] == {"targetRef": {"kind": "Service", "name": "web"}, "mtls": {"mode": "STRICT"}}


def test_a_stand_in_with_an_unusable_target_covers_the_namespace():
    broken = deny("no-deletes")
    broken["spec"]["targetRef"] = {"kind": "Service"}  # no name
    found, _ = screen(docs(broken))
    [policy] = [d for d in found if d["kind"] == "AuthorizationPolicy"]
    assert policy["spec"] == {"action": "DENY", "rules": [{}]} and policy["metadata"]["namespace"] == "default"


def test_a_service_that_becomes_invalid_is_left_out_not_kept():
    """A Service's last valid version lists endpoints that are gone; their addresses may
    belong to other pods by now."""
    before = docs()
    broken = docs()
    broken[0]["spec"]["services"][0]["port"] = 70000
    found, rejected = screen(broken, before)
    assert [(r.kind, r.name, r.kept) for r in rejected] == [("Service", "api", False)]
    assert [s["name"] for s in found[0]["spec"]["services"]] == ["web"]


def test_a_service_that_cannot_be_mapped_is_left_out_alone():
    documents = docs()
    documents[0]["spec"]["services"][0]["port"] = 70000  # what a broken mapping could give
    found, rejected = screen(documents)
    [r] = rejected
    assert (r.kind, r.name) == ("Service", "api") and r.reason == "port: port 70000 is out of range 1..65535"
    assert [s["name"] for s in found[0]["spec"]["services"]] == ["web"]


def test_an_endpoint_slice_of_an_unexpected_shape_is_left_out_alone():
    bad = k.endpoint_slice("web", ["10.244.0.9"], name="web-broken")  # an endpoint that is not an object
    rejected: list[Rejection] = []
    found = documents_from_cluster(cluster(*base(), bad), rejected=rejected)
    [r] = rejected
    assert (r.kind, r.namespace, r.name) == ("EndpointSlice", "default", "web-broken")
    assert r.reason.startswith("cannot be mapped: AttributeError")
    web = next(s for s in found[0]["spec"]["services"] if s["name"] == "web")
    assert [i["name"] for i in web["instances"]] == ["web-0"]


def test_a_cluster_object_named_like_one_in_the_files_is_the_one_rejected(tmp_path):
    (tmp_path / "route.yaml").write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: good}\n"
        "spec:\n  parentRefs: [{kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n")
    files = load([str(tmp_path)])
    found, rejected = screen(docs(route("good"), route("other")), files=files)
    assert [(r.kind, r.name) for r in rejected] == [("HTTPRoute", "good")]
    assert "duplicate HTTPRoute default/good" in rejected[0].reason
    # The files' route, then the Mesh, then the cluster's other route.
    assert [(d["kind"], d["metadata"]["name"]) for d in found] == [
        ("HTTPRoute", "good"), ("Mesh", "kubernetes"), ("HTTPRoute", "other")]
    assert "filters" not in found[0]["spec"]["rules"][0]


def test_a_pod_named_like_an_instance_in_the_files_rejects_its_service(tmp_path):
    (tmp_path / "mesh.yaml").write_text(
        "apiVersion: meshproxy.io/v1alpha1\nkind: Mesh\nmetadata: {name: files}\nspec:\n  services:\n"
        "    - name: legacy\n      instances: [{name: web-0, app: {address: 127.0.0.1:9000}}]\n")
    found, rejected = screen(docs(), files=load([str(tmp_path)]))
    [r] = rejected
    assert (r.kind, r.name) == ("Service", "web") and "duplicate instance 'web-0'" in r.reason
    assert [s["name"] for s in found[0]["spec"]["services"]] == ["legacy", "api"]


def test_an_error_that_is_no_single_objects_refuses_the_whole_change():
    documents = documents_from_cluster(cluster(*base()), trust_domain="Not A Domain")
    with pytest.raises(ConfigError, match="trustDomain"):
        screen(documents)


def test_an_object_known_invalid_is_set_aside_before_the_first_build():
    screening = Screening()
    typo = route("typo", path_type="Prefix")
    build_discovered(None, docs(typo), screening)
    assert set(screening.invalid) == {("HTTPRoute", "default", "typo")}
    # The next change builds once: the typo is set aside by its content, with the same report.
    snapshot, rejected = build_discovered(None, docs(typo, route("new")), screening)
    assert [r.name for r in rejected] == ["typo"]
    assert [d["metadata"]["name"] for d in snapshot.documents[1:]] == ["new"]
    # Fixed, it is built and taken again.
    snapshot, rejected = build_discovered(None, docs(route("typo"), route("new")), screening)
    assert rejected == [] and screening.invalid == {}
    assert [d["metadata"]["name"] for d in snapshot.documents[1:]] == ["new", "typo"]


# The plane: reported once, counted once, everything else applied.

class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_plane_reports_each_rejection_once_and_applies_everything_else(caplog):
    caplog.set_level(logging.INFO, logger="meshproxy.control")
    plane = ControlPlane(Clock())
    assert plane.discovery_changed(docs(route("good", "v1")), 10)
    assert route_header(plane, "good") == "v1" and plane.errors_total == 0
    assert plane.config_json()["rejected"] == []

    broken = route("good", "v2", path_type="Prefix")
    assert plane.discovery_changed(docs(broken, route("new", "n1")), 11)
    assert route_header(plane, "good") == "v1"  # the last valid version
    assert route_header(plane, "new") == "n1"  # other changes go on being applied
    config = plane.config_json()
    assert config["rejected"] == [{"kind": "HTTPRoute", "namespace": "default", "name": "good",
                                   "reason": config["rejected"][0]["reason"], "keptLastValid": True,
                                   "failClosed": False}]
    assert "path.type: unknown value 'Prefix'" in config["rejected"][0]["reason"]
    assert config["lastError"]["source"] == "kubernetes"
    assert config["lastError"]["errors"][0].startswith("HTTPRoute default/good: ")
    assert plane.errors_total == 1

    # More changes (a new endpoint, say) with the object still broken: no new report, no new count.
    more = [*base(), broken, route("new", "n1"), k.endpoint_slice("api", [k.endpoint("10.244.0.3")])]
    assert plane.discovery_changed(documents_from_cluster(cluster(*more)), 12)
    assert plane.discovery_changed(documents_from_cluster(cluster(*more, route("third"))), 13)
    assert plane.errors_total == 1
    logged = [r.getMessage() for r in caplog.records if "HTTPRoute default/good:" in r.getMessage()]
    assert len(logged) == 1 and logged[0].endswith("(its last valid version stays in force)")

    # Fixed: the new version is in force and the rejection is gone.
    assert plane.discovery_changed(docs(route("good", "v3")), 14)
    assert route_header(plane, "good") == "v3" and plane.config_json()["rejected"] == []


async def test_an_object_never_valid_stays_out_and_deleting_it_clears_the_report():
    plane = ControlPlane(Clock())
    assert plane.discovery_changed(docs(route("typo", path_type="Prefix")), 10)
    assert route_header(plane, "typo") is None
    assert [r["keptLastValid"] for r in plane.config_json()["rejected"]] == [False]
    assert plane.discovery_changed(docs(), 11)
    assert plane.config_json()["rejected"] == []


async def test_objects_the_discovery_could_not_map_are_on_config_and_counted_once():
    plane = ControlPlane(Clock())
    unmapped = [Rejection("EndpointSlice", "default", "web-broken", "cannot be mapped: AttributeError: x")]
    plane.discovery_unmapped(unmapped)
    plane.discovery_unmapped(list(unmapped))
    plane.discovery_changed(docs(), 10)
    assert plane.errors_total == 1
    assert [r["name"] for r in plane.config_json()["rejected"]] == ["web-broken"]
    plane.discovery_unmapped([])
    assert plane.config_json()["rejected"] == []


async def test_an_invalid_file_change_is_still_refused_whole(tmp_path):
    plane = ControlPlane(Clock())
    plane.uses_discovery = True
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: meshproxy.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\n"
        "spec:\n  targetRef: {kind: Service, name: web}\n  retry: {attempts: 3}\n")
    plane.files_changed(load([str(tmp_path)]), 1)  # held back until the cluster is listed
    assert plane.discovery_changed(docs(), 10)
    assert plane.current.snapshot.policy_for("web.default").retry.attempts == 3
    good = plane.current.version
    (tmp_path / "policy.yaml").write_text((tmp_path / "policy.yaml").read_text().replace("3}", "many}"))
    assert not plane.files_changed(load([str(tmp_path)]), 2)
    assert plane.current.version == good and plane.errors_total == 1
    assert plane.config_json()["lastError"]["source"] == "files"
