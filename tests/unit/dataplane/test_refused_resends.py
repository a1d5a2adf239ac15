"""Streams an HTTP/2 server refused unprocessed (REFUSED_STREAM) are sent again apart from the
rule's attempts, up to REFUSED_RESENDS per request, with the budget and the backoff as for any
retry. Found under h2load: a grpcio server near its stream limit refused one call four times
in a burst and, with the rule's two retries spent, the call failed though the app never saw
it. Deterministic: a loop stand-in that records timers, seeded randomness."""

from __future__ import annotations

import random

from meshproxy.dataplane.attempts import REFUSED_RESENDS, Attempts
from meshproxy.http1.events import RequestHead
from meshproxy.policy.retry import REFUSED_STREAM, RetryBudget, RetryRule


class Timers:
    """The one loop method Attempts uses to wait: call_later, recorded, run on demand."""

    def __init__(self) -> None:
        self.due: list[tuple[float, object, tuple]] = []

    def call_later(self, delay, callback, *args):
        self.due.append((delay, callback, args))
        return self

    def cancel(self) -> None:
        pass

    def run(self) -> float:
        delay, callback, args = self.due.pop(0)
        callback(*args)
        return delay


class Metrics:
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.exhausted = 0

    def retry(self, service_key: str, reason: str) -> None:
        self.retries.append(reason)

    def retry_budget_exhausted(self, service_key: str) -> None:
        self.exhausted += 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attempts(budget: RetryBudget | None = None, attempts: int = 2) -> tuple[Attempts, Timers, Metrics]:
    timers, metrics = Timers(), Metrics()
    rule = RetryRule(attempts, frozenset({"connect-failure", "reset", "503"}), False, 0.025, 0.25)
    budget = budget or RetryBudget(20.0, 10.0, Clock())
    made = Attempts(timers, random.Random(3), metrics, "echo.default", budget, rule,  # type: ignore[arg-type]
                    timeout=None, per_try=None, keep_body=True)
    return made, timers, metrics


def call() -> RequestHead:
    head = RequestHead(b"POST", b"/demo.Echo/Unary", "2", [(b"content-type", b"application/grpc")])
    head.host, head.content_length = b"echo", 7
    return head


def test_refused_streams_are_sent_again_apart_from_the_rules_attempts() -> None:
    made, timers, metrics = attempts(attempts=2)
    head = call()
    made.keep(b"\x00\x00\x00\x00\x02hi")
    for _ in range(REFUSED_RESENDS):
        assert made.reason_to_retry(head, REFUSED_STREAM, sent=True, request_complete=True) == REFUSED_STREAM
        made.schedule(REFUSED_STREAM, "10.0.0.1:50051", lambda: None)
        assert timers.run() < 0.25  # the backoff, capped
    assert metrics.retries == [REFUSED_STREAM] * REFUSED_RESENDS
    # The seventh refusal ends the request; the rule's two retries are still there for others.
    assert made.reason_to_retry(head, REFUSED_STREAM, sent=True, request_complete=True) is None
    assert made.reason_to_retry(head, "503", sent=True, request_complete=True) is None  # POST
    assert made.retries == 0 and made.reason_to_retry(head, "connect-failure", sent=False,
                                                      request_complete=True) == "connect-failure"


def test_refused_streams_still_spend_the_retry_budget() -> None:
    clock = Clock()
    budget = RetryBudget(0.0, 1.0, clock)  # one retry per second, no ratio
    made, _, metrics = attempts(budget)
    head = call()
    assert made.reason_to_retry(head, REFUSED_STREAM, sent=True, request_complete=True) == REFUSED_STREAM
    made.schedule(REFUSED_STREAM, "10.0.0.1:50051", lambda: None)
    budget_left = [made.reason_to_retry(head, REFUSED_STREAM, sent=True, request_complete=True)
                   for _ in range(20)]
    assert None in budget_left and metrics.exhausted >= 1
