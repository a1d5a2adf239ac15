"""`meshproxy control`: watch the configuration sources, serve the proxies' API until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from meshproxy.config.duration import parse_duration
from meshproxy.config.model import Mesh
from meshproxy.config.model.mesh import join_host_port
from meshproxy.config.watch import ConfigWatcher
from meshproxy.control.api import build_app
from meshproxy.control.plane import ControlPlane

log = logging.getLogger("meshproxy.control")
DEFAULT_LISTEN = ("127.0.0.1", 15010)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses) to (host, port); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


async def _follow_files(plane: ControlPlane, watcher: ConfigWatcher) -> None:
    async for result in watcher.changes():
        plane.files_changed(result, watcher.generation())


async def _follow_kubernetes(plane: ControlPlane, kubeconfig: str | None, trust_domain: str) -> None:
    from meshproxy.control.kubernetes import KubernetesDiscovery, make_api_client

    api = await make_api_client(kubeconfig)
    try:
        discovery = KubernetesDiscovery(api, plane.discovery_changed, trust_domain=trust_domain,
                                        on_rejected=plane.discovery_unmapped)
        await discovery.run()
    finally:
        await api.close()


def _trust_domain(paths: list[str]) -> str:
    from meshproxy.config import load

    mesh = next((r for r in load(paths).resources if isinstance(r, Mesh)), None) if paths else None
    return mesh.trust_domain if mesh is not None else "cluster.local"


def _cluster_ca(api_client, trust_domain: str, verifiers: list, *, recheck_every: float,
                backoff_max: float):
    """Return (a CASlot the certificate endpoints sign from, a function that starts the
    coroutine that fills it).

    The coroutine reads or creates the CA Secret, then keeps the webhook's certificate and
    caBundle current (meshproxy.kube.bootstrap.maintain); the TokenReview check joins
    `verifiers` once the CA, and with it the trust domain it signs for, is known."""
    import os
    import random

    from meshproxy.control.ca_api import CASlot
    from meshproxy.identity.tokens import TokenReviewer
    from meshproxy.kube.bootstrap import Names, maintain

    slot = CASlot(problem="the CA Secret has not been read yet")

    def loaded(ca) -> None:
        verifiers.append(TokenReviewer(api_client, ca.trust_domain).verify)
        slot.ca = ca  # last: a request that sees the CA also finds the verifier

    def problem(text: str) -> None:
        slot.problem = text

    names = Names(namespace=os.environ.get("POD_NAMESPACE", Names.namespace))
    return slot, lambda: maintain(api_client, trust_domain=trust_domain, names=names, on_ca=loaded,
                                  on_problem=problem, rng=random.Random(), recheck_every=recheck_every,
                                  backoff_max=backoff_max)


def _log_failure(task: asyncio.Task) -> None:
    """Say so when a background task ends with an error (they are meant to run until stopped)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped", task.get_name(), exc_info=task.exception())


def _verifier(verifiers: list):
    """One credential check from several: the first that proves an identity wins."""
    async def verify(token: str) -> str | None:
        for check in verifiers:
            identity = await check(token)
            if identity is not None:
                return identity
        return None
    return verify


