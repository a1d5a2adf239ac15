"""The Snapshot: effective policy by scope, attached routes, name resolution, version, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshproxy.config import DEFAULT_TRAFFIC_POLICY, Snapshot, load_config, load_text

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  trustDomain: example.org
  outboundTrafficPolicy: REGISTRY_ONLY
  services:
    - {name: web, addresses: [10.96.0.10, "fd00::a"], instances: [{name: web-0, app: {address: 127.0.0.1:9000}}]}
    - {name: api, namespace: shop, port: 8080}
    - {name: db, namespace: shop}
    - {name: ctl, namespace: meshproxy-system}
"""


def traffic(name: str, namespace: str, target: str | None = None, attempts: int = 1) -> str:
    ref = f"  targetRef: {{kind: Service, name: {target}}}\n" if target else ""
    return (f"---\napiVersion: meshproxy.io/v1alpha1\nkind: TrafficPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{ref}  retry: {{attempts: {attempts}}}\n")


def peer(name: str, namespace: str, mode: str, target: str | None = None) -> str:
    ref = f"  targetRef: {{kind: Service, name: {target}}}\n" if target else ""
    return (f"---\napiVersion: meshproxy.io/v1alpha1\nkind: PeerAuthentication\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{ref}  mtls: {{mode: {mode}}}\n")


def authz(name: str, namespace: str, action: str, target: str | None = None) -> str:
    ref = f"  targetRef: {{kind: Service, name: {target}}}\n" if target else ""
    return (f"---\napiVersion: meshproxy.io/v1alpha1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{ref}  action: {action}\n  rules: [{{}}]\n")


def test_traffic_policy_scope_target_over_namespace_over_root_over_defaults() -> None:
    snap = load_text(MESH + traffic("root", "meshproxy-system", attempts=7)
                     + traffic("shop-wide", "shop", attempts=4) + traffic("for-api", "shop", "api", attempts=1))
    assert snap.policy_for("api.shop").metadata.name == "for-api"
    assert snap.policy_for("db.shop").metadata.name == "shop-wide"
    assert snap.policy_for("web.default").metadata.name == "root"
    assert snap.policy_for("web.default").retry.attempts == 7
    assert snap.policy_for("unknown.elsewhere").metadata.name == "root"
    assert load_text(MESH).policy_for("api.shop") is DEFAULT_TRAFFIC_POLICY


def test_a_target_ref_in_the_root_namespace_only_targets_a_service_there() -> None:
    snap = load_text(MESH + traffic("ctl-only", "meshproxy-system", "ctl"))
    assert snap.policy_for("ctl.meshproxy-system").metadata.name == "ctl-only"
    assert snap.policy_for("web.default") is DEFAULT_TRAFFIC_POLICY


def test_of_two_policies_of_one_scope_the_oldest_wins_with_a_warning() -> None:
    snap = load_text(MESH + traffic("first", "shop", "api") + traffic("second", "shop", "api"), "p.yaml")
    assert snap.policy_for("api.shop").metadata.name == "first"
    assert [str(w) for w in snap.warnings] == [
        "p.yaml:24:36: warning: spec.targetRef.name: TrafficPolicy shop/first (at p.yaml:13:1) already "
        "applies to Service 'api.shop'; this one is not used"
    ]


def test_peer_authentication_scope_and_mtls_mode() -> None:
    snap = load_text(MESH + peer("mesh", "meshproxy-system", "STRICT") + peer("api", "shop", "DISABLE", "api"))
    assert snap.peer_authentication_for("api.shop").mtls_mode == "DISABLE"
    assert snap.mtls_mode_for("db.shop") == "STRICT"
    assert load_text(MESH).peer_authentication_for("db.shop") is None
    assert load_text(MESH).mtls_mode_for("db.shop") == "PERMISSIVE"
    assert load_text(MESH).mtls_mode_for("db.shop", default="STRICT") == "STRICT"
    assert load_text(MESH.replace("  trustDomain", "  mtls: {mode: DISABLE}\n  trustDomain")).mtls_mode_for(
        "db.shop") == "DISABLE"


def test_authorization_policies_of_the_narrowest_scope() -> None:
    snap = load_text(MESH + authz("deny-all", "meshproxy-system", "DENY") + authz("shop-a", "shop", "ALLOW")
                     + authz("shop-b", "shop", "DENY") + authz("api", "shop", "ALLOW", "api"))
    assert [p.metadata.name for p in snap.authorization_policies_for("api.shop")] == ["api"]
    assert [p.metadata.name for p in snap.authorization_policies_for("db.shop")] == ["shop-a", "shop-b"]
    assert [p.metadata.name for p in snap.authorization_policies_for("web.default")] == ["deny-all"]
    assert load_text(MESH).authorization_policies_for("web.default") == ()


def route(name: str, parent: str, namespace: str = "default", port: str = "") -> str:
    return (f"---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n  parentRefs: [{{kind: Service, name: {parent}{port}}}]\n")


def test_routes_attach_to_their_parent_in_load_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.yaml").write_text(route("zeta", "web") + route("alpha", "web"))
    (tmp_path / "a.yaml").write_text(MESH + route("late", "web") + route("api-route", "api", "shop"))
    (tmp_path / "c.yml").write_text(route("other-port", "api", "shop", ", port: 9999"))
    snap = load_config([str(tmp_path / "c.yml"), str(tmp_path)])
    assert [r.metadata.name for r in snap.routes_for("web.default")] == ["late", "zeta", "alpha"]
    assert [r.metadata.name for r in snap.routes_for("api.shop")] == ["api-route"]
    assert snap.routes_for("db.shop") == ()
    # Routes without rules match every request, so only the oldest of them ever wins.
    assert sorted(str(w).replace(f"{tmp_path}/", "") for w in snap.warnings) == [
        "b/1.yaml:2:1: warning: spec.rules[0]: can never match: rule default/late/0 has the same match "
        "and takes precedence",
        "b/1.yaml:8:1: warning: spec.rules[0]: can never match: rule default/late/0 has the same match "
        "and takes precedence",
        "c.yml:6:49: warning: spec.parentRefs[0].port: Service 'api.shop' has port 8080, not 9999",
    ]
    assert snap.files == tuple(str(tmp_path / n) for n in ("a.yaml", "b/1.yaml", "c.yml"))


