"""Fixtures for the integration tests (real sockets, a real proxy process)."""

from support.fixtures import backend, backend_b, proxy_factory, raw_backend  # noqa: F401
