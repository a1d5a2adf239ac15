"""YAML text to a tree of nodes that remember where they are (file, 1-based line and column).

PyYAML's composer gives nodes with marks; this module turns them into three small node types
so that the parsers can point every error at the key or value it is about. Scalars are built
with YAML's safe rules, except mapping keys, which are always kept as the text written: in
YAML 1.1 the key `on` (as in `retry.on`) would otherwise become the boolean true.
No I/O here: the loader reads files and hands their text in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Union

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from meshproxy.config.diagnostics import Diagnostics, Pos

# libyaml's composer (same nodes, same marks) is about four times faster than the pure-Python
# one: it decides how long a large mesh takes to load and to reload on every change.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_PLAIN_TAGS = {
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:str",
}


@dataclass(frozen=True, eq=False)
class YScalar:
    """A scalar: None, bool, int, float or str, and where it was written."""

    pos: Pos
    value: Any


@dataclass(frozen=True, eq=False)
class YSeq:
    """A sequence of nodes."""

    pos: Pos
    items: tuple["YNode", ...]


@dataclass(frozen=True, eq=False)
class YEntry:
    """One `key: value` pair of a mapping; `key_pos` is where the key was written."""

    key: str
    key_pos: Pos
    value: "YNode"


@dataclass(frozen=True, eq=False)
class YMap:
    """A mapping with string keys, in the order written."""

    pos: Pos
    entries: dict[str, YEntry] = field(default_factory=dict)


YNode = Union[YScalar, YSeq, YMap]


# Bounds on what a file may make of its nodes (a configuration nests about ten levels deep and
# uses aliases, if at all, for a few shared blocks):
# - nesting: the builder below recurses once per level, as do the parsers after it;
#   libyaml's composer recurses in C and overflows an 8 MiB stack (SIGSEGV) somewhere past
#   20,000 levels, so text that could nest deeper than SCAN_DEPTH_ABOVE levels has its
#   events counted before it is composed;
# - aliases: each repeats the node it names, so a few lines can stand for billions of
#   nodes ("billion laughs"), or for one containing itself.
MAX_DEPTH = 100
SCAN_DEPTH_ABOVE = 4000
NODES_PER_CHARACTER = 10
NODES_ALWAYS = 10_000
_END = object()


def _pos(file: str, mark: yaml.Mark) -> Pos:
    return Pos(file, mark.line + 1, mark.column + 1)


class _Refused(Exception):
    """A document past the bounds above: `mark`, where; `problem`, what."""

    def __init__(self, mark: yaml.Mark, problem: str) -> None:
        super().__init__(problem)
        self.mark = mark
        self.problem = problem


class _Builder:
    """Turns composed PyYAML nodes into Y* nodes, reporting duplicate and non-scalar keys.
    Raises _Refused for nesting past MAX_DEPTH, an alias inside the node it names, or
    aliases that expand past `max_nodes` nodes."""

    def __init__(self, file: str, diags: Diagnostics, max_nodes: int) -> None:
        self.file = file
        self.diags = diags
        self.constructor = SafeConstructor()
        self.max_nodes = max_nodes
        self.nodes = 0  # built so far, aliases expanded
        self.open: set[int] = set()  # the collections being built (ids): an alias to one is a cycle

    def build(self, node: yaml.Node, depth: int = 0) -> YNode:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise _Refused(node.start_mark, f"aliases expand to more than {self.max_nodes} nodes")
        pos = _pos(self.file, node.start_mark)
        if isinstance(node, MappingNode):
            self._enter(node, depth)
            entries: dict[str, YEntry] = {}
            for key_node, value_node in node.value:
                key_pos = _pos(self.file, key_node.start_mark)
                if not isinstance(key_node, ScalarNode):
                    self.diags.error(key_pos, "a mapping key must be a plain string")
                    continue
                key = key_node.value
                if key in entries:
                    first = entries[key].key_pos
                    self.diags.error(key_pos, f"duplicate key '{key}' (first at line {first.line})")
                    continue
                entries[key] = YEntry(key, key_pos, self.build(value_node, depth + 1))
            self.open.discard(id(node))
            return YMap(pos, entries)
        if isinstance(node, SequenceNode):
            self._enter(node, depth)
            items = tuple([self.build(item, depth + 1) for item in node.value])
            self.open.discard(id(node))
            return YSeq(pos, items)
        if node.tag in _PLAIN_TAGS:
            return YScalar(pos, self.constructor.construct_object(node))
        # Timestamps, binary and custom tags stay the text written; fields that want
        # a string get it, the others report a wrong type.
        return YScalar(pos, node.value)

    def _enter(self, node: yaml.Node, depth: int) -> None:
        """Before building a collection: refuse it nested too deep, or inside itself."""
        if depth >= MAX_DEPTH:
            raise _Refused(node.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        if id(node) in self.open:
            raise _Refused(node.start_mark, "an alias inside the node it names")
        self.open.add(id(node))


def _too_deep(text: str) -> tuple[int, yaml.Mark] | None:
    """(document index, mark) of the first node of `text` nested deeper than MAX_DEPTH, or
    None. Every level is a flow bracket or at least one more column of a line, so the events
    (libyaml's parser keeps no C stack per level) are only counted when those could add up
    to more than SCAN_DEPTH_ABOVE; the builder checks the depth of anything shallower."""
    if text.count("[") + text.count("{") + max(map(len, text.splitlines()), default=0) <= SCAN_DEPTH_ABOVE:
        return None
    document = -1
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    return document, event.start_mark
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                document += 1
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" in (exc.problem or ""):
            # libyaml's own limit (PyYAML 6.0.4 and later: 1000 levels), met while it scans
            # flow brackets ahead, before the event of the level past ours reaches the loop
            # above: find that level in the text.
            mark = _flow_level_mark(text, MAX_DEPTH + 1)
            if mark is not None:
                return max(document, 0), mark
    except yaml.YAMLError:
        pass  # composing reports it, at the same place
    return None


def _flow_level_mark(text: str, level: int) -> yaml.Mark | None:
    """Where the flow bracket that opens nesting level `level` is, or None: brackets in
    quoted scalars and comments do not count. Only for text libyaml has already refused as
    too deep, so that the error names the place our limit is passed."""
    depth = 0
    line = column = 0
    quote = ""
    comment = False
    for index, char in enumerate(text):
        if char == "\n":
            line, column, comment = line + 1, 0, False
            continue
        if comment:
            pass
        elif quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#" and (column == 0 or text[index - 1] in " \t"):
            comment = True
        elif char in "[{":
            depth += 1
            if depth == level:
                return yaml.Mark("<text>", index, line, column, None, None)
        elif char in "]}":
            depth -= 1
        column += 1
    return None


def _line_col(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    line = before.count("\n") + 1
    return line, offset - (before.rfind("\n") + 1) + 1


def parse_yaml(text: str, file: str, diags: Diagnostics) -> list[YNode]:
    """Return the non-empty documents of `text` as located nodes.

    A YAML syntax error is recorded in `diags` at its line and column; documents before it are
    still returned, the rest of the file is not read. Nothing is raised.
    """
    builder = _Builder(file, diags, NODES_PER_CHARACTER * len(text) + NODES_ALWAYS)
    docs: list[YNode] = []
    try:
        deep = _too_deep(text)
        composed = yaml.compose_all(text, Loader=_LOADER)
        for index in itertools.count():
            if deep is not None and index == deep[0]:
                # Stop before libyaml composes it (the next `next` would).
                raise _Refused(deep[1], f"nested deeper than {MAX_DEPTH} levels")
            node = next(composed, _END)
            if node is _END:
                break
            if node is None:
                continue
            doc = builder.build(node)
            if isinstance(doc, YScalar) and doc.value is None:
                continue  # an empty document, e.g. between two `---`
            docs.append(doc)
    except _Refused as exc:
        diags.error(_pos(file, exc.mark), f"invalid YAML: {exc.problem}")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = _pos(file, mark) if mark is not None else Pos(file, 1, 1)
        problem = exc.problem or exc.context or "malformed YAML"
        if exc.context and exc.problem:
            problem = f"{exc.problem} ({exc.context})"
        diags.error(pos, f"invalid YAML: {problem}")
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        diags.error(Pos(file, line, col), f"invalid YAML: {exc.reason} (#x{code:04x})")
    return docs


def from_python(value: Any, file: str) -> YNode:
    """Wrap plain data (dicts, lists, scalars; e.g. a Kubernetes API object) as nodes.

    Every node gets the position `file:0:0`, so diagnostics name the object but no line.
    """
    pos = Pos(file)
    if isinstance(value, dict):
        return YMap(pos, {str(k): YEntry(str(k), pos, from_python(v, file)) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return YSeq(pos, tuple(from_python(v, file) for v in value))
    return YScalar(pos, value)


def to_python(node: YNode) -> Any:
    """Return the plain data of a node (dicts, lists, scalars): the document as written, without
    positions. The inverse of `from_python`; the control plane sends documents in this form."""
    if isinstance(node, YMap):
        return {key: to_python(entry.value) for key, entry in node.entries.items()}
    if isinstance(node, YSeq):
        return [to_python(item) for item in node.items]
    return node.value
