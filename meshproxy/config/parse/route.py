"""Parsing `HTTPRoute` (Gateway API v1) with the checks the Gateway API's CRD and webhook make,
plus that every regular expression compiles with Python's `re`."""

from __future__ import annotations

import re

from meshproxy.config.model.common import ObjectMeta, Source, service_key
from meshproxy.config.model.route import (
    FILTER_TYPES,
    GATEWAY_GROUP,
    HTTP_METHODS,
    PATH_MATCH_TYPES,
    PATH_MODIFIER_TYPES,
    REDIRECT_SCHEMES,
    REDIRECT_STATUS_CODES,
    VALUE_MATCH_TYPES,
    BackendObjectRef,
    BackendRef,
    Fraction,
    HeaderModifier,
    HTTPHeader,
    HTTPRoute,
    ParentRef,
    PathMatch,
    PathModifier,
    RequestMirror,
    RequestRedirect,
    RouteFilter,
    RouteMatch,
    RouteRetry,
    RouteRule,
    RouteTimeouts,
    URLRewrite,
    ValueMatch,
)
from meshproxy.config.parse.common import check_name
from meshproxy.config.parse.fields import Obj

# RFC 9110 §5.1: a field name is a token.
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_FILTER_FIELDS = {t: t[0].lower() + t[1:] for t in FILTER_TYPES}
_FILTER_FIELDS["URLRewrite"] = "urlRewrite"


def parse_http_route(spec: Obj, meta: ObjectMeta, source: Source) -> HTTPRoute:
    """Return the HTTPRoute of `spec`; namespaces left out of references are the route's own."""
    ns = meta.namespace
    parents = parse_parent_refs(spec, ns)
    hostnames = spec.strs("hostnames")
    rules = tuple(_rule(o, ns) for o in spec.objs("rules"))
    return HTTPRoute(
        metadata=meta,
        parent_refs=parents,
        hostnames=hostnames,
        rules=rules if spec.has("rules") else (RouteRule(),),
        source=source,
    )


def parse_parent_refs(spec: Obj, ns: str) -> tuple[ParentRef, ...]:
    """Return a route's `parentRefs` (a warning when none of them is a Service)."""
    parents = tuple(_parent_ref(o, ns) for o in spec.objs("parentRefs"))
    if not any(p is not None and p.is_service for p in parents):
        spec.r.diags.warning(spec.where, "spec.parentRefs: the route names no Service parent, so it is "
                             "attached to nothing")
    return tuple(p for p in parents if p is not None)


def _parent_ref(o: Obj, ns: str) -> ParentRef | None:
    kind = o.string("kind", "Gateway")
    # No other API group has a kind Service, so `kind: Service` alone means the core one.
    group = o.string("group", "" if kind == "Service" else GATEWAY_GROUP)
    name = o.string("name", required=True)
    namespace = check_name(o, "namespace", o.string("namespace", ns), label=True) or ns
    port = o.port("port")
    section = o.string("sectionName")
    if name is None:
        return None
    ref = ParentRef(name=name, namespace=namespace, kind=kind, group=group, port=port, section_name=section)
    if ref.is_service:
        o.r.refs.append((ref.service_key, o.field("name"), port))
    else:
        o.r.diags.warning(o.where, f"{o.path}: {group or 'core'}/{kind} is not a parent the mesh attaches "
                          "routes to (use kind: Service)")
    return ref


def _rule(o: Obj, ns: str) -> RouteRule:
    name = o.string("name")
    matches = tuple(_match(m) for m in o.objs("matches"))
    filters = parse_filters(o, ns)
    backends = parse_backend_refs(o, ns)
    timeouts = parse_timeouts(o)
    retry = None
    if (r := o.obj("retry")) is not None:
        codes = []
        for path, node in r.items("codes"):
            code = r.r.to_int(node, path, 400, 599)
            if code is not None:
                codes.append(code)
        retry = RouteRetry(attempts=r.integer("attempts", lo=0, hi=100), codes=tuple(codes),
                           backoff=r.duration("backoff"))
    _check_prefix_rewrites(o, matches, filters)
    return RouteRule(
        matches=matches or (RouteMatch(),),
        filters=filters,
        backend_refs=backends,
        timeouts=timeouts,
        retry=retry,
        name=name,
    )


def parse_backend_refs(o: Obj, ns: str, types: tuple[str, ...] = FILTER_TYPES) -> tuple[BackendRef, ...]:
    """Return a rule's `backendRefs` (their filters of `types`); weights that are all 0 are an error."""
    backends = tuple(b for b in (_backend_ref(b, ns, types) for b in o.objs("backendRefs")) if b is not None)
    if backends and all(b.weight == 0 for b in backends):
        o.r.error(o.pos("backendRefs"), f"{o.field('backendRefs')}: every weight is 0, so no request "
                  "can be sent anywhere")
    return backends


