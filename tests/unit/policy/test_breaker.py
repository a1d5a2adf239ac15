"""Circuit breaker (spec §3 `circuitBreaker`): consecutive-failure ejection, half-open probes,
doubling ejection times with jitter, the ejection limit, and the endpoint counts.

Deterministic: a hand-advanced clock and seeded random sources.
"""

from __future__ import annotations

import random

import pytest

from meshproxy.config.model.policy import CircuitBreaker as CircuitBreakerSpec
from meshproxy.policy.breaker import EJECTED, PROBING, READY, CircuitBreaker


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FixedRandom(random.Random):
    """Returns the same draw every time, to pin the jitter at a known point."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


KEYS = ["a", "b", "c", "d"]
THRESHOLD = 3
BASE, MAX = 5.0, 60.0


def make(clock: FakeClock, keys=KEYS, percent: int = 50, rng=None,
         threshold: int = THRESHOLD) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold, BASE, MAX, percent, clock, rng or random.Random(1))
    breaker.forget(set(keys))
    return breaker


def fail(breaker: CircuitBreaker, key: str, times: int) -> list[bool]:
    return [breaker.record(key, False) for _ in range(times)]


def eject(breaker: CircuitBreaker, key: str) -> None:
    assert fail(breaker, key, THRESHOLD)[-1] is True
    assert breaker.health(key).state == EJECTED


def start_probe(breaker: CircuitBreaker, clock: FakeClock, key: str) -> None:
    """Waits out `key`'s ejection, offers it and sends it the probe request."""
    clock.now = breaker.health(key).ejected_until
    assert key in breaker.eligible(KEYS)
    breaker.probe_started(key)
    assert breaker.health(key).probe_in_flight


# --- transitions: state x event ------------------------------------------------------------


def bring(breaker: CircuitBreaker, clock: FakeClock, start: str) -> None:
    """Puts endpoint "a" into the named starting state."""
    if start == "ready-near":
        fail(breaker, "a", THRESHOLD - 1)
    if start.startswith(("ejected", "probing")):
        eject(breaker, "a")
    if start in ("ejected-due", "probing", "probing-in-flight"):
        clock.now = breaker.health("a").ejected_until
    if start in ("probing", "probing-in-flight"):
        assert "a" in breaker.eligible(KEYS)
    if start == "probing-in-flight":
        breaker.probe_started("a")


def act(breaker: CircuitBreaker, event: str):
    if event == "success":
        return breaker.record("a", True)
    if event == "failure":
        return breaker.record("a", False)
    if event == "eligible":
        return "a" in breaker.eligible(KEYS)
    if event == "probe_started":
        return breaker.probe_started("a")
    raise AssertionError(event)


# (starting state of "a", event, returned, state after, consecutive failures after)
TRANSITIONS = [
    ("ready", "success", False, READY, 0),
    ("ready", "failure", False, READY, 1),
    ("ready", "eligible", True, READY, 0),
    ("ready", "probe_started", None, READY, 0),
    ("ready-near", "failure", True, EJECTED, 0),
    ("ready-near", "success", False, READY, 0),
    ("ejected", "eligible", False, EJECTED, 0),
    ("ejected", "success", False, EJECTED, 0),  # a request sent before the ejection
    ("ejected", "failure", False, EJECTED, 0),
    ("ejected", "probe_started", None, EJECTED, 0),
    ("ejected-due", "eligible", True, PROBING, 0),
    ("ejected-due", "success", False, EJECTED, 0),
    ("probing", "eligible", True, PROBING, 0),  # not picked yet: still offered
    ("probing", "success", False, PROBING, 0),  # not the probe: ignored
    ("probing", "probe_started", None, PROBING, 0),
    ("probing-in-flight", "eligible", False, PROBING, 0),
    ("probing-in-flight", "success", False, READY, 0),
    ("probing-in-flight", "failure", True, EJECTED, 0),
]


