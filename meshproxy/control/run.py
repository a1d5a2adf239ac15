"""`meshproxy control`: watch the configuration sources, serve the proxies' API until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

from aiohttp import web

from meshproxy.config.duration import parse_duration
from meshproxy.config.model import Mesh
from meshproxy.config.model.mesh import join_host_port
from meshproxy.config.watch import ConfigWatcher
from meshproxy.control.api import build_app
from meshproxy.control.plane import ControlPlane

log = logging.getLogger("meshproxy.control")
DEFAULT_LISTEN = ("127.0.0.1", 15010)
CA_RELOAD_EVERY = 10.0  # seconds between looks at the --ca-dir files (three stat calls)
DUE_WARNING_EVERY = 86400.0  # an issuer due for renewal, or a trust anchor near its end, is said this often


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

    The coroutine reads or creates the CA Secret, then keeps its issuer, the webhook's
    certificate and caBundle current (meshproxy.kube.maintain.maintain), putting each issuer
    newly in force in the slot; the TokenReview check joins `verifiers` once the CA, and with
    it the trust domain it signs for, is known."""
    import random

    from meshproxy.control.ca_api import CASlot
    from meshproxy.identity.tokens import TokenReviewer
    from meshproxy.kube.bootstrap import Names
    from meshproxy.kube.maintain import maintain

    slot = CASlot(problem="the CA Secret has not been read yet")

    def loaded(ca) -> None:
        # Called again with each renewed issuer (same root, same trust domain): one verifier.
        if slot.ca is None:
            verifiers.append(TokenReviewer(api_client, ca.trust_domain).verify)
        slot.ca = ca  # last: a request that sees the CA also finds the verifier

    def problem(text: str) -> None:
        slot.problem = text

    names = Names(namespace=os.environ.get("POD_NAMESPACE", Names.namespace))
    return slot, lambda: maintain(api_client, trust_domain=trust_domain, names=names, on_ca=loaded,
                                  on_problem=problem, rng=random.Random(), recheck_every=recheck_every,
                                  backoff_max=backoff_max)


