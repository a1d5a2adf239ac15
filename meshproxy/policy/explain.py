"""`meshproxy check PATH --explain 'GET http://delivery/api/7 -H x-beta:true'`: which route and
rule a request would take, the backends it could go to with their shares, and the filters,
timeouts and retry that apply. Pure: a snapshot and a request in, lines of text out.

A gRPC call is written `GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H NAME:VALUE]...`
(`GRPC delivery/drone.Tracking/Watch`: Service `delivery`, gRPC service `drone.Tracking`,
method `Watch`) and explained as the request it is on the wire: `POST /grpc.Service/Method`
with `content-type: application/grpc` (unless a -H gives another).
"""

from __future__ import annotations

import shlex
from urllib.parse import urlsplit

from meshproxy.config.model.grpcroute import GRPCRoute, GRPCRouteMatch
from meshproxy.policy.router import RouteDecision, RouteTable


class ExplainError(ValueError):
    """The request to explain is not of the form `METHOD URL [-H NAME:VALUE]...` (or
    `GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H NAME:VALUE]...`)."""


GRPC_FORM = "GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H NAME:VALUE]..."
GRPC_CONTENT_TYPE = "application/grpc"


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ExplainError(str(exc)) from None


def parse_request(text: str) -> tuple[str, str, str, dict[str, str]]:
    """Return (method, host, target, headers) from `METHOD http://HOST/PATH [-H N:V]...`.

    Raises ExplainError.
    """
    words = _words(text)
    if len(words) < 2:
        raise ExplainError("expected: METHOD URL [-H NAME:VALUE]...")
    method, url, rest = words[0].upper(), words[1], words[2:]
    parts = urlsplit(url if "://" in url else "http://" + url)
    if not parts.hostname:
        raise ExplainError(f"no host in {url!r}")
    headers = _headers(rest)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return method, parts.hostname, target, headers


def parse_grpc_call(text: str) -> tuple[str, str, str, dict[str, str]]:
    """Return (host, gRPC service, gRPC method, headers) from
    `GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H N:V]...`; the host is `SERVICE.NAMESPACE`
    when a namespace is given, else `SERVICE` as written (any form a caller may use, e.g.
    `drone.default` or `drone:50051`). Headers include `content-type: application/grpc` unless
    they give one.

    Raises ExplainError.
    """
    words = _words(text)
    if len(words) < 2 or words[0].upper() != "GRPC":
        raise ExplainError(f"expected: {GRPC_FORM}")
    parts = words[1].strip("/").split("/")
    if len(parts) not in (3, 4) or not all(parts):
        raise ExplainError(f"expected [NAMESPACE/]SERVICE/grpc.Service/Method, got {words[1]!r}")
    if len(parts) == 4:
        namespace, name, service, method = parts
        host = f"{name}.{namespace}"
    else:
        host, service, method = parts
    headers = {"content-type": GRPC_CONTENT_TYPE}
    headers.update(_headers(words[2:]))
    return host, service, method, headers


def _headers(rest: list[str]) -> dict[str, str]:
    """The `-H NAME:VALUE` arguments as a dict (names lowercased). Raises ExplainError."""
    rest = list(rest)
    headers: dict[str, str] = {}
    while rest:
        flag = rest.pop(0)
        if flag not in ("-H", "--header") or not rest:
            raise ExplainError(f"unexpected {flag!r}: headers are given as -H NAME:VALUE")
        name, sep, value = rest.pop(0).partition(":")
        if not sep or not name.strip():
            raise ExplainError("a header is given as -H NAME:VALUE")
        headers[name.strip().lower()] = value.strip()
    return headers


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _describe_filter(f) -> str:
    if f.type in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        m = f.request_header_modifier or f.response_header_modifier
        parts = [f"set {h.name}: {h.value}" for h in m.set]
        parts += [f"add {h.name}: {h.value}" for h in m.add]
        parts += [f"remove {name}" for name in m.remove]
        return f"{f.type} " + ", ".join(parts)
    if f.type == "URLRewrite":
        r = f.url_rewrite
        bits = []
        if r.hostname:
            bits.append(f"hostname {r.hostname}")
        if r.path:
            bits.append(f"{r.path.type} {r.path.replace_full_path or r.path.replace_prefix_match}")
        return "URLRewrite " + ", ".join(bits)
    if f.type == "RequestRedirect":
        r = f.request_redirect
        bits = [f"{k} {v}" for k, v in (("scheme", r.scheme), ("hostname", r.hostname),
                                        ("port", r.port)) if v]
        if r.path:
            bits.append(f"{r.path.type} {r.path.replace_full_path or r.path.replace_prefix_match}")
        return f"RequestRedirect {r.status_code} " + ", ".join(bits)
    if f.type == "RequestMirror":
        m = f.request_mirror
        return f"RequestMirror to {m.backend_ref.service_key} ({m.ratio:.0%} of requests)"
    return f.type


def _is_grpc(headers: dict[str, str]) -> bool:
    """True for a gRPC request: content-type `application/grpc`, alone or with `+...`/`;...`."""
    value = headers.get("content-type", "")
    return value == GRPC_CONTENT_TYPE or value.startswith((GRPC_CONTENT_TYPE + "+", GRPC_CONTENT_TYPE + ";"))


