"""Parsing the `Mesh` kind: settings, Services with their instances, policy file list."""

from __future__ import annotations

import ipaddress

from meshproxy.config.diagnostics import Pos
from meshproxy.config.model.common import DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, MTLS_MODES, ObjectMeta, Source
from meshproxy.config.model.mesh import (
    ALLOW_ANY,
    OUTBOUND_TRAFFIC_POLICIES,
    ControlPlane,
    Instance,
    Mesh,
    Service,
    SidecarPorts,
)
from meshproxy.config.parse.common import DNS_SUBDOMAIN_RE, check_name
from meshproxy.config.parse.fields import Obj, describe
from meshproxy.config.yamlsource import YMap, YScalar, YSeq

_SIDECAR_PORTS = ("outbound", "inbound", "admin", "health")


class _Seen:
    """Names and fixed ports already used in this Mesh, with where they were first given."""

    def __init__(self) -> None:
        self.services: dict[str, Pos] = {}
        self.instances: dict[str, Pos] = {}
        self.ports: dict[int, Pos] = {}

    def check(self, table: dict, key: object, o: Obj, field: str, message: str) -> None:
        here = o.value_pos(field)
        if key in table:
            o.r.error(here, f"{o.field(field)}: {message} (first at {_short(table[key])})")
        else:
            table[key] = here


def parse_mesh(spec: Obj, meta: ObjectMeta, source: Source) -> Mesh:
    """Return the Mesh of `spec`; a second Service or instance of the same name, a fixed
    sidecar port given twice, or a bad `app.otherAddresses` entry is an error."""
    trust_domain = spec.string("trustDomain", DEFAULT_TRUST_DOMAIN)
    if not DNS_SUBDOMAIN_RE.match(trust_domain):
        spec.r.error(spec.value_pos("trustDomain"), f"spec.trustDomain: '{trust_domain}' is not a DNS name")
    control_plane = ControlPlane()
    cp = spec.obj("controlPlane")
    if cp is not None:
        listen = cp.address("listen")
        if listen is not None:
            control_plane = ControlPlane(*listen)
    mtls = spec.obj("mtls")
    mtls_mode = mtls.string("mode", choices=MTLS_MODES) if mtls is not None else None
    outbound = spec.string("outboundTrafficPolicy", ALLOW_ANY, choices=OUTBOUND_TRAFFIC_POLICIES)
    seen = _Seen()
    services = tuple(s for s in (_service(o, seen) for o in spec.objs("services")) if s is not None)
    policies = spec.strs("policies")
    return Mesh(
        metadata=meta,
        trust_domain=trust_domain,
        control_plane=control_plane,
        mtls_mode=mtls_mode,
        outbound_traffic_policy=outbound,
        services=services,
        policies=policies,
        source=source,
    )


def _service(o: Obj, seen: _Seen) -> Service | None:
    name = check_name(o, "name", o.string("name", required=True), label=True)
    namespace = check_name(o, "namespace", o.string("namespace", DEFAULT_NAMESPACE), label=True)
    port = o.port("port", 80)
    addresses = []
    for path, node in o.items("addresses"):
        text = o.r.to_str(node, path)
        if text is None:
            continue
        try:
            addresses.append(str(ipaddress.ip_address(text)))
        except ValueError:
            o.r.error(node.pos, f"{path}: '{text}' is not an IP address")
    instances = tuple(i for i in (_instance(item, seen) for item in o.objs("instances")) if i is not None)
    if name is None:
        return None
    service = Service(name=name, namespace=namespace or DEFAULT_NAMESPACE, port=port,
                      addresses=tuple(addresses), instances=instances)
    seen.check(seen.services, service.key, o, "name", f"duplicate Service '{service.key}'")
    return service


def _instance(o: Obj, seen: _Seen) -> Instance | None:
    name = check_name(o, "name", o.string("name", required=True), label=False)
    if name is not None:
        seen.check(seen.instances, name, o, "name", f"duplicate instance '{name}'")
    labels = o.str_map("labels")
    address = None
    command = None
    others: tuple[str, ...] = ()
    app = o.obj("app", required=True)
    if app is not None:
        address = app.address("address", required=True)
        others = _other_addresses(app, address)
        command = _command(app)
    meshed, ports = _sidecar(o, seen)
    if name is None or address is None:
        return None
    return Instance(name=name, app_host=address[0], app_port=address[1], labels=labels,
                    command=command, meshed=meshed, sidecar_ports=ports, other_app_hosts=others)


def _other_addresses(app: Obj, address: tuple[str, int] | None) -> tuple[str, ...]:
    """Return the IPs of `app.otherAddresses` in canonical text. An item that is not an IP
    (a port is not allowed: the app's port is the one of `address`), one given twice, or one
    that is the app's own address is reported and left out."""
    own = _canonical_ip(address[0]) if address is not None else None
    first: dict[str, Pos] = {}
    for path, node in app.items("otherAddresses"):
        text = app.r.to_str(node, path)
        if text is None:
            continue
        ip = _canonical_ip(text)
        if ip is None:
            app.r.error(node.pos, f"{path}: '{text}' is not an IP address "
                        "(no port: the app's port is the one of 'address')")
        elif ip == own:
            app.r.error(node.pos, f"{path}: '{text}' is the app's own address")
        elif ip in first:
            app.r.error(node.pos, f"{path}: '{text}' is given twice (first at {_short(first[ip])})")
        else:
            first[ip] = node.pos
    return tuple(first)


def _canonical_ip(text: str) -> str | None:
    """The canonical text of IP `text` (compressed, lower case), or None for a host name."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _command(app: Obj) -> tuple[str, ...] | None:
    entry = app.entry("command")
    if entry is None:
        return None
    if isinstance(entry.value, YSeq) and not entry.value.items:
        app.r.error(entry.value.pos, f"{app.field('command')}: must not be empty")
    args = []
    for path, node in app.items("command"):
        # Numbers are common in argument lists (`[http.server, 9000]`): take them as written.
        if isinstance(node, YScalar) and isinstance(node.value, (str, int, float)) and not isinstance(node.value, bool):
            args.append(str(node.value))
        else:
            app.r.error(node.pos, f"{path}: expected a string, got {describe(node)}")
    return tuple(args) if args else None


def _sidecar(o: Obj, seen: _Seen) -> tuple[bool, SidecarPorts]:
    entry = o.entry("sidecar")
    if entry is None:
        return True, SidecarPorts()
    node = entry.value
    if isinstance(node, YScalar) and isinstance(node.value, bool):
        return node.value, SidecarPorts()
    if not isinstance(node, YMap):
        o.r.error(node.pos, f"{o.field('sidecar')}: expected a mapping of ports or false, got {describe(node)}")
        return True, SidecarPorts()
    ports = o.obj("sidecar")
    assert ports is not None
    values = {}
    for kind in _SIDECAR_PORTS:
        values[kind] = ports.port(kind)
        if values[kind] is not None:
            seen.check(seen.ports, values[kind], ports, kind, f"port {values[kind]} is already given to a sidecar")
    return True, SidecarPorts(**values)


def _short(pos: Pos) -> str:
    return f"line {pos.line}" if pos.line else pos.file
