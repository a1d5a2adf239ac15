"""Child processes of `meshproxy up`: start, prefix and keep their output, stop them all.

Each child runs in its own session (process group), so stopping it also stops anything it
started (a shell script's children, say), and Ctrl-C in the terminal reaches only `up`, which
then stops the children in order: sidecars drain first, then the apps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    """A process `up` started: its name for logs, how to start it, and its state."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    stopping: bool = False
    _pump: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class Supervisor:
    """Starts children, copies their output (prefixed) to the terminal and to log files."""

    def __init__(self, log_dir: Path, out=sys.stdout) -> None:
        self.log_dir = log_dir
        self.out = out
        self.children: list[Child] = []
        self.exited: asyncio.Queue[Child] = asyncio.Queue()
        log_dir.mkdir(parents=True, exist_ok=True)

    async def start(self, child: Child) -> None:
        """Start `child`. Raises OSError when its program cannot be run."""
        # The shell's MESHPROXY_* variables are the defaults of `meshproxy proxy`'s flags (a
        # pod's environment in Kubernetes): left in, one such as MESHPROXY_SERVICE_ACCOUNT or
        # MESHPROXY_TRANSPARENT would change every sidecar `up` starts. A child gets only the
        # ones `up` sets for it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPROXY_")}
        env.update(child.env)
        env["PYTHONUNBUFFERED"] = "1"
        child.log_path = self.log_dir / f"{child.name.replace('/', '_')}.log"
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=env, cwd=child.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        if child not in self.children:
            self.children.append(child)
        child._pump = asyncio.ensure_future(self._pump_output(child))

    async def _pump_output(self, child: Child) -> None:
        prefix = f"[{child.name}] "
        with open(child.log_path, "ab") as log:
            while True:
                line = await child.process.stdout.readline()
                if not line:
                    break
                log.write(line)
                log.flush()
                self.out.write(prefix + line.decode(errors="replace").rstrip("\n") + "\n")
                self.out.flush()
        await child.process.wait()
        if not child.stopping:
            await self.exited.put(child)

    async def stop(self, children: list[Child], timeout: float) -> None:
        """SIGTERM each child's process group, wait up to `timeout`, then SIGKILL what is left."""
        running = [c for c in children if c.process and c.process.returncode is None]
        for child in running:
            child.stopping = True
            _signal_group(child.process.pid, signal.SIGTERM)
        if not running:
            return
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(c.process.wait()) for c in running], timeout=timeout
        )
        for child in running:
            if child.process.returncode is None:
                _signal_group(child.process.pid, signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=5)
        for child in running:
            # The group may still hold grandchildren after the leader exited.
            _signal_group(child.process.pid, signal.SIGKILL)
            if child._pump is not None:
                await asyncio.wait([child._pump], timeout=2)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
