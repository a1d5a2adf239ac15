"""Every kind of configuration error is reported, all of them, at the key or value it is about."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.config import ConfigError, load, load_config

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
  namespace: default
spec:
  parentRefs:
    - {kind: Service, name: web}
  rules:
    - matches:
        - path: {type: PathPrefix, value: /api}
      backendRefs:
        - {name: web-v1, port: 80}
"""

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata:
  name: m
spec:
  services:
    - name: web
      instances:
        - {name: web-0, app: {address: 127.0.0.1:9000}}
    - name: web-v1
      instances:
        - name: web-v1-0
          app: {address: 127.0.0.1:9001}
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def lines(tmp_path: Path, *files: tuple[str, str], errors: bool = True) -> list[str]:
    """Load the (name, text) files; return the errors (or warnings) with tmp_path left out."""
    result = load([write(tmp_path, name, text) for name, text in files])
    found = result.errors if errors else result.warnings
    return [str(d).replace(f"{tmp_path}/", "") for d in found]


def test_yaml_syntax_error_names_its_line_and_column(tmp_path: Path) -> None:
    text = ROUTE.replace("    - {kind: Service, name: web}", "    - {kind: Service, name: web")
    [line] = lines(tmp_path, ("c.yaml", text))
    assert line.startswith("c.yaml:9:8: invalid YAML: ")


def test_a_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    assert lines(tmp_path, ("c.yaml", "- a\n- b\n")) == [
        "c.yaml:1:1: document: expected a mapping, got a list"
    ]


def test_unknown_api_version(tmp_path: Path) -> None:
    text = ROUTE.replace("k8s.io/v1\n", "k8s.io/v2\n", 1)
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:1:13: apiVersion: unknown apiVersion 'gateway.networking.k8s.io/v2' for kind HTTPRoute "
        "(expected gateway.networking.k8s.io/v1)"
    ]


def test_unknown_kind(tmp_path: Path) -> None:
    text = ROUTE.replace("kind: HTTPRoute", "kind: HTTPRoutes")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:2:7: kind: unknown kind 'HTTPRoutes' "
        "(known: Mesh, HTTPRoute, GRPCRoute, TrafficPolicy, PeerAuthentication, AuthorizationPolicy)"
    ]


def test_unknown_field_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    text = ROUTE.replace("        - path: {type: PathPrefix, value: /api}",
                         "        - path: {type: PathPrefix, value: /api}\n          verb: GET")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:12:11: spec.rules[0].matches[0]: unknown field 'verb' "
        "(allowed: headers, method, path, queryParams)"
    ]


def test_unknown_top_level_field(tmp_path: Path) -> None:
    assert lines(tmp_path, ("c.yaml", ROUTE + "specs: {}\n")) == [
        "c.yaml:14:1: unknown field 'specs' (allowed: apiVersion, kind, metadata, spec)"
    ]


def test_wrong_type(tmp_path: Path) -> None:
    text = ROUTE.replace("port: 80}", "port: eighty}")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:13:32: spec.rules[0].backendRefs[0].port: expected a port number, got a string ('eighty')"
    ]


def test_wrong_type_of_a_section(tmp_path: Path) -> None:
    text = ROUTE.replace("  parentRefs:\n    - {kind: Service, name: web}\n", "  parentRefs: web\n")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:7:15: spec.parentRefs: expected a list, got a string ('web')"
    ]


def test_missing_required_fields_point_at_their_parent(tmp_path: Path) -> None:
    text = ROUTE.replace("  name: r\n", "").replace("{name: web-v1, port: 80}", "{port: 80}")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:3:1: metadata: missing required field 'name'",
        "c.yaml:12:11: spec.rules[0].backendRefs[0]: missing required field 'name'",
    ]


def test_missing_kind(tmp_path: Path) -> None:
    assert lines(tmp_path, ("c.yaml", "apiVersion: meshproxy.io/v1alpha1\nmetadata: {name: x}\n")) == [
        "c.yaml:1:1: missing required field 'kind'"
    ]


def test_bad_duration(tmp_path: Path) -> None:
    text = ROUTE + "      timeouts: {request: 1.5s}\n"
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:14:27: spec.rules[0].timeouts.request: bad duration '1.5s' (expected e.g. 250ms, 2s, 1m, 1h30m)"
    ]


def test_bad_enum_value(tmp_path: Path) -> None:
    text = ROUTE.replace("type: PathPrefix", "type: Prefix")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:11:24: spec.rules[0].matches[0].path.type: unknown value 'Prefix' "
        "(expected one of: Exact, PathPrefix, RegularExpression)"
    ]


