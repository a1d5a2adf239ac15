"""A built package (`pip install .`, `pipx install .`: a wheel, with no source tree beside it)
carries the Mesh files of config/, so that `meshproxy up` with no MESH_FILE runs the demo and
`meshproxy demo load` finds its edge. Built here as a real wheel with pip (pure Python, to
keep it quick: MESHPROXY_NO_COMPILE=1; the files are the same either way), unpacked into a
folder that is the only meshproxy on the interpreter's path."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_wheel_carries_the_demo_and_up_finds_it_there(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    env = {**os.environ, "MESHPROXY_NO_COMPILE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "--disable-pip-version-check", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    [wheel] = wheels.glob("meshproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in sorted(p.relative_to(REPO / "config") for p in (REPO / "config").rglob("*.yaml")):
        assert f"meshproxy/bundled/config/{yaml.as_posix()}" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Only the unpacked wheel's meshproxy (PYTHONSAFEPATH: not the current folder's); its
    # dependencies from this interpreter.
    probe = ("from meshproxy.local.up import default_mesh_file; "
             "from meshproxy.demo.load import default_url; "
             "import meshproxy; print(meshproxy.__file__); print(default_mesh_file()); "
             "print(default_url())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr
    package, mesh, url = done.stdout.split()
    assert package == str(site / "meshproxy" / "__init__.py")
    assert mesh == str(site / "meshproxy" / "bundled" / "config" / "demo" / "mesh.yaml")
    assert url == "http://127.0.0.1:18000"
    check = subprocess.run([sys.executable, "-m", "meshproxy", "check", mesh], capture_output=True,
                           text=True, cwd=tmp_path, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert check.returncode == 0, check.stdout + check.stderr
