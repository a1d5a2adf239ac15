"""The books of each try (EndpointTry) through the real Exchange and ServiceRuntime on virtual
time: the endpoint's load counts a try only while it is open, the RTT estimate is the try's
virtual duration and decays with virtual time, and the circuit breaker ejects an endpoint
after 5 consecutive failures, keeps requests away from it, and lets exactly one request probe
it once the ejection time is up."""

from __future__ import annotations

from math import exp

import pytest

from fakes import Client, Mesh, request, response

A, B, C = "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"
STEP = 0.3  # virtual seconds per request: more than a first backoff, far less than an ejection


def shop(*endpoints: str, **policy) -> Mesh:
    return Mesh.outbound({"shop": list(endpoints)},
                         {"shop": {"loadBalancer": {"type": "RoundRobin"}, **policy}})


def send(mesh: Mesh, path: str) -> Client:
    client = mesh.call(request("GET", path))
    mesh.loop.advance(STEP)
    return client


def ejections(mesh: Mesh) -> float:
    return mesh.metric("meshproxy_endpoint_ejections_total", service="shop.default", endpoint=A)


def endpoints_in(mesh: Mesh, state: str) -> float:
    return mesh.metric("meshproxy_endpoints", service="shop.default", state=state)


def eject_a(mesh: Mesh) -> float:
    """Send requests until A (answering 503) has failed 5 in a row; every client gets 200 from
    B or C by a retry. Returns the time of A's fifth failure."""
    for i in range(30):
        client = send(mesh, f"/eject-{i}")
        assert client.response.status == 200
        if len(mesh.network.requests_to(A)) == 5:
            return max(t for t, key, _ in mesh.network.sent if key == A)
    raise AssertionError("A never got 5 requests")


@pytest.fixture
def mesh() -> Mesh:
    """A answers 503, B and C 200; the default breaker (5 failures, 5 s doubling, 50%)."""
    mesh = shop(A, B, C)
    mesh.network.serve(A, response(503, b"A down"))
    mesh.network.serve(B, response(200, b"B"))
    mesh.network.serve(C, response(200, b"C"))
    return mesh


def test_five_consecutive_failures_eject_the_endpoint_and_later_requests_avoid_it(mesh) -> None:
    failed_at = eject_a(mesh)
    health = mesh.service().breaker.health(A)
    assert health.state == "ejected"
    assert 4.5 <= health.ejected_until - failed_at <= 5.5  # 5 s ± 10% jitter
    assert ejections(mesh) == 1
    assert (endpoints_in(mesh, "ready"), endpoints_in(mesh, "ejected")) == (2, 1)
    for i in range(10):
        assert send(mesh, f"/out-{i}").response.status == 200
    assert len(mesh.network.requests_to(A)) == 5  # nothing more while ejected


def test_once_the_ejection_time_is_up_exactly_one_request_probes_the_endpoint(mesh) -> None:
    eject_a(mesh)
    until = mesh.service().breaker.health(A).ejected_until
    mesh.loop.advance_to(until - 0.001)
    send(mesh, "/not-yet")
    assert A not in mesh.network.tries("/not-yet")
    mesh.loop.advance_to(until)
    # Two requests in the same instant: one is the probe, the other goes elsewhere.
    first, second = mesh.client(), mesh.client()
    first.send(request("GET", "/probe-1"))
    second.send(request("GET", "/probe-2"))
    probed_at = mesh.loop.time()
    mesh.loop.advance(STEP)
    firsts = [mesh.network.tries(p)[0] for p in ("/probe-1", "/probe-2")]
    assert firsts.count(A) == 1
    assert first.response.status == second.response.status == 200  # the probe's 503 retried
    # The probe failed: ejected again, for twice as long.
    health = mesh.service().breaker.health(A)
    assert health.state == "ejected"
    assert 9.0 <= health.ejected_until - probed_at <= 11.0
    assert ejections(mesh) == 2


