"""Retries, timeouts, circuit breaking and limits through a real proxy (docs/resilience.md,
spec §3 defaults and §4 error responses), as the calling app sees them.

One proxy serves every test; each test has Services of its own (its own retry budget,
breaker and balancer) and tells its requests apart on shared backends by a unique tag in
the path, so that counting what a backend received counts exactly that test's requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from support.faults import FaultyBackend, KeepAliveCloser
from support.proxy import ProxyProcess, closed_port, mesh_yaml, wait_for
from support.rawbackend import RawBackend
from support.rawhttp import Conn

NS = "default"
DOWN = f"127.0.0.1:{closed_port()}"
CUT_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part of it"


# --- configuration -------------------------------------------------------------------------------


def policy(service: str, **spec) -> dict:
    return {
        "apiVersion": "meshproxy.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": service, "namespace": NS},
        "spec": {"targetRef": {"kind": "Service", "name": service}, **spec},
    }


def http_route(parent: str, rules: list[dict]) -> dict:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": parent, "namespace": NS},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                 "rules": rules},
    }


def rule(case: str, backend: str, **fields) -> dict:
    """A rule taking the requests with `x-case: case` to Service `backend`."""
    return {"name": case, "matches": [{"headers": [{"name": "x-case", "value": case}]}],
            "backendRefs": [{"name": backend, "port": 80}], **fields}


ROUND_ROBIN = {"loadBalancer": {"type": "RoundRobin"}}


def resilience_mesh(b: dict) -> str:
    a = {name: server.address for name, server in b.items()}
    services = {
        "always503": [a["bad"]],
        "always503-ni": [a["bad"]],
        "half503": [a["bad"], a["good"]],
        "resetting": [a["reset"]],
        "resetting-ni": [a["reset"]],
        "cutting": [a["cut"]],
        "half-down": [DOWN, a["good"]],
        "once": [a["once"]],
        "retry-app": [a["good"]],
        "retry-routed": [],
        "req-timeout": [a["good"]],
        "per-try": [a["slowpoke"], a["good"]],
        "per-try-all": [a["good"]],
        "per-try-slow": [a["slowpoke"]],
        "deadline": [a["good"]],
        "route-timeouts": [],
        "route-timeouts-app": [a["good"]],
        "budget": [a["bad"], a["bad2"]],
        "breaker": [a["good"], a["good2"], a["flappy"]],
        "breaker-lost": [a["good"], a["good2"], a["flappy"]],
        "two-bad": [a["bad"], a["bad2"], a["good"]],
        "lone-down": [DOWN],
        "lone-down-eject": [DOWN],
        "limited": [a["good"]],
        "conn-limited": [a["good"], a["good2"], a["good3"]],
        "burst-limited": [a["good"]],
        "retry-app-slow-backoff": [a["good"]],
        "idle-closer": [a["idler"]],
        "race": [a["racer"]],
        "race-ni": [a["racer_ni"]],
    }
    long_idle = {"connectionPool": {"idleTimeout": "10s"}}
    documents = [
        policy("always503-ni", retry={"nonIdempotent": True}),
        policy("resetting-ni", retry={"nonIdempotent": True}),
        policy("half503", **ROUND_ROBIN),
        policy("half-down", **ROUND_ROBIN),
        policy("req-timeout", timeouts={"request": "500ms"}),
        policy("per-try", **ROUND_ROBIN, timeouts={"perTry": "300ms"}),
        policy("per-try-all", timeouts={"perTry": "300ms"}),
        policy("per-try-slow", timeouts={"perTry": "300ms"}),
        policy("deadline", timeouts={"request": "600ms", "perTry": "250ms"},
               retry={"attempts": 5, "backoff": {"base": "100ms", "max": "100ms"}}),
        policy("route-timeouts-app", timeouts={"request": "150ms"}),
        policy("breaker", **ROUND_ROBIN,
               circuitBreaker={"baseEjectionTime": "1s", "maxEjectionTime": "10s"}),
        policy("breaker-lost", **ROUND_ROBIN,
               circuitBreaker={"baseEjectionTime": "500ms", "maxEjectionTime": "30s"}),
        policy("two-bad", **ROUND_ROBIN),
        policy("lone-down-eject", circuitBreaker={"maxEjectionPercent": 100}),
        policy("limited", connectionPool={"maxRequests": 2}),
        policy("conn-limited", **ROUND_ROBIN, connectionPool={"maxConnections": 2}),
        policy("burst-limited", connectionPool={"maxConnections": 2}),
        policy("retry-app-slow-backoff", retry={"backoff": {"base": "1s", "max": "1s"}}),
        policy("idle-closer", **long_idle),
        policy("race", **long_idle),
        policy("race-ni", **long_idle, retry={"nonIdempotent": True}),
        http_route("retry-routed", [
            rule("codes", "retry-app",
                 retry={"attempts": 4, "codes": [500], "backoff": "10ms"}),
            rule("backoff", "retry-app-slow-backoff",
                 retry={"attempts": 3, "codes": [500], "backoff": "10ms"}),
        ]),
        http_route("route-timeouts", [
            rule("request", "route-timeouts-app", timeouts={"request": "600ms"}),
            rule("backend-request", "route-timeouts-app",
                 timeouts={"request": "3s", "backendRequest": "300ms"}),
        ]),
    ]
    return mesh_yaml(services, documents=documents)


@pytest.fixture(scope="module")
def servers():
    """Every backend the Services above use, started once for the module."""
    started = {
        "good": FaultyBackend("good"), "good2": FaultyBackend("good2"),
        "good3": FaultyBackend("good3"),
        "bad": FaultyBackend("bad"), "bad2": FaultyBackend("bad2"),
        "once": FaultyBackend("once"), "slowpoke": FaultyBackend("slowpoke"),
        "flappy": FaultyBackend("flappy"),
        "reset": RawBackend(None), "cut": RawBackend(CUT_RESPONSE, close_after=True),
        "idler": KeepAliveCloser(idle_close=0.2),
        "racer": KeepAliveCloser(answers_per_connection=1),
        "racer_ni": KeepAliveCloser(answers_per_connection=1),
    }
    for server in started.values():
        server.start()
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def b(servers):
    """The backends, in their standing state: `bad`/`bad2` answer 503, `slowpoke` waits 2 s,
    the others are healthy."""
    for name in ("good", "good2", "good3", "once", "flappy"):
        servers[name].reset()
    for name in ("bad", "bad2"):
        servers[name].reset()
        servers[name].status = 503
    servers["slowpoke"].reset()
    servers["slowpoke"].delay = 2.0
    return servers


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(request, tmp_path_factory, servers) -> ProxyProcess:
    running = ProxyProcess(tmp_path_factory.mktemp(f"resilience-{request.param}"),
                           resilience_mesh(servers), name="resilience",
                           uvloop=request.param == "uvloop").start()
    yield running
    running.stop()


# --- the calling app -----------------------------------------------------------------------------

_local = threading.local()


def session() -> requests.Session:
    s = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
        s.trust_env = False  # no HTTP_PROXY from the environment between test and proxy
    return s


def call(proxy: ProxyProcess, service: str, path: str, method: str = "GET",
         headers: dict | None = None, **kwargs) -> requests.Response:
    response = session().request(method, f"http://127.0.0.1:{proxy.outbound}{path}",
                                 headers={"Host": service, **(headers or {})},
                                 timeout=kwargs.pop("timeout", 15), **kwargs)
    return response


def timed(proxy: ProxyProcess, service: str, path: str,
          **kwargs) -> tuple[requests.Response, float]:
    start = time.monotonic()
    response = call(proxy, service, path, **kwargs)
    return response, time.monotonic() - start


def tag() -> str:
    return uuid.uuid4().hex


def retries(proxy: ProxyProcess, service: str, reason: str | None = None) -> float:
    labels = {"service": f"{service}.{NS}"}
    if reason is not None:
        labels["reason"] = reason
    return proxy.metric_sum("meshproxy_retries_total", **labels)


def endpoints(proxy: ProxyProcess, service: str) -> dict[str, dict]:
    status, body = proxy.admin_get("/endpoints")
    assert status == 200
    return {e["address"]: e for e in json.loads(body)[f"{service}.{NS}"]["endpoints"]}


def is_proxy_error(response: requests.Response, status: int, reason: str) -> bool:
    return (response.status_code == status
            and response.headers.get("x-meshproxy-error") == reason
            and "x-backend" not in response.headers)


# --- which failures are retried ------------------------------------------------------------------


def test_get_on_503_is_retried_twice_then_the_last_503_is_forwarded(proxy, b):
    t = tag()
    response = call(proxy, "always503", f"/echo?{t}")
    # The backend's own 503 (no proxy error), after the first try and 2 retries.
    assert response.status_code == 503
    assert response.headers["x-backend"] == "bad"
    assert "x-meshproxy-error" not in response.headers
    assert response.text == "failing 503\n"
    assert len(b["bad"].requests(f"/echo?{t}")) == 3
    assert retries(proxy, "always503", "503") == 2


@pytest.mark.parametrize("sent", [None, "from-the-app"])
def test_every_try_carries_the_same_request_id(proxy, b, sent):
    t = tag()
    headers = {"x-request-id": sent} if sent else {}
    assert call(proxy, "always503", f"/echo?{t}", headers=headers).status_code == 503
    ids = [r.header("x-request-id") for r in b["bad"].requests(f"/echo?{t}")]
    assert len(ids) == 3
    assert ids[0] is not None and ids == [ids[0]] * 3
    if sent:
        assert ids[0] == sent
    # Added once: no try carries two.
    assert all([k.lower() for k, _ in r.headers].count("x-request-id") == 1
               for r in b["bad"].requests(f"/echo?{t}"))


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "HEAD"])
def test_other_idempotent_methods_are_retried_on_503(proxy, b, method):
    t = tag()
    response = call(proxy, "always503", f"/echo?{t}", method=method)
    assert response.status_code == 503
    assert [r.method for r in b["bad"].requests(f"/echo?{t}")] == [method] * 3


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_non_idempotent_request_on_503_reaches_the_app_once(proxy, b, method):
    t = tag()
    response = call(proxy, "always503", f"/echo?{t}", method=method, data=b"pay 10 EUR")
    assert response.status_code == 503
    assert response.headers["x-backend"] == "bad"
    assert len(b["bad"].requests(f"/echo?{t}")) == 1


def test_post_on_503_is_retried_where_the_policy_allows_non_idempotent_retries(proxy, b):
    t = tag()
    body = os.urandom(1000)
    response = call(proxy, "always503-ni", f"/echo?{t}", method="POST", data=body)
    assert response.status_code == 503
    assert len(b["bad"].requests(f"/echo?{t}")) == 3
    assert b["bad"].bodies_for(f"/echo?{t}") == [hashlib.sha256(body).hexdigest()] * 3
    assert retries(proxy, "always503-ni", "503") == 2


def test_retry_goes_to_the_healthy_instance(proxy, b):
    t = tag()
    answers = [call(proxy, "half503", f"/echo?{t}-{i}") for i in range(6)]
    # Round robin: every other request tries `bad` first and is retried on `good`.
    assert [(r.status_code, r.headers["x-backend"]) for r in answers] == [(200, "good")] * 6
    assert len(b["bad"].requests(f"/echo?{t}")) == 3
    assert len(b["good"].requests(f"/echo?{t}")) == 6
    assert retries(proxy, "half503", "503") == 3


def test_reset_before_the_response_is_retried_for_get_only(proxy, b):
    reset = b["reset"]
    before = reset.requests
    response = call(proxy, "resetting", "/echo")
    assert is_proxy_error(response, 502, "upstream-reset")
    assert reset.requests - before == 3
    assert retries(proxy, "resetting", "reset") == 2

    before = reset.requests
    response = call(proxy, "resetting", "/echo", method="POST", data=b"pay 10 EUR")
    assert is_proxy_error(response, 502, "upstream-reset")
    assert reset.requests - before == 1  # the app may have taken it: never sent twice
    assert retries(proxy, "resetting", "reset") == 2

    before = reset.requests
    response = call(proxy, "resetting-ni", "/echo", method="POST", data=b"pay 10 EUR")
    assert is_proxy_error(response, 502, "upstream-reset")
    assert reset.requests - before == 3


def test_response_cut_off_after_it_started_is_not_retried(proxy, b):
    cut = b["cut"]
    before = cut.requests
    with pytest.raises(requests.exceptions.RequestException):
        call(proxy, "cutting", "/echo").content
    assert cut.requests - before == 1
    assert retries(proxy, "cutting") == 0


def test_connect_failure_is_retried_for_post_and_each_post_reaches_the_app_once(proxy, b):
    t = tag()
    big = os.urandom(1 << 20)  # larger than the retry buffer: retried, since nothing was sent
    small = os.urandom(5000)
    bodies = [big, small, small, big]
    answers = [call(proxy, "half-down", f"/upload?{t}-{i}", method="POST", data=body)
               for i, body in enumerate(bodies)]
    assert [r.status_code for r in answers] == [200] * 4
    for i, (response, body) in enumerate(zip(answers, bodies)):
        assert response.json() == {"bytes": len(body),
                                   "sha256": hashlib.sha256(body).hexdigest()}
        assert len(b["good"].requests(f"/upload?{t}-{i}")) == 1
    # Round robin: the 1st and 3rd requests tried the closed port first.
    assert retries(proxy, "half-down", "connect-failure") == 2


def test_body_up_to_64_kib_is_replayed_intact(proxy, b):
    once = b["once"]
    for size in (1, 64 * 1024):
        t = tag()
        body = os.urandom(size)
        once.fail_next(1)
        response = call(proxy, "once", f"/upload?{t}", method="PUT", data=body)
        digest = hashlib.sha256(body).hexdigest()
        assert response.status_code == 200
        assert response.json() == {"bytes": size, "sha256": digest}
        assert once.bodies_for(f"/upload?{t}") == [digest, digest]


def test_chunked_body_up_to_64_kib_is_replayed_intact(proxy, b):
    once = b["once"]
    t = tag()
    pieces = [os.urandom(16 * 1024) for _ in range(4)]
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    once.fail_next(1)
    response = call(proxy, "once", f"/upload?{t}", method="PUT", data=iter(pieces))
    assert response.status_code == 200
    assert response.json()["sha256"] == digest
    assert once.bodies_for(f"/upload?{t}") == [digest, digest]
    assert all(r.header("transfer-encoding") == "chunked"
               for r in once.requests(f"/upload?{t}"))


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_body_over_64_kib_is_not_retried_once_sent(proxy, b, framing):
    once = b["once"]
    t = tag()
    body = os.urandom(64 * 1024 + 1)
    once.fail_next(1)
    data = body if framing == "length" else iter([body[:40000], body[40000:]])
    response = call(proxy, "once", f"/upload?{t}", method="PUT", data=data)
    assert response.status_code == 503
    assert response.headers["x-backend"] == "once"
    assert once.bodies_for(f"/upload?{t}") == [hashlib.sha256(body).hexdigest()]


def test_large_body_answered_early_is_not_retried(proxy, b):
    """A 503 that comes while a body larger than the retry buffer is still on its way: the
    body could never be sent whole again, so the 503 is the answer."""
    once = b["once"]
    once.read_before_failing = False
    once.fail_next(1)
    t = tag()
    with Conn(proxy.outbound, timeout=5) as conn:
        conn.send(f"PUT /upload?{t} HTTP/1.1\r\nHost: once\r\n"
                  f"Content-Length: {1 << 20}\r\n\r\n".encode() + os.urandom(10000))
        response = conn.read("PUT")
    assert response.status == 503
    assert response.header("x-backend") == "once"
    assert len(once.requests(f"/upload?{t}")) == 1


def test_chunked_body_answered_early_is_not_retried(proxy, b):
    """The same for a chunked body still arriving: nothing says it will fit the buffer."""
    once = b["once"]
    once.read_before_failing = False
    once.fail_next(1)
    t = tag()
    with Conn(proxy.outbound, timeout=5) as conn:
        conn.send(f"PUT /upload?{t} HTTP/1.1\r\nHost: once\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n2710\r\n".encode()
                  + os.urandom(10000) + b"\r\n")
        response = conn.read("PUT")
    assert response.status == 503
    assert response.header("x-backend") == "once"
    assert len(once.requests(f"/upload?{t}")) == 1


def test_route_retry_replaces_the_service_retry(proxy, b):
    good = b["good"]
    routed = {"x-case": "codes"}
    t = tag()
    # The route: 4 retries, on 500 (and connection errors) only.
    assert call(proxy, "retry-routed", f"/status/500?{t}", headers=routed).status_code == 500
    assert len(good.requests(f"/status/500?{t}")) == 5
    assert call(proxy, "retry-routed", f"/status/503?{t}", headers=routed).status_code == 503
    assert len(good.requests(f"/status/503?{t}")) == 1
    assert retries(proxy, "retry-app", "500") == 4
    # The same Service called directly: its policy (defaults: 2 retries on 502, 503, 504).
    t = tag()
    assert call(proxy, "retry-app", f"/status/500?{t}").status_code == 500
    assert len(good.requests(f"/status/500?{t}")) == 1
    assert call(proxy, "retry-app", f"/status/503?{t}").status_code == 503
    assert len(good.requests(f"/status/503?{t}")) == 3
    # The route's retry (3 retries on 500) replaces the Service's. That its backoff (10 ms
    # doubling) replaces the Service's (1 s) is proven on virtual time in
    # tests/unit/dataplane/test_attempts.py; full jitter makes no wall-clock bound tell them apart.
    t = tag()
    response = call(proxy, "retry-routed", f"/status/500?{t}", headers={"x-case": "backoff"})
    assert response.status_code == 500
    assert len(good.requests(f"/status/500?{t}")) == 4
    # The route's retries still keep to the idempotency rule.
    t = tag()
    response = call(proxy, "retry-routed", f"/status/500?{t}", method="POST", headers=routed)
    assert response.status_code == 500
    assert len(good.requests(f"/status/500?{t}")) == 1


# --- timeouts ------------------------------------------------------------------------------------


def test_request_timeout_answers_504_in_about_its_time(proxy, b):
    t = tag()
    response, took = timed(proxy, "req-timeout", f"/slow/3000?{t}")
    assert is_proxy_error(response, 504, "timeout")
    # Not before the 500 ms timeout; that it fires at exactly 500 ms is proven on virtual
    # time (tests/unit/dataplane/test_attempts.py). The 3 s answer never came.
    assert took >= 0.45
    assert len(b["good"].requests(f"/slow/3000?{t}")) == 1
    # A request that answers in time is not affected.
    assert call(proxy, "req-timeout", f"/slow/10?{t}").status_code == 200


def test_per_try_timeout_is_retried_on_the_fast_instance(proxy, b):
    t = tag()
    answers = [timed(proxy, "per-try", f"/echo?{t}-{i}") for i in range(4)]
    for response, took in answers:
        # From `good`: slowpoke (2 s) was given up, not waited for.
        assert (response.status_code, response.headers["x-backend"]) == (200, "good")
    # Round robin: the 1st and 3rd requests tried slowpoke first, for 300 ms (the exact
    # per-try time and backoff are proven on virtual time in tests/unit/dataplane).
    assert answers[0][1] >= 0.28 and answers[2][1] >= 0.28
    assert len(b["slowpoke"].requests(f"/echo?{t}")) == 2
    assert len(b["good"].requests(f"/echo?{t}")) == 4
    assert retries(proxy, "per-try", "timeout") == 2


def test_per_try_timeout_on_every_try_answers_504(proxy, b):
    t = tag()
    response, took = timed(proxy, "per-try-all", f"/slow/2000?{t}")
    assert is_proxy_error(response, 504, "timeout")
    # Three tries of 300 ms (and backoffs between them): not sooner.
    assert took >= 0.85
    assert len(b["good"].requests(f"/slow/2000?{t}")) == 3
    assert retries(proxy, "per-try-all", "timeout") == 2


def test_per_try_timeout_is_not_retried_for_post(proxy, b):
    t = tag()
    response, took = timed(proxy, "per-try-slow", f"/echo?{t}", method="POST", data=b"order")
    assert is_proxy_error(response, 504, "timeout")  # slowpoke's 2 s answer never came
    assert took >= 0.28
    assert len(b["slowpoke"].requests(f"/echo?{t}")) == 1
    assert retries(proxy, "per-try-slow") == 0


def test_request_timeout_bounds_every_try_and_backoff(proxy, b):
    t = tag()
    response, took = timed(proxy, "deadline", f"/slow/3000?{t}")
    assert is_proxy_error(response, 504, "timeout")
    # 5 retries of 250 ms would take over 1.25 s: the 600 ms request timeout ends them (at
    # exactly 600 ms, as tests/unit/dataplane/test_attempts.py proves on virtual time).
    assert took >= 0.55
    assert 1 <= len(b["good"].requests(f"/slow/3000?{t}")) <= 3


def test_route_timeouts_replace_the_service_timeouts(proxy, b):
    t = tag()
    # The Service's own request timeout is 150 ms (the 400 ms answer never came)...
    response, took = timed(proxy, "route-timeouts-app", f"/slow/400?{t}")
    assert is_proxy_error(response, 504, "timeout")
    assert took >= 0.14
    # ...the route's is 600 ms: the same request through the route succeeds.
    response = call(proxy, "route-timeouts", f"/slow/400?{t}", headers={"x-case": "request"})
    assert response.status_code == 200
    response, took = timed(proxy, "route-timeouts", f"/slow/2000?{t}",
                           headers={"x-case": "request"})
    assert is_proxy_error(response, 504, "timeout")
    assert took >= 0.55  # the route's 600 ms (exactly, on virtual time: tests/unit/dataplane)
    assert len(b["good"].requests(f"/slow/2000?{t}")) == 1


def test_route_backend_request_timeout_bounds_each_try(proxy, b):
    t = tag()
    response, took = timed(proxy, "route-timeouts", f"/slow/2000?{t}",
                           headers={"x-case": "backend-request"})
    assert is_proxy_error(response, 504, "timeout")
    assert took >= 0.85  # three tries of the route's 300 ms, not its 3 s request timeout
    assert len(b["good"].requests(f"/slow/2000?{t}")) == 3
    assert retries(proxy, "route-timeouts-app", "timeout") == 2


# --- the retry budget ----------------------------------------------------------------------------


def test_retry_budget_keeps_retries_to_20_percent_plus_10_per_second(proxy, b):
    t = tag()
    count = 200

    def one(i: int) -> int:
        return call(proxy, "budget", f"/echo?{t}-{i}").status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(count)))
    assert statuses == [503] * count
    received = len(b["bad"].requests(f"/echo?{t}")) + len(b["bad2"].requests(f"/echo?{t}"))
    made = retries(proxy, "budget")
    assert received == count + made
    # 20% of 200 requests, plus 10 per second over the 10 s window (the defaults), where
    # 2 retries each would have been 400.
    assert 0 < made <= 0.2 * count + 10 * 10
    assert proxy.metric_sum("meshproxy_retries_budget_exhausted_total",
                            service=f"budget.{NS}") > 0


# --- circuit breaking ----------------------------------------------------------------------------


def test_failing_endpoint_is_ejected_probed_once_and_brought_back(proxy, b):
    flappy = b["flappy"]
    flappy.status = 503
    address = flappy.address
    t = tag()

    def send(n: int, prefix: str) -> list[int]:
        return [call(proxy, "breaker", f"/echo?{t}-{prefix}-{i}").status_code for i in range(n)]

    def seen() -> int:
        return len(flappy.requests(f"/echo?{t}"))

    def ejections() -> float:
        return proxy.metric_sum("meshproxy_endpoint_ejections_total",
                                service=f"breaker.{NS}", endpoint=address)

    # Round robin over 3: every third request tries flappy first; 5 failures in a row eject it.
    assert send(15, "eject") == [200] * 15
    assert seen() == 5
    assert ejections() == 1
    state = endpoints(proxy, "breaker")[address]
    assert state["state"] == "ejected"
    assert state["ejected_until"] is not None
    # At most the 1 s base time ±10% (the exact times, and the doubling below, are proven on
    # virtual time in tests/unit/dataplane/test_tries.py; time left only shrinks).
    assert state["ejected_for_seconds"] <= 1.1
    assert proxy.metric_sum("meshproxy_endpoints", service=f"breaker.{NS}",
                            state="ejected") == 1
    # While ejected it gets nothing.
    assert send(10, "out") == [200] * 10
    assert seen() == 5

    # Its time is up: exactly one request probes it, even among concurrent ones; it still
    # fails, so it is ejected again, for about twice as long.
    wait_for(lambda: endpoints(proxy, "breaker")[address]["ejected_for_seconds"] == 0,
             timeout=3, what="the ejection time to pass")
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: call(proxy, "breaker", f"/echo?{t}-probe-{i}")
                                 .status_code, range(6)))
    assert statuses == [200] * 6
    assert seen() == 6
    assert ejections() == 2
    state = endpoints(proxy, "breaker")[address]
    assert state["state"] == "ejected"
    assert state["ejected_for_seconds"] <= 2.2

    # Healthy again: the next probe brings it back, and it takes its share once more.
    flappy.status = None
    wait_for(lambda: endpoints(proxy, "breaker")[address]["ejected_for_seconds"] == 0,
             timeout=4, what="the second ejection time to pass")
    assert send(1, "probe2") == [200]
    assert seen() == 7
    assert endpoints(proxy, "breaker")[address]["state"] == "ready"
    assert proxy.metric_sum("meshproxy_endpoints", service=f"breaker.{NS}",
                            state="ready") == 3
    assert send(6, "back") == [200] * 6
    assert seen() == 9
    assert ejections() == 2


def test_probe_whose_client_went_away_is_sent_again_by_the_next_request(proxy, b):
    flappy = b["flappy"]
    flappy.status = 503
    address = flappy.address
    t = tag()
    for i in range(15):
        assert call(proxy, "breaker-lost", f"/echo?{t}-{i}").status_code == 200
    assert endpoints(proxy, "breaker-lost")[address]["state"] == "ejected"
    wait_for(lambda: endpoints(proxy, "breaker-lost")[address]["ejected_for_seconds"] == 0,
             timeout=3, what="the ejection time to pass")
    # The probe is slow and its client gives up (a reset): the probe has no outcome...
    flappy.status = None
    flappy.delay = 2.0
    with Conn(proxy.outbound) as conn:
        conn.send(f"GET /echo?{t}-gone HTTP/1.1\r\nHost: breaker-lost\r\n\r\n".encode())
        wait_for(lambda: flappy.requests(f"/echo?{t}-gone"), timeout=5, what="the probe")
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: endpoints(proxy, "breaker-lost")[address]["in_flight"] == 0, timeout=5,
             what="the proxy to drop the probe")
    # ...so the next request probes it again (not only after the 30 s maxEjectionTime).
    flappy.delay = 0.0
    response = call(proxy, "breaker-lost", f"/echo?{t}-again")
    assert (response.status_code, response.headers["x-backend"]) == (200, "flappy")
    assert endpoints(proxy, "breaker-lost")[address]["state"] == "ready"


def test_no_more_than_max_ejection_percent_of_endpoints_are_ejected(proxy, b):
    t = tag()
    statuses = [call(proxy, "two-bad", f"/echo?{t}-{i}").status_code for i in range(30)]
    assert statuses == [200] * 30  # two failing instances of three: the retries find `good`
    states = sorted(e["state"] for e in endpoints(proxy, "two-bad").values())
    assert states == ["ejected", "ready", "ready"]  # 50% of 3 is 1
    assert proxy.metric_sum("meshproxy_endpoint_ejections_total",
                            service=f"two-bad.{NS}") == 1
    assert proxy.metric_sum("meshproxy_endpoints", service=f"two-bad.{NS}",
                            state="ejected") == 1


def test_lone_endpoint_is_never_ejected_by_default(proxy, b):
    for _ in range(4):  # 12 connect failures in a row
        assert is_proxy_error(call(proxy, "lone-down", "/echo"), 502, "connect-failure")
    assert [e["state"] for e in endpoints(proxy, "lone-down").values()] == ["ready"]
    assert retries(proxy, "lone-down", "connect-failure") == 8


def test_no_healthy_endpoints_only_when_none_may_be_used(proxy, b):
    # maxEjectionPercent 100: the lone endpoint may be ejected, and then nothing is left.
    assert is_proxy_error(call(proxy, "lone-down-eject", "/echo"), 502, "connect-failure")
    # The 5th failure in a row (the second request's second try) ejects it: that request's
    # retry, and every request after it, find nothing to send to.
    answers = [call(proxy, "lone-down-eject", "/echo") for _ in range(3)]
    assert [e["state"] for e in endpoints(proxy, "lone-down-eject").values()] == ["ejected"]
    assert all(is_proxy_error(r, 503, "no-healthy-endpoints") for r in answers)
    response, took = timed(proxy, "lone-down-eject", "/echo")
    assert is_proxy_error(response, 503, "no-healthy-endpoints")
    assert took < 0.5


# --- limits --------------------------------------------------------------------------------------


def test_max_requests_answers_503_overloaded_at_once(proxy, b):
    good = b["good"]
    t = tag()
    with ThreadPoolExecutor(5) as pool:
        slow = [pool.submit(call, proxy, "limited", f"/slow/1000?{t}-{i}") for i in range(2)]
        wait_for(lambda: len(good.requests(f"/slow/1000?{t}")) == 2, timeout=5,
                 what="two requests in flight")
        extra = [pool.submit(timed, proxy, "limited", f"/slow/1000?{t}-x{i}") for i in range(3)]
        for future in extra:
            response, took = future.result()
            assert is_proxy_error(response, 503, "overloaded")
            assert response.headers["x-meshproxy-overloaded"] == "true"
            assert took < 0.5
        assert [f.result().status_code for f in slow] == [200, 200]
    assert len(good.requests(f"/slow/1000?{t}")) == 2
    # The limit counts requests in flight: with those done, there is room again.
    assert call(proxy, "limited", f"/slow/10?{t}").status_code == 200


def test_idle_connections_never_count_against_max_connections(proxy, b):
    """maxConnections 2 over 3 endpoints, one request at a time: the third endpoint's first
    request finds two idle connections to the others, and one of them makes room."""
    t = tag()
    answers = [call(proxy, "conn-limited", f"/echo?{t}-{i}") for i in range(6)]
    assert [r.status_code for r in answers] == [200] * 6
    assert sorted(r.headers["x-backend"] for r in answers) == ["good", "good", "good2",
                                                               "good2", "good3", "good3"]
    assert sum(e["idle_connections"] for e in endpoints(proxy, "conn-limited").values()) <= 2
    # Two connections busy: a request that needs a third gets 503 overloaded at once.
    t = tag()

    def slow_seen() -> int:
        return sum(len(b[n].requests(f"/slow/1000?{t}")) for n in ("good", "good2", "good3"))

    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(call, proxy, "conn-limited", f"/slow/1000?{t}-{i}") for i in range(2)]
        wait_for(lambda: slow_seen() == 2, timeout=5, what="two requests in flight")
        response, took = timed(proxy, "conn-limited", f"/slow/1000?{t}-x")
        assert is_proxy_error(response, 503, "overloaded")
        assert response.headers["x-meshproxy-overloaded"] == "true"
        assert took < 0.5
        assert [f.result().status_code for f in slow] == [200, 200]
    assert slow_seen() == 2


def test_max_connections_holds_for_a_burst(proxy, b):
    """Connections still being opened count: a burst cannot open past the limit."""
    good = b["good"]
    t = tag()
    # The slow answers outlast the burst by far, so no request of it can find a connection
    # that a finished one gave back (a thread starting late on a loaded machine could,
    # with a short one).
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: call(proxy, "burst-limited", f"/slow/4000?{t}-{i}"),
                                range(6)))
    assert sorted(r.status_code for r in answers) == [200, 200, 503, 503, 503, 503]
    assert all(is_proxy_error(r, 503, "overloaded") for r in answers if r.status_code == 503)
    assert len(good.requests(f"/slow/4000?{t}")) == 2


# --- the idle race -------------------------------------------------------------------------------


def test_backend_closing_idle_connections_early_costs_no_request(proxy, b):
    idler = b["idler"]
    t = tag()
    address = idler.address
    for i in range(5):
        if i:
            # The backend closes the idle connection after 0.2 s, and the proxy notices and
            # drops it from its pool (its pool keeps idle connections for 10 s).
            wait_for(lambda: idler.idle_closes > closes, timeout=3, what="an idle close")
            wait_for(lambda: endpoints(proxy, "idle-closer")[address]["idle_connections"] == 0,
                     timeout=3, what="the proxy to drop the closed connection")
        closes = idler.idle_closes
        method = "POST" if i % 2 else "GET"
        response = call(proxy, "idle-closer", f"/x?{t}-{i}", method=method, data=b"order")
        assert response.status_code == 200
    assert [a.method for a in idler.answered_for(f"/x?{t}")] == ["GET", "POST"] * 2 + ["GET"]
    assert idler.dropped_for(f"/x?{t}") == []
    assert retries(proxy, "idle-closer") == 0


def test_request_on_a_connection_the_server_just_closed_goes_again_on_a_fresh_one(proxy, b):
    racer = b["racer"]
    t = tag()
    # The server answers one request per connection and closes on the next without reading
    # it: every GET after the first lands on a connection that is about to go.
    for i in range(4):
        response = call(proxy, "race", f"/g?{t}-{i}")
        assert response.status_code == 200
    assert len(racer.answered_for(f"/g?{t}")) == 4
    assert len(racer.dropped_for(f"/g?{t}")) == 3
    assert retries(proxy, "race") == 0  # not a retry: nothing reached the app

    # A POST in the same race is not sent again: the proxy cannot know the app did not take it.
    response = call(proxy, "race", f"/p?{t}", method="POST", data=b"pay 10 EUR")
    assert is_proxy_error(response, 502, "upstream-reset")
    assert racer.answered_for(f"/p?{t}") == []
    assert racer.dropped_for(f"/p?{t}") == [("POST", f"/p?{t}")]


def test_idle_race_resends_post_where_the_policy_allows(proxy, b):
    racer = b["racer_ni"]
    t = tag()
    assert call(proxy, "race-ni", f"/g?{t}").status_code == 200
    body = os.urandom(3000)
    response = call(proxy, "race-ni", f"/p?{t}", method="POST", data=body)
    assert response.status_code == 200
    [answered] = racer.answered_for(f"/p?{t}")
    assert answered.body_sha256 == hashlib.sha256(body).hexdigest()
    assert racer.dropped_for(f"/p?{t}") == [("POST", f"/p?{t}")]
