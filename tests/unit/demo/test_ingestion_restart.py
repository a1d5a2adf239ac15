"""The demo's edge keeps what it accepted in its store: an `ingestion` killed and started again
(chaos.py kills it) still knows each delivery and sends on the creates it had accepted but not
yet scheduled, instead of answering 404 for them for good. A real SQLite store in a temporary
folder; no calls go out (the client is never used by these steps)."""

from __future__ import annotations

from pathlib import Path

from meshproxy.demo.ingestion import Ingestion, Job
from meshproxy.demo.store import Store


def test_a_restarted_ingestion_knows_its_deliveries_and_queues_the_unscheduled_again(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.sqlite"
    first = Ingestion(client=None, queue_size=10, store=Store(path))  # type: ignore[arg-type]
    body = {"ownerId": "acct-0001", "pickupLocation": {"lat": 1, "lon": 2}}
    headers = {"x-request-id": "r-1"}
    first.note("d-pending", "accepted", job=Job("create", "d-pending", body, headers))
    first.note("d-half", "accepted", job=Job("create", "d-half", body, headers))
    first.note("d-half", "scheduling")  # the worker took it; the job is kept until it is done
    first.note("d-done", "accepted", job=Job("create", "d-done", body, headers))
    first.note("d-done", "scheduled")
    first.note("d-failed", "failed", "scheduler: 503")

    again = Ingestion(client=None, queue_size=10, store=Store(path))  # type: ignore[arg-type]
    assert again.recover() == 2
    queued = [again.queue.get_nowait() for _ in range(2)]
    assert queued == [Job("create", "d-pending", body, headers), Job("create", "d-half", body, headers)]
    assert again.status("d-pending") == again.status("d-half") == "accepted"
    assert again.status("d-done") == "scheduled"
    assert again.entry("d-failed") == {"status": "failed", "reason": "scheduler: 503"}
    assert again.status("d-unknown") is None


def test_recovery_stops_at_the_queues_bound(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.sqlite"
    first = Ingestion(client=None, queue_size=10, store=Store(path))  # type: ignore[arg-type]
    for i in range(5):
        first.note(f"d-{i}", "accepted", job=Job("create", f"d-{i}", {}, {}))
    again = Ingestion(client=None, queue_size=3, store=Store(path))  # type: ignore[arg-type]
    assert again.recover() == 3 and again.queue.full()
