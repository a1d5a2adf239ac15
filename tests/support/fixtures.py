"""pytest fixtures over the support classes (imported by tests/integration/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from support.backend import HttpBackend
from support.proxy import ProxyProcess
from support.rawbackend import RawBackend


@pytest.fixture(scope="session")
def backend() -> Iterator[HttpBackend]:
    """The shared aiohttp backend ("a"); tests tell their requests apart by path or header."""
    server = HttpBackend("a").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def backend_b() -> Iterator[HttpBackend]:
    """A second aiohttp backend ("b"), for Services with two instances."""
    server = HttpBackend("b").start()
    yield server
    server.stop()


@pytest.fixture
def raw_backend() -> Iterator[Callable[..., RawBackend]]:
    """Factory of RawBackends, each stopped after the test."""
    started: list[RawBackend] = []

    def make(*args, **kwargs) -> RawBackend:
        server = RawBackend(*args, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def proxy_factory(tmp_path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory of running proxies (`ProxyProcess(tmp_path, mesh, **kwargs)`), stopped after
    the test; their stderr shows in the report of a failed test."""
    started: list[ProxyProcess] = []

    def make(mesh: str, **kwargs) -> ProxyProcess:
        kwargs.setdefault("name", f"proxy{len(started)}")
        proxy = ProxyProcess(tmp_path, mesh, **kwargs)
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()
