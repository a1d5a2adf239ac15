"""Child processes in their own sessions, and what /proc says about them.

Every server the harness starts gets a new session (so its process group id and session id
are its own pid). That gives one handle for the whole tree of a server (nginx master and
worker, for example): CPU time and memory are summed over every process of the session, and
stopping it signals the whole group.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the harness dies without cleaning up (kill -9)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One started server: its name, its Popen and the file its output goes to."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def sid(self) -> int:
        """The session id, equal to the pid of the process the harness started."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the started process has not exited."""
        return self.popen.poll() is None


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """Return argv prefixed with `taskset -c CPU`, or unchanged when cpu is None."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


class Supervisor:
    """Starts servers in their own sessions and stops every one of them, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], cpu: int | None = None,
              env: dict[str, str] | None = None) -> Child:
        """Start argv (pinned to cpu) with output to LOG_DIR/NAME.log; return the Child.

        Raises OSError when the program cannot be executed.
        """
        log_path = self._log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                pinned(argv, cpu), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env=env,
                preexec_fn=die_with_parent,
            )
        child = Child(name, popen, log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after `grace` seconds; reap it."""
        _signal_group(child.sid, signal.SIGTERM)
        try:
            child.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Workers can outlive their master for a moment; the group still has them.
        _signal_group(child.sid, signal.SIGKILL)
        try:
            child.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """Stop every child still known, newest first. Never raises for a child already gone."""
        for child in reversed(list(self._children)):
            self.stop(child)


def run_bounded(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short-lived program (wrk, curl) to completion and return its text output.

    The program is killed and reaped if the harness is interrupted, and gets SIGTERM if the
    harness dies. Raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_stat(pid: int) -> tuple[int, int] | None:
    """Return (session id, utime + stime in clock ticks) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = data[data.rindex(b")") + 2:].split()
    # Fields after the name, 0-based: state=0 ppid=1 pgrp=2 session=3 ... utime=11 stime=12.
    return int(fields[3]), int(fields[11]) + int(fields[12])


def session_pids(sid: int) -> list[int]:
    """Return the pids of every live process whose session id is sid."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None and stat[0] == sid:
            pids.append(int(entry.name))
    return pids


def session_cpu_seconds(sid: int) -> float:
    """Return user + system CPU seconds used so far by the live processes of session sid."""
    ticks = 0
    for pid in session_pids(sid):
        stat = _read_stat(pid)
        if stat is not None:
            ticks += stat[1]
    return ticks / CLOCK_TICKS


def session_rss_bytes(sid: int) -> int:
    """Return the summed resident set size (VmRSS) of the processes of session sid.

    Pages shared between processes (nginx master and worker) are counted once per process.
    """
    total = 0
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


def cpu_busy_ticks() -> dict[int, tuple[int, int]]:
    """Return {cpu: (busy ticks, total ticks)} from /proc/stat; busy excludes idle and iowait."""
    result = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            total = sum(ticks)
            result[int(name[3:])] = (total - ticks[3] - ticks[4], total)
    return result


def busy_percent(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 cpu: int | None) -> float | None:
    """Return how busy cpu was between two cpu_busy_ticks() snapshots, in percent."""
    if cpu is None or cpu not in before or cpu not in after:
        return None
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return 100.0 * busy / total if total else None


def busy_over(seconds: float) -> dict[int, float]:
    """Return {cpu: busy percent} measured over the next `seconds` (sleeps that long)."""
    before = cpu_busy_ticks()
    time.sleep(seconds)
    after = cpu_busy_ticks()
    return {cpu: busy_percent(before, after, cpu) or 0.0 for cpu in after}


def _own_cpu_seconds() -> float:
    """CPU seconds of this process (all threads) plus its reaped children (wrk, curl)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class CpuWindow:
    """CPU accounting over one measured interval (use as a context manager).

    After the block: `wall` seconds; `proxy_cpu_s` and `origin_cpu_s` (session trees; None
    for a missing session); `load_cpu_s`, what this process and the load generators it ran
    and reaped in the interval used; each core's busy percent; and the busy percent of each
    core *not* explained by the processes meant to run there (`*_other_pct`): other programs
    competing with the measurement. The load core's expected users are the origin, this
    process and its load generators.
    """

    proxy_sid: int | None
    origin_sid: int | None
    proxy_core: int | None
    load_core: int | None
    wall: float = 0.0
    proxy_cpu_s: float | None = None
    origin_cpu_s: float | None = None
    load_cpu_s: float = 0.0
    proxy_core_busy_pct: float | None = None
    load_core_busy_pct: float | None = None
    proxy_core_other_pct: float | None = None
    load_core_other_pct: float | None = None

    def _sessions(self) -> tuple[float | None, float | None]:
        return (session_cpu_seconds(self.proxy_sid) if self.proxy_sid else None,
                session_cpu_seconds(self.origin_sid) if self.origin_sid else None)

    def __enter__(self) -> "CpuWindow":
        self._proxy0, self._origin0 = self._sessions()
        self._own0 = _own_cpu_seconds()
        self._cores0 = cpu_busy_ticks()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._t0
        cores = cpu_busy_ticks()
        self.load_cpu_s = _own_cpu_seconds() - self._own0
        proxy, origin = self._sessions()
        if proxy is not None and self._proxy0 is not None:
            self.proxy_cpu_s = proxy - self._proxy0
        if origin is not None and self._origin0 is not None:
            self.origin_cpu_s = origin - self._origin0
        self.proxy_core_busy_pct = busy_percent(self._cores0, cores, self.proxy_core)
        self.load_core_busy_pct = busy_percent(self._cores0, cores, self.load_core)
        if self.wall <= 0:
            return
        if self.proxy_core_busy_pct is not None:
            self.proxy_core_other_pct = (self.proxy_core_busy_pct
                                         - 100 * (self.proxy_cpu_s or 0.0) / self.wall)
        if self.load_core_busy_pct is not None:
            expected = self.load_cpu_s + (self.origin_cpu_s or 0.0)
            self.load_core_other_pct = self.load_core_busy_pct - 100 * expected / self.wall


@dataclass
class RssSampler:
    """Samples the summed RSS of some sessions in a background thread; keeps the peak."""

    sids: Sequence[int]
    interval: float = 0.05
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "RssSampler":
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss = sum(session_rss_bytes(sid) for sid in self.sids)
        self.peak = max(self.peak, rss)


def log_tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file (empty string when it is missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_until(predicate, deadline: float, interval: float = 0.02) -> bool:
    """Poll predicate() until it returns true or time.monotonic() passes deadline."""
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
