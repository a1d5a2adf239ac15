"""`meshproxy init`: install, print or remove the iptables rules that send a pod's TCP traffic
through its sidecar.

The rules come from `meshproxy.kube.iptables` (pure); this module picks the iptables flavour
(nft or legacy) and the address families, reads the `nat` table with `*-save`, and applies
the planned text with `*-restore --noflush`, one atomic transaction per family. It runs in the
pod's network namespace (the `meshproxy-init` container, with NET_ADMIN and NET_RAW).

Exit codes: 0 done (also for a cleanup that found nothing), 1 an iptables command failed or
is missing, 2 bad options.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from meshproxy.kube import iptables as rules_mod
from meshproxy.kube.iptables import IPV4, IPV6, InitOptions, InitOptionsError

# ip(6)tables often live in sbin, which a container's PATH may leave out.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"]
)
_FLAVOURS = ("nft", "legacy")
_VERSION_MARK = {"nft": "nf_tables", "legacy": "legacy"}
_TIMEOUT = 30.0


class InitError(Exception):
    """A step of `meshproxy init` failed; the message says which, for stderr."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `init` with the `meshproxy` subparsers; return its parser."""
    p = subparsers.add_parser(
        "init",
        help="install (or print, or remove) the pod's traffic-capture iptables rules",
        description="Redirect the pod's inbound TCP to the sidecar's inbound port (except the "
        "health port and skipped ports) and its outbound TCP to the outbound port (except the "
        "proxy's own UID, loopback, skipped ports and CIDRs), in nat chains named MESHPROXY_*. "
        "Running it again leaves the same rules.",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true",
                        help="print the rules (iptables-restore format) and change nothing")
    action.add_argument("--cleanup", action="store_true",
                        help="remove the rules (nothing to do when they are absent)")
    p.add_argument("--proxy-uid", type=int, default=rules_mod.DEFAULT_PROXY_UID, metavar="UID",
                   help="the proxy's user ID: its own connections are never redirected "
                   f"(default {rules_mod.DEFAULT_PROXY_UID})")
    p.add_argument("--inbound-port", type=int, default=rules_mod.DEFAULT_INBOUND_PORT,
                   metavar="PORT", help=f"default {rules_mod.DEFAULT_INBOUND_PORT}")
    p.add_argument("--outbound-port", type=int, default=rules_mod.DEFAULT_OUTBOUND_PORT,
                   metavar="PORT", help=f"default {rules_mod.DEFAULT_OUTBOUND_PORT}")
    p.add_argument("--health-port", type=int, default=rules_mod.DEFAULT_HEALTH_PORT,
                   metavar="PORT", help="never redirected inbound "
                   f"(default {rules_mod.DEFAULT_HEALTH_PORT})")
    p.add_argument("--skip-inbound-ports", default="", metavar="PORTS",
                   help="inbound ports left alone, e.g. 22,9090,6000-7000")
    p.add_argument("--skip-outbound-ports", default="", metavar="PORTS",
                   help="destination ports left alone, e.g. 5432")
    p.add_argument("--skip-outbound-cidrs", default="", metavar="CIDRS",
                   help="destination networks left alone, e.g. 10.0.0.0/8,fd00::/8")
    p.add_argument("--ipv6", choices=("auto", "on", "off"), default="auto",
                   help="also capture IPv6 with ip6tables; auto: when the pod has a global IPv6 "
                   "address (cleanup: whenever ip6tables is there)")
    p.add_argument("--iptables", choices=("auto", *_FLAVOURS), default="auto",
                   help="iptables flavour; auto: the one whose tables already hold rules, else "
                   "nft (cleanup: every flavour that holds the chains)")
    return p


def options_from_args(args: argparse.Namespace, ipv6: bool) -> InitOptions:
    """Build the options from parsed flags; raises InitOptionsError for a bad value."""
    return InitOptions(
        proxy_uid=args.proxy_uid,
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        health_port=args.health_port,
        skip_inbound_ports=rules_mod.parse_ports(args.skip_inbound_ports, "--skip-inbound-ports"),
        skip_outbound_ports=rules_mod.parse_ports(args.skip_outbound_ports,
                                                  "--skip-outbound-ports"),
        skip_outbound_cidrs=rules_mod.parse_cidrs(args.skip_outbound_cidrs,
                                                  "--skip-outbound-cidrs"),
        ipv6=ipv6,
    )


@dataclass(frozen=True)
class Tables:
    """One iptables flavour for one address family: its save and restore commands."""

    flavour: str
    family: str
    save: str
    restore: str

    @property
    def label(self) -> str:
        return f"{'iptables' if self.family == IPV4 else 'ip6tables'}-{self.flavour}"

    def read_nat(self) -> str:
        """Return `*-save -t nat` output; raises InitError when it fails."""
        return _exec([self.save, "-t", "nat"], None, f"{self.label}: reading the nat table")

    def read_all(self, strict: bool = False) -> str:
        """Return `*-save` output for every table that exists (reading creates none). When it
        cannot be read: raises InitError if `strict`, else returns ""."""
        try:
            return _exec([self.save], None, f"{self.label}: reading the tables")
        except InitError:
            if strict:
                raise
            return ""

    def apply(self, text: str) -> None:
        """Feed `text` to `*-restore --noflush` (one transaction); raises InitError."""
        _exec([self.restore, "--noflush"], text, f"{self.label}: applying the rules")


