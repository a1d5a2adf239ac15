#!/usr/bin/env python3
"""HTTP/2 and gRPC through the sidecar, side by side with nginx doing the same work.

Cases (`--cases`, all by default), each measured for nginx and meshproxy in the same run, the
proxies pinned to one core (--proxy-cpu), load generators and backends to the other:

- h2:      `h2load -n 100000 -c 10 -m 100` (HTTP/2 with prior knowledge, `GET /`, authority
           `origin`) to the proxy, which forwards over pooled HTTP/1.1 to a backend nginx
           answering `ok`: nginx with an h2c listener and `proxy_pass`; the sidecar's outbound
           port. Requests/s, the proxy's CPU per request (/proc/PID/stat), errors, and the
           upstream connections it used.
- h2-grpc: the same h2load load as gRPC calls (`POST /demo.Echo/Unary`, content-type
           application/grpc, a 32-byte message, authority `grpcb`) forwarded over HTTP/2 (h2c)
           to a backend nginx answering every call from memory: nginx `grpc_pass`; the
           sidecar's HTTP/2 upstream.
- mtls:    gRPC unary calls at a fixed rate (default 1000/s, open loop, grpcio's asyncio client
           over one channel) straight to a grpcio app, through two nginx (`grpc_pass` over TLS
           with client certificates) and through two sidecars (client sidecar → mTLS h2 →
           server sidecar → app); and, in the same run, mtls_pair.py's HTTP/1.1 load (1 KiB
           GETs over 16 connections) on the same kinds of path: added latency (p50/p90/p99
           over direct) and each proxy's vCPU per 1000 calls/s.
- spread:  one client connection (one grpcio channel, 32 calls in flight) to a proxy in front
           of three grpcio backends: each backend's share of the calls, and the upstream
           connections the proxy held to each (sampled from /proc/net/tcp, as `ss -tn`).

    python benchmarks/h2.py                         # everything, about 4 minutes
    python benchmarks/h2.py --cases h2,h2-grpc --rounds 3
    python benchmarks/h2.py --cases mtls --seconds 20 --rate 1000

The report (Markdown, with the goals of the issue: h2 errors 0, requests/s ≥ 0.5× nginx's and
CPU per request ≤ 2× nginx's; ≤ 2 ms added p99 for gRPC through the pair; each backend within
±10 % of a third over one upstream connection per backend) goes to --out, the raw figures to
the JSON beside it. A sidecar that stops answering during a case is reported with its log
tail and, where py-spy is installed, its Python stacks, then restarted for the next case.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import (add_common_arguments, add_noise_arguments, busy_before_start,  # noqa: E402
                         check_pinning, progress, start_run, write_report)
from harness.conncount import UpstreamConnections  # noqa: E402
from harness.grpc_report import markdown  # noqa: E402
from harness.grpc_stack import GRPC_METHOD_PATH, H2Stack, PairStack, py_spy_dump  # noqa: E402
from harness.mtls_measure import MeasureFailed, Settings, measure, measure_generator  # noqa: E402
from harness.mtls_report import summarise  # noqa: E402
from harness.procs import CpuWindow, Supervisor, log_tail, pinned, run_bounded  # noqa: E402
from harness.report import machine_facts  # noqa: E402
from harness.targets import TargetFailed  # noqa: E402

ALL_CASES = ("h2", "h2-grpc", "mtls", "spread")
H2_CASES = ("h2", "h2-grpc")
TARGETS = ("nginx", "meshproxy")
GRPC_LOAD = Path(__file__).resolve().parent / "harness" / "grpc_load.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "h2.md"
REQUEST_BYTES = 32


def _cases(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in ALL_CASES]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'} not in {', '.join(ALL_CASES)}")
    return [c for c in ALL_CASES if c in items]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", type=_cases, default=list(ALL_CASES), help="comma-separated")
    g = p.add_argument_group("h2 and h2-grpc (h2load)")
    g.add_argument("--requests", type=int, default=100_000, help="h2load -n")
    g.add_argument("--clients", type=int, default=10, help="h2load -c (connections)")
    g.add_argument("--streams", type=int, default=100, help="h2load -m (streams per connection)")
    g.add_argument("--warmup-requests", type=int, default=10_000,
                   help="requests sent before each measured h2load run (not counted)")
    g.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians reported)")
    g.add_argument("--h2load-timeout", type=float, default=120.0,
                   help="seconds one h2load run may take before it is stopped")
    g.add_argument("--stall", type=int, default=10,
                   help="h2load -N: seconds without activity on a connection before h2load "
                        "gives it up")
    g = p.add_argument_group("mtls (fixed rate)")
    g.add_argument("--rate", type=float, default=1000.0, help="calls (requests) per second")
    g.add_argument("--seconds", type=float, default=10.0, help="seconds measured per path")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each")
    g.add_argument("--connections", type=int, default=16,
                   help="keep-alive connections of the HTTP/1.1 load (gRPC: one channel)")
    g.add_argument("--timeout", type=float, default=5.0, help="a call's deadline, seconds")
    g.add_argument("--mtls-rounds", type=int, default=1,
                   help="times every path is measured (order rotating); medians are reported")
    g.add_argument("--no-http1", action="store_true",
                   help="skip the HTTP/1.1 paths measured beside the gRPC ones")
    g = p.add_argument_group("spread")
    g.add_argument("--spread-calls", type=int, default=20_000)
    g.add_argument("--spread-concurrency", type=int, default=32, help="calls in flight")
    add_noise_arguments(p, limit=25.0,
                        limit_help="mtls: CPU other programs and hypervisor steal may take "
                                   "during a measurement, in %% of one core",
                        retries_help="mtls: times a disturbed measurement is repeated")
    p.set_defaults(noise_retries=1)
    add_common_arguments(p, default_out=DEFAULT_OUT,
                         load_cpu_help="core for h2load, the gRPC client, backends, apps, the "
                                       "control plane and this script")
    args = p.parse_args(argv)
    if min(args.requests, args.clients, args.streams, args.rounds, args.spread_calls,
           args.spread_concurrency) < 1 or args.rate <= 0 or args.seconds <= 0:
        p.error("counts, --rate and --seconds must be positive")
    check_pinning(p, args)
    return args


# -- h2load -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_h2load(out: str) -> dict:
    """The figures of h2load's summary: counts, duration, req/s, request time min/max/mean."""
    r: dict = {}
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    if m:
        r["finished_s"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        r["h2load_rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        # h2load's `failed` counts every request that did not succeed (errored and timed out
        # included); `failed` is this script's key for a measurement that failed as a whole.
        for key, value in zip(("total", "started", "done", "succeeded", "failed_requests",
                               "errored", "timeout"), m.groups()):
            r[key] = int(value)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups())))
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r["request_ms"] = {"min": _ms(m.group(1)), "max": _ms(m.group(2)),
                           "mean": _ms(m.group(3))}
    return r


