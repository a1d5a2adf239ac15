"""AuthorizationPolicy on a sidecar's inbound side, end to end (spec §3, §4 403 `unauthorized`):
the principal is the caller's SPIFFE ID proven over mTLS with a certificate from the control
plane's CA, and the policy file is the one the control plane watches.

    client ──mTLS──►                       allowed: GET /api/* (ALLOW by principal)
    other  ──mTLS──►  server (PERMISSIVE)  denied:  DELETE anywhere (DENY)
    plaintext ─────►                       denied:  everything else, and every caller without a principal
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from support.backend import HttpBackend
from support.control import ControlProcess
from support.mtlsmesh import (
    Identities,
    meshed,
    replace_file,
    request,
    spiffe,
    start_control,
    start_sidecar,
    wait_for_endpoint,
    write_mesh,
)
from support.proxy import ProxyProcess, wait_for

POLICIES = """\
apiVersion: meshproxy.io/v1alpha1
kind: PeerAuthentication
metadata: {name: server, namespace: default}
spec:
  targetRef: {kind: Service, name: server}
  mtls: {mode: PERMISSIVE}
---
apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-callers, namespace: default}
spec:
  targetRef: {kind: Service, name: server}
  action: ALLOW
  rules:
    - from:
        - source: {principals: [%(principals)s]}
      to:
        - operation: {methods: [%(methods)s], paths: ["/api/*"]}
---
apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-deletes, namespace: default}
spec:
  targetRef: {kind: Service, name: server}
  action: DENY
  rules:
    - to:
        - operation: {methods: [DELETE]}
"""
FIRST = POLICIES % {"principals": '"cluster.local/ns/default/sa/client"', "methods": "GET"}


@dataclass
class AuthzMesh:
    policy_file: object
    app: HttpBackend
    server: ProxyProcess
    client: ProxyProcess
    other: ProxyProcess
    control: ControlProcess


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authz")
    app = HttpBackend("server").start()
    identities = Identities.make(tmp / "identity", ["client", "server", "other"])
    config = tmp / "config"
    config.mkdir()
    write_mesh(config / "mesh.yaml", [meshed("server", app.port)], policies=["policies.yaml"])
    (config / "policies.yaml").write_text(FIRST)
    control = start_control(tmp, config / "mesh.yaml", identities)
    started: list[ProxyProcess] = []
    try:
        server = start_sidecar(tmp, control, identities, "server", instance="server-0", app_port=app.port)
        started.append(server)
        for name in ("client", "other"):
            started.append(start_sidecar(tmp, control, identities, name))
        for caller in started[1:]:
            wait_for_endpoint(caller, "server.default", server.inbound)
        yield AuthzMesh(config / "policies.yaml", app, server, started[1], started[2], control)
    finally:
        for proxy in started:
            proxy.stop()
        control.stop()
        app.stop()


def _call(caller: ProxyProcess, method: str, path: str):
    return request(caller.outbound, path, host="server", method=method)


def _assert_denied(answer) -> None:
    status, headers, body = answer
    assert status == 403, (status, body)
    assert headers["x-meshproxy-error"] == "unauthorized"
    assert body.count(b"\n") <= 1


def _app_saw_only(mesh: AuthzMesh, seen: int, marker: str) -> None:
    """An allowed marker call is the one request the app received since `seen`."""
    status, _, _ = _call(mesh.client, "GET", f"/api/{marker}")
    assert status == 200
    assert [(r.method, r.path) for r in mesh.app.requests()[seen:]] == [("GET", f"/api/{marker}")]


def test_the_allowed_principal_gets_through_with_its_identity(mesh):
    status, headers, body = _call(mesh.client, "GET", "/api/x")
    assert status == 200 and body == b"server /api/x\n"
    record = mesh.app.requests("/api/x")[-1]
    assert record.header("x-meshproxy-client-id") == spiffe("client")


def test_a_path_no_policy_allows_is_refused_before_the_app(mesh):
    seen = len(mesh.app.requests())
    _assert_denied(_call(mesh.client, "GET", "/admin"))
    _assert_denied(_call(mesh.client, "GET", "/api"))  # `/api/*` needs the slash
    _assert_denied(_call(mesh.client, "POST", "/api/x"))  # allowed path, method not allowed
    _app_saw_only(mesh, seen, "after-admin")


def test_delete_is_denied_everywhere(mesh):
    seen = len(mesh.app.requests())
    for path in ("/api/x", "/admin"):
        _assert_denied(_call(mesh.client, "DELETE", path))
    _app_saw_only(mesh, seen, "after-delete")


def test_another_service_with_its_own_identity_is_refused(mesh):
    seen = len(mesh.app.requests())
    _assert_denied(_call(mesh.other, "GET", "/api/x"))
    _app_saw_only(mesh, seen, "after-other")


def test_a_plaintext_caller_has_no_principal_and_is_refused(mesh):
    seen = len(mesh.app.requests())
    # PERMISSIVE: plaintext is accepted on the inbound port, then refused by the policy; a
    # client id it claims proves nothing.
    answer = request(mesh.server.inbound, "/api/x", host="server",
                     headers={"x-meshproxy-client-id": spiffe("client")})
    _assert_denied(answer)
    _app_saw_only(mesh, seen, "after-plaintext")


def test_a_policy_edit_is_in_force_within_a_couple_of_seconds(mesh):
    _assert_denied(_call(mesh.other, "GET", "/api/x"))
    # Let `other` in too (written with the spiffe:// prefix) and allow POST and DELETE as
    # well: the DENY on DELETE still wins.
    edited = POLICIES % {"principals": '"cluster.local/ns/default/sa/client", '
                                       '"spiffe://cluster.local/ns/default/sa/other"',
                         "methods": "GET, POST, DELETE"}
    try:
        edited_at = time.monotonic()
        replace_file(mesh.policy_file, edited)
        wait_for(lambda: _call(mesh.other, "GET", "/api/x")[0] == 200, timeout=3, interval=0.05,
                 what="the edited policy to let `other` in")
        assert time.monotonic() - edited_at < 3
        status, _, body = _call(mesh.other, "GET", "/api/y")
        assert status == 200
        assert mesh.app.requests("/api/y")[-1].header("x-meshproxy-client-id") == spiffe("other")
        assert _call(mesh.client, "POST", "/api/x")[0] == 200
        seen = len(mesh.app.requests())
        _assert_denied(_call(mesh.client, "DELETE", "/api/x"))
        _assert_denied(_call(mesh.other, "DELETE", "/api/x"))
        _assert_denied(_call(mesh.other, "GET", "/admin"))
        _app_saw_only(mesh, seen, "after-edit")
    finally:
        replace_file(mesh.policy_file, FIRST)
        wait_for(lambda: _call(mesh.other, "GET", "/api/x")[0] == 403, timeout=3, interval=0.05,
                 what="the first policy back in force")


def test_the_403_is_made_by_the_server_sidecar(mesh):
    # The server's inbound counts it; the client's sidecar only relays it.
    before = mesh.server.metric_sum("meshproxy_requests_total", direction="inbound", code="403")
    _assert_denied(_call(mesh.client, "GET", "/admin"))
    wait_for(lambda: mesh.server.metric_sum("meshproxy_requests_total", direction="inbound", code="403")
             == before + 1, timeout=5, what="the inbound 403 counted")
