#!/usr/bin/env python3
"""Python calls and object allocations per proxied request of a meshproxy sidecar.

Starts the origin and a sidecar exactly as run.py does (same Mesh file, same origin nginx,
proxy pinned to --proxy-cpu), from the installed package or from the source tree --src DIR,
sends a fixed number of `tiny` requests (GET / answered `ok`, keep-alive) and counts, in the
proxy process only:

1. allocations: exact hits of uprobes on the interpreter's allocator entry points
   (PyObject_Malloc, ...), counted by `perf stat -p PID` around the batch;
2. calls: a second sidecar runs under harness/countcalls.py, a profile hook counting `call`
   and `c_call` events per function, zeroed before and read after the batch.

The two are separate processes because the profile hook itself allocates (frame objects,
counters). Each batch is followed by an equally long window without traffic, whose counts
are subtracted (timers and the file watcher run without requests too). The script stops by
itself (--time-limit) and only talks to 127.0.0.1.

    python benchmarks/percall.py                      # the installed meshproxy
    python benchmarks/percall.py --src /tmp/base      # another source tree
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import (add_common_arguments, check_pinning, progress, start_run,  # noqa: E402
                         write_report)
from harness.fixedload import BadResponse, KeepAliveClient  # noqa: E402
from harness.percall_stats import (alloc_figures, call_figures, default_roots,  # noqa: E402
                                   markdown)
from harness.procs import Supervisor, session_cpu_seconds, wait_until  # noqa: E402
from harness.sources import interpreter_of  # noqa: E402
from harness.targets import Endpoint, Stack, TargetFailed, check_forwards  # noqa: E402
from harness.uprobes import (ALLOC_SYMBOLS, PerfCounter, ProbeError, Probes,  # noqa: E402
                             exported_symbols, process_interpreter)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "percall.md"
ALLOC_SIDECAR, CALLS_SIDECAR = "meshproxy", "meshproxy-calls"


class TimeLimit(Exception):
    """--time-limit passed before the measurements were done."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", type=Path, default=None, metavar="DIR",
                   help="import meshproxy from this source tree instead of the installed one")
    p.add_argument("--requests", type=int, default=2000, help="requests counted")
    p.add_argument("--warmup", type=int, default=500, help="requests sent first, not counted")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    p.add_argument("--top", type=int, default=25, help="functions listed")
    p.add_argument("--no-perf", action="store_true",
                   help="do not use perf uprobes (allocations are then only approximated)")
    p.add_argument("--time-limit", type=int, default=300,
                   help="seconds after which the script gives up and stops everything")
    add_common_arguments(p, default_out=DEFAULT_OUT,
                         load_cpu_help="core for the client, the origin, perf and this script",
                         meshproxy_help="how to run meshproxy for the allocation count; the "
                                        "call count runs its interpreter with harness.countcalls")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.connections < 1:
        p.error("--requests and --connections must be at least 1, --warmup at least 0")
    if args.src is not None:
        args.src = args.src.resolve()
        if not (args.src / "meshproxy" / "__init__.py").is_file():
            p.error(f"--src {args.src}: no meshproxy/__init__.py there")
    check_pinning(p, args)
    return args


def measure_allocations(stack: Stack, args: argparse.Namespace) -> tuple[dict, float | None]:
    """Count allocator calls per request in a plain sidecar (as run.py starts it).

    Returns (allocation figures, the proxy's CPU µs per request measured before the probes
    went in). Raises ProbeError when perf or uprobes cannot be used."""
    endpoint = stack.start_meshproxy(ALLOC_SIDECAR, src=args.src)
    try:
        check_forwards(endpoint)
        with KeepAliveClient(endpoint.port, args.connections) as client:
            client.batch(args.warmup)
            cpu0 = session_cpu_seconds(endpoint.sid)
            client.batch(args.requests)
            cpu_us = (session_cpu_seconds(endpoint.sid) - cpu0) * 1e6 / args.requests
            pid = endpoint.child.popen.pid  # taskset exec()s the interpreter: same pid
            binary = process_interpreter(pid)
            symbols = exported_symbols(binary, ALLOC_SYMBOLS)
            if "PyObject_Malloc" not in symbols:
                raise ProbeError(f"{binary} does not export PyObject_Malloc")
            progress(f"uprobes on {', '.join(symbols)} in {binary}")
            with Probes(binary, symbols) as probes:
                events = [probes.events[s] for s in symbols]
                with PerfCounter(pid, events, cpu=args.load_cpu) as batch:
                    batch.enable()
                    seconds = client.batch(args.requests).seconds
                    batch.disable()
                with PerfCounter(pid, events, cpu=args.load_cpu) as idle:
                    idle.enable()
                    time.sleep(seconds)
                    idle.disable()
        by_symbol = {e: s for s, e in probes.events.items()}
        figures = alloc_figures({by_symbol[e]: n for e, n in batch.counts.items()},
                                {by_symbol[e]: n for e, n in idle.counts.items()},
                                args.requests, seconds, seconds)
        figures.update(binary=binary, batch_seconds=seconds)
        return figures, cpu_us
    finally:
        stack.sup.stop(endpoint.child)


