"""The fuzz targets (fuzz/, docs/fuzzing.md) in the test suite: every committed seed replayed
through its target, and each target fuzzed briefly under atheris by fuzz/run.py."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the fuzz/ package, as fuzz/run.py imports it

from fuzz.targets import TARGETS  # noqa: E402 - after the repository is on the path

SECONDS = 5  # per target: all of them take about half a minute, two at a time


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_seed_passes_its_target(name: str) -> None:
    """Deterministic: the corpus holds the inputs of the tests and nothing may fail on them."""
    target = importlib.import_module(f"fuzz.targets.{name}")
    seeds = sorted((REPO / "fuzz" / "corpus" / name).iterdir())
    assert seeds, f"no seeds for {name}: run fuzz/seed.py"
    for seed in seeds:
        data = seed.read_bytes()
        assert len(data) <= TARGETS[name].max_len, seed.name
        target.TestOneInput(data)


@pytest.mark.timeout(300)
def test_each_target_fuzzed_briefly_finds_nothing(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "run.py"), "--seconds", str(SECONDS), "--jobs", "2",
         "--fresh", "--out", str(tmp_path), "--json", str(results_file)],
        capture_output=True, text=True, timeout=280)
    assert results_file.exists(), run.stdout + run.stderr
    results = {r["target"]: r for r in json.loads(results_file.read_text())}
    assert set(results) == set(TARGETS)
    for name, result in results.items():
        assert result["error"] is None, f"{name}: {result['error']}"
        assert result["findings"] == [], f"{name}: {result['findings']}"
        assert result["executions"] > 0 and result["coverage"] > 0, result
    assert run.returncode == 0, run.stdout + run.stderr
