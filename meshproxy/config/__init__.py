"""Configuration: the typed model of every kind, loading YAML with line numbers, validation,
and the immutable Snapshot the proxies read.

    snap = load_config(["mesh.yaml"])        # raises ConfigError listing every error
    snap.policy_for("package.default").retry.attempts
"""

from meshproxy.config.diagnostics import ConfigError, Diagnostic, Pos
from meshproxy.config.duration import parse_duration
from meshproxy.config.loader import LoadResult, load, load_config, load_objects, load_text
from meshproxy.config.model import (
    AuthorizationPolicy,
    GRPCRoute,
    HTTPRoute,
    Instance,
    Mesh,
    PeerAuthentication,
    Resource,
    Service,
    SidecarPorts,
    TrafficPolicy,
)
from meshproxy.config.snapshot import DEFAULT_TRAFFIC_POLICY, Snapshot

__all__ = [
    "AuthorizationPolicy",
    "ConfigError",
    "DEFAULT_TRAFFIC_POLICY",
    "Diagnostic",
    "GRPCRoute",
    "HTTPRoute",
    "Instance",
    "LoadResult",
    "Mesh",
    "PeerAuthentication",
    "Pos",
    "Resource",
    "Service",
    "SidecarPorts",
    "Snapshot",
    "TrafficPolicy",
    "load",
    "load_config",
    "load_objects",
    "load_text",
    "parse_duration",
]
