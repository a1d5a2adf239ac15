"""Which meshproxy source tree a sidecar imports.

A benchmark can run the sidecar from another checkout (`run.py --baseline-src DIR`,
`percall.py --src DIR`) with the same interpreter: the tree goes first on PYTHONPATH, and
PYTHONSAFEPATH=1 keeps Python from putting the working directory in front of it (with `-m`,
a run started from a checkout would otherwise import that checkout). The editable install's
finder comes after sys.path, so PYTHONPATH wins over it. Because a mistake here silently
measures the wrong code, the import is checked before the sidecar starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

# Printed by the check below: where `import meshproxy` resolves.
_WHERE = "import meshproxy, sys; sys.stdout.write(meshproxy.__file__)"


def source_env(base: Mapping[str, str], paths: Sequence[Path]) -> dict[str, str]:
    """Return `base` with `paths` (a source tree first, then helper folders) in front of any
    PYTHONPATH it had, and PYTHONSAFEPATH=1; unchanged but copied when `paths` is empty."""
    env = dict(base)
    if not paths:
        return env
    entries = [str(p) for p in paths]
    if env.get("PYTHONPATH"):
        entries.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(entries)
    env["PYTHONSAFEPATH"] = "1"
    return env


def interpreter_of(command: Sequence[str]) -> str:
    """Return the Python that `command` runs: its first word when that is a python
    executable (`python3 -m meshproxy`), else this script's interpreter (a `meshproxy`
    console script, `taskset ...`), which is the one its shebang names in this checkout."""
    if command and Path(command[0]).name.startswith("python"):
        return command[0]
    return sys.executable


def is_within(path: Path | str, root: Path | str) -> bool:
    """True when `path`, symlinks resolved, is `root` or below it."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def imported_from(python: str, env: Mapping[str, str], timeout: float = 30.0) -> str:
    """Return the meshproxy/__init__.py that `python` imports with `env`.

    Raises RuntimeError when the import fails. Run from / so that the working directory
    can not matter, just as it does not for the sidecar (PYTHONSAFEPATH)."""
    done = subprocess.run([python, "-c", _WHERE], env=dict(env), cwd="/", capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"{python} cannot import meshproxy with PYTHONPATH="
                           f"{env.get('PYTHONPATH', '')!r}: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def check_source(src: Path, python: str, env: Mapping[str, str]) -> str:
    """Return the meshproxy/__init__.py imported with `env`; raise RuntimeError unless it
    lies in src/meshproxy."""
    where = imported_from(python, env)
    if not is_within(where, src / "meshproxy"):
        raise RuntimeError(f"with PYTHONPATH={env.get('PYTHONPATH', '')!r}, {python} imports "
                           f"meshproxy from {where}, not from {src}")
    return where