def h2load_argv(args: argparse.Namespace, case: str, port: int, requests: int,
                body: Path) -> list[str]:
    argv = ["h2load", "-n", str(requests), "-c", str(args.clients), "-m", str(args.streams),
            "-N", f"{args.stall}s"]
    if case == "h2":
        return [*argv, "-H", ":authority: origin", f"http://127.0.0.1:{port}/"]
    return [*argv, "-d", str(body), "-H", ":authority: grpcb",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://127.0.0.1:{port}{GRPC_METHOD_PATH}"]


def _stuck_report(stack: H2Stack, target: str) -> dict:
    """What a proxy that no longer answers is doing: alive or not, CPU over one second, its
    log tail, and (a sidecar, with py-spy installed) its Python stacks."""
    child = stack.meshproxy if target == "meshproxy" else stack.nginx
    report: dict = {"alive": child.alive(), "log_tail": log_tail(child.log_path, 30)}
    if child.alive():
        with CpuWindow(child.sid, None, None, None) as window:
            time.sleep(1.0)
        report["cpu_pct_while_stuck"] = 100 * (window.proxy_cpu_s or 0.0) / window.wall
        if target == "meshproxy":
            report["py_spy"] = py_spy_dump(child.sid)
    return report


def h2load_once(args: argparse.Namespace, stack: H2Stack, target: str, case: str,
                body: Path) -> dict:
    """Warm up, then one measured h2load run against `target`; returns its figures. When the
    target stops answering, the result says how (`stuck`) and the target is restarted."""
    child = stack.nginx if target == "nginx" else stack.meshproxy
    port = stack.nginx_port if target == "nginx" else stack.outbound
    backend_port = stack.origin_port if case == "h2" else stack.grpc_port
    warm = pinned(h2load_argv(args, case, port, args.warmup_requests, body), args.load_cpu)
    argv = pinned(h2load_argv(args, case, port, args.requests, body), args.load_cpu)
    result: dict = {"command": shlex.join(argv)}
    try:
        warmed = parse_h2load(run_bounded(warm, args.h2load_timeout).stdout)
        result["warmup"] = {k: warmed.get(k) for k in ("succeeded", "failed_requests", "status")}
        with UpstreamConnections([backend_port], child.sid) as conns, \
                CpuWindow(child.sid, stack.backend.sid, args.proxy_cpu, args.load_cpu) as cpu:
            done = run_bounded(argv, args.h2load_timeout)
    except subprocess.TimeoutExpired:
        result["failed"] = f"h2load did not finish within {args.h2load_timeout:.0f} s"
        done = None
    if done is not None:
        result.update(parse_h2load(done.stdout))
        if "succeeded" not in result:
            result["failed"] = (f"h2load exited {done.returncode} without a summary: "
                                f"{(done.stderr or done.stdout)[-500:]}")
        else:
            ok = result["succeeded"]
            result["errors"] = result["failed_requests"]
            status = result["status"]
            result["non_2xx"] = status["3xx"] + status["4xx"] + status["5xx"]
            result["rps"] = ok / result["finished_s"] if result.get("finished_s") else None
            result["proxy_cpu_s"] = cpu.proxy_cpu_s
            result["proxy_cpu_us_per_req"] = (cpu.proxy_cpu_s * 1e6 / ok
                                              if ok and cpu.proxy_cpu_s is not None else None)
            result["proxy_core_busy_pct"] = cpu.proxy_core_busy_pct
            result["load_core_busy_pct"] = cpu.load_core_busy_pct
            result["proxy_core_other_pct"] = cpu.proxy_core_other_pct
            result["load_core_other_pct"] = cpu.load_core_other_pct
            result["upstream"] = conns.figures()
            result["upstream_max_open"] = conns.max_open[backend_port]
            result["upstream_distinct"] = len(conns.seen[backend_port])
            if result["errors"] or result["non_2xx"]:
                result["h2load_tail"] = done.stdout[-1500:]
    if not stack.ready(target):
        progress(f"  {case} {target}: the proxy does not answer any more; looking at it, "
                 "then restarting it")
        result["stuck"] = _stuck_report(stack, target)
        (stack.restart_meshproxy if target == "meshproxy" else stack.restart_nginx)()
    return result


def _describe_h2(r: dict) -> str:
    if "succeeded" not in r:
        return "failed: " + r.get("failed", "?")
    text = (f"{r['rps']:,.0f} req/s, {r['succeeded']:,} ok, {r['errors']:,} errors, "
            f"{r['non_2xx']:,} non-2xx")
    if r.get("proxy_cpu_us_per_req") is not None:
        text += f", proxy {r['proxy_cpu_us_per_req']:.1f} µs/req"
    text += f", upstream connections max {r['upstream_max_open']} / {r['upstream_distinct']} seen"
    return text + (" — PROXY STUCK" if "stuck" in r else "")


def run_h2(args: argparse.Namespace, stack: H2Stack, workdir: Path) -> dict:
    body = workdir / "grpc-request.bin"
    body.write_bytes(b"\x00" + REQUEST_BYTES.to_bytes(4, "big") + b"x" * REQUEST_BYTES)
    cases = [c for c in args.cases if c in H2_CASES]
    raw: dict = {case: {t: [] for t in TARGETS} for case in cases}
    for round_no in range(args.rounds):
        order = TARGETS[round_no % 2:] + TARGETS[:round_no % 2]
        for case in cases:
            for target in order:
                result = h2load_once(args, stack, target, case, body)
                raw[case][target].append(result)
                progress(f"round {round_no + 1}/{args.rounds} {case:>7} {target:>9}: "
                         f"{_describe_h2(result)}")
    return raw


# -- spread -------------------------------------------------------------------------------------

def spread_once(args: argparse.Namespace, stack: H2Stack, target: str, workdir: Path) -> dict:
    child = stack.nginx if target == "nginx" else stack.meshproxy
    port = stack.spread_port if target == "nginx" else stack.outbound
    argv = pinned([sys.executable, str(GRPC_LOAD), "--port", str(port), "--authority", "echo",
                   "--concurrency", str(args.spread_concurrency),
                   "--calls", str(args.spread_calls), "--timeout", str(args.timeout)],
                  args.load_cpu)
    result: dict = {"command": shlex.join(argv)}
    try:
        with UpstreamConnections(stack.echo_ports, child.sid) as conns, \
                CpuWindow(child.sid, None, args.proxy_cpu, args.load_cpu) as cpu:
            done = run_bounded(argv, args.h2load_timeout)
    except subprocess.TimeoutExpired:
        result["failed"] = f"the gRPC client did not finish within {args.h2load_timeout:.0f} s"
        return result
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        result["failed"] = f"the gRPC client exited {done.returncode}: {done.stderr[-800:]}"
        return result
    result.update(json.loads(lines[-1]))
    result["upstream"] = conns.figures()
    names = [f"b{i}" for i in range(len(stack.echo_ports))]
    total = sum(result["backends"].values())
    result["shares"] = {n: result["backends"].get(n, 0) / total if total else None
                        for n in names}
    result["upstream_by_backend"] = {
        n: {"max_open": conns.max_open[p], "distinct": len(conns.seen[p])}
        for n, p in zip(names, stack.echo_ports)}
    result["proxy_cpu_us_per_call"] = (cpu.proxy_cpu_s * 1e6 / result["ok"]
                                       if result["ok"] and cpu.proxy_cpu_s else None)
    if not stack.ready(target):
        result["stuck"] = _stuck_report(stack, target)
        (stack.restart_meshproxy if target == "meshproxy" else stack.restart_nginx)()
    return result


def run_spread(args: argparse.Namespace, stack: H2Stack, workdir: Path) -> dict:
    out = {}
    for target in TARGETS:
        r = out[target] = spread_once(args, stack, target, workdir)
        if "failed" in r:
            progress(f"spread {target:>9}: failed: {r['failed']}")
            continue
        shares = ", ".join(f"{n} {100 * s:.1f} %" for n, s in r["shares"].items())
        conns = ", ".join(f"{n} {c['max_open']}/{c['distinct']}"
                          for n, c in r["upstream_by_backend"].items())
        progress(f"spread {target:>9}: {r['ok']:,} ok, {r['errors']} errors, "
                 f"{r['calls_per_s']:,.0f} calls/s; shares {shares}; upstream connections "
                 f"(max open / seen) {conns}")
    return out


# -- mtls ---------------------------------------------------------------------------------------

def _mtls_measure(args: argparse.Namespace, kind: str, path, settings: Settings, workdir: Path,
                  known: dict) -> dict:
    """One measurement (repeated while others disturbed it, as mtls_pair.py does)."""
    best = None
    for attempt in range(1, args.noise_retries + 2):
        time.sleep(1.0)
        try:
            if kind == "http1":
                result = measure(path, settings, workdir, known)
            else:
                authority = [] if path.name == "direct" else ["--authority", "echo"]
                argv = [sys.executable, str(GRPC_LOAD), "--port", str(path.port), *authority,
                        "--rate", str(settings.rate), "--warmup", str(settings.warmup),
                        "--seconds", str(settings.seconds), "--timeout", str(settings.timeout)]
                result = measure_generator(path, argv, settings,
                                           workdir / f"grpc-load-{path.name}.log", known)
        except MeasureFailed as exc:
            return {"failed": str(exc)}
        disturbed = result["others_pct"] + result["steal_pct"]
        if best is None or disturbed < best["others_pct"] + best["steal_pct"]:
            best = result
        best["attempts"] = attempt
        if disturbed <= args.noise_limit or attempt > args.noise_retries:
            break
        progress(f"  {kind} {path.name}: others {result['others_pct']:.0f} % and steal "
                 f"{result['steal_pct']:.0f} % of a core; measuring again")
    return best


def _mtls_path(args: argparse.Namespace, kind: str, path, settings: Settings, workdir: Path,
               known: dict) -> dict:
    dead = [c for c in path.proxies.values() if not c.alive()]
    if dead:
        return {"failed": f"{dead[0].name} exited; log {dead[0].log_path}:\n"
                          f"{log_tail(dead[0].log_path)}"}
    return _mtls_measure(args, kind, path, settings, workdir, known)


def _describe_mtls(result: dict) -> str:
    if "failed" in result:
        return "failed: " + result["failed"].splitlines()[0]
    cpu = ", ".join(f"{role} {v['vcpu_per_1000_rps']:.3f}"
                    for role, v in sorted(result["proxies"].items()))
    return (f"p50 {result['p50_ms']:.3f} p90 {result['p90_ms']:.3f} p99 {result['p99_ms']:.3f} "
            f"ms, {result['errors']} errors" + ("" if result["held"] else ", RATE NOT HELD")
            + (f"; vCPU per 1000/s {cpu}" if cpu else "")
            + f"; others {result['others_pct']:.0f} %, steal {result['steal_pct']:.0f} %")


def run_mtls(args: argparse.Namespace, stack: PairStack, workdir: Path) -> dict:
    from harness.mtls_stack import MeasuredPath
    stack.start_apps()
    paths = {"grpc": {"direct": MeasuredPath("direct", "direct", stack.grpc_app_port)},
             "http1": {"direct": MeasuredPath("direct", "direct", stack.app_port)}}
    gone: dict[str, str] = {}
    for name, start in (("nginx", stack.start_nginx_pairs), ("meshproxy", stack.start_meshproxy)):
        try:
            for kind, path in start().items():
                paths[kind][name] = path
        except TargetFailed as exc:
            gone[name] = str(exc)
            progress(f"FAILED to start the {name} pairs: {exc}")
    kinds = ["grpc"] + ([] if args.no_http1 else ["http1"])
    settings = Settings(rate=args.rate, connections=args.connections, warmup=args.warmup,
                        seconds=args.seconds, timeout=args.timeout, load_cpu=args.load_cpu,
                        proxy_cpu=args.proxy_cpu)
    known = dict(stack.started)
    names = ("direct", "nginx", "meshproxy")
    rounds: dict = {kind: {name: [] for name in names} for kind in kinds}
    for round_no in range(args.mtls_rounds):
        for kind in kinds:
            known["app"] = stack.grpc_app if kind == "grpc" else stack.app
            for name in names[round_no % 3:] + names[:round_no % 3]:
                result = ({"failed": gone[name]} if name in gone else
                          _mtls_path(args, kind, paths[kind][name], settings, workdir, known))
                rounds[kind][name].append(result)
                progress(f"mtls round {round_no + 1}/{args.mtls_rounds} {kind:>5} {name:>9}: "
                         f"{_describe_mtls(result)}")
    return {"rounds": rounds, "summary": {kind: summarise(r) for kind, r in rounds.items()},
            "labels": {kind: {n: p.label for n, p in paths[kind].items()} for kind in kinds}}


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needed = ["nginx", "curl"] + ([] if args.no_pin else ["taskset"])
    if any(c in H2_CASES for c in args.cases):
        needed.append("h2load")
    if not start_run(args, needed):
        return 2
    busy_before = busy_before_start()
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    started = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-grpc-"))
    workdir.chmod(0o755)  # nginx workers started by root run as `nobody`
    supervisor = Supervisor(workdir)
    meshproxy_cmd = shlex.split(args.meshproxy_cmd)
    common = dict(proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu,
                  start_timeout=args.start_timeout, meshproxy_cmd=meshproxy_cmd,
                  meshproxy_args=shlex.split(args.meshproxy_args))
    results: dict = {}
    failures: list[str] = []
    try:
        if any(c in args.cases for c in (*H2_CASES, "spread")):
            stack = H2Stack(supervisor, workdir / "h2", **common)
            stack.start_backend()
            if "spread" in args.cases:
                stack.start_echo()
            stack.start_nginx()
            stack.start_meshproxy()
            for target in TARGETS:
                stack.check(target)
            if any(c in H2_CASES for c in args.cases):
                results.update(run_h2(args, stack, workdir))
            if "spread" in args.cases:
                results["spread"] = run_spread(args, stack, workdir)
            for child in [stack.nginx, stack.meshproxy, stack.backend, *stack.echo]:
                supervisor.stop(child)  # the mtls case runs alone
        if "mtls" in args.cases:
            results["mtls"] = run_mtls(args, PairStack(supervisor, workdir / "mtls", **common),
                                       workdir)
    except TargetFailed as exc:
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        failures.append(str(exc))
        return 2
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        supervisor.stop_all()
        keep = args.keep_workdir or bool(failures) or _problems(results)
        if keep:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {k: getattr(args, k) for k in (
            "cases", "requests", "clients", "streams", "warmup_requests", "rounds", "stall",
            "rate", "seconds", "warmup", "connections", "timeout", "spread_calls",
            "spread_concurrency", "mtls_rounds", "proxy_cpu", "load_cpu", "noise_limit",
            "noise_retries")},
        "machine": {k: v for k, v in machine_facts(meshproxy_cmd).items()
                    if k not in ("haproxy", "wrk", "curl")} | _tool_versions(),
        "busy_before_start": busy_before,
        "workdir": str(workdir) if _problems(results) else None,
    }
    report = markdown(meta, results)
    write_report(args.out, report, {"meta": meta, "results": results})
    return 1 if _problems(results) else 0


def _problems(results: dict) -> bool:
    """True when a proxy got stuck, a measurement failed, or a call or request failed."""
    text = json.dumps(results)
    return '"stuck"' in text or '"failed": "' in text


def _tool_versions() -> dict[str, str]:
    versions = {}
    try:
        done = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=5)
        versions["h2load"] = done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        versions["h2load"] = "unavailable"
    try:
        import grpc
        versions["grpcio"] = grpc.__version__
    except ImportError:
        versions["grpcio"] = "unavailable"
    return versions


if __name__ == "__main__":
    sys.exit(main())
