"""How `meshproxy up` turns an instance's `command` into the argv it runs: `python3` and
`python` as the first word are the interpreter running `up`; anything else runs as written."""

from __future__ import annotations

import sys

import pytest

from meshproxy.local.up import app_argv


@pytest.mark.parametrize("word", ["python3", "python"])
def test_python_is_the_interpreter_running_up(word: str) -> None:
    assert app_argv((word, "-m", "meshproxy.demo", "ingestion")) == \
        [sys.executable, "-m", "meshproxy.demo", "ingestion"]


@pytest.mark.parametrize("command", [
    ("/usr/bin/python3", "app.py"),      # a path names that interpreter itself
    ("python3.11", "app.py"),            # and so does a versioned name, found on PATH
    ("node", "server.js", "python3"),    # only the first word counts
    ("./run.sh",),
])
def test_other_commands_run_as_written(command: tuple[str, ...]) -> None:
    assert app_argv(command) == list(command)


def test_an_empty_command_stays_empty() -> None:
    assert app_argv(()) == []
