"""Kubernetes API objects -> configuration documents (meshproxy.control.kubeobjects).

Every table ends by loading the documents with the project's own loader, so what discovery
produces is what the control plane accepts.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config import load_objects
from meshproxy.control.clusterstate import ClusterState
from meshproxy.control.kubeobjects import documents_from_cluster
from support import kubefactory as k


def state_of(*objects: dict) -> ClusterState:
    state = ClusterState()
    for obj in objects:
        state.upsert(obj)
    return state


def services(docs: list[dict]) -> dict[str, dict]:
    mesh = docs[0]
    assert mesh["kind"] == "Mesh" and mesh["metadata"] == {"name": "kubernetes"}
    return {f"{s['name']}.{s['namespace']}": s for s in mesh["spec"]["services"]}


def instances(docs: list[dict], key: str = "web.default") -> dict[str, dict]:
    return {i["name"]: i for i in services(docs)[key]["instances"]}


# Endpoints, pods and identity.


def test_ready_endpoints_are_instances_named_after_their_pods_with_identity_and_labels():
    docs = documents_from_cluster(state_of(
        k.service("web"),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5", "web-0"), k.endpoint("10.244.0.6", "web-1")]),
        k.pod("web-0", labels={"app": "web", "version": "v1"}, service_account="web-sa"),
        k.pod("web-1", labels={"app": "web", "version": "v2"}, service_account="web-sa", native_sidecar=False),
    ), trust_domain="example.org")
    assert docs[0]["spec"]["trustDomain"] == "example.org"
    assert services(docs)["web.default"] == {
        "name": "web", "namespace": "default", "port": 80, "addresses": ["10.96.0.10"],
        "instances": [
            {"name": "web-0", "labels": {"app": "web", "version": "v1", "meshproxy.io/service-account": "web-sa"},
             "app": {"address": "10.244.0.5:8080"}},
            {"name": "web-1", "labels": {"app": "web", "version": "v2", "meshproxy.io/service-account": "web-sa"},
             "app": {"address": "10.244.0.6:8080"}},
        ],
    }
    snap = load_objects(docs)
    assert snap.trust_domain == "example.org"
    service = snap.services["web.default"]
    assert [(i.name, i.app_address, i.meshed) for i in service.instances] == [
        ("web-0", "10.244.0.5:8080", True), ("web-1", "10.244.0.6:8080", True)]
    assert snap.resolve_authority("10.96.0.10") is service


def test_unmeshed_pods_and_endpoints_without_a_known_pod_are_plaintext():
    docs = documents_from_cluster(state_of(
        k.service("web"),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5", "web-0"), k.endpoint("10.244.0.6", "web-gone"),
                                 k.endpoint("192.168.1.9")]),
        k.pod("web-0", meshed=False, service_account="legacy"),
    ))
    got = instances(docs)
    assert got["web-0"]["sidecar"] is False
    assert got["web-0"]["labels"]["meshproxy.io/service-account"] == "legacy"
    assert got["web-gone"] == {"name": "web-gone", "app": {"address": "10.244.0.6:8080"}, "sidecar": False}
    assert got["192.168.1.9"] == {"name": "192.168.1.9", "app": {"address": "192.168.1.9:8080"}, "sidecar": False}
    assert {i.name: i.meshed for i in load_objects(docs).services["web.default"].instances} == {
        "web-0": False, "web-gone": False, "192.168.1.9": False}


@pytest.mark.parametrize(("ready", "serving", "terminating", "expected"), [
    (True, True, False, "instance"),
    (None, None, None, "instance"),  # absent conditions: ready counts as true
    (False, True, True, "terminating"),  # draining: still answers, so kept and marked
    (True, True, True, "terminating"),  # publishNotReadyAddresses keeps ready true while terminating
    (False, None, True, "skipped"),  # serving absent defers to ready
    (False, False, True, "skipped"),
    (False, False, False, "skipped"),
    (False, True, False, "skipped"),
    (None, None, True, "terminating"),
])
def test_endpoint_conditions_decide_whether_an_endpoint_is_an_instance(ready, serving, terminating, expected):
    ep = {"addresses": ["10.244.0.5"], "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-0"},
          "conditions": {key: value for key, value in
                         (("ready", ready), ("serving", serving), ("terminating", terminating)) if value is not None}}
    docs = documents_from_cluster(state_of(k.service("web"), k.endpoint_slice("web", [ep]), k.pod("web-0")))
    got = instances(docs)
    if expected == "skipped":
        assert got == {}
    else:
        labels = got["web-0"]["labels"]
        assert labels.get("meshproxy.io/terminating") == ("true" if expected == "terminating" else None)
        assert load_objects(docs).services["web.default"].instances[0].labels.get(
            "meshproxy.io/terminating") == ("true" if expected == "terminating" else None)


# Ports.

HTTP_FIRST = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web"}]


@pytest.mark.parametrize(("service_ports", "slice_ports", "port", "address"), [
    # the port named http wins over the first one; its named targetPort comes from the slice
    ([{"name": "grpc", "protocol": "TCP", "port": 9090, "targetPort": 9090},
      {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web"}],
     [{"name": "grpc", "protocol": "TCP", "port": 9090}, {"name": "http", "protocol": "TCP", "port": 8081}],
     80, "10.244.0.5:8081"),
    # no http: the first TCP port
    ([{"name": "grpc", "protocol": "TCP", "port": 9090, "targetPort": "grpc"},
      {"name": "admin", "protocol": "TCP", "port": 9901, "targetPort": 9901}],
     [{"name": "admin", "protocol": "TCP", "port": 9901}, {"name": "grpc", "protocol": "TCP", "port": 50051}],
     9090, "10.244.0.5:50051"),
    # UDP ports do not count
    ([{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53},
      {"name": "metrics", "protocol": "TCP", "port": 9153, "targetPort": 9153}],
     [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "metrics", "protocol": "TCP", "port": 9153}],
     9153, "10.244.0.5:9153"),
    # one unnamed port (the slice's port has no name either)
    ([{"protocol": "TCP", "port": 80, "targetPort": 3000}], [{"name": "", "protocol": "TCP", "port": 3000}],
     80, "10.244.0.5:3000"),
    # a slice without ports: a numeric targetPort, else the port itself
    ([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8088}], [], 80, "10.244.0.5:8088"),
    ([{"name": "http", "protocol": "TCP", "port": 8000}], [], 8000, "10.244.0.5:8000"),
    # a named targetPort the slice does not list: these endpoints do not serve it
    (HTTP_FIRST, [{"name": "metrics", "protocol": "TCP", "port": 9100}], 80, None),
    (HTTP_FIRST, [], 80, None),
])
def test_the_service_port_and_the_instance_port(service_ports, slice_ports, port, address):
    docs = documents_from_cluster(state_of(
        k.service("web", ports=service_ports),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5", "web-0")], ports=slice_ports),
        k.pod("web-0"),
    ))
    service = services(docs)["web.default"]
    assert service["port"] == port
    assert [i["app"]["address"] for i in service["instances"]] == ([address] if address else [])
    assert load_objects(docs).services["web.default"].port == port


@pytest.mark.parametrize("svc", [
    k.service("web", ports=[{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53}]),
    k.service("web", ports=[]),
    k.service("web", type="ExternalName"),
])
def test_services_the_mesh_cannot_send_to_are_left_out(svc):
    docs = documents_from_cluster(state_of(svc, k.endpoint_slice("web", [k.endpoint("10.244.0.5")])))
    assert services(docs) == {}
    load_objects(docs)


# Addresses and IP families.


def test_headless_service_has_no_addresses_but_has_instances():
    docs = documents_from_cluster(state_of(
        k.service("db", cluster_ip="None"),
        k.endpoint_slice("db", [k.endpoint("10.244.0.7", "db-0")]),
        k.pod("db-0"),
    ))
    db = services(docs)["db.default"]
    assert db["addresses"] == [] and [i["name"] for i in db["instances"]] == ["db-0"]
    assert load_objects(docs).services["db.default"].addresses == ()


def test_ipv6_endpoints_are_bracketed_and_named_after_the_exploded_address():
    docs = documents_from_cluster(state_of(
        k.service("web", cluster_ip="fd00:10:96::a", ip_families=["IPv6"]),
        k.endpoint_slice("web", [k.endpoint("fd00:10:244::5")], address_type="IPv6"),
    ))
    web = services(docs)["web.default"]
    assert web["addresses"] == ["fd00:10:96::a"]
    assert web["instances"] == [{"name": "fd00-0010-0244-0000-0000-0000-0000-0005",
                                 "app": {"address": "[fd00:10:244::5]:8080"}, "sidecar": False}]
    snap = load_objects(docs)
    assert snap.instance_at("fd00:10:244::5", 8080)[1].name == "fd00-0010-0244-0000-0000-0000-0000-0005"


@pytest.mark.parametrize(("families", "app"), [
    (["IPv4", "IPv6"], {"address": "10.244.0.5:8080", "otherAddresses": ["fd00:10:244::5"]}),
    (["IPv6", "IPv4"], {"address": "[fd00:10:244::5]:8080", "otherAddresses": ["10.244.0.5"]}),
])
def test_dual_stack_pod_is_one_instance_at_the_primary_family_and_its_other_address(families, app):
    docs = documents_from_cluster(state_of(
        k.service("web", cluster_ips=["10.96.0.10", "fd00:10:96::a"], ip_families=families),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5", "web-0"), k.endpoint("10.244.0.6", "web-1")],
                         name="web-v4"),
        k.endpoint_slice("web", [k.endpoint("fd00:10:244::5", "web-0"), k.endpoint("fd00:10:244::6", "web-1")],
                         name="web-v6", address_type="IPv6"),
        k.pod("web-0"), k.pod("web-1", ip="10.244.0.6"),
    ))
    web = services(docs)["web.default"]
    assert web["addresses"] == ["10.96.0.10", "fd00:10:96::a"]
    assert [i["name"] for i in web["instances"]] == ["web-0", "web-1"]
    assert web["instances"][0]["app"] == app
    snap = load_objects(docs)
    web0 = snap.services["web.default"].instances[0]
    assert {web0.app_host, *web0.other_app_hosts} == {"10.244.0.5", "fd00:10:244::5"}


def test_the_other_family_of_a_terminating_primary_listing_is_still_merged():
    # The primary family wins even when that listing is terminating (today's ranking); the
    # ready listing of the other family is kept as the further address, not as the instance.
    docs = documents_from_cluster(state_of(
        k.service("web", cluster_ips=["10.96.0.10", "fd00:10:96::a"], ip_families=["IPv4", "IPv6"]),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5", "web-0", ready=False, serving=True, terminating=True)],
                         name="web-v4"),
        k.endpoint_slice("web", [k.endpoint("fd00:10:244::5", "web-0")], name="web-v6", address_type="IPv6"),
        k.pod("web-0"),
    ))
    [web0] = services(docs)["web.default"]["instances"]
    assert web0["app"] == {"address": "10.244.0.5:8080", "otherAddresses": ["fd00:10:244::5"]}
    assert web0["labels"]["meshproxy.io/terminating"] == "true"


def test_within_one_family_the_listing_that_is_not_terminating_gives_the_other_address():
    # A StatefulSet pod recreated under the same name: its old IPv6 address, still terminating
    # in one slice, is not taken for the new pod's.
    docs = documents_from_cluster(state_of(
        k.service("db", cluster_ip="None", cluster_ips=["None"], ip_families=["IPv4", "IPv6"]),
        k.endpoint_slice("db", [k.endpoint("10.244.0.7", "db-0")], name="db-v4"),
        k.endpoint_slice("db", [k.endpoint("fd00:10:244::99", "db-0", ready=False, serving=True, terminating=True)],
                         name="db-v6-a", address_type="IPv6"),
        k.endpoint_slice("db", [k.endpoint("fd00:10:244::7", "db-0")], name="db-v6-b", address_type="IPv6"),
        k.pod("db-0", ip="10.244.0.7"),
    ))
    [db0] = services(docs)["db.default"]["instances"]
    assert db0["app"] == {"address": "10.244.0.7:8080", "otherAddresses": ["fd00:10:244::7"]}
    assert "meshproxy.io/terminating" not in db0["labels"]
    load_objects(docs)


def test_endpoints_are_merged_only_by_their_pod():
    # Without a targetRef nothing says two addresses are one pod: two instances, as before;
    # a pod listed in only one family has no further address.
    docs = documents_from_cluster(state_of(
        k.service("web", cluster_ips=["10.96.0.10", "fd00:10:96::a"], ip_families=["IPv4", "IPv6"]),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5"), k.endpoint("10.244.0.6", "web-1")], name="web-v4"),
        k.endpoint_slice("web", [k.endpoint("fd00:10:244::5")], name="web-v6", address_type="IPv6"),
        k.pod("web-1", ip="10.244.0.6"),
    ))
    assert {name: i["app"] for name, i in instances(docs).items()} == {
        "10.244.0.5": {"address": "10.244.0.5:8080"},
        "fd00-0010-0244-0000-0000-0000-0000-0005": {"address": "[fd00:10:244::5]:8080"},
        "web-1": {"address": "10.244.0.6:8080"},
    }
    load_objects(docs)


def test_fqdn_slices_are_ignored():
    ep = {"addresses": ["backend.example.com"], "conditions": {"ready": True}}
    docs = documents_from_cluster(state_of(k.service("web"), k.endpoint_slice("web", [ep], address_type="FQDN")))
    assert instances(docs) == {}


# Joining slices to Services, and unique instance names.


def test_slices_join_their_service_by_label_in_the_same_namespace():
    stray = k.endpoint_slice("web", [k.endpoint("10.244.9.9")], name="unlabelled")
    del stray["metadata"]["labels"]["kubernetes.io/service-name"]
    docs = documents_from_cluster(state_of(
        k.service("web"), k.service("api", cluster_ip="10.96.0.11"), k.service("web", "other", cluster_ip="10.96.0.12"),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5")]),
        k.endpoint_slice("api", [k.endpoint("10.244.0.6")], name="web-xyz"),  # the name does not matter
        k.endpoint_slice("web", [k.endpoint("10.244.1.5")], "other"),
        stray,
    ))
    assert {key: [i["name"] for i in s["instances"]] for key, s in services(docs).items()} == {
        "api.default": ["10.244.0.6"], "web.default": ["10.244.0.5"], "web.other": ["10.244.1.5"]}


def test_instance_names_stay_unique_across_services_and_namespaces():
    docs = documents_from_cluster(state_of(
        k.service("web"), k.service("web-headless", cluster_ip="None"), k.service("web", "staging"),
        k.endpoint_slice("web", [k.endpoint("10.244.0.5", "web-0")]),
        k.endpoint_slice("web-headless", [k.endpoint("10.244.0.5", "web-0")]),
        k.endpoint_slice("web", [k.endpoint("10.244.3.5", "web-0", "staging")], "staging"),
        k.pod("web-0"), k.pod("web-0", "staging"),
    ))
    names = {key: [i["name"] for i in s["instances"]] for key, s in services(docs).items()}
    assert names == {"web.default": ["web-0"], "web-headless.default": ["web-0.web-headless.default"],
                     "web.staging": ["web-0.web.staging"]}
    snap = load_objects(docs)
    assert snap.services["web.staging"].instances[0].app_address == "10.244.3.5:8080"


# Routes and policies.


def test_routes_and_policies_pass_through_without_server_fields_oldest_first():
    newer = k.http_route("delivery-new", "delivery", [("delivery-v2", 80)], path="/api", created="2024-06-01T00:00:00Z")
    older = k.http_route("delivery-old", "delivery", [("delivery-v1", 80)], path="/api", created="2024-05-01T00:00:00Z")
    traffic = k.policy("TrafficPolicy", "delivery", {"targetRef": {"kind": "Service", "name": "delivery"},
                                                    "retry": {"attempts": 5}})
    peer = k.policy("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}})
    authz = k.policy("AuthorizationPolicy", "callers", {
        "targetRef": {"kind": "Service", "name": "delivery"}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/scheduler"]}}]}]})
    docs = documents_from_cluster(state_of(
        k.service("delivery"), k.service("delivery-v1", cluster_ip="10.96.0.21"),
        k.service("delivery-v2", cluster_ip="10.96.0.22"), newer, older, authz, peer, traffic,
    ))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs[1:]] == [
        ("HTTPRoute", "delivery-old"), ("HTTPRoute", "delivery-new"), ("TrafficPolicy", "delivery"),
        ("PeerAuthentication", "strict"), ("AuthorizationPolicy", "callers")]
    route = docs[1]
    assert set(route) == {"apiVersion", "kind", "metadata", "spec"}
    assert route["metadata"] == {"name": "delivery-old", "namespace": "default", "annotations": {"team": "deliveries"}}
    assert route["spec"] == older["spec"]
    assert all(set(d["metadata"]) <= {"name", "namespace", "labels", "annotations"} for d in docs)
    snap = load_objects(docs)
    assert [r.metadata.name for r in snap.routes_for("delivery.default")] == ["delivery-old", "delivery-new"]
    assert snap.policy_for("delivery.default").retry.attempts == 5
    assert snap.mtls_mode_for("delivery.default") == "STRICT"
    assert [p.metadata.name for p in snap.authorization_policies_for("delivery.default")] == ["callers"]


def test_documents_are_fresh_copies():
    route = k.http_route("r", "web", [("web", 80)])
    state = state_of(k.service("web"), route)
    docs = documents_from_cluster(state)
    docs[1]["spec"]["rules"].clear()
    docs[0]["spec"]["services"].clear()
    again = documents_from_cluster(state)
    assert again[1]["spec"]["rules"] and again[0]["spec"]["services"]


# ClusterState bookkeeping.


def test_state_reports_changes_and_ignores_status_only_updates():
    state = ClusterState()
    assert state.upsert(k.pod("web-0", rv=31)) is True
    restarted = k.pod("web-0", rv=32)
    restarted["status"]["containerStatuses"] = [{"name": "app", "restartCount": 3}]
    restarted["metadata"]["managedFields"] = []
    assert state.upsert(restarted) is False
    relabelled = k.pod("web-0", labels={"app": "web", "version": "v2"}, rv=33)
    assert state.upsert(relabelled) is True
    assert state.resource_version() == 33
    assert state.apply_event("DELETED", k.pod("web-0", rv=40)) is True
    assert state.apply_event("DELETED", k.pod("web-0", rv=41)) is False
    assert state.resource_version() == 41
    assert state.apply_event("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "57"}}) is False
    assert state.resource_version() == 57
    assert state.get("Pod", "default", "web-0") is None


def test_list_items_take_the_kind_they_were_listed_as_and_replace_only_their_namespace():
    state = state_of(k.service("web", "a"), k.service("web", "b"))
    item = k.service("api", "a", rv=99)
    del item["kind"], item["apiVersion"]
    assert state.replace("Service", [item], namespace="a", resource_version="120") is True
    assert [(s["metadata"]["namespace"], s["metadata"]["name"], s["kind"], s["apiVersion"])
            for s in state.objects("Service")] == [("a", "api", "Service", "v1"), ("b", "web", "Service", "v1")]
    assert state.replace("Service", [item], namespace="a") is False
    assert state.resource_version() == 120
    assert state.replace("Service", []) is True and state.objects("Service") == []


def test_unknown_kinds_and_event_types_are_refused():
    state = ClusterState()
    with pytest.raises(ValueError, match="unknown kind 'Deployment'"):
        state.upsert({"kind": "Deployment", "metadata": {"name": "x"}})
    with pytest.raises(ValueError, match="unknown watch event type 'ERROR'"):
        state.apply_event("ERROR", k.pod("web-0"))


# Whatever the cluster looks like, the documents load.

_conditions = st.sampled_from([(True, True, False), (False, True, True), (False, False, True), (None, None, None)])


@st.composite
def clusters(draw):
    pods = [f"pod-{i}" for i in range(draw(st.integers(0, 4)))]
    namespaces = ["default", "other"]
    objects = [k.pod(p, ns, meshed=draw(st.booleans())) for p in pods for ns in namespaces]
    for s in range(draw(st.integers(1, 4))):
        ns = draw(st.sampled_from(namespaces))
        name = f"svc-{s}"
        objects.append(k.service(name, ns, cluster_ip=draw(st.sampled_from(["None", f"10.96.0.{s + 1}"]))))
        for n in range(draw(st.integers(0, 2))):
            family = draw(st.sampled_from(["IPv4", "IPv6"]))
            endpoints = []
            for j, p in enumerate(draw(st.lists(st.sampled_from(pods + [None]), max_size=4)) if pods else []):
                ip = f"10.244.{s}.{j + 1}" if family == "IPv4" else f"fd00::{s}:{j + 1}"
                ready, serving, terminating = draw(_conditions)
                endpoints.append(k.endpoint(ip, p, ns, ready=ready, serving=serving, terminating=terminating))
            objects.append(k.endpoint_slice(name, endpoints, ns, name=f"{name}-{n}", address_type=family))
    return objects


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_any_cluster_gives_documents_that_load(objects):
    docs = documents_from_cluster(state_of(*objects))
    snap = load_objects(docs)
    names = [i.name for s in snap.services.values() for i in s.instances]
    assert len(names) == len(set(names))
