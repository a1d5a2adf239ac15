"""Typed reads from located YAML nodes, each error reported at the key or value it is about.

Every field a parser reads from a mapping is remembered, so that when the document is done,
`Reader.finish()` names each field nobody asked for, together with the ones that are allowed.
A value that is wrong is reported and read as absent, so parsing goes on and finds every error.
A null value (`key:` with nothing after it) counts as absent, as in Kubernetes.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from meshproxy.config.diagnostics import Diagnostics, Pos
from meshproxy.config.duration import parse_duration
from meshproxy.config.model.common import FrozenMap
from meshproxy.config.yamlsource import YEntry, YMap, YNode, YScalar, YSeq


def describe(node: YNode) -> str:
    """Return what a node is, for messages: `a list`, `an integer (3)`, `a string ('x')`."""
    if isinstance(node, YMap):
        return "a mapping"
    if isinstance(node, YSeq):
        return "a list"
    value = node.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    return f"a string ('{value}')"


def join(path: str, key: str) -> str:
    """Return the dotted field path of `key` below `path`."""
    return f"{path}.{key}" if path else key


def parse_address(text: str) -> tuple[str, int]:
    """Return (host, port) of `HOST:PORT` (`[V6]:PORT` for IPv6).

    Raises ValueError when it is not of that shape or the port is not in 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
        host = host[1:-1]
    elif ":" in host or any(c.isspace() or c in "/[]@" for c in host):
        raise ValueError("expected HOST:PORT")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535")
    return host, port


class Reader:
    """The diagnostics of one document and every mapping opened on it."""

    def __init__(self, diags: Diagnostics) -> None:
        self.diags = diags
        self._opened: list[Obj] = []
        # Field path -> where its value was written, for checks that look across documents.
        self.paths: dict[str, Pos] = {}
        # (service key, field path, port or None) of every Service reference, for warnings.
        self.refs: list[tuple[str, str, int | None]] = []

    def error(self, pos: Pos, message: str) -> None:
        """Record an error."""
        self.diags.error(pos, message)

    def obj(self, node: YNode, path: str, where: Pos | None = None) -> "Obj | None":
        """Return `node` as an Obj, or None (after an error) when it is not a mapping."""
        if not isinstance(node, YMap):
            self.error(node.pos, f"{path or 'document'}: expected a mapping, got {describe(node)}")
            return None
        obj = Obj(self, node, path, where or node.pos)
        self._opened.append(obj)
        self.paths.setdefault(path, node.pos)
        return obj

    def finish(self) -> None:
        """Report every field of every opened mapping that no parser read."""
        for obj in self._opened:
            obj.report_unknown()
        self._opened.clear()

    # Conversions of single nodes; each returns None after reporting a problem.

    def to_str(self, node: YNode, path: str, choices: Iterable[str] | None = None) -> str | None:
        """Return the node's string; with `choices`, it must be one of them."""
        if not isinstance(node, YScalar) or not isinstance(node.value, str):
            self.error(node.pos, f"{path}: expected a string, got {describe(node)}")
            return None
        if choices is not None and node.value not in choices:
            self.error(node.pos, f"{path}: unknown value '{node.value}' (expected one of: {', '.join(choices)})")
            return None
        return node.value

    def to_int(self, node: YNode, path: str, lo: int | None = None, hi: int | None = None) -> int | None:
        """Return the node's integer, checked against lo..hi."""
        if not isinstance(node, YScalar) or isinstance(node.value, bool) or not isinstance(node.value, int):
            self.error(node.pos, f"{path}: expected an integer, got {describe(node)}")
            return None
        return self._in_range(node, path, node.value, lo, hi)

    def to_number(self, node: YNode, path: str, lo: float | None = None, hi: float | None = None) -> float | None:
        """Return the node's number (integer or decimal) as a float, checked against lo..hi."""
        value = node.value if isinstance(node, YScalar) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(node.pos, f"{path}: expected a number, got {describe(node)}")
            return None
        checked = self._in_range(node, path, value, lo, hi)
        return None if checked is None else float(checked)

    def _in_range(self, node: YNode, path: str, value: Any, lo: Any, hi: Any) -> Any:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                self.error(node.pos, f"{path}: {value} must be at least {lo}")
            else:
                self.error(node.pos, f"{path}: {value} is out of range {lo}..{hi}")
            return None
        return value

    def to_port(self, node: YNode, path: str) -> int | None:
        """Return the node's port number, 1..65535."""
        if not isinstance(node, YScalar) or isinstance(node.value, bool) or not isinstance(node.value, int):
            self.error(node.pos, f"{path}: expected a port number, got {describe(node)}")
            return None
        if not 1 <= node.value <= 65535:
            self.error(node.pos, f"{path}: port {node.value} is out of range 1..65535")
            return None
        return node.value

    def to_bool(self, node: YNode, path: str) -> bool | None:
        """Return the node's boolean."""
        if not isinstance(node, YScalar) or not isinstance(node.value, bool):
            self.error(node.pos, f"{path}: expected true or false, got {describe(node)}")
            return None
        return node.value

    def to_duration(self, node: YNode, path: str, positive: bool = False) -> float | None:
        """Return the node's Gateway API duration in seconds; with `positive`, 0 is refused."""
        if not (isinstance(node, YScalar) and isinstance(node.value, str)):
            self.error(node.pos, f"{path}: expected a duration like 250ms or 2s, got {describe(node)}")
            return None
        text = node.value
        try:
            seconds = parse_duration(text)
        except ValueError:
            self.error(node.pos, f"{path}: bad duration '{text}' (expected e.g. 250ms, 2s, 1m, 1h30m)")
            return None
        if positive and seconds <= 0:
            self.error(node.pos, f"{path}: must be longer than 0s")
            return None
        return seconds

    def to_address(self, node: YNode, path: str) -> tuple[str, int] | None:
        """Return (host, port) of a `HOST:PORT` string."""
        text = self.to_str(node, path)
        if text is None:
            return None
        try:
            return parse_address(text)
        except ValueError as exc:
            self.error(node.pos, f"{path}: bad address '{text}' ({exc}; e.g. 127.0.0.1:9000)")
            return None


