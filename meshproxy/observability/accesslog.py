"""The access log (`meshproxy proxy --access-log PATH|-`): one JSON object per line, per request,
including those the proxy refused before their head was complete (a RequestRecord with what is known).

Lines are made on the event loop and written by a thread of their own, so that a slow disk
or a stdout nobody reads never holds up a request:

- the loop appends each line to a list and hands the batch to the writer thread every
  FLUSH_LINES lines, or FLUSH_DELAY after the first line of a batch (a timer), whichever comes
  first. Waking the thread costs tens of µs (a condition variable and two GIL hand-overs);
  per loop iteration that was a third of a request's CPU at full load, per batch it is
  nothing. A line is therefore on disk within ~50 ms;
- the writer thread writes batches with os.write (O_APPEND for a file: whole lines, even with
  other writers) as fast as the file takes them;
- what the writer has not written yet is bounded (MAX_PENDING bytes, 8 MiB: tens of thousands
  of lines, seconds of a stall at full speed). Past it, new batches are dropped, counted in
  `dropped`, and a warning is logged at most every 10 s. Losing log lines under a stalled disk
  is chosen over stalling traffic or growing memory without bound.

At exit (close) what is buffered is written, waiting at most a few seconds.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from json.encoder import encode_basestring_ascii as _quote

log = logging.getLogger("meshproxy.accesslog")

FLUSH_LINES = 512
FLUSH_DELAY = 0.05  # seconds
MAX_PENDING = 8 * 1024 * 1024
_WARN_EVERY = 10.0


class _Clock:
    """RFC 3339 UTC timestamps with milliseconds; the date and time part is made once per
    second."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def format(self, wall: float) -> bytes:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return b"%s.%03dZ" % (self._prefix, int((wall - second) * 1000))


# Bytes that go into a JSON string as they are: printable ASCII but `"` and `\`.
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _text(value: bytes | None) -> bytes:
    """A JSON string (or null) for header bytes; bytes that are not UTF-8 show as \\xNN."""
    if value is None:
        return b"null"
    if not value.translate(None, _PLAIN):
        return b'"%s"' % value  # the usual case: nothing to escape (one C call to know)
    return _quote(value.decode("utf-8", "backslashreplace")).encode("ascii")


class _Strings(dict):
    """JSON forms of the few strings that repeat (directions, routes, services, endpoints,
    reasons), made once each."""

    def __missing__(self, key: str | None) -> bytes:
        value = b"null" if key is None else _quote(key).encode("ascii")
        if len(self) < 10_000:
            self[key] = value
        return value


def _path(target: bytes) -> bytes:
    """The path and query of a request target; an absolute-form target loses its scheme
    and authority (they are the `authority` field)."""
    if target[:1] == b"/" or b"://" not in target:
        return target
    rest = target.partition(b"://")[2]
    slash = rest.find(b"/")
    return rest[slash:] if slash >= 0 else b"/"


_LINE = (b'{"time":"%s","trace_id":"%s","span_id":"%s","parent_span_id":%s,"request_id":%s,'
         b'"direction":%s,"method":"%s","authority":%s,"path":%s,"upstream":%s,"attempts":%d,'
         b'"status":%d,"duration_ms":%.3f,"bytes_in":%d,"bytes_out":%d,"route":%s,'
         b'"service":%s,"error":%s,"peer":%s}\n')


def format_line(clock: _Clock, strings: dict, wall: float, trace_id: bytes, span_id: bytes,
                parent_span_id: bytes | None, request_id: bytes | None, direction: str,
                method: bytes, authority: bytes | None, target: bytes | None,
                upstream: str | None, attempts: int, status: int, duration: float,
                bytes_in: int, bytes_out: int, route: str, service: str, error: str | None,
                peer: str | None = None) -> bytes:
    """Return one access-log line (JSON, ending in a newline). `strings`: a _Strings cache;
    `wall`: the request's start, Unix time; the ids are hex and the method a token (as the
    trace code and the request reader make them: written as they are); `target` None: no
    path is known (null); `duration` in seconds; `status` 0 when no response was completed;
    `peer` (the client's address) is the last field, null when the transport had none."""
    line = _LINE % (
        clock.format(wall), trace_id, span_id,
        b'"%s"' % parent_span_id if parent_span_id is not None else b"null",
        _text(request_id), strings[direction], method, _text(authority),
        _text(_path(target)) if target is not None else b"null", strings[upstream], attempts,
        status, duration * 1000.0, bytes_in, bytes_out, strings[route], strings[service],
        strings[error],
        # Not through `strings`: client addresses are too many to keep.
        _quote(peer).encode("ascii") if peer is not None else b"null",
    )
    return line


