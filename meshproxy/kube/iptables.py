"""The iptables rules that send a pod's TCP traffic through its sidecar.

Pure: options in, text out.

`rules(options)` returns, per address family, the `nat` table in iptables-restore format; it is
what `meshproxy init --dry-run` prints. The plan functions turn that text and the current
`iptables-save -t nat` output into the exact text to feed to `iptables-restore --noflush`:
applying twice leaves the same rules, removing rules that are absent is a no-op. Running the
binaries is `meshproxy.kube.init_cli`'s job; nothing here touches the system.

Chains (all in `nat`, all TCP):

    PREROUTING -p tcp -> MESHPROXY_INBOUND     health port, skipped inbound ports: RETURN
                                                anything else -> MESHPROXY_IN_REDIRECT
                                                               (REDIRECT to the inbound port)
    OUTPUT -p tcp     -> MESHPROXY_OUTPUT      see below; what falls through -> MESHPROXY_REDIRECT
                                                               (REDIRECT to the outbound port)

MESHPROXY_OUTPUT, in order (istio-iptables' loopback rules, simplified; docs/interception.md):

1. the proxy's UID, out of `lo`, not to 127.0.0.1 (resp. ::1): the proxy dialled its own pod's
   IP (the chosen endpoint of a Service is this very pod). Sent through MESHPROXY_INBOUND, so it
   reaches the app through the inbound listener (mTLS, authorization) as a call from any other
   pod would, and the health port and skipped inbound ports stay uncaptured here too.
2. anything else out of `lo`: RETURN. The app calling itself (127.0.0.1 or its own pod IP) and
   the proxy talking to the app on 127.0.0.1 are never redirected.
3. the proxy's UID: RETURN (its own upstream connections).
4. skipped outbound ports, then skipped outbound CIDRs of that family: RETURN.
5. everything else -> MESHPROXY_REDIRECT.

Rules are written in the canonical form `iptables-save` prints them in (`-p tcp -m tcp --dport`,
`! -d` before `-o`), so a rule in force can be recognised by comparing lines.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

IPV4 = "ipv4"
IPV6 = "ipv6"
FAMILIES = (IPV4, IPV6)

CHAIN_INBOUND = "MESHPROXY_INBOUND"
CHAIN_IN_REDIRECT = "MESHPROXY_IN_REDIRECT"
CHAIN_OUTPUT = "MESHPROXY_OUTPUT"
CHAIN_REDIRECT = "MESHPROXY_REDIRECT"
CHAINS = (CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTPUT, CHAIN_REDIRECT)

# Spec §2.
DEFAULT_PROXY_UID = 1337
DEFAULT_INBOUND_PORT = 15006
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_HEALTH_PORT = 15021

_LOOPBACK = {IPV4: "127.0.0.1/32", IPV6: "::1/128"}
_BUILTIN_NAT_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class InitOptionsError(ValueError):
    """An option of `meshproxy init` is invalid; the message names it and says why."""


@dataclass(frozen=True, order=True)
class PortRange:
    """A TCP port or an inclusive range of ports (`22`, `6000-7000`)."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= 65535):
            raise InitOptionsError(f"port range {self.first}-{self.last} is not within 1-65535")

    def match(self) -> str:
        """Return the iptables `--dport` argument: `22` or `6000:7000`."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InitOptionsError(f"{what}: {value!r} is not a port number (1-65535)")
    return value


@dataclass(frozen=True)
class InitOptions:
    """What `meshproxy init` installs. Raises InitOptionsError when a value is out of range."""

    proxy_uid: int = DEFAULT_PROXY_UID
    inbound_port: int = DEFAULT_INBOUND_PORT
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    health_port: int = DEFAULT_HEALTH_PORT
    skip_inbound_ports: tuple[PortRange, ...] = ()
    skip_outbound_ports: tuple[PortRange, ...] = ()
    skip_outbound_cidrs: tuple[Network, ...] = field(default=())
    ipv6: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.proxy_uid, bool) or not isinstance(self.proxy_uid, int) or not (
            0 <= self.proxy_uid < 2**32 - 1
        ):
            raise InitOptionsError(f"proxy UID: {self.proxy_uid!r} is not a user ID")
        _port(self.inbound_port, "inbound port")
        _port(self.outbound_port, "outbound port")
        _port(self.health_port, "health port")
        if self.inbound_port == self.outbound_port:
            raise InitOptionsError(
                f"inbound and outbound port are both {self.inbound_port}: they must differ"
            )
        for name in ("skip_inbound_ports", "skip_outbound_ports", "skip_outbound_cidrs"):
            object.__setattr__(self, name, _unique(getattr(self, name)))

    def inbound_skips(self) -> tuple[PortRange, ...]:
        """Return the ports the inbound redirect leaves alone: the health port, then the
        skipped inbound ports."""
        return _unique([PortRange(self.health_port, self.health_port), *self.skip_inbound_ports])


def _unique(items: Iterable) -> tuple:
    """Keep the first of equal items, in the order given (the order the user wrote them)."""
    return tuple(dict.fromkeys(items))


def parse_ports(text: str | None, what: str = "ports") -> tuple[PortRange, ...]:
    """Parse `22,9090,6000-7000` (blanks and empty items ignored) into port ranges.

    Raises InitOptionsError naming `what` and the bad item."""
    ranges = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        first, sep, last = item.partition("-")
        try:
            low = int(first)
            high = int(last) if sep else low
        except ValueError:
            raise InitOptionsError(f"{what}: {item!r} is not a port or a range like 6000-7000")
        try:
            ranges.append(PortRange(low, high))
        except InitOptionsError:
            raise InitOptionsError(f"{what}: {item!r} is not within 1-65535 (low to high)")
    return _unique(ranges)


def parse_cidrs(text: str | None, what: str = "CIDRs") -> tuple[Network, ...]:
    """Parse `10.0.0.0/8,fd00::/8,192.0.2.7` (an address alone is a /32 or /128).

    Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`, as iptables would show it). Raises
    InitOptionsError naming `what` and the bad item."""
    networks = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise InitOptionsError(f"{what}: {item!r} is not an IPv4 or IPv6 address or CIDR")
    return _unique(networks)


def jump_rules() -> tuple[str, ...]:
    """Return the rules (without `-A`) that hook the dedicated chains into the built-in ones."""
    return (f"PREROUTING -p tcp -j {CHAIN_INBOUND}", f"OUTPUT -p tcp -j {CHAIN_OUTPUT}")


def family_rules(options: InitOptions, family: str) -> list[str]:
    """Return the `nat` rules of one family, each as `CHAIN ARGS` (append order)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown address family {family!r}")
    uid = options.proxy_uid
    loopback = _LOOPBACK[family]
    version = 4 if family == IPV4 else 6
    out: list[str] = []

    for ports in options.inbound_skips():
        out.append(f"{CHAIN_INBOUND} -p tcp -m tcp --dport {ports.match()} -j RETURN")
    out.append(f"{CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}")
    out.append(f"{CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {options.inbound_port}")

    out.append(f"{CHAIN_OUTPUT} ! -d {loopback} -o lo -m owner --uid-owner {uid} "
               f"-j {CHAIN_INBOUND}")
    out.append(f"{CHAIN_OUTPUT} -o lo -j RETURN")
    out.append(f"{CHAIN_OUTPUT} -m owner --uid-owner {uid} -j RETURN")
    for ports in options.skip_outbound_ports:
        out.append(f"{CHAIN_OUTPUT} -p tcp -m tcp --dport {ports.match()} -j RETURN")
    for network in options.skip_outbound_cidrs:
        if network.version == version:
            out.append(f"{CHAIN_OUTPUT} -d {network.with_prefixlen} -j RETURN")
    out.append(f"{CHAIN_OUTPUT} -j {CHAIN_REDIRECT}")
    out.append(f"{CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {options.outbound_port}")

    out.extend(jump_rules())
    return out


def rules(options: InitOptions) -> dict[str, str]:
    """Return `{family: restore text}` for `ipv4` and, when `options.ipv6`, `ipv6`.

    Each text is one `*nat ... COMMIT` block for `iptables-restore --noflush` (resp.
    `ip6tables-restore`): it declares the dedicated chains (which creates them, or empties them
    when they exist), fills them and appends the jumps from PREROUTING and OUTPUT. Feeding it
    as is appends the jumps again on a second run; `plan_apply` leaves out those in force."""
    families = FAMILIES if options.ipv6 else (IPV4,)
    return {family: _restore(_declare_chains(), [f"-A {r}" for r in family_rules(options, family)])
            for family in families}


def _declare_chains() -> list[str]:
    return [f":{chain} - [0:0]" for chain in CHAINS]


def _restore(declarations: Sequence[str], commands: Sequence[str]) -> str:
    return "\n".join(["*nat", *declarations, *commands, "COMMIT"]) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading `iptables-save` output.


def nat_section(saved: str) -> list[str]:
    """Return the lines of the `*nat` block of iptables-save output (without `*nat`/`COMMIT`)."""
    lines: list[str] = []
    inside = False
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line == "*nat"
        elif line == "COMMIT":
            inside = False
        elif inside and line and not line.startswith("#"):
            lines.append(line)
    return lines


def chains_present(saved: str) -> tuple[str, ...]:
    """Return which of the dedicated chains the saved `nat` table declares, in CHAINS order."""
    declared = {line[1:].split()[0] for line in nat_section(saved) if line.startswith(":")}
    return tuple(chain for chain in CHAINS if chain in declared)


def rule_count(saved: str) -> int:
    """Return how many rules (`-A` lines) iptables-save output holds, over all its tables."""
    return sum(1 for line in saved.splitlines() if line.startswith("-A "))


def _jumps_into_ours(saved: str) -> list[str]:
    """Rules (`CHAIN ARGS`) of other chains that jump to one of the dedicated chains."""
    found = []
    for line in nat_section(saved):
        if not line.startswith("-A "):
            continue
        rule = line[3:]
        chain, _, rest = rule.partition(" ")
        words = rest.split()
        if chain in CHAINS:
            continue
        for i, word in enumerate(words[:-1]):
            if word in ("-j", "-g", "--jump", "--goto") and words[i + 1] in CHAINS:
                found.append(rule)
                break
    return found


def plan_apply(options: InitOptions, family: str, saved: str) -> str:
    """Return the restore text that brings the `nat` table from `saved` to `options`' rules.

    The dedicated chains are declared (created, or emptied when they exist) and refilled; a
    jump from PREROUTING/OUTPUT is appended only when it is not already in force, so running
    twice leaves the same table. Jumps into the dedicated chains that the options no longer
    ask for, and second copies of the ones they do, are deleted."""
    wanted = list(jump_rules())
    existing = _jumps_into_ours(saved)
    deletes = []
    seen: set[str] = set()
    for rule in existing:
        if rule in wanted and rule not in seen:
            seen.add(rule)
        else:
            deletes.append(f"-D {rule}")
    appends = [f"-A {rule}" for rule in family_rules(options, family)
               if rule not in wanted or rule not in seen]
    return _restore(_declare_chains(), deletes + appends)


def plan_cleanup(saved: str) -> str | None:
    """Return the restore text that removes the dedicated chains and every jump into them, or
    None when `saved` has none of them (cleanup is then a no-op)."""
    present = chains_present(saved)
    jumps = _jumps_into_ours(saved)
    if not present and not jumps:
        return None
    commands = [f"-D {rule}" for rule in jumps]
    commands += [f"-F {chain}" for chain in present]
    commands += [f"-X {chain}" for chain in present]
    return _restore([], commands)


def ipv6_in_use(if_inet6: str) -> bool:
    """Return whether `/proc/net/if_inet6` text shows a global-scope IPv6 address on an
    interface other than `lo`: the pod is reachable over IPv6, so its IPv6 traffic needs the
    same capture. (Link-local addresses alone do not count: every interface has one.)"""
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] != "lo" and fields[3] == "00":
            return True
    return False


def describe(options: InitOptions, family: str) -> str:
    """Return a one-line summary of what the rules of `family` capture, for the init log."""
    inbound_skips = ",".join(str(p) for p in options.inbound_skips())
    version = 4 if family == IPV4 else 6
    outbound_skips = [f"UID {options.proxy_uid}", "loopback"]
    if options.skip_outbound_ports:
        outbound_skips.append("ports " + ",".join(str(p) for p in options.skip_outbound_ports))
    cidrs = [n.with_prefixlen for n in options.skip_outbound_cidrs if n.version == version]
    if cidrs:
        outbound_skips.append(",".join(cidrs))
    return (f"inbound TCP -> {options.inbound_port} except ports {inbound_skips}; "
            f"outbound TCP -> {options.outbound_port} except {', '.join(outbound_skips)}")
