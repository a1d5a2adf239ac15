"""AuthorizationPolicy decisions (spec §3 `AuthorizationPolicy`, Istio's semantics): DENY
first, then ALLOW if any; sources by principal and namespace, operations by method and path;
wildcards; unauthenticated callers; path normalisation against DENY bypasses.

Policies are built from the config model directly (the parser's output shape: principals
without `spiffe://`), plus the demo's policies loaded from YAML through the Snapshot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config import load_config, load_text
from meshproxy.config.model.common import ObjectMeta
from meshproxy.config.model.policy import (
    AuthorizationPolicy,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
)
from meshproxy.policy.authz import (
    Authorizer,
    Decision,
    compile_patterns,
    namespace_of,
    normalize_path,
)

REPO = Path(__file__).resolve().parents[3]
SCHEDULER = "spiffe://cluster.local/ns/default/sa/scheduler"
DELIVERY = "spiffe://cluster.local/ns/default/sa/delivery"
OPS = "spiffe://cluster.local/ns/ops/sa/debugger"
PROD = "spiffe://cluster.local/ns/prod-eu/sa/api"


# --- building policies ---------------------------------------------------------------------


def src(principals: tuple[str, ...] = (), namespaces: tuple[str, ...] = ()) -> AuthzSource:
    return AuthzSource(principals=principals, namespaces=namespaces)


def op(methods: tuple[str, ...] = (), paths: tuple[str, ...] = ()) -> AuthzOperation:
    return AuthzOperation(methods=methods, paths=paths)


def rule(from_: tuple[AuthzSource, ...] = (), to: tuple[AuthzOperation, ...] = ()) -> AuthzRule:
    return AuthzRule(from_=from_, to=to)


def allow(name: str, *rules: AuthzRule) -> AuthorizationPolicy:
    return AuthorizationPolicy(metadata=ObjectMeta(name), action="ALLOW", rules=rules)


def deny(name: str, *rules: AuthzRule) -> AuthorizationPolicy:
    return AuthorizationPolicy(metadata=ObjectMeta(name), action="DENY", rules=rules)


ALLOW_ALL = allow("allow-all", rule())
DENY_DELETE = deny("deny-delete", rule(to=(op(methods=("DELETE",)),)))
ACCOUNT_CALLERS = allow("account-callers", rule(
    from_=(src(principals=("cluster.local/ns/default/sa/scheduler",)),),
    to=(op(methods=("GET",), paths=("/api/accounts/*",)),)))
OPS_NAMESPACE = allow("ops", rule(from_=(src(namespaces=("ops",)),)))
DENY_ADMIN = deny("deny-admin", rule(to=(op(paths=("/admin", "/admin/*")),)))


# --- the decision table --------------------------------------------------------------------

CASES = [
    # No policy: everything, from anyone.
    ((), None, "DELETE", "/anything", True),
    ((), SCHEDULER, "GET", "/", True),
    # An ALLOW policy without rules matches nothing: it denies all.
    ((allow("empty"),), SCHEDULER, "GET", "/", False),
    ((allow("empty"),), None, "GET", "/", False),
    # `rules: [{}]` matches everything.
    ((ALLOW_ALL,), None, "DELETE", "/x", True),
    ((ALLOW_ALL,), SCHEDULER, "GET", "/", True),
    # A DENY policy without rules denies nothing.
    ((deny("empty"),), None, "GET", "/", True),
    # DENY comes first, whatever the order and whatever ALLOW says.
    ((ALLOW_ALL, DENY_DELETE), SCHEDULER, "DELETE", "/x", False),
    ((DENY_DELETE, ALLOW_ALL), SCHEDULER, "GET", "/x", True),
    ((DENY_DELETE,), None, "GET", "/x", True),
    ((DENY_DELETE,), None, "DELETE", "/x", False),
    # Methods are exact and case-sensitive.
    ((DENY_DELETE,), None, "delete", "/x", True),
    # ALLOW by principal, method and path: all three must hold.
    ((ACCOUNT_CALLERS,), SCHEDULER, "GET", "/api/accounts/7", True),
    ((ACCOUNT_CALLERS,), SCHEDULER, "GET", "/api/accounts/", True),
    ((ACCOUNT_CALLERS,), SCHEDULER, "GET", "/api/accounts", False),
    ((ACCOUNT_CALLERS,), SCHEDULER, "POST", "/api/accounts/7", False),
    ((ACCOUNT_CALLERS,), DELIVERY, "GET", "/api/accounts/7", False),
    ((ACCOUNT_CALLERS,), None, "GET", "/api/accounts/7", False),
    # The principal may come with or without `spiffe://`.
    ((ACCOUNT_CALLERS,), "cluster.local/ns/default/sa/scheduler", "GET", "/api/accounts/7", True),
    # Principals are exact: no partial or case-insensitive match.
    ((ACCOUNT_CALLERS,), "spiffe://cluster.local/ns/default/sa/scheduler2", "GET", "/api/accounts/7",
     False),
    ((ACCOUNT_CALLERS,), "spiffe://cluster.local/ns/default/sa/Scheduler", "GET", "/api/accounts/7",
     False),
    # The query is not part of the path.
    ((ACCOUNT_CALLERS,), SCHEDULER, "GET", "/api/accounts/7?expand=true", True),
    ((allow("exact", rule(to=(op(paths=("/status",)),))),), None, "GET", "/status?x=/y", True),
    # Several ALLOW policies: one is enough.
    ((ACCOUNT_CALLERS, OPS_NAMESPACE), OPS, "DELETE", "/api/accounts/7", True),
    ((ACCOUNT_CALLERS, OPS_NAMESPACE), DELIVERY, "GET", "/api/accounts/7", False),
    ((ACCOUNT_CALLERS, OPS_NAMESPACE, DENY_DELETE), OPS, "DELETE", "/api/accounts/7", False),
    # Namespaces come from the principal's /ns/NS/ segment.
    ((OPS_NAMESPACE,), OPS, "GET", "/", True),
    ((OPS_NAMESPACE,), SCHEDULER, "GET", "/", False),
    ((OPS_NAMESPACE,), None, "GET", "/", False),
    ((OPS_NAMESPACE,), "spiffe://cluster.local/sa/ops", "GET", "/", False),
    ((OPS_NAMESPACE,), "spiffe://cluster.local/x/ns/ops/sa/y", "GET", "/", False),
    ((OPS_NAMESPACE,), "spiffe://ops/ns/default/sa/y", "GET", "/", False),
    # Within a source every field must hold; any source of a rule is enough.
    ((allow("both", rule(from_=(src(principals=("*/sa/debugger",), namespaces=("default",)),))),),
     OPS, "GET", "/", False),
    ((allow("either", rule(from_=(src(principals=("*/sa/debugger",)), src(namespaces=("default",))))),),
     OPS, "GET", "/", True),
    ((allow("either", rule(from_=(src(principals=("*/sa/debugger",)), src(namespaces=("default",))))),),
     SCHEDULER, "GET", "/", True),
    ((allow("either", rule(from_=(src(principals=("*/sa/debugger",)), src(namespaces=("default",))))),),
     PROD, "GET", "/", False),
    # Within an operation every field must hold; any operation of a rule is enough.
    ((allow("ops", rule(to=(op(methods=("GET",), paths=("/a",)), op(methods=("POST",), paths=("/b",))))),),
     None, "POST", "/a", False),
    ((allow("ops", rule(to=(op(methods=("GET",), paths=("/a",)), op(methods=("POST",), paths=("/b",))))),),
     None, "POST", "/b", True),
    # Rules of one policy: any one is enough.
    ((allow("rules", rule(to=(op(paths=("/a",)),)), rule(from_=(src(namespaces=("ops",)),))),),
     OPS, "GET", "/z", True),
    ((allow("rules", rule(to=(op(paths=("/a",)),)), rule(from_=(src(namespaces=("ops",)),))),),
     None, "GET", "/a", True),
    ((allow("rules", rule(to=(op(paths=("/a",)),)), rule(from_=(src(namespaces=("ops",)),))),),
     None, "GET", "/z", False),
]


@pytest.mark.parametrize(("policies", "principal", "method", "path", "allowed"), CASES)
def test_decision_table(policies, principal, method, path, allowed) -> None:
    assert Authorizer(policies).check(principal, method, path).allowed is allowed


# --- reasons --------------------------------------------------------------------------------


def test_reasons_name_the_deciding_policy() -> None:
    authz = Authorizer([ACCOUNT_CALLERS, DENY_DELETE])
    assert authz.check(SCHEDULER, "DELETE", "/x") == Decision(False, "denied by default/deny-delete")
    assert authz.check(SCHEDULER, "GET", "/api/accounts/1") == Decision(
        True, "allowed by default/account-callers")
    assert authz.check(DELIVERY, "GET", "/api/accounts/1") == Decision(False, "no ALLOW policy matched")
    assert Authorizer([]).check(None, "GET", "/") == Decision(True, "no policy")
    assert Authorizer([DENY_DELETE]).check(None, "GET", "/") == Decision(True, "no DENY policy matched")


def test_the_first_matching_policy_in_order_gives_the_reason() -> None:
    other = deny("deny-all", rule())
    first = Authorizer([DENY_DELETE, other]).check(None, "DELETE", "/")
    assert first.reason == "denied by default/deny-delete"
    assert Authorizer([other, DENY_DELETE]).check(None, "DELETE", "/").reason == "denied by default/deny-all"
    named = AuthorizationPolicy(metadata=ObjectMeta("p", "shop"), action="DENY", rules=(rule(),))
    assert Authorizer([named]).check(None, "GET", "/").reason == "denied by shop/p"


def test_open_only_without_policies() -> None:
    assert Authorizer([]).open
    assert not Authorizer([DENY_DELETE]).open
    assert not Authorizer([allow("empty")]).open


# --- wildcards ------------------------------------------------------------------------------


@pytest.mark.parametrize(("patterns", "value", "matches"), [
    (("*",), "anything", True),
    (("*",), None, False),
    (("GET",), "GET", True),
    (("GET",), "get", False),
    (("GET",), "GETX", False),
    (("/api/*",), "/api/", True),
    (("/api/*",), "/api/x/y", True),
    (("/api/*",), "/api", False),
    (("/api*",), "/api", True),
    (("/api*",), "/apix", True),
    (("*.json",), "/a/b.json", True),
    (("*.json",), ".json", True),
    (("*.json",), "/a/b.jsonx", False),
    (("/a", "/b/*", "*.c"), "/b/1", True),
    (("/a", "/b/*", "*.c"), "/x.c", True),
    (("/a", "/b/*", "*.c"), "/a", True),
    (("/a", "/b/*", "*.c"), "/a/", False),
    (("/a", "/b/*", "*.c"), None, False),
    (("/a",), None, False),
])
def test_patterns(patterns, value, matches) -> None:
    matcher = compile_patterns(patterns)
    assert matcher is not None and matcher(value) is matches


def test_empty_field_matches_all() -> None:
    assert compile_patterns(()) is None


@pytest.mark.parametrize(("principals", "principal", "allowed"), [
    (("*",), SCHEDULER, True),
    (("*",), "spiffe://other.domain/ns/x/sa/y", True),
    (("*",), None, False),
    (("*",), "", False),
    (("cluster.local/ns/default/*",), SCHEDULER, True),
    (("cluster.local/ns/default/*",), OPS, False),
    (("*/sa/scheduler",), SCHEDULER, True),
    (("*/sa/scheduler",), "spiffe://elsewhere/ns/x/sa/scheduler", True),
    (("*/sa/scheduler",), DELIVERY, False),
    (("*/sa/scheduler",), None, False),
    # A pattern written with the scheme (the parser strips it; a hand-built one too).
    (("spiffe://cluster.local/ns/default/sa/scheduler",), SCHEDULER, True),
])
def test_principal_patterns(principals, principal, allowed) -> None:
    policy = allow("p", rule(from_=(src(principals=principals),)))
    assert Authorizer([policy]).check(principal, "GET", "/").allowed is allowed


@pytest.mark.parametrize(("namespaces", "principal", "allowed"), [
    (("*",), SCHEDULER, True),
    (("*",), None, False),
    (("*",), "spiffe://cluster.local/sa/x", False),
    (("prod-*",), PROD, True),
    (("prod-*",), OPS, False),
    (("*-eu",), PROD, True),
    (("*-eu",), SCHEDULER, False),
    (("default", "ops"), OPS, True),
])
def test_namespace_patterns(namespaces, principal, allowed) -> None:
    policy = allow("n", rule(from_=(src(namespaces=namespaces),)))
    assert Authorizer([policy]).check(principal, "GET", "/").allowed is allowed


@pytest.mark.parametrize(("principal", "namespace"), [
    (SCHEDULER, "default"),
    ("cluster.local/ns/ops/sa/x", "ops"),
    ("spiffe://td/ns/a", "a"),
    ("spiffe://td/ns//sa/x", None),
    ("spiffe://td/sa/x", None),
    ("spiffe://td", None),
    ("", None),
    (None, None),
])
def test_namespace_of(principal, namespace) -> None:
    assert namespace_of(principal) == namespace


def test_method_and_path_wildcards() -> None:
    authz = Authorizer([allow("w", rule(to=(op(methods=("*",), paths=("*.json",)),)))])
    assert authz.check(None, "PATCH", "/a/b.json").allowed
    assert not authz.check(None, "PATCH", "/a/b.html").allowed
    everything = Authorizer([allow("any", rule(to=(op(paths=("*",)),)))])
    assert everything.check(None, "GET", "/").allowed
    assert everything.check(None, "OPTIONS", "*").allowed


# --- unauthenticated callers ----------------------------------------------------------------


def test_unauthenticated_callers() -> None:
    # ALLOW by operation only: plaintext callers are let in.
    assert Authorizer([allow("public", rule(to=(op(paths=("/public/*",)),)))]).check(
        None, "GET", "/public/x").allowed
    # Any principal pattern (even `*`) or namespace excludes them from an ALLOW rule ...
    assert not Authorizer([allow("authn", rule(from_=(src(principals=("*",)),)))]).check(
        None, "GET", "/").allowed
    # ... and a DENY rule on principals does not catch them (Istio: deny plaintext with a
    # rule that does not name principals, or an ALLOW rule that requires one).
    deny_any_principal = deny("d", rule(from_=(src(principals=("*",)),), to=(op(paths=("/x",)),)))
    assert Authorizer([deny_any_principal]).check(None, "GET", "/x").allowed
    assert not Authorizer([deny_any_principal]).check(SCHEDULER, "GET", "/x").allowed


# --- path normalisation and DENY bypasses ---------------------------------------------------

BYPASS_ATTEMPTS = [
    "/admin",
    "/admin?x=1",
    "/admin#frag",
    "/%61dmin",
    "/%61%64%6D%69%6E",
    "/%61%64%6d%69%6e",
    "/x/../admin",
    "/x/%2e%2e/admin",
    "/x/%2E%2E/admin",
    "/x/.%2e/admin",
    "/./admin",
    "/%2E/admin",
    "//admin",
    "///admin",
    "/x//../admin",
    "/../admin",
    "/../../admin",
    "/a/b/../../admin",
    "/admin/.",
    "/admin/x/..",
    "admin",
    "/admin/secret",
    "/admin//secret",
    "/admin/./secret",
    "/admin/public/../secret",
    "/public/../admin/secret",
    "/public/%2e%2e/admin/secret",
    "/%61dmin/secret?q=/public",
]


@pytest.mark.parametrize("path", BYPASS_ATTEMPTS)
def test_deny_is_not_bypassed_by_encoding_or_dot_segments(path: str) -> None:
    authz = Authorizer([DENY_ADMIN, ALLOW_ALL])
    assert authz.check(SCHEDULER, "GET", path) == Decision(False, "denied by default/deny-admin")


@pytest.mark.parametrize("path", BYPASS_ATTEMPTS)
def test_allow_list_matches_the_same_normal_form(path: str) -> None:
    only_admin = Authorizer([allow("admins", rule(to=(op(paths=("/admin", "/admin/*")),)))])
    assert only_admin.check(None, "GET", path).allowed


@pytest.mark.parametrize("path", [
    "/administrator",
    "/ADMIN",  # paths are case-sensitive (RFC 3986 §6.2.2.1 only folds scheme, host, hex)
    "/adm%69n.html",
    "/public/admin",
    "/admin/../public",
    "/%2Fadmin",  # an encoded slash is data within a segment, not a delimiter: kept
    "/admin%2Fsecret",
    "/x/%252e%252e/admin",  # decoded once only, as the app decodes it
])
def test_other_paths_are_not_denied(path: str) -> None:
    assert Authorizer([DENY_ADMIN, ALLOW_ALL]).check(None, "GET", path).allowed


@pytest.mark.parametrize(("raw", "normal"), [
    ("/", "/"),
    ("", "/"),
    ("?x", "/"),
    ("*", "*"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/a?b/../c", "/a"),
    ("/a#b", "/a"),
    ("/%7Euser", "/~user"),
    ("/%7euser", "/~user"),
    ("/%41%5A%61%7A%30%39%2D%2E%5F%7E", "/AZaz09-._~"),
    ("/a%2fb", "/a%2Fb"),
    ("/a%2Fb", "/a%2Fb"),
    ("/a%5cb", "/a%5Cb"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/100%", "/100%"),
    ("/%zz/%4", "/%zz/%4"),
    ("/%2525", "/%2525"),
    ("/a/./b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a/b/../c", "/a/c"),
    ("/a/..", "/"),
    ("/..", "/"),
    ("/.", "/"),
    ("/a/.b/..c/...", "/a/.b/..c/..."),
    ("/.well-known/x", "/.well-known/x"),
    ("//a//b//", "/a/b/"),
    ("/a//../b", "/b"),
    ("a/b", "/a/b"),
    ("../a", "/a"),
])
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


def test_policy_paths_are_percent_normalised() -> None:
    authz = Authorizer([deny("enc", rule(to=(op(paths=("/%7euser/*",)),))), ALLOW_ALL])
    assert not authz.check(None, "GET", "/~user/x").allowed
    assert not authz.check(None, "GET", "/%7Euser/x").allowed


# --- the demo's policies, from YAML ---------------------------------------------------------


def test_demo_account_policy() -> None:
    snapshot = load_config([str(REPO / "config" / "demo")])
    authz = Authorizer(snapshot.authorization_policies_for("account.default"))
    assert authz.check(SCHEDULER, "GET", "/api/accounts/42").allowed
    assert not authz.check(DELIVERY, "GET", "/api/accounts/42").allowed
    assert not authz.check(None, "GET", "/api/accounts/42").allowed
    assert not authz.check(SCHEDULER, "DELETE", "/api/accounts/42").allowed
    assert Authorizer(snapshot.authorization_policies_for("delivery.default")).open


def test_yaml_principals_with_scheme_and_wildcards() -> None:
    snapshot = load_text("""
apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-delete, namespace: default}
spec:
  action: DENY
  rules:
    - from: [{source: {principals: ["spiffe://cluster.local/ns/default/*"]}}]
      to: [{operation: {methods: [DELETE]}}]
---
apiVersion: meshproxy.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: everyone, namespace: default}
spec:
  rules: [{}]
""", "authz.yaml")
    authz = Authorizer(snapshot.authorization_policies_for("svc.default"))
    assert authz.check(SCHEDULER, "DELETE", "/x") == Decision(False, "denied by default/deny-delete")
    assert authz.check(OPS, "DELETE", "/x") == Decision(True, "allowed by default/everyone")
    assert authz.check(None, "DELETE", "/x").allowed


# --- properties -----------------------------------------------------------------------------

NAMESPACES = ("default", "ops", "prod-eu")
ACCOUNTS = ("scheduler", "delivery", "admin")
PRINCIPALS = [None] + [f"spiffe://cluster.local/ns/{n}/sa/{a}" for n in NAMESPACES for a in ACCOUNTS]
METHODS = ("GET", "POST", "DELETE")
PATHS = ("/", "/admin", "/admin/x", "/api/a.json", "/%61dmin", "/x/../admin", "//api/a.json?q")


def patterns(values: tuple[str, ...]) -> st.SearchStrategy[tuple[str, ...]]:
    """A field's patterns: empty (matches all) or some of `values` and wildcard forms."""
    candidates = list(values) + ["*"] + [v[:3] + "*" for v in values] + ["*" + v[-3:] for v in values]
    return st.lists(st.sampled_from(candidates), max_size=2).map(tuple)


