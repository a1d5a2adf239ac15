"""One request's life through the real Exchange and its Forwarder, as a client and the
upstreams see it: what goes through, what is retried and where, what is never retried, the
idle race, body replay, a client that leaves, pipelining, and inbound (no Attempts). No
sockets, virtual time (fakes.py): every step happens when the test says so, never by a
wall-clock window."""

from __future__ import annotations

import pytest

from fakes import InboundMesh, Mesh, mesh_config, request, response

from meshproxy.dataplane.mirror import Mirrors

A, B, C = "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"
SETTLE = 1.0  # virtual seconds: more than any backoff (250 ms at most) with nothing else due


def shop(*endpoints: str, seed: int = 7, **policy) -> Mesh:
    """Service `shop` over `endpoints`, round robin (so the first try of the first request
    goes to the first endpoint), with the TrafficPolicy fields in `policy`."""
    return Mesh.outbound({"shop": list(endpoints)},
                         {"shop": {"loadBalancer": {"type": "RoundRobin"}, **policy}}, seed=seed)


def retries(mesh: Mesh, reason: str | None = None) -> float:
    labels = {"service": "shop.default"} | ({"reason": reason} if reason else {})
    return mesh.metric("meshproxy_retries_total", **labels)


def requests_counted(mesh: Mesh, code: str | None = None) -> float:
    labels = {"service": "shop.default"} | ({"code": code} if code else {})
    return mesh.metric("meshproxy_requests_total", **labels)


# --- through ------------------------------------------------------------------------------------


def test_a_get_goes_through_and_its_connection_goes_back_to_the_pool() -> None:
    mesh = shop(A)
    client = mesh.call(request("GET", "/items?id=1"))
    [up] = mesh.network.connections
    [sent] = up.requests
    assert (sent.method, sent.target, sent.header("host")) == ("GET", "/items?id=1", "shop")
    assert sent.header("x-request-id")  # one is added when the client sent none (spec §4)
    up.respond(response(200, b"hello", {"x-app": "1"}))
    mesh.loop.run()

    got = client.response
    assert (got.status, got.body, got.header("x-app"), got.error) == (200, b"hello", "1", None)
    assert not client.transport.closing  # keep-alive
    endpoint = mesh.service().by_key[A]
    assert endpoint.pool.idle == [up.conn] and not up.closed
    # Every book closed: in flight, the endpoint's load, the breaker's failures.
    assert (mesh.service().active, endpoint.load.in_flight) == (0, 0)
    assert mesh.service().breaker.health(A).failures == 0
    assert requests_counted(mesh, "200") == 1 and retries(mesh) == 0


def test_the_next_request_of_a_client_reuses_the_pooled_connection() -> None:
    mesh = shop(A)
    mesh.network.serve(A, lambda req: response(200, req.target.encode()))
    client = mesh.call(request("GET", "/1"))
    client.send(request("GET", "/2"))
    mesh.loop.run()
    assert [r.body for r in client.responses()] == [b"/1", b"/2"]
    assert mesh.network.dials == [A]  # one connection carried both
    assert [r.target for r in mesh.network.connections[0].requests] == ["/1", "/2"]


# --- what is retried, and where ------------------------------------------------------------------


def test_a_connect_failure_is_retried_on_the_other_endpoint_even_for_a_post() -> None:
    mesh = shop(A, B)
    mesh.network.refusing.add(A)
    mesh.network.serve(B, lambda req: response(201, req.body))
    client = mesh.call(request("POST", "/orders", body=b"pay 10 EUR"))
    mesh.loop.advance(SETTLE)
    # Nothing reached A's app: any method may go again (docs/resilience.md, rule 2).
    assert mesh.network.dials == [A, B]
    assert [r.body for r in mesh.network.requests_to(B)] == [b"pay 10 EUR"]
    assert (client.response.status, client.response.body) == (201, b"pay 10 EUR")
    assert retries(mesh, "connect-failure") == 1
    assert mesh.service().breaker.health(A).failures == 1


