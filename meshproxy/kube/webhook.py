"""`meshproxy webhook`: the mutating admission webhook that injects the sidecar (spec §7).

The API server POSTs an AdmissionReview (admission.k8s.io/v1) to `/inject` over TLS for every
pod created in a namespace the MutatingWebhookConfiguration selects. The answer always allows
the pod; when `meshproxy.kube.inject.inject` changes it, the answer carries the difference as a
JSON Patch (RFC 6902), base64 in `response.patch` with `patchType: JSONPatch`.

Whether to inject is decided by `inject()` from the pod's annotation and its namespace's labels.
The review names the namespace but does not carry its labels, so they are looked up: from the
API server (`KubernetesNamespaces`, cached for a few seconds: a Deployment scaled to a hundred
replicas is one read, not a hundred) or from a fixed mapping (`StaticNamespaces`, for tests and
for running without a cluster).

Failing open: the configuration says `failurePolicy: Ignore`, and this server never blocks a pod
either. Anything that goes wrong while injecting (a namespace that cannot be read, a pod
`inject()` cannot handle) is logged and answered "allowed, unchanged", with a warning the user
sees in kubectl's output. Only a request that is not an AdmissionReview at all gets 400.

`GET /healthz` answers 200 for the kubelet's probes. The certificate and key files are read
again when they change (a mounted Secret is updated in place), so a renewed certificate is
served without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import ssl
import sys
import time
from typing import Any, Awaitable, Callable, Mapping, Protocol

import jsonpatch
from aiohttp import web

from meshproxy.kube.inject import InjectOptions, inject
from meshproxy.kube.sidecar import DEFAULT_CONTROL, DEFAULT_IMAGE

log = logging.getLogger("meshproxy.webhook")

DEFAULT_LISTEN = "0.0.0.0:15017"
ADMISSION_API_VERSION = "admission.k8s.io/v1"
# The API server's own limit on a request body is 3 MiB; a review holds the object twice at most.
MAX_REVIEW_BYTES = 8 * 1024 * 1024
NAMESPACE_CACHE_SECONDS = 5.0
CERT_RELOAD_SECONDS = 10.0

Clock = Callable[[], float]


class BadReview(ValueError):
    """The request body is not an AdmissionReview v1 with a request and its uid."""


class NamespaceLabels(Protocol):
    """Where the webhook learns a namespace's labels."""

    async def labels(self, namespace: str) -> Mapping[str, str] | None:
        """Return the labels of `namespace` (None when it is not known); may raise on failure."""


