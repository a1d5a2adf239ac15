"""Whatever the input, loading ends in a Snapshot or a ConfigError, never another exception."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.config import ConfigError, Snapshot, load_objects, load_text

# Field names of every kind, so that generated objects reach deep into the parsers.
FIELDS = [
    "name", "namespace", "port", "addresses", "instances", "app", "address", "command", "sidecar",
    "inbound", "labels", "services", "policies", "trustDomain", "controlPlane", "listen", "mtls", "mode",
    "outboundTrafficPolicy", "parentRefs", "kind", "group", "rules", "matches", "path", "type", "value",
    "headers", "queryParams", "method", "filters", "requestHeaderModifier", "responseHeaderModifier",
    "urlRewrite", "requestRedirect", "requestMirror", "set", "add", "remove", "hostname",
    "replaceFullPath", "replacePrefixMatch", "statusCode", "scheme", "backendRef", "percent",
    "fraction", "numerator", "denominator", "backendRefs", "weight", "timeouts", "request",
    "backendRequest", "retry", "attempts", "codes", "backoff", "targetRef", "loadBalancer", "decay",
    "defaultRTT", "connectionPool", "connectTimeout", "idleTimeout", "maxConnections", "on", "budget",
    "base", "max", "circuitBreaker", "consecutiveFailures", "action", "from", "to", "source",
    "operation", "principals", "paths", "methods",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "x", "web", "1s", "250ms", "/a", "(", "*", "127.0.0.1:80", "Exact", "PathPrefix",
                     "RegularExpression", "RequestMirror", "URLRewrite", "ReplacePrefixMatch", "Service",
                     "ALLOW", "STRICT", "10.0.0.1", "GET", "5xx"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5)),
    max_leaves=25,
)
ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"},
    "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}], "rules": [{
        "name": "one",
        "matches": [{"path": {"type": "RegularExpression", "value": "/a.*"}, "method": "GET",
                     "headers": [{"name": "x", "value": "y"}], "queryParams": [{"name": "q", "value": "1"}]}],
        "filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}],
                                                                       "remove": ["c"]}},
            {"type": "URLRewrite", "urlRewrite": {"hostname": "h", "path": {"type": "ReplaceFullPath",
                                                                           "replaceFullPath": "/x"}}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web"},
                                                        "fraction": {"numerator": 1}}},
            {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}},
        ],
        "backendRefs": [{"name": "web", "weight": 2, "filters": [
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "a", "value": "b"}]}}]}],
        "timeouts": {"request": "2s", "backendRequest": "1s"},
        "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
    }]},
}
MESH = {
    "apiVersion": "meshproxy.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "m"},
    "spec": {"trustDomain": "td", "controlPlane": {"listen": "127.0.0.1:1"}, "mtls": {"mode": "STRICT"},
             "services": [{"name": "web", "addresses": ["10.0.0.1"], "instances": [
                 {"name": "w", "app": {"address": "127.0.0.1:9", "command": ["x"]}, "sidecar": {"inbound": 1}}]}]},
}
POLICIES = [
    {"apiVersion": "meshproxy.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "t"}, "spec": {
        "targetRef": {"kind": "Service", "name": "web"}, "loadBalancer": {"type": "Random", "decay": "1s"},
        "connectionPool": {"idleTimeout": "1s", "maxRequests": 3}, "timeouts": {"request": "1s"},
        "retry": {"on": ["reset", 503], "backoff": {"base": "1ms"}, "budget": {"percent": 5}},
        "circuitBreaker": {"consecutiveFailures": 2}}},
    {"apiVersion": "meshproxy.io/v1alpha1", "kind": "PeerAuthentication", "metadata": {"name": "p"},
     "spec": {"mtls": {"mode": "DISABLE"}}},
    {"apiVersion": "meshproxy.io/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "a"}, "spec": {
        "action": "DENY", "rules": [{"from": [{"source": {"principals": ["x/*"], "namespaces": ["ns"]}}],
                                     "to": [{"operation": {"methods": ["GET"], "paths": ["/a*"]}}]}]}},
]
VALID = [MESH, ROUTE, *POLICIES]


def test_the_seed_documents_are_valid() -> None:
    snap = load_objects(VALID)
    assert len(snap.resources) == 5
    assert [w.message for w in snap.warnings] == []


@st.composite
def mutated(draw: st.DrawFn) -> list[Any]:
    """The valid documents with a few values replaced, removed or added somewhere inside."""
    docs = copy.deepcopy(draw(st.lists(st.sampled_from(range(len(VALID))), min_size=1, max_size=5, unique=True)))
    docs = [copy.deepcopy(VALID[i]) for i in docs]
    for _ in range(draw(st.integers(1, 3))):
        doc = draw(st.sampled_from(docs))
        node: Any = doc["spec"] if draw(st.integers(0, 9)) and isinstance(doc.get("spec"), dict) else doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.integers(0, 9)):
                node = child
                continue
            action = draw(st.integers(0, 2))
            if action == 0:
                node[key] = draw(VALUES)
            elif action == 1 and isinstance(node, dict):
                del node[key]
            elif isinstance(node, dict):
                node[draw(st.sampled_from(FIELDS))] = draw(VALUES)
            break
    return docs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_any_objects_give_a_snapshot_or_a_config_error(objects: list[Any]) -> None:
    try:
        snap = load_objects(objects)
    except ConfigError as exc:
        assert exc.diagnostics and all(d.is_error for d in exc.diagnostics)
        return
    assert isinstance(snap, Snapshot)
    for key in snap.services:
        snap.policy_for(key)
        snap.routes_for(key)
    snap.to_json()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab:-[]{}#&*!|>'\"\n\t %@`,?", max_size=60))
def test_any_text_gives_a_snapshot_or_a_config_error(text: str) -> None:
    try:
        load_text(text, "f.yaml")
    except ConfigError as exc:
        assert all(d.file == "f.yaml" for d in exc.diagnostics)
