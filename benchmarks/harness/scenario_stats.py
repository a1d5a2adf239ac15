"""What the client saw in one scenario run: latency, success, who answered, recovery.

Pure functions over the records the load generator writes (harness/scenario_load.py): one
list per field, `t` (request start, monotonic seconds), `lat` (seconds), `status` (HTTP
status, or a negative code for a request without a complete answer) and `inst` (index into
`instances`, the `x-instance` values seen, or -1).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from harness.scenario_load import FAILURES


@dataclass
class Records:
    """The load generator's output for one run."""

    start: float
    end: float
    instances: list[str]
    t: list[float]
    lat: list[float]
    status: list[int]
    inst: list[int]
    cpu_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict) -> "Records":
        """Build Records from the dict scenario_load.py writes; KeyError when a field is missing."""
        return cls(start=data["start"], end=data["end"], instances=list(data["instances"]),
                   t=data["t"], lat=data["lat"], status=data["status"], inst=data["inst"],
                   cpu_s=data.get("cpu_s", 0.0))

    def instance_index(self, name: str) -> int:
        """Return the index of an instance name in `inst`, or -1 when it never answered."""
        return self.instances.index(name) if name in self.instances else -1


def is_success(status: int) -> bool:
    """True for an answer the client counts as a success (2xx and 3xx)."""
    return 200 <= status < 400


def failure_kind(status: int) -> str:
    """Return how a failed request is reported: its status code, or what went wrong."""
    return FAILURES.get(status, str(status))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Return the nearest-rank q-th percentile (0 < q <= 100) of sorted values, None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(rec: Records, since: float, until: float) -> dict:
    """Return what the client saw for the requests started in [since, until).

    Keys: requests, rps, successes, failures, success_pct, failures_by_kind ({kind: count}),
    p50/p90/p99/max_ms (latency of successful requests only: failed ones end early or at the
    timeout and would say nothing about the balancer), and share ({instance: fraction of the
    answers that came from it}, over every request with an `x-instance` header).
    """
    lats: list[float] = []
    kinds: Counter[str] = Counter()
    answered: Counter[int] = Counter()
    total = 0
    for t, lat, status, inst in zip(rec.t, rec.lat, rec.status, rec.inst):
        if t < since or t >= until:
            continue
        total += 1
        if is_success(status):
            lats.append(lat)
        else:
            kinds[failure_kind(status)] += 1
        if inst >= 0:
            answered[inst] += 1
    lats.sort()
    failures = sum(kinds.values())
    n_answered = sum(answered.values())
    ms = (lambda v: None if v is None else v * 1000)
    return {
        "requests": total,
        "rps": total / (until - since) if until > since else 0.0,
        "successes": total - failures,
        "failures": failures,
        "success_pct": 100.0 * (total - failures) / total if total else None,
        "failures_by_kind": dict(kinds.most_common()),
        "p50_ms": ms(percentile(lats, 50)),
        "p90_ms": ms(percentile(lats, 90)),
        "p99_ms": ms(percentile(lats, 99)),
        "max_ms": ms(lats[-1] if lats else None),
        "share": {rec.instances[i]: count / n_answered for i, count in sorted(answered.items())},
    }


def recovery(rec: Records, instance: str, killed_at: float, back_at: float) -> dict:
    """Return how one instance's traffic stopped and came back around a kill and restart.

    `killed_at` is when it was killed, `back_at` when its replacement accepted connections.
    Keys: last_answer_s (start of its last answered request, relative to the kill; None if it
    never answered before), first_answer_after_restart_s (start of its first answered request
    after back_at, relative to back_at; None when it got none before the run ended),
    share_after_return (its share of the answers from that first request to the end),
    failures_after_kill (failed requests started from the kill on, with their kinds) and
    failure_times_s (their start times relative to the kill, at most 20).
    """
    index = rec.instance_index(instance)
    last = first = None
    after_total = after_mine = 0
    fail_times: list[float] = []
    kinds: Counter[str] = Counter()
    for t, status, inst in zip(rec.t, rec.status, rec.inst):
        if not is_success(status) and t >= killed_at:
            kinds[failure_kind(status)] += 1
            fail_times.append(t - killed_at)
        if inst == index and index >= 0:
            if t < killed_at and (last is None or t > last):
                last = t
            if t >= back_at and (first is None or t < first):
                first = t
    if first is not None:
        for t, inst in zip(rec.t, rec.inst):
            if t >= first and inst >= 0:
                after_total += 1
                after_mine += inst == index
    fail_times.sort()
    return {
        "last_answer_s": None if last is None else last - killed_at,
        "first_answer_after_restart_s": None if first is None else first - back_at,
        "share_after_return": after_mine / after_total if after_total else None,
        "failures_after_kill": sum(kinds.values()),
        "failures_after_kill_by_kind": dict(kinds.most_common()),
        "failure_times_s": fail_times[:20],
    }


def timeline(rec: Records, instance: str, origin: float, step: float = 1.0) -> list[float]:
    """Return the instance's share of the answers per `step` seconds from `origin` on."""
    index = rec.instance_index(instance)
    buckets = max(0, math.ceil((rec.end - origin) / step))
    mine = [0] * buckets
    total = [0] * buckets
    for t, inst in zip(rec.t, rec.inst):
        b = int((t - origin) // step)
        if 0 <= b < buckets and inst >= 0:
            total[b] += 1
            mine[b] += inst == index
    return [m / n if n else 0.0 for m, n in zip(mine, total)]


def failure_times(rec: Records, origin: float, limit: int = 20) -> list[float]:
    """Return the start times (relative to origin) of the first `limit` failed requests."""
    return sorted(t - origin for t, status in zip(rec.t, rec.status)
                  if not is_success(status))[:limit]