class StaticNamespaces:
    """Namespace labels from a mapping held in memory (tests; running outside a cluster)."""

    def __init__(self, namespaces: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.namespaces: dict[str, Mapping[str, str]] = dict(namespaces or {})

    async def labels(self, namespace: str) -> Mapping[str, str] | None:
        """Return the labels given for `namespace`, or None."""
        return self.namespaces.get(namespace)


class KubernetesNamespaces:
    """Namespace labels read from the API server (`get namespaces`), each kept for `ttl`
    seconds. A namespace that does not exist has no labels; other failures raise."""

    def __init__(self, api_client: Any, *, ttl: float = NAMESPACE_CACHE_SECONDS, clock: Clock = time.monotonic) -> None:
        from kubernetes_asyncio import client

        self._core = client.CoreV1Api(api_client)
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[str, tuple[float, Mapping[str, str] | None]] = {}

    async def labels(self, namespace: str) -> Mapping[str, str] | None:
        """Return the labels of `namespace` (cached); raises ApiException or OSError when the
        API server cannot be asked."""
        from kubernetes_asyncio.client.exceptions import ApiException

        now = self.clock()
        hit = self._cache.get(namespace)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            ns = await self._core.read_namespace(namespace)
            found: Mapping[str, str] | None = dict(ns.metadata.labels or {})
        except ApiException as exc:
            if exc.status != 404:
                raise
            found = None
        self._cache[namespace] = (now, found)
        return found


def _review_request(body: bytes) -> dict:
    """Return `request` of an AdmissionReview v1 body; raises BadReview."""
    try:
        review = json.loads(body)
    except ValueError as exc:
        raise BadReview(f"body is not JSON: {exc}") from None
    if not isinstance(review, dict):
        raise BadReview("body is not a JSON object")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != ADMISSION_API_VERSION:
        raise BadReview(f"expected kind AdmissionReview, apiVersion {ADMISSION_API_VERSION}; got kind "
                        f"{review.get('kind')!r}, apiVersion {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("AdmissionReview request has no uid")
    return request


def _response(uid: str, patch: list | None = None, warnings: list[str] | None = None) -> dict:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def _object(value: Any) -> dict:
    """`value` when it is a JSON object, else an empty one: a review's parts are read without
    trusting their types (anything the API server would not send means "not a pod")."""
    return value if isinstance(value, dict) else {}


def _is_pod_create(request: dict) -> bool:
    kind = _object(request.get("kind"))
    resource = _object(request.get("resource"))
    is_pod = (kind.get("group", "") == "" and kind.get("kind") == "Pod") or \
        (resource.get("group", "") == "" and resource.get("resource") == "pods")
    # A subresource (pods/ephemeralcontainers, pods/binding) is not the pod's creation.
    return is_pod and not request.get("subResource") and request.get("operation", "CREATE") == "CREATE"


def _pod_name(request: dict, pod: dict) -> str:
    meta = _object(pod.get("metadata"))
    name = meta.get("name") or request.get("name") or f"{meta.get('generateName') or ''}*"
    return f"{request.get('namespace') or meta.get('namespace') or '?'}/{name}"


class Injector:
    """Answers AdmissionReviews: the decision and the patch, independent of the HTTP server."""

    def __init__(self, namespaces: NamespaceLabels | None = None, options: InjectOptions | None = None) -> None:
        self.namespaces = namespaces
        self.options = options if options is not None else InjectOptions()

    async def review(self, body: bytes) -> dict:
        """Return the AdmissionReview answering `body`: always allowed, with a JSON Patch when
        the pod gets the sidecar. Raises BadReview when `body` is not an AdmissionReview v1."""
        request = _review_request(body)
        uid = request["uid"]
        pod = request.get("object")
        if not _is_pod_create(request) or not isinstance(pod, dict):
            return _response(uid)
        where = _pod_name(request, pod)
        warnings = []
        # Labels not known (no lookup, a namespace not found, a failed read) are no labels: the
        # pod's own annotation decides. Never None, which would tell inject() that the caller
        # chose the objects explicitly (`meshproxy inject`).
        labels: Mapping[str, str] = {}
        namespace = request.get("namespace") or _object(pod.get("metadata")).get("namespace")
        if namespace and self.namespaces is not None:
            try:
                labels = await self.namespaces.labels(namespace) or {}
            except Exception as exc:  # noqa: BLE001 - fail open: the pod is decided by its annotation
                log.warning("pod %s: cannot read the labels of namespace %s (%s); deciding from the "
                            "pod's annotation alone", where, namespace, exc)
                warnings.append(f"meshproxy: could not read namespace {namespace}'s labels; "
                                "injection decided from the pod's annotation alone")
        try:
            injected = inject(pod, namespace_labels=labels, options=self.options)
            patch = jsonpatch.make_patch(pod, injected).patch
        except Exception as exc:  # noqa: BLE001 - never block a pod: admit it as it is
            log.exception("pod %s: injection failed; admitted without the sidecar", where)
            return _response(uid, warnings=warnings + [f"meshproxy: sidecar not injected: {exc}"])
        if patch:
            log.info("pod %s: sidecar injected (%d patch operations)", where, len(patch))
        else:
            log.debug("pod %s: nothing to inject", where)
        return _response(uid, patch, warnings)


def build_app(injector: Injector) -> web.Application:
    """Return the webhook's aiohttp application: `POST /inject`, `GET /healthz`."""

    async def inject_handler(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            answer = await injector.review(body)
        except BadReview as exc:
            log.warning("refused a request to /inject from %s: %s", request.remote, exc)
            return web.Response(status=400, text=f"bad AdmissionReview: {exc}\n")
        return web.json_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app.router.add_post("/inject", inject_handler)
    app.router.add_get("/healthz", healthz)
    return app


class ReloadingTLS:
    """A server SSLContext whose certificate follows the files: when either file changes,
    the pair is loaded again (new connections get it; a pair that fails to load is logged and
    the one in use stays)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2  # the API server speaks 1.2 and 1.3
        self._stamp = self._mtimes()
        try:
            self.context.load_cert_chain(cert_file, key_file)
        except OSError as exc:  # ssl.SSLError is one too; a webhook without a certificate is no use
            raise OSError(f"cannot load the certificate {cert_file} with the key {key_file}: {exc}") from None

    def _mtimes(self) -> tuple[int, ...] | None:
        # The inode too: the kubelet renames new files into place (through the `..data` link).
        try:
            cert, key = os.stat(self.cert_file), os.stat(self.key_file)
        except OSError:
            return None
        return cert.st_mtime_ns, cert.st_ino, key.st_mtime_ns, key.st_ino

    def reload_if_changed(self) -> bool:
        """Load the files again when they changed since the last load; return True when a new
        pair is in use."""
        stamp = self._mtimes()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            # A Secret update writes both files; between them the pair may not match yet.
            log.warning("cannot load the new certificate %s (%s); keeping the one in use", self.cert_file, exc)
            self._stamp = None
            return False
        log.info("loaded the renewed certificate %s", self.cert_file)
        return True

    async def follow(self, interval: float = CERT_RELOAD_SECONDS) -> None:
        """Check the files every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


async def serve_webhook(cert_file: str, key_file: str, listen: str = DEFAULT_LISTEN, *,
                        namespaces: NamespaceLabels | None = None, options: InjectOptions | None = None,
                        stop: asyncio.Event | None = None, ready: Callable[[int], Awaitable[None] | None] | None = None,
                        reload_interval: float = CERT_RELOAD_SECONDS) -> int:
    """Serve the webhook over TLS on `listen` until SIGTERM/SIGINT (or `stop` is set); return 0.

    `ready(port)` is called once the port is open (port 0 in `listen` picks a free one).
    Raises OSError or ssl.SSLError when the certificate cannot be loaded or the port opened."""
    from meshproxy.control.run import parse_listen

    host, port = parse_listen(listen)
    tls = ReloadingTLS(cert_file, key_file)
    runner = web.AppRunner(build_app(Injector(namespaces, options)), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("meshproxy webhook listening on https://%s:%d/inject", host, bound)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
        except (RuntimeError, ValueError):  # not the main thread: the caller stops us with `stop`
            pass
    follower = asyncio.create_task(tls.follow(reload_interval))
    try:
        if ready is not None:
            result = ready(bound)
            if asyncio.iscoroutine(result):
                await result
        await stop.wait()
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        for signum in handled:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `webhook` with the `meshproxy` subparsers; return its parser."""
    p = subparsers.add_parser(
        "webhook",
        help="run the sidecar-injecting admission webhook",
        description="Serve the mutating admission webhook (AdmissionReview v1, HTTPS POST /inject) "
        "that injects the sidecar into pods as they are created, from the pod's "
        "meshproxy.io/inject annotation and its namespace's label. It never refuses a pod.",
    )
    p.add_argument("--tls-cert", required=True, metavar="FILE", help="serving certificate chain (PEM)")
    p.add_argument("--tls-key", required=True, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR",
                   help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--proxy-image", default=os.environ.get("MESHPROXY_PROXY_IMAGE", DEFAULT_IMAGE), metavar="IMAGE",
                   help="image of the injected proxy and init container (env MESHPROXY_PROXY_IMAGE; "
                   f"default {DEFAULT_IMAGE})")
    p.add_argument("--control", default=os.environ.get("MESHPROXY_CONTROL", DEFAULT_CONTROL), metavar="URL",
                   help=f"the control plane, as the injected proxies reach it (env MESHPROXY_CONTROL; "
                   f"default {DEFAULT_CONTROL})")
    p.add_argument("--no-native-sidecar", action="store_true",
                   help="inject the proxy as a classic container (clusters before Kubernetes 1.29)")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig for reading namespace labels (default: in-cluster)")
    p.add_argument("--no-kubernetes", action="store_true",
                   help="do not read namespaces: decide from pod annotations alone")
    p.add_argument("--log-level", default=os.environ.get("MESHPROXY_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    return p


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    """Return the injection options `meshproxy webhook`'s flags give."""
    return InjectOptions(proxy_image=args.proxy_image, control_url=args.control,
                         native_sidecar=not args.no_native_sidecar)


async def _run(args: argparse.Namespace) -> int:
    api_client = None
    namespaces: NamespaceLabels | None = None
    if not args.no_kubernetes:
        try:
            from meshproxy.control.kubernetes import make_api_client

            api_client = await make_api_client(args.kubeconfig)
            namespaces = KubernetesNamespaces(api_client)
        except Exception as exc:  # noqa: BLE001 - no cluster: still useful with pod annotations
            log.warning("namespace labels cannot be read (%s); deciding from pod annotations alone", exc)
    try:
        return await serve_webhook(args.tls_cert, args.tls_key, args.listen, namespaces=namespaces,
                                   options=options_from_args(args))
    finally:
        if api_client is not None:
            await api_client.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of `meshproxy webhook`; return the exit code (0; 1 when the certificate
    cannot be loaded or the port opened; 2 on a bad --listen)."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from meshproxy.control.run import parse_listen

    try:
        parse_listen(args.listen)
    except ValueError as exc:
        print(f"meshproxy webhook: --listen: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (OSError, ssl.SSLError) as exc:
        print(f"meshproxy webhook: {exc}", file=sys.stderr)
        return 1