@pytest.mark.parametrize(("start", "event", "returned", "state", "failures"), TRANSITIONS)
def test_transition_table(start, event, returned, state, failures) -> None:
    clock = FakeClock()
    breaker = make(clock)
    bring(breaker, clock, start)
    ejected_until = breaker.health("a").ejected_until
    assert act(breaker, event) == returned
    health = breaker.health("a")
    assert health.state == state
    assert health.failures == failures
    if start == "ejected" and event != "eligible":
        assert health.ejected_until == ejected_until  # old outcomes do not extend it


def test_failures_below_the_threshold_keep_the_endpoint() -> None:
    clock = FakeClock()
    breaker = make(clock)
    assert fail(breaker, "a", THRESHOLD - 1) == [False] * (THRESHOLD - 1)
    assert breaker.health("a").failures == THRESHOLD - 1
    assert breaker.eligible(KEYS) == KEYS
    assert breaker.record("a", False) is True
    assert breaker.eligible(KEYS) == ["b", "c", "d"]
    assert breaker.counts() == (3, 1, 0)


def test_a_success_resets_the_consecutive_count() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(5):
        fail(breaker, "a", THRESHOLD - 1)
        assert breaker.record("a", True) is False
    assert breaker.health("a").state == READY
    assert breaker.health("a").failures == 0


def test_ejected_endpoint_waits_its_time_then_is_probed() -> None:
    clock = FakeClock()
    breaker = make(clock, rng=FixedRandom(0.5))  # jitter factor exactly 1
    eject(breaker, "a")
    assert breaker.health("a").ejected_until == clock.now + BASE
    clock.advance(BASE - 0.001)
    assert breaker.eligible(KEYS) == ["b", "c", "d"]
    assert breaker.counts() == (3, 1, 0)
    clock.advance(0.001)
    assert breaker.eligible(KEYS) == ["b", "c", "d", "a"]
    assert breaker.counts() == (3, 0, 1)


def test_a_probing_endpoint_is_offered_to_one_request_at_a_time() -> None:
    clock = FakeClock()
    breaker = make(clock)
    eject(breaker, "a")
    clock.now = breaker.health("a").ejected_until
    # Offered until a request is sent to it...
    assert breaker.eligible(KEYS)[-1] == "a"
    assert breaker.eligible(KEYS)[-1] == "a"
    breaker.probe_started("a")
    # ...then to nobody else while that probe is out.
    for _ in range(3):
        assert breaker.eligible(KEYS) == ["b", "c", "d"]
    assert breaker.counts() == (3, 0, 1)


def test_at_most_one_probe_candidate_is_offered() -> None:
    clock = FakeClock()
    keys = [f"10.0.0.{i}:80" for i in range(10)]
    breaker = make(clock, keys=keys)
    eject(breaker, keys[2])
    eject(breaker, keys[5])
    clock.advance(MAX)
    ready = [k for k in keys if k not in (keys[2], keys[5])]
    first = breaker.eligible(keys)
    assert first == [*ready, keys[2]]
    breaker.probe_started(keys[2])
    assert breaker.eligible(keys) == [*ready, keys[5]]
    breaker.probe_started(keys[5])
    assert breaker.eligible(keys) == ready
    assert breaker.counts() == (8, 0, 2)


def test_probe_success_brings_it_back_and_lowers_the_ejection_count() -> None:
    clock = FakeClock()
    breaker = make(clock)
    eject(breaker, "a")
    assert breaker.health("a").ejections == 1
    start_probe(breaker, clock, "a")
    assert breaker.record("a", True) is False
    health = breaker.health("a")
    assert (health.state, health.failures, health.ejections) == (READY, 0, 0)
    assert breaker.eligible(KEYS) == KEYS
    assert breaker.counts() == (4, 0, 0)


def test_probe_failure_ejects_again_for_twice_as_long() -> None:
    clock = FakeClock()
    breaker = make(clock, rng=FixedRandom(0.5))
    eject(breaker, "a")
    start_probe(breaker, clock, "a")
    assert breaker.record("a", False) is True
    health = breaker.health("a")
    assert health.state == EJECTED
    assert health.ejected_until == clock.now + 2 * BASE
    assert breaker.counts() == (3, 1, 0)


