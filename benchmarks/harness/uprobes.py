"""Exact counts of calls to interpreter functions in one process, with perf uprobes.

`perf probe -x LIBPYTHON --add GROUP:SYM=SYM` puts a uprobe on the entry of SYM in the
interpreter's shared library (or its executable, for a static build); `perf stat -p PID`
then counts the hits in that process only (all its threads), nothing else on the machine.
perf stat starts with its counters disabled (-D -1) and is switched on and off through a
control FIFO, so a window is exactly the batch the driver brackets. Probes are global to the
machine: each run uses its own group name and deletes it at the end.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

# Entry points of object allocation in CPython 3.11. PyObject_Malloc and PyObject_Calloc
# are where every object not taken from a free list gets its memory (PyType_GenericAlloc and
# _PyObject_GC_New* call PyObject_Malloc in turn, so they are subsets, not additions), and
# also some object-internal tables (dict keys). PyMem_Malloc serves buffers (list items,
# bytearray storage, ...).
ALLOC_SYMBOLS = ("PyObject_Malloc", "PyObject_Calloc", "PyMem_Malloc", "PyType_GenericAlloc",
                 "_PyObject_GC_New", "_PyObject_GC_NewVar", "_PyObject_New")
# The sum reported as "allocations per request".
HEADLINE_SYMBOLS = ("PyObject_Malloc", "PyObject_Calloc")


class ProbeError(Exception):
    """perf or uprobes are not usable here; the message says why."""


def interpreter_binary(maps_text: str, exe: str) -> str:
    """Return the file holding the interpreter's code in a process: the libpython mapped in
    it (from /proc/PID/maps text), else its executable (a statically linked python)."""
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and Path(parts[5].strip()).name.startswith("libpython"):
            return parts[5].strip()
    return exe


def process_interpreter(pid: int) -> str:
    """Return the libpython (or python executable) that process pid runs."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return interpreter_binary(maps, os.readlink(f"/proc/{pid}/exe"))


def exported_symbols(binary: str, wanted: Sequence[str]) -> list[str]:
    """Return those of `wanted` that `binary` defines (nm -D, then nm for a static build)."""
    found: set[str] = set()
    for argv in (["nm", "-D", "--defined-only", binary], ["nm", "--defined-only", binary]):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        found |= {line.split()[-1] for line in done.stdout.splitlines() if line.strip()}
    return [s for s in wanted if s in found]


def parse_perf_csv(text: str, events: Sequence[str]) -> dict[str, int | None]:
    """Return {event: count} from `perf stat -x,` output; None for an event perf printed as
    not counted or not supported, or did not print."""
    counts: dict[str, int | None] = {e: None for e in events}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or fields[2] not in counts:
            continue
        counts[fields[2]] = int(fields[0]) if fields[0].strip().isdigit() else None
    return counts


class Probes:
    """Uprobes on `symbols` of `binary` under one group name; a context manager that adds
    them on entry and deletes the whole group on exit (also after an error)."""

    def __init__(self, binary: str, symbols: Sequence[str], group: str | None = None) -> None:
        self.binary = binary
        self.symbols = list(symbols)
        self.group = group or f"meshbench{os.getpid()}"
        self.events: dict[str, str] = {}  # symbol -> perf event name

    def __enter__(self) -> "Probes":
        try:
            for symbol in self.symbols:
                done = subprocess.run(
                    ["perf", "probe", "-q", "-x", self.binary, "-a",
                     f"{event_name(symbol, self.group)}={symbol}"],
                    capture_output=True, text=True, timeout=60)
                if done.returncode != 0:
                    raise ProbeError(f"perf probe on {symbol} in {self.binary} failed: "
                                     f"{(done.stderr or done.stdout).strip()[-300:]}")
                self.events[symbol] = event_name(symbol, self.group)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.__exit__()
            raise ProbeError(f"cannot run perf probe: {exc}") from exc
        except ProbeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            subprocess.run(["perf", "probe", "-q", "-d", f"{self.group}:*"],
                           capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass  # nothing was added, or perf is gone: there is nothing more to do


class PerfCounter:
    """`perf stat` attached to one process, counting `events` only while enabled.

    Use as a context manager; between `enable()` and `disable()` the counters run. `counts`
    is filled when the block ends."""

    def __init__(self, pid: int, events: Sequence[str], cpu: int | None = None) -> None:
        self.pid = pid
        self.events = list(events)
        self.cpu = cpu
        self.counts: dict[str, int | None] = {}

    def __enter__(self) -> "PerfCounter":
        self._dir = Path(tempfile.mkdtemp(prefix="meshbench-perf-"))
        ctl, ack = self._dir / "ctl", self._dir / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # O_RDWR on a FIFO never blocks on Linux, whichever side perf opens first.
        self._ctl = os.open(ctl, os.O_RDWR)
        self._ack = os.open(ack, os.O_RDWR)
        self._out = self._dir / "stat.csv"
        argv = ["perf", "stat", "-x,", "-D", "-1", "--control", f"fifo:{ctl},{ack}",
                "-e", ",".join(self.events), "-p", str(self.pid), "-o", str(self._out)]
        if self.cpu is not None:  # keep perf itself off the proxy's core
            argv = ["taskset", "-c", str(self.cpu), *argv]
        self._perf = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        return self

    def _command(self, word: str, timeout: float = 10.0) -> None:
        os.write(self._ctl, f"{word}\n".encode())
        reply = _read_line(self._ack, timeout)
        if not reply.startswith("ack"):
            self._perf.kill()
            _, err = self._perf.communicate()
            raise ProbeError(f"perf stat did not acknowledge {word!r} (got {reply!r}): "
                             f"{err.strip()[-300:]}")

    def enable(self) -> None:
        """Start counting (returns once perf has acknowledged)."""
        self._command("enable")

    def disable(self) -> None:
        """Stop counting (returns once perf has acknowledged)."""
        self._command("disable")

    def __exit__(self, *exc: object) -> None:
        try:
            if self._perf.poll() is None:
                self._perf.send_signal(signal.SIGINT)
            try:
                _, err = self._perf.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self._perf.kill()
                _, err = self._perf.communicate()
            text = self._out.read_text() if self._out.exists() else ""
            self.counts = parse_perf_csv(text, self.events)
            if not text and exc[0] is None:
                raise ProbeError(f"perf stat wrote nothing: {err.strip()[-300:]}")
        finally:
            os.close(self._ctl)
            os.close(self._ack)
            for path in self._dir.iterdir():
                path.unlink()
            self._dir.rmdir()


def _read_line(fd: int, timeout: float) -> str:
    """Read one line from fd, waiting at most `timeout` seconds for it ('' on timeout)."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def event_name(symbol: str, group: str) -> str:
    """Return the perf event for a symbol probed under group."""
    return f"{group}:{re.sub(r'[^A-Za-z0-9_]', '_', symbol)}"
