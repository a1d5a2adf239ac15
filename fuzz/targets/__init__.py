"""The fuzz targets: each module has `TestOneInput(data: bytes)`, which feeds `data` to one
reader of untrusted bytes and raises (AssertionError, or whatever escaped) when an invariant a
user relies on is broken. docs/fuzzing.md lists the invariants.

This registry imports nothing of meshproxy: fuzz/run.py reads it without loading the targets,
and fuzz/driver.py imports a target only once atheris instruments the imports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One fuzz target: its module under fuzz/targets/, the largest input libFuzzer makes
    (`max_len`, bytes), and what it reads."""

    name: str
    max_len: int
    what: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("http1_request", 4096, "HTTP/1.1 requests from a client (http1/reader.py)"),
    Target("http1_response", 4096, "HTTP/1.1 responses from an upstream (http1/response_reader.py)"),
    Target("http2_server", 8192, "HTTP/2 from a client, server side (http2/codec.py)"),
    Target("http2_client", 8192, "HTTP/2 from an upstream, client side (http2/codec.py)"),
    Target("config", 8192, "a YAML configuration file, as `meshproxy check` reads it (config/)"),
    Target("ca", 4096, "POST /v1/certificates: credential and CSR checks (control/ca_api.py, identity/)"),
    Target("webhook", 16384, "an AdmissionReview POSTed to the webhook (kube/webhook.py)"),
)}