def parse_timeouts(o: Obj) -> RouteTimeouts | None:
    """Return a rule's `timeouts` (`0s` is no timeout), or None when absent."""
    t = o.obj("timeouts")
    if t is None:
        return None
    request = t.duration("request") or None
    backend = t.duration("backendRequest") or None
    if request is not None and backend is not None and backend > request:
        t.r.error(t.value_pos("backendRequest"), f"{t.field('backendRequest')}: must not be longer "
                  "than request")
    return RouteTimeouts(request=request, backend_request=backend)


def _match(o: Obj) -> RouteMatch:
    path = PathMatch()
    if (p := o.obj("path")) is not None:
        kind = p.string("type", "PathPrefix", choices=PATH_MATCH_TYPES)
        value = p.string("value", "/")
        if kind == "RegularExpression":
            check_regex(p, "value", value)
        elif not value.startswith("/"):
            p.r.error(p.value_pos("value"), f"{p.field('value')}: '{value}' must start with '/'")
        path = PathMatch(type=kind, value=value)
    headers = parse_header_matches(o)
    query = tuple(v for v in (_value_match(q, header=False) for q in o.objs("queryParams")) if v is not None)
    method = o.string("method", choices=HTTP_METHODS)
    return RouteMatch(path=path, headers=headers, query_params=query, method=method)


def parse_header_matches(o: Obj) -> tuple[ValueMatch, ...]:
    """Return a match's `headers` conditions (names lowercased)."""
    return tuple(v for v in (_value_match(h, header=True) for h in o.objs("headers")) if v is not None)


def _value_match(o: Obj, header: bool) -> ValueMatch | None:
    kind = o.string("type", "Exact", choices=VALUE_MATCH_TYPES)
    name = _header_name(o, "name") if header else o.string("name", required=True)
    value = o.string("value", required=True)
    if kind == "RegularExpression":
        check_regex(o, "value", value)
    if name is None or value is None:
        return None
    return ValueMatch(name=name.lower() if header else name, value=value, type=kind)


def _header_name(o: Obj, key: str, required: bool = True) -> str | None:
    name = o.string(key, required=required)
    if name is not None and not HEADER_NAME_RE.match(name):
        o.r.error(o.value_pos(key), f"{o.field(key)}: '{name}' is not a valid header name")
        return None
    return name


def check_regex(o: Obj, key: str, pattern: str | None) -> bool:
    """Report `pattern` (the value at `key`) when Python's `re` cannot compile it; return
    whether it compiles (True for None)."""
    if pattern is None:
        return True
    try:
        re.compile(pattern)
    except re.error as exc:
        o.r.error(o.value_pos(key), f"{o.field(key)}: bad regular expression '{pattern}': {exc}")
        return False
    return True


def parse_filters(o: Obj, ns: str, types: tuple[str, ...] = FILTER_TYPES) -> tuple[RouteFilter, ...]:
    """Return the `filters` at `o`, each of one of `types` (HTTPRoute's by default)."""
    out = []
    for f in o.objs("filters"):
        kind = f.string("type", required=True, choices=types)
        for ftype in types:
            key = _FILTER_FIELDS[ftype]
            if ftype != kind:
                if f.has(key) and kind is not None:
                    f.r.error(f.pos(key), f"{f.field(key)}: does not belong to a filter of type {kind}")
                f.entry(key)
        if kind is None:
            continue
        body = f.obj(_FILTER_FIELDS[kind], required=True)
        if body is None:
            continue
        if kind == "RequestHeaderModifier":
            out.append(RouteFilter(kind, request_header_modifier=_header_modifier(body)))
        elif kind == "ResponseHeaderModifier":
            out.append(RouteFilter(kind, response_header_modifier=_header_modifier(body)))
        elif kind == "URLRewrite":
            rewrite = URLRewrite(hostname=_hostname(body, "hostname"), path=_path_modifier(body))
            out.append(RouteFilter(kind, url_rewrite=rewrite))
        elif kind == "RequestRedirect":
            out.append(RouteFilter(kind, request_redirect=_redirect(body)))
        elif (mirror := _mirror(body, ns)) is not None:
            out.append(RouteFilter(kind, request_mirror=mirror))
    return tuple(out)


# Gateway API PreciseHostname (RFC 1123, lower case, no wildcard) and HTTP path patterns: they
# keep what a filter writes into a request line, Host or Location to characters that are legal
# there (no spaces, CR or LF, no non-ASCII text).
_PRECISE_HOSTNAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PATH = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+$")


def _shown(value: str) -> str:
    """The value as it can be printed on one line (CR, LF and the like escaped)."""
    return value.encode("unicode_escape").decode("ascii")


def _hostname(o: Obj, key: str) -> str | None:
    value = o.string(key)
    if value is not None and (len(value) > 253 or not _PRECISE_HOSTNAME.match(value)):
        o.r.error(o.value_pos(key), f"{o.field(key)}: '{_shown(value)}' is not a valid hostname "
                  "(RFC 1123, lower case)")
        return None
    return value


