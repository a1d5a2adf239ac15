"""HTTPRoute filters applied to request and response heads: pure, no I/O.

`RequestHeaderModifier`/`ResponseHeaderModifier` (set, add, remove), `URLRewrite` (hostname,
`ReplaceFullPath`, `ReplacePrefixMatch`) and the Location of a `RequestRedirect`. Mirroring is
done by the data plane; this module only says where to.

Header names compare case-insensitively (RFC 9110 §5.1); `set` replaces every field of that name
with one, `add` appends one, `remove` drops every field of that name. Values are sent as UTF-8
(bytes above 0x7F are obs-text to HTTP, RFC 9110 §5.5), so any value YAML can hold is sendable.
Framing and hop-by-hop fields are never set or added: the proxy writes those itself for each
hop, and a second Content-Length or a Transfer-Encoding from a filter would make the message
ambiguous (RFC 9112 §6.3) or contradict the connection handling.
"""

from __future__ import annotations

from meshproxy.config.model.route import HeaderModifier, PathModifier, RequestRedirect
from meshproxy.http1.headers import HOP_BY_HOP

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NOT_MODIFIABLE = HOP_BY_HOP | {b"content-length"}


def modify_headers(fields: list, modifier: HeaderModifier) -> list:
    """Return a new list: `fields` ((name, value) byte pairs) changed by `modifier`."""
    result = list(fields)
    if modifier.remove:
        gone = {name.lower().encode("latin-1") for name in modifier.remove}
        result = [(k, v) for k, v in result if k.lower() not in gone]
    for header in modifier.set:
        name = header.name.encode("latin-1")
        lname = name.lower()
        if lname in _NOT_MODIFIABLE:
            continue
        result = [(k, v) for k, v in result if k.lower() != lname]
        result.append((name, header.value.encode("utf-8")))
    for header in modifier.add:
        name = header.name.encode("latin-1")
        if name.lower() in _NOT_MODIFIABLE:
            continue
        result.append((name, header.value.encode("utf-8")))
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
