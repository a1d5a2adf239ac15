"""The time side of a request's Attempts, through the real Exchange on virtual time: per-try and
request timeouts fire at exactly their configured time, the backoff is full jitter within its
bound and reproducible from the seed, and the retry budget lets failures through once spent.
(The integration tests keep to outcomes and lower bounds; these prove the timing.)"""

from __future__ import annotations

import random

import pytest

from fakes import Mesh, mesh_config, request, response

A, B, C = "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"
SETTLE = 1.0  # virtual seconds: more than any backoff with nothing else due


def shop(*endpoints: str, seed: int = 7, **policy) -> Mesh:
    return Mesh.outbound({"shop": list(endpoints)},
                         {"shop": {"loadBalancer": {"type": "RoundRobin"}, **policy}}, seed=seed)


def retries(mesh: Mesh, reason: str | None = None) -> float:
    labels = {"service": "shop.default"} | ({"reason": reason} if reason else {})
    return mesh.metric("meshproxy_retries_total", **labels)


# --- per-try timeout -----------------------------------------------------------------------------


def test_a_per_try_timeout_is_retried_on_the_other_endpoint_which_answers() -> None:
    mesh = shop(A, B, timeouts={"perTry": "300ms"})
    mesh.network.serve(B, response(200, b"from B"))
    client = mesh.call(request("GET", "/"))  # A takes it and says nothing
    t0 = mesh.loop.time()
    mesh.loop.advance_to(t0 + 0.299)
    assert mesh.network.dials == [A] and not mesh.network.to(A)[0].closed
    mesh.loop.advance_to(t0 + 0.3)
    assert mesh.network.to(A)[0].transport.aborted  # the try is given up at exactly 300 ms
    mesh.loop.advance(SETTLE)
    [(retried_at, key)] = mesh.network.dial_times[1:]
    assert key == B and 0 <= retried_at - (t0 + 0.3) < 0.025  # after the first backoff
    assert (client.response.status, client.response.body) == (200, b"from B")
    assert retries(mesh, "timeout") == 1
    assert mesh.service().breaker.health(A).failures == 1  # a timeout is a failure


def test_a_per_try_timeout_while_connecting_gives_the_connect_up_and_retries() -> None:
    mesh = shop(A, B, timeouts={"perTry": "300ms"})  # shorter than the 2 s connect timeout
    mesh.network.hanging.add(A)
    mesh.network.serve(B, response(200))
    client = mesh.call(request("GET", "/"))
    t0 = mesh.loop.time()
    mesh.loop.advance_to(t0 + 0.3)
    assert mesh.service().connecting == 0  # the connect to A was cancelled
    mesh.loop.advance(5.0)  # past A's connect timeout: nothing comes of it
    assert client.response.status == 200
    assert [u.key for u in mesh.network.connections] == [B]
    assert retries(mesh, "timeout") == 1


def test_a_per_try_timeout_of_a_post_is_answered_504_at_that_time_and_not_retried() -> None:
    mesh = shop(A, B, timeouts={"perTry": "300ms"})
    client = mesh.call(request("POST", "/order", body=b"one pizza"))
    t0 = mesh.loop.time()
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.error) == (504, "timeout")
    assert client.answered_at() == t0 + 0.3
    assert mesh.network.dials == [A] and retries(mesh) == 0


# --- request timeout -----------------------------------------------------------------------------


def test_the_request_timeout_answers_504_timeout_at_exactly_its_time() -> None:
    mesh = shop(A, timeouts={"request": "2s"})
    client = mesh.call(request("GET", "/slow"))
    t0 = mesh.loop.time()
    mesh.loop.advance_to(t0 + 1.999)
    assert client.response is None
    mesh.loop.advance_to(t0 + 2.0)
    got = client.response
    assert (got.status, got.error, got.complete) == (504, "timeout", True)
    assert client.answered_at() == t0 + 2.0
    assert mesh.network.connections[0].transport.aborted
    assert retries(mesh) == 0 and mesh.service().active == 0
    assert not client.transport.closing  # an answer of the proxy's own keeps the connection


