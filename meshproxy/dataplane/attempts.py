"""Retries and timeouts of one outbound request: the `Attempts` an exchange owns.

Calls to other Services get retries (with a budget and backoff), a request timeout and a
per-try timeout; the local app (inbound) gets none of these, and its exchanges have no
Attempts at all. The decisions are pure (meshproxy.policy.retry); this object keeps what they
need between tries: the rule in force, the endpoints tried, the retries made, the body kept for
replay, and the three timers. It calls the exchange back only through the callbacks it is
handed when a timer is armed. See docs/resilience.md for the rules as a user sees them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

from meshproxy.http1.events import RequestHead
from meshproxy.policy.retry import (
    REFUSED_STREAM,
    RetryBudget,
    RetryRule,
    backoff_delay,
    retry_reason,
)

# Spec §3: a request body up to this size is kept so that a failed try can be sent again.
REPLAY_LIMIT = 64 * 1024
# Streams an HTTP/2 server refused unprocessed are sent again up to this many times per
# request, apart from the rule's attempts (as browsers do: Firefox's limit is 6). A gRPC
# server near its stream limit refuses a burst's streams for a moment (grpcio counts a stream
# until its handler is done); that is a signal to wait, not a failure of the request.
REFUSED_RESENDS = 6


class Attempts:
    """The retry rule, timeouts, tries and replay buffer of one outbound request."""

    __slots__ = (
        "loop", "rng", "metrics", "service_key", "budget", "rule", "per_try", "timeout",
        "tried", "retries", "refusals", "made", "replay", "replay_bytes", "try_timer", "deadline_timer",
        "retry_timer",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random, metrics,
                 service_key: str, budget: RetryBudget, rule: RetryRule, *,
                 timeout: float | None, per_try: float | None, keep_body: bool) -> None:
        """`rule`, `timeout` and `per_try`: the Service's, or its route rule's where that
        sets them. `keep_body`: the request has a body that may fit the replay buffer."""
        self.loop = loop
        self.rng = rng
        self.metrics = metrics
        self.service_key = service_key
        self.budget = budget
        self.rule = rule
        self.timeout = timeout
        self.per_try = per_try
        self.tried: set[str] | None = None  # endpoints already tried
        self.retries = 0  # retries decided on (the rule's attempts bound them)
        self.refusals = 0  # refused streams sent again (REFUSED_RESENDS bounds them)
        self.made = 0  # retries sent: their backoff was over (meshproxy_retries_total)
        # The body kept for replay; None once it outgrew REPLAY_LIMIT (or none is kept).
        self.replay: list[bytes] | None = [] if keep_body and rule.attempts > 0 else None
        self.replay_bytes = 0
        self.try_timer: asyncio.TimerHandle | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.retry_timer: asyncio.TimerHandle | None = None
        budget.record_request()

    # -- the body -----------------------------------------------------------------------------

    def keep(self, data: bytes) -> None:
        """A piece of the request body went by: keep it while the whole body fits."""
        if self.replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes <= REPLAY_LIMIT:
                self.replay.append(data)
            else:
                self.replay = None  # past the retry buffer: not retried once bytes were sent

    def body_to_send_again(self) -> list[bytes]:
        """The body pieces received so far, for a retry of a try that had taken them."""
        return list(self.replay) if self.replay else []

    # -- deciding ------------------------------------------------------------------------------

    def reason_to_retry(self, head: RequestHead, kind: str, *, sent: bool,
                        request_complete: bool) -> str | None:
        """The retry reason (spec §6 `reason` label) when a try that failed with `kind` (a
        policy.retry condition, or the status as text) is to be tried again: the rule allows
        it, the body can be sent again, and the budget has room; else None (then counted as
        budget-exhausted when only the budget said no)."""
        rule = self.rule
        if kind == REFUSED_STREAM:
            if self.refusals >= REFUSED_RESENDS:
                return None
        elif self.retries >= rule.attempts:
            return None
        # The body can be sent again only if all of it will be in the buffer: it is complete,
        # or its announced length fits. A chunked body still arriving may yet outgrow it, and
        # the bytes received while the retry waits would then be lost.
        replayable = not head.has_body or (self.replay is not None and (
            request_complete or head.content_length is not None))
        reason = retry_reason(rule, head.method.decode("latin-1"), kind,
                              request_sent=sent, replayable=replayable)
        if reason is None:
            return None
        if not self.budget.try_retry():
            self.metrics.retry_budget_exhausted(self.service_key)
            return None
        return reason

    def schedule(self, reason: str, endpoint_key: str, retry: Callable[[], None]) -> None:
        """Retry for `reason` away from `endpoint_key`: call `retry` after the backoff (full
        jitter). It counts as made (metric, access log) once the backoff is over: one given
        up during it (request timeout, client gone) was never sent."""
        if self.tried is None:
            self.tried = set()
        self.tried.add(endpoint_key)
        if reason == REFUSED_STREAM:
            self.refusals += 1
            number = self.refusals
        else:
            self.retries += 1
            number = self.retries
        rule = self.rule
        delay = backoff_delay(number - 1, rule.backoff_base, rule.backoff_max, self.rng)
        self.retry_timer = self.loop.call_later(delay, self._backoff_over, reason, retry)

    def _backoff_over(self, reason: str, retry: Callable[[], None]) -> None:
        self.retry_timer = None
        self.made += 1
        self.metrics.retry(self.service_key, reason)
        retry()

    # -- timers --------------------------------------------------------------------------------

    def start_deadline(self, on_timeout: Callable[[], None]) -> None:
        """Arm the request timeout, when there is one."""
        if self.timeout:
            self.deadline_timer = self.loop.call_later(self.timeout, on_timeout)

    def try_started(self, on_timeout: Callable[[], None]) -> None:
        """Arm the per-try timeout, when there is one."""
        if self.per_try:
            self.try_timer = self.loop.call_later(self.per_try, on_timeout)

    def try_ended(self) -> None:
        # A timer that has fired is cancelled harmlessly: the handle is kept until here.
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def cancel(self) -> None:
        """Stop every timer (the request ended)."""
        for timer in (self.try_timer, self.deadline_timer, self.retry_timer):
            if timer is not None:
                timer.cancel()
        self.try_timer = self.deadline_timer = self.retry_timer = None


def attempts_for(service, route_rule, head: RequestHead, upgrading: bool,
                 loop: asyncio.AbstractEventLoop, rng: random.Random, metrics) -> Attempts | None:
    """The Attempts of a request to `service` (a ServiceRuntime), with the matched route
    rule's retry and timeouts where it sets them; None when the Service is the local app
    (inbound: neither retries nor timeouts)."""
    outbound = service.outbound
    if outbound is None:
        return None
    rule = outbound.retry_rule
    timeout, per_try = outbound.request_timeout, outbound.per_try_timeout
    if route_rule is not None:
        if route_rule.retry is not None:
            rule = RetryRule.from_policy(service.policy.retry, route_rule.retry)
        if route_rule.timeouts is not None:
            if route_rule.timeouts.request is not None:
                timeout = route_rule.timeouts.request
            if route_rule.timeouts.backend_request is not None:
                per_try = route_rule.timeouts.backend_request
    # A body announced larger than the buffer could never be sent whole again.
    keep_body = (head.has_body and not upgrading
                 and (head.content_length is None or head.content_length <= REPLAY_LIMIT))
    return Attempts(loop, rng, metrics, service.key, outbound.budget, rule, timeout=timeout,
                    per_try=per_try, keep_body=keep_body)
