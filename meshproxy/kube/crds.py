"""CustomResourceDefinitions of the meshproxy.io kinds (spec §3), generated from one place.

`python -m meshproxy.kube.crds > deploy/crds.yaml` writes them; a test checks that the file
in deploy/ is what this module makes, so the schemas are edited here and nowhere else.

The schemas follow the parsers in meshproxy.config.parse (field names, enums, ranges, which
fields are required), so the API server refuses what `meshproxy check` would refuse as far as
an OpenAPI schema can say it (structural schemas, apiextensions.k8s.io/v1). What a schema
cannot say (a retry backoff `max` shorter than `base`, `*` in the middle of a path pattern) is
still reported by the control plane, which keeps its last valid configuration.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from meshproxy.config.duration import DURATION_RE
from meshproxy.config.model.common import MTLS_MODES
from meshproxy.config.model.policy import AUTHZ_ACTIONS, LOAD_BALANCER_TYPES, RETRY_ON_WORDS

GROUP = "meshproxy.io"
VERSION = "v1alpha1"
_INT_LIMIT = 1 << 31  # the parsers' upper bound for integer limits

Schema = dict[str, Any]


def _obj(properties: dict[str, Schema], *, required: list[str] | None = None, description: str = "") -> Schema:
    out: Schema = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = properties
    if required:
        out["required"] = required
    return out


def _duration(description: str) -> Schema:
    # GEP-2257 durations, the same expression the parser uses.
    return {"type": "string", "pattern": DURATION_RE.pattern, "description": description}


def _int(description: str, lo: int, hi: int, fmt: str = "int64") -> Schema:
    return {"type": "integer", "format": fmt, "minimum": lo, "maximum": hi, "description": description}


def _strings(description: str) -> Schema:
    return {"type": "array", "items": {"type": "string"}, "description": description}


def _enum(values: tuple[str, ...], description: str, default: str | None = None) -> Schema:
    out: Schema = {"type": "string", "enum": list(values), "description": description}
    if default is not None:
        out["default"] = default
    return out


TARGET_REF = _obj(
    {
        "group": {"type": "string", "enum": ["", "core"], "description": "empty or core: a core-group Service"},
        "kind": {"type": "string", "enum": ["Service"], "description": "Service (the default)"},
        "name": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                 "description": "a Service of the policy's own namespace"},
    },
    required=["name"],
    description="the Service the policy applies to; without it, every Service of the namespace "
    "(of the mesh in meshproxy-system)",
)

TRAFFIC_POLICY_SPEC = _obj(
    {
        "targetRef": TARGET_REF,
        "loadBalancer": _obj({
            "type": _enum(LOAD_BALANCER_TYPES, "how an endpoint is picked (default PeakEWMA)"),
            "decay": _duration("PeakEWMA: decay of the RTT average (default 10s)"),
            "defaultRTT": _duration("PeakEWMA: RTT assumed for an endpoint not yet measured (default 30ms)"),
        }),
        "connectionPool": _obj({
            "connectTimeout": _duration("default 2s"),
            "idleTimeout": _duration("idle upstream keep-alive (default 60s to meshed peers, 1.5s to apps)"),
            "maxConnections": _int("per Service (default 1024)", 1, _INT_LIMIT),
            "maxPendingRequests": _int("per Service (default 1024)", 0, _INT_LIMIT),
            "maxRequests": _int("per Service (default 1024)", 1, _INT_LIMIT),
            "maxRequestBodyBytes": _int("413 past it (default: no limit)", 0, 1 << 62),
        }),
        "timeouts": _obj({
            "request": _duration("whole request, retries included (0s or absent: none)"),
            "perTry": _duration("each try (0s or absent: none)"),
        }),
        "retry": _obj({
            "attempts": _int("retries after the first try (default 2)", 0, 100, "int32"),
            "on": {
                "type": "array",
                "description": f"{', '.join(RETRY_ON_WORDS)}, or a status code 400..599",
                # Structural schemas allow int-or-string only as this anyOf; pattern applies
                # to the strings and minimum/maximum to the integers.
                "items": {
                    "x-kubernetes-int-or-string": True,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": "^(" + "|".join(RETRY_ON_WORDS) + r"|[4-5][0-9][0-9])$",
                    "minimum": 400,
                    "maximum": 599,
                },
            },
            "nonIdempotent": {"type": "boolean", "description": "also retry POST and PATCH"},
            "backoff": _obj({
                "base": _duration("default 25ms"),
                "max": _duration("default 250ms"),
            }),
            "budget": _obj({
                "percent": {"type": "number", "minimum": 0, "maximum": 100,
                            "description": "retries at most this share of requests (default 20)"},
                "minPerSecond": {"type": "number", "minimum": 0,
                                 "description": "plus this many per second (default 10)"},
            }),
        }),
        "circuitBreaker": _obj({
            "consecutiveFailures": _int("failures that eject an endpoint (default 5)", 1, _INT_LIMIT),
            "baseEjectionTime": _duration("default 5s"),
            "maxEjectionTime": _duration("default 60s"),
            "maxEjectionPercent": _int("default 50", 0, 100, "int32"),
        }),
    },
    description="load balancer, connection pool limits, timeouts, retries and circuit breaker",
)

PEER_AUTHENTICATION_SPEC = _obj(
    {
        "targetRef": TARGET_REF,
        "mtls": _obj({"mode": _enum(MTLS_MODES, "inbound mTLS mode")}, required=["mode"]),
    },
    required=["mtls"],
    description="the inbound mTLS mode of the mesh, a namespace or a Service",
)

_PATTERN_NOTE = "'*' alone, as a prefix or as a suffix"

AUTHORIZATION_POLICY_SPEC = _obj(
    {
        "targetRef": TARGET_REF,
        "action": _enum(AUTHZ_ACTIONS, "DENY policies are checked first", default="ALLOW"),
        "rules": {
            "type": "array",
            "description": "a request matches the policy when it matches any rule",
            "items": _obj({
                "from": {
                    "type": "array",
                    "items": _obj({"source": _obj({
                        "principals": _strings("SPIFFE IDs, with or without spiffe:// (" + _PATTERN_NOTE + ")"),
                        "namespaces": _strings("caller namespaces (" + _PATTERN_NOTE + ")"),
                    })}, required=["source"]),
                },
                "to": {
                    "type": "array",
                    "items": _obj({"operation": _obj({
                        "methods": _strings("HTTP methods"),
                        "paths": _strings("paths (" + _PATTERN_NOTE + ")"),
                    })}, required=["operation"]),
                },
            }),
        },
    },
    description="Istio's shape: which callers may (ALLOW) or may not (DENY) call what",
)

# kind -> (plural, short names, spec schema, extra printer columns)
KINDS: dict[str, tuple[str, list[str], Schema, list[dict]]] = {
    "TrafficPolicy": ("trafficpolicies", ["tp"], TRAFFIC_POLICY_SPEC, []),
    "PeerAuthentication": ("peerauthentications", ["pa"], PEER_AUTHENTICATION_SPEC,
                           [{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}]),
    "AuthorizationPolicy": ("authorizationpolicies", ["ap"], AUTHORIZATION_POLICY_SPEC,
                            [{"name": "Action", "type": "string", "jsonPath": ".spec.action"}]),
}


def crd(kind: str) -> dict:
    """Return the CustomResourceDefinition (apiextensions.k8s.io/v1) of one meshproxy.io kind;
    raises KeyError for a kind that is not one of KINDS."""
    plural, short, spec, columns = KINDS[kind]
    schema = _obj({
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec,
    }, required=["spec"])
    printer = ([{"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.name"}] + columns
               + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}])
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "meshproxy"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short, "categories": ["meshproxy"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "additionalPrinterColumns": printer,
            }],
        },
    }


def crds() -> list[dict]:
    """Return the CRDs of every meshproxy.io kind, in a fixed order."""
    return [crd(kind) for kind in KINDS]


class _Dumper(yaml.SafeDumper):
    # A schema part used twice is written out twice: anchors and aliases are legal YAML but
    # not what anyone reading or diffing a manifest expects.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    """Return deploy/crds.yaml: every CRD as one multi-document YAML text."""
    header = "# Generated by `python -m meshproxy.kube.crds`; edit meshproxy/kube/crds.py instead.\n"
    return header + "---\n".join(yaml.dump(c, Dumper=_Dumper, sort_keys=False, width=100) for c in crds())


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
