#!/usr/bin/env python3
"""Side-by-side load run: direct, nginx, HAProxy and meshproxy in front of the same origin.

One run starts an origin (nginx answering from memory), an upload sink, and each proxy under
test, then measures them in interleaved rounds (every case of every target once per round, the
target order rotating between rounds) and reports the median per target. Proxies run pinned to
one core, the load generator and origin to the other. Everything started is stopped at the
end, also on Ctrl-C, SIGTERM or an error.

    python benchmarks/run.py                 # full run, see --help for the knobs
    python benchmarks/run.py --quick         # smoke run: 2 s per case, 1 round
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import (add_baseline_argument, add_common_arguments,  # noqa: E402
                         add_noise_arguments, busy_before_start, check_baseline, check_pinning,
                         progress, start_run, write_report)
from harness.cases import (ALL_CASES, MIB, REQUEST_CASES, LoadFailed,  # noqa: E402
                           LoadSettings, measure_requests, measure_stream)
from harness.procs import Supervisor, log_tail  # noqa: E402
from harness.report import machine_facts, markdown, summarise  # noqa: E402
from harness.sources import check_source, interpreter_of, source_env  # noqa: E402
from harness.targets import (ALL_TARGETS, BASELINE_TARGET, Endpoint, Stack,  # noqa: E402
                             TargetFailed)

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "latest.md"
# Busy share of a core, before anything starts, above which the run is flagged as noisy.


def _csv(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown) or 'nothing'} not in {', '.join(allowed)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; --quick fills in the settings it was not given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--targets", type=_csv(ALL_TARGETS), default=list(ALL_TARGETS),
                   help="comma-separated targets")
    p.add_argument("--cases", type=_csv(ALL_CASES), default=list(ALL_CASES),
                   help="comma-separated cases: tiny (GET / -> 'ok'), 1k (1 KiB body), "
                        "download and upload (one stream of --stream-mib MiB)")
    p.add_argument("--duration", type=int, default=None, help="seconds per request case [10]")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per case [2]")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds [3]")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--wrk-timeout", type=int, default=5, help="wrk per-request timeout, s")
    p.add_argument("--stream-mib", type=int, default=1024, help="size of a streaming case")
    p.add_argument("--stream-timeout", type=int, default=300, help="curl --max-time, s")
    add_noise_arguments(p, limit=10.0,
                        retries_help="times a measurement over --noise-limit is repeated (best is kept)")
    add_common_arguments(p, default_out=DEFAULT_OUT,
                         load_cpu_help="core for wrk, curl, the origin and this script")
    add_baseline_argument(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per case, 1 round")
    args = p.parse_args(argv)
    quick = {"duration": 2, "warmup": 1, "rounds": 1}
    full = {"duration": 10, "warmup": 2, "rounds": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0 or args.noise_retries < 0:
        p.error("--duration and --rounds must be at least 1, --warmup and --noise-retries "
                "at least 0")
    check_pinning(p, args)
    check_baseline(p, args)
    if args.baseline_src is not None:
        args.targets = with_baseline(args.targets)
    return args


def with_baseline(targets: list[str]) -> list[str]:
    """Return targets with BASELINE_TARGET right after `meshproxy` (at the end without it),
    so that the tables show the two sidecars side by side."""
    if BASELINE_TARGET in targets:
        return list(targets)
    at = targets.index("meshproxy") + 1 if "meshproxy" in targets else len(targets)
    return [*targets[:at], BASELINE_TARGET, *targets[at:]]


def check_tools(args: argparse.Namespace) -> set[str]:
    """Return the names of the programs this run needs."""
    needed = {"nginx", "curl"}
    if any(c in REQUEST_CASES for c in args.cases):
        needed.add("wrk")
    if "haproxy" in args.targets:
        needed.add("haproxy")
    if not args.no_pin:
        needed.add("taskset")
    return needed


def _describe(result: dict) -> str:
    if "failed" in result:
        return "failed: " + result["failed"].splitlines()[0]
    if "rps" in result:
        cpu = result["proxy_cpu_us_per_req"]
        return (f"{result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms"
                + (f", proxy {cpu:.1f} µs/req" if cpu is not None else "")
                + (f", {result['errors']} errors" if result["errors"] else ""))
    return f"{result['mib_per_s']:,.0f} MiB/s"


def _exited(endpoint: Endpoint | None) -> str | None:
    """Return why the endpoint's proxy is gone, or None while it runs (or has no process)."""
    if endpoint is None or endpoint.child is None or endpoint.child.alive():
        return None
    child = endpoint.child
    return (f"{child.name} exited with status {child.popen.returncode} during the run; "
            f"log {child.log_path}:\n{log_tail(child.log_path)}")


def _measure_once(args: argparse.Namespace, stack: Stack, settings: LoadSettings,
                  big_file: Path, endpoint: Endpoint, case: str) -> dict:
    try:
        if case in REQUEST_CASES:
            return measure_requests(endpoint, case, settings, stack.origin.sid)
        server = stack.sink if case == "upload" else stack.origin
        return measure_stream(endpoint, case, big_file, args.stream_mib * MIB,
                              args.stream_timeout, settings, server.sid)
    except LoadFailed as exc:
        return {"failed": str(exc)}


def _other_load(result: dict, target: str) -> float:
    """Return the largest share of a core that other programs used during a measurement."""
    keys = ["load_core_other_pct"] + (["proxy_core_other_pct"] if target != "direct" else [])
    return max((result[k] for k in keys if result.get(k) is not None), default=0.0)


