"""The `Mesh` kind (meshproxy.io/v1alpha1): a mesh that runs without Kubernetes.

It is the registry of Services and their instances, plus mesh-wide settings. In Kubernetes
the same Service and instance facts come from Services and EndpointSlices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from meshproxy.config.model.common import (
    DEFAULT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    FrozenMap,
    ObjectMeta,
    Source,
    service_key,
)

ALLOW_ANY = "ALLOW_ANY"
REGISTRY_ONLY = "REGISTRY_ONLY"
OUTBOUND_TRAFFIC_POLICIES = (ALLOW_ANY, REGISTRY_ONLY)


def join_host_port(host: str, port: int) -> str:
    """Return `host:port`, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class SidecarPorts:
    """Fixed ports of an instance's sidecar; None means "pick one" (`meshproxy up`) or §2's default."""

    outbound: int | None = None
    inbound: int | None = None
    admin: int | None = None
    health: int | None = None


@dataclass(frozen=True)
class Instance:
    """One running copy of a Service's app, meshed (with a sidecar) or not."""

    name: str
    app_host: str
    app_port: int
    labels: FrozenMap = field(default_factory=FrozenMap)
    command: tuple[str, ...] | None = None  # None: an app the user starts
    meshed: bool = True  # False for `sidecar: false`: reached in plaintext at the app's address
    sidecar_ports: SidecarPorts = field(default_factory=SidecarPorts)
    # `app.otherAddresses`: further IPs (canonical text) of the same app on `app_port`, such as
    # a dual-stack pod's address of its other family. Transparent mode takes a connection to
    # any of them as one to this instance, which is still dialled at its own endpoint.
    other_app_hosts: tuple[str, ...] = ()

    @property
    def app_address(self) -> str:
        """The app's `host:port`."""
        return join_host_port(self.app_host, self.app_port)


@dataclass(frozen=True)
class Service:
    """A Service: a name clients call, its port, virtual IPs and instances."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    port: int = 80
    addresses: tuple[str, ...] = ()  # virtual IPs (like a ClusterIP), for transparent mode
    instances: tuple[Instance, ...] = ()

    @property
    def key(self) -> str:
        """`NAME.NAMESPACE`, the key of `Snapshot.services` and of metric labels."""
        return service_key(self.name, self.namespace)


@dataclass(frozen=True)
class ControlPlane:
    """Where the control plane listens."""

    host: str = "127.0.0.1"
    port: int = 15010

    @property
    def listen(self) -> str:
        """`host:port`."""
        return join_host_port(self.host, self.port)


@dataclass(frozen=True)
class Mesh:
    """The `Mesh` resource: trust domain, control plane, defaults, services, policy files."""

    api_version: ClassVar[str] = "meshproxy.io/v1alpha1"
    kind: ClassVar[str] = "Mesh"

    metadata: ObjectMeta
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    control_plane: ControlPlane = field(default_factory=ControlPlane)
    # None: not set here; inbound is then PERMISSIVE unless a PeerAuthentication says otherwise
    # (`meshproxy up` chooses STRICT).
    mtls_mode: str | None = None
    outbound_traffic_policy: str = ALLOW_ANY
    services: tuple[Service, ...] = ()
    policies: tuple[str, ...] = ()  # as written: files or folders relative to the Mesh file
    source: Source | None = field(default=None, compare=False)