def test_a_get_that_gets_503_is_retried_on_another_endpoint() -> None:
    mesh = shop(A, B)
    mesh.network.serve(A, response(503, b"busy"))
    mesh.network.serve(B, response(200, b"fine"))
    client = mesh.call(request("GET", "/"))
    mesh.loop.advance(SETTLE)
    assert mesh.network.tries() == [A, B]
    # A's 503 is dropped with its connection; only B's answer reaches the client.
    assert [(r.status, r.body) for r in client.responses()] == [(200, b"fine")]
    assert mesh.network.to(A)[0].transport.aborted
    assert retries(mesh, "503") == 1
    assert requests_counted(mesh) == requests_counted(mesh, "200") == 1


def test_a_post_that_gets_503_is_answered_with_it_and_never_sent_twice() -> None:
    mesh = shop(A, B)
    mesh.network.serve(A, response(503, b"busy"))
    client = mesh.call(request("POST", "/pay", body=b"10 EUR"))
    mesh.loop.advance(SETTLE)
    # The app may have taken the payment: the 503 is the answer (rule 2).
    assert mesh.network.tries() == [A]
    assert (client.response.status, client.response.body, client.response.error) == (
        503, b"busy", None)
    assert retries(mesh) == 0
    assert mesh.service().breaker.health(A).failures == 1  # forwarded, still a failure of A


def test_after_the_last_retry_the_last_503_is_forwarded_as_the_app_sent_it() -> None:
    mesh = shop(A, B)
    mesh.network.serve(A, response(503, b"from A"))
    mesh.network.serve(B, response(503, b"from B"))
    client = mesh.call(request("GET", "/"))
    mesh.loop.advance(SETTLE)
    # The first try and two retries (the default attempts), each retry away from the last.
    tries = mesh.network.tries()
    assert len(tries) == 3 and tries[:2] == [A, B]
    got = client.response
    assert (got.status, got.error) == (503, None)
    assert got.body == (b"from A" if tries[2] == A else b"from B")
    assert retries(mesh, "503") == 2


def test_a_reset_before_the_response_is_retried_for_a_get_but_answered_502_for_a_post() -> None:
    mesh = shop(A, B)
    mesh.network.serve(B, response(200, b"fine"))
    get = mesh.call(request("GET", "/"))
    mesh.network.to(A)[0].reset()
    mesh.loop.advance(SETTLE)
    assert get.response.status == 200 and retries(mesh, "reset") == 1

    mesh.network.handlers.clear()
    post = mesh.call(request("POST", "/pay", body=b"10 EUR"))
    mesh.network.last.reset()
    mesh.loop.advance(SETTLE)
    assert (post.response.status, post.response.error) == (502, "upstream-reset")
    assert len(mesh.network.tries("/pay")) == 1 and retries(mesh, "reset") == 1


def test_an_interim_response_then_a_failure_reach_the_client_in_order_and_only_once() -> None:
    """A 100 Continue is passed on when the response that follows is sent: before the
    proxy's own 502 when the upstream then fails, and never again before the next answer
    on the same connection."""
    mesh = shop(A)
    client = mesh.call(request("POST", "/pay", body=b"10 EUR", headers={"expect": "100-continue"}))
    up = mesh.network.last
    up.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    up.reset()
    mesh.loop.advance(SETTLE)
    mesh.network.serve(A, response(200, b"next"))
    client.send(request("GET", "/next"))
    mesh.loop.advance(SETTLE)
    assert [(r.status, r.error) for r in client.responses()] == [
        (100, None), (502, "upstream-reset"), (200, None)]