def _redirect(o: Obj) -> RequestRedirect:
    status = o.integer("statusCode", 302)
    if status not in REDIRECT_STATUS_CODES:
        o.r.error(o.value_pos("statusCode"), f"{o.field('statusCode')}: unknown value '{status}' "
                  f"(expected one of: {', '.join(map(str, REDIRECT_STATUS_CODES))})")
        status = 302
    return RequestRedirect(
        scheme=o.string("scheme", choices=REDIRECT_SCHEMES),
        hostname=_hostname(o, "hostname"),
        path=_path_modifier(o),
        port=o.port("port"),
        status_code=status,
    )


def _header_modifier(o: Obj) -> HeaderModifier:
    def headers(key: str) -> tuple[HTTPHeader, ...]:
        out = []
        for h in o.objs(key):
            name, value = _header_name(h, "name"), h.string("value", required=True)
            if value is not None and ("\r" in value or "\n" in value):
                h.r.error(h.value_pos("value"), f"{h.field('value')}: must not contain CR or LF")
            elif name is not None and value is not None:
                out.append(HTTPHeader(name=name, value=value))
        return tuple(out)

    removed = []
    for path, node in o.items("remove"):
        name = o.r.to_str(node, path)
        if name is not None and not HEADER_NAME_RE.match(name):
            o.r.error(node.pos, f"{path}: '{name}' is not a valid header name")
        elif name is not None:
            removed.append(name)
    return HeaderModifier(set=headers("set"), add=headers("add"), remove=tuple(removed))


def _path_modifier(o: Obj) -> PathModifier | None:
    p = o.obj("path")
    if p is None:
        return None
    kind = p.string("type", required=True, choices=PATH_MODIFIER_TYPES)
    values = {}
    for ptype in PATH_MODIFIER_TYPES:
        key = ptype[0].lower() + ptype[1:]
        if ptype == kind:
            values[ptype] = p.string(key, required=True)
            if values[ptype] is not None and not values[ptype].startswith("/"):
                p.r.error(p.value_pos(key), f"{p.field(key)}: '{values[ptype]}' must start with '/'")
            elif values[ptype] is not None and not _PATH.match(values[ptype]):
                p.r.error(p.value_pos(key), f"{p.field(key)}: '{_shown(values[ptype])}' is not a valid "
                          "path (escape other characters with %XX)")
        else:
            if p.has(key) and kind is not None:
                p.r.error(p.pos(key), f"{p.field(key)}: does not belong to a path modifier of type {kind}")
            p.entry(key)
    if kind is None:
        return None
    return PathModifier(type=kind, replace_full_path=values.get("ReplaceFullPath"),
                        replace_prefix_match=values.get("ReplacePrefixMatch"))


def _check_prefix_rewrites(o: Obj, matches: tuple[RouteMatch, ...], filters: tuple[RouteFilter, ...]) -> None:
    """ReplacePrefixMatch needs every match of the rule to be a PathPrefix match (Gateway API)."""
    for i, f in enumerate(filters):
        mod = f.url_rewrite or f.request_redirect
        if mod is None or mod.path is None or mod.path.type != "ReplacePrefixMatch":
            continue
        if any(m.path.type != "PathPrefix" for m in matches):
            o.r.error(o.r.paths.get(f"{o.path}.filters[{i}]", o.where), f"{o.path}.filters[{i}]: "
                      "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")


def _mirror(o: Obj, ns: str) -> RequestMirror | None:
    ref = o.obj("backendRef", required=True)
    percent = o.integer("percent", lo=0, hi=100)
    fraction = None
    if (f := o.obj("fraction")) is not None:
        numerator = f.integer("numerator", required=True, lo=0)
        denominator = f.integer("denominator", 100, lo=1)
        if numerator is not None and numerator > denominator:
            f.r.error(f.value_pos("numerator"), f"{f.field('numerator')}: must not be more than denominator")
        fraction = Fraction(numerator or 0, denominator)
    if percent is not None and fraction is not None:
        o.r.error(o.pos("fraction"), f"{o.field('fraction')}: give percent or fraction, not both")
    if ref is None:
        return None
    ref.string("group", "", choices=("", "core"))
    kind = ref.string("kind", "Service", choices=("Service",))
    name = ref.string("name", required=True)
    namespace = check_name(ref, "namespace", ref.string("namespace", ns), label=True) or ns
    port = ref.port("port")
    if name is None:
        return None
    ref.r.refs.append((service_key(name, namespace), ref.field("name"), port))
    return RequestMirror(BackendObjectRef(name=name, namespace=namespace, port=port, kind=kind),
                         percent=percent, fraction=fraction)


def _backend_ref(o: Obj, ns: str, types: tuple[str, ...]) -> BackendRef | None:
    o.string("group", "", choices=("", "core"))
    kind = o.string("kind", "Service", choices=("Service",))
    name = o.string("name", required=True)
    namespace = check_name(o, "namespace", o.string("namespace", ns), label=True) or ns
    port = o.port("port")
    weight = o.integer("weight", 1, lo=0, hi=1_000_000)
    filters = parse_filters(o, ns, types)
    if name is None:
        return None
    o.r.refs.append((service_key(name, namespace), o.field("name"), port))
    return BackendRef(name=name, namespace=namespace, port=port, weight=weight, filters=filters, kind=kind)
