"""The command-line flags every benchmark script shares: where the programs run (core
pinning), how meshproxy is started, where the report goes, and how the script stops."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path


def add_common_arguments(p: argparse.ArgumentParser, *, default_out: Path, load_cpu_help: str,
                         proxy_cpu_help: str = "core the proxies are pinned to",
                         meshproxy_help: str = "how to run meshproxy",
                         out_help: str = "Markdown report; the raw JSON goes next to it (.json)",
                         workdir_help: str = "keep the temporary folder with configs and logs") -> None:
    """Add --proxy-cpu, --load-cpu, --no-pin, --start-timeout, --meshproxy-cmd,
    --meshproxy-args, --out and --keep-workdir to `p`; check them with `check_pinning`."""
    p.add_argument("--proxy-cpu", type=int, default=0, help=proxy_cpu_help)
    p.add_argument("--load-cpu", type=int, default=1, help=load_cpu_help)
    p.add_argument("--no-pin", action="store_true", help="do not pin anything to a core")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds a server has to become ready")
    p.add_argument("--meshproxy-cmd", default=f"{shlex.quote(sys.executable)} -m meshproxy",
                   help=meshproxy_help)
    p.add_argument("--meshproxy-args", default="--log-level warning",
                   help="extra arguments after `meshproxy proxy ...`")
    p.add_argument("--out", type=Path, default=default_out, help=out_help)
    p.add_argument("--keep-workdir", action="store_true", help=workdir_help)


def add_baseline_argument(p: argparse.ArgumentParser) -> None:
    """Add --baseline-src DIR: a second meshproxy sidecar started the same way but importing
    meshproxy from the source tree DIR. Check it with `check_baseline`. Only scripts that
    measure such a target take it (run.py)."""
    p.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                   help="also measure `meshproxy-base`: the sidecar run with the same command "
                        "but importing meshproxy from the source tree DIR (PYTHONPATH=DIR)")


def check_baseline(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Make --baseline-src absolute; exit through `p.error` when it holds no meshproxy
    package (a typo would otherwise fall back to the installed one)."""
    if args.baseline_src is None:
        return
    args.baseline_src = args.baseline_src.resolve()
    if not (args.baseline_src / "meshproxy" / "__init__.py").is_file():
        p.error(f"--baseline-src {args.baseline_src}: no meshproxy/__init__.py there")


def add_noise_arguments(p: argparse.ArgumentParser, *, limit: float, retries_help: str,
                        limit_help: str = "share of a core (%%) other programs may use during "
                                          "a measurement") -> None:
    """Add --noise-limit (percent of a core other programs may use while measuring) and
    --noise-retries."""
    p.add_argument("--noise-limit", type=float, default=limit, help=limit_help)
    p.add_argument("--noise-retries", type=int, default=2, help=retries_help)


def check_pinning(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With --no-pin, clear both cores; otherwise exit through `p.error` when a chosen core
    is not one this process may run on."""
    if args.no_pin:
        args.proxy_cpu = args.load_cpu = None
        return
    usable = os.sched_getaffinity(0)
    for flag, cpu in (("--proxy-cpu", args.proxy_cpu), ("--load-cpu", args.load_cpu)):
        if cpu not in usable:
            p.error(f"{flag} {cpu} is not one of the usable cores {sorted(usable)}; "
                    "pick others or pass --no-pin")


def start_run(args: argparse.Namespace, needed: set[str] | list[str]) -> bool:
    """What every benchmark does before it measures: check that the programs `needed` are on
    PATH (False, having said which are missing, when not); pin this script to the load core so
    its own work (sampling /proc, the load generator) stays off the proxies' core; let Ctrl-C
    and `kill -INT` work (a shell starts background jobs with SIGINT ignored); and turn SIGTERM
    and SIGHUP into SystemExit."""
    missing = sorted(tool for tool in set(needed) if shutil.which(tool) is None)
    if missing:
        print(f"missing programs: {', '.join(missing)} (see benchmarks/README.md)", file=sys.stderr)
        return False
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_signals()
    return True


QUIET_PCT = 10.0  # a core busier than this before a run starts makes its numbers noisy


def busy_before_start() -> dict:
    """Sample each core for a second before anything starts; warn when one is over QUIET_PCT.
    Return {core: percent busy}, which the reports print."""
    from harness.procs import busy_over

    busy = busy_over(1.0)
    if max(busy.values(), default=0.0) > QUIET_PCT:
        progress("warning: the machine is not quiet (" + ", ".join(
            f"CPU {cpu} {pct:.0f} % busy" for cpu, pct in sorted(busy.items()))
            + " before anything started); numbers will be noisy")
    return busy


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so that `finally` blocks stop the servers
    a run started."""
    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)


def progress(text: str) -> None:
    """One line of progress, on standard error (the report goes to files)."""
    print(text, file=sys.stderr, flush=True)


def write_report(out: Path, report: str, raw: dict) -> None:
    """Write the Markdown `report` to `out` and `raw` as JSON beside it (OUT.json), print the
    report, and say on stderr where both went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(raw, indent=2) + "\n")
    print(report)
    print(f"wrote {out} and {json_path}", file=sys.stderr)
