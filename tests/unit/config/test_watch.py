"""ConfigWatcher on real files: what it yields after edits, renames, ConfigMap swaps, errors.

The watcher re-reads the files once each time it (re)starts watching, to catch what changed
before the watch was in place. A change made before then would be found by that re-read alone,
so the tests make their changes only once the watch is in place: they count the watcher's
reads and wait for the one that follows a (re)start.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import pytest

import meshproxy.config.watch as watch_module
from meshproxy.config import LoadResult
from meshproxy.config.watch import ConfigWatcher

WAIT = 3.0  # seconds a yielded result (or a re-read) may take


def mesh(*policies: str) -> str:
    listed = f"  policies: [{', '.join(policies)}]\n" if policies else ""
    return ("apiVersion: meshproxy.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n"
            "  services:\n    - {name: api}\n" + listed)


def policy(name: str) -> str:
    return (f"apiVersion: meshproxy.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\n"
            "spec:\n  targetRef: {kind: Service, name: api}\n")


def names(result: LoadResult) -> list[str]:
    return sorted(f"{type(r).__name__}/{r.metadata.name}" for r in result.resources)


async def until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Watching:
    """Consumes a watcher's changes in a task, counting its reads of the files."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        real_load = watch_module.load

        def counting_load(paths: Sequence[str], cache=None) -> LoadResult:
            self.reads += 1
            return real_load(paths, cache)

        monkeypatch.setattr(watch_module, "load", counting_load)
        self.queue: asyncio.Queue[tuple[LoadResult, int]] = asyncio.Queue()
        self.reads_at_last = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self, watcher: ConfigWatcher) -> None:
        """Consume `watcher.changes()`; return once the folders are watched."""
        self.reads_at_last = self.reads
        self.task = asyncio.create_task(self._consume(watcher))
        await self.settled()

    async def _consume(self, watcher: ConfigWatcher) -> None:
        async for result in watcher.changes():
            self.queue.put_nowait((result, self.reads))

    async def next(self) -> LoadResult:
        result, self.reads_at_last = await asyncio.wait_for(self.queue.get(), WAIT)
        return result

    async def settled(self) -> None:
        """Wait for a read after the last result: the first thing the watcher does when that
        result calls for other folders is to watch them, then read the files again."""
        await until(lambda: self.reads > self.reads_at_last)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            done = await asyncio.gather(self.task, return_exceptions=True)
            assert isinstance(done[0], asyncio.CancelledError), done


@pytest.fixture
async def watching(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Watching]:
    w = Watching(monkeypatch)
    yield w
    await w.stop()


@pytest.mark.parametrize("poll_interval", [None, 0.05], ids=["notify", "polling"])
async def test_an_edit_in_place_is_yielded(tmp_path: Path, watching: Watching, poll_interval: float | None) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(mesh() + "---\n" + policy("one"))
    watcher = ConfigWatcher([str(file)], poll_interval=poll_interval)
    assert names(watcher.load()) == ["Mesh/m", "TrafficPolicy/one"]
    await watching.start(watcher)
    with open(file, "r+") as f:  # same inode, new bytes
        f.write(mesh() + "---\n" + policy("two"))
    result = await watching.next()
    assert result.ok and names(result) == ["Mesh/m", "TrafficPolicy/two"]


async def test_a_save_by_rename_is_yielded_each_time(tmp_path: Path, watching: Watching) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(mesh())
    watcher = ConfigWatcher([str(file)])
    watcher.load()
    await watching.start(watcher)
    for name in ("one", "two"):
        temp = tmp_path / f"mesh.yaml.{name}.tmp"
        temp.write_text(mesh() + "---\n" + policy(name))
        os.replace(temp, file)
        assert names(await watching.next()) == ["Mesh/m", f"TrafficPolicy/{name}"]


