"""What a Forwarder hands over: the response it accepted, or why there is none.

The exchange (dataplane/exchange.py) is the one `ResponseSink`; the forwarder
(dataplane/forwarder.py) holds it as this base type, so that the forwarder imports nothing of
the exchange that owns it. A stopped forwarder holds `DETACHED` instead.
"""

from __future__ import annotations

from typing import Final

from meshproxy.dataplane.upstream import UpstreamConnection
from meshproxy.http1.errors import ProxyError
from meshproxy.http1.events import HeaderList, ResponseHead


class ResponseSink:
    """What a Forwarder hands over (abstract; the Exchange implements it)."""

    __slots__ = ()

    def accept_head(self, head: ResponseHead) -> None:
        """A response head to send on: an interim 1xx one, or the final one (no retry)."""
        raise NotImplementedError  # abstract

    def accept_body(self, data: bytes) -> None:
        raise NotImplementedError  # abstract

    def accept_trailers(self, fields: HeaderList) -> None:
        """The response's trailer fields (from an HTTP/2 upstream); its end follows."""
        raise NotImplementedError  # abstract

    def accept_end(self) -> None:
        """The response is complete (its connection is already back in the pool)."""
        raise NotImplementedError  # abstract

    def accept_upgrade(self, conn: UpstreamConnection, rest: bytes, pending: list[bytes]) -> None:
        """101 Switching Protocols: `conn` and the client become a tunnel; `rest` is the
        upstream's first tunnel bytes, `pending` the client's, held until now."""
        raise NotImplementedError  # abstract

    def flush(self) -> None:
        """The events of one upstream read have been handed over."""
        raise NotImplementedError  # abstract

    def forward_failed(self, error: ProxyError) -> None:
        """No try will be made any more and no response was accepted: answer `error`."""
        raise NotImplementedError  # abstract

    def response_broken(self, reason: str) -> None:
        """The accepted response cannot be completed (spec §4 `reason`)."""
        raise NotImplementedError  # abstract


class _Detached(ResponseSink):
    """The sink of a stopped forwarder: nothing reaches it any more (every caller checks
    `done` first), and holding it instead of the exchange breaks the exchange ⇄ forwarder
    reference cycle, so that both are freed by reference counting when the request ends
    rather than left to the garbage collector (measured: a fifth of the proxy's time)."""

    __slots__ = ()

    def accept_head(self, head: ResponseHead) -> None:
        pass

    def accept_body(self, data: bytes) -> None:
        pass

    def accept_trailers(self, fields: HeaderList) -> None:
        pass

    def accept_end(self) -> None:
        pass

    def accept_upgrade(self, conn: UpstreamConnection, rest: bytes, pending: list[bytes]) -> None:
        conn.abort()

    def flush(self) -> None:
        pass

    def forward_failed(self, error: ProxyError) -> None:
        pass

    def response_broken(self, reason: str) -> None:
        pass


DETACHED: Final = _Detached()
