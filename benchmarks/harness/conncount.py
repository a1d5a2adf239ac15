"""Counting a proxy's upstream connections while it is loaded, as `ss -tnp` would show them.

`UpstreamConnections(ports, sid)` samples /proc/net/tcp and /proc/net/tcp6 (the kernel's
table behind `ss -tn`) in a background thread: for each backend port, the connections in
state ESTABLISHED whose *remote* port is that port and whose socket belongs to a process of
session `sid` (the proxy: another proxy's idle pooled connections to the same backends are not
counted). It keeps the largest number open at once and the number of distinct connections
seen (by local port), which tells a proxy that keeps a few connections from one that opens
and closes them as calls come and go.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

from harness.procs import session_pids

ESTABLISHED = "01"
TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def socket_inodes(pids: Sequence[int]) -> set[int]:
    """The inodes of the sockets the processes `pids` hold open."""
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def established_to(ports: Sequence[int], inodes: set[int] | None = None) -> dict[int, set[int]]:
    """{backend port: local ports of the ESTABLISHED connections to it}, from /proc/net/tcp;
    only sockets whose inode is in `inodes` when given."""
    wanted = {f"{p:04X}": p for p in ports}
    found: dict[int, set[int]] = {p: set() for p in ports}
    for table in TABLES:
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != ESTABLISHED:
                        continue
                    if inodes is not None and int(fields[9]) not in inodes:
                        continue
                    remote_port = fields[2].rsplit(":", 1)[1]
                    port = wanted.get(remote_port)
                    if port is not None:
                        found[port].add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return found


@dataclass
class UpstreamConnections:
    """Samples the connections of session `sid` to `ports` every `interval` seconds while in
    its block (every process's connections when `sid` is None)."""

    ports: Sequence[int]
    sid: int | None = None
    interval: float = 0.1
    max_open: dict[int, int] = field(default_factory=dict)
    seen: dict[int, set[int]] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "UpstreamConnections":
        self.max_open = {p: 0 for p in self.ports}
        self.seen = {p: set() for p in self.ports}
        self._pids = session_pids(self.sid) if self.sid is not None else None
        self._sample()
        self._thread = threading.Thread(target=self._run, name="conn-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.samples += 1
        inodes = socket_inodes(self._pids) if self._pids is not None else None
        for port, local in established_to(self.ports, inodes).items():
            self.max_open[port] = max(self.max_open[port], len(local))
            self.seen[port].update(local)

    def figures(self) -> dict:
        """{"max_open": {port: n}, "distinct": {port: n}, "samples": n} (JSON-ready)."""
        return {"max_open": {str(p): n for p, n in self.max_open.items()},
                "distinct": {str(p): len(s) for p, s in self.seen.items()},
                "samples": self.samples}
