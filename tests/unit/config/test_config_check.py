"""`meshproxy check`: what a user sees and the exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.config.check import run_check

EXAMPLES = Path(__file__).resolve().parents[2] / "spec_examples"

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules:
    - backendRefs: [{name: web}]
"""
MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - {name: api, instances: [{name: api-0, app: {address: 127.0.0.1:9000}}]}
"""


def meshproxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshproxy", *args], capture_output=True, text=True, timeout=60)


def test_the_spec_examples_check_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check([str(EXAMPLES)], strict=True) == 0
    out, err = capsys.readouterr()
    assert out == ("ok: 4 files, 5 resources (1 Mesh, 1 HTTPRoute, 1 TrafficPolicy, 1 PeerAuthentication, "
                   "1 AuthorizationPolicy), 7 services, 0 warnings\n")
    assert err == ""


def test_the_mesh_file_alone_brings_its_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check([str(EXAMPLES / "mesh.yaml")], strict=False) == 0
    assert capsys.readouterr().out.startswith("ok: 4 files, 5 resources")


def test_errors_one_line_each_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROUTE.replace("metadata: {name: r}", "metadata: {nam: r}").replace("[{name: web}]",
                                                                                       "[{name: web, port: 0}]"))
    done = meshproxy("check", str(bad))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{bad}:3:1: metadata: missing required field 'name'",
        f"{bad}:3:12: metadata: unknown field 'nam' (allowed: annotations, labels, name, namespace)",
        f"{bad}:7:39: spec.rules[0].backendRefs[0].port: port 0 is out of range 1..65535",
    ]
    assert "3 errors" in done.stderr


def test_warnings_pass_unless_strict(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "route.yaml").write_text(ROUTE)
    lines = [
        f"{tmp_path}/route.yaml:5:38: warning: spec.parentRefs[0].name: Service 'web.default' is not defined "
        "in the Mesh",
        f"{tmp_path}/route.yaml:7:28: warning: spec.rules[0].backendRefs[0].name: Service 'web.default' is "
        "not defined in the Mesh",
    ]
    done = meshproxy("check", str(tmp_path))
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        *lines,
        "ok: 2 files, 2 resources (1 Mesh, 1 HTTPRoute), 1 service, 2 warnings",
    ]
    strict = meshproxy("check", "--strict", str(tmp_path))
    assert strict.returncode == 1
    assert strict.stdout.splitlines() == lines
    assert "2 warnings (--strict)" in strict.stderr


def test_a_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    done = meshproxy("check", str(EXAMPLES), str(missing))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"{missing}: no such file or folder"]


def test_an_empty_folder_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check([str(tmp_path)], strict=False) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path}: warning: no *.yaml or *.yml files in folder",
        "ok: 0 files, 0 resources, 0 services, 1 warning",
    ]
