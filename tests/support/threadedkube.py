"""The fake API server (support/fakekube.py) for synchronous tests: on an event loop of its own,
in a thread, with a kubeconfig that points `kubernetes_asyncio` (and `meshproxy control
--kubeconfig`) at it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from support.fakekube import FakeKubeAPI


class ThreadedFake:
    """The fake API server on an event loop of its own, driven from the (synchronous) test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.api = self._call(self._make())
        self.url = self._call(self.api.start())

    async def _make(self) -> FakeKubeAPI:
        return FakeKubeAPI()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def apply(self, obj: dict) -> None:
        async def apply() -> None:
            self.api.apply(obj)
        self._call(apply())

    def close(self) -> None:
        self._call(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def write_kubeconfig(folder: Path, server: str) -> str:
    """Write `folder`/kubeconfig, whose current context is `server` with a token nobody
    checks; return its path."""
    path = Path(folder) / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return str(path)


@contextmanager
def threaded_cluster(folder: Path) -> Iterator[tuple[ThreadedFake, Path]]:
    """(the running fake, a kubeconfig for it in `folder`); the fake is closed afterwards."""
    fake = ThreadedFake()
    try:
        yield fake, Path(write_kubeconfig(folder, fake.url))
    finally:
        fake.close()
