"""The control plane's state: the latest input of every source, the snapshot in force, the last
refused change, and the proxies that watch it. Sources call `files_changed` and
`discovery_changed`; watchers wait with `wait_for_change`.

An invalid change never replaces the snapshot in force: it is logged, kept for `/config` and
counted (`meshproxy_config_errors_total`); the next valid change replaces both.

Discovered objects (Kubernetes) are judged one by one instead (control/screening.py): an
invalid object is left out, or held at its last valid version, and everything else goes on
being applied. The objects rejected now are on `/config` under `rejected`; each rejection is
logged and counted once, when it first appears, not on every rebuild.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from meshproxy.config import ConfigError, LoadResult
from meshproxy.control.screening import Rejection, Screening, build_discovered
from meshproxy.control.views import ControlSnapshot, EncodingCache, build

log = logging.getLogger("meshproxy.control")
FORGET_DISCONNECTED_AFTER = 300.0  # seconds a proxy that left stays in /v1/proxies


@dataclass
class ProxyRecord:
    """One proxy watching (or having watched) this control plane, for `/v1/proxies`."""

    service: str  # NAME.NAMESPACE
    instance: str
    admin: str | None
    peer: str | None
    version: str | None = None
    connected: bool = True
    since: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"service": self.service, "instance": self.instance, "admin": self.admin,
                "peer": self.peer, "version": self.version, "connected": self.connected,
                "since": self.since}


class ControlPlane:
    """Sources in, snapshots out. Not thread-safe: everything runs on one event loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.current: ControlSnapshot | None = None
        self.last_error: dict | None = None
        self.errors_total = 0
        self.snapshots_total = 0
        self.files: LoadResult | None = None
        self.file_generation = 0
        self.discovered: list[dict] | None = None
        self.discovery_generation = 0
        self.uses_discovery = False
        self.registrations: dict[tuple[str, str, str], int] = {}
        self.proxies: dict[int, ProxyRecord] = {}
        self._next_watch = 0
        self._changed = asyncio.Event()
        self._encodings = EncodingCache()
        # The last valid version of each discovered object, and those invalid as they are.
        self._screening = Screening()
        # Objects rejected now, by what found them: the discovery's mapping, the screening.
        self._rejected: dict[str, list[Rejection]] = {"mapping": [], "screening": []}
        self._warned: set[str] = set()

    # -- sources --------------------------------------------------------------------------------

    def files_changed(self, result: LoadResult, generation: int) -> bool:
        """Take a new load of the files; return True when it is now in force."""
        if result.errors:
            self._refuse([str(e) for e in result.errors], "files")
            return False
        self.files, self.file_generation = result, generation
        return self._rebuild("files")

    def discovery_changed(self, documents: list[dict], generation: int) -> bool:
        """Take the documents a discovery source (Kubernetes) found; True when now in force."""
        self.uses_discovery = True
        self.discovered, self.discovery_generation = documents, generation
        return self._rebuild("discovery")

    def discovery_unmapped(self, rejected: list[Rejection]) -> None:
        """Take the objects a discovery source could not turn into documents at all (they are
        left out of what it reports); replaces the previous list."""
        self._set_rejected("mapping", list(rejected))

    @property
    def rejected(self) -> list[Rejection]:
        """The discovered objects not in force as they are now."""
        return [*self._rejected["mapping"], *self._rejected["screening"]]

    def register(self, namespace: str, service: str, instance: str, inbound_port: int) -> None:
        """Learn the inbound port of an instance's sidecar; rebuild when it is news.

        Not with discovery: in Kubernetes the destination's iptables rules hand connections to
        its sidecar, so callers dial the pod's own address and port."""
        if self.uses_discovery:
            return
        key = (namespace, service, instance)
        if self.registrations.get(key) == inbound_port:
            return
        self.registrations[key] = inbound_port
        if self.current is not None:
            self._rebuild("registration")

    def _rebuild(self, why: str) -> bool:
        if self.uses_discovery and self.discovered is None:
            return False  # wait for the first complete list before serving anything
        generation = (self.file_generation, self.discovery_generation) if self.uses_discovery \
            else (self.file_generation,)
        rejected: list[Rejection] = []
        try:
            if self.discovered:
                snapshot, rejected = build_discovered(self.files, self.discovered, self._screening,
                                                      self.registrations, generation, self._encodings)
            else:
                snapshot = build(self.files, (), self.registrations, generation, self._encodings)
        except ConfigError as exc:
            self._refuse([str(d) for d in exc.diagnostics] or [str(exc)], why)
            return False
        self._set_rejected("screening", rejected)
        if self.current is not None and snapshot.version == self.current.version:
            return True
        self.current = snapshot
        self.snapshots_total += 1
        log.info("configuration %s in force (%s; %d documents, %d services)", snapshot.version, why,
                 len(snapshot.documents), len(snapshot.snapshot.services))
        # Discovery rebuilds on every endpoint change: say each warning once, not every time.
        warnings = {str(w) for w in snapshot.snapshot.warnings}
        for warning in snapshot.snapshot.warnings:
            if str(warning) not in self._warned:
                log.warning("%s", warning)
        self._warned = warnings
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    def _set_rejected(self, source: str, rejected: list[Rejection]) -> None:
        """Make `rejected` the `source`'s rejections; log and count the ones that are new."""
        before = set(self._rejected[source])
        self._rejected[source] = rejected
        new = [r for r in rejected if r not in before]
        if new:
            self.errors_total += len(new)
            self.last_error = {"time": self.clock(), "source": "kubernetes", "errors": [str(r) for r in new]}
            for r in new:
                log.error("configuration from Kubernetes: %s", r)
        still = {(r.kind, r.namespace, r.name) for r in rejected}
        for r in sorted(before, key=str):
            if (r.kind, r.namespace, r.name) not in still:
                log.info("configuration from Kubernetes: %s %s/%s is no longer rejected", r.kind, r.namespace, r.name)

    def _refuse(self, errors: list[str], why: str) -> None:
        self.errors_total += 1
        self.last_error = {"time": self.clock(), "source": why, "errors": errors}
        keeping = self.current.version if self.current is not None else "none"
        log.error("configuration change refused; keeping version %s:\n  %s", keeping, "\n  ".join(errors))

    # -- watchers -------------------------------------------------------------------------------

    async def wait_for_change(self, held_version: str | None, timeout: float) -> ControlSnapshot | None:
        """Return the snapshot in force once its version differs from `held_version`, or None
        after `timeout` seconds without one."""
        current = self.current
        if current is not None and current.version != held_version:
            return current
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return None
        current = self.current
        return current if current is not None and current.version != held_version else None

    def proxy_connected(self, record: ProxyRecord) -> int:
        """Remember a watching proxy; return its watch id."""
        self._forget_old()
        self._next_watch += 1
        self.proxies[self._next_watch] = record
        return self._next_watch

    def proxy_disconnected(self, watch_id: int) -> None:
        record = self.proxies.get(watch_id)
        if record is not None:
            record.connected = False
            record.since = self.clock()

    def _forget_old(self) -> None:
        now = self.clock()
        for watch_id, record in list(self.proxies.items()):
            if not record.connected and now - record.since > FORGET_DISCONNECTED_AFTER:
                del self.proxies[watch_id]

    def proxies_json(self) -> list[dict]:
        """Every proxy watching now, and those that left recently (the same instance once)."""
        self._forget_old()
        latest: dict[tuple, ProxyRecord] = {}
        for record in self.proxies.values():
            key = (record.service, record.instance or record.peer)
            old = latest.get(key)
            if old is None or (record.connected, record.since) >= (old.connected, old.since):
                latest[key] = record
        return [r.to_json() for r in latest.values()]

    def config_json(self) -> dict:
        """The control plane's `/config`."""
        data = self.current.to_json() if self.current is not None else {"version": None}
        data["lastError"] = self.last_error
        data["rejected"] = [r.to_json() for r in self.rejected]
        data["errorsTotal"] = self.errors_total
        data["proxies"] = sum(1 for r in self.proxies.values() if r.connected)
        return data
