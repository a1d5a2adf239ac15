"""`meshproxy check PATH --explain 'GET http://delivery/api/7 -H x-beta:true'`: which route and
rule a request would take, the backends it could go to with their shares, and the filters,
timeouts and retry that apply. Pure: a snapshot and a request in, lines of text out.
"""

from __future__ import annotations

import shlex
from urllib.parse import urlsplit

from meshproxy.policy.router import RouteDecision, RouteTable


class ExplainError(ValueError):
    """The request to explain is not of the form `METHOD URL [-H NAME:VALUE]...`."""


def parse_request(text: str) -> tuple[str, str, str, dict[str, str]]:
    """Return (method, host, target, headers) from `METHOD http://HOST/PATH [-H N:V]...`.

    Raises ExplainError.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ExplainError(str(exc)) from None
    if len(words) < 2:
        raise ExplainError("expected: METHOD URL [-H NAME:VALUE]...")
    method, url, rest = words[0].upper(), words[1], words[2:]
    parts = urlsplit(url if "://" in url else "http://" + url)
    if not parts.hostname:
        raise ExplainError(f"no host in {url!r}")
    headers: dict[str, str] = {}
    while rest:
        flag = rest.pop(0)
        if flag not in ("-H", "--header") or not rest:
            raise ExplainError(f"unexpected {flag!r}: headers are given as -H NAME:VALUE")
        name, sep, value = rest.pop(0).partition(":")
        if not sep or not name.strip():
            raise ExplainError("a header is given as -H NAME:VALUE")
        headers[name.strip().lower()] = value.strip()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return method, parts.hostname, target, headers


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


def explain(snapshot, request: str, namespace: str = "default") -> list[str]:
    """Return the explanation of `request` against `snapshot`, one line per item.

    Raises ExplainError for a malformed request.
    """
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
    lines.append(f"service: {service.key} ({len(routes)} route(s) attached)")
    if not routes:
        endpoints = ", ".join(f"{i.name} {i.app_address}" for i in service.instances) or "none"
        lines.append(f"no routes: balanced across the Service's endpoints: {endpoints}")
        return lines
    decision = RouteTable(routes).decide(method, target, headers.get)
    if decision is None:
        lines.append("matched: no rule -> 404 no-route")
        return lines
    return lines + describe(decision, snapshot)


def describe(decision: RouteDecision, snapshot) -> list[str]:
    """The lines that say what `decision` does with a request: rule, filters, backends with
    their shares (and those that do not exist), timeouts, retry."""
    lines = []
    rule = decision.matched
    name = f"{rule.route.metadata.namespace}/{rule.route.metadata.name}"
    lines.append(f"matched: route {name}, rule {rule.rule.name or rule.index} "
                 f"(metrics route label {rule.label})")
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
    if retry is not None:
        codes = " ".join(str(c) for c in retry.codes) or "policy default"
        lines.append(f"retry: attempts {retry.attempts if retry.attempts is not None else 'policy default'}"
                     f", codes {codes}, backoff {_fmt_seconds(retry.backoff)}")
    return lines