def test_the_request_timeout_bounds_every_try_and_the_backoffs_between_them() -> None:
    # 5 retries of 250 ms would take over 1.25 s: the 600 ms request timeout ends them.
    mesh = shop(A, B, C, timeouts={"request": "600ms", "perTry": "250ms"},
                retry={"attempts": 5, "backoff": {"base": "100ms", "max": "100ms"}})
    client = mesh.call(request("GET", "/slow"))
    t0 = mesh.loop.time()
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.error) == (504, "timeout")
    assert client.answered_at() == t0 + 0.6
    starts = [t for t, _, _ in mesh.network.sent]
    assert 2 <= len(starts) <= 3
    # Each try got its full 250 ms (plus a backoff under 100 ms) before the next began.
    assert all(0.25 <= b - a < 0.35 for a, b in zip(starts, starts[1:]))
    assert all(u.closed for u in mesh.network.connections)
    assert mesh.service().active == 0


def test_a_retry_given_up_during_its_backoff_is_not_counted_as_made() -> None:
    mesh = shop(A, B, timeouts={"request": "500ms"},
                retry={"backoff": {"base": "10s", "max": "10s"}})
    mesh.network.refusing.add(A)
    client = mesh.call(request("GET", "/"))
    mesh.loop.advance(SETTLE)
    # With this seed the backoff (under 10 s) outlasts the 500 ms request timeout.
    assert (client.response.status, client.response.error) == (504, "timeout")
    assert mesh.network.dials == [A]
    [(record, _)] = mesh.log.records
    assert (record.attempts, retries(mesh)) == (1, 0)


def test_a_response_that_started_before_the_request_timeout_is_cut_at_it() -> None:
    mesh = shop(A, timeouts={"request": "2s"})
    client = mesh.call(request("GET", "/stream"))
    t0 = mesh.loop.time()
    mesh.network.last.respond(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    mesh.loop.advance_to(t0 + 2.0)
    # The status line is gone: the only signal left is a broken connection.
    assert client.transport.data.endswith(b"abc")
    assert client.aborted and mesh.network.last.transport.aborted


# --- backoff -------------------------------------------------------------------------------------


def three_connect_failures(seed: int) -> tuple[Mesh, list[float], random.Random]:
    """A GET to three refusing endpoints: (the mesh, the dial times, a copy of the proxy's
    random source as it was just before the first failure)."""
    mesh = shop(A, B, C, seed=seed)
    mesh.network.refusing.update({A, B, C})
    client = mesh.client()
    client.send(request("GET", "/"))  # starts the exchange: its connect runs at the next step
    before = random.Random()
    before.setstate(mesh.rng.getstate())
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.error) == (502, "connect-failure")
    return mesh, [t for t, _ in mesh.network.dial_times], before


def test_the_backoff_is_full_jitter_under_25_ms_then_50_ms() -> None:
    mesh, (first, second, third), rng = three_connect_failures(seed=7)
    assert sorted(mesh.network.dials) == [A, B, C]  # each retry away from those tried
    assert 0 <= second - first < 0.025
    assert 0 <= third - second < 0.05
    # Exactly rng.random() times the cap (25 ms doubling), drawn from the proxy's one source.
    assert second == first + rng.random() * 0.025
    assert third == second + rng.random() * 0.05


def test_the_same_seed_gives_the_same_backoff_and_another_seed_another() -> None:
    assert three_connect_failures(seed=3)[1] == three_connect_failures(seed=3)[1]
    assert three_connect_failures(seed=3)[1] != three_connect_failures(seed=4)[1]


# --- retry budget --------------------------------------------------------------------------------


# percent 0, 0.1 per second: one retry per 10 s window.
ONE_RETRY_PER_WINDOW = {"budget": {"percent": 0, "minPerSecond": 0.1}}


def test_when_the_budget_is_spent_the_failure_passes_through_and_is_counted() -> None:
    mesh = shop(A, B, retry=ONE_RETRY_PER_WINDOW)
    mesh.network.serve(A, response(503, b"A busy"))
    mesh.network.serve(B, response(503, b"B busy"))
    first = mesh.call(request("GET", "/1"))
    mesh.loop.advance(SETTLE)
    # One retry (the budget's one), then the budget says no: B's 503 is the answer.
    assert mesh.network.tries("/1") == [A, B]
    assert (first.response.status, first.response.body, first.response.error) == (
        503, b"B busy", None)
    assert retries(mesh, "503") == 1
    assert mesh.metric("meshproxy_retries_budget_exhausted_total", service="shop.default") == 1

    second = mesh.call(request("GET", "/2"))
    mesh.loop.advance(SETTLE)
    assert len(mesh.network.tries("/2")) == 1 and second.response.status == 503
    assert mesh.metric("meshproxy_retries_budget_exhausted_total", service="shop.default") == 2
    assert retries(mesh) == 1