class CAFolder:
    """The CA of a `--ca-dir` folder, kept in `slot`: loaded again when its files change (as
    `meshproxy ca renew-issuer` changes them), and a warning once a day while the issuer is due
    for renewal, an error while the trust anchor nears its end. The control plane never writes
    into an operator's folder: renewing is the operator's command to run."""

    FILES = ("root.crt", "issuer.crt", "issuer.key")

    def __init__(self, folder: str, slot, *, clock=time.time) -> None:
        self.folder = folder
        self.slot = slot
        self.clock = clock
        self._unreadable: str | None = None  # why the files could not be looked at, once said
        self._stamp = self._files()
        self._warned_at: float | None = None

    def _files(self) -> tuple[int, ...] | None:
        # The inode too: renew-issuer renames new files into place; and the ctime, so that a
        # chmod or chown that makes a refused file readable is a change to load again.
        try:
            stats = [os.stat(os.path.join(self.folder, name)) for name in self.FILES]
        except OSError as exc:
            if str(exc) != self._unreadable:
                self._unreadable = str(exc)
                log.warning("cannot look at the CA files in %s (%s); keeping the CA in use", self.folder, exc)
            return None
        self._unreadable = None
        return tuple(x for st in stats for x in (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))

    def check(self) -> bool:
        """Load the CA again when its files changed since the last load, then warn when due;
        return True when a new CA is in force. A folder that does not load (a pair caught
        between two renames, a file missing) is logged and the CA in use stays."""
        from meshproxy.identity.ca import CertificateAuthority, describe
        from meshproxy.identity.spiffe import IdentityError

        changed = False
        stamp = self._files()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            old = self.slot.ca
            try:
                ca = CertificateAuthority.load(self.folder, clock=old.clock)
            except (IdentityError, OSError) as exc:
                # Said once per change: the stamp is kept, so a folder caught between the two
                # renames of renew-issuer is loaded again once the second one changes it.
                log.warning("cannot load the CA in %s again (%s); keeping issuer %s", self.folder, exc,
                            describe(old.issuer))
                ca = old
            if ca.trust_domain != old.trust_domain:
                log.error("the CA in %s is for trust domain %s, not %s: keeping the one in use; restart the "
                          "control plane to change trust domain", self.folder, ca.trust_domain, old.trust_domain)
            elif ca.issuer != old.issuer or ca.root != old.root:
                if ca.root != old.root:
                    log.warning("the trust anchor in %s changed (%s): proxies that hold the old one refuse "
                                "certificates of the new one until they renew theirs", self.folder, describe(ca.root))
                self.slot.ca = ca
                self._warned_at = None
                changed = True
                log.info("the issuer in force is now %s (from %s; was %s)", describe(ca.issuer), self.folder,
                         describe(old.issuer))
        self._warn_when_due()
        return changed

    def _warn_when_due(self) -> None:
        from meshproxy.identity.ca import issuer_renewal_due, trust_anchor_ending

        ca, now = self.slot.ca, self.clock()
        if self._warned_at is not None and now - self._warned_at < DUE_WARNING_EVERY:
            return
        ending = trust_anchor_ending(ca.root, now)
        due = issuer_renewal_due(ca.root, ca.issuer, now)
        if ending:
            log.error("the trust anchor %s/root.crt ends on %s: make a new one and give it to every proxy "
                      "(see docs/security.md); issuers made from it end with it", self.folder,
                      time.strftime("%Y-%m-%d", time.gmtime(ca.root_expires)))
        if due:
            log.warning("the issuer in %s ends on %s: run `meshproxy ca renew-issuer --dir %s` (the control "
                        "plane loads the new one by itself)", self.folder,
                        time.strftime("%Y-%m-%d", time.gmtime(ca.issuer_expires)), self.folder)
        if ending or due:
            self._warned_at = now

    async def follow(self, interval: float = CA_RELOAD_EVERY) -> None:
        """Check the folder every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.check()


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
                        ca_retry_max: float | None = None, ca_reload_every: float = CA_RELOAD_EVERY,
                        sidecar_ports: dict[tuple[str, str, str], int] | None = None) -> int:
    """Run the control plane until SIGTERM/SIGINT (or `stop` is set); return the exit code:
    0, or 1 when the configuration given at start is invalid.

    In a cluster without `ca_dir`: `webhook_recheck_every` is how often the webhook's
    certificate and caBundle (and the CA Secret's issuer) are checked, `ca_retry_max` the
    longest wait between two attempts at the CA (defaults: meshproxy.kube.maintain's). With
    `ca_dir`: its files are looked at every `ca_reload_every` seconds (CAFolder)."""
    plane = ControlPlane()
    if sidecar_ports:
        # Known before any sidecar registers (meshproxy up plans every port): a control plane
        # restarted while the mesh runs must not serve a snapshot in which those instances
        # have no sidecar, or callers would go to their apps directly, in plaintext, past the
        # destination's authorization, until each sidecar registers again.
        plane.registrations.update(sidecar_ports)
    ca, verifiers, review_client = None, [], None
    background = []
    if ca_dir is None and kubernetes:
        # In a cluster the CA lives in a Secret the first replica creates (with the webhook's
        # serving certificate and its caBundle), so `kubectl apply -k deploy/` is the whole
        # installation. It is set up in the background: configuration is served meanwhile, and
        # certificate requests are answered 503 until the CA is there.
        from meshproxy.control.kubernetes import make_api_client
        from meshproxy.kube import maintain

        review_client = await make_api_client(kubeconfig)
        ca, setup = _cluster_ca(review_client, _trust_domain(paths), verifiers,
                                recheck_every=webhook_recheck_every or maintain.RECHECK_EVERY,
                                backoff_max=ca_retry_max or maintain.BACKOFF_MAX)
        background.append(("the CA and webhook certificate set-up", setup))
    if ca_dir is not None:
        from meshproxy.control.ca_api import CASlot
        from meshproxy.identity.ca import CertificateAuthority, describe
        from meshproxy.identity.tokens import BootstrapTokens, TokenReviewer

        ca = CertificateAuthority.load(ca_dir)
        log.info("the CA in %s is in force: trust domain %s, issuer %s", ca_dir, ca.trust_domain,
                 describe(ca.issuer))
        folder = CAFolder(ca_dir, CASlot(ca))
        folder.check()  # the warnings, at once
        background.append(("following the CA files", lambda: folder.follow(ca_reload_every)))
        if tokens_dir is not None:
            verifiers.append(BootstrapTokens.load(tokens_dir, ca.trust_domain).verify)
        if kubernetes:
            from meshproxy.control.kubernetes import make_api_client

            review_client = await make_api_client(kubeconfig)
            verifiers.append(TokenReviewer(review_client, ca.trust_domain).verify)
        ca = folder.slot
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
    sidecar_ports = None
    if args.sidecar_ports:
        try:
            sidecar_ports = load_sidecar_ports(args.sidecar_ports)
        except (OSError, ValueError) as exc:
            print(f"meshproxy control: --sidecar-ports {args.sidecar_ports}: {exc}", file=sys.stderr)
            return 2
    import uvloop

    return uvloop.run(serve_control(list(args.config or []), args.listen, kubernetes=args.kubernetes,
                                    kubeconfig=args.kubeconfig, ca_dir=args.ca_dir,
                                    tokens_dir=args.tokens_dir, cert_lifetime=lifetime,
                                    sidecar_ports=sidecar_ports))


def load_sidecar_ports(path: str) -> dict[tuple[str, str, str], int]:
    """Read --sidecar-ports: a JSON list of {namespace, service, instance, inbound}; return
    (namespace, service, instance) -> inbound port. Raises ValueError for anything else."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError("expected a JSON list")
    ports: dict[tuple[str, str, str], int] = {}
    for i, entry in enumerate(entries):
        try:
            key = (str(entry["namespace"]), str(entry["service"]), str(entry["instance"]))
            port = entry["inbound"]
        except (TypeError, KeyError) as exc:
            raise ValueError(f"entry {i}: needs namespace, service, instance and inbound") from exc
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"entry {i}: inbound must be a port number, not {port!r}")
        ports[key] = port
    return ports