def test_duplicate_resource_names_across_files(tmp_path: Path) -> None:
    other_ns = ROUTE.replace("namespace: default", "namespace: other")
    assert lines(tmp_path, ("a.yaml", ROUTE), ("b.yaml", ROUTE + "---\n" + other_ns)) == [
        "b.yaml:4:9: metadata.name: duplicate HTTPRoute default/r (first defined at a.yaml:1:1)"
    ]


def test_same_name_in_another_kind_is_no_duplicate(tmp_path: Path) -> None:
    policy = "apiVersion: meshproxy.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: r}\nspec: {}\n"
    assert lines(tmp_path, ("a.yaml", ROUTE + "---\n" + policy)) == []


def test_duplicate_service_and_instance_names_in_a_mesh(tmp_path: Path) -> None:
    text = MESH.replace("    - name: web-v1\n", "    - name: web\n").replace("name: web-v1-0", "name: web-0")
    assert lines(tmp_path, ("m.yaml", text)) == [
        "m.yaml:10:13: spec.services[1].name: duplicate Service 'web.default' (first at line 7)",
        "m.yaml:12:17: spec.services[1].instances[0].name: duplicate instance 'web-0' (first at line 9)",
    ]


def test_two_meshes(tmp_path: Path) -> None:
    other = MESH.replace("name: m\n", "name: n\n")
    assert lines(tmp_path, ("a.yaml", MESH), ("b.yaml", other)) == [
        "b.yaml:2:7: kind: only one Mesh may be loaded (the first is at a.yaml:1:1)"
    ]


def test_backend_weights_all_zero(tmp_path: Path) -> None:
    text = ROUTE.replace("{name: web-v1, port: 80}", "{name: web-v1, weight: 0}\n        - {name: web, weight: 0}")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:12:7: spec.rules[0].backendRefs: every weight is 0, so no request can be sent anywhere"
    ]


def test_some_zero_weights_are_fine(tmp_path: Path) -> None:
    text = ROUTE.replace("{name: web-v1, port: 80}", "{name: web-v1, weight: 0}\n        - {name: web}")
    assert lines(tmp_path, ("c.yaml", text)) == []


def test_regex_that_does_not_compile(tmp_path: Path) -> None:
    text = ROUTE.replace("{type: PathPrefix, value: /api}",
                         "{type: RegularExpression, value: '/api/(v[12'}\n"
                         "          headers: [{type: RegularExpression, name: x-v, value: '*'}]")
    assert lines(tmp_path, ("c.yaml", text)) == [
        "c.yaml:11:50: spec.rules[0].matches[0].path.value: bad regular expression '/api/(v[12': "
        "unterminated character set at position 7",
        "c.yaml:12:65: spec.rules[0].matches[0].headers[0].value: bad regular expression '*': "
        "nothing to repeat at position 0",
    ]


def test_port_out_of_range(tmp_path: Path) -> None:
    text = MESH.replace("    - name: web\n", "    - name: web\n      port: 0\n")
    assert lines(tmp_path, ("m.yaml", text)) == [
        "m.yaml:8:13: spec.services[0].port: port 0 is out of range 1..65535"
    ]


def test_port_out_of_range_in_an_address(tmp_path: Path) -> None:
    text = MESH.replace("127.0.0.1:9001", "127.0.0.1:90001")
    assert lines(tmp_path, ("m.yaml", text)) == [
        "m.yaml:13:26: spec.services[1].instances[0].app.address: bad address '127.0.0.1:90001' "
        "(port 90001 is out of range 1..65535; e.g. 127.0.0.1:9000)"
    ]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":9000", "::1:9000", "[nope]:9000", "a b:80"])
def test_bad_address(tmp_path: Path, address: str) -> None:
    text = MESH.replace("127.0.0.1:9001", f"'{address}'")
    [error] = lines(tmp_path, ("m.yaml", text))
    assert error.startswith(f"m.yaml:13:26: spec.services[1].instances[0].app.address: bad address '{address}' (")


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = ROUTE.replace("type: PathPrefix", "type: Prefix").replace("port: 80}", "port: 80, weight: -1}")
    text += "      timeouts: {request: soon}\n---\nkind: Unknown\napiVersion: x/v1\n"
    assert [line.split(": ", 1)[0] for line in lines(tmp_path, ("c.yaml", text))] == [
        "c.yaml:11:24", "c.yaml:13:44", "c.yaml:14:27", "c.yaml:16:7",
    ]


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert [str(d) for d in load([missing]).errors] == [f"{missing}: no such file or folder"]