async def test_a_symlinked_file_is_watched_where_it_lives(tmp_path: Path, watching: Watching) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "config").mkdir()
    real = tmp_path / "real" / "mesh.yaml"
    real.write_text(mesh())
    (tmp_path / "config" / "mesh.yaml").symlink_to(real)
    watcher = ConfigWatcher([str(tmp_path / "config" / "mesh.yaml")])
    watcher.load()
    await watching.start(watcher)
    real.write_text(mesh() + "---\n" + policy("real"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/real"]


def configmap_update(folder: Path, stamp: str, files: dict[str, str]) -> None:
    """Do what the kubelet does: a new timestamped folder, then `..data` swapped by rename.
    (The kubelet then deletes the old folder; the test does that once the swap was seen, so
    that the swap alone is what the watcher has to notice.)"""
    data = folder / f"..{stamp}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data_tmp").symlink_to(data.name)
    os.replace(folder / "..data_tmp", folder / "..data")


@pytest.mark.parametrize("poll_interval", [None, 0.05], ids=["notify", "polling"])
@pytest.mark.parametrize("given", ["file", "folder"])
async def test_a_configmap_swap_is_yielded(tmp_path: Path, watching: Watching, given: str,
                                           poll_interval: float | None) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    configmap_update(folder, "2024_11_28_12_00_00.1", {"mesh.yaml": mesh()})
    path = folder / "mesh.yaml" if given == "file" else folder
    watcher = ConfigWatcher([str(path)], poll_interval=poll_interval)
    assert names(watcher.load()) == ["Mesh/m"]
    await watching.start(watcher)
    for i, name in enumerate(["one", "two"], start=2):
        configmap_update(folder, f"2024_11_28_12_00_00.{i}", {"mesh.yaml": mesh() + "---\n" + policy(name)})
        result = await watching.next()
        assert result.ok and names(result) == ["Mesh/m", f"TrafficPolicy/{name}"]
        assert result.files == (str(folder / "mesh.yaml"),)
        await watching.settled()  # the file now lives in another folder, watched instead
        shutil.rmtree(folder / f"..2024_11_28_12_00_00.{i - 1}")
    assert watching.queue.empty()


async def test_an_invalid_change_is_yielded_with_its_place_then_the_fix(tmp_path: Path, watching: Watching) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(mesh())
    watcher = ConfigWatcher([str(file)])
    watcher.load()
    await watching.start(watcher)
    file.write_text(mesh() + "  oops: [unclosed\n")
    bad = await watching.next()
    assert not bad.ok
    assert re.match(rf"{re.escape(str(file))}:\d+:\d+: ", str(bad.errors[0])), str(bad.errors[0])
    file.write_text(mesh() + "---\n" + policy("fixed"))
    good = await watching.next()
    assert good.ok and names(good) == ["Mesh/m", "TrafficPolicy/fixed"]


async def test_identical_bytes_and_touches_yield_nothing(tmp_path: Path, watching: Watching) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(mesh())
    watcher = ConfigWatcher([str(file)])
    watcher.load()
    await watching.start(watcher)
    before = watching.reads
    file.write_text(mesh())
    os.utime(file)
    await until(lambda: watching.reads > before)  # the watcher has seen them and read the file
    file.write_text(mesh() + "---\n" + policy("real"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/real"]
    assert watching.queue.empty()


async def test_new_files_in_a_watched_folder_and_its_new_subfolders(tmp_path: Path, watching: Watching) -> None:
    (tmp_path / "mesh.yaml").write_text(mesh())
    watcher = ConfigWatcher([str(tmp_path)])
    watcher.load()
    await watching.start(watcher)
    (tmp_path / "b.yaml").write_text(policy("b"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/b"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(policy("c"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/b", "TrafficPolicy/c"]
    await watching.settled()
    (tmp_path / "sub" / "d.yaml").write_text(policy("d"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/b", "TrafficPolicy/c", "TrafficPolicy/d"]


async def test_a_file_that_appears_later_is_picked_up(tmp_path: Path, watching: Watching) -> None:
    file = tmp_path / "mesh.yaml"
    watcher = ConfigWatcher([str(file)])
    assert "no such file" in str(watcher.load().errors[0])
    await watching.start(watcher)
    file.write_text(mesh())
    result = await watching.next()
    assert result.ok and names(result) == ["Mesh/m"]


async def test_a_file_in_a_folder_that_appears_later_is_picked_up(tmp_path: Path, watching: Watching) -> None:
    file = tmp_path / "later" / "mesh.yaml"
    watcher = ConfigWatcher([str(file)])
    assert "no such file" in str(watcher.load().errors[0])
    await watching.start(watcher)
    before = watching.reads
    file.parent.mkdir()
    await until(lambda: watching.reads >= before + 2)  # read once on seeing it, once when watching it
    file.write_text(mesh())
    result = await watching.next()
    assert result.ok and names(result) == ["Mesh/m"]


async def test_a_mesh_policy_in_another_folder_and_a_newly_listed_folder(tmp_path: Path, watching: Watching) -> None:
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    (tmp_path / "b" / "p.yaml").write_text(policy("p1"))
    (tmp_path / "c" / "c1.yaml").write_text(policy("c1"))
    mesh_file = tmp_path / "a" / "mesh.yaml"
    mesh_file.write_text(mesh("../b/p.yaml"))
    watcher = ConfigWatcher([str(mesh_file)])
    assert names(watcher.load()) == ["Mesh/m", "TrafficPolicy/p1"]
    await watching.start(watcher)
    (tmp_path / "b" / "p.yaml").write_text(policy("p2"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/p2"]
    mesh_file.write_text(mesh("../b/p.yaml", "../c"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/c1", "TrafficPolicy/p2"]
    await watching.settled()
    (tmp_path / "c" / "c2.yaml").write_text(policy("c2"))
    assert names(await watching.next()) == ["Mesh/m", "TrafficPolicy/c1", "TrafficPolicy/c2", "TrafficPolicy/p2"]


async def test_generation_never_decreases_and_replicas_agree(tmp_path: Path, watching: Watching) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(mesh())
    watcher = ConfigWatcher([str(file)])
    watcher.load()
    replica = ConfigWatcher([str(file)])
    replica.load()
    assert watcher.generation() == replica.generation() >= file.stat().st_mtime_ns
    seen = [watcher.generation()]
    await watching.start(watcher)
    for i, past in enumerate([False, True, False]):
        file.write_text(mesh() + "---\n" + policy(f"p{i}"))
        if past:  # a file given an older time (a restored backup) still moves it forward
            os.utime(file, ns=(1_000_000_000, 1_000_000_000))
        await watching.next()
        seen.append(watcher.generation())
    assert seen == sorted(set(seen)), seen


async def test_without_load_the_initial_result_comes_first(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(mesh())
    changes = ConfigWatcher([str(tmp_path / "mesh.yaml")]).changes()
    first = await asyncio.wait_for(anext(changes), WAIT)
    assert first.ok and names(first) == ["Mesh/m"]
    await changes.aclose()


def test_no_paths_is_an_error() -> None:
    with pytest.raises(ValueError):
        ConfigWatcher([])
