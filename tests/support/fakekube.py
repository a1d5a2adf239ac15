"""A stand-in for the Kubernetes API server, at the HTTP boundary, for tests of discovery.

No Kubernetes API server runs on the test machines, so this one speaks the part of its HTTP
API that a list + watch client uses, the way the real one does:

- `GET /api/v1/{plural}`, `/api/v1/namespaces/{ns}/{plural}`, `/apis/{group}/{version}/...`
  answer a `{Kind}List` with `metadata.resourceVersion` (and `continue` when `limit` cuts it);
  items of built-in kinds come without apiVersion/kind, custom resources with them.
- `?watch=1` streams JSON lines `{"type": ADDED|MODIFIED|DELETED, "object": ...}` from
  `resourceVersion` on (or the current objects as ADDED when it is absent or "0"), until
  `timeoutSeconds`; a resourceVersion older than the last compaction gets an `ERROR` event
  with a 410 `Expired` Status, as the API server's watch cache sends it.
- A resource whose CRD is not installed answers 404 with a Status.

Every object change gets the next resourceVersion from one counter, as etcd's revision.
`drop_watches()` ends every watch (as an API server rolling over does), `stop()` aborts the
connections and closes the port (a crash), `start()` opens the same port again.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field

from aiohttp import web

BUILTIN = {
    # kind: (group, version, plural, namespaced)
    "Service": ("", "v1", "services", True),
    "Pod": ("", "v1", "pods", True),
    "Namespace": ("", "v1", "namespaces", False),
    "EndpointSlice": ("discovery.k8s.io", "v1", "endpointslices", True),
}
CUSTOM = {
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes", True),
    "TrafficPolicy": ("meshproxy.io", "v1alpha1", "trafficpolicies", True),
    "PeerAuthentication": ("meshproxy.io", "v1alpha1", "peerauthentications", True),
    "AuthorizationPolicy": ("meshproxy.io", "v1alpha1", "authorizationpolicies", True),
}


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass(eq=False)  # each one is itself, held in a set
class _Watcher:
    plural: str
    namespace: str | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    transport: asyncio.Transport | None = None


class FakeKubeAPI:
    """The fake API server; `crds` names the custom kinds that are installed."""

    def __init__(self, crds: tuple[str, ...] = tuple(CUSTOM)) -> None:
        self.kinds = {**BUILTIN, **{k: v for k, v in CUSTOM.items() if k in crds}}
        self.by_path = {(g, v, p): kind for kind, (g, v, p, _) in self.kinds.items()}
        self.objects: dict[str, dict[tuple[str, str], dict]] = {kind: {} for kind in self.kinds}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.revision = 1
        self.compacted = 0
        self.watchers: set[_Watcher] = set()
        self.lists: list[str] = []  # path of every list request, in order
        self.watches: list[str] = []  # path?resourceVersion of every watch request
        self.not_found: list[str] = []  # path of every request for a resource not served
        self.forbidden: set[str] = set()  # kinds the caller may not read (403), as RBAC would say
        self.refused: list[str] = []  # path of every request answered 403
        self.gone_sent = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    # Serving.

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Listen (on the same port as before, after a stop); return the base URL."""
        app = web.Application()
        app.router.add_get("/api/{version}/{plural}", self._handle)
        app.router.add_get("/api/{version}/namespaces/{namespace}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/namespaces/{namespace}/{plural}", self._handle)
        # handler_cancellation: a watch whose client went away ends, as on the real server.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        """Abort every open watch connection mid-stream and close the port."""
        for w in list(self.watchers):
            if w.transport is not None:
                w.transport.abort()
            w.queue.put_nowait(None)
        self.watchers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def drop_watches(self) -> None:
        """End every open watch cleanly, as the API server does when a watch times out."""
        for w in list(self.watchers):
            w.queue.put_nowait(None)
        self.watchers.clear()

    def uninstall(self, kind: str) -> None:
        """Remove a custom kind (its CRD deleted): its objects go, requests for it get 404."""
        group, version, plural, _ = self.kinds.pop(kind)
        del self.by_path[(group, version, plural)]
        del self.objects[kind]

    def compact(self) -> None:
        """Forget the history: a watch from any older resourceVersion now gets 410 Gone."""
        self.compacted = self.revision
        self.history.clear()

    # Changing objects.

    def apply(self, obj: dict) -> dict:
        """Create or replace `obj` (its kind, namespace, name); return it as stored."""
        kind = obj["kind"]
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "default") if self.kinds[kind][3] else "", meta["name"])
        if self.kinds[kind][3]:
            meta["namespace"] = key[0]
        group, version = self.kinds[kind][:2]
        obj["apiVersion"] = f"{group}/{version}" if group else version
        self.revision += 1
        meta["resourceVersion"] = str(self.revision)
        meta.setdefault("uid", f"uid-{kind}-{key[0]}-{key[1]}")
        meta.setdefault("creationTimestamp", "2024-05-01T10:00:00Z")
        event = "MODIFIED" if key in self.objects[kind] else "ADDED"
        self.objects[kind][key] = copy.deepcopy(obj)
        self._emit(kind, event, obj)
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete an object (it must exist)."""
        obj = self.objects[kind].pop((namespace if self.kinds[kind][3] else "", name))
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self._emit(kind, "DELETED", obj)

    def _emit(self, kind: str, event: str, obj: dict) -> None:
        self.history.append((self.revision, kind, event, copy.deepcopy(obj)))
        plural = self.kinds[kind][2]
        for w in self.watchers:
            if w.plural == plural and (w.namespace is None or w.namespace == obj["metadata"].get("namespace")):
                w.queue.put_nowait({"type": event, "object": copy.deepcopy(obj)})

    # HTTP.

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        group = info.get("group", "")
        kind = self.by_path.get((group, info["version"], info["plural"]))
        if kind is None:
            self.not_found.append(request.path)
            return web.json_response(_status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)
        namespace = info.get("namespace")
        if kind in self.forbidden:
            self.refused.append(request.path)
            plural = self.kinds[kind][2]
            return web.json_response(_status(403, "Forbidden", f'{plural} is forbidden: User "system:serviceaccount:'
                                             f'meshproxy-system:meshproxy" cannot list resource "{plural}"'),
                                     status=403)
        # Go's strconv.ParseBool, as the API server reads it.
        if request.query.get("watch") in ("1", "t", "T", "true", "TRUE", "True"):
            return await self._watch(request, kind, namespace)
        return self._list(request, kind, namespace)

    def _visible(self, kind: str, namespace: str | None) -> list[dict]:
        return [copy.deepcopy(o) for key, o in sorted(self.objects[kind].items())
                if namespace is None or key[0] == namespace]

    def _list(self, request: web.Request, kind: str, namespace: str | None) -> web.Response:
        self.lists.append(request.path)
        items = self._visible(kind, namespace)
        if kind in BUILTIN:
            for item in items:
                item.pop("apiVersion", None)
                item.pop("kind", None)
        start = int(request.query.get("continue") or 0)
        limit = int(request.query.get("limit") or 0)
        end = start + limit if limit else len(items)
        group, version = self.kinds[kind][:2]
        meta: dict = {"resourceVersion": str(self.revision)}
        if end < len(items):
            meta["continue"] = str(end)
        return web.json_response({"kind": f"{kind}List", "apiVersion": f"{group}/{version}" if group else version,
                                  "metadata": meta, "items": items[start:end]})

    async def _watch(self, request: web.Request, kind: str, namespace: str | None) -> web.StreamResponse:
        since = request.query.get("resourceVersion") or "0"
        self.watches.append(f"{request.path}?resourceVersion={since}")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        watcher = _Watcher(self.kinds[kind][2], namespace, transport=request.transport)
        if since == "0":
            backlog = [{"type": "ADDED", "object": o} for o in self._visible(kind, namespace)]
        elif int(since) < self.compacted:
            self.gone_sent += 1
            message = f"too old resource version: {since} ({self.compacted})"
            await response.write(_line({"type": "ERROR", "object": _status(410, "Expired", message)}))
            return response
        else:
            backlog = [{"type": t, "object": copy.deepcopy(o)} for rv, k, t, o in self.history
                       if k == kind and rv > int(since)
                       and (namespace is None or o["metadata"].get("namespace") == namespace)]
        self.watchers.add(watcher)
        try:
            for event in backlog:
                await response.write(_line(event))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if event is None:
                    break
                await response.write(_line(event))
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away, or the connection was aborted by stop()
        finally:
            self.watchers.discard(watcher)
        return response

    @property
    def open_watches(self) -> int:
        """How many watch streams are open now."""
        return len(self.watchers)


def _line(event: dict) -> bytes:
    return json.dumps(event).encode() + b"\n"