async def serve_control(paths: list[str], listen: str | None = None, *, kubernetes: bool = False,
                        kubeconfig: str | None = None, stop: asyncio.Event | None = None,
                        ca_dir: str | None = None, tokens_dir: str | None = None,
                        cert_lifetime: float = 86_400.0, webhook_recheck_every: float | None = None,
                        ca_retry_max: float | None = None) -> int:
    """Run the control plane until SIGTERM/SIGINT (or `stop` is set); return the exit code:
    0, or 1 when the configuration given at start is invalid.

    In a cluster without `ca_dir`: `webhook_recheck_every` is how often the webhook's
    certificate and caBundle are checked, `ca_retry_max` the longest wait between two attempts
    at the CA (defaults: meshproxy.kube.bootstrap's)."""
    plane = ControlPlane()
    ca, verifiers, review_client = None, [], None
    background = []
    if ca_dir is None and kubernetes:
        # In a cluster the CA lives in a Secret the first replica creates (with the webhook's
        # serving certificate and its caBundle), so `kubectl apply -k deploy/` is the whole
        # installation. It is set up in the background: configuration is served meanwhile, and
        # certificate requests are answered 503 until the CA is there.
        from meshproxy.control.kubernetes import make_api_client
        from meshproxy.kube import bootstrap

        review_client = await make_api_client(kubeconfig)
        ca, setup = _cluster_ca(review_client, _trust_domain(paths), verifiers,
                                recheck_every=webhook_recheck_every or bootstrap.RECHECK_EVERY,
                                backoff_max=ca_retry_max or bootstrap.BACKOFF_MAX)
        background.append(("the CA and webhook certificate set-up", setup))
    if ca_dir is not None:
        from meshproxy.identity.ca import CertificateAuthority
        from meshproxy.identity.tokens import BootstrapTokens, TokenReviewer

        ca = CertificateAuthority.load(ca_dir)
        if tokens_dir is not None:
            verifiers.append(BootstrapTokens.load(tokens_dir, ca.trust_domain).verify)
        if kubernetes:
            from meshproxy.control.kubernetes import make_api_client

            review_client = await make_api_client(kubeconfig)
            verifiers.append(TokenReviewer(review_client, ca.trust_domain).verify)
    watcher = ConfigWatcher(paths) if paths else None
    mesh: Mesh | None = None
    if watcher is not None:
        result = watcher.load()
        if result.errors:
            for error in result.errors:
                print(error, file=sys.stderr)
            if review_client is not None:
                await review_client.close()
            return 1
        mesh = next((r for r in result.resources if isinstance(r, Mesh)), None)
        if kubernetes:
            plane.uses_discovery = True
        plane.files_changed(result, watcher.generation())
    if listen:
        host, port = parse_listen(listen)
    elif mesh is not None:
        host, port = mesh.control_plane.host, mesh.control_plane.port
    else:
        host, port = DEFAULT_LISTEN
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if watcher is not None:
        background.append(("following the files", lambda: _follow_files(plane, watcher)))
    if kubernetes:
        trust_domain = mesh.trust_domain if mesh is not None else "cluster.local"
        background.append(("discovery from Kubernetes", lambda: _follow_kubernetes(plane, kubeconfig, trust_domain)))
    tasks = [asyncio.create_task(start(), name=name) for name, start in background]
    for task in tasks:
        task.add_done_callback(_log_failure)
    # Watches are endless streams: give them a second to notice the end, then cut them.
    app = build_app(plane, ca=ca, verify=_verifier(verifiers), cert_lifetime=cert_lifetime)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    # A restarted control plane is reconnected to by every proxy at once: aiohttp's default
    # backlog of 128 drops most of a thousand.
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    log.info("meshproxy control listening on %s (version %s)", join_host_port(host, port),
             plane.current.version if plane.current else "none yet")
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        if review_client is not None:
            await review_client.close()
    return 0


def run_control(args) -> int:
    """Entry point of `meshproxy control` (parsed arguments from meshproxy.cli)."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # we log what a change did instead
    if not args.config and not args.kubernetes:
        print("meshproxy control: give --config PATH... and/or --kubernetes", file=sys.stderr)
        return 2
    try:
        if args.listen:
            parse_listen(args.listen)
        lifetime = parse_duration(args.cert_lifetime)
    except ValueError as exc:
        print(f"meshproxy control: {exc}", file=sys.stderr)
        return 2
    if lifetime < 5:
        print("meshproxy control: --cert-lifetime must be at least 5s (certificate times have "
              "one-second resolution)", file=sys.stderr)
        return 2
    if args.tokens_dir and not args.ca_dir:
        print("meshproxy control: --tokens-dir needs --ca-dir", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(serve_control(list(args.config or []), args.listen, kubernetes=args.kubernetes,
                                    kubeconfig=args.kubeconfig, ca_dir=args.ca_dir,
                                    tokens_dir=args.tokens_dir, cert_lifetime=lifetime))
