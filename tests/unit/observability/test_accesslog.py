"""The access log writer: JSON lines as a reader parses them, and a stalled reader that never
holds up the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime

from hypothesis import given
from hypothesis import strategies as st

from meshproxy.observability.accesslog import AccessLog, _Clock, _Strings, format_line

FIELDS = dict(
    trace_id=b"0af7651916cd43dd8448eb211c80319c", span_id=b"b7ad6b7169203331",
    parent_span_id=None, request_id=b"r-1", direction="outbound", method=b"GET",
    authority=b"web", target=b"/x?y=1", upstream="127.0.0.1:8080", attempts=1, status=200,
    duration=0.0125, bytes_in=3, bytes_out=5, route="default", service="web.default",
    error=None, peer="127.0.0.1:40000",
)


def line(wall: float, **changes) -> bytes:
    return format_line(_Clock(), _Strings(), wall, **{**FIELDS, **changes})


def test_line_fields() -> None:
    text = line(1700000000.25)
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    entry = json.loads(text)
    assert entry["time"] == "2023-11-14T22:13:20.250Z"
    assert datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp() == 1700000000.25
    assert entry["duration_ms"] == 12.5 and entry["path"] == "/x?y=1"
    assert entry["parent_span_id"] is None and entry["error"] is None
    assert list(entry) == ["time", "trace_id", "span_id", "parent_span_id", "request_id",
                           "direction", "method", "authority", "path", "upstream", "attempts",
                           "status", "duration_ms", "bytes_in", "bytes_out", "route",
                           "service", "error", "peer"]
    assert entry["peer"] == "127.0.0.1:40000"
    assert json.loads(line(0.0, peer=None))["peer"] is None


def test_absolute_form_target_logs_its_path() -> None:
    entry = json.loads(line(0.0, target=b"http://web:80/a/b?c"))
    assert entry["path"] == "/a/b?c"


def test_quotes_and_odd_bytes_are_escaped() -> None:
    entry = json.loads(line(0.0, target=b'/a"b\\c\xff', authority=b"h\x01", error="x\"y",
                            route='ns/"r"/0'))
    assert entry["path"] == '/a"b\\c\\xff' and entry["authority"] == "h\x01"
    assert entry["error"] == 'x"y' and entry["route"] == 'ns/"r"/0'



@given(st.binary(max_size=50), st.binary(max_size=50), st.one_of(st.none(), st.binary()))
def test_any_header_bytes_give_valid_json(target: bytes, authority: bytes, rid) -> None:
    text = line(time.time(), target=target, authority=authority, request_id=rid)
    assert text.count(b"\n") == 1
    entry = json.loads(text)
    if target.startswith(b"/"):
        assert entry["path"] == target.decode("utf-8", "backslashreplace")
    assert entry["authority"] == authority.decode("utf-8", "backslashreplace")


async def test_lines_are_written_in_order(tmp_path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog.open(asyncio.get_running_loop(), str(path))
    for i in range(1000):
        log.write(b'{"n":%d}\n' % i)
        if i % 100 == 0:
            await asyncio.sleep(0)  # let a loop iteration hand a batch over
    log.close()
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == list(range(1000))


async def test_a_stalled_reader_does_not_block_the_loop() -> None:
    read_end, write_end = os.pipe()  # nobody reads: the writer thread blocks once it is full
    try:
        log = AccessLog(asyncio.get_running_loop(), write_end, close_fd=False,
                        max_pending=256 * 1024)
        line = b'{"x":"' + b"y" * 200 + b'"}\n'
        started = time.monotonic()
        for _ in range(20):
            for _ in range(1000):
                log.write(line)
            await asyncio.sleep(0)
        assert time.monotonic() - started < 2.0  # nothing waited on the pipe
        assert log.dropped > 0
        # Lines are whole: what was written to the pipe (~64 KiB + the bound) parses.
        os.set_blocking(read_end, False)
        data = b""
        while True:
            try:
                chunk = os.read(read_end, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        complete = data[:data.rfind(b"\n") + 1]
        assert all(json.loads(x) for x in complete.splitlines())
    finally:
        os.close(read_end)  # the writer's next write fails (EPIPE) and it ends
        log.close(timeout=5)
        os.close(write_end)
