"""HTTPRoute filters as pure functions (spec §3 `HTTPRoute`): header modifiers, path rewrites
(ReplaceFullPath, ReplacePrefixMatch) and the Location of a RequestRedirect.

The expected values are the Gateway API's own examples where it gives them (the
ReplacePrefixMatch table of HTTPPathModifier, the redirect port rules of HTTPRequestRedirectFilter).
"""

from __future__ import annotations

import itertools

import pytest

from meshproxy.config.model.route import HeaderModifier, HTTPHeader, PathModifier, RequestRedirect
from meshproxy.policy.filters import (
    modify_headers,
    redirect_location,
    replace_path,
    rewrite_target,
)


def modifier(set=(), add=(), remove=()) -> HeaderModifier:
    return HeaderModifier(
        set=tuple(HTTPHeader(n, v) for n, v in set),
        add=tuple(HTTPHeader(n, v) for n, v in add),
        remove=tuple(remove),
    )


def full(path: str) -> PathModifier:
    return PathModifier("ReplaceFullPath", replace_full_path=path)


def prefix(replacement: str | None) -> PathModifier:
    return PathModifier("ReplacePrefixMatch", replace_prefix_match=replacement)


def values(fields: list, name: bytes) -> list[bytes]:
    return [v for k, v in fields if k.lower() == name]


REQUEST = [(b"Host", b"web"), (b"X-Keep", b"1"), (b"x-multi", b"a"), (b"X-Multi", b"b"),
           (b"Accept", b"*/*")]


# --- modify_headers -----------------------------------------------------------------------


def test_no_modifier_changes_nothing_and_leaves_the_input_alone():
    fields = list(REQUEST)
    assert modify_headers(fields, modifier()) == REQUEST
    out = modify_headers(fields, modifier(set=[("x-new", "1")], remove=["accept"]))
    assert fields == REQUEST  # a new list: the caller's is not changed in place
    assert out != REQUEST


def test_set_replaces_every_field_of_that_name_with_one_whatever_the_case():
    out = modify_headers(REQUEST, modifier(set=[("X-MULTI", "set")]))
    assert values(out, b"x-multi") == [b"set"]
    assert (b"X-MULTI", b"set") in out  # written as configured
    assert values(out, b"x-keep") == [b"1"] and values(out, b"host") == [b"web"]


def test_set_adds_the_field_when_absent():
    out = modify_headers(REQUEST, modifier(set=[("x-route", "deliveries")]))
    assert out == REQUEST + [(b"x-route", b"deliveries")]


def test_add_appends_a_field_and_keeps_the_existing_ones():
    out = modify_headers(REQUEST, modifier(add=[("x-multi", "c"), ("x-fresh", "1")]))
    assert values(out, b"x-multi") == [b"a", b"b", b"c"]
    assert values(out, b"x-fresh") == [b"1"]
    assert out[: len(REQUEST)] == REQUEST


def test_remove_drops_every_field_of_that_name_case_insensitively():
    out = modify_headers(REQUEST, modifier(remove=["X-multi", "ACCEPT", "absent"]))
    assert out == [(b"Host", b"web"), (b"X-Keep", b"1")]


def test_set_add_and_remove_together():
    # The Gateway API conformance case: set overwrites, add appends, remove drops.
    fields = [(b"X-Header-Remove", b"remove-val"), (b"X-Header-Add-Append", b"append-val-1"),
              (b"X-Header-Set", b"set-val")]
    out = modify_headers(fields, modifier(
        set=[("X-Header-Set", "set-overwrites-values")],
        add=[("X-Header-Add", "header-val-1"), ("X-Header-Add-Append", "header-val-2")],
        remove=["X-Header-Remove"]))
    assert values(out, b"x-header-remove") == []
    assert values(out, b"x-header-set") == [b"set-overwrites-values"]
    assert values(out, b"x-header-add") == [b"header-val-1"]
    assert values(out, b"x-header-add-append") == [b"append-val-1", b"header-val-2"]


