"""One record per request: what the metrics, the span and the access-log line are made from.

An exchange fills its record in as the request goes (the Service once resolved, the route
once matched, the endpoint of each try, the bytes as they pass, the status) and hands it over
once, when the request ends (`ListenerContext.request_finished`). A request refused before it
had a complete head (400, 408, 431) gets a record too, with what is known.
"""

from __future__ import annotations

from meshproxy.observability.trace import TraceContext


class RequestRecord:
    """The facts of one request, in the words of spec §4 and §6."""

    __slots__ = (
        "start", "direction", "method", "authority", "target", "request_id", "peer", "trace",
        "service", "route", "endpoint", "attempts", "status", "error", "request_bytes",
        "response_bytes", "grpc_status",
    )

    def __init__(self, start: float, direction: str, method: bytes = b"",
                 authority: bytes | None = None, target: bytes | None = None) -> None:
        """`start`: the loop time the request began."""
        self.start = start
        self.direction = direction
        self.method = method
        self.authority = authority
        self.target = target  # as received; None when no head was read
        self.request_id: bytes | None = None
        self.peer: str | None = None  # the client's HOST:PORT
        self.trace: TraceContext | None = None  # once the trace began
        self.service = "unknown"  # spec §6 `service` label, NAME.NAMESPACE
        self.route = "default"  # spec §6 `route` label: NAMESPACE/NAME/RULE once a route matched
        self.endpoint: str | None = None  # the endpoint of the last try (HOST:PORT)
        self.attempts = 0  # tries made (0: none was started)
        self.status = 0  # the status sent to the client; 0 when no response was completed
        self.error: str | None = None  # spec §4 reason when the proxy ended the request
        self.request_bytes = 0  # body bytes received from the client
        self.response_bytes = 0  # body bytes received from the upstream
        self.grpc_status = -1  # a gRPC answer's status (spec §9); -1: not gRPC, or none read