sources = st.builds(
    AuthzSource,
    principals=patterns(tuple(f"cluster.local/ns/{n}/sa/{a}" for n in NAMESPACES for a in ACCOUNTS)),
    namespaces=patterns(NAMESPACES),
)
operations = st.builds(AuthzOperation, methods=patterns(METHODS),
                       paths=patterns(("/admin", "/admin/", "/api/a.json", "/")))
rules = st.builds(AuthzRule, from_=st.lists(sources, max_size=2).map(tuple),
                  to=st.lists(operations, max_size=2).map(tuple))


def policies_of(action: str) -> st.SearchStrategy[AuthorizationPolicy]:
    return st.builds(
        AuthorizationPolicy,
        metadata=st.sampled_from(["a", "b", "c"]).map(ObjectMeta),
        action=st.just(action),
        rules=st.lists(rules, max_size=3).map(tuple),
    )


any_policies = st.lists(st.one_of(policies_of("ALLOW"), policies_of("DENY")), max_size=4)
requests = st.tuples(st.sampled_from(PRINCIPALS), st.sampled_from(METHODS), st.sampled_from(PATHS))


def reference(policies, principal, method, path) -> bool:
    """The semantics written out plainly, without compiled matchers or fast paths."""

    def pattern_match(pattern: str, value: str | None) -> bool:
        if value is None:
            return False
        if pattern == "*":
            return True
        if pattern.endswith("*"):
            return value.startswith(pattern[:-1])
        if pattern.startswith("*"):
            return value.endswith(pattern[1:])
        return value == pattern

    def field(patterns, value) -> bool:
        return not patterns or any(pattern_match(p, value) for p in patterns)

    bare = principal.removeprefix("spiffe://") if principal else None
    namespace = bare.split("/")[2] if bare else None
    path = normalize_path(path)

    def matches(policy) -> bool:
        return any(
            (not r.from_ or any(field(s.principals, bare) and field(s.namespaces, namespace)
                                for s in r.from_))
            and (not r.to or any(field(o.methods, method) and field(o.paths, path) for o in r.to))
            for r in policy.rules)

    if any(matches(p) for p in policies if p.action == "DENY"):
        return False
    allows = [p for p in policies if p.action == "ALLOW"]
    return not allows or any(matches(p) for p in allows)