def _measure(args: argparse.Namespace, stack: Stack, settings: LoadSettings, big_file: Path,
             endpoint: Endpoint, case: str) -> dict:
    """Return one round's result for one case and target ({"failed": why} on failure).

    A measurement disturbed by other programs (more than --noise-limit % of a core) is
    repeated up to --noise-retries times; the least disturbed attempt is kept.
    """
    best: dict | None = None
    for attempt in range(1, args.noise_retries + 2):
        result = _measure_once(args, stack, settings, big_file, endpoint, case)
        if "failed" in result:
            return result
        if best is None or _other_load(result, endpoint.name) < _other_load(best, endpoint.name):
            best = result
        best["attempts"] = attempt
        noise = _other_load(result, endpoint.name)
        if noise <= args.noise_limit or attempt > args.noise_retries:
            break
        progress(f"  {case} {endpoint.name}: other programs used {noise:.0f} % of a core; "
                  f"measuring again ({attempt}/{args.noise_retries})")
    return best


def run_rounds(args: argparse.Namespace, stack: Stack, settings: LoadSettings,
               big_file: Path) -> tuple[dict, list[str]]:
    """Start the targets and measure them round by round.

    Returns ({case: {target: [one result per round]}}, failure messages). A target that does
    not start, or stops, is reported as failed in every round it misses; the others go on.
    """
    gone: dict[str, str] = {}
    endpoints: dict[str, Endpoint] = {}
    for target in args.targets:
        try:
            endpoints[target] = stack.start(target)
            progress(f"started {target} on 127.0.0.1:{endpoints[target].port}")
        except TargetFailed as exc:
            gone[target] = str(exc)
            progress(f"FAILED to start {target}: {exc}")
    messages = list(gone.values())
    raw: dict = {case: {target: [] for target in args.targets} for case in args.cases}
    for round_no in range(args.rounds):
        shift = round_no % len(args.targets)
        for case in args.cases:
            for target in args.targets[shift:] + args.targets[:shift]:
                if target not in gone and (why := _exited(endpoints[target])):
                    gone[target] = why
                    messages.append(why)
                if target in gone:
                    result = {"failed": gone[target]}
                else:
                    result = _measure(args, stack, settings, big_file, endpoints[target], case)
                    if "failed" in result:
                        messages.append(f"round {round_no + 1}, {case}, {target}: "
                                        f"{result['failed']}")
                raw[case][target].append(result)
                progress(f"round {round_no + 1}/{args.rounds} {case:>8} {target:>9}: "
                          f"{_describe(result)}")
    return raw, messages


def baseline_facts(src: Path | None, meshproxy_cmd: list[str]) -> dict[str, str]:
    """Return the report's machine row for the baseline sidecar: where its meshproxy is
    imported from (checked the same way as when it starts), or nothing without one."""
    if src is None:
        return {}
    env = source_env(os.environ, [src])
    try:
        where = check_source(src, interpreter_of(meshproxy_cmd), env)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        where = f"unavailable ({exc})"
    return {BASELINE_TARGET: f"{src} (imports {where})"}


def _clean_workdir(workdir: Path, keep: bool) -> None:
    """Remove the run's folder, or only its big file when its logs are worth keeping."""
    if keep:
        (workdir / "big.bin").unlink(missing_ok=True)
        print(f"configs and logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every target produced numbers, 1 otherwise."""
    args = parse_args(argv)
    if not start_run(args, check_tools(args)):
        return 2
    busy_before = busy_before_start()
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    started = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
    # nginx workers started by root run as `nobody`: they must be able to read the big file.
    workdir.chmod(0o755)
    supervisor = Supervisor(workdir)
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    failures: list[str] = []
    try:
        big_file = workdir / "big.bin"
        with open(big_file, "wb") as f:
            f.truncate(args.stream_mib * MIB)  # sparse: reading it costs no disk I/O
        stack = Stack(supervisor, workdir, proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu,
                      big_file=big_file, start_timeout=args.start_timeout,
                      meshproxy_cmd=meshproxy_cmd,
                      meshproxy_args=shlex.split(args.meshproxy_args),
                      baseline_src=args.baseline_src)
        stack.start_origin()
        if "upload" in args.cases:
            stack.start_sink()
        settings = LoadSettings(
            connections=args.connections, threads=args.threads, duration=args.duration,
            warmup=args.warmup, wrk_timeout=args.wrk_timeout, load_cpu=args.load_cpu,
            proxy_cpu=args.proxy_cpu)
        raw, failures = run_rounds(args, stack, settings, big_file)
    except TargetFailed as exc:
        failures.append(str(exc))
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        supervisor.stop_all()
        _clean_workdir(workdir, keep=args.keep_workdir or bool(failures))
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {"connections": args.connections, "threads": args.threads,
                     "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds,
                     "stream_mib": args.stream_mib, "proxy_cpu": args.proxy_cpu,
                     "load_cpu": args.load_cpu, "targets": args.targets, "cases": args.cases,
                     "noise_limit": args.noise_limit, "noise_retries": args.noise_retries,
                     "baseline_src": str(args.baseline_src) if args.baseline_src else None},
        "machine": machine_facts(meshproxy_cmd) | baseline_facts(args.baseline_src,
                                                                 meshproxy_cmd),
        "busy_before_start": busy_before,
        "failures": failures,
    }
    summary = summarise(raw)
    report = markdown(meta, summary)
    write_report(args.out, report, {"meta": meta, "summary": summary, "rounds": raw})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
