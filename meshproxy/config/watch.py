"""Watching configuration files and folders, and reloading them when their content changes.

Watched, recomputed after every reload: each folder given and every folder below it (hidden
ones aside, as the loader skips them), the folder of each file given, read or named as a Mesh's
policy (and of the file a symlink points at), and for a path that does not exist yet the nearest
folder above it that does. Each folder is watched one level deep, as a file's folder may be
large; a new subfolder shows up in its parent, and the reload that follows watches it too.
In the folder of a named file, events count for that name and for `..` entries: an editor's
save by rename shows up under the original's name, a ConfigMap update as a rename over `..data`.
Entries with one leading dot (editors' temporary and swap files) never count.
A reload whose files hold the same bytes as before yields nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import AsyncIterator, Callable, Sequence

from watchfiles import Change, awatch

from meshproxy.config.loader import LoadResult, ParseCache, load
from meshproxy.config.model import Mesh

# folder -> the entry names that matter in it, or None when every entry does
Watched = dict[str, "frozenset[str] | None"]
ContentKey = tuple[tuple[str, str], ...]
Batch = set[tuple[Change, str]]

_MAX_GROUP_MS = 400  # however busy the files are, a batch is handed over within this time


class ConfigWatcher:
    """Loads configuration paths (files or folders) and reloads them when their content changes.

    `debounce` is the quiet time in seconds that ends a batch of events; `poll_interval`, when
    given, polls that often (seconds) instead of using inotify and its kin. Raises ValueError
    when `paths` is empty.
    """

    def __init__(self, paths: Sequence[str], *, debounce: float = 0.05, poll_interval: float | None = None) -> None:
        if not paths:
            raise ValueError("no configuration paths to watch")
        self._paths = tuple(paths)
        self._step_ms = max(1, round(debounce * 1000))
        self._poll_interval = poll_interval
        self._files: tuple[str, ...] = ()
        self._key: ContentKey | None = None
        self._watched: Watched = {}
        self._stats: tuple[tuple[int, ...], ...] = ()
        self._generation = 0
        self._cache = ParseCache()  # a reload parses only the files that changed

    def load(self) -> LoadResult:
        """Load the paths now and remember what to watch; return what `loader.load` returns
        (errors are in the result, never raised)."""
        result, key = self._read()
        self._accept(result, key)
        return result

    def generation(self) -> int:
        """Return a number for the content last loaded: the largest st_mtime_ns of the files
        read and the watched folders, never lower than before, and higher than before whenever
        the content changed (one more than before when the clock says otherwise)."""
        return self._generation

    async def changes(self) -> AsyncIterator[LoadResult]:
        """Yield a fresh LoadResult after each batch of changes that alters the content of the
        files read, invalid results (non-empty `errors`) included. When `load()` was not called
        first, the initial load is yielded first.

        Raises OSError when the folders cannot be watched (other than one vanishing as the
        watch starts, which is retried), such as a full inotify watch table.
        """
        if not self._watched:
            yield self.load()
        while True:
            watched = self._watched
            batches = _Batches(watched, self._step_ms, self._poll_interval)
            try:
                await batches.started()
                result = self._reload()  # anything that changed before the watch was in place
                if result is not None:
                    yield result
                while self._watched == watched:
                    batch = await batches.next()
                    if batch is None:  # a folder vanished as the watch started: list them again
                        await asyncio.sleep(self._step_ms / 1000)
                        watched = {}
                    elif not batch and self._fingerprint() == self._stats:
                        continue  # a polling round that found nothing
                    result = self._reload()
                    if result is not None:
                        yield result
            finally:
                await batches.close()

    def _reload(self) -> LoadResult | None:
        """Load again and update what to watch; return the result, or None when the bytes of
        the files read are the same as last time."""
        result, key = self._read()
        if key is not None and key == self._key:
            self._watched = self._watch_set(result)
            return None
        self._accept(result, key)
        return result

    def _read(self) -> tuple[LoadResult, ContentKey | None]:
        # Bytes and stats are taken before the loader reads: a write in between then makes them
        # older than the result (a later reload yields the same content once more), never newer
        # (which would hide that content for good). Hashing needs the list of files, known for
        # sure only after a load, so a load that finds other files is done again.
        files = self._files
        for _ in range(3):
            self._stats = self._fingerprint()
            key = tuple((file, _digest(file)) for file in files)
            result = load(self._paths, self._cache)
            if tuple(sorted(result.files)) == files:
                return result, key
            files = tuple(sorted(result.files))
        return result, None  # the files keep changing: no key, so the next reload is yielded

    def _fingerprint(self) -> tuple[tuple[int, ...], ...]:
        """What polling compares between rounds. watchfiles' polling compares whole seconds of
        modification time; this catches a rewrite within the same second."""
        if self._poll_interval is None:
            return ()
        return tuple(_stat(p) for p in (*self._files, *sorted(self._watched)))

    def _accept(self, result: LoadResult, key: ContentKey | None) -> None:
        self._files = tuple(sorted(result.files))
        self._key = key
        self._watched = self._watch_set(result)
        stamp = max(_stat(p)[0] for p in (*result.files, *self._watched))
        self._generation = stamp if stamp > self._generation else self._generation + 1

    def _watch_set(self, result: LoadResult) -> Watched:
        any_entry: set[str] = set()
        named: dict[str, set[str]] = {}

        def add(path: str) -> None:
            path = os.path.abspath(path)
            if os.path.isdir(path):
                any_entry.update(_folders_below(path))
                return
            for target in {path, os.path.realpath(path)}:
                parent, name = os.path.split(target)
                while not os.path.isdir(parent):  # ends at the root, which is a folder
                    parent, name = os.path.split(parent)
                named.setdefault(parent, set()).add(name)

        for path in (*self._paths, *result.files):
            add(path)
        for res in result.resources:
            if isinstance(res, Mesh) and res.source is not None:
                base = os.path.dirname(res.source.file)
                for entry in res.policies:
                    add(entry if os.path.isabs(entry) else os.path.join(base, entry))
        watched: Watched = {folder: None for folder in any_entry}
        watched.update((folder, frozenset(names)) for folder, names in named.items() if folder not in any_entry)
        return watched


class _Batches:
    """One `awatch` over a fixed set of folders, read a batch at a time."""

    def __init__(self, watched: Watched, step_ms: int, poll_interval: float | None) -> None:
        self._stop = asyncio.Event()
        poll_ms = max(1, round((poll_interval or 0.3) * 1000))
        self._agen = awatch(
            *sorted(watched), watch_filter=_wanted(watched), recursive=False, stop_event=self._stop,
            step=step_ms, debounce=max(step_ms, _MAX_GROUP_MS), ignore_permission_denied=True,
            force_polling=poll_interval is not None, poll_delay_ms=poll_ms,
            # When polling, an empty batch after each quiet round lets the caller compare stats.
            rust_timeout=poll_ms if poll_interval is not None else None, yield_on_timeout=poll_interval is not None,
        )
        self._next = asyncio.ensure_future(anext(self._agen, None))

    async def started(self) -> None:
        """Return once the folders are being watched (or watching them failed)."""
        # The watcher is set up in the generator's first step; `ag_await` is set once it awaits.
        for _ in range(1000):
            if self._next.done() or self._agen.ag_await is not None:
                return
            await asyncio.sleep(0)

    async def next(self) -> Batch | None:
        """Wait for a batch of events and return it (empty after a quiet polling round), or
        None when a folder vanished before it could be watched. Raises OSError for any other
        failure to watch."""
        await asyncio.wait([self._next])  # not `await self._next`: a cancel must not reach it
        try:
            batch = self._next.result()
        except FileNotFoundError:
            return None
        self._next = asyncio.ensure_future(anext(self._agen, None))
        return batch or set()

    async def close(self) -> None:
        """Stop watching (within one step) and release the watcher."""
        self._stop.set()
        await asyncio.wait([self._next])
        if not self._next.cancelled():
            self._next.exception()  # retrieved: a failure here is no longer anyone's concern
        await self._agen.aclose()


def _wanted(watched: Watched) -> Callable[[Change, str], bool]:
    def wanted(change: Change, path: str) -> bool:
        parent, name = os.path.split(path)
        if name.startswith(".") and not name.startswith(".."):
            # An editor's temporary or swap file (`.mesh.yaml.tmp`): the loader never reads it,
            # and the rename that follows is an event of its own. Reloading for it too made
            # every save by rename cost two reloads. (A ConfigMap's entries start with "..".)
            return path in watched
        names = watched.get(parent, frozenset())
        return path in watched or names is None or name in names or (parent in watched and name.startswith("."))

    return wanted


def _folders_below(folder: str) -> list[str]:
    """The folder and every folder below it, hidden ones aside, following links once."""
    out: list[str] = []
    visited: set[str] = set()
    for root, dirs, _ in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        out.append(root)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return out


def _digest(file: str) -> str:
    try:
        with open(file, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.errno}"


def _stat(path: str) -> tuple[int, ...]:
    """(st_mtime_ns, st_size, st_ino) of `path` followed through links; zeros when missing."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
