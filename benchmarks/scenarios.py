#!/usr/bin/env python3
"""Resilience scenarios: meshproxy (and nginx) in front of backends, one of them misbehaving.

a. one instance answers 50 ms late: client p50/p99 and the share it gets, for meshproxy's
   PeakEWMA, LeastRequest and RoundRobin and nginx's round robin and least_conn, plus the two
   healthy instances alone as the baseline;
b. one instance answers 503 to everything: the success rate with meshproxy's defaults and
   with retries off;
c. one instance is killed (SIGKILL) and restarted 10 s later: failed requests and how long
   until it gets traffic again;
d. two instances at 300 requests/s, open loop over 32 connections (requests in flight near
   zero, so PeakEWMA chooses on its RTT estimates alone): the share each gets when they are
   equal, when b1 is 40 ms slow for its first 30 requests only, and when b1 is 50 ms slower;
   and three equal instances, b2 killed and restarted as in c.

Each case starts its own backends, proxy and load generator (a Python client that records
every request) and stops them at the end, also on Ctrl-C, SIGTERM or an error.

    python benchmarks/scenarios.py             # every scenario, 20 s of load per case
    python benchmarks/scenarios.py --quick     # 5 s per case (scenario c: about 20 s)
    python benchmarks/scenarios.py --cases a-peakewma,a-healthy --duration 30
    python benchmarks/scenarios.py --cases d --duration 15   # the shares at 300 requests/s
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import (add_common_arguments, busy_before_start, check_pinning, progress,  # noqa: E402
                         start_run, write_report)
from harness.procs import Supervisor  # noqa: E402
from harness.report import machine_facts  # noqa: E402
from harness.scenario_cases import CASE_KEYS, SCENARIOS, select  # noqa: E402
from harness.scenario_report import markdown  # noqa: E402
from harness.scenario_run import CaseRun, RunSettings  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "scenarios.md"
MACHINE_KEYS = ("nproc", "cpu", "kernel", "python", "nginx", "meshproxy", "git")


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        select(items)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not items:
        raise argparse.ArgumentTypeError("no case given")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; --quick fills in the timings it was not given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", type=_items, default=list(SCENARIOS),
                   help=f"comma-separated scenarios ({', '.join(SCENARIOS)}) or cases "
                        f"({', '.join(CASE_KEYS)})")
    p.add_argument("--quick", action="store_true",
                   help="short run: 5 s per case, 1 s warm-up, scenario c observed 10 s "
                        "after the restart")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of measured load per case [20; --quick 5]")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of load before measuring, not counted [2; --quick 1]")
    p.add_argument("--kill-at", type=float, default=None,
                   help="scenario c: seconds after the warm-up the instance is killed "
                        "[5; --quick 2]")
    p.add_argument("--restart-after", type=float, default=10.0,
                   help="scenario c: seconds between the kill and the restart")
    p.add_argument("--recovery-window", type=float, default=None,
                   help="scenario c: seconds of load after the restart [20; --quick 10]")
    p.add_argument("--concurrency", type=int, default=16,
                   help="keep-alive connections of the load generator")
    p.add_argument("--request-timeout", type=float, default=5.0,
                   help="seconds before the client gives up on a request (a failure)")
    add_common_arguments(p, default_out=DEFAULT_OUT, proxy_cpu_help="core the proxy is pinned to",
                         load_cpu_help="core for the load generator, the backends and this script",
                         out_help="Markdown report; a JSON summary goes next to it (.json)",
                         workdir_help="keep the temporary folder with configs, logs and request records")
    args = p.parse_args(argv)
    defaults = ({"duration": 5, "warmup": 1, "kill_at": 2, "recovery_window": 10} if args.quick
                else {"duration": 20, "warmup": 2, "kill_at": 5, "recovery_window": 20})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.duration <= 0 or args.warmup < 0 or args.kill_at < 0 or args.restart_after < 0
            or args.recovery_window <= 0 or args.concurrency < 1):
        p.error("--duration, --recovery-window and --concurrency must be positive, "
                "--warmup, --kill-at and --restart-after at least 0")
    check_pinning(p, args)
    return args


def _describe(result: dict) -> str:
    if "failed" in result:
        return "failed: " + result["failed"].splitlines()[0]
    s = result["summary"]
    shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in s["share"].items())
    return (f"{s['requests']:,} requests, {s['rps']:,.0f}/s, p50 {s['p50_ms'] or 0:.2f} ms, "
            f"p99 {s['p99_ms'] or 0:.2f} ms, {s['failures']} failed; {shares}")


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios; return 0 when every case produced numbers, 1 when one failed,
    2 when the run could not start."""
    args = parse_args(argv)
    cases = select(args.cases)
    needed = {"nginx"} if any(c.proxy == "nginx" for c in cases) else set()
    if not args.no_pin:
        needed.add("taskset")
    if not start_run(args, needed):
        return 2
    busy_before = busy_before_start()
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(
        ["python", "benchmarks/scenarios.py", *argv])
    started = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-scenarios-"))
    workdir.chmod(0o755)  # nginx workers started by root run as `nobody`
    supervisor = Supervisor(workdir)
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    settings = RunSettings(
        concurrency=args.concurrency, warmup=args.warmup, duration=args.duration,
        kill_at=args.kill_at, restart_after=args.restart_after,
        recovery_window=args.recovery_window, request_timeout=args.request_timeout,
        proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu, start_timeout=args.start_timeout,
        meshproxy_cmd=tuple(meshproxy_cmd), meshproxy_args=tuple(shlex.split(args.meshproxy_args)))
    results: dict[str, dict] = {}
    failures: list[str] = []
    try:
        for n, case in enumerate(cases, 1):
            seconds = settings.warmup_for(case) + settings.measured_seconds(case)
            progress(f"[{n}/{len(cases)}] {case.key}: {case.label} ({seconds:g} s of load)")
            result = CaseRun(case, settings, supervisor, workdir, progress).run()
            results[case.key] = result
            if "failed" in result:
                failures.append(f"{case.key}: {result['failed']}")
            progress(f"  {_describe(result)}")
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        supervisor.stop_all()
        if args.keep_workdir or failures:
            print(f"configs, logs and records kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    facts = machine_facts(meshproxy_cmd)
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {"concurrency": args.concurrency, "warmup": args.warmup,
                     "duration": args.duration, "kill_at": args.kill_at,
                     "restart_after": args.restart_after,
                     "recovery_window": args.recovery_window,
                     "request_timeout": args.request_timeout, "proxy_cpu": args.proxy_cpu,
                     "load_cpu": args.load_cpu, "cases": [c.key for c in cases]},
        "machine": {k: facts[k] for k in MACHINE_KEYS if k in facts},
        "busy_before_start": busy_before,
        "failures": failures,
    }
    report = markdown(meta, results)
    write_report(args.out, report, {"meta": meta, "results": results})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