def test_a_response_cut_off_after_it_started_is_not_retried_and_the_client_sees_an_abort() -> None:
    mesh = shop(A, B)
    client = mesh.call(request("GET", "/"))
    [up] = mesh.network.connections
    up.respond(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
    up.close()  # 90 bytes short
    mesh.loop.advance(SETTLE)
    # What was forwarded stays forwarded; the only honest signal left is a broken connection.
    assert client.transport.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.transport.data.endswith(b"only part")
    assert client.aborted and client.transport.lost
    assert mesh.network.tries() == [A] and retries(mesh) == 0
    assert mesh.service().active == 0


# --- the request body ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_64_kib_is_kept_and_sent_again_whole(chunked: bool) -> None:
    mesh = shop(A, B)
    body = bytes(range(256)) * 256  # 64 KiB exactly: the replay buffer's size
    mesh.network.serve(A, response(503))
    mesh.network.serve(B, lambda req: response(200, b"%d" % len(req.body)))
    client = mesh.call(request("PUT", "/doc", body=body, chunked=chunked))
    mesh.loop.advance(SETTLE)
    sent = mesh.network.requests_to(B)
    assert [r.body == body and r.complete for r in sent] == [True]
    assert (client.response.status, client.response.body) == (200, b"65536")
    assert retries(mesh, "503") == 1


def test_a_body_over_64_kib_is_not_sent_again_once_sent() -> None:
    mesh = shop(A, B)
    body = b"x" * (64 * 1024 + 1)
    mesh.network.serve(A, response(503, b"busy"))
    client = mesh.call(request("PUT", "/doc", body=body))
    mesh.loop.advance(SETTLE)
    # It could not be sent whole again: A's 503 is the answer, B never hears of it.
    assert [len(r.body) for r in mesh.network.requests_to(A)] == [len(body)]
    assert mesh.network.dials == [A]
    assert (client.response.status, client.response.body) == (503, b"busy")
    assert retries(mesh) == 0


def test_a_pipelined_request_with_a_body_is_sent_again_whole() -> None:
    """The body of a request that waited behind another is read before its exchange starts;
    a retry must still send all of it (today the retry sends the head alone, and the
    upstream waits for a body that never comes)."""
    mesh = shop(A, B)
    failed: list[str] = []

    def once_503(req):  # the first PUT fails, wherever it lands
        if req.method == "PUT" and not failed:
            failed.append(req.target)
            return response(503)
        return response(200, b"%d" % len(req.body))

    mesh.network.serve(A, once_503)
    mesh.network.serve(B, once_503)
    body = b"y" * 1000
    client = mesh.call(request("GET", "/first") + request("PUT", "/second", body=body))
    mesh.loop.advance(SETTLE)
    puts = [req for _, _, req in mesh.network.sent if req.method == "PUT"]  # in order sent
    assert len(puts) == 2
    assert [(len(r.body), r.complete) for r in puts] == [(1000, True), (1000, True)]
    assert [(r.status, r.body) for r in client.responses()] == [(200, b"0"), (200, b"1000")]


def test_a_pipelined_request_with_a_body_is_mirrored_with_its_body() -> None:
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "copy", "port": 80}}}
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "shop", "namespace": "default"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "shop"}],
                      "rules": [{"backendRefs": [{"name": "shop", "port": 80}],
                                 "filters": [mirror]}]}}
    mesh = Mesh(mesh_config({"shop": [A], "copy": [C]}, routes=[route]))
    copies = []  # what Mirrors.send is handed (sending a copy is mirror.py's, not tested here)

    class RecordingMirrors(Mirrors):
        def send(self, runtime, head, target, body) -> None:
            copies.append((head.method, None if body is None else b"".join(body)))

    mesh.context.mirrors = RecordingMirrors(mesh.loop)
    mesh.network.serve(A, response(200))
    mesh.call(request("GET", "/first") + request("PUT", "/doc", body=b"z" * 100))
    mesh.loop.advance(SETTLE)
    assert mesh.network.tries() == [A, A]
    assert copies == [(b"GET", None), (b"PUT", b"z" * 100)]


# --- the idle race -------------------------------------------------------------------------------


def test_a_request_on_a_reused_connection_the_server_just_closed_goes_again_on_a_fresh_one() -> None:
    mesh = shop(A)
    client = mesh.call(request("GET", "/1"))
    first = mesh.network.connections[0]
    first.respond(response(200, b"one"))
    mesh.loop.run()
    client.send(request("GET", "/2"))
    mesh.loop.run()
    assert [r.target for r in first.requests] == ["/1", "/2"]  # the pooled connection
    first.close()  # the server's idle close crossed the request: no answer, nothing taken
    closed_at = mesh.loop.time()
    mesh.loop.run()

    second = mesh.network.last
    assert second is not first and [r.target for r in second.requests] == ["/2"]
    # At once (no backoff), not a retry, and not a failure of the endpoint.
    assert mesh.network.sent[-1][0] == closed_at
    second.respond(response(200, b"two"))
    mesh.loop.run()
    assert [(r.status, r.body) for r in client.responses()] == [(200, b"one"), (200, b"two")]
    assert retries(mesh) == 0
    assert mesh.service().breaker.health(A).failures == 0


