"""Applying a Service's HTTPRoutes to one exchange: match, filters, backend choice.

The decisions are pure (meshproxy.policy.router and .filters); this module applies them to the
exchange's request head and says what happens next: forward to a backend Service, or answer
with a redirect. Route-level filters apply first, then the chosen backend's own filters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshproxy.http1.errors import BackendNotFound, NoRoute
from meshproxy.policy.filters import modify_headers, redirect_location, rewrite_target

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.dataplane.destinations import ServiceRuntime
    from meshproxy.dataplane.exchange import Exchange


class Redirect:
    """The route answers with a redirect instead of forwarding."""

    __slots__ = ("status", "location")

    def __init__(self, status: int, location: str) -> None:
        self.status = status
        self.location = location


def _header_lookup(head):
    """A lookup for the router: lower-case name -> value (repeated fields joined by ", ")."""
    def lookup(name: str) -> str | None:
        wanted = name.encode("latin-1")
        values = [v for k, v in head.headers if k.lower() == wanted]
        if not values:
            return None
        return b", ".join(values).decode("latin-1")
    return lookup


def route(exchange: "Exchange", parent: "ServiceRuntime") -> "ServiceRuntime | Redirect":
    """Route `exchange` by `parent`'s routes: returns the backend Service's runtime, or a
    Redirect to answer. Raises NoRoute (404) and BackendNotFound (500)."""
    head = exchange.head
    found = parent.routes.match_with_prefix(
        head.method.decode("latin-1"), exchange.target.decode("latin-1"), _header_lookup(head)
    )
    if found is None:
        raise NoRoute(f"no route of {parent.key} matches")
    rule, prefix = found
    exchange.route = rule.label
    exchange.route_rule = rule.rule  # its timeouts and retry override the Service's policy
    redirect = _apply(exchange, rule.rule.filters, prefix, parent)
    if redirect is not None:
        return redirect
    backend = rule.pick_backend(exchange.down.listener.rng)
    if backend is None:
        raise BackendNotFound(f"{rule.label} has no backend with a weight")
    runtime = exchange.down.resolver.service(backend.service_key)
    if runtime is None:
        # Gateway API: requests that would go to an invalid backend get a 500.
        raise BackendNotFound(f"{backend.service_key} does not exist")
    redirect = _apply(exchange, backend.filters, prefix, parent)
    if redirect is not None:
        return redirect
    return runtime


def _apply(exchange: "Exchange", filters, prefix: str | None,
           parent: "ServiceRuntime") -> Redirect | None:
    head = exchange.head
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
            exchange.response_modifiers.append(f.response_header_modifier)
        elif kind == "URLRewrite":
            rewrite = f.url_rewrite
            if rewrite.hostname is not None:
                host = rewrite.hostname.encode("latin-1")
                head.headers = [(k, v) if k.lower() != b"host" else (k, host)
                                for k, v in head.headers]
                head.host = host
            if rewrite.path is not None:
                exchange.target = rewrite_target(exchange.target, rewrite.path, prefix)
        elif kind == "RequestRedirect":
            redirect = f.request_redirect
            host = (head.host or b"").decode("latin-1")
            location = redirect_location(redirect, host, parent.port, exchange.target, prefix)
            return Redirect(redirect.status_code, location)
        elif kind == "RequestMirror":
            mirror = f.request_mirror
            rng = exchange.down.listener.rng
            if mirror.ratio >= 1.0 or rng.random() < mirror.ratio:
                runtime = exchange.down.resolver.service(mirror.backend_ref.service_key)
                if runtime is not None:
                    exchange.mirrors.append(runtime)
    return None
