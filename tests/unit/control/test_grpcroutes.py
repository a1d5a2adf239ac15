"""GRPCRoutes in the control plane: watched from Kubernetes like HTTPRoutes, passed to proxies
as documents, an invalid one refused (files: the last valid configuration stays; the cluster:
that object alone is left out or held at its last valid version). Pure: no sockets, no API
server (objects as the API server's JSON has them, by tests/support/kubefactory.py)."""

from __future__ import annotations

import support.kubefactory as k
from meshproxy.config import GRPCRoute, load, load_objects
from meshproxy.control.clusterstate import API_VERSIONS, ClusterState
from meshproxy.control.kubeobjects import documents_from_cluster
from meshproxy.control.kubernetes import RESOURCES
from meshproxy.control.plane import ControlPlane
from meshproxy.control.screening import Screening, build_discovered

FILES = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: test}
spec:
  services:
    - {name: drone, port: 50051}
    - {name: drone-v1, port: 50051, instances: [{name: d-0, app: {address: 127.0.0.1:9031}}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: tracking}
spec:
  parentRefs: [{kind: Service, name: drone}]
  rules:
    - matches:
        - method: {service: drone.v1.Tracking, method: Watch}
      backendRefs: [{name: drone-v1}]
"""


def cluster(*objects: dict) -> ClusterState:
    state = ClusterState()
    for obj in objects:
        state.upsert(obj)
    return state


def base() -> list[dict]:
    return [k.service("drone"), k.service("drone-v1", cluster_ip="10.96.0.21"),
            k.service("drone-v2", cluster_ip="10.96.0.22")]


def test_grpc_routes_are_watched_like_http_routes() -> None:
    [resource] = [r for r in RESOURCES if r.kind == "GRPCRoute"]
    assert (resource.api, resource.group, resource.version, resource.plural) == (
        "CustomObjectsApi", "gateway.networking.k8s.io", "v1", "grpcroutes")
    assert resource.absent_when == (404,)  # a cluster without the Gateway API CRD has none
    assert API_VERSIONS["GRPCRoute"] == "gateway.networking.k8s.io/v1"


def test_grpc_routes_pass_through_after_http_routes_oldest_first_without_server_fields() -> None:
    newer = k.grpc_route("tracking-new", "drone", [("drone-v2", 80)], created="2024-06-01T00:00:00Z")
    older = k.grpc_route("tracking-old", "drone", [("drone-v1", 80)], created="2024-05-01T00:00:00Z")
    http = k.http_route("drone-http", "drone", [("drone-v1", 80)])
    docs = documents_from_cluster(cluster(*base(), newer, http, older))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs[1:]] == [
        ("HTTPRoute", "drone-http"), ("GRPCRoute", "tracking-old"), ("GRPCRoute", "tracking-new")]
    route = docs[2]
    assert set(route) == {"apiVersion", "kind", "metadata", "spec"}
    assert route["metadata"] == {"name": "tracking-old", "namespace": "default"}
    assert route["spec"] == older["spec"]
    snap = load_objects(docs)
    attached = snap.routes_for("drone.default")
    assert [(type(r), r.metadata.name) for r in attached] == [(GRPCRoute, "tracking-old"), (GRPCRoute, "tracking-new")]
    assert [r.metadata.name for r in snap.ignored_routes_for("drone.default")] == ["drone-http"]


def test_an_invalid_grpc_route_from_the_cluster_is_left_out_alone_then_held_at_its_last_valid_version() -> None:
    good = k.grpc_route("good", "drone", [("drone-v1", 80)])
    typo = k.grpc_route("typo", "drone", [("drone-v1", 80)], service="drone/v1")
    screening = Screening()
    snapshot, rejected = build_discovered(None, documents_from_cluster(cluster(*base(), good, typo)), screening)
    assert [(d["kind"], d["metadata"]["name"]) for d in snapshot.documents[1:]] == [("GRPCRoute", "good")]
    [r] = rejected
    assert (r.kind, r.name, r.kept) == ("GRPCRoute", "typo", False)
    assert str(r).startswith("GRPCRoute default/typo: spec.rules[0].matches[0].method.service: 'drone/v1' "
                             "is not a valid gRPC service name")
    broken = k.grpc_route("good", "drone", [("drone-v2", 80)], method="9")
    snapshot, rejected = build_discovered(None, documents_from_cluster(cluster(*base(), broken)), screening)
    assert [(r.kind, r.name, r.kept) for r in rejected] == [("GRPCRoute", "good", True)]
    [kept] = snapshot.snapshot.routes_for("drone.default")
    assert kept.rules[0].backend_refs[0].name == "drone-v1"


async def test_an_invalid_grpc_route_file_change_is_refused_and_the_last_valid_one_stays(tmp_path) -> None:
    file = tmp_path / "mesh.yaml"
    plane = ControlPlane()
    file.write_text(FILES)
    assert plane.files_changed(load([str(file)]), 1)
    good = plane.current.version
    file.write_text(FILES.replace("method: Watch}", "method: Watch/All}"))
    assert not plane.files_changed(load([str(file)]), 2)
    assert plane.current.version == good
    [route] = plane.current.snapshot.routes_for("drone.default")
    assert route.rules[0].matches[0].method.method == "Watch"
    errors = plane.config_json()["lastError"]["errors"]
    assert any(e.startswith(f"{file}:16:") and "'Watch/All' is not a valid gRPC method name" in e for e in errors)
