"""Load balancing (spec §3 `loadBalancer`): peak-EWMA estimates and the four balancers.

Deterministic: a hand-advanced clock and seeded random sources.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.policy.balancer import (
    EndpointLoad,
    LeastRequestBalancer,
    PeakEwmaBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    make_balancer,
)

DEFAULT_RTT = 0.030
DECAY = 10.0


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def endpoints(clock: FakeClock, count: int) -> list[EndpointLoad]:
    return [EndpointLoad(f"10.0.0.{i}:8080", DEFAULT_RTT, DECAY, clock) for i in range(count)]


def observe(clock: FakeClock, endpoint: EndpointLoad, rtt: float) -> None:
    """One request to `endpoint` that takes `rtt` seconds."""
    started = endpoint.start()
    clock.advance(rtt)
    endpoint.finish(started)


# --- peak EWMA estimate -----------------------------------------------------------------


def test_estimate_starts_at_default_rtt_and_load_counts_in_flight() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("10.0.0.1:80", DEFAULT_RTT, DECAY, clock)
    assert endpoint.key == "10.0.0.1:80"
    assert endpoint.in_flight == 0
    assert endpoint.rtt_estimate() == DEFAULT_RTT
    assert endpoint.load() == DEFAULT_RTT
    endpoint.start()
    endpoint.start()
    assert endpoint.in_flight == 2
    assert endpoint.load() == pytest.approx(3 * DEFAULT_RTT)


def test_start_returns_the_clock_and_finish_records_the_elapsed_time() -> None:
    clock = FakeClock(50.0)
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    started = endpoint.start()
    assert started == 50.0
    clock.advance(0.25)
    endpoint.finish(started)
    assert endpoint.in_flight == 0
    assert endpoint.rtt_estimate() == pytest.approx(0.25)


def test_one_slow_answer_raises_the_estimate_at_once() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    for _ in range(50):
        observe(clock, endpoint, 0.010)
    assert endpoint.rtt_estimate() < 0.030
    observe(clock, endpoint, 0.500)
    assert endpoint.rtt_estimate() == pytest.approx(0.500)


def test_a_faster_answer_leaves_the_decayed_estimate_where_it_is() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    observe(clock, endpoint, 0.500)
    # The next answer arrives one decay period after the peak was recorded.
    clock.advance(DECAY - 0.010)
    observe(clock, endpoint, 0.010)
    # Not pulled back up toward the old peak by the answer: what the balancer saw stands.
    assert endpoint.rtt_estimate() == pytest.approx(0.500 * math.exp(-1.0))
    clock.advance(DECAY)
    assert endpoint.rtt_estimate() == pytest.approx(0.500 * math.exp(-2.0))


def test_an_answer_slower_than_the_decayed_estimate_replaces_it() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    observe(clock, endpoint, 0.500)
    clock.advance(3 * DECAY)  # 0.500 * e^-3 = 0.025
    observe(clock, endpoint, 0.040)
    assert endpoint.rtt_estimate() == pytest.approx(0.040)


def test_a_fast_answer_right_after_a_peak_barely_moves_the_estimate() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    observe(clock, endpoint, 0.500)
    observe(clock, endpoint, 0.001)
    assert endpoint.rtt_estimate() == pytest.approx(0.500, rel=1e-3)
    assert endpoint.rtt_estimate() < 0.500


def test_steady_fast_answers_converge_on_the_new_rtt() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    observe(clock, endpoint, 0.500)
    for _ in range(6000):  # 60 s of 10 ms answers, six decay periods
        observe(clock, endpoint, 0.010)
    assert endpoint.rtt_estimate() == pytest.approx(0.010, rel=0.3)


def test_reading_decays_toward_zero_and_does_not_change_the_state() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    observe(clock, endpoint, 0.200)
    clock.advance(DECAY)
    assert endpoint.rtt_estimate() == pytest.approx(0.200 * math.exp(-1.0))
    assert endpoint.load() == pytest.approx(0.200 * math.exp(-1.0))
    clock.advance(DECAY)
    # Compounded from the last update, not from the last read.
    assert endpoint.rtt_estimate() == pytest.approx(0.200 * math.exp(-2.0))
    endpoint.start()
    assert endpoint.load() == pytest.approx(2 * 0.200 * math.exp(-2.0))


def test_unmatched_finish_keeps_in_flight_at_zero() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    endpoint.finish(clock())
    assert endpoint.in_flight == 0
    assert endpoint.load() >= 0.0


def test_a_clock_step_back_records_no_negative_rtt() -> None:
    clock = FakeClock()
    endpoint = EndpointLoad("a:1", DEFAULT_RTT, DECAY, clock)
    started = endpoint.start()
    clock.advance(-5.0)
    endpoint.finish(started)
    assert 0.0 <= endpoint.rtt_estimate() <= DEFAULT_RTT


@pytest.mark.parametrize(("default_rtt", "decay"), [(-0.001, DECAY), (math.nan, DECAY),
                                                    (math.inf, DECAY), (DEFAULT_RTT, 0.0),
                                                    (DEFAULT_RTT, -1.0), (DEFAULT_RTT, math.inf)])
def test_rejects_invalid_parameters(default_rtt: float, decay: float) -> None:
    with pytest.raises(ValueError):
        EndpointLoad("a:1", default_rtt, decay, FakeClock())


# --- PeakEWMA balancing in a closed loop ------------------------------------------------


def run_closed_loop(
    clock: FakeClock,
    balancer,
    pool: list[EndpointLoad],
    rtts: dict[str, float],
    requests: int,
    concurrency: int = 8,
) -> Counter[str]:
    """Discrete-event simulation: `concurrency` clients, each sends its next request as soon
    as the previous one is answered; every endpoint answers after its own RTT.
    Returns how many of `requests` requests each endpoint received."""
    counts: Counter[str] = Counter()
    in_flight: list[tuple[float, int, EndpointLoad, float]] = []
    sequence = 0

    def send() -> None:
        nonlocal sequence
        endpoint = balancer.pick(pool)
        counts[endpoint.key] += 1
        started = endpoint.start()
        heapq.heappush(in_flight, (started + rtts[endpoint.key], sequence, endpoint, started))
        sequence += 1

    for _ in range(concurrency):
        send()
    while sum(counts.values()) < requests:
        done_at, _, endpoint, started = heapq.heappop(in_flight)
        clock.now = done_at
        endpoint.finish(started)
        send()
    # Let the requests still in flight complete so the endpoints end idle.
    while in_flight:
        done_at, _, endpoint, started = heapq.heappop(in_flight)
        clock.now = done_at
        endpoint.finish(started)
    return counts


def test_peak_ewma_avoids_a_slow_endpoint_and_returns_to_it_once_fast() -> None:
    clock = FakeClock()
    pool = endpoints(clock, 3)
    fast_a, fast_b, slow = (e.key for e in pool)
    rtts = {fast_a: 0.010, fast_b: 0.010, slow: 0.100}
    balancer = PeakEwmaBalancer(random.Random(7))

    counts = run_closed_loop(clock, balancer, pool, rtts, requests=20_000)
    total = sum(counts.values())
    assert (counts[fast_a] + counts[fast_b]) / total >= 0.90
    assert counts[slow] > 0  # still probed now and then

    rtts[slow] = 0.010
    run_closed_loop(clock, balancer, pool, rtts, requests=40_000)  # ~50 simulated seconds
    counts = run_closed_loop(clock, balancer, pool, rtts, requests=10_000)
    assert counts[slow] / sum(counts.values()) >= 0.25


def test_the_closed_loop_itself_does_not_favour_fast_endpoints() -> None:
    # Same simulation with a load-blind balancer: the slow endpoint gets its third, so the
    # 90 % above comes from PeakEWMA and not from the harness.
    clock = FakeClock()
    pool = endpoints(clock, 3)
    rtts = {pool[0].key: 0.010, pool[1].key: 0.010, pool[2].key: 0.100}
    counts = run_closed_loop(clock, RandomBalancer(random.Random(7)), pool, rtts, 20_000)
    assert counts[pool[2].key] / 20_000 == pytest.approx(1 / 3, abs=0.03)


# --- power of two choices -----------------------------------------------------------------


@pytest.mark.parametrize("make", [PeakEwmaBalancer, LeastRequestBalancer])
def test_p2c_never_picks_the_single_worst_endpoint(make) -> None:
    clock = FakeClock()
    pool = endpoints(clock, 5)
    for _ in range(3):
        pool[4].start()
    balancer = make(random.Random(1))
    counts = Counter(balancer.pick(pool).key for _ in range(5000))
    # Two distinct candidates: the worst one always loses its comparison.
    assert counts[pool[4].key] == 0
    for endpoint in pool[:4]:
        assert counts[endpoint.key] / 5000 == pytest.approx(0.25, abs=0.03)


def test_least_request_prefers_fewer_in_flight() -> None:
    clock = FakeClock()
    idle, busy = endpoints(clock, 2)
    for _ in range(4):
        busy.start()
    balancer = LeastRequestBalancer(random.Random(3))
    assert all(balancer.pick([idle, busy]) is idle for _ in range(200))
    assert all(balancer.pick([busy, idle]) is idle for _ in range(200))


def test_least_request_ignores_rtt() -> None:
    clock = FakeClock()
    slow, fast = endpoints(clock, 2)
    observe(clock, slow, 2.0)
    fast.start()
    balancer = LeastRequestBalancer(random.Random(3))
    assert all(balancer.pick([slow, fast]) is slow for _ in range(100))


def test_least_request_with_three_endpoints_picks_the_least_when_sampled() -> None:
    clock = FakeClock()
    pool = endpoints(clock, 3)
    pool[1].start()
    for _ in range(3):
        pool[2].start()
    balancer = LeastRequestBalancer(random.Random(5))
    counts = Counter(balancer.pick(pool).key for _ in range(9000))
    # The least loaded is in the sampled pair 2 times out of 3, the middle one otherwise.
    assert counts[pool[0].key] / 9000 == pytest.approx(2 / 3, abs=0.03)
    assert counts[pool[1].key] / 9000 == pytest.approx(1 / 3, abs=0.03)
    assert counts[pool[2].key] == 0


@pytest.mark.parametrize("make", [PeakEwmaBalancer, LeastRequestBalancer])
def test_p2c_breaks_ties_at_random(make) -> None:
    clock = FakeClock()
    pool = endpoints(clock, 2)
    balancer = make(random.Random(11))
    counts = Counter(balancer.pick(pool).key for _ in range(4000))
    assert counts[pool[0].key] / 4000 == pytest.approx(0.5, abs=0.03)


def test_peak_ewma_prefers_lower_rtt_times_in_flight() -> None:
    clock = FakeClock()
    quick, sluggish = endpoints(clock, 2)
    observe(clock, quick, 0.010)
    observe(clock, sluggish, 0.050)
    balancer = PeakEwmaBalancer(random.Random(2))
    assert balancer.pick([quick, sluggish]) is quick
    # 10 ms x (5 + 1) = 60 ms is more than 50 ms x 1: in-flight work counts.
    for _ in range(5):
        quick.start()
    assert balancer.pick([quick, sluggish]) is sluggish


@pytest.mark.parametrize("kind", ["PeakEWMA", "LeastRequest", "RoundRobin", "Random"])
def test_a_single_endpoint_is_always_picked_and_none_is_an_error(kind: str) -> None:
    clock = FakeClock()
    (only,) = endpoints(clock, 1)
    balancer = make_balancer(kind, random.Random(0))
    assert all(balancer.pick([only]) is only for _ in range(10))
    with pytest.raises(IndexError):
        balancer.pick([])


# --- round robin and random -------------------------------------------------------------


def test_round_robin_cycles_in_order_with_exact_counts() -> None:
    clock = FakeClock()
    pool = endpoints(clock, 4)
    balancer = RoundRobinBalancer()
    picks = [balancer.pick(pool) for _ in range(400)]
    assert picks[:8] == pool + pool
    assert Counter(e.key for e in picks) == {e.key: 100 for e in pool}


def test_round_robin_survives_the_list_shrinking_and_growing() -> None:
    clock = FakeClock()
    pool = endpoints(clock, 5)
    balancer = RoundRobinBalancer()
    for _ in range(4):
        balancer.pick(pool)  # the cursor now points past the end of a 2-element list
    smaller = pool[:2]
    picks = [balancer.pick(smaller) for _ in range(100)]
    assert Counter(e.key for e in picks) == {smaller[0].key: 50, smaller[1].key: 50}
    picks = [balancer.pick(pool) for _ in range(500)]
    assert Counter(e.key for e in picks) == {e.key: 100 for e in pool}


def test_random_is_roughly_uniform() -> None:
    clock = FakeClock()
    pool = endpoints(clock, 4)
    balancer = RandomBalancer(random.Random(42))
    counts = Counter(balancer.pick(pool).key for _ in range(10_000))
    for endpoint in pool:
        assert counts[endpoint.key] / 10_000 == pytest.approx(0.25, abs=0.03)


def test_same_seed_same_choices() -> None:
    clock = FakeClock()
    pool = endpoints(clock, 6)
    one, two = PeakEwmaBalancer(random.Random(9)), PeakEwmaBalancer(random.Random(9))
    assert [one.pick(pool) for _ in range(50)] == [two.pick(pool) for _ in range(50)]


# --- make_balancer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("PeakEWMA", PeakEwmaBalancer),
        ("LeastRequest", LeastRequestBalancer),
        ("RoundRobin", RoundRobinBalancer),
        ("Random", RandomBalancer),
    ],
)
def test_make_balancer_builds_each_kind(kind: str, cls: type) -> None:
    assert type(make_balancer(kind, random.Random(0))) is cls


@pytest.mark.parametrize("kind", ["peakewma", "Peak EWMA", "", "LeastConn", "ROUND_ROBIN"])
def test_make_balancer_rejects_an_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match="PeakEWMA, LeastRequest, RoundRobin or Random"):
        make_balancer(kind, random.Random(0))


# --- properties -------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.just(("start", 0.0)),
        st.tuples(st.just("finish"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=1e6)),
        st.just(("read", 0.0)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    default_rtt=st.floats(min_value=0.0, max_value=60.0),
    decay=st.floats(min_value=1e-3, max_value=1e4),
)
def test_in_flight_and_load_stay_sane(ops, default_rtt: float, decay: float) -> None:
    clock = FakeClock(0.0)
    endpoint = EndpointLoad("a:1", default_rtt, decay, clock)
    pending: list[float] = []
    highest = default_rtt  # the estimate never exceeds the largest value it has seen
    for op, arg in ops:
        if op == "start":
            pending.append(endpoint.start())
        elif op == "finish":
            # Finish an outstanding request, or, when none is left, an unmatched one.
            started = pending.pop(int(arg) % len(pending)) if pending else clock() - arg
            highest = max(highest, clock() - started)
            endpoint.finish(started)
        elif op == "advance":
            clock.advance(arg)
        assert endpoint.in_flight == len(pending)
        load = endpoint.load()
        estimate = endpoint.rtt_estimate()
        assert math.isfinite(load) and load >= 0.0
        assert math.isfinite(estimate) and 0.0 <= estimate <= highest * (1 + 1e-9)
        assert load == pytest.approx(estimate * (endpoint.in_flight + 1))


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["PeakEWMA", "LeastRequest", "RoundRobin", "Random"]),
    in_flight=st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=12),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_pick_returns_one_of_the_given_endpoints(kind: str, in_flight: list[int],
                                                 seed: int) -> None:
    clock = FakeClock()
    pool = endpoints(clock, len(in_flight))
    for endpoint, count in zip(pool, in_flight):
        for _ in range(count):
            endpoint.start()
    balancer = make_balancer(kind, random.Random(seed))
    for _ in range(20):
        picked = balancer.pick(pool)
        assert any(picked is e for e in pool)
