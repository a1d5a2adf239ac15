"""Discovery from a Kubernetes API server: list + watch of Services, EndpointSlices, Pods,
Namespaces, HTTPRoutes, GRPCRoutes and the meshproxy.io kinds, turned into configuration documents.

Each kind (in each watched namespace) follows the API server's list-then-watch contract
(https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes):
list, then watch from the list's resourceVersion, and when a watch ends, watch again from the
last resourceVersion seen. `410 Gone` (that version is compacted away) means list again. Errors
and dropped connections are retried with capped, fully jittered exponential backoff; the
watch then resumes from where it was, so nothing in between is lost.

A kind whose CRD is not installed (404: HTTPRoute, GRPCRoute, the meshproxy.io kinds) is logged once,
treated as empty and asked for again every `backoff_max` seconds; so are Namespaces when the
control plane may not read them (403). Anything else (a kind it may not read, 5xx, no
connection) is retried with backoff, and until every kind has been listed once nothing is
published: a Mesh without endpoints would tell every proxy that every Service is empty, and
policies taken as absent because they could not be read would open what they close.

`on_change(documents, generation)` is called once all kinds are listed, then after each
burst of changes (collected for `debounce` seconds) whose documents differ from the last ones
published. `generation` is the highest resourceVersion seen (see `ClusterState`).
`on_rejected(rejections)`, when given, is called before it whenever the list of Services and
EndpointSlices that cannot be mapped (and are left out of the documents) changes. Whether the
documents themselves are valid is for the receiver to judge, object by object
(meshproxy.control.screening.build_discovered).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from meshproxy.config.model.common import DEFAULT_TRUST_DOMAIN
from meshproxy.control.clusterstate import ClusterState
from meshproxy.control.kubeobjects import documents_from_cluster
from meshproxy.control.screening import Rejection

log = logging.getLogger(__name__)

OnChange = Callable[[list[dict], int], None]
OnRejected = Callable[[list[Rejection]], None]


@dataclass(frozen=True)
class Resource:
    """One kind the discovery follows and how kubernetes_asyncio lists it."""

    kind: str
    api: str  # CoreV1Api, DiscoveryV1Api or CustomObjectsApi
    group: str
    version: str
    plural: str
    namespaced: bool = True
    # Statuses of a list that mean "there are none" rather than "try again".
    absent_when: tuple[int, ...] = ()

    def list_function(self, api_client: client.ApiClient, namespace: str | None) -> Callable[..., Any]:
        """Return the kubernetes_asyncio function that lists (and, with watch=True, watches)
        this kind in `namespace` (None: every namespace, or a cluster-scoped kind)."""
        api = getattr(client, self.api)(api_client)
        if self.api == "CustomObjectsApi":
            if namespace is None:
                return _bind(api.list_cluster_custom_object, self.group, self.version, self.plural)
            return _bind(api.list_namespaced_custom_object, self.group, self.version, namespace, self.plural)
        snake = {"EndpointSlice": "endpoint_slice"}.get(self.kind, self.kind.lower())
        if not self.namespaced:
            return getattr(api, f"list_{snake}")
        if namespace is None:
            return getattr(api, f"list_{snake}_for_all_namespaces")
        return _bind(getattr(api, f"list_namespaced_{snake}"), namespace)


def _bind(function: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    def bound(**kwargs: Any) -> Any:
        return function(*args, **kwargs)
    return bound


RESOURCES = (
    Resource("Service", "CoreV1Api", "", "v1", "services"),
    Resource("EndpointSlice", "DiscoveryV1Api", "discovery.k8s.io", "v1", "endpointslices"),
    Resource("Pod", "CoreV1Api", "", "v1", "pods"),
    # Namespaces do not shape the documents: one the RBAC rules hide is harmless.
    Resource("Namespace", "CoreV1Api", "", "v1", "namespaces", namespaced=False, absent_when=(403, 404)),
    # A CRD that is not installed has no objects. 403 is not absence: taking an unreadable
    # AuthorizationPolicy for none would open what it closes.
    Resource("HTTPRoute", "CustomObjectsApi", "gateway.networking.k8s.io", "v1", "httproutes", absent_when=(404,)),
    Resource("GRPCRoute", "CustomObjectsApi", "gateway.networking.k8s.io", "v1", "grpcroutes", absent_when=(404,)),
    Resource("TrafficPolicy", "CustomObjectsApi", "meshproxy.io", "v1alpha1", "trafficpolicies",
             absent_when=(404,)),
    Resource("PeerAuthentication", "CustomObjectsApi", "meshproxy.io", "v1alpha1", "peerauthentications",
             absent_when=(404,)),
    Resource("AuthorizationPolicy", "CustomObjectsApi", "meshproxy.io", "v1alpha1", "authorizationpolicies",
             absent_when=(404,)),
)


class _Absent(Exception):
    """A kind the API server does not serve (its CRD is not installed), or Namespaces we may not read."""


async def make_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """Return an ApiClient for the cluster: from `kubeconfig` when given; else the pod's
    service account when running in a cluster; else `$KUBECONFIG` (files separated by `:`)
    or `~/.kube/config`.

    The caller closes it. Raises kubernetes_asyncio.config.ConfigException when none is usable.
    """
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    files = kubeconfig or os.environ.get("KUBECONFIG") or os.path.join("~", ".kube", "config")
    if not any(os.path.exists(os.path.expanduser(f)) for f in files.split(os.pathsep) if f):
        context = "" if kubeconfig else "not running in a cluster, and "
        raise config.ConfigException(f"{context}no kubeconfig file at {files}")
    # persist_config=False: a token refresh must not rewrite the user's file.
    await config.load_kube_config(config_file=files, client_configuration=configuration, persist_config=False)
    return client.ApiClient(configuration)


async def _read_json(response: aiohttp.ClientResponse) -> dict:
    """The JSON body of a list response; raises ApiException for a status other than 2xx."""
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=body.decode("utf-8", "replace")[:500])
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("list response is not a JSON object")
    return data


class KubernetesDiscovery:
    """Follows the API server and reports the configuration documents it implies."""

    def __init__(
        self,
        api_client: client.ApiClient,
        on_change: OnChange,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        namespaces: list[str] | None = None,
        debounce: float = 0.1,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        watch_timeout: int = 300,
        page_size: int = 500,
        rng: random.Random | None = None,
        on_rejected: OnRejected | None = None,
    ) -> None:
        """`namespaces`: watch only these (None: all). `watch_timeout`: seconds the API server
        keeps one watch open before it is renewed. `page_size`: objects per list request.
        `rng`: jitter of the backoff. `on_rejected`: see the module's docstring."""
        self.api_client = api_client
        self.on_change = on_change
        self.on_rejected = on_rejected
        self._unmapped: list[Rejection] = []
        self.trust_domain = trust_domain
        self.namespaces = list(namespaces) if namespaces else None
        self.debounce = debounce
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.rng = rng or random.Random()
        self.state = ClusterState()
        self._scopes = [(r, ns) for r in RESOURCES
                        for ns in (self.namespaces if r.namespaced and self.namespaces else [None])]
        self._listed: set[tuple[str, str | None]] = set()
        self._all_listed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._published: list[dict] | None = None

    async def run(self) -> None:
        """Follow the API server until cancelled (cancelling stops every watch and returns by
        raising CancelledError). Does not return otherwise: every error is retried."""
        async with asyncio.TaskGroup() as tasks:
            for resource, namespace in self._scopes:
                tasks.create_task(self._follow(resource, namespace))
            tasks.create_task(self._publish_loop())

    # Publishing.

    async def _publish_loop(self) -> None:
        await self._all_listed.wait()
        while True:
            self._dirty.clear()
            self._publish()
            await self._dirty.wait()
            # Let the rest of a burst (a rollout touches slices, pods and routes) arrive.
            await asyncio.sleep(self.debounce)

    def _publish(self) -> None:
        rejected: list[Rejection] = []
        try:
            documents = documents_from_cluster(self.state, trust_domain=self.trust_domain, rejected=rejected)
        except Exception:  # a bug in the mapping must not end discovery: the next change may map
            log.exception("the objects from Kubernetes could not be turned into configuration")
            return
        if rejected != self._unmapped:
            self._unmapped = rejected
            if self.on_rejected is not None:
                try:
                    self.on_rejected(list(rejected))
                except Exception:
                    log.exception("the objects from Kubernetes that cannot be mapped were not taken")
        if documents == self._published:
            return
        self._published = documents
        try:
            self.on_change(documents, self.state.resource_version())
        except Exception:
            log.exception("the configuration from Kubernetes was not taken")

    def _listed_once(self, resource: Resource, namespace: str | None) -> None:
        self._listed.add((resource.kind, namespace))
        if len(self._listed) == len(self._scopes):
            self._all_listed.set()

    # One kind in one namespace.

    async def _follow(self, resource: Resource, namespace: str | None) -> None:
        where = f"{resource.plural}" + (f" in namespace {namespace}" if namespace else "")
        version: str | None = None
        failures = 0
        absent_logged = False
        while True:
            try:
                if version is None:
                    version = await self._list(resource, namespace)
                    if absent_logged:
                        log.info("kubernetes: %s can be read now", where)
                        absent_logged = False
                started = asyncio.get_running_loop().time()
                version, events = await self._watch(resource, namespace, version)
                if events or asyncio.get_running_loop().time() - started >= 1.0:
                    failures = 0
                    continue
                # A watch that ends at once without news: do not ask again in a tight loop.
                failures += 1
            except _Absent as exc:
                if not absent_logged:
                    log.warning("kubernetes: cannot read %s (%s); taken as empty, asked again every %gs",
                                where, exc, self.backoff_max)
                    absent_logged = True
                version, failures = None, 0
                await asyncio.sleep(self.backoff_max)
                continue
            except ApiException as exc:
                failures += 1
                if exc.status == 410:
                    log.info("kubernetes: resourceVersion of %s expired; listing again", where)
                    version = None
                    if failures == 1:
                        continue  # list at once; back off only if it keeps happening
                else:
                    log.warning("kubernetes: %s: HTTP %s %s", where, exc.status, (exc.reason or "").strip()[:200])
                if exc.status in (403, 404):
                    version = None  # gone or forbidden since: a list tells which (and _Absent)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                failures += 1
                log.warning("kubernetes: %s: %s: %s", where, type(exc).__name__, exc)
            except Exception:
                failures += 1
                log.exception("kubernetes: %s: unexpected error", where)
            await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(failures-1))]."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** min(failures - 1, 30))
        return self.rng.uniform(0, ceiling)

    async def _list(self, resource: Resource, namespace: str | None) -> str | None:
        """List the kind (page by page) into the state; return the list's resourceVersion.
        Raises _Absent for an optional kind that cannot be read, ApiException otherwise."""
        function = resource.list_function(self.api_client, namespace)
        items: list[dict] = []
        version: str | None = None
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False,
                                      "_request_timeout": aiohttp.ClientTimeout(total=60)}
            if token:
                kwargs["_continue"] = token
            try:
                page = await _read_json(await function(**kwargs))
            except ApiException as exc:
                if exc.status in resource.absent_when:
                    changed = self.state.replace(resource.kind, [], namespace=namespace)
                    self._changed(resource, namespace, changed)
                    raise _Absent(f"HTTP {exc.status}") from exc
                raise
            items.extend(i for i in page.get("items") or () if isinstance(i, dict))
            meta = page.get("metadata") or {}
            # Every page of one list is the same snapshot: the first page's version is the list's.
            version = version or meta.get("resourceVersion")
            token = meta.get("continue")
            if not token:
                break
        changed = self.state.replace(resource.kind, items, namespace=namespace, resource_version=version)
        self._changed(resource, namespace, changed)
        return version

    def _changed(self, resource: Resource, namespace: str | None, changed: bool) -> None:
        self._listed_once(resource, namespace)
        if changed:
            self._dirty.set()

    async def _watch(self, resource: Resource, namespace: str | None, version: str | None) -> tuple[str | None, int]:
        """Watch from `version` until the API server ends the watch; return the last
        resourceVersion seen and how many events came. Raises ApiException (410: list again)."""
        function = resource.list_function(self.api_client, namespace)
        events = 0
        # return_type "object": events keep the API server's JSON (camelCase) as they are.
        async with watch.Watch(return_type="object") as stream:
            kwargs: dict[str, Any] = {
                "allow_watch_bookmarks": True,
                "timeout_seconds": self.watch_timeout,
                # The API server ends the watch after timeout_seconds; a connection silent well
                # past that is dead even if TCP has not noticed.
                "_request_timeout": aiohttp.ClientTimeout(connect=30, sock_read=self.watch_timeout + 30),
            }
            if version:
                kwargs["resource_version"] = version
            async for event in stream.stream(function, **kwargs):
                if not isinstance(event, dict) or not isinstance(event.get("raw_object"), dict):
                    raise ValueError(f"unexpected watch line: {str(event)[:200]}")
                obj = event["raw_object"]
                if self.state.apply_event(event.get("type"), obj, resource.kind):
                    self._dirty.set()
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                events += 1
        return version, events
