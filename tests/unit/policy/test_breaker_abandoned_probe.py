"""Circuit breaker: a half-open probe that ends without an outcome (its client went away, or
it was sent elsewhere) is offered again at once, not only after `max_ejection`.

Deterministic: a hand-advanced clock and a seeded random source.
"""

from __future__ import annotations

import random

from meshproxy.policy.breaker import EJECTED, PROBING, READY, CircuitBreaker

KEYS = ["a", "b", "c"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ejected_and_due(clock: Clock) -> CircuitBreaker:
    """A breaker over KEYS whose endpoint "c" was ejected and whose time is up."""
    breaker = CircuitBreaker(2, 1.0, 30.0, 50, clock, random.Random(7))
    breaker.forget(KEYS)
    assert not breaker.record("c", False)
    assert breaker.record("c", False)
    assert breaker.health("c").state == EJECTED
    clock.now += 1.2  # past base 1 s + 10% jitter
    return breaker


def test_abandoned_probe_is_offered_to_the_next_request():
    clock = Clock()
    breaker = ejected_and_due(clock)
    assert breaker.eligible(KEYS) == ["a", "b", "c"]
    breaker.probe_started("c")
    assert breaker.eligible(KEYS) == ["a", "b"]  # one probe at a time
    breaker.probe_abandoned("c")
    assert breaker.health("c").state == PROBING
    assert breaker.eligible(KEYS) == ["a", "b", "c"]
    breaker.probe_started("c")
    assert not breaker.record("c", True)
    assert breaker.health("c").state == READY
    assert breaker.counts() == (3, 0, 0)


def test_abandoned_probe_does_not_count_as_an_outcome():
    clock = Clock()
    breaker = ejected_and_due(clock)
    breaker.eligible(KEYS)
    breaker.probe_started("c")
    ejections = breaker.health("c").ejections
    breaker.probe_abandoned("c")
    assert breaker.health("c").ejections == ejections
    assert breaker.counts() == (2, 0, 1)
    # A late outcome of the abandoned request is ignored: no probe is in flight.
    assert not breaker.record("c", False)
    assert breaker.health("c").state == PROBING


def test_probe_abandoned_ignores_endpoints_not_probing():
    clock = Clock()
    breaker = ejected_and_due(clock)
    until = breaker.health("c").ejected_until
    breaker.probe_abandoned("c")  # EJECTED, no probe yet
    breaker.probe_abandoned("a")  # READY
    breaker.probe_abandoned("unknown")
    assert breaker.health("c").state == EJECTED
    assert breaker.health("c").ejected_until == until
    assert breaker.health("a").state == READY
    breaker.eligible(KEYS)  # c becomes PROBING, its probe not yet sent
    breaker.probe_abandoned("c")
    assert breaker.eligible(KEYS) == ["a", "b", "c"]