def test_a_probe_that_succeeds_brings_the_endpoint_back(mesh) -> None:
    eject_a(mesh)
    mesh.network.serve(A, response(200, b"A again"))
    mesh.loop.advance_to(mesh.service().breaker.health(A).ejected_until)
    probe = send(mesh, "/probe")
    assert mesh.network.tries("/probe") == [A] and probe.response.body == b"A again"
    assert mesh.service().breaker.health(A).state == "ready"
    assert (endpoints_in(mesh, "ready"), endpoints_in(mesh, "ejected")) == (3, 0)
    bodies = {send(mesh, f"/back-{i}").response.body for i in range(6)}
    assert bodies == {b"A again", b"B", b"C"}  # it takes its share again


def test_a_probe_whose_client_left_is_sent_again_by_the_next_request(mesh) -> None:
    eject_a(mesh)
    mesh.network.handlers.pop(A)  # the probe gets no answer...
    mesh.loop.advance_to(mesh.service().breaker.health(A).ejected_until)
    gone = mesh.call(request("GET", "/gone"))
    assert mesh.network.tries("/gone") == [A]
    gone.leave()  # ...and its client gives up: no outcome
    mesh.loop.run()
    assert mesh.service().by_key[A].load.in_flight == 0
    mesh.network.serve(A, response(200, b"A again"))
    # The next request probes at once, not after the 60 s maxEjectionTime.
    again = send(mesh, "/again")
    assert mesh.network.tries("/again") == [A] and again.response.body == b"A again"
    assert mesh.service().breaker.health(A).state == "ready"


def test_a_success_between_failures_starts_the_count_again() -> None:
    mesh = shop(A, B, C)
    mesh.network.serve(B, response(200))
    mesh.network.serve(C, response(200))
    answers = iter([503] * 4 + [200] + [503] * 4)
    mesh.network.serve(A, lambda req: response(next(answers)))
    while len(mesh.network.requests_to(A)) < 9:
        assert send(mesh, f"/{len(mesh.network.sent)}").response.status == 200
    assert mesh.service().breaker.health(A).state == "ready"  # 4, a success, 4: never 5
    assert ejections(mesh) == 0


# --- the load books ------------------------------------------------------------------------------


def test_a_try_counts_in_its_endpoints_load_only_while_it_is_open() -> None:
    mesh = shop(A, B)
    client = mesh.call(request("GET", "/"))
    a, b = (mesh.service().by_key[k].load for k in (A, B))
    assert (a.in_flight, b.in_flight) == (1, 0)
    mesh.network.last.respond(response(503))
    mesh.loop.run()
    assert (a.in_flight, b.in_flight) == (0, 0)  # between tries: the backoff counts nowhere
    mesh.loop.advance(STEP)
    assert (a.in_flight, b.in_flight) == (0, 1)
    mesh.network.last.respond(response(200))
    mesh.loop.run()
    assert (a.in_flight, b.in_flight) == (0, 0) and client.response.status == 200


def test_the_rtt_estimate_is_the_virtual_time_to_the_response_head_and_decays_with_it() -> None:
    mesh = Mesh.outbound({"shop": [A, B]})  # PeakEWMA (default), 10 s decay
    mesh.call(request("GET", "/slow"))
    first = mesh.network.tries()[0]
    t0 = mesh.loop.time()
    mesh.loop.advance_to(t0 + 0.5)
    mesh.network.last.respond(response(200))
    mesh.loop.run()
    load = mesh.service().by_key[first].load
    assert load.rtt_estimate() == 0.5  # a slower answer is believed at once (peak)
    # While slow, it is the dearer of the two: the next requests go to the other endpoint.
    other = B if first == A else A
    mesh.network.serve(other, response(200))
    for i in range(5):
        send(mesh, f"/next-{i}")
    assert mesh.network.tries()[1:] == [other] * 5
    # It decays toward 0 while it gets nothing: e^-1 of it per 10 s of virtual time.
    mesh.loop.advance_to(t0 + 0.5 + 10.0)
    assert load.rtt_estimate() == pytest.approx(0.5 * exp(-1))
