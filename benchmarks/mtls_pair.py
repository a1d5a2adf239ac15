#!/usr/bin/env python3
"""Two proxies with mutual TLS between them, at a fixed request rate: latency added over direct.

    client ─► client-side proxy ─► mTLS ─► server-side proxy ─► app

Paths measured one after the other in the same run, each with the same open-loop load (a fixed
rate over keep-alive connections, latency timed from each request's scheduled send time, so
queueing behind a slow answer counts):

- direct:    the load generator straight to the app (nginx, one worker, 1 KiB from memory);
- nginx:     a client-side nginx proxying over TLS 1.3 with a client certificate
             (`proxy_ssl_certificate`, `proxy_ssl_verify on`) to a server-side nginx
             (`ssl_verify_client on`), then to the app; one worker each, `keepalive 32`
             upstreams; certificates from the mesh's CA;
- meshproxy: a control plane with `--ca-dir --tokens-dir`, the client's sidecar and the
             server's sidecar with `--token-file` and STRICT mTLS, the server's sidecar
             forwarding to the app (`--app-port`); requests go to the client sidecar's
             outbound port with `Host: server`.

Added latency is path minus direct at p50, p90 and p99. Each proxy's CPU (utime + stime from
/proc over the measured window) is reported per 1000 requests/s. The report states the goals
(added p90 ≤ 1.5× the nginx pair's; ≤ 0.10 vCPU per 1000 req/s per sidecar) and the machine's
load during each measurement.

    python benchmarks/mtls_pair.py                          # 1000 req/s, 16 conns, 20 s per path
    python benchmarks/mtls_pair.py --rate 500 --paths direct,meshproxy
    python benchmarks/mtls_pair.py --rounds 3 --seconds 30
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import (add_common_arguments, add_noise_arguments, busy_before_start,  # noqa: E402
                         check_pinning, progress, start_run, write_report)
from harness.mtls_measure import MeasureFailed, Settings, measure  # noqa: E402
from harness.mtls_report import markdown, summarise  # noqa: E402
from harness.mtls_stack import MeasuredPath, Stack  # noqa: E402
from harness.procs import Supervisor, log_tail  # noqa: E402
from harness.report import machine_facts  # noqa: E402
from harness.targets import TargetFailed  # noqa: E402

ALL_PATHS = ("direct", "nginx", "meshproxy")
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "mtls_pair.md"


def _paths(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in ALL_PATHS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'} not in {', '.join(ALL_PATHS)}")
    return [p for p in ALL_PATHS if p in items]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second, fixed")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds measured per path")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before each measured window (not counted)")
    p.add_argument("--rounds", type=int, default=1,
                   help="times every path is measured (order rotating); medians are reported")
    p.add_argument("--paths", type=_paths, default=list(ALL_PATHS),
                   help="comma-separated: direct, nginx, meshproxy (added latency needs direct)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds a request may wait for its answer before it counts as an error")
    p.add_argument("--settle", type=float, default=1.0, help="idle seconds between paths")
    add_noise_arguments(p, limit=25.0,
                        limit_help="CPU other programs and hypervisor steal may take during a "
                                   "measurement, in %% of one core (all cores together)",
                        retries_help="times a measurement over --noise-limit is "
                        "repeated (the least disturbed attempt is kept)")
    add_common_arguments(p, default_out=DEFAULT_OUT,
                         load_cpu_help="core for the load generator, the app, the control plane and this script",
                         meshproxy_help="how to run meshproxy (control plane and sidecars)",
                         workdir_help="keep the temporary folder with configs, certificates and logs")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.connections < 1 or args.seconds <= 0 or args.warmup < 0 \
            or args.rounds < 1 or args.noise_retries < 0:
        p.error("--rate, --connections, --seconds and --rounds must be positive, "
                "--warmup and --noise-retries at least 0")
    check_pinning(p, args)
    return args


def _describe(result: dict) -> str:
    if "failed" in result:
        return "failed: " + result["failed"].splitlines()[0]
    cpu = ", ".join(f"{role} {v['vcpu_per_1000_rps']:.3f} vCPU/1000 req/s"
                    for role, v in sorted(result["proxies"].items()))
    return (f"p50 {result['p50_ms']:.3f} p90 {result['p90_ms']:.3f} p99 {result['p99_ms']:.3f} "
            f"max {result['max_ms']:.2f} ms, {result['errors']} errors"
            + ("" if result["held"] else ", RATE NOT HELD")
            + (f"; {cpu}" if cpu else "")
            + f"; others {result['others_pct']:.0f} % and steal {result['steal_pct']:.0f} % of a "
              f"core, load {result['loadavg'][0]}")


def _start_paths(args: argparse.Namespace, stack: Stack) -> tuple[dict[str, MeasuredPath],
                                                                  dict[str, str]]:
    paths: dict[str, MeasuredPath] = {}
    gone: dict[str, str] = {}
    direct = stack.start_app()
    if "direct" in args.paths:
        paths["direct"] = direct
    if "nginx" in args.paths or "meshproxy" in args.paths:
        stack.make_identity()
    for name, start in (("nginx", stack.start_nginx_pair),
                        ("meshproxy", stack.start_meshproxy_pair)):
        if name not in args.paths:
            continue
        try:
            paths[name] = start()
            progress(f"started {name}: load goes to 127.0.0.1:{paths[name].port}")
        except TargetFailed as exc:
            gone[name] = str(exc)
            progress(f"FAILED to start {name}: {exc}")
    return paths, gone


def _disturbance(result: dict) -> float:
    """Share of a core the measurement lost to others: other programs plus hypervisor steal."""
    return result["others_pct"] + result["steal_pct"]


def _measure(args: argparse.Namespace, path: MeasuredPath, settings: Settings, workdir: Path,
             known: dict) -> dict:
    """One measurement of a path; repeated while other programs and hypervisor steal took more
    than --noise-limit (at most --noise-retries times), keeping the least disturbed attempt."""
    best: dict | None = None
    for attempt in range(1, args.noise_retries + 2):
        time.sleep(args.settle)
        try:
            result = measure(path, settings, workdir, known)
        except MeasureFailed as exc:
            return {"failed": str(exc)}
        if best is None or _disturbance(result) < _disturbance(best):
            best = result
        best["attempts"] = attempt
        if _disturbance(result) <= args.noise_limit or attempt > args.noise_retries:
            break
        progress(f"  {path.name}: other programs {result['others_pct']:.0f} % and steal "
                  f"{result['steal_pct']:.0f} % of a core (p90 {result['p90_ms']:.3f} ms); "
                  f"measuring again ({attempt}/{args.noise_retries})")
    return best


def run_rounds(args: argparse.Namespace, stack: Stack, workdir: Path,
               settings: Settings) -> tuple[dict[str, list[dict]], dict[str, str]]:
    paths, gone = _start_paths(args, stack)
    rounds: dict[str, list[dict]] = {name: [] for name in args.paths}
    known = {"app": stack.app, "control": stack.control}
    for round_no in range(args.rounds):
        shift = round_no % len(args.paths)
        for name in args.paths[shift:] + args.paths[:shift]:
            path = paths.get(name)
            dead = [c for c in (path.proxies.values() if path else ()) if not c.alive()]
            if name not in gone and dead:
                gone[name] = (f"{dead[0].name} exited with status {dead[0].popen.returncode}; "
                              f"log {dead[0].log_path}:\n{log_tail(dead[0].log_path)}")
            if name in gone:
                result = {"failed": gone[name]}
            else:
                result = _measure(args, path, settings, workdir, known)
            rounds[name].append(result)
            progress(f"round {round_no + 1}/{args.rounds} {name:>9}: {_describe(result)}")
    return rounds, gone


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needed = ["nginx"] + ([] if args.no_pin else ["taskset"])
    if not start_run(args, needed):
        return 2
    with open("/proc/loadavg") as f:
        loadavg_before = " ".join(f.read().split()[:3])
    busy_before = busy_before_start()
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    started = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-mtls-"))
    workdir.chmod(0o755)  # nginx workers started by root run as `nobody`
    supervisor = Supervisor(workdir)
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    settings = Settings(rate=args.rate, connections=args.connections, warmup=args.warmup,
                        seconds=args.seconds, timeout=args.timeout, load_cpu=args.load_cpu,
                        proxy_cpu=args.proxy_cpu)
    failures: list[str] = []
    labels: dict[str, str] = {"direct": "direct"}
    try:
        stack = Stack(supervisor, workdir, proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu,
                      start_timeout=args.start_timeout, meshproxy_cmd=meshproxy_cmd,
                      meshproxy_args=shlex.split(args.meshproxy_args))
        rounds, gone = run_rounds(args, stack, workdir, settings)
        failures = [f"{name}: {why}" for name, why in gone.items()]
        failures += [f"{name}: {r['failed']}" for name, results in rounds.items()
                     for r in results if "failed" in r and name not in gone]
    except TargetFailed as exc:
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        failures.append(str(exc))
        return 2
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        supervisor.stop_all()
        if args.keep_workdir or failures:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    labels.update({"nginx": "nginx pair (TLS, client certificates)",
                   "meshproxy": "meshproxy pair (mTLS, STRICT)"})
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {"rate": args.rate, "connections": args.connections,
                     "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
                     "paths": args.paths, "proxy_cpu": args.proxy_cpu,
                     "load_cpu": args.load_cpu, "timeout": args.timeout,
                     "noise_limit": args.noise_limit, "noise_retries": args.noise_retries},
        "machine": {k: v for k, v in machine_facts(meshproxy_cmd).items()
                    if k not in ("haproxy", "wrk", "curl")},
        "busy_before_start": busy_before,
        "loadavg_before": loadavg_before,
        "failures": [],
    }
    summary = summarise(rounds)
    report = markdown(meta, summary, labels)
    write_report(args.out, report,
                 {"meta": meta, "summary": summary, "rounds": rounds, "failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
