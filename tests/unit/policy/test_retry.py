"""Retry decisions (spec §3 `retry`): conditions, the rule in force for a route, full-jitter
backoff and the per-Service retry budget.

Deterministic: a hand-advanced clock and seeded random sources.
"""

from __future__ import annotations

import random
import statistics

import pytest

from meshproxy.config.model.policy import Backoff, RetryPolicy
from meshproxy.config.model.policy import RetryBudget as RetryBudgetSpec
from meshproxy.config.model.route import RouteRetry
from meshproxy.policy.retry import (
    CONNECT_FAILURE,
    IDEMPOTENT_METHODS,
    REFUSED_STREAM,
    RESET,
    TIMEOUT,
    RetryBudget,
    RetryRule,
    backoff_delay,
    retry_reason,
)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FixedRandom(random.Random):
    """Returns the same draw every time, to pin full jitter at a known point."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


DEFAULT_ON = frozenset({"connect-failure", "reset", "502", "503", "504"})


def rule(on=DEFAULT_ON, non_idempotent: bool = False) -> RetryRule:
    return RetryRule(attempts=2, on=frozenset(on), non_idempotent=non_idempotent,
                     backoff_base=0.025, backoff_max=0.25)


# --- retry_reason ------------------------------------------------------------------------

# (method, failure, on, non_idempotent, request_sent, replayable) -> reason
REASONS = [
    # connect-failure: nothing reached the app, any method
    ("GET", CONNECT_FAILURE, DEFAULT_ON, False, False, True, CONNECT_FAILURE),
    ("POST", CONNECT_FAILURE, DEFAULT_ON, False, False, True, CONNECT_FAILURE),
    ("PATCH", CONNECT_FAILURE, DEFAULT_ON, False, False, True, CONNECT_FAILURE),
    ("GET", CONNECT_FAILURE, {"reset", "503"}, False, False, True, None),
    # a body that could not be kept: connect-failure only, and only if nothing was sent
    ("POST", CONNECT_FAILURE, DEFAULT_ON, False, False, False, CONNECT_FAILURE),
    ("GET", CONNECT_FAILURE, DEFAULT_ON, False, True, False, None),
    # refused-stream: the app never saw it either, retried where it or connect-failure is on
    ("POST", REFUSED_STREAM, DEFAULT_ON, False, True, True, REFUSED_STREAM),
    ("POST", REFUSED_STREAM, {REFUSED_STREAM}, False, True, True, REFUSED_STREAM),
    ("GET", REFUSED_STREAM, {"reset", "503"}, False, True, True, None),
    ("POST", REFUSED_STREAM, DEFAULT_ON, False, True, False, None),
    ("GET", RESET, DEFAULT_ON, False, False, False, None),
    ("GET", "503", DEFAULT_ON, False, True, False, None),
    ("PUT", TIMEOUT, DEFAULT_ON, True, True, False, None),
    # a kept body may be replayed even though it was sent
    ("PUT", RESET, DEFAULT_ON, False, True, True, RESET),
    # reset: idempotent methods, or any method with nonIdempotent
    ("GET", RESET, DEFAULT_ON, False, True, True, RESET),
    ("POST", RESET, DEFAULT_ON, False, True, True, None),
    ("PATCH", RESET, DEFAULT_ON, False, True, True, None),
    ("POST", RESET, DEFAULT_ON, True, True, True, RESET),
    ("GET", RESET, {"connect-failure", "503"}, False, True, True, None),
    # status codes
    ("GET", "503", DEFAULT_ON, False, True, True, "503"),
    ("GET", "502", DEFAULT_ON, False, True, True, "502"),
    ("GET", "500", DEFAULT_ON, False, True, True, None),
    ("POST", "503", DEFAULT_ON, False, True, True, None),
    ("POST", "503", DEFAULT_ON, True, True, True, "503"),
    ("GET", "500", {"5xx"}, False, True, True, "500"),
    ("GET", "599", {"5xx"}, False, True, True, "599"),
    ("GET", "404", {"5xx"}, False, True, True, None),
    ("GET", "200", DEFAULT_ON, False, True, True, None),
    ("GET", "429", {"429"}, False, True, True, "429"),
    ("DELETE", "500", {"5xx"}, False, True, True, "500"),
    # per-try timeout: answered 504 by the proxy
    ("GET", TIMEOUT, DEFAULT_ON, False, True, True, TIMEOUT),
    ("GET", TIMEOUT, {"5xx"}, False, True, True, TIMEOUT),
    ("GET", TIMEOUT, {"connect-failure", "reset", "503"}, False, True, True, None),
    ("POST", TIMEOUT, DEFAULT_ON, False, True, True, None),
    ("POST", TIMEOUT, DEFAULT_ON, True, True, True, TIMEOUT),
    # methods are case-sensitive (RFC 9110 §9.1)
    ("get", RESET, DEFAULT_ON, False, True, True, None),
]


@pytest.mark.parametrize(
    ("method", "failure", "on", "non_idempotent", "request_sent", "replayable", "expected"),
    REASONS,
)
def test_retry_reason_table(method, failure, on, non_idempotent, request_sent, replayable,
                            expected) -> None:
    reason = retry_reason(rule(on, non_idempotent), method, failure,
                          request_sent=request_sent, replayable=replayable)
    assert reason == expected


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_every_idempotent_method_retries_reset_and_codes(method: str) -> None:
    r = rule()
    assert retry_reason(r, method, RESET, request_sent=True, replayable=True) == RESET
    assert retry_reason(r, method, "504", request_sent=True, replayable=True) == "504"


def test_idempotent_methods_are_the_spec_list() -> None:
    assert IDEMPOTENT_METHODS == {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}


# --- RetryRule.from_policy ---------------------------------------------------------------


def test_rule_from_default_policy_is_the_spec_defaults() -> None:
    r = RetryRule.from_policy(RetryPolicy())
    assert r == RetryRule(attempts=2, on=DEFAULT_ON, non_idempotent=False,
                          backoff_base=0.025, backoff_max=0.25)


def test_route_without_settings_keeps_the_policy() -> None:
    policy = RetryPolicy(attempts=3, on=("connect-failure", "5xx"), non_idempotent=True,
                         backoff=Backoff(base=0.05, max=1.0))
    assert RetryRule.from_policy(policy, RouteRetry()) == RetryRule.from_policy(policy)
    assert RetryRule.from_policy(policy) == RetryRule(
        attempts=3, on=frozenset({"connect-failure", "5xx"}), non_idempotent=True,
        backoff_base=0.05, backoff_max=1.0)


def test_route_codes_replace_the_status_conditions() -> None:
    policy = RetryPolicy(on=("connect-failure", "reset", "5xx"), non_idempotent=True)
    r = RetryRule.from_policy(policy, RouteRetry(codes=(500, 429)))
    assert r.on == {"connect-failure", "reset", "500", "429"}
    assert r.non_idempotent is True
    assert r.attempts == 2
    # 5xx from the policy no longer applies; the listed codes do
    assert retry_reason(r, "GET", "503", request_sent=True, replayable=True) is None
    assert retry_reason(r, "GET", "429", request_sent=True, replayable=True) == "429"
    assert retry_reason(r, "GET", RESET, request_sent=True, replayable=True) == RESET


def test_route_attempts_and_backoff_override() -> None:
    r = RetryRule.from_policy(RetryPolicy(), RouteRetry(attempts=5, backoff=0.1))
    assert (r.attempts, r.backoff_base, r.backoff_max) == (5, 0.1, 0.25)
    assert r.on == DEFAULT_ON
    assert RetryRule.from_policy(RetryPolicy(), RouteRetry(attempts=0)).attempts == 0


def test_route_backoff_above_the_cap_raises_the_cap() -> None:
    r = RetryRule.from_policy(RetryPolicy(), RouteRetry(backoff=2.0))
    assert (r.backoff_base, r.backoff_max) == (2.0, 2.0)


# --- backoff_delay -----------------------------------------------------------------------


@pytest.mark.parametrize("retry_number", range(11))
def test_backoff_is_full_jitter_under_the_cap(retry_number: int) -> None:
    base, maximum = 0.025, 0.25
    cap = min(maximum, base * 2**retry_number)
    rng = random.Random(retry_number)
    draws = [backoff_delay(retry_number, base, maximum, rng) for _ in range(4000)]
    assert all(0.0 <= d <= cap for d in draws)
    assert max(draws) > 0.98 * cap
    assert min(draws) < 0.02 * cap
    assert statistics.fmean(draws) == pytest.approx(cap / 2, rel=0.05)


def test_backoff_draws_from_the_given_rng() -> None:
    a = [backoff_delay(1, 0.025, 0.25, random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    rng = random.Random(7)
    seq = [backoff_delay(1, 0.025, 0.25, rng) for _ in range(3)]
    assert seq[0] == a[0] and len(set(seq)) == 3
    assert backoff_delay(2, 0.025, 0.25, FixedRandom(0.5)) == pytest.approx(0.05)
    assert backoff_delay(9, 0.025, 0.25, FixedRandom(0.5)) == pytest.approx(0.125)
    assert backoff_delay(0, 0.025, 0.25, FixedRandom(0.0)) == 0.0


def test_backoff_for_a_huge_retry_number_stays_at_the_cap() -> None:
    assert backoff_delay(5000, 0.025, 0.25, FixedRandom(0.5)) == pytest.approx(0.125)


def test_backoff_rejects_a_negative_retry_number() -> None:
    with pytest.raises(ValueError, match="retry_number"):
        backoff_delay(-1, 0.025, 0.25, random.Random(0))


# --- RetryBudget -------------------------------------------------------------------------


def spend(budget: RetryBudget) -> int:
    """Makes retries until the budget refuses; returns how many were allowed."""
    made = 0
    while budget.try_retry():
        made += 1
        assert made < 10_000
    return made


def test_idle_budget_allows_min_per_second_times_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(20.0, 10.0, clock)
    assert budget.remaining() == 100.0
    assert spend(budget) == 100
    assert budget.remaining() == 0.0
    assert budget.try_retry() is False


def test_budget_over_a_full_window_is_percent_plus_minimum() -> None:
    clock = FakeClock(0.5)
    budget = RetryBudget(20.0, 10.0, clock)
    for second in range(10):
        for _ in range(10):
            budget.record_request()
        if second < 9:
            clock.advance(1.0)
    assert clock.now == 9.5
    assert budget.remaining() == 120.0
    assert spend(budget) == 20 + 100


def test_budget_refills_as_the_window_moves() -> None:
    clock = FakeClock(0.5)
    budget = RetryBudget(20.0, 10.0, clock)
    for _ in range(9):
        for _ in range(10):
            budget.record_request()
        clock.advance(1.0)
    for _ in range(10):
        budget.record_request()
    assert spend(budget) == 120  # all made in the second [9, 10)
    # One second later the requests of [0, 1) have left the window: 90 requests, 120 retries.
    clock.now = 10.5
    assert budget.remaining() == 0.0
    assert budget.try_retry() is False
    # The retries stay counted until their own second leaves the window...
    clock.now = 18.99
    assert budget.remaining() == 0.0
    # ...then only the minimum is left, as no request was seen since.
    clock.now = 19.0
    assert budget.remaining() == 100.0


def test_requests_leave_the_window_one_second_at_a_time() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(50.0, 0.0, clock)
    for _ in range(10):
        budget.record_request()  # second [0, 1)
    clock.now = 5.0
    for _ in range(10):
        budget.record_request()  # second [5, 6)
    assert budget.remaining() == 10.0
    clock.now = 9.999
    assert budget.remaining() == 10.0
    clock.now = 10.0
    assert budget.remaining() == 5.0
    clock.now = 15.0
    assert budget.remaining() == 0.0


def test_retries_are_not_counted_as_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(100.0, 0.0, clock)
    budget.record_request()
    assert budget.try_retry() is True
    assert budget.try_retry() is False  # a retry does not earn a retry


def test_fractional_allowance_needs_a_whole_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(20.0, 0.0, clock)
    for _ in range(7):
        budget.record_request()
    assert budget.remaining() == pytest.approx(1.4)
    assert spend(budget) == 1
    assert budget.remaining() == pytest.approx(0.4)


def test_a_jump_longer_than_the_window_clears_everything() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(20.0, 1.0, clock)
    for _ in range(50):
        budget.record_request()
    assert spend(budget) == 20
    clock.advance(3600.0)
    assert budget.remaining() == 10.0


def test_a_clock_that_goes_back_does_not_corrupt_the_counts() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(20.0, 1.0, clock)
    for _ in range(50):
        budget.record_request()
    clock.now = 50.0
    budget.record_request()
    assert budget.remaining() == pytest.approx(51 * 0.2 + 10)
    clock.now = 100.5
    assert budget.remaining() == pytest.approx(51 * 0.2 + 10)


def test_zero_budget_never_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.0, 0.0, clock)
    for _ in range(1000):
        budget.record_request()
    assert budget.try_retry() is False


def test_budget_from_default_policy() -> None:
    clock = FakeClock()
    budget = RetryBudget.from_policy(RetryBudgetSpec(), clock)
    assert budget.remaining() == 100.0


@pytest.mark.parametrize(
    ("percent", "min_per_second", "window", "field"),
    [(-1.0, 10.0, 10.0, "percent"), (float("nan"), 10.0, 10.0, "percent"),
     (20.0, -1.0, 10.0, "min_per_second"), (20.0, 10.0, 0.0, "window"),
     (20.0, 10.0, float("inf"), "window")],
)
def test_budget_rejects_bad_settings(percent, min_per_second, window, field) -> None:
    with pytest.raises(ValueError, match=field):
        RetryBudget(percent, min_per_second, FakeClock(), window)