def ejection_durations(rng: random.Random, rounds: int) -> list[float]:
    """Ejects "a" and fails every probe; returns each ejection's length."""
    clock = FakeClock()
    breaker = make(clock, rng=rng)
    eject(breaker, "a")
    durations = [breaker.health("a").ejected_until - clock.now]
    for _ in range(rounds - 1):
        start_probe(breaker, clock, "a")
        assert breaker.record("a", False) is True
        durations.append(breaker.health("a").ejected_until - clock.now)
    return durations


NOMINAL = [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_ejection_time_doubles_and_is_capped() -> None:
    assert ejection_durations(FixedRandom(0.5), 7) == pytest.approx(NOMINAL)


@pytest.mark.parametrize("seed", range(20))
def test_ejection_jitter_stays_within_ten_percent_and_under_the_cap(seed: int) -> None:
    durations = ejection_durations(random.Random(seed), 7)
    for duration, nominal in zip(durations, NOMINAL, strict=True):
        assert 0.9 * nominal - 1e-9 <= duration <= min(MAX, 1.1 * nominal) + 1e-9


def test_ejection_jitter_extremes_come_from_the_rng() -> None:
    assert ejection_durations(FixedRandom(0.0), 5) == pytest.approx([4.5, 9.0, 18.0, 36.0, 54.0])
    high = ejection_durations(FixedRandom(0.999999), 5)
    assert high[:4] == pytest.approx([5.5, 11.0, 22.0, 44.0], rel=1e-5)
    assert high[4] == MAX
    assert len({round(d, 9) for d in ejection_durations(random.Random(3), 3)}) == 3
    assert ejection_durations(random.Random(3), 3) == ejection_durations(random.Random(3), 3)


def test_ejection_count_stops_growing_at_the_cap_and_decays_while_healthy() -> None:
    clock = FakeClock()
    breaker = make(clock, rng=FixedRandom(0.5))
    eject(breaker, "a")
    for _ in range(10):
        start_probe(breaker, clock, "a")
        breaker.record("a", False)
    assert breaker.health("a").ejections == 4  # 5 * 2**4 >= 60: the cap
    start_probe(breaker, clock, "a")
    breaker.record("a", True)
    assert breaker.health("a").ejections == 3
    # Failing again soon: the ejection is still long.
    eject(breaker, "a")
    assert breaker.health("a").ejected_until - clock.now == 40.0
    start_probe(breaker, clock, "a")
    breaker.record("a", True)
    assert breaker.health("a").ejections == 3
    # Healthy for three max ejection times: back to the base time.
    clock.advance(3 * MAX)
    eject(breaker, "a")
    assert breaker.health("a").ejected_until - clock.now == BASE
    assert breaker.health("a").ejections == 1


def test_a_lost_probe_is_offered_again_after_the_max_ejection_time() -> None:
    clock = FakeClock()
    breaker = make(clock)
    eject(breaker, "a")
    start_probe(breaker, clock, "a")
    sent = clock.now
    clock.now = sent + MAX - 0.001
    assert "a" not in breaker.eligible(KEYS)
    clock.now = sent + MAX
    assert "a" in breaker.eligible(KEYS)
    assert breaker.health("a").probe_in_flight is False


# --- the ejection limit ----------------------------------------------------------------------


@pytest.mark.parametrize(("count", "allowed"), [(1, 0), (2, 1), (3, 1), (10, 5)])
def test_max_ejection_percent_bounds_the_endpoints_out(count: int, allowed: int) -> None:
    clock = FakeClock()
    keys = [f"e{i}" for i in range(count)]
    breaker = make(clock, keys=keys)
    ejected = [any(fail(breaker, key, THRESHOLD)) for key in keys]
    assert sum(ejected) == allowed
    assert breaker.counts() == (count - allowed, allowed, 0)
    assert len(breaker.eligible(keys)) == count - allowed


def test_probing_endpoints_count_as_out_and_a_freed_slot_is_used_by_the_next_failure() -> None:
    clock = FakeClock()
    breaker = make(clock, keys=["a", "b"])
    eject(breaker, "a")
    assert fail(breaker, "b", THRESHOLD + 2) == [False] * (THRESHOLD + 2)
    clock.now = breaker.health("a").ejected_until
    assert breaker.eligible(["a", "b"]) == ["b", "a"]
    assert breaker.record("b", False) is False  # "a" is probing: still out
    breaker.probe_started("a")
    assert breaker.record("a", True) is False
    assert breaker.record("b", False) is True  # the failures kept counting
    assert breaker.counts() == (1, 1, 0)


def test_with_every_endpoint_allowed_out_none_is_eligible_until_a_probe_is_due() -> None:
    clock = FakeClock()
    breaker = make(clock, keys=["a", "b"], percent=100, rng=FixedRandom(0.5))
    eject(breaker, "a")
    clock.advance(1.0)
    eject(breaker, "b")
    assert breaker.eligible(["a", "b"]) == []
    clock.advance(BASE - 1.0)
    assert breaker.eligible(["a", "b"]) == ["a"]


def test_zero_percent_never_ejects() -> None:
    clock = FakeClock()
    breaker = make(clock, percent=0)
    assert not any(fail(breaker, "a", 50))
    assert breaker.eligible(KEYS) == KEYS


# --- known endpoints ---------------------------------------------------------------------


def test_forget_drops_gone_endpoints_and_adds_new_ones() -> None:
    clock = FakeClock()
    breaker = make(clock)
    eject(breaker, "a")
    eject(breaker, "b")
    clock.now = breaker.health("b").ejected_until
    breaker.eligible(["b"])
    assert breaker.counts() == (2, 1, 1)
    breaker.forget({"a", "b", "c", "d", "e", "f"})
    assert breaker.counts() == (4, 1, 1)
    breaker.forget({"c", "d", "e", "f"})
    assert breaker.counts() == (4, 0, 0)
    assert breaker.health("c").state == READY
    # Four known endpoints at 50%: two may be out.
    assert [fail(breaker, k, THRESHOLD)[-1] for k in ("c", "d", "e")] == [True, True, False]


def test_a_returning_endpoint_starts_fresh() -> None:
    clock = FakeClock()
    breaker = make(clock)
    eject(breaker, "a")
    breaker.forget({"b", "c", "d"})
    breaker.forget(set(KEYS))
    health = breaker.health("a")
    assert (health.state, health.failures, health.ejections) == (READY, 0, 0)


def test_unknown_endpoints_are_eligible_and_created_on_first_use() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(THRESHOLD, BASE, MAX, 50, clock, random.Random(1))
    assert breaker.counts() == (0, 0, 0)
    assert breaker.eligible(["x", "y"]) == ["x", "y"]
    assert breaker.health("x").state == READY
    breaker.record("y", True)
    assert breaker.counts() == (2, 0, 0)
    eject(breaker, "x")
    assert breaker.eligible(["x", "y", "z"]) == ["y", "z"]
    assert breaker.counts() == (2, 1, 0)


def test_eligible_keeps_the_order_of_the_keys() -> None:
    clock = FakeClock()
    breaker = make(clock)
    eject(breaker, "b")
    assert breaker.eligible(["d", "c", "b", "a"]) == ["d", "c", "a"]


# --- construction --------------------------------------------------------------------------


def test_breaker_from_default_policy() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker.from_policy(CircuitBreakerSpec(), clock, FixedRandom(0.5))
    breaker.forget({"a", "b"})
    assert fail(breaker, "a", 5) == [False] * 4 + [True]
    assert breaker.health("a").ejected_until == clock.now + 5.0


@pytest.mark.parametrize(
    ("args", "field"),
    [((0, 5.0, 60.0, 50), "consecutive_failures"), ((5, 0.0, 60.0, 50), "base_ejection"),
     ((5, 5.0, 1.0, 50), "max_ejection"), ((5, 5.0, 60.0, 101), "max_ejection_percent"),
     ((5, 5.0, 60.0, -1), "max_ejection_percent")],
)
def test_breaker_rejects_bad_settings(args, field) -> None:
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(*args, FakeClock(), random.Random(0))