def test_a_missing_policy_file_of_the_mesh_points_at_its_entry(tmp_path: Path) -> None:
    text = MESH + "  policies: [routes.yaml, missing/]\n"
    write(tmp_path, "routes.yaml", ROUTE)
    assert lines(tmp_path, ("m.yaml", text)) == [
        "m.yaml:14:27: spec.policies[1]: no such file or folder 'missing'"
    ]


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"kind: Mesh\nmetadata: {name: \xff}\n")
    assert [str(d) for d in load([str(path)]).errors] == [f"{path}:2:18: not UTF-8 text"]


def test_load_config_raises_with_every_error_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", ROUTE.replace("type: PathPrefix", "type: Prefix") + "  extra: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config([path])
    assert [(d.line, d.col) for d in caught.value.diagnostics] == [(11, 24), (14, 3)]
    assert str(caught.value).splitlines() == [str(d) for d in caught.value.diagnostics]


# Warnings: references to Services the Mesh does not define.


def test_unknown_services_are_warnings_when_a_mesh_is_loaded(tmp_path: Path) -> None:
    route = ROUTE.replace("name: web-v1", "name: web-v3").replace("name: web}", "name: api}")
    policy = ("apiVersion: meshproxy.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
              "spec:\n  targetRef: {kind: Service, name: db}\n")
    found = lines(tmp_path, ("m.yaml", MESH), ("r.yaml", route), ("t.yaml", policy), errors=False)
    assert found == [
        "r.yaml:8:29: warning: spec.parentRefs[0].name: Service 'api.default' is not defined in the Mesh",
        "r.yaml:13:18: warning: spec.rules[0].backendRefs[0].name: Service 'web-v3.default' is not defined "
        "in the Mesh",
        "t.yaml:5:36: warning: spec.targetRef.name: Service 'db.default' is not defined in the Mesh",
    ]
    assert lines(tmp_path, ("m.yaml", MESH), ("r.yaml", route), ("t.yaml", policy)) == []


def test_no_reference_warnings_without_a_mesh(tmp_path: Path) -> None:
    assert lines(tmp_path, ("r.yaml", ROUTE), errors=False) == []


def test_a_backend_in_another_namespace_is_looked_up_there(tmp_path: Path) -> None:
    route = ROUTE.replace("{name: web-v1, port: 80}", "{name: web-v1, namespace: prod}")
    assert lines(tmp_path, ("m.yaml", MESH), ("r.yaml", route), errors=False) == [
        "r.yaml:13:18: warning: spec.rules[0].backendRefs[0].name: Service 'web-v1.prod' is not defined in the Mesh"
    ]


def test_a_rule_that_can_never_match_is_a_warning(tmp_path: Path) -> None:
    route = ROUTE + ("    - matches:\n        - path: {type: PathPrefix, value: /api}\n"
                     "      backendRefs: [{name: web}]\n")
    assert lines(tmp_path, ("r.yaml", route), errors=False) == [
        "r.yaml:15:11: warning: spec.rules[1].matches[0]: can never match: rule default/r/0 has the same "
        "match and takes precedence"
    ]


def test_a_fixed_sidecar_port_given_twice(tmp_path: Path) -> None:
    text = MESH.replace("{name: web-0, app: {address: 127.0.0.1:9000}}",
                        "{name: web-0, app: {address: 127.0.0.1:9000}, sidecar: {admin: 15100}}")
    text = text.replace("          app: {address: 127.0.0.1:9001}",
                        "          app: {address: 127.0.0.1:9001}\n          sidecar: {inbound: 15100}")
    assert lines(tmp_path, ("m.yaml", text)) == [
        "m.yaml:14:30: spec.services[1].instances[0].sidecar.inbound: port 15100 is already given to a sidecar "
        "(first at line 9)"
    ]


def test_filter_hostnames_and_paths_must_be_legal_on_the_wire(tmp_path) -> None:
    """A filter writes these into Host, Location or the request line: no spaces, CR/LF or
    non-ASCII text may get there."""
    from meshproxy.config import load

    path = tmp_path / "r.yaml"
    path.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: r, namespace: default}\nspec:\n"
        "  parentRefs: [{kind: Service, name: a}]\n  rules:\n    - filters:\n"
        "        - type: URLRewrite\n"
        "          urlRewrite: {hostname: Evil.Host, path: {type: ReplaceFullPath, "
        "replaceFullPath: \"/a b\"}}\n"
        "        - type: RequestRedirect\n"
        "          requestRedirect: {hostname: \"x\\r\\ny\"}\n")
    messages = [str(d) for d in load([str(path)]).errors]
    assert any(":9:" in m and "urlRewrite.hostname: 'Evil.Host' is not a valid hostname" in m
               for m in messages), messages
    assert any(":9:" in m and "replaceFullPath: '/a b' is not a valid path" in m for m in messages)
    assert any(":11:" in m and "requestRedirect.hostname: 'x\\r\\ny'" in m for m in messages)
