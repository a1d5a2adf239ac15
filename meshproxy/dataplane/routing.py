"""Applying a Service's HTTPRoutes to one request: the route decision, its filters, the
backend.

The decision is pure (`RouteTable.decide`, meshproxy.policy.router; the filters' arithmetic is
meshproxy.policy.filters). This module acts on it for one request head and returns what the
exchange needs next, a `Routed`: the backend Service to forward to (or a redirect to answer),
with the rule's label, timeouts and retry, the target to send, the mirrors and the response
header filters. Route-level filters apply first, then the chosen backend's own filters.
"""

from __future__ import annotations

import random

from meshproxy.dataplane.destinations import ServiceRuntime
from meshproxy.http1.errors import BackendNotFound, NoRoute
from meshproxy.http1.events import RequestHead
from meshproxy.policy.filters import modify_headers, redirect_location, rewrite_target


class Redirect:
    """The route answers with a redirect instead of forwarding."""

    __slots__ = ("status", "location")

    def __init__(self, status: int, location: str) -> None:
        self.status = status
        self.location = location


class Routed:
    """Where a routed request goes, and what its route rule adds to it."""

    __slots__ = ("service", "redirect", "failure", "label", "rule", "target", "mirrors",
                 "response_modifiers")

    def __init__(self, label: str, rule, target: bytes) -> None:
        self.service: ServiceRuntime | None = None  # the backend; None with a redirect
        self.redirect: Redirect | None = None
        # The rule matched but names no usable backend: 500 (counted under the rule's label).
        self.failure: BackendNotFound | None = None
        self.label = label  # spec §6 route label, NAMESPACE/NAME/RULE
        self.rule = rule  # the RouteRule: its timeouts and retry override the Service's policy
        self.target = target  # the request target to send (URLRewrite may change it)
        self.mirrors: list[ServiceRuntime] = []  # Services that get a copy (RequestMirror)
        self.response_modifiers: list = []  # ResponseHeaderModifier filters


def _header_lookup(head: RequestHead):
    """A lookup for the router: lower-case name -> value (repeated fields joined by ", ")."""
    def lookup(name: str) -> str | None:
        wanted = name.encode("latin-1")
        values = [v for k, v in head.headers if k.lower() == wanted]
        if not values:
            return None
        return b", ".join(values).decode("latin-1")
    return lookup


def route(head: RequestHead, target: bytes, parent: ServiceRuntime, resolver,
          rng: random.Random) -> Routed:
    """Route a request for `parent` (a Service with routes) by its routes; request header
    filters change `head` in place. `resolver` finds backend Services by key. Raises NoRoute
    (404) when no rule matches; a rule without a usable backend gives a Routed whose
    `failure` is the BackendNotFound (500) to answer."""
    routes = parent.routes
    assert routes is not None  # only a Service with routes is routed
    decision = routes.decide(
        head.method.decode("latin-1"), target.decode("latin-1"), _header_lookup(head)
    )
    if decision is None:
        raise NoRoute(f"no route of {parent.key} matches")
    routed = Routed(decision.label, decision.rule, target)
    prefix = decision.prefix
    if _apply(routed, head, decision.rule.filters, prefix, parent, resolver, rng):
        return routed
    backend = decision.pick_backend(rng)
    if backend is None:
        routed.failure = BackendNotFound(f"{decision.label} has no backend with a weight")
        return routed
    runtime = resolver.service(backend.service_key)
    if runtime is None:
        # Gateway API: requests that would go to an invalid backend get a 500.
        routed.failure = BackendNotFound(f"{backend.service_key} does not exist")
        return routed
    if not _apply(routed, head, backend.filters, prefix, parent, resolver, rng):
        routed.service = runtime
    return routed


def _apply(routed: Routed, head: RequestHead, filters, prefix: str | None,
           parent: ServiceRuntime, resolver, rng: random.Random) -> bool:
    """Apply `filters`; return True when one of them is a redirect (set on `routed`)."""
    for f in filters:
        kind = f.type
        if kind == "RequestHeaderModifier":
            head.headers = modify_headers(head.headers, f.request_header_modifier)
            host = head.header(b"host")
            if host is not None:
                head.host = host
            elif head.host is not None:
                # HTTP/1.1 requires Host (RFC 9112 §3.2): a removed one is put back as it was.
                head.headers.insert(0, (b"host", head.host))
            # The id the head carries is the one sent upstream (one is added when absent, spec
            # §4), so it follows what the filter set or removed.
            head.request_id = head.header(b"x-request-id")
        elif kind == "ResponseHeaderModifier":
            routed.response_modifiers.append(f.response_header_modifier)
        elif kind == "URLRewrite":
            rewrite = f.url_rewrite
            if rewrite.hostname is not None:
                host = rewrite.hostname.encode("latin-1")
                head.headers = [(k, v) if k.lower() != b"host" else (k, host)
                                for k, v in head.headers]
                head.host = host
            if rewrite.path is not None:
                routed.target = rewrite_target(routed.target, rewrite.path, prefix)
        elif kind == "RequestRedirect":
            redirect = f.request_redirect
            authority = (head.host or b"").decode("latin-1")
            location = redirect_location(redirect, authority, parent.port, routed.target, prefix)
            routed.redirect = Redirect(redirect.status_code, location)
            return True
        elif kind == "RequestMirror":
            mirror = f.request_mirror
            if mirror.ratio >= 1.0 or rng.random() < mirror.ratio:
                runtime = resolver.service(mirror.backend_ref.service_key)
                if runtime is not None:
                    routed.mirrors.append(runtime)
    return False
