"""`meshproxy ca`: make a trust anchor and issuer (`init`), show the trust bundle (`bundle`),
make a new issuer under the same root (`renew-issuer`).

`renew-issuer` replaces issuer.crt and issuer.key in the folder and keeps the pair it replaced
as issuer.crt.old and issuer.key.old (same modes), so an operator can roll back by renaming
them over the new ones. Each file is written under a temporary name and renamed into place, so
a reader sees the old file or the new one, never half of one; a control plane with `--ca-dir`
that looks between the two renames sees a key that does not match its certificate, keeps the
issuer it has and looks again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from meshproxy.identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `ca` and its subcommands with the `meshproxy` subparsers; return its parser."""
    p = subparsers.add_parser(
        "ca",
        help="create a trust anchor and issuer, show the trust bundle",
        description="The mesh's certificate authority: a root (the trust anchor, 10 years) and an "
        "issuer signed by it (1 year) that signs the proxies' 24 h certificates.",
    )
    sub = p.add_subparsers(dest="ca_command", metavar="SUBCOMMAND")
    init = sub.add_parser(
        "init",
        help="create a root and an issuer in a folder",
        description="Write root.crt, root.key, issuer.crt and issuer.key to DIR (created 0700; keys "
        "0600). An existing CA is never overwritten.",
    )
    init.add_argument("--dir", required=True, metavar="DIR", help="folder to write the CA to")
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                      help=f"the mesh's trust domain (default {DEFAULT_TRUST_DOMAIN})")
    bundle = sub.add_parser(
        "bundle",
        help="print the trust bundle (the root certificate, PEM)",
        description="Print the trust bundle of the CA in DIR: the root certificate every proxy "
        "verifies its peers against.",
    )
    bundle.add_argument("--dir", required=True, metavar="DIR", help="folder holding the CA")
    renew = sub.add_parser(
        "renew-issuer",
        help="make a new issuer under the same root",
        description="Make a new issuer key and certificate (1 year, never beyond the root) signed by "
        "the root in DIR (root.crt and root.key), and put them in place of issuer.crt and issuer.key. "
        "The pair replaced is kept as issuer.crt.old and issuer.key.old: to roll back, rename them "
        "over the new ones. The trust bundle does not change; a control plane with --ca-dir DIR "
        "signs with the new issuer within seconds.",
    )
    renew.add_argument("--dir", required=True, metavar="DIR", help="folder holding the CA")
    renew.add_argument("--if-due", action="store_true",
                       help="only when the issuer has passed two thirds of its lifetime (for a daily cron job)")
    p.set_defaults(ca_parser=p)
    return p


def _date(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _replace(folder: Path, name: str, data: bytes, mode: int) -> None:
    """Write `data` to folder/name with `mode` by renaming a finished file into place."""
    # mkstemp creates the file 0600 whatever the umask; fchmod then gives the mode wanted.
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, folder / name)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def renew_issuer_files(folder: str | os.PathLike, *, clock=time.time):
    """Make a new issuer from root.crt and root.key in `folder` and put it in place of
    issuer.crt/issuer.key, keeping the pair replaced as issuer.crt.old/issuer.key.old; return
    the CA the folder now holds. The folder is narrowed to 0700 as `init` leaves it.

    Raises IdentityError when the folder has no root or root key, the key is not the root's, or
    the root is about to end; OSError when the folder cannot be read or written."""
    from meshproxy.identity.ca import ISSUER_CERT, ISSUER_KEY, ROOT_CERT, ROOT_KEY, CertificateAuthority, \
        renew_issuer_pem
    from meshproxy.identity.spiffe import IdentityError

    folder = Path(folder)
    try:
        root_pem, root_key_pem = (folder / ROOT_CERT).read_bytes(), (folder / ROOT_KEY).read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"{folder} has no {Path(exc.filename).name}: a new issuer is made with the root's "
                            "certificate and key") from None
    issuer_pem, key_pem = renew_issuer_pem(root_pem, root_key_pem, clock())
    os.chmod(folder, 0o700)
    # The rollback copies first: once the new pair is in place the old one is nowhere else.
    for name, mode in ((ISSUER_KEY, 0o600), (ISSUER_CERT, 0o644)):
        if (folder / name).exists():
            _replace(folder, name + ".old", (folder / name).read_bytes(), mode)
    _replace(folder, ISSUER_KEY, key_pem, 0o600)
    _replace(folder, ISSUER_CERT, issuer_pem, 0o644)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves survive a crash
    finally:
        os.close(fd)
    return CertificateAuthority.load(folder, clock=clock)


def _renew(args: argparse.Namespace, out, err) -> int:
    from meshproxy.identity.ca import (
        ISSUER_CERT,
        CertificateAuthority,
        describe,
        issuer_renewal_due,
        issuer_renewal_time,
        trust_anchor_ending,
    )

    now = time.time()
    if args.if_due:
        ca = CertificateAuthority.load(args.dir)
        if not issuer_renewal_due(ca.root, ca.issuer, now):
            print(f"meshproxy ca: the issuer in {args.dir} ({describe(ca.issuer)}) is not due for renewal "
                  f"before {_date(issuer_renewal_time(ca.issuer))}; nothing written", file=out)
            return 0
    ca = renew_issuer_files(args.dir)
    print(f"meshproxy ca: new issuer {args.dir}/{ISSUER_CERT} ({describe(ca.issuer)}); the previous pair "
          f"is kept as {ISSUER_CERT}.old and issuer.key.old", file=out)
    if trust_anchor_ending(ca.root, now):
        print(f"meshproxy ca: the trust anchor {args.dir}/root.crt ends on {_date(ca.root_expires)}, so this "
              "issuer ends with it: replace the trust anchor (see docs/security.md)", file=err)
    return 0


def run(args: argparse.Namespace, out=None, err=None) -> int:
    """Run `meshproxy ca SUBCOMMAND`; return the exit code: 0, 1 on failure, 2 on bad usage."""
    from meshproxy.identity.ca import ISSUER_CERT, ROOT_CERT, CertificateAuthority, init_ca

    out = out or sys.stdout
    err = err or sys.stderr
    command = getattr(args, "ca_command", None)
    if command is None:
        args.ca_parser.print_help(file=err)
        return 2
    try:
        if command == "init":
            init_ca(args.dir, args.trust_domain, clock=time.time)
            ca = CertificateAuthority.load(args.dir)
            print(f"meshproxy ca: trust domain {ca.trust_domain}: trust anchor {args.dir}/{ROOT_CERT} (until "
                  f"{_date(ca.root.not_valid_after_utc.timestamp())}), issuer {args.dir}/{ISSUER_CERT} "
                  f"(until {_date(ca.issuer_expires)})", file=out)
            return 0
        if command == "bundle":
            out.write(CertificateAuthority.load(args.dir).trust_bundle().decode())
            return 0
        if command == "renew-issuer":
            return _renew(args, out, err)
    except IdentityError as exc:
        print(f"meshproxy ca {command}: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"meshproxy ca {command}: {exc.filename or args.dir}: {exc.strerror or exc}", file=err)
        return 1
    print(f"meshproxy ca: unknown subcommand {command}", file=err)
    return 2