def test_set_twice_keeps_the_last_and_add_after_set_appends():
    out = modify_headers([], modifier(set=[("x-a", "1"), ("X-A", "2")], add=[("x-a", "3")]))
    assert values(out, b"x-a") == [b"2", b"3"]


def test_values_outside_latin_1_are_sent_as_utf_8():
    out = modify_headers([], modifier(set=[("x-city", "Zürich"), ("x-name", "東京")]))
    assert values(out, b"x-city") == ["Zürich".encode()]
    assert values(out, b"x-name") == ["東京".encode()]


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Connection",
                                  "keep-alive", "TE", "Trailer", "Upgrade", "proxy-connection"])
def test_framing_and_hop_by_hop_fields_are_never_set_or_added(name):
    # The proxy writes framing and connection fields itself for each hop: a modifier that
    # added a second Content-Length or a Transfer-Encoding would make the message ambiguous.
    out = modify_headers(REQUEST, modifier(set=[(name, "5")], add=[(name, "7")]))
    assert out == REQUEST


# --- replace_path ---------------------------------------------------------------------------


@pytest.mark.parametrize("path, matched, replacement, expected", [
    # The Gateway API's HTTPPathModifier table.
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "/", "/bar"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/foo/bar", "/foo", None, "/bar"),  # no replacement written: the prefix is taken away
    ("/foo", "/foo", None, "/"),
    # More segments on both sides.
    ("/foo/bar/baz", "/foo/bar", "/x/y", "/x/y/baz"),
    ("/api/v1/users/7", "/api/v1", "/v2", "/v2/users/7"),
    ("/foo//bar", "/foo", "/xyz", "/xyz//bar"),  # paths are taken as received
    # The root prefix: everything after it is kept.
    ("/x", "/", "/bar", "/bar/x"),
    ("/x/y", "/", "/bar/", "/bar/x/y"),
    ("/x", "/", "/", "/x"),
    ("/", "/", "/", "/"),
])
def test_replace_prefix_match(path, matched, replacement, expected):
    assert replace_path(path, prefix(replacement), matched) == expected


def test_replace_prefix_match_without_a_prefix_match_leaves_the_path():
    # Only a PathPrefix match has a prefix to replace (config validation refuses the rest).
    assert replace_path("/foo/bar", prefix("/xyz"), None) == "/foo/bar"


@pytest.mark.parametrize("path, matched", [("/anything", None), ("/foo/bar", "/foo"), ("/", "/")])
@pytest.mark.parametrize("replacement", ["/one", "/", "/a/b/"])
def test_replace_full_path_ignores_the_request_path(path, matched, replacement):
    assert replace_path(path, full(replacement), matched) == replacement


@pytest.mark.parametrize("target, modifier_, matched, expected", [
    (b"/foo/bar?x=1&y=2", prefix("/xyz"), "/foo", b"/xyz/bar?x=1&y=2"),
    (b"/foo?", prefix("/xyz"), "/foo", b"/xyz?"),
    (b"/foo/bar?next=/foo/baz", prefix("/xyz"), "/foo", b"/xyz/bar?next=/foo/baz"),
    (b"/old/a?q=%2F", full("/new"), "/old", b"/new?q=%2F"),
    (b"/old/a", full("/new"), None, b"/new"),
])
def test_rewrite_target_keeps_the_query(target, modifier_, matched, expected):
    assert rewrite_target(target, modifier_, matched) == expected


# --- redirect_location -----------------------------------------------------------------------

DEFAULT_PORT = {"http": 80, "https": 443}


