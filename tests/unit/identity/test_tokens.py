"""Bootstrap tokens: one per identity, in private files, checked in constant time; and the
mapping of ServiceAccount usernames to SPIFFE IDs that the TokenReview path uses."""

from __future__ import annotations

import hmac
import os
import stat

import pytest

from meshproxy.identity import tokens as tokens_module
from meshproxy.identity.spiffe import IdentityError
from meshproxy.identity.tokens import BootstrapTokens, service_account_id


def counter_bytes():
    """A random source that gives 0x01.., 0x02.., ... so tokens are predictable in tests."""
    state = {"n": 0}

    def random_bytes(n: int) -> bytes:
        state["n"] += 1
        return bytes([state["n"]]) * n

    return random_bytes


def test_a_token_file_is_0600_in_a_0700_folder_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = BootstrapTokens(tmp_path / "state" / "tokens", "cluster.local").issue("default", "web")
    finally:
        os.umask(old)
    assert path == tmp_path / "state" / "tokens" / "default.web.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_token_proves_its_identity_and_nothing_else_does(tmp_path):
    tokens = BootstrapTokens(tmp_path, "cluster.local")
    web = tokens.issue("default", "web").read_text()
    api = tokens.issue("shop", "api").read_text()
    assert len(web) == 64 and web != api
    assert tokens.check(web) == "spiffe://cluster.local/ns/default/sa/web"
    assert tokens.check(api) == "spiffe://cluster.local/ns/shop/sa/api"
    for wrong in ("", web[:-1], web + "0", web.upper(), " " + web, api[:32] + web[32:]):
        assert tokens.check(wrong) is None, wrong


async def test_verify_is_check_for_the_certificate_endpoint(tmp_path):
    tokens = BootstrapTokens(tmp_path, "cluster.local")
    web = tokens.issue("default", "web").read_text()
    assert await tokens.verify(web) == "spiffe://cluster.local/ns/default/sa/web"
    assert await tokens.verify("nope") is None


def test_tokens_come_from_the_random_source_given(tmp_path):
    tokens = BootstrapTokens(tmp_path, "cluster.local", random_bytes=counter_bytes())
    assert tokens.issue("default", "web").read_text() == "01" * 32
    assert tokens.issue("default", "api").read_text() == "02" * 32


def test_instances_of_one_service_share_its_token(tmp_path):
    tokens = BootstrapTokens(tmp_path, "cluster.local", random_bytes=counter_bytes())
    first = tokens.issue("default", "web").read_text()
    assert tokens.issue("default", "web").read_text() == first
    assert tokens.identities() == ["spiffe://cluster.local/ns/default/sa/web"]


def test_another_process_loads_the_tokens_from_the_folder(tmp_path):
    writer = BootstrapTokens(tmp_path, "cluster.local")
    web = writer.issue("default", "web").read_text()
    api = writer.issue("default", "api.v2").read_text()
    reader = BootstrapTokens.load(tmp_path, "cluster.local")
    assert reader.identities() == ["spiffe://cluster.local/ns/default/sa/api.v2",
                                   "spiffe://cluster.local/ns/default/sa/web"]
    assert reader.check(web) == "spiffe://cluster.local/ns/default/sa/web"
    assert reader.check(api) == "spiffe://cluster.local/ns/default/sa/api.v2"
    assert reader.check("0" * 64) is None


def test_a_badly_named_token_file_is_refused_on_load(tmp_path):
    (tmp_path / "web.token").write_text("abc")
    with pytest.raises(IdentityError, match="NAMESPACE.SERVICE.token"):
        BootstrapTokens.load(tmp_path, "cluster.local")


def test_an_empty_token_file_proves_nothing(tmp_path):
    (tmp_path / "default.web.token").write_text("")
    assert BootstrapTokens.load(tmp_path, "cluster.local").check("") is None


def test_names_a_spiffe_id_cannot_hold_are_refused(tmp_path):
    with pytest.raises(IdentityError):
        BootstrapTokens(tmp_path, "cluster.local").issue("default", "we/b")
    assert not list(tmp_path.iterdir())


def test_every_token_is_compared_whichever_matches(tmp_path, monkeypatch):
    """Constant time: the work done does not depend on which token (if any) matches, so the
    time taken tells an attacker nothing about how close a guess was."""
    tokens = BootstrapTokens(tmp_path, "cluster.local")
    presented = [tokens.issue("default", name).read_text() for name in ("a", "b", "c", "d")]
    calls = []
    real = hmac.compare_digest

    def compare_digest(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", compare_digest)
    for token in presented + ["wrong", "x" * 1000, ""]:
        calls.clear()
        tokens.check(token)
        # Four comparisons every time, of fixed-length digests whatever the token's length.
        assert calls == [(32, 32)] * 4


@pytest.mark.parametrize("username, expected", [
    ("system:serviceaccount:default:scheduler", "spiffe://cluster.local/ns/default/sa/scheduler"),
    ("system:serviceaccount:drone-delivery:api.reader", "spiffe://cluster.local/ns/drone-delivery/sa/api.reader"),
    ("kubernetes-admin", None),
    ("system:node:worker-1", None),
    ("system:serviceaccount:default", None),
    ("system:serviceaccount::scheduler", None),
    ("system:serviceaccount:default:", None),
    ("system:serviceaccount:default:a:b", None),
    ("", None),
])
def test_serviceaccount_usernames_map_to_spiffe_ids(username, expected):
    assert service_account_id("cluster.local", username) == expected
