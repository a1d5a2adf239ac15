"""The one place that reads configuration files: paths (files or folders) to a Snapshot.

Folders give every `*.yaml` / `*.yml` below them, sorted, skipping hidden entries (a mounted
ConfigMap keeps older copies in `..2024_...` folders). A Mesh's `spec.policies` are loaded too,
relative to the Mesh file. Each file is read once, however often it is named. Documents are
taken in load order: files sorted by path, then documents in file order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from meshproxy.config.diagnostics import ConfigError, Diagnostic, Diagnostics, Pos
from meshproxy.config.model import Mesh, Resource, Service
from meshproxy.config.parse import Parsed, parse_document
from meshproxy.config.snapshot import Snapshot
from meshproxy.config.validate import cross_check
from meshproxy.config.yamlsource import YNode, from_python, parse_yaml

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadResult:
    """Everything one load found: files read (load order), resources, errors and warnings."""

    files: tuple[str, ...]
    resources: tuple[Resource, ...]
    errors: tuple[Diagnostic, ...]
    warnings: tuple[Diagnostic, ...]
    # Each resource's document as written (plain data, no positions), same order as `resources`.
    documents: tuple[dict, ...] = ()

    @property
    def ok(self) -> bool:
        """True when there is no error."""
        return not self.errors


def _yaml_files_below(folder: str) -> list[str]:
    out = []
    visited: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, n) for n in names if n.endswith(YAML_SUFFIXES) and not n.startswith("."))
    return sorted(out)


class _Files:
    """The set of files to read, each once (by real path), named as the user named them."""

    def __init__(self, diags: Diagnostics) -> None:
        self.diags = diags
        self.by_real: dict[str, str] = {}

    def add(self, path: str, where: Pos | None, what: str = "") -> None:
        """Add a file or every YAML file of a folder; a missing path is an error at `where`
        (or naming the path itself when it was given directly)."""
        if os.path.isdir(path):
            found = _yaml_files_below(path)
            if not found:
                named = f" '{path}'" if where is not None else ""
                self.diags.warning(where or Pos(path), f"{what}no *.yaml or *.yml files in folder{named}")
            for file in found:
                self.by_real.setdefault(os.path.realpath(file), file)
        elif os.path.exists(path):
            self.by_real.setdefault(os.path.realpath(path), path)
        else:
            named = f" '{path}'" if where is not None else ""
            self.diags.error(where or Pos(path), f"{what}no such file or folder{named}")

    def ordered(self) -> list[str]:
        """The files in load order: sorted by absolute path."""
        return sorted(self.by_real.values(), key=os.path.abspath)


def _read(file: str, diags: Diagnostics) -> str | None:
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as exc:
        diags.error(Pos(file), f"cannot read: {exc.strerror or exc}")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        diags.error(Pos(file, line, col), "not UTF-8 text")
        return None


class ParseCache:
    """Each file's parsed documents, kept while its text is unchanged.

    A watcher reloads everything on every change; with the cache only the files that changed
    are parsed again (parsing is most of a load: a 1000-Service mesh took seconds to parse and
    a tenth of a second to load from the cache). Cross-file checks still run on every load.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[str, list[Parsed], list[Diagnostic]]] = {}

    def parse(self, file: str, text: str, diags: Diagnostics) -> list[Parsed]:
        """Return the parsed documents of `file` with text `text`; its diagnostics go to `diags`."""
        entry = self._files.get(file)
        if entry is None or entry[0] != text:
            local = Diagnostics()
            parsed = [parse_document(doc, local) for doc in parse_yaml(text, file, local)]
            entry = self._files[file] = (text, parsed, local.recorded())
        diags.extend(entry[2])
        return entry[1]

    def forget_others(self, files: Iterable[str]) -> None:
        """Drop the entries of files that are no longer loaded."""
        keep = set(files)
        for file in [f for f in self._files if f not in keep]:
            del self._files[file]


def load(paths: Sequence[str], cache: ParseCache | None = None) -> LoadResult:
    """Read, parse and check the files and folders `paths` and the policies their Mesh lists;
    with `cache`, files whose text did not change since the last load are not parsed again.

    Never raises for a problem in the configuration: errors and warnings are in the result.
    """
    cache = cache if cache is not None else ParseCache()
    diags = Diagnostics()
    files = _Files(diags)
    for path in paths:
        files.add(path, None)
    parsed_by_file: dict[str, list[Parsed]] = {}
    while True:
        pending = [f for f in files.ordered() if f not in parsed_by_file]
        if not pending:
            break
        for file in pending:
            text = _read(file, diags)
            parsed_by_file[file] = cache.parse(file, text, diags) if text is not None else []
            for p in parsed_by_file[file]:
                if isinstance(p.resource, Mesh):
                    _add_policies(p, p.resource, file, files)
    order = files.ordered()
    cache.forget_others(order)
    parsed = [p for file in order for p in parsed_by_file[file]]
    cross_check(parsed, diags)
    kept = [p for p in parsed if p.ok and p.resource is not None]
    resources = tuple(p.resource for p in kept)
    documents = tuple(p.document() for p in kept)
    return LoadResult(tuple(order), resources, tuple(diags.errors), tuple(diags.warnings), documents)


def _add_policies(p: Parsed, mesh: Mesh, mesh_file: str, files: _Files) -> None:
    base = os.path.dirname(mesh_file)
    for i, entry in enumerate(mesh.policies):
        path = f"spec.policies[{i}]"
        target = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(base, entry))
        files.add(target, p.pos(path), f"{path}: ")


def load_config(paths: Sequence[str]) -> Snapshot:
    """Return the Snapshot of the files and folders `paths`.

    Raises ConfigError (with every error, sorted by file and line) when anything is wrong.
    """
    result = load(paths)
    if result.errors:
        raise ConfigError(result.errors, result.warnings)
    return Snapshot(result.resources, warnings=result.warnings, files=result.files)


def load_text(text: str, file: str = "<config>") -> Snapshot:
    """Return the Snapshot of YAML `text` (one or more documents) named `file` in messages.

    A Mesh's `policies` are not followed (there is no folder to follow them from).
    Raises ConfigError when anything is wrong.
    """
    diags = Diagnostics()
    return _snapshot(parse_yaml(text, file, diags), diags, (file,), None)


def load_objects(objects: Iterable[Any], source: str = "<api>", services: Iterable[Service] | None = None,
                 version: str | None = None) -> Snapshot:
    """Return the Snapshot of plain objects (dicts as a Kubernetes API server returns them, or
    documents a control plane sent); `services`, when given, replace a Mesh's (discovery from
    Services and EndpointSlices); `version`, when given, is the Snapshot's version (the control
    plane's, so every proxy shows the same one).

    Diagnostics name `source` without a line. Raises ConfigError when anything is wrong.
    """
    diags = Diagnostics()
    return _snapshot([from_python(o, source) for o in objects], diags, (), services, version)


def _snapshot(docs: list[YNode], diags: Diagnostics, files: tuple[str, ...],
              services: Iterable[Service] | None, version: str | None = None) -> Snapshot:
    parsed = [parse_document(doc, diags) for doc in docs]
    cross_check(parsed, diags)
    if diags.errors:
        raise ConfigError(diags.errors, diags.warnings)
    resources = tuple(p.resource for p in parsed if p.resource is not None)
    return Snapshot(resources, warnings=tuple(diags.warnings), files=files, services=services, version=version)