def expected_location(scheme, hostname, port, path, service_port, host, target, matched):
    """The Gateway API's rules, written out one by one."""
    out_scheme = scheme or "http"  # the request's scheme: plaintext inside the mesh
    out_host = hostname or host.rsplit(":", 1)[0]
    if port is not None:
        out_port = port
    elif scheme is not None:
        out_port = DEFAULT_PORT[scheme]  # the well-known port of the scheme written
    else:
        out_port = service_port  # the Service's port stands in for the listener's
    request_path, _, query = target.partition("?")
    if path is None:
        out_path = request_path
    elif path.type == "ReplaceFullPath":
        out_path = path.replace_full_path
    else:
        rest = request_path[len(matched):]
        out_path = path.replace_prefix_match.rstrip("/") + rest or "/"
    authority = out_host if out_port == DEFAULT_PORT[out_scheme] else f"{out_host}:{out_port}"
    return f"{out_scheme}://{authority}{out_path}" + (f"?{query}" if query else "")


@pytest.mark.parametrize(
    "scheme, hostname, port, path, service_port",
    list(itertools.product(
        [None, "http", "https"],
        [None, "other.example"],
        [None, 80, 443, 8080],
        [None, full("/new"), prefix("/moved"), prefix("/")],
        [80, 443, 8080],
    )),
)
@pytest.mark.parametrize("host", ["web", "web:8080"])
def test_redirect_location_every_combination(scheme, hostname, port, path, service_port, host):
    redirect = RequestRedirect(scheme=scheme, hostname=hostname, path=path, port=port)
    target = "/old/page?a=1"
    got = redirect_location(redirect, host, service_port, target.encode(), "/old")
    assert got == expected_location(scheme, hostname, port, path, service_port, host, target,
                                    "/old")


@pytest.mark.parametrize("redirect, host, service_port, target, expected", [
    (RequestRedirect(), "web", 80, b"/a?b=c", "http://web/a?b=c"),
    (RequestRedirect(), "web:80", 80, b"/a", "http://web/a"),
    (RequestRedirect(), "web", 8080, b"/a", "http://web:8080/a"),
    (RequestRedirect(), "web:8080", 8080, b"/a", "http://web:8080/a"),
    (RequestRedirect(), "web", 443, b"/a", "http://web:443/a"),
    (RequestRedirect(scheme="https"), "web", 8080, b"/a", "https://web/a"),
    (RequestRedirect(scheme="https"), "web:80", 80, b"/", "https://web/"),
    (RequestRedirect(scheme="http"), "web", 8080, b"/a", "http://web/a"),
    (RequestRedirect(scheme="https", port=443), "web", 80, b"/a", "https://web/a"),
    (RequestRedirect(scheme="https", port=80), "web", 80, b"/a", "https://web:80/a"),
    (RequestRedirect(scheme="https", port=8443), "web", 80, b"/a", "https://web:8443/a"),
    (RequestRedirect(port=80), "web", 8080, b"/a", "http://web/a"),
    (RequestRedirect(port=443), "web", 80, b"/a", "http://web:443/a"),
    (RequestRedirect(hostname="example.com"), "web:8080", 8080, b"/a",
     "http://example.com:8080/a"),
    (RequestRedirect(scheme="https", hostname="example.com", port=8443, path=prefix("/")),
     "web", 80, b"/old/x?y=1", "https://example.com:8443/x?y=1"),
    (RequestRedirect(path=full("/")), "web", 80, b"/old/x?y=1", "http://web/?y=1"),
    (RequestRedirect(path=prefix("/new/")), "web", 80, b"/old", "http://web/new"),
    (RequestRedirect(path=prefix("/new")), "web", 80, b"/old/", "http://web/new/"),
    # IPv6 hosts keep their brackets; the port after them goes.
    (RequestRedirect(), "[::1]:8080", 8080, b"/a", "http://[::1]:8080/a"),
    (RequestRedirect(), "[::1]", 80, b"/a", "http://[::1]/a"),
    (RequestRedirect(scheme="https"), "[2001:db8::1]:80", 80, b"/a", "https://[2001:db8::1]/a"),
])
def test_redirect_location_examples(redirect, host, service_port, target, expected):
    assert redirect_location(redirect, host, service_port, target, "/old") == expected


def test_redirect_status_code_defaults_to_302():
    assert RequestRedirect().status_code == 302
