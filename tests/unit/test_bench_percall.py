"""The benchmark harness parts behind `run.py --baseline-src` and `percall.py`: which source
tree a sidecar imports, the per-request arithmetic, perf output, the fixed-count client."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run  # noqa: E402
from harness import countcalls  # noqa: E402
from harness.cli import add_baseline_argument, check_baseline  # noqa: E402
from harness.fixedload import BadResponse, KeepAliveClient, parse_head, shares  # noqa: E402
from harness.percall_stats import (alloc_figures, call_figures, markdown,  # noqa: E402
                                   net_per_request, short_path)
from harness.procs import Supervisor  # noqa: E402
from harness.sources import (check_source, interpreter_of, is_within,  # noqa: E402
                             source_env)
from harness.targets import BASELINE_TARGET, Stack  # noqa: E402
from harness.uprobes import event_name, interpreter_binary, parse_perf_csv  # noqa: E402


def fake_tree(root: Path) -> Path:
    (root / "meshproxy").mkdir(parents=True)
    (root / "meshproxy" / "__init__.py").write_text("")
    return root


# --- which tree is imported -------------------------------------------------------------

def test_source_env_puts_the_tree_first_and_keeps_the_working_directory_out():
    env = source_env({"PYTHONPATH": "/old", "HOME": "/root"}, [Path("/src"), Path("/bench")])
    assert env["PYTHONPATH"].split(":") == ["/src", "/bench", "/old"]
    assert env["PYTHONSAFEPATH"] == "1" and env["HOME"] == "/root"
    assert source_env({"A": "1"}, []) == {"A": "1"}


def test_interpreter_of_a_command():
    assert interpreter_of(["/usr/bin/python3.11", "-m", "meshproxy"]) == "/usr/bin/python3.11"
    assert interpreter_of(["meshproxy"]) == sys.executable
    assert interpreter_of([]) == sys.executable


def test_is_within(tmp_path):
    assert is_within(tmp_path / "a" / "b.py", tmp_path)
    assert is_within(tmp_path, tmp_path)
    assert not is_within(tmp_path.parent / "other", tmp_path)


def test_check_source_accepts_the_tree_and_refuses_the_installed_package(tmp_path):
    tree = fake_tree(tmp_path / "tree")
    where = check_source(tree, sys.executable, source_env({}, [tree]))
    assert Path(where) == (tree / "meshproxy" / "__init__.py").resolve()
    elsewhere = fake_tree(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="not from"):
        check_source(elsewhere, sys.executable, source_env({}, [tree]))


def test_baseline_flag_checks_the_tree_and_puts_the_target_next_to_meshproxy(tmp_path):
    p = argparse.ArgumentParser()
    add_baseline_argument(p)
    args = p.parse_args(["--baseline-src", str(fake_tree(tmp_path / "t"))])
    check_baseline(p, args)
    assert args.baseline_src.is_absolute()
    with pytest.raises(SystemExit):
        check_baseline(p, p.parse_args(["--baseline-src", str(tmp_path / "missing")]))
    assert run.with_baseline(["nginx", "meshproxy", "haproxy"]) == [
        "nginx", "meshproxy", BASELINE_TARGET, "haproxy"]
    assert run.with_baseline(["direct", "nginx"]) == ["direct", "nginx", BASELINE_TARGET]
    assert run.with_baseline(["meshproxy", BASELINE_TARGET]) == ["meshproxy", BASELINE_TARGET]


def test_every_sidecar_of_a_stack_gets_its_own_ports(tmp_path):
    stack = Stack(Supervisor(tmp_path), tmp_path, proxy_cpu=None, load_cpu=None,
                  big_file=tmp_path / "big", start_timeout=1, meshproxy_cmd=["python"],
                  meshproxy_args=[], baseline_src=tmp_path, meshproxy_names=("meshproxy", "x"))
    assert list(stack.mesh_ports) == ["meshproxy", "x", BASELINE_TARGET]
    ports = [stack.origin_port, stack.sink_port, stack.nginx_port, stack.haproxy_port]
    for p in stack.mesh_ports.values():
        ports += [p.outbound, p.inbound, p.admin, p.health]
    assert len(set(ports)) == len(ports) == 16


# --- perf -------------------------------------------------------------------------------

def test_interpreter_binary_prefers_the_mapped_libpython():
    maps = ("55d0-55d1 r-xp 00000000 08:01 1 /usr/bin/python3.11\n"
            "7f00-7f01 r-xp 00000000 08:01 2 /opt/py/lib/libpython3.11.so.1.0\n"
            "7f02-7f03 rw-p 00000000 00:00 0 \n")
    assert interpreter_binary(maps, "/usr/bin/python3.11") == "/opt/py/lib/libpython3.11.so.1.0"
    assert interpreter_binary(maps.splitlines()[0], "/usr/bin/python3.11") == "/usr/bin/python3.11"


def test_parse_perf_csv():
    text = ("# started on Mon\n\n"
            "1234,,g:PyObject_Malloc,100,100.00,,\n"
            "<not counted>,,g:PyMem_Malloc,0,100.00,,\n"
            "Events enabled\n")
    assert parse_perf_csv(text, ["g:PyObject_Malloc", "g:PyMem_Malloc", "g:other"]) == {
        "g:PyObject_Malloc": 1234, "g:PyMem_Malloc": None, "g:other": None}
    assert event_name("_PyObject_GC_New", "grp") == "grp:_PyObject_GC_New"


# --- per-request arithmetic and report --------------------------------------------------

def test_net_per_request_takes_off_the_idle_window_scaled_to_the_batch():
    assert net_per_request(1000, 50, 10, batch_s=2.0, idle_s=1.0) == pytest.approx(90.0)
    assert net_per_request(1000, 50, 10, batch_s=2.0, idle_s=0.0) == pytest.approx(100.0)
    assert net_per_request(1000, 0, 0, 1.0, 1.0) is None


def test_short_path():
    roots = [("/src", ""), ("/lib/python3.11/site-packages", "<site>"), ("/lib/python3.11", "<stdlib>")]
    assert short_path("/src/meshproxy/x.py", roots) == "meshproxy/x.py"
    assert short_path("/lib/python3.11/site-packages/uvloop/a.py", roots) == "<site>/uvloop/a.py"
    assert short_path("/lib/python3.11/asyncio/events.py", roots) == "<stdlib>/asyncio/events.py"
    assert short_path("/elsewhere/y.py", roots) == "/elsewhere/y.py"


def _row(name, count, resumable=False):
    return {"qualname": name, "file": "/src/meshproxy/m.py", "line": 1, "resumable": resumable,
            "count": count}


def test_call_figures_net_of_idle_with_top_functions():
    batch = {"calls": [_row("f", 200), _row("g", 100), _row("tick", 10), _row("co", 30, True)],
             "c_calls": [{"module": None, "qualname": "list.append", "count": 300},
                         {"module": "builtins", "qualname": "len", "count": 100}]}
    idle = {"calls": [_row("tick", 10)], "c_calls": []}
    fig = call_figures(batch, idle, requests=100, batch_s=1.0, idle_s=1.0,
                       roots=[("/src", "")], top=2)
    assert fig["calls_per_request"] == pytest.approx(3.3)
    assert fig["raw_calls_per_request"] == pytest.approx(3.4)
    assert fig["resumes_per_request"] == pytest.approx(0.3)
    assert fig["c_calls_per_request"] == pytest.approx(4.0)
    assert [r["function"] for r in fig["top_functions"]] == ["f", "g"]
    assert fig["top_functions"][0]["where"] == "meshproxy/m.py:1"
    assert [r["function"] for r in fig["top_c_functions"]] == ["list.append", "builtins.len"]
    allocs = alloc_figures({"PyObject_Malloc": 700, "PyObject_Calloc": 0, "PyMem_Malloc": None},
                           {"PyObject_Malloc": 100, "PyObject_Calloc": 0, "PyMem_Malloc": None},
                           requests=100, batch_s=1.0, idle_s=1.0)
    assert allocs["allocations_per_request"] == pytest.approx(6.0)
    assert allocs["per_symbol"]["PyMem_Malloc"] is None
    meta = {"date": "d", "command": "c", "meshproxy_file": "/src/meshproxy/__init__.py",
            "requests": 100, "warmup": 10, "connections": 2, "cpu_us_per_request": None}
    text = markdown(meta, fig, allocs)
    assert "| Python calls (profile `call` events) | 3.3 | 3.4 |" in text
    assert "**6.0**" in text and "`f`" in text
    assert "not measured: no perf" in markdown(meta, fig, {"unavailable": "no perf"})
    fig["compiled_modules"] = ["meshproxy.http1.reader"]
    assert "**Compiled modules were loaded**" in markdown(meta, fig, allocs)


def test_the_profile_hook_counts_calls_and_builtin_calls():
    countcalls._calls.clear()
    countcalls._c_calls.clear()
    frame = sys._getframe()
    countcalls._hook(frame, "call", None)
    countcalls._hook(frame, "call", None)
    countcalls._hook(frame, "c_call", len)
    countcalls._hook(frame, "c_call", [].append)
    countcalls._hook(frame, "return", None)
    data = countcalls.snapshot("/x/meshproxy/__init__.py")
    assert [(r["qualname"], r["count"]) for r in data["calls"]] == [
        ("test_the_profile_hook_counts_calls_and_builtin_calls", 2)]
    assert isinstance(data["compiled_modules"], list)
    assert sorted((r["module"] or "", r["qualname"], r["count"]) for r in data["c_calls"]) == [
        ("", "list.append", 1), ("builtins", "len", 1)]
    countcalls._calls.clear()
    countcalls._c_calls.clear()


# --- the fixed-count client -------------------------------------------------------------

def test_parse_head_and_shares():
    status, headers = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\n")
    assert status == 200 and headers == {"content-length": "3", "x-a": "b"}
    with pytest.raises(BadResponse):
        parse_head(b"SSH-2.0\r\n\r\n")
    assert shares(10, 3) == [4, 3, 3]
    assert shares(2, 32) == [1, 1]


def _server(answers: list[bytes]) -> tuple[int, list[int]]:
    """A one-connection server answering each request with the next answer (the last one
    again when they run out); returns its port and a list that collects requests seen."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: list[int] = []

    def serve() -> None:
        conn, _ = listener.accept()
        buffer = b""
        with conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    conn.sendall(answers[min(len(seen), len(answers) - 1)])
                    seen.append(1)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], seen


def test_keepalive_client_sends_exactly_the_requests_on_one_connection():
    port, seen = _server([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
                          b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"1\r\no\r\n2\r\nk\n\r\n0\r\n\r\n"])
    with KeepAliveClient(port, 1, timeout=5) as client:
        assert client.batch(3).requests == 3
        assert client.batch(4).requests == 4
    assert len(seen) == 7


def test_keepalive_client_refuses_a_wrong_answer():
    port, _ = _server([b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"])
    with KeepAliveClient(port, 1, timeout=5) as client:
        with pytest.raises(BadResponse, match="503"):
            client.batch(1)