def _exec(argv: Sequence[str], stdin: str | None, what: str) -> str:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InitError(f"{what}: {argv[0]}: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().replace("\n", " | ")
        raise InitError(f"{what}: {' '.join(argv)} exited {done.returncode}: {detail}")
    return done.stdout


def find_tables(flavour: str, family: str) -> Tables | None:
    """Return the commands of a flavour and family, or None when they are not installed.

    `iptables-nft-save` and the like are used where they exist; otherwise the plain
    `iptables-save` when `iptables --version` names that flavour."""
    base = "iptables" if family == IPV4 else "ip6tables"
    save = shutil.which(f"{base}-{flavour}-save", path=_SEARCH_PATH)
    restore = shutil.which(f"{base}-{flavour}-restore", path=_SEARCH_PATH)
    if save and restore:
        return Tables(flavour, family, save, restore)
    plain = shutil.which(base, path=_SEARCH_PATH)
    save = shutil.which(f"{base}-save", path=_SEARCH_PATH)
    restore = shutil.which(f"{base}-restore", path=_SEARCH_PATH)
    if not (plain and save and restore):
        return None
    try:
        version = _exec([plain, "--version"], None, base)
    except InitError:
        return None
    return Tables(flavour, family, save, restore) if _VERSION_MARK[flavour] in version else None


def _read_if_inet6() -> str | None:
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            return f.read()
    except OSError:
        return None  # the kernel has no IPv6


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `meshproxy init`; return 0 when done, 1 when iptables failed, 2 on bad options."""
    out = out or sys.stdout
    err = err or sys.stderr
    if_inet6 = _read_if_inet6()
    if args.ipv6 == "on":
        ipv6 = True
    elif args.ipv6 == "off":
        ipv6 = False
    elif args.cleanup:
        ipv6 = if_inet6 is not None
    else:
        ipv6 = if_inet6 is not None and rules_mod.ipv6_in_use(if_inet6)
    try:
        options = options_from_args(args, ipv6)
    except InitOptionsError as exc:
        print(f"meshproxy init: {exc}", file=err)
        return 2
    if args.dry_run:
        for family, text in rules_mod.rules(options).items():
            tool = "iptables" if family == IPV4 else "ip6tables"
            out.write(f"# {family}: {tool}-restore --noflush\n{text}")
        if not ipv6:
            out.write("# ipv6: not captured (--ipv6 on to capture it)\n")
        return 0
    try:
        if args.cleanup:
            _cleanup(args.iptables, ipv6, out)
        else:
            _install(options, args.iptables, out)
    except InitError as exc:
        print(f"meshproxy init: {exc}", file=err)
        return 1
    return 0


def _families(ipv6: bool) -> tuple[str, ...]:
    return (IPV4, IPV6) if ipv6 else (IPV4,)


def _choose_flavour(choice: str) -> str:
    """The requested flavour; for auto, the one whose tables hold more rules (nft on a tie)."""
    if choice != "auto":
        return choice
    counts = {}
    for flavour in _FLAVOURS:
        counts[flavour] = sum(
            rules_mod.rule_count(tables.read_all())
            for family in (IPV4, IPV6)
            if (tables := find_tables(flavour, family)) is not None
        )
    if find_tables("nft", IPV4) is None:
        return "legacy"
    return "legacy" if counts["legacy"] > counts["nft"] else "nft"


def _install(options: InitOptions, choice: str, out: TextIO) -> None:
    flavour = _choose_flavour(choice)
    tables = {}
    for family in _families(options.ipv6):
        found = find_tables(flavour, family)
        if found is None:
            base = "iptables" if family == IPV4 else "ip6tables"
            raise InitError(f"{family}: {base}-{flavour}-save/-restore not found")
        tables[family] = found
    for family, table in tables.items():
        table.apply(rules_mod.plan_apply(options, family, table.read_nat()))
        print(f"meshproxy init: {family} ({table.label}): {rules_mod.describe(options, family)}",
              file=out)
    if not options.ipv6:
        print("meshproxy init: ipv6: not captured (no global IPv6 address; --ipv6 on to "
              "capture it)", file=out)


def _cleanup(choice: str, ipv6: bool, out: TextIO) -> None:
    flavours = _FLAVOURS if choice == "auto" else (choice,)
    for family in _families(ipv6):
        removed = False
        for flavour in flavours:
            table = find_tables(flavour, family)
            if table is None:
                if choice != "auto":
                    raise InitError(f"{family}: iptables-{flavour} not found")
                continue
            # auto: a flavour whose tables cannot be read here holds nothing of ours
            saved = table.read_all(strict=choice != "auto")
            text = rules_mod.plan_cleanup(saved)
            if text is not None:
                table.apply(text)
                removed = True
                print(f"meshproxy init: {family} ({table.label}): rules removed", file=out)
        if not removed:
            print(f"meshproxy init: {family}: no rules to remove", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `init` on its own: `python -m meshproxy.kube.init_cli [FLAGS]`."""
    parser = argparse.ArgumentParser(prog="meshproxy")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["init", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
