"""HTTPRoute filters applied to request and response heads: pure, no I/O.

`RequestHeaderModifier`/`ResponseHeaderModifier` (set, add, remove), `URLRewrite` (hostname,
`ReplaceFullPath`, `ReplacePrefixMatch`) and the Location of a `RequestRedirect`. Mirroring is
done by the data plane; this module only says where to.

Header names compare case-insensitively (RFC 9110 §5.1); `set` replaces every field of that name
with one, `add` appends one, `remove` drops every field of that name.
"""

from __future__ import annotations

from meshproxy.config.model.route import HeaderModifier, PathModifier, RequestRedirect

_DEFAULT_PORTS = {"http": 80, "https": 443}


def modify_headers(fields: list, modifier: HeaderModifier) -> list:
    """Return `fields` ((name, value) byte pairs) changed by `modifier`."""
    result = list(fields)
    if modifier.remove:
        gone = {name.lower().encode("latin-1") for name in modifier.remove}
        result = [(k, v) for k, v in result if k.lower() not in gone]
    for header in modifier.set:
        name = header.name.encode("latin-1")
        lname = name.lower()
        result = [(k, v) for k, v in result if k.lower() != lname]
        result.append((name, header.value.encode("latin-1")))
    for header in modifier.add:
        result.append((header.name.encode("latin-1"), header.value.encode("latin-1")))
    return result


def replace_path(path: str, modifier: PathModifier, matched_prefix: str | None) -> str:
    """Return `path` (no query) rewritten by a ReplaceFullPath or ReplacePrefixMatch modifier.

    ReplacePrefixMatch replaces the PathPrefix that matched, whole segments only:
    prefix `/foo`, replacement `/bar`: `/foo/x` -> `/bar/x`, `/foo` -> `/bar`; replacement `/`:
    `/foo/x` -> `/x`.
    """
    if modifier.type == "ReplaceFullPath":
        return modifier.replace_full_path or "/"
    replacement = modifier.replace_prefix_match or "/"
    if matched_prefix is None:
        return path
    prefix = matched_prefix.rstrip("/")
    rest = path[len(prefix):] if path.startswith(prefix) else path
    new = replacement.rstrip("/") + rest
    if not new.startswith("/"):
        new = "/" + new
    return new


def rewrite_target(target: bytes, modifier: PathModifier, matched_prefix: str | None) -> bytes:
    """Return the request target with its path rewritten and its query kept."""
    path, sep, query = target.decode("latin-1").partition("?")
    new = replace_path(path, modifier, matched_prefix)
    return (new + sep + query).encode("latin-1")


def redirect_location(redirect: RequestRedirect, host: str, service_port: int, target: bytes,
                      matched_prefix: str | None) -> str:
    """Return the Location of a RequestRedirect.

    Parts the filter leaves out keep the request's: scheme `http`, the request's host name, its
    path and query. The port is the filter's, else the default port of a scheme the filter
    names, else the Service's port; it is left out when it is the scheme's default.
    """
    scheme = redirect.scheme or "http"
    hostname = redirect.hostname or _host_without_port(host)
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme is not None:
        port = _DEFAULT_PORTS[scheme]
    else:
        port = service_port
    path, sep, query = target.decode("latin-1").partition("?")
    if redirect.path is not None:
        path = replace_path(path, redirect.path, matched_prefix)
    authority = hostname if port == _DEFAULT_PORTS.get(scheme) else f"{hostname}:{port}"
    return f"{scheme}://{authority}{path}{sep}{query}"


def _host_without_port(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
