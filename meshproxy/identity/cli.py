"""`meshproxy ca`: make a trust anchor and issuer (`init`), show the trust bundle (`bundle`)."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone

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
    p.set_defaults(ca_parser=p)
    return p


def _date(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


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
    except IdentityError as exc:
        print(f"meshproxy ca {command}: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"meshproxy ca {command}: {exc.filename or args.dir}: {exc.strerror or exc}", file=err)
        return 1
    print(f"meshproxy ca: unknown subcommand {command}", file=err)
    return 2
