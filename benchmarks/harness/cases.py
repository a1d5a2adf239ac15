"""One measurement of one target: a wrk request run or one curl stream.

Around each load run the harness reads the proxy's CPU time (summed over its process tree)
and both cores' busy time, and samples the proxy's RSS in a background thread; the results
are plain dicts so they go straight into the JSON report.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.procs import CpuWindow, RssSampler, pinned, run_bounded
from harness.targets import HOST, Endpoint

LUA_SCRIPT = Path(__file__).resolve().parent.parent / "upstream" / "report.lua"
MIB = 1024 * 1024
# A request run with a larger share of errors (non-2xx/3xx answers, socket errors, timeouts)
# is reported as failed rather than as a throughput.
MAX_ERROR_SHARE = 0.001

# Request cases: name -> path on the origin. Stream cases: one transfer each way.
REQUEST_CASES = {"tiny": "/", "1k": "/1k"}
STREAM_CASES = ("download", "upload")
ALL_CASES = (*REQUEST_CASES, *STREAM_CASES)


class LoadFailed(Exception):
    """wrk or curl did not run to completion or printed something the harness cannot read."""


@dataclass(frozen=True)
class LoadSettings:
    """How hard and how long to push: the same for every target of a run."""

    connections: int
    threads: int
    duration: int
    warmup: int
    wrk_timeout: int
    load_cpu: int | None
    proxy_cpu: int | None
    host_header: str = "origin"


def run_wrk(port: int, path: str, seconds: int, s: LoadSettings) -> dict:
    """Run wrk against 127.0.0.1:port/path for `seconds`; return the report.lua JSON.

    Raises LoadFailed when wrk fails or prints no result line.
    """
    argv = pinned(["wrk", f"-t{s.threads}", f"-c{s.connections}", f"-d{seconds}s",
                   f"--timeout={s.wrk_timeout}s", "-s", str(LUA_SCRIPT),
                   "-H", f"Host: {s.host_header}", f"http://{HOST}:{port}{path}"], s.load_cpu)
    try:
        done = run_bounded(argv, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise LoadFailed(f"wrk did not finish within {seconds + 60}s") from exc
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise LoadFailed(f"wrk exited {done.returncode} without a result: "
                     f"{(done.stderr or done.stdout).strip()[-500:]}")


def _window_fields(w: CpuWindow) -> dict:
    return {
        "proxy_core_busy_pct": w.proxy_core_busy_pct,
        "load_core_busy_pct": w.load_core_busy_pct,
        # Busy time of each core that the processes meant to run there did not use: other
        # programs competing with the measurement. Near 0 on a quiet machine.
        "proxy_core_other_pct": w.proxy_core_other_pct,
        "load_core_other_pct": w.load_core_other_pct,
    }


def measure_requests(endpoint: Endpoint, case: str, s: LoadSettings, origin_sid: int) -> dict:
    """Warm up, then run wrk for s.duration seconds; return throughput, latency, CPU and RSS.

    CPU per request is the proxy tree's user+system time over the measured run divided by the
    requests wrk completed. A run with too many errors gets a `failed` entry next to its
    numbers. Raises LoadFailed when wrk does not produce a result.
    """
    path = REQUEST_CASES[case]
    if s.warmup > 0:
        run_wrk(endpoint.port, path, s.warmup, s)
    sids = [endpoint.sid] if endpoint.sid is not None else []
    with CpuWindow(endpoint.sid, origin_sid, s.proxy_cpu, s.load_cpu) as window, \
            RssSampler(sids) as rss:
        result = run_wrk(endpoint.port, path, s.duration, s)
    requests = result["requests"]
    seconds = result["duration_us"] / 1e6
    latency = result["latency_us"]
    errors = result["errors"]
    per_request = (lambda cpu: cpu * 1e6 / requests if cpu is not None and requests else None)
    measured = {
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": latency["p50"] / 1000,
        "p90_ms": latency["p90"] / 1000,
        "p99_ms": latency["p99"] / 1000,
        "max_ms": latency["max"] / 1000,
        "errors": sum(errors.values()),
        "errors_detail": errors,
        "proxy_cpu_s": window.proxy_cpu_s,
        "proxy_cpu_us_per_req": per_request(window.proxy_cpu_s),
        "origin_cpu_us_per_req": per_request(window.origin_cpu_s),
        "proxy_rss_peak_mib": rss.peak / MIB if sids else None,
        **_window_fields(window),
    }
    # Error answers are cheap and fast; a run with many of them says nothing about forwarding.
    if measured["errors"] > MAX_ERROR_SHARE * max(requests, 1):
        measured["failed"] = (f"{measured['errors']} errors in {requests:.0f} requests "
                              f"(wrk: {errors}); see the JSON for this round's numbers")
    return measured


def run_curl(argv_tail: list[str], timeout: int, load_cpu: int | None) -> dict:
    """Run curl with -w JSON output; return its fields (http_code, speeds, sizes, time_total).

    Raises LoadFailed when curl fails or times out.
    """
    write_out = ('{"http_code":%{http_code},"size_download":%{size_download},'
                 '"size_upload":%{size_upload},"speed_download":%{speed_download},'
                 '"speed_upload":%{speed_upload},"time_total":%{time_total}}')
    argv = pinned(["curl", "-sS", "--max-time", str(timeout), "-o", "/dev/null",
                   "-w", write_out, *argv_tail], load_cpu)
    try:
        done = run_bounded(argv, timeout=timeout + 30)
    except subprocess.TimeoutExpired as exc:
        raise LoadFailed(f"curl did not finish within {timeout + 30}s") from exc
    if done.returncode != 0:
        raise LoadFailed(f"curl exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def measure_stream(endpoint: Endpoint, case: str, big_file: Path, size: int, timeout: int,
                   s: LoadSettings, server_sid: int) -> dict:
    """Download `size` bytes from the origin, or upload them chunked to the sink, through
    the endpoint; return MiB/s, the proxy's peak RSS and its CPU seconds per GiB.
    server_sid is the session of the origin (download) or the sink (upload).

    Raises LoadFailed when curl fails or the transfer is short or not answered with 200.
    """
    if case == "download":
        tail = ["-H", "Host: origin", f"http://{HOST}:{endpoint.port}/big"]
    else:
        # Chunked on purpose: the proxy cannot know the length and has to stream.
        tail = ["-T", str(big_file), "-H", "Transfer-Encoding: chunked", "-H", "Expect:",
                "-H", "Host: sink", f"http://{HOST}:{endpoint.upload_port}/upload"]
    sids = [endpoint.sid] if endpoint.sid is not None else []
    with CpuWindow(endpoint.sid, server_sid, s.proxy_cpu, s.load_cpu) as window, \
            RssSampler(sids) as rss:
        result = run_curl(tail, timeout, s.load_cpu)
    cpu = window.proxy_cpu_s
    moved = result["size_download"] if case == "download" else result["size_upload"]
    speed = result["speed_download"] if case == "download" else result["speed_upload"]
    if result["http_code"] != 200 or moved < size:
        raise LoadFailed(f"{case} through {endpoint.name}: HTTP {result['http_code']}, "
                         f"{moved} of {size} bytes")
    return {
        "bytes": moved,
        "seconds": result["time_total"],
        "mib_per_s": speed / MIB,
        "proxy_rss_peak_mib": rss.peak / MIB if sids else None,
        "proxy_cpu_s_per_gib": cpu / (moved / (1024 * MIB)) if cpu is not None else None,
        **_window_fields(window),
    }
