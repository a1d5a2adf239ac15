"""Parsing `TrafficPolicy`, `PeerAuthentication` and `AuthorizationPolicy`."""

from __future__ import annotations

from meshproxy.config.model.common import MTLS_MODES, ObjectMeta, Source
from meshproxy.config.model.policy import (
    AUTHZ_ACTIONS,
    LOAD_BALANCER_TYPES,
    RETRY_ON_WORDS,
    AuthorizationPolicy,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    Backoff,
    CircuitBreaker,
    ConnectionPool,
    LoadBalancer,
    PeerAuthentication,
    PolicyTimeouts,
    RetryBudget,
    RetryPolicy,
    TrafficPolicy,
)
from meshproxy.config.parse.common import parse_target_ref
from meshproxy.config.parse.fields import Obj, describe
from meshproxy.config.yamlsource import YScalar

_LIMIT = 1 << 31  # upper bound of integer limits: an int32, as Kubernetes fields are


def parse_traffic_policy(spec: Obj, meta: ObjectMeta, source: Source) -> TrafficPolicy:
    """Return the TrafficPolicy of `spec`, every field not written at its spec §3 default."""
    d = TrafficPolicy()
    target = parse_target_ref(spec, meta.namespace)
    lb = d.load_balancer
    if (o := spec.obj("loadBalancer")) is not None:
        lb = LoadBalancer(
            type=o.string("type", lb.type, choices=LOAD_BALANCER_TYPES),
            decay=o.duration("decay", lb.decay, positive=True),
            default_rtt=o.duration("defaultRTT", lb.default_rtt, positive=True),
        )
    pool = d.connection_pool
    if (o := spec.obj("connectionPool")) is not None:
        pool = ConnectionPool(
            connect_timeout=o.duration("connectTimeout", pool.connect_timeout, positive=True),
            idle_timeout=o.duration("idleTimeout", pool.idle_timeout),
            max_connections=o.integer("maxConnections", pool.max_connections, lo=1, hi=_LIMIT),
            max_pending_requests=o.integer("maxPendingRequests", pool.max_pending_requests, lo=0, hi=_LIMIT),
            max_requests=o.integer("maxRequests", pool.max_requests, lo=1, hi=_LIMIT),
            max_request_body_bytes=o.integer("maxRequestBodyBytes", None, lo=0, hi=1 << 62),
        )
    timeouts = d.timeouts
    if (o := spec.obj("timeouts")) is not None:
        # Gateway API convention: a zero duration means "no timeout".
        timeouts = PolicyTimeouts(request=o.duration("request") or None, per_try=o.duration("perTry") or None)
    return TrafficPolicy(
        metadata=meta,
        target_ref=target,
        load_balancer=lb,
        connection_pool=pool,
        timeouts=timeouts,
        retry=_retry(spec, d.retry),
        circuit_breaker=_breaker(spec, d.circuit_breaker),
        source=source,
    )


def _retry(spec: Obj, d: RetryPolicy) -> RetryPolicy:
    o = spec.obj("retry")
    if o is None:
        return d
    attempts = o.integer("attempts", d.attempts, lo=0, hi=100)
    on = d.on
    if o.entry("on") is not None:
        on = tuple(v for v in (_retry_on(o, path, node) for path, node in o.items("on")) if v is not None)
    non_idempotent = o.boolean("nonIdempotent", d.non_idempotent)
    backoff = d.backoff
    if (b := o.obj("backoff")) is not None:
        backoff = Backoff(base=b.duration("base", backoff.base, positive=True),
                          max=b.duration("max", backoff.max, positive=True))
        if backoff.max < backoff.base:
            b.r.error(b.value_pos("max"), f"{b.field('max')}: must not be shorter than base")
    budget = d.budget
    if (b := o.obj("budget")) is not None:
        budget = RetryBudget(percent=b.number("percent", budget.percent, lo=0, hi=100),
                             min_per_second=b.number("minPerSecond", budget.min_per_second, lo=0))
    return RetryPolicy(attempts=attempts, on=on, non_idempotent=non_idempotent, backoff=backoff, budget=budget)


def _retry_on(o: Obj, path: str, node) -> str | None:
    value = node.value if isinstance(node, YScalar) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        o.r.error(node.pos, f"{path}: expected a string, got {describe(node)}")
        return None
    if value in RETRY_ON_WORDS or (value.isdigit() and 400 <= int(value) <= 599):
        return value
    o.r.error(node.pos, f"{path}: unknown value '{value}' (expected one of: "
              f"{', '.join(RETRY_ON_WORDS)}, or a status code 400..599)")
    return None


def _breaker(spec: Obj, d: CircuitBreaker) -> CircuitBreaker:
    o = spec.obj("circuitBreaker")
    if o is None:
        return d
    out = CircuitBreaker(
        consecutive_failures=o.integer("consecutiveFailures", d.consecutive_failures, lo=1, hi=_LIMIT),
        base_ejection_time=o.duration("baseEjectionTime", d.base_ejection_time, positive=True),
        max_ejection_time=o.duration("maxEjectionTime", d.max_ejection_time, positive=True),
        max_ejection_percent=o.integer("maxEjectionPercent", d.max_ejection_percent, lo=0, hi=100),
    )
    if out.max_ejection_time < out.base_ejection_time:
        o.r.error(o.value_pos("maxEjectionTime"), f"{o.field('maxEjectionTime')}: must not be shorter "
                  "than baseEjectionTime")
    return out


def parse_peer_authentication(spec: Obj, meta: ObjectMeta, source: Source) -> PeerAuthentication:
    """Return the PeerAuthentication of `spec`; `mtls.mode` is required."""
    target = parse_target_ref(spec, meta.namespace)
    mtls = spec.obj("mtls", required=True)
    mode = mtls.string("mode", required=True, choices=MTLS_MODES) if mtls is not None else None
    return PeerAuthentication(metadata=meta, mtls_mode=mode or "", target_ref=target, source=source)


def parse_authorization_policy(spec: Obj, meta: ObjectMeta, source: Source) -> AuthorizationPolicy:
    """Return the AuthorizationPolicy of `spec` (action defaults to ALLOW, as in Istio)."""
    target = parse_target_ref(spec, meta.namespace)
    action = spec.string("action", "ALLOW", choices=AUTHZ_ACTIONS)
    rules = []
    for rule in spec.objs("rules"):
        sources = []
        for item in rule.objs("from"):
            src = item.obj("source", required=True)
            if src is not None:
                principals = tuple(p.removeprefix("spiffe://") for p in _patterns(src, "principals"))
                sources.append(AuthzSource(principals=principals, namespaces=_patterns(src, "namespaces")))
        operations = []
        for item in rule.objs("to"):
            op = item.obj("operation", required=True)
            if op is not None:
                operations.append(AuthzOperation(methods=_patterns(op, "methods"), paths=_patterns(op, "paths")))
        rules.append(AuthzRule(from_=tuple(sources), to=tuple(operations)))
    return AuthorizationPolicy(metadata=meta, action=action, rules=tuple(rules), target_ref=target, source=source)


def _patterns(o: Obj, key: str) -> tuple[str, ...]:
    """Return the strings at `key`; `*` may only stand alone, first or last (Istio's rule)."""
    out = []
    for path, node in o.items(key):
        value = o.r.to_str(node, path)
        if value is None:
            continue
        if "*" in value.strip("*") or value.count("*") > 1 and value != "*":
            o.r.error(node.pos, f"{path}: '{value}' may use '*' only once, as a prefix or suffix")
            continue
        out.append(value)
    return tuple(out)