class Obj:
    """One YAML mapping being parsed: typed reads by key, remembering which keys were read."""

    def __init__(self, reader: Reader, node: YMap, path: str, where: Pos) -> None:
        self.r = reader
        self.node = node
        self.path = path
        self.where = where  # where "missing field" errors point: the key holding this mapping
        self._read: list[str] = []
        self._ignored: set[str] = set()

    def has(self, key: str) -> bool:
        """True when `key` is present with a non-null value (does not count as a read)."""
        entry = self.node.entries.get(key)
        return entry is not None and not (isinstance(entry.value, YScalar) and entry.value.value is None)

    def entry(self, key: str, required: bool = False) -> YEntry | None:
        """Return the entry of `key` (None when absent or null); records the read."""
        if key not in self._read:
            self._read.append(key)
        if not self.has(key):
            if required:
                where = f"{self.path}: " if self.path else ""
                self.r.error(self.where, f"{where}missing required field '{key}'")
            return None
        entry = self.node.entries[key]
        self.r.paths[self.field(key)] = entry.value.pos
        return entry

    def ignore(self, *keys: str) -> None:
        """Accept `keys` without reading them and without naming them among the allowed fields."""
        self._ignored.update(keys)

    def field(self, key: str) -> str:
        """Return the dotted path of `key`, for messages."""
        return join(self.path, key)

    def _get(self, key: str, convert: Callable[..., Any], default: Any, required: bool, *args: Any) -> Any:
        entry = self.entry(key, required)
        if entry is None:
            return default
        value = convert(entry.value, self.field(key), *args)
        return default if value is None else value

    def string(self, key: str, default: Any = None, *, required: bool = False,
            choices: Iterable[str] | None = None) -> Any:
        """Return the string at `key` (or `default`); with `choices`, one of them."""
        return self._get(key, self.r.to_str, default, required, None if choices is None else tuple(choices))

    def integer(self, key: str, default: Any = None, *, required: bool = False,
            lo: int | None = None, hi: int | None = None) -> Any:
        """Return the integer at `key` (or `default`), checked against lo..hi."""
        return self._get(key, self.r.to_int, default, required, lo, hi)

    def number(self, key: str, default: Any = None, *, lo: float | None = None, hi: float | None = None) -> Any:
        """Return the number at `key` as a float (or `default`), checked against lo..hi."""
        return self._get(key, self.r.to_number, default, False, lo, hi)

    def port(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        """Return the port number at `key` (or `default`)."""
        return self._get(key, self.r.to_port, default, required)

    def boolean(self, key: str, default: Any = None) -> Any:
        """Return the boolean at `key` (or `default`)."""
        return self._get(key, self.r.to_bool, default, False)

    def duration(self, key: str, default: Any = None, *, positive: bool = False) -> Any:
        """Return the duration at `key` in seconds (or `default`)."""
        return self._get(key, self.r.to_duration, default, False, positive)

    def address(self, key: str, *, required: bool = False) -> tuple[str, int] | None:
        """Return (host, port) of the `HOST:PORT` at `key`, or None."""
        return self._get(key, self.r.to_address, None, required)

    def obj(self, key: str, *, required: bool = False) -> "Obj | None":
        """Return the mapping at `key` as an Obj, or None when absent or not a mapping."""
        entry = self.entry(key, required)
        if entry is None:
            return None
        return self.r.obj(entry.value, self.field(key), entry.key_pos)

    def items(self, key: str, *, required: bool = False) -> list[tuple[str, YNode]]:
        """Return (path, node) of each item of the list at `key`; [] when absent or not a list."""
        entry = self.entry(key, required)
        if entry is None:
            return []
        if not isinstance(entry.value, YSeq):
            self.r.error(entry.value.pos, f"{self.field(key)}: expected a list, got {describe(entry.value)}")
            return []
        out = [(f"{self.field(key)}[{i}]", item) for i, item in enumerate(entry.value.items)]
        self.r.paths.update((path, item.pos) for path, item in out)
        return out

    def objs(self, key: str, *, required: bool = False) -> list["Obj"]:
        """Return each mapping of the list at `key`; items that are not mappings are reported."""
        out = []
        for path, node in self.items(key, required=required):
            obj = self.r.obj(node, path)
            if obj is not None:
                out.append(obj)
        return out

    def strs(self, key: str, *, choices: Iterable[str] | None = None) -> tuple[str, ...]:
        """Return the strings of the list at `key` (bad items are reported and left out)."""
        allowed = None if choices is None else tuple(choices)
        values = (self.r.to_str(node, path, allowed) for path, node in self.items(key))
        return tuple(v for v in values if v is not None)

    def str_map(self, key: str) -> FrozenMap:
        """Return the str→str mapping at `key` (labels); an empty one when absent."""
        obj = self.obj(key)
        if obj is None:
            return FrozenMap()
        out = {}
        for name, entry in obj.node.entries.items():
            obj.entry(name)
            value = self.r.to_str(entry.value, obj.field(name))
            if value is not None:
                out[name] = value
        return FrozenMap(out)

    def pos(self, key: str) -> Pos:
        """Return where `key` was written (the mapping's own position when absent)."""
        entry = self.node.entries.get(key)
        return entry.key_pos if entry is not None else self.where

    def value_pos(self, key: str) -> Pos:
        """Return where the value of `key` was written (the mapping's position when absent)."""
        entry = self.node.entries.get(key)
        return entry.value.pos if entry is not None else self.where

    def report_unknown(self) -> None:
        """Report every key of this mapping that was never read."""
        for key, entry in self.node.entries.items():
            if key not in self._read and key not in self._ignored:
                allowed = ", ".join(sorted(self._read)) or "none"
                where = f"{self.path}: " if self.path else ""
                self.r.error(entry.key_pos, f"{where}unknown field '{key}' (allowed: {allowed})")
