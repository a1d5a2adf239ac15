"""A child process's output lines, collected in a thread so a test can wait for one; and
whether a process is still alive."""

from __future__ import annotations

import threading
import time


class Lines:
    """Reads `stream` line by line in a daemon thread."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> bool:
        """True once a line contains `text`; False after `timeout` seconds without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.05)
        return False

    def finish(self, timeout: float) -> None:
        """Wait until the stream has ended (its writer exited) and every line is read."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the output did not end"

    def text(self) -> str:
        return "\n".join(self.lines)


def alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