def test_a_post_in_the_idle_race_is_not_sent_again() -> None:
    mesh = shop(A)
    client = mesh.call(request("GET", "/1"))
    mesh.network.last.respond(response(200))
    mesh.loop.run()
    client.send(request("POST", "/pay", body=b"10 EUR"))
    mesh.loop.run()
    mesh.network.last.close()
    mesh.loop.advance(SETTLE)
    # The proxy cannot know the app did not take it (nonIdempotent is off).
    assert len(mesh.network.tries("/pay")) == 1
    assert (client.responses()[1].status, client.responses()[1].error) == (502, "upstream-reset")


def test_the_idle_race_goes_again_only_once() -> None:
    mesh = shop(A, retry={"attempts": 0})  # no retries at all: only the idle race may resend
    client = mesh.call(request("GET", "/1"))
    mesh.network.last.respond(response(200))
    mesh.loop.run()
    client.send(request("GET", "/2"))
    mesh.loop.run()
    mesh.network.last.close()  # the idle race: sent again on a fresh connection
    mesh.loop.run()
    mesh.network.last.close()  # the fresh one closes too: that is a failure, not a race
    mesh.loop.advance(SETTLE)
    assert mesh.network.tries("/2") == [A, A]
    assert (client.responses()[1].status, client.responses()[1].error) == (502, "upstream-reset")


# --- the client leaves ---------------------------------------------------------------------------


def test_a_client_that_leaves_while_its_request_is_upstream_frees_the_connection_and_counts() -> None:
    mesh = shop(A, timeouts={"request": "5s", "perTry": "1s"})
    client = mesh.call(request("GET", "/slow"))
    [up] = mesh.network.connections
    endpoint = mesh.service().by_key[A]
    assert (mesh.service().active, endpoint.load.in_flight, endpoint.pool.open_count) == (1, 1, 1)
    client.leave()
    mesh.loop.run()
    assert up.transport.aborted and up.transport.lost
    assert (mesh.service().active, endpoint.load.in_flight, endpoint.pool.open_count) == (0, 0, 0)
    assert endpoint.pool.idle == []
    # No outcome for the breaker, no count in the metrics, no timer left to fire.
    assert mesh.service().breaker.health(A).failures == 0
    assert requests_counted(mesh) == 0
    assert mesh.loop.timers() == []


def test_a_client_that_leaves_while_the_connection_is_being_opened_stops_it() -> None:
    mesh = shop(A)
    mesh.network.hanging.add(A)
    client = mesh.call(request("GET", "/"))
    assert mesh.service().connecting == 1
    client.leave()
    mesh.loop.advance(5.0)  # past the 2 s connect timeout
    assert mesh.service().connecting == 0 and mesh.service().active == 0
    assert mesh.network.connections == [] and mesh.network.dials == [A]
    assert mesh.service().by_key[A].load.in_flight == 0


def test_a_client_that_leaves_during_the_backoff_gets_no_retry() -> None:
    mesh = shop(A, B)
    mesh.network.refusing.add(A)
    client = mesh.call(request("GET", "/"))
    assert mesh.network.dials == [A] and client.response is None  # the retry waits its backoff
    client.leave()
    mesh.loop.advance(SETTLE)
    assert mesh.network.dials == [A]
    assert mesh.service().active == 0 and mesh.loop.timers() == []


# --- pipelining ----------------------------------------------------------------------------------


def test_pipelined_requests_are_sent_one_at_a_time_and_answered_in_order() -> None:
    mesh = shop(A)
    client = mesh.call(request("GET", "/1") + request("GET", "/2") + request("GET", "/3"))
    [up] = mesh.network.connections
    # One exchange at a time: the later requests wait, and the client is not read meanwhile.
    assert [r.target for r in up.requests] == ["/1"]
    assert not client.transport.reading
    for n in (1, 2, 3):
        assert len(up.requests) == n
        up.respond(response(200, b"answer %d" % n))
        mesh.loop.run()
    assert [r.body for r in client.responses()] == [b"answer 1", b"answer 2", b"answer 3"]
    assert mesh.network.dials == [A] and client.transport.reading


