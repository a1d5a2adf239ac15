"""Load balancing across a Service's endpoints (spec §3 `loadBalancer`).

Pure decisions: the clock (monotonic seconds) and the random source come in from the caller,
so every choice here is reproducible in a test. This runs once per request, so it allocates
nothing per call and keeps its state in `__slots__`.

`EndpointLoad` is the per-endpoint state the data plane updates around each request
(`start()` / `finish()`); a `Balancer` picks one endpoint out of the eligible ones.

Peak EWMA (Finagle's `PeakEwma`, tower's `PeakEwma` in Linkerd): the RTT estimate jumps up at
once on a slower answer and otherwise decays toward 0 with the time since it was set (time
constant `decay`). An endpoint that is answering holds its estimate up with its slowest recent
answers; one that gets no traffic looks cheaper and cheaper until it is tried again, so an
endpoint that was slow once, or lost a comparison by a hair, is not shut out for good. An
answer faster than the decayed estimate leaves it as it is: averaging the answer with the
estimate as it stood before the decay would put it above what the balancer saw, and an
endpoint just tried would look dearer than before its try and lose again. The cost of an
endpoint is `estimate * (in_flight + 1)`.

With next to nothing in flight (a modest rate against fast endpoints) the choice rests on the
estimates alone, and two estimates of equally fast endpoints are never exactly equal: each
follows the slowest of its own recent answers. The cheaper one would take every request until
the other's estimate decayed below it, seconds later. So estimates within `EQUAL_RTT_RATIO` of
each other count as equal: then the endpoint with fewer requests in flight wins, and with as
many a random one. A difference in latency larger than that noise (a 40 ms slower endpoint
beside 1 ms ones) still decides alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import exp, isfinite
from random import Random
from typing import Protocol

__all__ = [
    "EQUAL_RTT_RATIO",
    "Balancer",
    "EndpointLoad",
    "LeastRequestBalancer",
    "PeakEwmaBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "make_balancer",
]


# Two RTT estimates within this factor of each other count as equal (see the module docstring).
# The estimates of equally fast endpoints, each the slowest of its own recent answers, seldom
# differ by more; a larger factor would hide real differences too, since below it a slower
# endpoint gets as many requests as a faster one while both have as many in flight.
EQUAL_RTT_RATIO = 1.5


class EndpointLoad:
    """Mutable load state of one upstream endpoint: requests in flight and a peak-EWMA RTT.

    `default_rtt` (seconds, >= 0) is the estimate before anything was observed. It decays like
    any estimate and only a slower answer replaces it: a first fast answer would make the
    endpoint that happened to answer first look far cheaper than the others, still at the
    default. `decay` (seconds, > 0) is the time constant of the decay. `clock` returns
    monotonic seconds.
    Raises ValueError for a negative or non-finite `default_rtt` or a non-positive `decay`.
    """

    __slots__ = ("key", "in_flight", "_estimate", "_updated", "_inv_decay", "_clock")

    def __init__(
        self, key: str, default_rtt: float, decay: float, clock: Callable[[], float]
    ) -> None:
        if not (isfinite(default_rtt) and default_rtt >= 0.0):
            raise ValueError(f"default_rtt must be a finite number >= 0, got {default_rtt!r}")
        if not (isfinite(decay) and decay > 0.0):
            raise ValueError(f"decay must be a finite number > 0, got {decay!r}")
        self.key = key
        self.in_flight = 0
        self._estimate = float(default_rtt)
        self._updated = clock()
        self._inv_decay = 1.0 / decay
        self._clock = clock

    def start(self) -> float:
        """Count a request as started; returns its start time, to be given to `finish()`."""
        self.in_flight += 1
        return self._clock()

    def now(self) -> float:
        """The balancer's clock: a request's start when it is dispatched only later."""
        return self._clock()

    def finish(self, started: float) -> None:
        """Count the request started at `started` as ended and record its RTT.

        Returns nothing. An unmatched `finish()` leaves `in_flight` at 0 rather than negative,
        so one bookkeeping slip cannot make an endpoint look better than idle for ever.
        """
        now = self._clock()
        if self.in_flight > 0:
            self.in_flight -= 1
        rtt = now - started
        if not rtt > 0.0:  # also catches NaN; a clock step back must not record a negative RTT
            rtt = 0.0
        estimate = self._estimate
        elapsed = now - self._updated
        if elapsed > 0.0:
            # Compare with what the balancer saw: the estimate decayed since it was set.
            estimate *= exp(-elapsed * self._inv_decay)
        if rtt > estimate:
            # Peak sensitivity: a slower answer is believed at once.
            self._estimate = rtt
            self._updated = now
        # Otherwise the state stays as it is: (estimate, set at) already describes the decayed
        # value at any later moment, and leaving it untouched keeps it exact.

    def rtt_estimate(self) -> float:
        """Returns the peak-EWMA RTT estimate in seconds, decayed toward 0 since the last update.

        Reading does not change the state: an admin page looking at it cannot alter balancing.
        """
        elapsed = self._clock() - self._updated
        if elapsed > 0.0:
            return self._estimate * exp(-elapsed * self._inv_decay)
        return self._estimate

    def load(self) -> float:
        """Returns the PeakEWMA cost: `rtt_estimate() * (in_flight + 1)`; lower is better."""
        elapsed = self._clock() - self._updated
        if elapsed > 0.0:
            return self._estimate * exp(-elapsed * self._inv_decay) * (self.in_flight + 1)
        return self._estimate * (self.in_flight + 1)

    def __repr__(self) -> str:
        return (
            f"EndpointLoad({self.key!r}, in_flight={self.in_flight}, "
            f"rtt_estimate={self.rtt_estimate():.6f})"
        )


class Balancer(Protocol):
    """Chooses one endpoint for a request."""

    def pick(self, endpoints: Sequence[EndpointLoad]) -> EndpointLoad:
        """Returns one of `endpoints` (the eligible ones, non-empty); IndexError if empty."""
        ...


class _PowerOfTwoChoices:
    """Samples two distinct endpoints at random and returns the better of the two.

    Two random choices avoid the herd that "always the least loaded" causes when many
    proxies share stale views, and cost O(1) whatever the number of endpoints. Subclasses
    say which of two endpoints is better (`_better`).
    """

    __slots__ = ("_random",)

    def __init__(self, rng: Random) -> None:
        self._random = rng.random

    def pick(self, endpoints: Sequence[EndpointLoad]) -> EndpointLoad:
        """Returns the better of two distinct random endpoints, ties broken at random.

        Raises IndexError when `endpoints` is empty.
        """
        n = len(endpoints)
        if n < 2:
            return endpoints[0]
        if n == 2:
            return self._better(endpoints[0], endpoints[1])
        # int(random() * n) is uniform over range(n) for any realistic n and several
        # times cheaper than Random.randrange.
        random = self._random
        i = int(random() * n)
        j = int(random() * (n - 1))
        if j >= i:
            j += 1
        return self._better(endpoints[i], endpoints[j])

    def _better(self, a: EndpointLoad, b: EndpointLoad) -> EndpointLoad:
        """Returns the better of `a` and `b`."""
        raise NotImplementedError  # abstract: PeakEwmaBalancer, LeastRequestBalancer

    def _fewer_in_flight(self, a: EndpointLoad, b: EndpointLoad) -> EndpointLoad:
        """Returns the one of `a` and `b` with fewer requests in flight, a random one when
        they have as many (a fixed preference would pile onto one)."""
        in_flight_a = a.in_flight
        in_flight_b = b.in_flight
        if in_flight_a < in_flight_b:
            return a
        if in_flight_b < in_flight_a:
            return b
        return a if self._random() < 0.5 else b


class PeakEwmaBalancer(_PowerOfTwoChoices):
    """Power of two choices over `EndpointLoad.load()` (spec default); estimates within
    `EQUAL_RTT_RATIO` of each other count as equal."""

    __slots__ = ()

    def _better(self, a: EndpointLoad, b: EndpointLoad) -> EndpointLoad:
        estimate_a = a.rtt_estimate()
        estimate_b = b.rtt_estimate()
        ratio = EQUAL_RTT_RATIO
        if estimate_a <= estimate_b * ratio and estimate_b <= estimate_a * ratio:
            # Equally fast as far as the estimates can tell: the cost is the load alone.
            return self._fewer_in_flight(a, b)
        cost_a = estimate_a * (a.in_flight + 1)
        cost_b = estimate_b * (b.in_flight + 1)
        if cost_a < cost_b:
            return a
        if cost_b < cost_a:
            return b
        return a if self._random() < 0.5 else b


class LeastRequestBalancer(_PowerOfTwoChoices):
    """Power of two choices over `in_flight`, ties broken at random."""

    __slots__ = ()

    def _better(self, a: EndpointLoad, b: EndpointLoad) -> EndpointLoad:
        return self._fewer_in_flight(a, b)


class RoundRobinBalancer:
    """Each endpoint in turn; a cursor past the end of a shrunk list starts again at 0."""

    __slots__ = ("_cursor",)

    def __init__(self) -> None:
        self._cursor = 0

    def pick(self, endpoints: Sequence[EndpointLoad]) -> EndpointLoad:
        """Returns the next endpoint in order; IndexError when `endpoints` is empty."""
        i = self._cursor
        if i >= len(endpoints):
            i = 0
        self._cursor = i + 1
        return endpoints[i]


class RandomBalancer:
    """A uniformly random endpoint."""

    __slots__ = ("_random",)

    def __init__(self, rng: Random) -> None:
        self._random = rng.random

    def pick(self, endpoints: Sequence[EndpointLoad]) -> EndpointLoad:
        """Returns a uniformly chosen endpoint; IndexError when `endpoints` is empty."""
        return endpoints[int(self._random() * len(endpoints))]


def make_balancer(kind: str, rng: Random) -> Balancer:
    """Returns a new balancer for a `loadBalancer.type` value.

    `kind` is one of "PeakEWMA", "LeastRequest", "RoundRobin", "Random"; anything else
    raises ValueError naming the accepted values.
    """
    match kind:
        case "PeakEWMA":
            return PeakEwmaBalancer(rng)
        case "LeastRequest":
            return LeastRequestBalancer(rng)
        case "RoundRobin":
            return RoundRobinBalancer()
        case "Random":
            return RandomBalancer(rng)
    raise ValueError(
        f"unknown load balancer type {kind!r}: expected PeakEWMA, LeastRequest, RoundRobin "
        "or Random"
    )
