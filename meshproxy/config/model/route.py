"""`HTTPRoute` (gateway.networking.k8s.io/v1) as the mesh uses it (GAMMA: routes attached to a
Service through `parentRefs`). Field names follow the Gateway API in snake_case; defaults are
the Gateway API's. Durations are seconds; `0s` timeouts are stored as None (no timeout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from meshproxy.config.model.common import ObjectMeta, Source, service_key

PATH_MATCH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_MATCH_TYPES = ("Exact", "RegularExpression")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
FILTER_TYPES = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "URLRewrite",
    "RequestRedirect",
    "RequestMirror",
)
PATH_MODIFIER_TYPES = ("ReplaceFullPath", "ReplacePrefixMatch")
REDIRECT_SCHEMES = ("http", "https")
REDIRECT_STATUS_CODES = (301, 302, 303, 307, 308)
GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class ParentRef:
    """What a route attaches to; the mesh attaches routes to `kind: Service` parents only."""

    name: str
    namespace: str  # the route's own namespace when not written
    kind: str = "Gateway"
    group: str = GATEWAY_GROUP
    port: int | None = None
    section_name: str | None = None

    @property
    def is_service(self) -> bool:
        """True for a Service parent (core group), the GAMMA binding."""
        return self.kind == "Service" and self.group in ("", "core")

    @property
    def service_key(self) -> str:
        """`NAME.NAMESPACE` of the parent."""
        return service_key(self.name, self.namespace)

    def attaches(self, service_port: int | None) -> bool:
        """True when this ref attaches its route to the Service (whose port is `service_port`,
        None when unknown): a Service parent, and a port, when given, that the Service has."""
        return self.is_service and (self.port is None or service_port is None or self.port == service_port)


@dataclass(frozen=True)
class PathMatch:
    """Exact, PathPrefix (whole segments) or RegularExpression (Python `re`, whole path)."""

    type: str = "PathPrefix"
    value: str = "/"


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match: Exact or RegularExpression (whole value).

    Header names are stored lowercased (they are case-insensitive, RFC 9110 §5.1); query
    parameter names as written (they are not).
    """

    name: str
    value: str
    type: str = "Exact"


@dataclass(frozen=True)
class RouteMatch:
    """All given conditions must hold."""

    path: PathMatch = field(default_factory=PathMatch)
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class HTTPHeader:
    """A header name and value."""

    name: str
    value: str


@dataclass(frozen=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier: set (replace), add (append), remove."""

    set: tuple[HTTPHeader, ...] = ()
    add: tuple[HTTPHeader, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathModifier:
    """ReplaceFullPath (uses `replace_full_path`) or ReplacePrefixMatch (`replace_prefix_match`)."""

    type: str
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


@dataclass(frozen=True)
class URLRewrite:
    """Rewrites the authority and/or path sent upstream."""

    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class RequestRedirect:
    """Answers with a redirect; a part left None keeps the request's (port: the Service's)."""

    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class BackendObjectRef:
    """A Service a filter sends to (RequestMirror)."""

    name: str
    namespace: str  # the route's namespace when not written
    port: int | None = None
    kind: str = "Service"
    group: str = ""

    @property
    def service_key(self) -> str:
        """`NAME.NAMESPACE` of the Service."""
        return service_key(self.name, self.namespace)


@dataclass(frozen=True)
class Fraction:
    """numerator / denominator of requests."""

    numerator: int
    denominator: int = 100


@dataclass(frozen=True)
class RequestMirror:
    """Sends a copy of requests to another Service, ignoring its answers."""

    backend_ref: BackendObjectRef
    percent: int | None = None
    fraction: Fraction | None = None

    @property
    def ratio(self) -> float:
        """The share of requests mirrored, 0.0..1.0 (1.0 when neither percent nor fraction)."""
        if self.percent is not None:
            return self.percent / 100
        if self.fraction is not None:
            return self.fraction.numerator / self.fraction.denominator
        return 1.0


@dataclass(frozen=True)
class RouteFilter:
    """One filter; exactly the field named by `type` is set."""

    type: str
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    url_rewrite: URLRewrite | None = None
    request_redirect: RequestRedirect | None = None
    request_mirror: RequestMirror | None = None


@dataclass(frozen=True)
class BackendRef:
    """A weighted Service to send matching requests to; port None: the Service's port."""

    name: str
    namespace: str  # the route's namespace when not written
    port: int | None = None
    weight: int = 1
    filters: tuple[RouteFilter, ...] = ()
    kind: str = "Service"
    group: str = ""

    @property
    def service_key(self) -> str:
        """`NAME.NAMESPACE` of the Service."""
        return service_key(self.name, self.namespace)


@dataclass(frozen=True)
class RouteTimeouts:
    """`request`: the whole exchange incl. retries; `backend_request`: each try. None: none."""

    request: float | None = None
    backend_request: float | None = None


@dataclass(frozen=True)
class RouteRetry:
    """GEP-1731 retry: None fields defer to the Service's TrafficPolicy."""

    attempts: int | None = None
    codes: tuple[int, ...] = ()
    backoff: float | None = None


@dataclass(frozen=True)
class RouteRule:
    """Matches (any), filters, backends, timeouts and retry of one rule.

    A rule written without matches has one match: PathPrefix `/`.
    """

    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    filters: tuple[RouteFilter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: RouteTimeouts | None = None
    retry: RouteRetry | None = None
    name: str | None = None


@dataclass(frozen=True)
class HTTPRoute:
    """A Gateway API HTTPRoute. A route written without rules has one rule matching `/`."""

    api_version: ClassVar[str] = "gateway.networking.k8s.io/v1"
    kind: ClassVar[str] = "HTTPRoute"

    metadata: ObjectMeta
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = (RouteRule(),)
    source: Source | None = field(default=None, compare=False)

    @property
    def route_rules(self) -> tuple[RouteRule, ...]:
        """The rules as the router compiles them (a GRPCRoute gives its rules translated)."""
        return self.rules

    def rule_label(self, index: int) -> str:
        """The metrics `route` label of rule `index`: `NAMESPACE/NAME/RULE` (spec §6)."""
        rule_name = self.rules[index].name
        return f"{self.metadata.namespace}/{self.metadata.name}/{rule_name if rule_name else index}"
