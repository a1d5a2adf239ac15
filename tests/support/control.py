"""A `meshproxy control` subprocess for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support.proxy import REPO, free_ports


class ControlProcess:
    """One `meshproxy control --config PATHS --listen 127.0.0.1:PORT` subprocess."""

    def __init__(self, tmp_path: Path, paths: list[Path | str], name: str = "control",
                 extra_args: list[str] | tuple[str, ...] = ()) -> None:
        self.paths = [str(p) for p in paths]
        self.extra_args = list(extra_args)
        self.stderr_path = Path(tmp_path) / f"{name}.stderr"
        self.name = name
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, port: int | None = None) -> "ControlProcess":
        """Start it (on `port`, or a free one) and wait until /ready answers 200."""
        self.port = port or free_ports(1)[0]
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshproxy", "control",
                 *(["--config", *self.paths] if self.paths else []),
                 "--listen", f"127.0.0.1:{self.port}", *self.extra_args],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=dict(os.environ),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.get("/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"control plane did not become ready:\n{self.stderr()}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def config(self) -> dict:
        return json.loads(self.get("/config")[1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        print(f"--- {self.name} exit {self.process.returncode if self.process else None}")
        print(self.stderr())

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