# --- inbound: the local app, no Attempts ---------------------------------------------------------


APP = "127.0.0.1:8080"


def test_inbound_a_connect_failure_is_answered_502_and_never_retried() -> None:
    mesh = InboundMesh()
    mesh.network.refusing.add(APP)
    client = mesh.call(request("GET", "/"))
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.error) == (502, "connect-failure")
    assert mesh.network.dials == [APP]
    assert mesh.metric("meshproxy_retries_total") == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_inbound_a_503_of_the_app_is_forwarded_and_never_retried(method: str) -> None:
    mesh = InboundMesh()
    mesh.network.serve(APP, response(503, b"app busy"))
    client = mesh.call(request(method, "/", body=b"x" if method == "POST" else None))
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.body, client.response.error) == (
        503, b"app busy", None)
    assert len(mesh.network.tries()) == 1


def test_inbound_a_reset_is_answered_502_and_never_retried() -> None:
    mesh = InboundMesh()
    client = mesh.call(request("GET", "/"))
    mesh.network.last.reset()
    mesh.loop.advance(SETTLE)
    assert (client.response.status, client.response.error) == (502, "upstream-reset")
    assert len(mesh.network.tries()) == 1 and mesh.network.dials == [APP]


# --- what a finished request leaves behind ----------------------------------------------------


def test_a_finished_request_leaves_no_reference_cycle_for_the_garbage_collector() -> None:
    """Every object of a request (exchange, forwarder, record, heads) is freed by reference
    counting when it ends: a cycle among them would leave each request to the cyclic garbage
    collector, which cost a fifth of the proxy's time when the exchange and its forwarder
    held each other."""
    import gc

    from meshproxy.dataplane.exchange import Exchange
    from meshproxy.dataplane.forwarder import Forwarder

    mesh = shop(A)
    mesh.network.serve(A, response(200, b"ok"))
    client = mesh.call(request("GET", "/warm-up"))
    mesh.loop.run()
    gc.collect()
    gc.disable()
    try:
        for i in range(20):
            client.send(request("GET", f"/{i}"))
            mesh.loop.run()
        alive = [o for o in gc.get_objects() if isinstance(o, (Exchange, Forwarder))]
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert alive == [] and unreachable == 0
    # (read last: the test's own parse of what the client got makes garbage of its own)
    assert [r.status for r in client.responses()] == [200] * 21


# --- loops ---------------------------------------------------------------------------------------


def test_a_request_carrying_this_sidecars_own_mark_for_its_direction_is_answered_508() -> None:
    mesh = shop(A)
    mark = mesh.context.hop_mark.decode()
    assert mark.startswith("outbound-") and len(mark) == len("outbound-") + 12
    client = mesh.call(request("GET", "/", headers={"x-meshproxy-hop": f"inbound-{mark[9:]}, {mark}"}))
    got = client.response
    assert (got.status, got.header("x-meshproxy-error")) == (508, "loop-detected")
    assert mesh.network.connections == []  # nothing went upstream
    assert requests_counted(mesh, "508") == 1
    assert not client.transport.closing  # the connection is still good for the next request


def test_a_request_without_the_mark_goes_on_with_it_added_once() -> None:
    mesh = shop(A)
    # Another sidecar's marks (and this one's for the other direction) are not a loop.
    other = "outbound-0123456789ab"
    mine_inbound = "inbound-" + mesh.context.hop_mark.decode()[len("outbound-"):]
    mesh.call(request("GET", "/", headers={"x-meshproxy-hop": f"{other}, {mine_inbound}"}))
    [up] = mesh.network.connections
    [sent] = up.requests
    hops = [v.decode() for k, v in sent.head.headers if k.lower() == b"x-meshproxy-hop"]
    assert hops == [f"{other}, {mine_inbound}", mesh.context.hop_mark.decode()]
