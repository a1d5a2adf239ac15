"""Load balancing across a Service's endpoints (spec §3 `loadBalancer`).

Pure decisions: the clock (monotonic seconds) and the random source come in from the caller,
so every choice here is reproducible in a test. This runs once per request, so it allocates
nothing per call and keeps its state in `__slots__`.

`EndpointLoad` is the per-endpoint state the data plane updates around each request
(`start()` / `finish()`); a `Balancer` picks one endpoint out of the eligible ones.

Peak EWMA (Finagle's `PeakEwma`, tower's `PeakEwma` in Linkerd): the RTT estimate jumps up at
once on a slower observation, moves toward faster ones with a time-based weight, and decays
toward 0 while nothing is observed, so an endpoint that was slow and stopped receiving traffic
is tried again after a while. The cost of an endpoint is `estimate * (in_flight + 1)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import exp, isfinite
from operator import attrgetter
from random import Random
from typing import Protocol

__all__ = [
    "Balancer",
    "EndpointLoad",
    "LeastRequestBalancer",
    "PeakEwmaBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "make_balancer",
]


class EndpointLoad:
    """Mutable load state of one upstream endpoint: requests in flight and a peak-EWMA RTT.

    `default_rtt` (seconds, >= 0) is the estimate before anything was observed; `decay`
    (seconds, > 0) is the EWMA time constant. `clock` returns monotonic seconds.
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
        if rtt > estimate:
            # Peak sensitivity: a slower answer is believed at once.
            self._estimate = rtt
        else:
            elapsed = now - self._updated
            # The weight of the old value depends on the time since it was set, not on how
            # many observations arrive: busy and quiet endpoints converge at the same speed.
            weight = exp(-elapsed * self._inv_decay) if elapsed > 0.0 else 1.0
            self._estimate = rtt + (estimate - rtt) * weight
        self._updated = now

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
    """Samples two distinct endpoints at random and returns the one with the lower cost.

    Two random choices avoid the herd that "always the least loaded" causes when many
    proxies share stale views, and cost O(1) whatever the number of endpoints.
    """

    __slots__ = ("_random", "_cost")

    def __init__(self, rng: Random, cost: Callable[[EndpointLoad], float]) -> None:
        self._random = rng.random
        self._cost = cost

    def pick(self, endpoints: Sequence[EndpointLoad]) -> EndpointLoad:
        """Returns the cheaper of two distinct random endpoints, ties broken at random.

        Raises IndexError when `endpoints` is empty.
        """
        n = len(endpoints)
        if n < 2:
            return endpoints[0]
        random = self._random
        if n == 2:
            a = endpoints[0]
            b = endpoints[1]
        else:
            # int(random() * n) is uniform over range(n) for any realistic n and several
            # times cheaper than Random.randrange.
            i = int(random() * n)
            j = int(random() * (n - 1))
            if j >= i:
                j += 1
            a = endpoints[i]
            b = endpoints[j]
        cost = self._cost
        cost_a = cost(a)
        cost_b = cost(b)
        if cost_a < cost_b:
            return a
        if cost_b < cost_a:
            return b
        # Equal costs (e.g. all idle at start): a fixed preference would pile onto one.
        return a if random() < 0.5 else b


class PeakEwmaBalancer(_PowerOfTwoChoices):
    """Power of two choices over `EndpointLoad.load()` (spec default)."""

    __slots__ = ()

    def __init__(self, rng: Random) -> None:
        super().__init__(rng, EndpointLoad.load)


class LeastRequestBalancer(_PowerOfTwoChoices):
    """Power of two choices over `in_flight`, ties broken at random."""

    __slots__ = ()

    def __init__(self, rng: Random) -> None:
        super().__init__(rng, attrgetter("in_flight"))


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