def test_the_budget_comes_back_once_its_10_second_window_has_passed() -> None:
    mesh = shop(A, B, retry=ONE_RETRY_PER_WINDOW)
    mesh.network.serve(A, response(503))
    mesh.network.serve(B, response(200))
    mesh.call(request("GET", "/1"))  # A then B: the window's retry
    mesh.loop.advance(SETTLE)
    mesh.call(request("GET", "/2"))  # RR: B first, answered
    mesh.loop.advance(SETTLE)
    spent = mesh.call(request("GET", "/3"))  # A: no retry left
    mesh.loop.advance(SETTLE)
    assert spent.response.status == 503 and mesh.network.tries("/3") == [A]
    mesh.loop.advance(10.0)
    mesh.call(request("GET", "/4"))  # B
    mesh.loop.advance(SETTLE)
    again = mesh.call(request("GET", "/5"))  # A, retried on B again
    mesh.loop.advance(SETTLE)
    assert again.response.status == 200 and mesh.network.tries("/5") == [A, B]
    assert retries(mesh, "503") == 2


# --- a route rule's timeouts and retry -----------------------------------------------------------


def routed(rule: dict, **app_policy) -> Mesh:
    """Service `shop` routed by one HTTPRoute rule (its `rule` fields) to Service `app`
    over A and B, whose own TrafficPolicy is `app_policy`."""
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "shop", "namespace": "default"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "shop"}],
                      "rules": [{"name": "r", "backendRefs": [{"name": "app", "port": 80}],
                                 **rule}]}}
    policy = {"app": {"loadBalancer": {"type": "RoundRobin"}, **app_policy}}
    return Mesh(mesh_config({"shop": [], "app": [A, B]}, policy, routes=[route]))


def test_a_route_rules_request_timeout_replaces_the_services() -> None:
    mesh = routed({"timeouts": {"request": "600ms"}}, timeouts={"request": "150ms"})
    client = mesh.call(request("GET", "/slow"))
    t0 = mesh.loop.time()
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.error) == (504, "timeout")
    assert client.answered_at() == t0 + 0.6
    assert mesh.metric("meshproxy_requests_total", service="app.default", code="504",
                       route="default/shop/r") == 1


def test_a_route_rules_backend_request_timeout_is_the_per_try_timeout() -> None:
    mesh = routed({"timeouts": {"request": "3s", "backendRequest": "300ms"}})
    client = mesh.call(request("GET", "/slow"))
    t0 = mesh.loop.time()
    mesh.loop.advance(SETTLE + 1.0)
    starts = [t - t0 for t, _, _ in mesh.network.sent]
    # Three tries of 300 ms each (the default 2 retries), then the last try's 504.
    assert len(starts) == 3 and all(0.3 <= b - a < 0.35 for a, b in zip(starts, starts[1:]))
    assert (client.response.status, client.response.error) == (504, "timeout")
    assert client.answered_at() == t0 + starts[2] + 0.3
    assert mesh.metric("meshproxy_retries_total", service="app.default", reason="timeout") == 2


def test_a_route_rules_backoff_replaces_the_services() -> None:
    mesh = routed({"retry": {"attempts": 3, "codes": [500], "backoff": "10ms"}},
                  retry={"backoff": {"base": "1s", "max": "1s"}})
    mesh.network.serve(A, response(500))
    mesh.network.serve(B, response(500))
    client = mesh.call(request("GET", "/"))
    mesh.loop.advance(SETTLE)
    starts = [t for t, _, _ in mesh.network.sent]
    assert len(starts) == 4 and client.response.status == 500
    # 10 ms doubling (the route's), not the Service's 1 s.
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert [0 <= gap < cap for gap, cap in zip(gaps, (0.01, 0.02, 0.04))] == [True] * 3
