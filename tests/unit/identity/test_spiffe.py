"""SPIFFE IDs: made from their parts, parsed back, and anything malformed refused."""

from __future__ import annotations

import pytest

from meshproxy.identity.spiffe import IdentityError, parse_spiffe_id, spiffe_id, trust_domain_id


def test_an_id_is_made_and_parsed_back():
    uri = spiffe_id("cluster.local", "default", "scheduler")
    assert uri == "spiffe://cluster.local/ns/default/sa/scheduler"
    assert parse_spiffe_id(uri) == ("cluster.local", "default", "scheduler")


def test_service_accounts_may_hold_dots_dashes_and_underscores():
    uri = spiffe_id("mesh-1.example_org", "drone-delivery", "api.v2_reader")
    assert parse_spiffe_id(uri) == ("mesh-1.example_org", "drone-delivery", "api.v2_reader")


def test_the_trust_domain_id_has_no_path():
    assert trust_domain_id("cluster.local") == "spiffe://cluster.local"


@pytest.mark.parametrize("uri", [
    "",
    "cluster.local/ns/default/sa/web",  # no scheme
    "SPIFFE://cluster.local/ns/default/sa/web",  # the scheme is lowercase
    "https://cluster.local/ns/default/sa/web",
    "spiffe://",
    "spiffe://cluster.local",  # a trust domain, not a workload
    "spiffe://cluster.local/",
    "spiffe://Cluster.Local/ns/default/sa/web",  # trust domains are lowercase
    "spiffe://cluster.local:8443/ns/default/sa/web",  # no port
    "spiffe://user@cluster.local/ns/default/sa/web",  # no userinfo
    "spiffe://cluster.local/ns/default/sa/",
    "spiffe://cluster.local/ns//sa/web",
    "spiffe://cluster.local/ns/default/sa/web/",
    "spiffe://cluster.local/ns/default/sa/web/extra",
    "spiffe://cluster.local/namespace/default/sa/web",
    "spiffe://cluster.local/ns/default/serviceaccount/web",
    "spiffe://cluster.local/ns/../sa/web",
    "spiffe://cluster.local/ns/default/sa/.",
    "spiffe://cluster.local/ns/default/sa/we b",
    "spiffe://cluster.local/ns/default/sa/web?x=1",
    "spiffe://cluster.local/ns/default/sa/web#frag",
    "spiffe://cluster.local/ns/dé/sa/web",
])
def test_malformed_ids_are_refused_with_the_id_named(uri):
    with pytest.raises(IdentityError, match="SPIFFE ID"):
        parse_spiffe_id(uri)


def test_a_non_string_is_refused():
    with pytest.raises(IdentityError):
        parse_spiffe_id(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("parts", [
    ("", "default", "web"),
    ("Cluster.local", "default", "web"),
    ("cluster.local", "", "web"),
    ("cluster.local", "default", ""),
    ("cluster.local", "a/b", "web"),
    ("cluster.local", "default", ".."),
    ("cluster.local", "default", "web:8080"),
])
def test_parts_a_spiffe_id_cannot_hold_are_refused(parts):
    with pytest.raises(IdentityError, match="invalid"):
        spiffe_id(*parts)
