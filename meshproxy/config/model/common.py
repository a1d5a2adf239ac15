"""Pieces every kind shares: metadata, target references, where a resource was written,
and the mesh-wide constants of spec §2–§3 that are not fields of any kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

from meshproxy.config.diagnostics import Pos

ROOT_NAMESPACE = "meshproxy-system"
DEFAULT_NAMESPACE = "default"
DEFAULT_TRUST_DOMAIN = "cluster.local"
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
# Spec §3 defaults that belong to the proxy, not to a TrafficPolicy.
CLIENT_HEADER_TIMEOUT = 10.0  # seconds to receive a request head
CLIENT_IDLE_TIMEOUT = 75.0  # keep-alive of downstream connections
DRAIN_TIMEOUT = 25.0  # at most, on SIGTERM or POST /drain
RETRY_BUFFER_BYTES = 64 * 1024  # a larger request body is not retried once sent
MAX_HEADER_BYTES = 64 * 1024  # past it: 431
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable str→str mapping (labels, annotations)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._data = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._data) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


# Where a resource's document starts: the same kind of place a diagnostic points at.
Source = Pos


@dataclass(frozen=True)
class ObjectMeta:
    """Kubernetes-style metadata: the name and namespace that identify a resource."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    labels: FrozenMap = field(default_factory=FrozenMap)
    annotations: FrozenMap = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class TargetRef:
    """The Service a policy applies to; always in the policy's own namespace."""

    name: str
    kind: str = "Service"
    group: str = ""


def service_key(name: str, namespace: str) -> str:
    """Return the key a Service is known by everywhere: `NAME.NAMESPACE`."""
    return f"{name}.{namespace}"


def split_service_key(key: str) -> tuple[str, str]:
    """Return (name, namespace) of `NAME.NAMESPACE`; a bare `NAME` is in `default`."""
    name, _, namespace = key.partition(".")
    return name, namespace or DEFAULT_NAMESPACE