@pytest.mark.parametrize(
    ("host", "client_namespace", "expected"),
    [
        ("web", "default", "web.default"),
        ("api", "shop", "api.shop"),
        ("api", "default", None),
        ("web.default", "shop", "web.default"),
        ("api.shop", "default", "api.shop"),
        ("api.shop.svc", "default", "api.shop"),
        ("api.shop.svc.cluster.local", "default", "api.shop"),
        ("api.shop.svc.example.org", "default", "api.shop"),
        ("API.Shop.SVC.Cluster.Local", "default", "api.shop"),
        ("api.shop.svc.cluster.local.", "default", "api.shop"),
        ("web:80", "default", "web.default"),
        ("10.96.0.10", "shop", "web.default"),
        ("10.96.0.10:80", "shop", "web.default"),
        ("fd00::a", "default", "web.default"),
        ("[fd00::a]:80", "default", "web.default"),
        ("10.96.0.11", "default", None),
        ("api.shop.svc.other.local", "default", None),
        ("api.shop.cluster.local", "default", None),
        ("example.com", "default", None),
        ("", "default", None),
    ],
)
def test_resolve_authority(host: str, client_namespace: str, expected: str | None) -> None:
    found = load_text(MESH).resolve_authority(host, client_namespace)
    assert (found.key if found else None) == expected


def test_resolve_authority_default_namespace() -> None:
    assert load_text(MESH).resolve_authority("web").key == "web.default"


def test_instance_at_finds_a_known_instance() -> None:
    service, instance = load_text(MESH).instance_at("127.0.0.1", 9000)
    assert (service.key, instance.name) == ("web.default", "web-0")
    assert load_text(MESH).instance_at("127.0.0.1", 9001) is None


def test_outbound_traffic_policy_defaults_to_allow_any_without_a_mesh() -> None:
    assert load_text(MESH).outbound_traffic_policy == "REGISTRY_ONLY"
    assert Snapshot().outbound_traffic_policy == "ALLOW_ANY"
    assert Snapshot().services == {}
    assert Snapshot().mesh is None


def test_version_is_stable_for_the_same_content_and_changes_with_it(tmp_path: Path) -> None:
    text = MESH + traffic("p", "shop", "api")
    one = load_text(text, "a.yaml").version
    assert one == load_text(text, "b.yaml").version
    assert one == load_text("# a comment\n" + text.replace("{name: p, namespace: shop}",
                                                            "{namespace: shop, name: p}")).version
    assert len(one) == 12
    assert load_text(text.replace("attempts: 1", "attempts: 2")).version != one
    assert load_text(text.replace("port: 8080", "port: 8081")).version != one


def test_to_json_is_serialisable_and_shows_effective_policies() -> None:
    snap = load_text(MESH + traffic("p", "shop", "api") + route("r", "api", "shop"), "m.yaml")
    data = json.loads(json.dumps(snap.to_json()))
    assert data["version"] == snap.version
    assert data["outboundTrafficPolicy"] == "REGISTRY_ONLY"
    api = data["services"]["api.shop"]
    assert api["port"] == 8080
    assert api["trafficPolicy"]["metadata"]["name"] == "p"
    assert api["trafficPolicy"]["retry"]["attempts"] == 1
    assert api["trafficPolicy"]["loadBalancer"]["defaultRTT"] == 0.03
    assert api["routes"] == ["shop/r"]
    assert api["mtlsMode"] == "PERMISSIVE"
    assert data["services"]["db.shop"]["trafficPolicy"]["metadata"] is None
    assert data["services"]["web.default"]["instances"][0]["appPort"] == 9000
    assert data["routes"][0]["source"] == "m.yaml:20:1"
    assert [r["kind"] for r in data["resources"]] == ["Mesh", "TrafficPolicy", "HTTPRoute"]


def test_services_can_be_given_without_a_mesh() -> None:
    mesh = load_text(MESH)
    snap = Snapshot((), services=mesh.services.values())
    assert sorted(snap.services) == ["api.shop", "ctl.meshproxy-system", "db.shop", "web.default"]
    assert snap.resolve_authority("10.96.0.10").key == "web.default"
    assert snap.version != Snapshot().version


def test_mesh_policies_are_loaded_once_even_when_also_given(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "t.yaml").write_text(traffic("p", "shop", "api").lstrip("-\n"))
    (tmp_path / "policies" / ".hidden.yaml").write_text("not: [valid\n")
    (tmp_path / "mesh.yaml").write_text(MESH + "  policies: [policies, ./policies/t.yaml]\n")
    both = load_config([str(tmp_path / "mesh.yaml"), str(tmp_path / "policies" / "t.yaml")])
    via_mesh = load_config([str(tmp_path / "mesh.yaml")])
    assert both.version == via_mesh.version
    assert len(via_mesh.resources) == 2
    assert via_mesh.policy_for("api.shop").metadata.name == "p"
    assert via_mesh.files == (str(tmp_path / "mesh.yaml"), str(tmp_path / "policies" / "t.yaml"))