def _describe_grpc_match(match: GRPCRouteMatch) -> str:
    parts = [match.method.describe() if match.method is not None else "any service, any method"]
    parts += [f"header {h.name}: {h.value}" if h.type == "Exact" else f"header {h.name} matching {h.value}"
              for h in match.headers]
    return "; ".join(parts)


def explain(snapshot, request: str, namespace: str = "default") -> list[str]:
    """Return the explanation of `request` (`METHOD URL [-H NAME:VALUE]...` or
    `GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H NAME:VALUE]...`) against `snapshot`,
    one line per item; short Service names are looked up in `namespace`.

    Raises ExplainError for a malformed request.
    """
    words = request.split(None, 1)
    if words and words[0].upper() == "GRPC":
        host, grpc_service, grpc_method, headers = parse_grpc_call(request)
        method, target = "POST", f"/{grpc_service}/{grpc_method}"
        lines = [f"request: gRPC {grpc_service}/{grpc_method} to {host}: POST http://{host}{target}"
                 + "".join(f"  -H {k}:{v}" for k, v in headers.items())]
    else:
        method, host, target, headers = parse_request(request)
        lines = [f"request: {method} http://{host}{target}"
                 + "".join(f"  -H {k}:{v}" for k, v in headers.items())]
    service = snapshot.resolve_authority(host, namespace)
    if service is None:
        policy = snapshot.outbound_traffic_policy
        lines.append(f"service: {host} is not a Service of the mesh; "
                     + ("passed through unchanged (ALLOW_ANY)" if policy == "ALLOW_ANY"
                        else "refused with 502 unknown-destination (REGISTRY_ONLY)"))
        return lines
    routes = snapshot.routes_for(service.key)
    grpc_routes = any(isinstance(r, GRPCRoute) for r in routes)
    lines.append(f"service: {service.key} ({len(routes)} {'GRPCRoute' if grpc_routes else 'route'}(s) attached)")
    for ignored in snapshot.ignored_routes_for(service.key):
        lines.append(f"ignored: {ignored.kind} {ignored.metadata.namespace}/{ignored.metadata.name} "
                     "(a GRPCRoute is attached to the same Service and takes precedence, GEP-1426)")
    if not routes:
        endpoints = ", ".join(f"{i.name} {i.app_address}" for i in service.instances) or "none"
        lines.append(f"no routes: balanced across the Service's endpoints: {endpoints}")
        return lines
    decision = RouteTable(routes).decide(method, target, headers.get)
    if decision is None:
        # A gRPC caller gets the same answer as a trailers-only response (spec §9).
        lines.append("matched: no rule -> 404 no-route"
                     + (" (gRPC: grpc-status 12 UNIMPLEMENTED)" if _is_grpc(headers) else ""))
        return lines
    return lines + describe(decision, snapshot)


def describe(decision: RouteDecision, snapshot) -> list[str]:
    """The lines that say what `decision` does with a request: rule, filters, backends with
    their shares (and those that do not exist), timeouts, retry."""
    lines = []
    rule = decision.matched
    name = f"{rule.route.metadata.namespace}/{rule.route.metadata.name}"
    kind = "GRPCRoute" if isinstance(rule.route, GRPCRoute) else "route"
    lines.append(f"matched: {kind} {name}, rule {rule.rule.name or rule.index} "
                 f"(metrics route label {rule.label})")
    if isinstance(decision.match, GRPCRouteMatch):
        lines.append(f"match: {_describe_grpc_match(decision.match)}")
    for f in rule.rule.filters:
        lines.append(f"filter: {_describe_filter(f)}")
    if rule.total_weight <= 0:
        lines.append("backends: none with a weight -> 500 backend-not-found")
    for backend in rule.backends:
        share = backend.weight / rule.total_weight if rule.total_weight else 0
        exists = backend.service_key in snapshot.services
        lines.append(f"backend: {backend.service_key} weight {backend.weight} ({share:.0%})"
                     + ("" if exists else " -> 500 backend-not-found: no such Service"))
        for f in backend.filters:
            lines.append(f"  filter: {_describe_filter(f)}")
    timeouts = rule.rule.timeouts
    if timeouts is not None:
        lines.append(f"timeouts: request {_fmt_seconds(timeouts.request)}, "
                     f"backendRequest {_fmt_seconds(timeouts.backend_request)}")
    retry = rule.rule.retry
    if retry is not None and isinstance(rule.route, GRPCRoute):
        lines.append(f"retry: attempts {retry.attempts if retry.attempts is not None else 'policy default'}"
                     f", backoff {_fmt_seconds(retry.backoff)}, conditions: the Service's TrafficPolicy "
                     "retry.on")
    elif retry is not None:
        codes = " ".join(str(c) for c in retry.codes) or "policy default"
        lines.append(f"retry: attempts {retry.attempts if retry.attempts is not None else 'policy default'}"
                     f", codes {codes}, backoff {_fmt_seconds(retry.backoff)}")
    return lines
