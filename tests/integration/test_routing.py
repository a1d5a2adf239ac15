"""HTTPRoute routing through a real `meshproxy proxy` process (spec §3 `HTTPRoute`, §4, §6), as a
client and the backends see it: status, bytes, headers, which backend got the request, metrics.

Routes attach to Services through `parentRefs`; requests pick their rule here by an `x-case`
header (or by path where the path is what is tested), so one proxy carries every case. That
proxy runs on uvloop (the default) and on the standard asyncio loop.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests

from support.backend import HttpBackend
from support.proxy import ProxyProcess, closed_port, mesh_yaml, wait_for
from support.rawbackend import RawBackend
from support.rawhttp import Conn, get

SPEC_ROUTES = Path(__file__).resolve().parents[1] / "spec_examples" / "routes.yaml"
NS = "default"


# --- configuration -------------------------------------------------------------------------------


def http_route(name: str, parent: str, rules: list[dict], *, parent_port: int | None = None,
               parent_kind: str | None = "Service") -> dict:
    parent_ref: dict = {"name": parent}
    if parent_kind is not None:
        parent_ref.update(group="", kind=parent_kind)
    if parent_port is not None:
        parent_ref["port"] = parent_port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"parentRefs": [parent_ref], "rules": rules},
    }


def case(name: str, *, path: str = "/", **rule) -> dict:
    """A rule named `name` that takes requests with `x-case: name` under PathPrefix `path`."""
    return {"name": name,
            "matches": [{"path": {"type": "PathPrefix", "value": path},
                         "headers": [{"name": "x-case", "value": name}]}],
            **rule}


def by_path(name: str | None, path: str, **rule) -> dict:
    """A rule (named `name`, unless None) that takes requests under PathPrefix `path`."""
    named = {"name": name} if name is not None else {}
    return {**named, "matches": [{"path": {"type": "PathPrefix", "value": path}}], **rule}


def replace_prefix(value: str) -> dict:
    return {"type": "ReplacePrefixMatch", "replacePrefixMatch": value}


def to(*services: str | tuple[str, int], **extra) -> list[dict]:
    """backendRefs: a Service name, or (name, weight)."""
    refs = []
    for service in services:
        name, weight = (service, None) if isinstance(service, str) else service
        ref: dict = {"name": name, "port": 80}
        if weight is not None:
            ref["weight"] = weight
        refs.append(ref | extra)
    return refs


def header_filter(kind: str, set=None, add=None, remove=None) -> dict:
    body: dict = {}
    if set:
        body["set"] = [{"name": n, "value": v} for n, v in set.items()]
    if add:
        body["add"] = [{"name": n, "value": v} for n, v in add.items()]
    if remove:
        body["remove"] = list(remove)
    key = kind[0].lower() + kind[1:]
    return {"type": kind, key: body}


def redirect(**fields) -> dict:
    return {"type": "RequestRedirect", "requestRedirect": fields}


def mirror(service: str, **fields) -> dict:
    return {"type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": service, "port": 80}, **fields}}


def rewrite(**fields) -> dict:
    return {"type": "URLRewrite", "urlRewrite": fields}


# Redirect rules: (path, filter fields, request path, expected status, expected Location).
REDIRECTS = [
    ("/r/keep", {"statusCode": 301}, "/r/keep/x?q=1", 301, "http://web/r/keep/x?q=1"),
    ("/r/default", {}, "/r/default/x", 302, "http://web/r/default/x"),
    ("/r/scheme", {"scheme": "https", "statusCode": 301}, "/r/scheme/x?q=1", 301,
     "https://web/r/scheme/x?q=1"),
    ("/r/host", {"hostname": "elsewhere.example"}, "/r/host/x?q=1", 302,
     "http://elsewhere.example/r/host/x?q=1"),
    ("/r/port", {"port": 8080, "statusCode": 303}, "/r/port/x?q=1", 303,
     "http://web:8080/r/port/x?q=1"),
    ("/r/http-443", {"port": 443, "statusCode": 303}, "/r/http-443", 303,
     "http://web:443/r/http-443"),
    ("/r/https-443", {"scheme": "https", "port": 443, "statusCode": 307}, "/r/https-443/x", 307,
     "https://web/r/https-443/x"),
    ("/r/full", {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"},
                 "statusCode": 307}, "/r/full/x/y?q=1", 307, "http://web/new?q=1"),
    ("/r/prefix", {"path": replace_prefix("/moved"), "statusCode": 308}, "/r/prefix/x/y?q=1",
     308, "http://web/moved/x/y?q=1"),
    ("/r/all", {"scheme": "https", "hostname": "h.example", "port": 8443, "statusCode": 308,
                "path": replace_prefix("/")},
     "/r/all/x?q=1", 308, "https://h.example:8443/x?q=1"),
]


@pytest.fixture(scope="module")
def v1() -> HttpBackend:
    server = HttpBackend("v1").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def v2() -> HttpBackend:
    server = HttpBackend("v2").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def spare() -> HttpBackend:
    """The backend of a weight-0 Service: it must never be chosen."""
    server = HttpBackend("spare").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mirror_backend() -> HttpBackend:
    server = HttpBackend("mirror").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_mirror_backend() -> HttpBackend:
    server = HttpBackend("slow-mirror").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def closing() -> RawBackend:
    """A mirror that answers `Connection: close` but leaves the connection open."""
    server = RawBackend(
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fast() -> RawBackend:
    """Answers every request at once, whatever its path (so `/slow/3000` is fast here)."""
    server = RawBackend(
        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-backend: fast\r\n\r\nfast").start()
    yield server
    server.stop()


def web_routes() -> list[dict]:
    rules = [
        case("split", backendRefs=to(("v1", 90), ("v2", 10))),
        case("zero", backendRefs=to(("v1", 1), ("spare", 0))),
        case("missing", backendRefs=to("nowhere")),
        case("partly-missing", backendRefs=to(("v1", 0), ("nowhere", 1))),
        case("req-headers", backendRefs=to("v1"), filters=[header_filter(
            "RequestHeaderModifier", set={"X-Set": "new", "x-route": "web"},
            add={"x-add": "added", "X-Multi": "three"}, remove=["X-Remove", "x-remove-2"])]),
        case("resp-headers", backendRefs=to("v1"), filters=[header_filter(
            "ResponseHeaderModifier", set={"X-Echo-Method": "overridden", "x-resp-set": "s"},
            add={"x-resp-add": "a"}, remove=["Content-Type"])]),
        case("per-backend", backendRefs=[
            {"name": "v1", "port": 80, "weight": 1, "filters": [
                header_filter("RequestHeaderModifier", set={"x-which": "v1"}),
                header_filter("ResponseHeaderModifier", set={"x-served-by": "v1"})]},
            {"name": "v2", "port": 80, "weight": 1, "filters": [
                header_filter("RequestHeaderModifier", set={"x-which": "v2"}),
                header_filter("ResponseHeaderModifier", set={"x-served-by": "v2"})]},
        ], filters=[header_filter("RequestHeaderModifier", set={"x-which": "rule"},
                                  add={"x-rule-level": "yes"})]),
        case("host-rewrite", backendRefs=to("v1"), filters=[rewrite(hostname="rewritten.example")]),
        case("host-set", backendRefs=to("v1"), filters=[header_filter(
            "RequestHeaderModifier", set={"Host": "set.example"})]),
        case("host-remove", backendRefs=to("v1"), filters=[header_filter(
            "RequestHeaderModifier", remove=["host"])]),
        case("id-set", backendRefs=to("v1"), filters=[header_filter(
            "RequestHeaderModifier", set={"X-Request-Id": "from-the-route"})]),
        case("id-remove", backendRefs=to("v1"), filters=[header_filter(
            "RequestHeaderModifier", remove=["x-request-id"])]),
        case("utf8", backendRefs=to("v1"), filters=[header_filter(
            "RequestHeaderModifier", set={"x-city": "Zürich", "x-name": "東京"})]),
        case("framing", backendRefs=to("v1"), filters=[
            header_filter("RequestHeaderModifier", set={"Content-Length": "1000"},
                          add={"Transfer-Encoding": "chunked"}),
            header_filter("ResponseHeaderModifier", set={"Content-Length": "1000",
                                                         "Connection": "close"})]),
        case("mirror", backendRefs=to("v1"), filters=[mirror("mirror")]),
        case("mirror-half", backendRefs=to("v1"), filters=[mirror("mirror", percent=50)]),
        case("mirror-down", backendRefs=to("v1"), filters=[mirror("down")]),
        case("mirror-unknown", backendRefs=to("v1"), filters=[mirror("no-such-service")]),
        case("mirror-closing", backendRefs=to("v1"), filters=[mirror("closing")]),
        by_path("mirror-slow", "/slow", backendRefs=to("fast"), filters=[mirror("slow-mirror")]),
        by_path("full-path", "/old-full", backendRefs=to("v1"), filters=[
            rewrite(path={"type": "ReplaceFullPath", "replaceFullPath": "/headers"})]),
        by_path("strip-prefix", "/strip/", backendRefs=to("v1"),
                filters=[rewrite(path=replace_prefix("/"))]),
        by_path("swap-prefix", "/v9/stuff", backendRefs=to("v1"),
                filters=[rewrite(path=replace_prefix("/echo"))]),
        by_path("go", "/go", filters=[redirect(hostname="landing",
                                               path=replace_prefix("/landed"))]),
    ]
    for path, fields, _, _, _ in REDIRECTS:
        rules.append(by_path("redirect" + path.replace("/", "-"), path,
                             filters=[redirect(**fields)]))
    return rules


def routing_mesh(backends: dict) -> str:
    b = backends
    return mesh_yaml(
        {
            "plain": [b["a"].address],
            "web": [b["a"].address],  # its own endpoints: used only when no route attaches
            "v1": [b["v1"].address],
            "v2": [b["v2"].address],
            "spare": [b["spare"].address],
            "fast": [b["fast"].address],
            "mirror": [b["mirror"].address],
            "slow-mirror": [b["slow-mirror"].address],
            "down": [f"127.0.0.1:{closed_port()}"],
            "closing": [b["closing"].address],
            "landing": [],
            "ported": [b["a"].address],
            "wrong-port": [b["a"].address],
            "gateway-parent": [b["a"].address],
            "web8080": [],
        },
        ports={"web8080": 8080},
        documents=[
            http_route("web", "web", web_routes()),
            http_route("indexed", "web", [
                {"matches": [{"headers": [{"name": "x-case", "value": "index-0"}]}],
                 "backendRefs": to("v2")},
                {"matches": [{"headers": [{"name": "x-case", "value": "index-1"}]}],
                 "backendRefs": to("v1")},
            ]),
            http_route("landing", "landing", [
                by_path("landed", "/landed", backendRefs=to("v2"),
                        filters=[rewrite(path=replace_prefix("/"))]),
            ]),
            http_route("ported", "ported", [case("ported", backendRefs=to("v2"))], parent_port=80),
            http_route("wrong-port", "wrong-port", [case("ported", backendRefs=to("v2"))],
                       parent_port=9999),
            http_route("gateway-parent", "gateway-parent", [case("ported", backendRefs=to("v2"))],
                       parent_kind=None),
            http_route("web8080", "web8080", [
                by_path("keep-port", "/keep", filters=[redirect()]),
                by_path("to-https", "/secure", filters=[redirect(scheme="https", statusCode=301)]),
            ]),
        ],
    )


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(request, tmp_path_factory, backend, v1, v2, spare, fast, closing, mirror_backend,
          slow_mirror_backend) -> ProxyProcess:
    mesh = routing_mesh({"a": backend, "v1": v1, "v2": v2, "spare": spare, "fast": fast,
                         "closing": closing, "mirror": mirror_backend,
                         "slow-mirror": slow_mirror_backend})
    running = ProxyProcess(tmp_path_factory.mktemp(f"routing-{request.param}"), mesh,
                           name="routing", uvloop=request.param == "uvloop").start()
    yield running
    running.stop()


@pytest.fixture
def session():
    with requests.Session() as s:
        s.trust_env = False  # no HTTP_PROXY from the environment between test and proxy
        yield s


def tag() -> str:
    return uuid.uuid4().hex


def send(session, proxy: ProxyProcess, path: str, *, host: str = "web", case_: str | None = None,
         method: str = "GET", headers: dict | None = None, **kwargs) -> requests.Response:
    all_headers = {"Host": host, **(headers or {})}
    if case_ is not None:
        all_headers["x-case"] = case_
    return session.request(method, f"http://127.0.0.1:{proxy.outbound}{path}",
                           headers=all_headers, allow_redirects=False, timeout=10, **kwargs)


def requests_total(proxy: ProxyProcess) -> Counter:
    """meshproxy_requests_total by (service, route, code), outbound only."""
    out: Counter = Counter()
    for (name, labels), value in proxy.metrics().items():
        ls = dict(labels)
        if name == "meshproxy_requests_total" and ls["direction"] == "outbound":
            out[(ls["service"], ls["route"], ls["code"])] += value
    return out


# --- attachment: parentRefs, 404 no-route, Services without routes -------------------------------


def test_service_without_routes_forwards_to_its_own_endpoints(proxy, backend, session):
    t = tag()
    response = send(session, proxy, f"/echo?{t}", host="plain", method="POST", data=b"hi")
    assert (response.status_code, response.content) == (200, b"hi")
    assert response.headers["x-backend"] == "a"
    [seen] = backend.requests(f"/echo?{t}")
    assert seen.header("host") == "plain"


def test_unmatched_request_to_a_service_with_routes_is_404_no_route(proxy, backend, v1, v2,
                                                                     session):
    t = tag()
    for response in (send(session, proxy, f"/echo?{t}"),
                     send(session, proxy, f"/echo?{t}", case_="no-such-case"),
                     send(session, proxy, f"/echo?{t}", method="POST", data=b"body")):
        assert response.status_code == 404
        assert response.headers["x-meshproxy-error"] == "no-route"
    # web's own endpoint is never used once routes are attached
    assert not backend.requests(f"/echo?{t}") and not v1.requests(f"/echo?{t}")
    # and the connection stays usable after the 404 (the body was read)
    assert send(session, proxy, f"/echo?{t}", case_="split").status_code == 200


def test_parent_ref_with_the_service_port_attaches(proxy, v2, session):
    t = tag()
    response = send(session, proxy, f"/echo?{t}", host="ported", case_="ported")
    assert (response.status_code, response.headers["x-backend"]) == (200, "v2")
    missed = send(session, proxy, f"/echo?{t}", host="ported")
    assert (missed.status_code, missed.headers["x-meshproxy-error"]) == (404, "no-route")


@pytest.mark.parametrize("service", ["wrong-port", "gateway-parent"])
def test_route_that_does_not_attach_leaves_the_service_alone(proxy, backend, v2, session,
                                                            service):
    # wrong-port: parentRef names another port; gateway-parent: a parentRef without
    # `kind: Service` is a Gateway, which a mesh Service is not.
    t = tag()
    response = send(session, proxy, f"/echo?{t}", host=service, case_="ported")
    assert (response.status_code, response.headers["x-backend"]) == (200, "a")
    assert backend.requests(f"/echo?{t}") and not v2.requests(f"/echo?{t}")


def test_admin_config_lists_the_routes_of_each_service(proxy):
    status, body = proxy.admin_get("/config")
    assert status == 200
    services = json.loads(body)["config"]["services"]
    assert services["web.default"]["routes"] == ["default/web", "default/indexed"]
    assert services["ported.default"]["routes"] == ["default/ported"]
    assert services["landing.default"]["routes"] == ["default/landing"]
    for name in ("plain", "wrong-port", "gateway-parent", "v1"):
        assert services[f"{name}.default"]["routes"] == [], name


# --- weighted backends ---------------------------------------------------------------------------


def test_weighted_split_lands_in_proportion_and_keeps_the_authority(proxy, v1, v2, session):
    t = tag()
    before = requests_total(proxy)
    served = Counter()
    for i in range(400):
        response = send(session, proxy, f"/echo?{t}={i}", case_="split")
        assert response.status_code == 200
        served[response.headers["x-backend"]] += 1
    assert set(served) <= {"v1", "v2"}
    assert 300 <= served["v1"] <= 392, served  # 90/10 is random: generous bounds
    assert served["v1"] + served["v2"] == 400
    # Each backend got exactly the requests it answered, with Host as the client sent it.
    on_v1, on_v2 = v1.requests(f"/echo?{t}="), v2.requests(f"/echo?{t}=")
    assert (len(on_v1), len(on_v2)) == (served["v1"], served["v2"])
    assert {r.header("host") for r in on_v1 + on_v2} == {"web"}
    # Metrics: the backend Service that served it, and the rule's label.
    keys = [(f"{service}.default", "default/web/split", "200") for service in ("v1", "v2")]

    def counted() -> dict:
        now = requests_total(proxy)
        return {key[0]: now[key] - before[key] for key in keys}

    wait_for(lambda: sum(counted().values()) == 400, timeout=5, what="400 requests counted")
    assert counted() == {"v1.default": served["v1"], "v2.default": served["v2"]}


def test_weight_zero_is_never_chosen(proxy, v1, spare, session):
    t = tag()
    for i in range(50):
        response = send(session, proxy, f"/echo?{t}={i}", case_="zero")
        assert (response.status_code, response.headers["x-backend"]) == (200, "v1")
    assert spare.requests() == []
    assert len(v1.requests(f"/echo?{t}=")) == 50


@pytest.mark.parametrize("rule", ["missing", "partly-missing"])
def test_backend_that_names_no_service_is_500_backend_not_found(proxy, v1, session, rule):
    t = tag()
    before = requests_total(proxy)
    for _ in range(3):
        response = send(session, proxy, f"/echo?{t}", case_=rule)
        assert response.status_code == 500
        assert response.headers["x-meshproxy-error"] == "backend-not-found"
    assert not v1.requests(f"/echo?{t}")
    key = ("web.default", f"default/web/{rule}", "500")
    wait_for(lambda: requests_total(proxy)[key] - before[key] == 3, timeout=5,
             what="three 500s counted under the rule")


# --- header modifiers ----------------------------------------------------------------------------


def test_request_header_modifier_reaches_the_backend(proxy, v1, session):
    t = tag()
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", f"/headers?{t}", headers=(
            "x-case: req-headers\r\n"
            "x-set: old\r\nX-SET: older\r\n"
            "x-multi: one\r\nX-Multi: two\r\n"
            "x-remove: gone\r\nX-REMOVE-2: gone too\r\n"
            "x-untouched: kept\r\n")))
    assert response.status == 200
    received = json.loads(response.body)
    by_name: dict[str, list[str]] = {}
    for name, value in received:
        by_name.setdefault(name.lower(), []).append(value)
    assert by_name["x-set"] == ["new"]
    assert by_name["x-route"] == ["web"]
    assert by_name["x-add"] == ["added"]
    assert by_name["x-multi"] == ["one", "two", "three"]
    assert "x-remove" not in by_name and "x-remove-2" not in by_name
    assert by_name["x-untouched"] == ["kept"]
    assert by_name["host"] == ["web"]


def test_response_header_modifier_reaches_the_client(proxy, v1, session):
    t = tag()
    response = send(session, proxy, f"/echo?{t}", case_="resp-headers", method="POST",
                    data=b"payload")
    assert (response.status_code, response.content) == (200, b"payload")
    assert response.headers["x-echo-method"] == "overridden"
    assert response.headers["x-resp-set"] == "s"
    assert response.headers["x-resp-add"] == "a"
    assert "content-type" not in response.headers
    assert response.headers["x-backend"] == "v1"
    # What the backend received is not touched by a response modifier.
    assert v1.requests(f"/echo?{t}")[0].header("x-resp-set") is None


def test_backend_filters_apply_after_the_rule_filters_to_that_backend_only(proxy, v1, v2,
                                                                            session):
    t = tag()
    seen = Counter()
    for i in range(40):
        response = send(session, proxy, f"/echo?{t}={i}", case_="per-backend")
        assert response.status_code == 200
        backend_name = response.headers["x-backend"]
        assert response.headers["x-served-by"] == backend_name
        seen[backend_name] += 1
    assert seen["v1"] and seen["v2"], seen
    for server in (v1, v2):
        for received in server.requests(f"/echo?{t}="):
            assert received.header("x-which") == server.name  # backend's set wins over the rule's
            assert received.header("x-rule-level") == "yes"


def test_header_values_outside_latin_1_are_sent_as_utf_8(proxy, v1, session):
    t = tag()
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", f"/headers?{t}", headers="x-case: utf8\r\n"))
        assert response.status == 200
        # the connection is still good for another request
        assert conn.request(get("web", f"/echo?{t}", headers="x-case: utf8\r\n")).status == 200
    received = dict((k.lower(), v) for k, v in json.loads(response.body))
    # aiohttp reads header bytes as latin-1: undo that to see the bytes sent
    assert received["x-city"].encode("latin-1") == "Zürich".encode()
    assert received["x-name"].encode("latin-1") == "東京".encode()


def test_header_modifiers_cannot_break_message_framing(proxy, v1, session):
    # Content-Length, Transfer-Encoding and Connection are the proxy's to write, hop by hop.
    t = tag()
    with Conn(proxy.outbound) as conn:
        response = conn.request(get("web", f"/echo?{t}", method="POST", body=b"0123456789",
                                    headers="x-case: framing\r\n"))
        assert (response.status, response.body) == (200, b"0123456789")
        assert response.header_all("content-length") == ["10"]
        assert response.header("connection") is None
        again = conn.request(get("web", f"/echo?{t}", headers="x-case: framing\r\n"))
        assert (again.status, again.body) == (200, b"")
    [first, second] = v1.requests(f"/echo?{t}")
    assert first.body_len == 10
    assert [v for k, v in first.headers if k.lower() == "content-length"] == ["10"]
    assert first.header("transfer-encoding") is None
    assert second.body_len == 0


def test_host_set_by_a_header_modifier_is_the_host_sent(proxy, v1, session):
    t = tag()
    assert send(session, proxy, f"/echo?{t}", case_="host-set").status_code == 200
    [seen] = v1.requests(f"/echo?{t}")
    assert [v for k, v in seen.headers if k.lower() == "host"] == ["set.example"]


def test_host_is_never_removed(proxy, v1, session):
    # HTTP/1.1 requires Host (RFC 9112 §3.2): a request without it would be refused upstream.
    t = tag()
    response = send(session, proxy, f"/echo?{t}", case_="host-remove")
    assert (response.status_code, response.headers["x-backend"]) == (200, "v1")
    [seen] = v1.requests(f"/echo?{t}")
    assert [v for k, v in seen.headers if k.lower() == "host"] == ["web"]


@pytest.mark.parametrize("sent", [None, "from-the-client"])
def test_request_id_set_by_a_route_is_the_only_one(proxy, v1, session, sent):
    t = tag()
    headers = {"x-request-id": sent} if sent else None
    assert send(session, proxy, f"/echo?{t}", case_="id-set", headers=headers).ok
    [seen] = v1.requests(f"/echo?{t}")
    assert [v for k, v in seen.headers if k.lower() == "x-request-id"] == ["from-the-route"]


def test_request_id_removed_by_a_route_is_replaced_by_a_new_one(proxy, v1, session):
    # Spec §4: x-request-id is added when absent; after the route removed it, it is absent.
    t = tag()
    assert send(session, proxy, f"/echo?{t}", case_="id-remove",
                headers={"x-request-id": "from-the-client"}).ok
    [seen] = v1.requests(f"/echo?{t}")
    ids = [v for k, v in seen.headers if k.lower() == "x-request-id"]
    assert len(ids) == 1 and ids[0] != "from-the-client" and len(ids[0]) == 36, ids


# --- URL rewrites --------------------------------------------------------------------------------


def test_url_rewrite_hostname_is_the_host_the_backend_sees(proxy, v1, session):
    t = tag()
    response = send(session, proxy, f"/echo?{t}", case_="host-rewrite")
    assert (response.status_code, response.headers["x-backend"]) == (200, "v1")
    [seen] = v1.requests(f"/echo?{t}")
    assert seen.header("host") == "rewritten.example"
    assert [k for k, _ in seen.headers if k.lower() == "host"] == ["Host"]  # one Host, not two


@pytest.mark.parametrize("sent, expected, status", [
    ("/old-full/a/b?x=1&y=two", "/headers?x=1&y=two", 200),
    ("/old-full", "/headers", 200),
    ("/strip/echo?q=1", "/echo?q=1", 200),
    ("/strip/", "/", 404),  # the backend has no page at / (but it got the request)
    ("/v9/stuff?q=1", "/echo?q=1", 200),
    ("/v9/stuff/more?q=%2F", "/echo/more?q=%2F", 404),
])
def test_path_rewrites_reach_the_backend_with_the_query_kept(proxy, v1, session, sent, expected,
                                                            status):
    t = tag()
    response = send(session, proxy, sent, headers={"x-tag": t})
    assert response.status_code == status
    [seen] = [r for r in v1.requests() if r.header("x-tag") == t]
    assert seen.path == expected
    assert seen.header("host") == "web"


# --- redirects -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, fields, path, status, location", REDIRECTS,
                         ids=[r[0] for r in REDIRECTS])
def test_request_redirect_answers_with_the_exact_location(proxy, backend, v1, v2, session,
                                                          prefix, fields, path, status, location):
    t = tag()
    response = send(session, proxy, path, headers={"x-tag": t})
    assert response.status_code == status
    assert response.headers["location"] == location
    assert response.content == b""
    assert "x-meshproxy-error" not in response.headers
    for server in (backend, v1, v2):
        assert not [r for r in server.requests() if r.header("x-tag") == t]


def test_redirect_keeps_the_connection_and_reaches_no_backend(proxy, backend, v1, v2):
    t = tag()
    with Conn(proxy.outbound) as conn:
        for _ in range(3):
            response = conn.request(get("web:80", f"/r/default/{t}"))
            assert response.status == 302
            assert response.header("location") == f"http://web/r/default/{t}"
        assert conn.request(get("web", f"/echo?{t}", headers="x-case: split\r\n")).status == 200
    assert not any(s.requests(f"/r/default/{t}") for s in (backend, v1, v2))


@pytest.mark.parametrize("host, path, status, location", [
    ("web8080", "/keep/x?q=1", 302, "http://web8080:8080/keep/x?q=1"),
    ("web8080:8080", "/keep/x", 302, "http://web8080:8080/keep/x"),
    ("web8080.default.svc.cluster.local:8080", "/keep", 302,
     "http://web8080.default.svc.cluster.local:8080/keep"),
    ("web8080:8080", "/secure/x", 301, "https://web8080/secure/x"),  # https: 443, left out
])
def test_redirect_without_a_port_uses_the_service_port(proxy, session, host, path, status,
                                                       location):
    response = send(session, proxy, path, host=host)
    assert response.status_code == status
    assert response.headers["location"] == location


def test_curl_follows_a_redirect_to_a_second_route(proxy, v2, tmp_path):
    t = tag()
    headers = tmp_path / "headers.txt"
    result = subprocess.run(
        ["curl", "-sS", "-L", "--max-redirs", "3", "-x", f"http://127.0.0.1:{proxy.outbound}",
         "-D", str(headers), "-o", "-", "-w", "\n%{http_code} %{num_redirects}",
         f"http://web/go/echo?{t}"],
        capture_output=True, timeout=20, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    body, _, summary = result.stdout.decode().rpartition("\n")
    assert summary == "200 1"
    first, final = headers.read_bytes().decode().lower().strip().split("\r\n\r\n")
    assert first.startswith("http/1.1 302")
    assert f"location: http://landing/landed/echo?{t}" in first.splitlines()
    assert final.startswith("http/1.1 200") and "x-backend: v2" in final.splitlines()
    [seen] = v2.requests(f"/echo?{t}")
    assert seen.header("host") == "landing"


# --- mirrors -------------------------------------------------------------------------------------


def test_mirror_gets_a_copy_with_the_body(proxy, v1, mirror_backend, session):
    t = tag()
    response = send(session, proxy, f"/echo?{t}", case_="mirror", method="POST",
                    data=b"a small body", headers={"x-custom": "c"})
    assert (response.status_code, response.content) == (200, b"a small body")
    assert response.headers["x-backend"] == "v1"
    [copy] = wait_for(lambda: [r for r in mirror_backend.requests(f"/echo?{t}") if r.done],
                      timeout=5, what="the mirror's copy")
    assert (copy.method, copy.body_len) == ("POST", 12)
    assert copy.header("x-custom") == "c" and copy.header("host") == "web"
    assert len(v1.requests(f"/echo?{t}")) == 1


def test_mirror_gets_a_copy_of_a_chunked_body_and_of_a_get(proxy, mirror_backend):
    t = tag()
    with Conn(proxy.outbound) as conn:
        response = conn.request(
            f"POST /echo?{t}=chunked HTTP/1.1\r\nHost: web\r\nx-case: mirror\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".encode())
        assert (response.status, response.body) == (200, b"hello world")
        again = conn.request(get("web", f"/echo?{t}=get", headers="x-case: mirror\r\n"))
        assert again.status == 200
    copies = wait_for(lambda: len(done := [r for r in mirror_backend.requests(f"/echo?{t}=")
                                           if r.done]) == 2 and done,
                      timeout=5, what="both copies")
    by_path = {r.path: r for r in copies}
    assert by_path[f"/echo?{t}=chunked"].body_len == 11
    assert by_path[f"/echo?{t}=get"].method == "GET"


def test_mirror_percent_50_copies_about_half(proxy, v1, mirror_backend, session):
    t = tag()
    for i in range(200):
        assert send(session, proxy, f"/echo?{t}={i}", case_="mirror-half").status_code == 200
    # A copy made after all the others (100%): once it arrived, the others have too.
    assert send(session, proxy, f"/echo?{t}=last", case_="mirror").status_code == 200
    wait_for(lambda: mirror_backend.requests(f"/echo?{t}=last"), timeout=5, what="the last copy")
    copies = len(mirror_backend.requests(f"/echo?{t}=")) - 1
    assert 60 <= copies <= 140, copies
    assert len(v1.requests(f"/echo?{t}=")) == 201


def test_mirror_that_answers_connection_close_gets_a_new_connection_per_copy(proxy, closing,
                                                                           session):
    # RFC 9112 §9.6: no further request on a connection after a response with `close`.
    t = tag()
    connections = closing.connections
    for i in range(3):
        assert send(session, proxy, f"/echo?{t}={i}", case_="mirror-closing").status_code == 200
        wait_for(lambda: closing.data().count(f"/echo?{t}=".encode()) == i + 1, timeout=5,
                 what=f"copy {i} at the mirror")
    assert closing.connections - connections == 3


@pytest.mark.parametrize("rule", ["mirror-down", "mirror-unknown"])
def test_mirror_that_is_down_never_fails_the_caller(proxy, v1, session, rule):
    t = tag()
    slowest = 0.0
    for i in range(50):
        started = time.monotonic()
        response = send(session, proxy, f"/echo?{t}={i}", case_=rule, method="POST",
                        data=b"x" * 100)
        slowest = max(slowest, time.monotonic() - started)
        assert (response.status_code, response.content) == (200, b"x" * 100)
    assert slowest < 1.0, slowest
    assert len(v1.requests(f"/echo?{t}=")) == 50
    assert send(session, proxy, f"/echo?{t}", host="plain").status_code == 200


def test_slow_mirror_never_delays_the_caller(proxy, fast, slow_mirror_backend, session):
    t = tag()
    slowest = 0.0
    for i in range(300):
        started = time.monotonic()
        response = send(session, proxy, f"/slow/3000?{t}={i}")
        slowest = max(slowest, time.monotonic() - started)
        assert (response.status_code, response.content) == (200, b"fast")
    assert slowest < 1.0, slowest
    wait_for(lambda: slow_mirror_backend.requests(f"/slow/3000?{t}="), timeout=5,
             what="copies at the slow mirror")
    # Copies under way are bounded (256): past that they are skipped, never queued.
    waiting = [r for r in slow_mirror_backend.requests(f"/slow/3000?{t}=") if not r.done]
    assert 0 < len(waiting) <= 256, len(waiting)
    # The proxy keeps serving everything else.
    assert send(session, proxy, f"/echo?{t}", host="plain").status_code == 200
    assert proxy.admin_get("/ready")[0] == 200


# --- route labels --------------------------------------------------------------------------------


def test_route_label_names_the_rule_or_its_index_and_the_serving_service(proxy, session):
    before = requests_total(proxy)
    t = tag()
    for _ in range(3):
        assert send(session, proxy, f"/echo?{t}", case_="index-0").headers["x-backend"] == "v2"
        assert send(session, proxy, f"/echo?{t}", case_="index-1").headers["x-backend"] == "v1"
        assert send(session, proxy, f"/echo?{t}", case_="zero").status_code == 200
        assert send(session, proxy, f"/echo?{t}", host="plain").status_code == 200
        assert send(session, proxy, f"/echo?{t}").status_code == 404
        assert send(session, proxy, f"/r/keep/{t}").status_code == 301
    expected = {
        ("v2.default", "default/indexed/0", "200"): 3,
        ("v1.default", "default/indexed/1", "200"): 3,
        ("v1.default", "default/web/zero", "200"): 3,
        ("plain.default", "default", "200"): 3,
        ("web.default", "default", "404"): 3,
        ("web.default", "default/web/redirect-r-keep", "301"): 3,
    }

    def deltas():
        now = requests_total(proxy)
        return {key: now[key] - before[key] for key in expected}

    wait_for(lambda: deltas() == expected, timeout=5, what=f"counts {expected}")
    labels = {route for (_, route, _) in requests_total(proxy)}
    assert not any(route.startswith("/") for route in labels)  # never a raw path


# --- the spec's own example ----------------------------------------------------------------------


def test_spec_example_routes(tmp_path, v1, v2, session):
    mesh = mesh_yaml({"delivery": [], "delivery-v1": [v1.address], "delivery-v2": [v2.address]})
    proxy = ProxyProcess(tmp_path, mesh, name="spec-example", extra_configs=[SPEC_ROUTES]).start()
    try:
        t = tag()
        for i in range(20):
            response = send(session, proxy, f"/api/deliveries/{i}?{t}", host="delivery",
                            headers={"x-beta": "true"})
            assert (response.status_code, response.headers["x-backend"]) == (200, "v2")
        beta = [r for r in v2.requests("/api/deliveries/") if r.path.endswith(t)]
        assert len(beta) == 20
        assert all(r.header("x-route") is None for r in beta)  # that rule has no filter
        assert all(r.header("host") == "delivery" for r in beta)

        u = tag()
        served = Counter()
        for i in range(400):
            response = send(session, proxy, f"/api/deliveries/{i}?{u}", host="delivery",
                            headers={"x-beta": "false"} if i % 2 else None)
            assert response.status_code == 200
            assert response.content.decode().startswith(response.headers["x-backend"])
            served[response.headers["x-backend"]] += 1
        assert 300 <= served["v1"] <= 392 and served["v1"] + served["v2"] == 400, served
        split = [r for s in (v1, v2) for r in s.requests("/api/deliveries/") if r.path.endswith(u)]
        assert len(split) == 400
        assert {r.header("x-route") for r in split} == {"deliveries"}
        assert {r.header("host") for r in split} == {"delivery"}

        elsewhere = send(session, proxy, "/api/other", host="delivery")
        assert (elsewhere.status_code, elsewhere.headers["x-meshproxy-error"]) == (404, "no-route")
        counts = wait_for(lambda: (c := requests_total(proxy))[
            ("delivery-v2.default", "default/delivery/beta-testers", "200")] == 20 and c,
            timeout=5, what="beta-testers counted")
        assert counts[("delivery-v1.default", "default/delivery/1", "200")] == served["v1"]
        assert counts[("delivery-v2.default", "default/delivery/1", "200")] == served["v2"]
    finally:
        proxy.stop()