class AccessLog:
    """Buffered, non-blocking JSON-lines writer to a file descriptor (see the module
    docstring). `write` and `record` must be called on the loop's thread."""

    def __init__(self, loop, fd: int, *, name: str = "", close_fd: bool = True,
                 max_pending: int = MAX_PENDING, flush_lines: int = FLUSH_LINES) -> None:
        self.loop = loop
        self.name = name
        self.clock = _Clock()
        self.strings = _Strings()
        self.dropped = 0  # lines not written because the writer was too far behind
        self.write_errors = 0
        self._fd = fd
        self._close_fd = close_fd
        self._max_pending = max_pending
        self._flush_lines = flush_lines
        self._lines: list[bytes] = []
        self._scheduled = False
        self._cond = threading.Condition(threading.Lock())
        self._batches: collections.deque[bytes] = collections.deque()
        self._pending = 0  # bytes handed to the writer and not yet written
        self._closing = False
        self._warned_at = float("-inf")
        self._dropped_reported = 0
        # Unix time = loop time + offset: requests keep their start in the loop's monotonic
        # clock. The offset is measured again every second, so that the log follows
        # adjustments of the system clock.
        self.offset = time.time() - loop.time()
        self._offset_until = loop.time() + 1.0
        self._thread = threading.Thread(target=self._run, name="meshproxy-access-log",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, loop, target: str) -> "AccessLog":
        """Open `target` (a path, appended to and created if missing, or `-` for stdout).
        Raises OSError."""
        if target == "-":
            return cls(loop, os.dup(1), name="stdout")
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return cls(loop, fd, name=target)

    # -- loop thread -----------------------------------------------------------------------------

    def record(self, start: float, *fields) -> None:
        """Log one request: `start` its loop time, then `format_line`'s fields from
        `trace_id` on, in order."""
        if start > self._offset_until:
            now = self.loop.time()
            self.offset = time.time() - now
            self._offset_until = now + 1.0
        self.write(format_line(self.clock, self.strings, start + self.offset, *fields))

    def log_request(self, record, duration: float) -> None:
        """Log one finished request from its RequestRecord (observability/record.py). For a
        request answered before it had a complete head (400, 408, 431) what is not known is
        empty (trace ids, method) or null (request id, authority, path, upstream)."""
        trace = record.trace
        if trace is None:
            trace_id = span_id = b""
            parent_id = None
        else:
            trace_id, span_id, parent_id = trace.trace_id, trace.span_id, trace.parent_id
        self.record(record.start, trace_id, span_id, parent_id, record.request_id,
                    record.direction, record.method, record.authority, record.target,
                    record.endpoint, record.attempts, record.status, duration,
                    record.request_bytes, record.response_bytes, record.route, record.service,
                    record.error, record.peer)

    def write(self, line: bytes) -> None:
        """Queue one line (bytes ending in a newline)."""
        lines = self._lines
        lines.append(line)
        if len(lines) >= self._flush_lines:
            self._hand_over()
        elif not self._scheduled:
            self._scheduled = True
            self.loop.call_later(FLUSH_DELAY, self._on_timer)

    def _on_timer(self) -> None:
        self._scheduled = False
        self._hand_over()

    def flush(self) -> None:
        """Hand the lines made so far to the writer thread now."""
        self._hand_over()

    def _hand_over(self) -> None:
        lines = self._lines
        if not lines:
            return
        self._lines = []
        data = b"".join(lines)
        with self._cond:
            if self._closing or self._pending + len(data) > self._max_pending:
                self.dropped += len(lines)
            else:
                self._batches.append(data)
                self._pending += len(data)
                self._cond.notify()
        if self.dropped != self._dropped_reported:
            now = self.loop.time()
            if now - self._warned_at >= _WARN_EVERY:
                self._warned_at = now
                log.warning("access log %s: %d lines dropped so far, its writer is behind "
                            "(slow disk or reader?)", self.name, self.dropped)
                self._dropped_reported = self.dropped

    # -- writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._batches and not self._closing:
                    self._cond.wait()
                if not self._batches:
                    return  # closing, and everything is written
                data = b"".join(self._batches)
                self._batches.clear()
            self._write_all(data)
            with self._cond:
                self._pending -= len(data)
                self._cond.notify_all()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors == 1 or self.write_errors % 1000 == 0:
                    log.error("access log %s: write failed: %s", self.name, exc)
                return
            view = view[written:]

    # -- exit ------------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered (waiting at most `timeout` seconds) and stop the writer.
        Blocks: call `flush` on the loop's thread first, then this one from any thread."""
        self._hand_over()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._close_fd and not self._thread.is_alive():
            try:
                os.close(self._fd)
            except OSError:
                pass
