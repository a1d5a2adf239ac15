"""The proxy's side of the control plane's watch (`GET /v1/watch`, see meshproxy/control/api.py).

It keeps one streaming request open, turns each snapshot line into a Snapshot and hands it to
`on_snapshot`; a snapshot that fails to load goes to `on_refused` and the one in force stays.
When the control plane is unreachable or silent for longer than READ_TIMEOUT (three missed
heartbeats), it reconnects with exponential backoff and full jitter, and the proxy keeps
serving with the last snapshot in the meantime.

Nothing is applied twice or out of order: `seq` must grow within a watch; a version the proxy
already holds is skipped; a generation older than the one held (a replica that has not seen a
change yet) is refused. The reconnecting request names the version held, so an unchanged
control plane sends nothing but heartbeats.

Plain asyncio and httptools rather than aiohttp: the sidecar does not load aiohttp at all
(its memory is counted per pod).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Callable
from urllib.parse import urlencode, urlsplit

import httptools

from meshproxy.config import ConfigError, Snapshot, load_objects
from meshproxy.control.views import is_older

log = logging.getLogger("meshproxy.proxy.control")
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 15.0  # the control plane sends a heartbeat every 5 s
BACKOFF_BASE = 0.2
BACKOFF_MAX = 5.0
DEFAULT_CONTROL_PORT = 15010


class WatchError(Exception):
    """The watch ended or the control plane answered something other than a stream."""


def watch_target(url: str, query: dict[str, str | int | None]) -> tuple[str, int, str]:
    """Return (host, port, request target) of the watch at control-plane `url`; raises
    ValueError for a URL that is not `http://HOST[:PORT][/PREFIX]`."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"control-plane URL must be http://HOST[:PORT], got {url!r}")
    path = parts.path.rstrip("/") + "/v1/watch"
    params = urlencode({k: v for k, v in query.items() if v not in (None, "")})
    return parts.hostname, parts.port or DEFAULT_CONTROL_PORT, f"{path}?{params}"


class _StreamParser:
    """httptools callbacks for one watch response: status, then body bytes split into lines."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status: int | None = None
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        self.complete = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        end = self.buffer.rfind(b"\n")
        if end >= 0:
            self.lines.extend(bytes(self.buffer[:end]).split(b"\n"))
            del self.buffer[: end + 1]

    def on_message_complete(self) -> None:
        self.complete = True


class ControlClient:
    """Follows the control plane at `url` for the proxy of `service`.`namespace`."""

    def __init__(
        self,
        url: str,
        *,
        service: str,
        namespace: str,
        instance: str | None,
        inbound_port: int | None,
        admin: str | None,
        on_snapshot: Callable[[Snapshot], None],
        on_refused: Callable[[list[str]], None],
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.identity = {"service": service, "namespace": namespace, "instance": instance,
                         "inbound": inbound_port, "admin": admin}
        self.on_snapshot = on_snapshot
        self.on_refused = on_refused
        self.rng = rng or random.Random()
        self.version: str | None = None
        self.generation: tuple[int, ...] = ()
        self.connected = False
        self.reconnects = 0
        watch_target(url, {})  # refuse a bad URL at start, not on first connect

    async def run(self) -> None:
        """Watch forever, reconnecting with backoff; cancel to stop."""
        failures = 0
        while True:
            try:
                got_any = await self._watch_once()
            except (OSError, WatchError, TimeoutError, httptools.HttpParserError) as exc:
                got_any = False
                log.warning("control plane %s: %s", self.url, exc or type(exc).__name__)
            self.connected = False
            failures = 0 if got_any else failures + 1
            self.reconnects += 1
            delay = self.rng.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 30)))
            await asyncio.sleep(delay)

    async def _watch_once(self) -> bool:
        """Run one watch until it ends; return True when it delivered at least one line."""
        host, port, target = watch_target(self.url, {**self.identity, "version": self.version})
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        got_any = False
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/x-ndjson"
                         f"\r\nConnection: close\r\n\r\n".encode())
            stream = _StreamParser()
            seq = 0
            while not stream.complete:
                data = await asyncio.wait_for(reader.read(262_144), READ_TIMEOUT)
                if not data:
                    raise WatchError("connection closed")
                stream.parser.feed_data(data)
                if stream.status is not None and stream.status != 200:
                    raise WatchError(f"watch answered {stream.status}")
                lines, stream.lines = stream.lines, []
                for line in lines:
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    if message.get("seq", 0) <= seq:
                        raise WatchError(f"out-of-order message {message.get('seq')} after {seq}")
                    seq = message["seq"]
                    if not got_any:
                        self.connected, got_any = True, True
                        log.info("watching control plane %s", self.url)
                    if message.get("type") == "snapshot":
                        await self._take(message)
            raise WatchError("watch ended")
        finally:
            writer.close()

    async def _take(self, message: dict) -> None:
        version = message.get("version")
        generation = tuple(message.get("generation") or ())
        if version == self.version:
            return  # held already (for example after a reconnect to another replica)
        if is_older(generation, self.generation):
            log.warning("ignoring version %s: older than %s (generation %s < %s)", version,
                        self.version, list(generation), list(self.generation))
            return
        documents = message.get("documents") or []
        loop = asyncio.get_running_loop()
        try:
            # Building a snapshot of a large mesh takes a while: not on the event loop's turn.
            snapshot = await loop.run_in_executor(
                None, lambda: load_objects(documents, source=f"control:{version}", version=version))
        except ConfigError as exc:
            self.on_refused([str(d) for d in exc.diagnostics])
            return
        self.version, self.generation = version, generation
        self.on_snapshot(snapshot)