@settings(max_examples=250, deadline=None)
@given(any_policies, requests)
def test_agrees_with_the_plain_reference(policies, request) -> None:
    assert Authorizer(policies).check(*request).allowed is reference(policies, *request)


@settings(max_examples=150, deadline=None)
@given(any_policies, policies_of("DENY"), requests)
def test_adding_a_deny_policy_never_allows_more(policies, extra, request) -> None:
    before = Authorizer(policies).check(*request).allowed
    for position in range(len(policies) + 1):
        with_deny = [*policies[:position], extra, *policies[position:]]
        after = Authorizer(with_deny).check(*request).allowed
        assert after <= before  # denied stays denied


@settings(max_examples=150, deadline=None)
@given(st.lists(policies_of("DENY"), max_size=4), requests)
def test_allow_all_added_to_deny_only_policies_changes_nothing(denies, request) -> None:
    before = Authorizer(denies).check(*request).allowed
    assert Authorizer([*denies, ALLOW_ALL]).check(*request).allowed is before
    assert Authorizer([ALLOW_ALL, *denies]).check(*request).allowed is before


path_segments = st.lists(st.sampled_from(["a", "b", "admin", "x.y", "~u", "-"]), max_size=4)


@st.composite
def disguised(draw) -> tuple[str, str]:
    """A normal path and a disguise of it: unreserved characters percent-encoded (either
    case), detours through `x/..`, `.` segments and doubled slashes."""
    segments = draw(path_segments)
    normal = "/" + "/".join(segments)
    out = []
    for segment in segments:
        for _ in range(draw(st.integers(0, 2))):
            out.append(draw(st.sampled_from([".", "%2e", "z/..", "z/%2E%2E", "z/.%2e", ""])))
        chars = []
        for ch in segment:
            if draw(st.booleans()):
                code = f"{ord(ch):02X}"
                chars.append("%" + (code if draw(st.booleans()) else code.lower()))
            else:
                chars.append(ch)
        out.append("".join(chars))
    return normal, "/" + "/".join(out) + draw(st.sampled_from(["", "?q=/../a", "#f"]))


@settings(max_examples=200, deadline=None)
@given(disguised())
def test_disguised_paths_normalise_to_the_path(pair) -> None:
    normal, disguise = pair
    assert normalize_path(disguise) == normal
    exact = Authorizer([deny("exact", rule(to=(op(paths=(normal,)),)))])
    assert not exact.check(None, "GET", disguise).allowed


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="/.%2eEaF5c?#~x", max_size=20))
def test_normal_form_is_stable(raw: str) -> None:
    normal = normalize_path(raw)
    assert normalize_path(normal) == normal
    if normal != "*":
        assert normal.startswith("/")
        assert "//" not in normal
        segments = normal.split("/")
        assert "." not in segments and ".." not in segments
        assert "?" not in normal and "#" not in normal
