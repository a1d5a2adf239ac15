"""YAML the configuration loader must refuse with a diagnostic, found while fuzzing it
(fuzz/targets/config.py): aliases and nesting that crashed `meshproxy check`, hung it, or
killed the process, where every problem must be a `FILE:LINE:COL: message`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshproxy.config import load
from meshproxy.config.yamlsource import MAX_DEPTH


def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return [str(d).replace(f"{tmp_path}/", "") for d in load([str(path)]).errors]


def test_an_alias_inside_the_sequence_it_names_is_refused(tmp_path: Path) -> None:
    # Composed, the node contains itself: building it recursed until RecursionError.
    assert errors(tmp_path, "a: &a [*a]\n") == ["mesh.yaml:1:4: invalid YAML: an alias inside the node it names"]


def test_an_alias_inside_the_mapping_it_names_is_refused(tmp_path: Path) -> None:
    assert errors(tmp_path, "a: &a\n  b: *a\n") == ["mesh.yaml:1:4: invalid YAML: an alias inside the node it names"]


def test_aliases_that_expand_without_end_are_refused(tmp_path: Path) -> None:
    # "Billion laughs": 289 bytes that stand for 9^8 scalars; loading hung, its memory growing.
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for name, previous in zip("bcdefgh", "abcdefg"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    [error] = errors(tmp_path, "\n".join(lines) + "\n")
    assert error.startswith("mesh.yaml:1:36: invalid YAML: aliases expand to more than ")


def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    # 3000 levels: the builder recursed past Python's limit (RecursionError).
    assert errors(tmp_path, "[" * 3000 + "]" * 3000 + "\n") == [
        f"mesh.yaml:1:{MAX_DEPTH + 1}: invalid YAML: nested deeper than {MAX_DEPTH} levels"]


def test_the_documents_before_a_too_deep_one_are_still_read(tmp_path: Path) -> None:
    found = errors(tmp_path, "kind: Mesh\n---\n" + "{x: " * 600 + "1" + "}" * 600 + "\n")
    assert found[-1] == f"mesh.yaml:3:{4 * MAX_DEPTH + 1}: invalid YAML: nested deeper than {MAX_DEPTH} levels"
    assert any("missing required field 'apiVersion'" in line for line in found)


def test_nesting_that_overflowed_libyamls_stack_is_refused(tmp_path: Path) -> None:
    # 100,000 levels: libyaml's composer recursed in C until SIGSEGV. In a process of its own,
    # so that a regression fails this test rather than ending the test run.
    path = tmp_path / "mesh.yaml"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    check = subprocess.run([sys.executable, "-m", "meshproxy", "check", str(path)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1, check.stderr[-500:]
    assert check.stdout == f"{path}:1:{MAX_DEPTH + 1}: invalid YAML: nested deeper than {MAX_DEPTH} levels\n"


def test_nesting_up_to_the_limit_and_aliases_that_share_a_block_still_load(tmp_path: Path) -> None:
    assert errors(tmp_path, "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n") == [
        "mesh.yaml:1:1: document: expected a mapping, got a list"]
    route = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /a}}]
      backendRefs: &backends [{name: web, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /b}}]
      backendRefs: *backends
"""
    assert errors(tmp_path, route) == []
