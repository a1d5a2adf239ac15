"""Retry decisions (spec §3 `retry`): which failures are retried, how long to wait, and the
per-Service retry budget.

Pure: the clock (monotonic seconds) and the random source come in from the caller. These run
for every failed try (and the budget for every request), so they keep state in `__slots__` and
allocate nothing per call.

Failure kinds as the data plane reports them: `connect-failure` (no connection, so nothing
reached the app), `reset` (the connection broke after the request went out), `timeout` (the
per-try timeout fired), or a response status code as a string (`"503"`). The reason a retry is
made is the failure kind itself, which is also the `reason` label of `meshproxy_retries_total`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import ceil, isfinite
from random import Random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshproxy.config.model.policy import RetryBudget as RetryBudgetSpec
    from meshproxy.config.model.policy import RetryPolicy
    from meshproxy.config.model.route import RouteRetry

__all__ = [
    "CONNECT_FAILURE",
    "GRPC_DEFAULT_ON",
    "GRPC_STATUSES",
    "REFUSED_STREAM",
    "IDEMPOTENT_METHODS",
    "RESET",
    "TIMEOUT",
    "RetryBudget",
    "RetryRule",
    "backoff_delay",
    "grpc_rule",
    "retry_reason",
]

# RFC 9110 §9.2.2: repeating these has the same effect as sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CONNECT_FAILURE = "connect-failure"
# An HTTP/2 stream the server refused (REFUSED_STREAM, or above a GOAWAY's last stream id):
# like a connect failure, the app never saw the request.
REFUSED_STREAM = "refused-stream"
# Statuses read from a gRPC trailers-only answer (spec §9): the server answered before any
# response message, so the call may go again whatever its method (gRPC calls are POSTs).
GRPC_STATUSES = frozenset({"cancelled", "deadline-exceeded", "resource-exhausted", "unavailable"})
# A gRPC call's conditions when the policy keeps the default ones (spec §9).
GRPC_DEFAULT_ON = frozenset({CONNECT_FAILURE, REFUSED_STREAM, "unavailable"})
_DEFAULT_ON = frozenset({"connect-failure", "reset", "502", "503", "504"})
RESET = "reset"
TIMEOUT = "timeout"
ANY_5XX = "5xx"
# Past this many doublings the backoff cap is reached for any sane base, and 2**n would
# overflow a float long before n reaches 1100.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True, slots=True)
class RetryRule:
    """The retry settings in force for one request: the Service's TrafficPolicy `retry`, with
    the matched HTTPRoute rule's `retry` laid over it.

    `attempts` is the number of retries after the first try (the caller counts them); `on`
    holds `connect-failure`, `reset`, `5xx` and status codes as strings; backoff values are
    seconds.
    """

    attempts: int
    on: frozenset[str]
    non_idempotent: bool
    backoff_base: float
    backoff_max: float

    @classmethod
    def from_policy(
        cls, retry_spec: RetryPolicy, route_retry: RouteRetry | None = None
    ) -> RetryRule:
        """Returns the rule for a TrafficPolicy `retry` and an optional route `retry`.

        The route's `attempts` and `backoff` replace the policy's when set. Route `codes`
        (GEP-1731) replace every condition of the policy with `connect-failure`, `reset` and
        exactly those codes: a route that lists codes says which responses are worth another
        try, and connection errors are always retried where a route asks for retries.
        A route `backoff` above the policy's `backoff.max` raises the cap to it, since GEP-1731
        makes the route's value the minimum wait and a cap below it would ignore it.
        """
        attempts = retry_spec.attempts
        on = frozenset(retry_spec.on)
        base = retry_spec.backoff.base
        maximum = retry_spec.backoff.max
        if route_retry is not None:
            if route_retry.attempts is not None:
                attempts = route_retry.attempts
            if route_retry.codes:
                on = frozenset((CONNECT_FAILURE, RESET, *(str(c) for c in route_retry.codes)))
            if route_retry.backoff is not None:
                base = route_retry.backoff
                if base > maximum:
                    maximum = base
        return cls(attempts, on, retry_spec.non_idempotent, base, maximum)


def retry_reason(
    rule: RetryRule, method: str, failure: str, *, request_sent: bool, replayable: bool
) -> str | None:
    """Returns the reason to retry a failed try (the failure kind, e.g. "connect-failure" or
    "503"), or None when it must not be retried. Whether retries are left (`rule.attempts`,
    the budget) is the caller's to check.

    - `connect-failure`: nothing reached the app, so any method may be retried, if the
      condition is in `rule.on`. `refused-stream` likewise, if it or `connect-failure` is.
    - `reset`, `timeout` and status codes: only idempotent methods (RFC 9110 §9.2.2), or any
      method when `rule.non_idempotent`. `5xx` in `rule.on` matches every code 500-599.
      A per-try `timeout` is answered with 504 by the proxy, so it is retried where `on` holds
      `timeout`, `504` or `5xx`.
    - A request whose body could not be kept for replay (`replayable` False) is retried only
      on connect-failure and only when none of it was sent (`request_sent` False).
    """
    on = rule.on
    if failure == CONNECT_FAILURE or failure == REFUSED_STREAM:
        # A refused stream is a connect failure one level up (the app never saw the
        # request): a rule that retries connect failures retries it too.
        if (failure in on or CONNECT_FAILURE in on) and (replayable or not request_sent):
            return failure
        return None
    if not replayable:
        return None
    if failure in GRPC_STATUSES:
        return failure if failure in on else None
    if not rule.non_idempotent and method not in IDEMPOTENT_METHODS:
        return None
    if failure in on:
        return failure
    if failure == TIMEOUT:
        return TIMEOUT if (ANY_5XX in on or "504" in on) else None
    if (
        ANY_5XX in on
        and len(failure) == 3
        and failure[0] == "5"
        and failure.isdigit()
    ):
        return failure
    return None


def grpc_rule(rule: RetryRule) -> RetryRule:
    """The rule for a gRPC call: a refused stream is always worth another try, and a policy
    that keeps the default conditions gets gRPC's (`connect-failure`, `refused-stream`,
    `unavailable`; spec §9) instead of status codes a gRPC server never answers with."""
    if rule.on == _DEFAULT_ON:
        on = GRPC_DEFAULT_ON
    elif REFUSED_STREAM in rule.on:
        return rule
    else:
        on = rule.on | {REFUSED_STREAM}
    return RetryRule(rule.attempts, on, rule.non_idempotent, rule.backoff_base,
                     rule.backoff_max)


def backoff_delay(retry_number: int, base: float, maximum: float, rng: Random) -> float:
    """Returns the seconds to wait before retry `retry_number` (0 for the first retry).

    Full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog): uniform in
    [0, min(maximum, base * 2**retry_number)). Spreading the whole interval, rather than
    jittering around the exponential value, keeps many clients that failed together from
    coming back together. Raises ValueError for a negative `retry_number`.
    """
    if retry_number < 0:
        raise ValueError(f"retry_number must be >= 0, got {retry_number!r}")
    cap = base * (1 << retry_number) if retry_number < _MAX_DOUBLINGS else maximum
    if cap > maximum:
        cap = maximum
    return rng.random() * cap


class RetryBudget:
    """The retries a Service may make: at most `percent`% of the original requests seen over
    the last `window` seconds, plus `min_per_second` per second of the window (so a quiet
    Service may still retry `min_per_second * window` times).

    Counts are kept in a ring of buckets of about one second each (`ceil(window)` buckets);
    buckets that fall out of the window are cleared as the clock moves on, so each call costs
    O(1) amortised. A retry made now stays counted until its bucket expires, like the request
    it was made for. Raises ValueError for a negative or non-finite `percent` or
    `min_per_second`, or a `window` that is not a finite number > 0.
    """

    __slots__ = (
        "_ratio_percent", "_floor", "_clock", "_buckets", "_width", "_requests", "_retries",
        "_total_requests", "_total_retries", "_tick",
    )

    def __init__(
        self,
        percent: float,
        min_per_second: float,
        clock: Callable[[], float],
        window: float = 10.0,
    ) -> None:
        if not (isfinite(percent) and percent >= 0.0):
            raise ValueError(f"percent must be a finite number >= 0, got {percent!r}")
        if not (isfinite(min_per_second) and min_per_second >= 0.0):
            raise ValueError(
                f"min_per_second must be a finite number >= 0, got {min_per_second!r}"
            )
        if not (isfinite(window) and window > 0.0):
            raise ValueError(f"window must be a finite number > 0, got {window!r}")
        buckets = max(1, ceil(window))
        self._ratio_percent = float(percent)
        self._floor = float(min_per_second) * window
        self._clock = clock
        self._buckets = buckets
        self._width = window / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._total_requests = 0
        self._total_retries = 0
        self._tick = int(clock() // self._width)

    @classmethod
    def from_policy(cls, spec: RetryBudgetSpec, clock: Callable[[], float]) -> RetryBudget:
        """Returns a budget for a TrafficPolicy `retry.budget` over the spec's 10 s window."""
        return cls(spec.percent, spec.min_per_second, clock)

    def _index(self) -> int:
        """Moves the ring to the clock's current bucket, clearing the buckets that left the
        window; returns the current bucket's index. A clock that went back is read as not
        having moved."""
        tick = int(self._clock() // self._width)
        previous = self._tick
        buckets = self._buckets
        if tick > previous:
            requests = self._requests
            retries = self._retries
            if tick - previous >= buckets:
                for i in range(buckets):
                    requests[i] = 0
                    retries[i] = 0
                self._total_requests = 0
                self._total_retries = 0
            else:
                for t in range(previous + 1, tick + 1):
                    i = t % buckets
                    self._total_requests -= requests[i]
                    self._total_retries -= retries[i]
                    requests[i] = 0
                    retries[i] = 0
            self._tick = tick
            return tick % buckets
        return previous % buckets

    def _allowed(self) -> float:
        # Multiply before dividing: 100 * 20.0 / 100 is exactly 20.0, 100 * 0.2 is not.
        return self._total_requests * self._ratio_percent / 100.0 + self._floor

    def record_request(self) -> None:
        """Counts one original request (not a retry); returns nothing."""
        i = self._index()
        self._requests[i] += 1
        self._total_requests += 1

    def try_retry(self) -> bool:
        """Returns True when one more retry fits in the budget now, and counts it as made;
        False (nothing counted) when the budget is spent."""
        i = self._index()
        if self._allowed() - self._total_retries < 1.0:
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def remaining(self) -> float:
        """Returns how many retries the budget still allows now (>= 0, may be fractional)."""
        self._index()
        left = self._allowed() - self._total_retries
        return left if left > 0.0 else 0.0

    def __repr__(self) -> str:
        return (
            f"RetryBudget(requests={self._total_requests}, retries={self._total_retries}, "
            f"remaining={self.remaining():g})"
        )