def _ask(endpoint: Endpoint, out: Path, signum: int, timeout: float = 30.0) -> dict:
    """Send the countcalls signal to the sidecar and return what it writes in answer."""
    out.unlink(missing_ok=True)
    os.kill(endpoint.child.popen.pid, signum)
    if not wait_until(out.exists, time.monotonic() + timeout):
        raise TargetFailed(f"{endpoint.name} did not answer signal {signum} within {timeout:.0f}s")
    return json.loads(out.read_text())


def measure_calls(stack: Stack, args: argparse.Namespace, workdir: Path) -> dict:
    """Count Python calls per request in a sidecar run under harness.countcalls."""
    out = workdir / "counts.json"
    python = interpreter_of(shlex.split(args.meshproxy_cmd))
    env = {"COUNTCALLS_OUT": str(out), "COUNTCALLS_SRC": str(args.src or "")}
    endpoint = stack.start_meshproxy(CALLS_SIDECAR, src=args.src,
                                     command=[python, "-m", "harness.countcalls"],
                                     pythonpath=[BENCH_DIR], env=env)
    try:
        check_forwards(endpoint)
        with KeepAliveClient(endpoint.port, args.connections) as client:
            client.batch(args.warmup)
            before = _ask(endpoint, out, signal.SIGUSR1)
            seconds = client.batch(args.requests).seconds
            batch = _ask(endpoint, out, signal.SIGUSR2)
            # The same time without traffic (connections open and idle, as in the batch).
            _ask(endpoint, out, signal.SIGUSR1)
            time.sleep(seconds)
            idle = _ask(endpoint, out, signal.SIGUSR2)
    finally:
        stack.sup.stop(endpoint.child)
    figures = call_figures(batch, idle, args.requests, seconds, seconds,
                           default_roots(batch["meshproxy_file"]), top=args.top)
    figures.update(meshproxy_file=batch["meshproxy_file"], batch_seconds=seconds,
                   compiled_modules=batch.get("compiled_modules", []),
                   live_blocks_grown=batch["allocated_blocks"] - before["allocated_blocks"])
    return figures


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeLimit()


def main(argv: list[str] | None = None) -> int:
    """Measure; return 0 when both counts were made, 1 when one was not, 2 when nothing ran."""
    args = parse_args(argv)
    if not start_run(args, {"nginx"} | ({"taskset"} if not args.no_pin else set())):
        return 2
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.time_limit)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    started = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-percall-"))
    workdir.chmod(0o755)  # nginx workers started by root run as `nobody`
    supervisor = Supervisor(workdir)
    calls, allocs, cpu_us, problems = None, None, None, []
    try:
        stack = Stack(supervisor, workdir, proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu,
                      big_file=workdir / "unused", start_timeout=args.start_timeout,
                      meshproxy_cmd=shlex.split(args.meshproxy_cmd),
                      meshproxy_args=shlex.split(args.meshproxy_args),
                      meshproxy_names=(ALLOC_SIDECAR, CALLS_SIDECAR))
        stack.start_origin()
        if args.no_perf or shutil.which("perf") is None:
            allocs = {"unavailable": "--no-perf" if args.no_perf else "perf is not installed"}
        else:
            progress("counting allocations (uprobes)")
            try:
                allocs, cpu_us = measure_allocations(stack, args)
            except ProbeError as exc:
                allocs = {"unavailable": str(exc)}
                problems.append(f"allocations: {exc}")
        progress("counting calls (profile hook)")
        calls = measure_calls(stack, args, workdir)
    except (TargetFailed, BadResponse, OSError, TimeoutError, TimeLimit) as exc:
        why = f"time limit of {args.time_limit}s reached" if isinstance(exc, TimeLimit) else exc
        problems.append(f"{type(exc).__name__}: {why}")
        print(f"percall: {problems[-1]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        supervisor.stop_all()
        if args.keep_workdir or problems:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if calls is None and not (allocs or {}).get("per_symbol"):
        return 2
    if allocs is not None and "unavailable" in allocs and calls is not None:
        # The labelled fallback: net growth of live blocks, from the countcalls dumps.
        allocs["live_blocks_per_request"] = calls["live_blocks_grown"] / args.requests
    meta = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "command": command,
            "src": str(args.src) if args.src else None,
            "meshproxy_file": calls["meshproxy_file"] if calls else "?",
            "requests": args.requests, "warmup": args.warmup, "connections": args.connections,
            "proxy_cpu": args.proxy_cpu, "load_cpu": args.load_cpu,
            "cpu_us_per_request": cpu_us, "problems": problems}
    report = markdown(meta, calls, allocs)
    if problems:
        report += "\nProblems:\n" + "".join(f"- {p}\n" for p in problems)
    write_report(args.out, report, {"meta": meta, "calls": calls, "allocations": allocs})
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
