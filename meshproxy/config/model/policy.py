"""`TrafficPolicy`, `PeerAuthentication` and `AuthorizationPolicy` (meshproxy.io/v1alpha1).

Every TrafficPolicy default is spec §3's defaults table; a TrafficPolicy built with no
arguments is the policy in force for a Service that no policy covers. Durations are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from meshproxy.config.model.common import ObjectMeta, Source, TargetRef

LOAD_BALANCER_TYPES = ("PeakEWMA", "LeastRequest", "RoundRobin", "Random")
# `retry.on`: connect-failure (nothing reached the app), reset, and response codes; for
# HTTP/2 a stream the server refused, and for gRPC the statuses of trailers-only answers
# (spec §9).
RETRY_ON_DEFAULT = ("connect-failure", "reset", "502", "503", "504")
RETRY_ON_WORDS = ("connect-failure", "reset", "5xx", "refused-stream", "cancelled",
                  "deadline-exceeded", "resource-exhausted", "unavailable")
MESHED_IDLE_TIMEOUT = 60.0  # their inbound keeps client connections 75s
UNMESHED_IDLE_TIMEOUT = 1.5  # apps often close idle connections after 2-5s
AUTHZ_ACTIONS = ("ALLOW", "DENY")


@dataclass(frozen=True)
class LoadBalancer:
    """How an endpoint is picked: PeakEWMA (P2C over RTT EWMA x (in-flight + 1)) or another."""

    type: str = "PeakEWMA"
    decay: float = 10.0
    default_rtt: float = 0.030


@dataclass(frozen=True)
class ConnectionPool:
    """Upstream connection settings and the per-Service limits (past them: 503 at once)."""

    connect_timeout: float = 2.0
    idle_timeout: float | None = None  # None: see idle_timeout_for()
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_request_body_bytes: int | None = None  # None: no limit; past it 413

    def idle_timeout_for(self, meshed: bool) -> float:
        """Return how long an idle upstream connection is kept, in seconds.

        The configured idleTimeout when set; else 60s to meshed peers and 1.5s to apps
        and unmeshed endpoints.
        """
        if self.idle_timeout is not None:
            return self.idle_timeout
        return MESHED_IDLE_TIMEOUT if meshed else UNMESHED_IDLE_TIMEOUT


@dataclass(frozen=True)
class PolicyTimeouts:
    """Whole-request and per-try timeouts; None (or `0s` in the file) means none."""

    request: float | None = None
    per_try: float | None = None


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff between retries."""

    base: float = 0.025
    max: float = 0.250


@dataclass(frozen=True)
class RetryBudget:
    """Retries stay within `percent` of requests (over 10 s) plus `min_per_second`."""

    percent: float = 20.0
    min_per_second: float = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries, on which outcomes, and within which budget.

    `on` holds `connect-failure` (retried for any method), `reset`, `5xx` and status codes as
    strings; all but connect-failure apply to idempotent methods unless `non_idempotent`.
    """

    attempts: int = 2
    on: tuple[str, ...] = RETRY_ON_DEFAULT
    non_idempotent: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    budget: RetryBudget = field(default_factory=RetryBudget)


@dataclass(frozen=True)
class CircuitBreaker:
    """Consecutive-failure ejection: base time doubling to max, at most max_percent ejected."""

    consecutive_failures: int = 5
    base_ejection_time: float = 5.0
    max_ejection_time: float = 60.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class TrafficPolicy:
    """Client-side behaviour towards a Service. `metadata` None: the built-in defaults."""

    api_version: ClassVar[str] = "meshproxy.io/v1alpha1"
    kind: ClassVar[str] = "TrafficPolicy"

    metadata: ObjectMeta | None = None
    target_ref: TargetRef | None = None
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)
    connection_pool: ConnectionPool = field(default_factory=ConnectionPool)
    timeouts: PolicyTimeouts = field(default_factory=PolicyTimeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    source: Source | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PeerAuthentication:
    """The inbound mTLS mode (STRICT, PERMISSIVE, DISABLE) for the mesh, a namespace or a Service."""

    api_version: ClassVar[str] = "meshproxy.io/v1alpha1"
    kind: ClassVar[str] = "PeerAuthentication"

    metadata: ObjectMeta
    mtls_mode: str
    target_ref: TargetRef | None = None
    source: Source | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AuthzSource:
    """Who a rule is about. Principals are kept without `spiffe://` (`cluster.local/ns/NS/sa/SA`);
    principals and namespaces may use `*` as a prefix or suffix wildcard."""

    principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthzOperation:
    """What a rule is about; paths may use `*` as a prefix or suffix wildcard."""

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthzRule:
    """Matches when any `from` source and any `to` operation match (an empty list matches all)."""

    from_: tuple[AuthzSource, ...] = ()
    to: tuple[AuthzOperation, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    """Istio's shape: ALLOW or DENY requests matching any rule. An ALLOW policy without
    rules matches nothing (so it denies all); `rules: [{}]` matches everything."""

    api_version: ClassVar[str] = "meshproxy.io/v1alpha1"
    kind: ClassVar[str] = "AuthorizationPolicy"

    metadata: ObjectMeta
    action: str = "ALLOW"
    rules: tuple[AuthzRule, ...] = ()
    target_ref: TargetRef | None = None
    source: Source | None = field(default=None, compare=False)
