"""Circuit breaking by consecutive failures (spec §3 `circuitBreaker`), per Service.

The idea of Linkerd's `consecutive_failures` breaker and Envoy's consecutive-5xx outlier
detection: an endpoint that fails `consecutive_failures` requests in a row (5xx, connect
failure or reset: the caller decides what a failure is) is ejected, taken out of balancing for
an ejection time; when that time is up exactly one real request probes it (half-open). A
successful probe brings it back; a failed one ejects it again for twice as long.

States of one endpoint, and what moves them (`now` is the injected clock):

| state   | event                                      | next state | returns / effect            |
| ------- | ------------------------------------------ | ---------- | --------------------------- |
| READY   | success                                    | READY      | failures = 0                |
| READY   | failure, failures < threshold              | READY      | failures += 1               |
| READY   | failure, failures >= threshold, room left  | EJECTED    | record() True               |
| READY   | failure, failures >= threshold, no room    | READY      | kept; tried on next failure |
| EJECTED | eligible(), now < ejected_until            | EJECTED    | not offered                 |
| EJECTED | eligible(), now >= ejected_until           | PROBING    | offered to one request      |
| PROBING | probe_started()                            | PROBING    | not offered while in flight |
| PROBING | record() of the probe: success             | READY      | ejections -= 1              |
| PROBING | record() of the probe: failure             | EJECTED    | doubled time; True          |
| PROBING | probe_abandoned() (no outcome)             | PROBING    | offered again at once       |
| EJECTED | record() (a request sent before ejection)  | EJECTED    | ignored                     |

Ejection time: `base * 2**ejections`, capped at `max`, times a jitter factor in [0.9, 1.1)
drawn from the injected random source (and again capped at `max`), so proxies that ejected an
endpoint together do not all probe it in the same instant. `ejections` stops growing once the
cap is reached. It comes down by one when a probe succeeds, and by one more for every `max`
seconds the endpoint then stays READY (applied when it is next ejected), so an endpoint that
recovered long ago starts again from the base time, while one that flaps keeps long ejections.

Room to eject: at most `floor(max_ejection_percent * known / 100)` of the Service's known
endpoints are EJECTED or PROBING at once. With the default 50%, a Service with one endpoint
never ejects it and one with three ejects at most one. Envoy always allows one ejection but
then sends to ejected hosts anyway in its panic mode; this proxy has no panic mode, so it keeps
the bound strict rather than turn a failing lone endpoint into certain 503s.

Pure: no I/O; this runs for every request, so state lives in `__slots__` and the common case
(nothing ejected) costs a copy of the key list.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from math import isfinite
from random import Random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshproxy.config.model.policy import CircuitBreaker as CircuitBreakerSpec

__all__ = ["EJECTED", "PROBING", "READY", "CircuitBreaker", "EndpointHealth"]

READY, EJECTED, PROBING = "ready", "ejected", "probing"
JITTER = 0.1  # ejection times vary by ±10%


class EndpointHealth:
    """The breaker's state of one endpoint.

    `state` is READY, EJECTED or PROBING; `failures` the consecutive failures while READY;
    `ejections` the doubling exponent of the next ejection time (see the module docstring);
    `ejected_until` the clock time an EJECTED endpoint may be probed (for a PROBING one whose
    probe is in flight: when that probe is given up as lost); `probe_in_flight` whether the
    probe request of a PROBING endpoint was sent; `ready_since` when it last became READY.
    """

    __slots__ = ("key", "state", "failures", "ejections", "ejected_until", "probe_in_flight",
                 "ready_since")

    def __init__(self, key: str, now: float) -> None:
        self.key = key
        self.state = READY
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.probe_in_flight = False
        self.ready_since = now

    def __repr__(self) -> str:
        return (
            f"EndpointHealth({self.key!r}, {self.state}, failures={self.failures}, "
            f"ejections={self.ejections}, ejected_until={self.ejected_until:g}, "
            f"probe_in_flight={self.probe_in_flight})"
        )


class CircuitBreaker:
    """Consecutive-failure ejection over the endpoints of one Service.

    `consecutive_failures` (>= 1) failures in a row eject an endpoint for `base_ejection`
    seconds (> 0), doubling up to `max_ejection` (>= base); at most `max_ejection_percent`
    (0-100) of the known endpoints are out at once. `clock` returns monotonic seconds; `rng`
    draws the jitter. Raises ValueError for a value out of those ranges.
    """

    __slots__ = ("_threshold", "_base", "_max", "_max_percent", "_max_level", "_clock",
                 "_random", "_endpoints", "_ejected", "_probing")

    def __init__(
        self,
        consecutive_failures: int,
        base_ejection: float,
        max_ejection: float,
        max_ejection_percent: int,
        clock: Callable[[], float],
        rng: Random,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError(
                f"consecutive_failures must be >= 1, got {consecutive_failures!r}"
            )
        if not (isfinite(base_ejection) and base_ejection > 0.0):
            raise ValueError(f"base_ejection must be a finite number > 0, got {base_ejection!r}")
        if not (isfinite(max_ejection) and max_ejection >= base_ejection):
            raise ValueError(
                f"max_ejection must be a finite number >= base_ejection ({base_ejection!r}), "
                f"got {max_ejection!r}"
            )
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(
                f"max_ejection_percent must be within 0-100, got {max_ejection_percent!r}"
            )
        level = 0
        while base_ejection * (1 << level) < max_ejection:
            level += 1
        self._threshold = consecutive_failures
        self._base = float(base_ejection)
        self._max = float(max_ejection)
        self._max_percent = max_ejection_percent
        self._max_level = level  # the first exponent whose time reaches the cap
        self._clock = clock
        self._random = rng.random
        self._endpoints: dict[str, EndpointHealth] = {}
        self._ejected = 0
        self._probing = 0

    @classmethod
    def from_policy(
        cls, spec: CircuitBreakerSpec, clock: Callable[[], float], rng: Random
    ) -> CircuitBreaker:
        """Returns a breaker for a TrafficPolicy `circuitBreaker`."""
        return cls(spec.consecutive_failures, spec.base_ejection_time, spec.max_ejection_time,
                   spec.max_ejection_percent, clock, rng)

    def health(self, key: str) -> EndpointHealth:
        """Returns the state of endpoint `key`, creating it (READY) on first use."""
        health = self._endpoints.get(key)
        if health is None:
            health = self._endpoints[key] = EndpointHealth(key, self._clock())
        return health

    def eligible(self, keys: Sequence[str]) -> list[str]:
        """Returns the endpoints of `keys` a request may use now, in their order: the READY
        ones, then at most one PROBING endpoint whose probe is not in flight.

        An EJECTED endpoint whose time is up becomes PROBING here. A PROBING endpoint whose
        probe was started more than `max_ejection` seconds ago is offered again (the probe's
        outcome was never recorded). Unknown keys are READY. An empty list means no endpoint
        may be used now: the caller answers 503 (no healthy endpoints). The caller picks one
        and, if it is PROBING, calls `probe_started()` before anything else asks.
        """
        if not (self._ejected or self._probing):
            return list(keys)  # the common case: nothing is out
        now = self._clock()
        endpoints = self._endpoints
        usable: list[str] = []
        probe = None
        for key in keys:
            health = endpoints.get(key)
            if health is None:
                health = endpoints[key] = EndpointHealth(key, now)
            state = health.state
            if state == READY:
                usable.append(key)
            elif probe is not None or now < health.ejected_until:
                continue
            elif state == EJECTED:
                health.state = PROBING
                health.probe_in_flight = False
                self._ejected -= 1
                self._probing += 1
                probe = key
            else:  # PROBING: never probed, or its probe is lost
                health.probe_in_flight = False
                probe = key
        if probe is not None:
            usable.append(probe)
        return usable

    @property
    def all_ready(self) -> bool:
        """True when no endpoint is ejected or probing (the common case, checked per request)."""
        return not (self._ejected or self._probing)

    def probe_started(self, key: str) -> None:
        """Notes that a request was sent to `key` while it is PROBING, so no other request is
        offered it until `record()` gives the probe's outcome. Does nothing for an endpoint in
        another state, so the caller may call it for any endpoint it picked."""
        health = self._endpoints.get(key)
        if health is not None and health.state == PROBING and not health.probe_in_flight:
            health.probe_in_flight = True
            health.ejected_until = self._clock() + self._max

    def probe_abandoned(self, key: str) -> None:
        """Notes that the probe sent to `key` ended without an outcome (its client went away,
        or it was sent elsewhere), so that the next request may probe `key` at once rather
        than after `max_ejection`. Does nothing unless `key` is PROBING with a probe in
        flight."""
        health = self._endpoints.get(key)
        if health is not None and health.state == PROBING and health.probe_in_flight:
            health.probe_in_flight = False
            health.ejected_until = self._clock()

    def record(self, key: str, success: bool) -> bool:
        """Records the outcome of one request to `key`; returns True when this outcome ejected
        the endpoint (a new ejection, or a failed probe ejecting it again).

        Outcomes while EJECTED, and while PROBING without a probe in flight, are of requests
        sent before the ejection and are ignored.
        """
        health = self._endpoints.get(key)
        if health is None:
            health = self.health(key)
        state = health.state
        if state == READY:
            if success:
                health.failures = 0
                return False
            health.failures += 1
            if health.failures < self._threshold or not self._room_to_eject():
                return False
            self._eject(health)
            self._ejected += 1
            return True
        if state == PROBING and health.probe_in_flight:
            health.probe_in_flight = False
            self._probing -= 1
            if success:
                health.state = READY
                health.failures = 0
                health.ready_since = self._clock()
                if health.ejections > 0:
                    health.ejections -= 1
                return False
            self._eject(health)
            self._ejected += 1
            return True
        return False

    def _room_to_eject(self) -> bool:
        out = self._ejected + self._probing
        return (out + 1) * 100 <= self._max_percent * len(self._endpoints)

    def _eject(self, health: EndpointHealth) -> None:
        """Moves `health` to EJECTED for its next ejection time; the caller fixes the counts."""
        now = self._clock()
        level = health.ejections
        if health.state == READY and level:
            # One step down for every `max` seconds spent READY since the last ejection.
            healthy = now - health.ready_since
            if healthy >= self._max:
                level = max(0, level - int(healthy // self._max))
        nominal = self._base * (1 << level) if level < self._max_level else self._max
        if nominal > self._max:
            nominal = self._max
        duration = nominal * (1.0 - JITTER + 2.0 * JITTER * self._random())
        if duration > self._max:
            duration = self._max
        health.state = EJECTED
        health.failures = 0
        health.probe_in_flight = False
        health.ejected_until = now + duration
        health.ejections = level + 1 if level < self._max_level else self._max_level

    def forget(self, keys_present: Collection[str]) -> None:
        """Makes the known endpoints exactly `keys_present` (the Service's endpoints in the
        current configuration): drops the others and their state, and adds missing ones as
        READY, so the ejection limit counts every endpoint before it served a request.
        Returns nothing."""
        endpoints = self._endpoints
        for key in [k for k in endpoints if k not in keys_present]:
            health = endpoints.pop(key)
            if health.state == EJECTED:
                self._ejected -= 1
            elif health.state == PROBING:
                self._probing -= 1
        if len(endpoints) != len(keys_present):
            now = self._clock()
            for key in keys_present:
                if key not in endpoints:
                    endpoints[key] = EndpointHealth(key, now)

    def counts(self) -> tuple[int, int, int]:
        """Returns (ready, ejected, probing) over the known endpoints, for `meshproxy_endpoints`.
        An EJECTED endpoint whose time is up counts as ejected until it is offered a probe."""
        return (len(self._endpoints) - self._ejected - self._probing, self._ejected,
                self._probing)

    def __repr__(self) -> str:
        ready, ejected, probing = self.counts()
        return f"CircuitBreaker(ready={ready}, ejected={ejected}, probing={probing})"
