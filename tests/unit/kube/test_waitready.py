"""`meshproxy wait-ready` (a classic sidecar's postStart hook): its polling, with a fake clock.
The command itself: tests/integration/test_wait_ready.py."""

from __future__ import annotations

import pytest

from meshproxy.kube.waitready import POLL_INTERVAL, wait_until_ready


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_returns_once_the_proxy_answers_ready():
    t = FakeTime()
    answers = iter([False, False, True])
    assert wait_until_ready("h", 1, 10, probe=lambda h, p: next(answers), clock=t.clock, sleep=t.sleep)
    assert t.now == pytest.approx(2 * POLL_INTERVAL)


def test_gives_up_at_the_timeout():
    t = FakeTime()
    calls = []
    assert not wait_until_ready("h", 1, 1.0, probe=lambda h, p: calls.append(t.now) or False,
                                clock=t.clock, sleep=t.sleep)
    assert t.now == pytest.approx(1.0) and calls[-1] == pytest.approx(1.0)
