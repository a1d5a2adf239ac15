"""Retries, timeouts and the circuit breaker's bookkeeping for one exchange (outbound).

The decisions are pure (meshproxy.policy.retry and .breaker); this mixin applies them to an
Exchange: which try failed how, whether and when to try again, and what the endpoint's
outcome was. See docs/resilience.md for the rules as a user sees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshproxy.http1.errors import Overloaded, ProxyError, Timeout
from meshproxy.policy.retry import TIMEOUT, RetryRule, backoff_delay, retry_reason

if TYPE_CHECKING:  # pragma: no cover
    from meshproxy.dataplane.destinations import ServiceRuntime

# Spec §3: a request body up to this size is kept so that a failed try can be sent again.
REPLAY_LIMIT = 64 * 1024


class Resilience:
    """Mixin of Exchange: the attributes it uses are the Exchange's slots."""

    __slots__ = ()

    def _begin(self, service: "ServiceRuntime") -> None:
        """Limits, the retry rule and budget, and the request timeout for this request."""
        if service.active >= service.max_requests:
            raise Overloaded(f"{service.key}: {service.max_requests} requests in flight")
        service.active += 1
        self.counted = True
        budget = service.budget
        if budget is None:
            return  # inbound: the local app gets neither retries nor timeouts
        budget.record_request()
        rule = service.retry_rule
        timeout, per_try = service.request_timeout, service.per_try_timeout
        route_rule = self.route_rule
        if route_rule is not None:
            if route_rule.retry is not None:
                rule = RetryRule.from_policy(service.policy.retry, route_rule.retry)
            if route_rule.timeouts is not None:
                if route_rule.timeouts.request is not None:
                    timeout = route_rule.timeouts.request
                if route_rule.timeouts.backend_request is not None:
                    per_try = route_rule.timeouts.backend_request
        self.retry_rule = rule
        self.per_try = per_try
        head = self.head
        if (rule.attempts > 0 and head.has_body and not self.upgrading
                and (head.content_length is None or head.content_length <= REPLAY_LIMIT)):
            # A body announced larger than the buffer could never be sent whole again.
            self.replay = []
        if timeout:
            self.deadline_timer = self.down.loop.call_later(timeout, self._request_timed_out)


    def _replayable(self) -> bool:
        return not self.head.has_body or (self.replay is not None and self.request_complete)

    def _try_failed(self, error: ProxyError, kind: str) -> None:
        """A try failed before any of its response reached the client: retry it when the
        rules and the budget allow, else answer with `error`."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.exchange = None
            conn.abort()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._end_try(False)
        if self.finished:
            return
        reason = self._retry_reason(kind)
        if reason is None:
            self.fail(error)
            return
        self._schedule_retry(reason)

    def _retry_reason(self, kind: str) -> str | None:
        rule = self.retry_rule
        if rule is None or self.retries >= rule.attempts or self.upgrading:
            return None
        # The body can be sent again only if all of it will be in the buffer: it is complete,
        # or its announced length fits. A chunked body still arriving may yet outgrow it, and
        # the bytes received while the retry waits would then be lost.
        head = self.head
        replayable = not head.has_body or (self.replay is not None and (
            self.request_complete or head.content_length is not None))
        reason = retry_reason(rule, self.head.method.decode("latin-1"), kind,
                              request_sent=self.sent, replayable=replayable)
        if reason is None:
            return None
        service = self.service
        if not service.budget.try_retry():
            self.down.metrics.retry_budget_exhausted(service.key)
            return None
        return reason

    def _schedule_retry(self, reason: str) -> None:
        if self.tried is None:
            self.tried = set()
        self.tried.add(self.endpoint.key)
        self.retries += 1
        self.down.metrics.retry(self.service.key, reason)
        rule = self.retry_rule
        delay = backoff_delay(self.retries - 1, rule.backoff_base, rule.backoff_max,
                              self.down.listener.rng)
        self.retry_timer = self.down.loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self.retry_timer = None
        if self.finished:
            return
        if self.sent:
            # The failed try took the body received so far: send the kept copy again.
            self.pending = list(self.replay) if self.replay else []
            self.pending_bytes = sum(map(len, self.pending))
        try:
            self._attempt()
        except ProxyError as exc:
            self.fail(exc)

    def _end_try(self, success: bool | None) -> None:
        """Close the current try's books: balancer load, per-try timer, and (success not
        None) the circuit breaker's record of the endpoint."""
        if not self.try_open:
            return
        self.try_open = False
        endpoint = self.endpoint
        endpoint.load.finish(self.started_at)
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        breaker = self.service.breaker
        if self.probe:
            self.probe = False
            if success is None:
                # No outcome (the client left, or the request goes elsewhere): the probe
                # must not keep the endpoint out until it is given up as lost.
                breaker.probe_abandoned(endpoint.key)
        if breaker is not None and success is not None:
            was_ready = breaker.all_ready
            if breaker.record(endpoint.key, success):
                self.down.metrics.endpoint_ejected(self.service.key, endpoint.key)
                was_ready = not breaker.all_ready  # force the gauge update below
            if was_ready != breaker.all_ready or not breaker.all_ready:
                self.down.metrics.set_endpoints(self.service.key, *breaker.counts())

    def _try_timed_out(self) -> None:
        self.try_timer = None
        if self.finished or self.response is not None or not self.try_open:
            return
        self._try_failed(Timeout("per-try timeout"), TIMEOUT)

    def _request_timed_out(self) -> None:
        self.deadline_timer = None
        if self.finished:
            return
        if self.response is None:
            self._end_try(False)
            self.fail(Timeout("request timeout"))
        else:
            conn, self.upstream = self.upstream, None
            if conn is not None:
                conn.exchange = None
                conn.abort()
            self.error = Timeout.reason
            self._abort_client()

    def _cancel_timers(self) -> None:
        for name in ("try_timer", "deadline_timer", "retry_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
