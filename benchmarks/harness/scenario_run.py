"""Running one scenario case: start backends and proxy, load, break things on time, collect.

Every process is started through the Supervisor (own session, SIGTERM if the harness dies)
and stopped when the case ends, whatever happens. The load generator runs as its own process
on the load core; the harness only watches its log, kills and restarts a backend at the
planned moments, and reads CPU counters and the proxy's metrics.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from harness.procs import (Child, Supervisor, busy_percent, cpu_busy_ticks, log_tail,
                           session_cpu_seconds, wait_until)
from harness.scenario_cases import (AFFECTED, SERVICE, SHARE_AFFECTED, Case, Instance, nginx_conf,
                                    write_mesh)
from harness.scenario_stats import Records, failure_times, recovery, summarise, timeline
from harness.targets import HOST, TargetFailed, free_ports, wait_ready

HERE = Path(__file__).resolve().parent
BACKEND_SCRIPT = HERE / "scenario_backend.py"
LOAD_SCRIPT = HERE / "scenario_load.py"
OPEN_LOAD_SCRIPT = HERE / "scenario_openload.py"


@dataclass(frozen=True)
class RunSettings:
    """How every case of a run is loaded and timed (seconds unless said otherwise)."""

    concurrency: int
    warmup: float
    duration: float
    kill_at: float  # scenario c: after the warm-up
    restart_after: float
    recovery_window: float  # scenario c: load after the restart
    request_timeout: float
    proxy_cpu: int | None
    load_cpu: int | None
    start_timeout: float
    meshproxy_cmd: tuple[str, ...]
    meshproxy_args: tuple[str, ...]

    def warmup_for(self, case: Case) -> float:
        """Seconds of uncounted load before the measured part. None in scenario b: its
        instance fails from the first request on, and those first requests are the ones
        ejection has not caught yet."""
        return 0.0 if case.scenario == "b" else self.warmup

    def measured_seconds(self, case: Case) -> float:
        """Seconds of load after the warm-up for this case."""
        if case.kill:
            return self.kill_at + self.restart_after + self.recovery_window
        return self.duration


def _python(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _get(port: int, path: str, host: str) -> tuple[int, dict[str, str], bytes] | None:
    """Return (status, headers, body) of GET path, or None when it cannot be fetched."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class CpuTally:
    """CPU used over a case: the proxy's session, the backends', the load generator's (it
    reports its own) and this process's; and how busy each core was. The difference between
    a core's busy time and what the processes meant to run there used is other programs."""

    def __init__(self, proxy: Child, proxy_cpu: int | None, load_cpu: int | None) -> None:
        self.proxy = proxy
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self._backend_first: dict[int, float] = {}
        self._backend_last: dict[int, float] = {}

    def begin(self, backends: list[Child]) -> None:
        """Take the starting snapshot."""
        self._t0 = time.monotonic()
        self._cores0 = cpu_busy_ticks()
        self._proxy0 = session_cpu_seconds(self.proxy.sid)
        self._own0 = _own_cpu()
        self.sample(backends, initial=True)

    def sample(self, backends: list[Child], initial: bool = False) -> None:
        """Read the backends' CPU now (once one of them is killed, its CPU can't be read).

        A backend first seen after the start (a restarted one) counts from 0.
        """
        for child in backends:
            if child.alive():
                seconds = session_cpu_seconds(child.sid)
                self._backend_first.setdefault(child.sid, seconds if initial else 0.0)
                self._backend_last[child.sid] = seconds

    def end(self, backends: list[Child]) -> None:
        """Take the closing snapshot."""
        self.sample(backends)
        self._wall = time.monotonic() - self._t0
        self._cores1 = cpu_busy_ticks()
        self._proxy_s = session_cpu_seconds(self.proxy.sid) - self._proxy0
        self._own_s = _own_cpu() - self._own0

    def figures(self, load_cpu_s: float, requests: int) -> dict:
        """Return the CPU figures between begin() and end() (None where a core is not
        pinned), given the load generator's own CPU seconds and the requests it made."""
        wall, cores, proxy_s = self._wall, self._cores1, self._proxy_s
        backends_s = sum(self._backend_last[s] - self._backend_first[s]
                         for s in self._backend_last)
        load_side = self._own_s + load_cpu_s + backends_s
        proxy_busy = busy_percent(self._cores0, cores, self.proxy_cpu)
        load_busy = busy_percent(self._cores0, cores, self.load_cpu)
        return {
            "wall_s": wall,
            "proxy_cpu_s": proxy_s,
            "proxy_cpu_us_per_req": proxy_s * 1e6 / requests if requests else None,
            "backends_cpu_us_per_req": backends_s * 1e6 / requests if requests else None,
            "load_cpu_us_per_req": load_cpu_s * 1e6 / requests if requests else None,
            "proxy_core_busy_pct": proxy_busy,
            "load_core_busy_pct": load_busy,
            "proxy_core_other_pct": (None if proxy_busy is None
                                     else proxy_busy - 100 * proxy_s / wall),
            "load_core_other_pct": (None if load_busy is None
                                    else load_busy - 100 * load_side / wall),
        }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proxy_metrics(admin_port: int) -> dict:
    """Return meshproxy's retry and ejection counters from its admin /metrics.

    Keys: retries ({reason: count}), retries_total, budget_exhausted, ejections; {} when the
    page cannot be read.
    """
    answer = _get(admin_port, "/metrics", "localhost")
    if answer is None or answer[0] != 200:
        return {}
    retries: dict[str, float] = {}
    budget = ejections = 0.0
    for family in text_string_to_metric_families(answer[2].decode()):
        for sample in family.samples:
            if sample.name == "meshproxy_retries_total":
                reason = sample.labels.get("reason", "?")
                retries[reason] = retries.get(reason, 0) + sample.value
            elif sample.name == "meshproxy_retries_budget_exhausted_total":
                budget += sample.value
            elif sample.name == "meshproxy_endpoint_ejections_total":
                ejections += sample.value
    return {"retries": {k: int(v) for k, v in retries.items()},
            "retries_total": int(sum(retries.values())),
            "budget_exhausted": int(budget), "ejections": int(ejections)}


_STARTED = re.compile(r"^started (\S+)$", re.M)
_FINISHED = re.compile(r"^finished (\S+)$", re.M)
_DELAY_OVER = re.compile(r"^delay over (\S+)$", re.M)


def _log_value(path: Path, pattern: re.Pattern) -> float | None:
    try:
        match = pattern.search(path.read_text(errors="replace"))
    except OSError:
        return None
    return float(match.group(1)) if match else None


def _sleep_until(deadline: float) -> None:
    """Wait for a planned moment of the scenario (a kill, a restart)."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


class CaseRun:
    """The processes and ports of one case; `run()` does it all and stops everything."""

    def __init__(self, case: Case, s: RunSettings, sup: Supervisor, workdir: Path,
                 progress: Callable[[str], None]) -> None:
        self.case = case
        self.s = s
        self.sup = sup
        self.dir = workdir / case.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        ports = free_ports(len(case.instances) + 4)
        self.ports = {i.name: p for i, p in zip(case.instances, ports)}
        self.listen, self.inbound, self.admin, self.health = ports[len(case.instances):]
        self.children: list[Child] = []
        self.backends: dict[str, Child] = {}

    def _start_backend(self, instance: Instance, log_name: str) -> Child:
        argv = _python(BACKEND_SCRIPT, "--port", str(self.ports[instance.name]),
                       "--name", instance.name, "--delay-ms", str(instance.delay_ms),
                       "--delay-first", str(instance.delay_first),
                       "--status", str(instance.status))
        child = self.sup.start(f"{self.case.key}-{log_name}", argv, cpu=self.s.load_cpu)
        self.children.append(child)
        wait_ready(child, lambda: _accepts(self.ports[instance.name]), self.s.start_timeout,
                   f"accept connections on {HOST}:{self.ports[instance.name]}")
        return child

    def _start_proxy(self) -> Child:
        if self.case.proxy == "meshproxy":
            configs = write_mesh(self.case, self.ports, self.dir)
            argv = [*self.s.meshproxy_cmd, "proxy", "--config", *map(str, configs),
                    "--service", "bench-client",
                    "--outbound-port", str(self.listen), "--inbound-port", str(self.inbound),
                    "--admin-port", str(self.admin), "--health-port", str(self.health),
                    "--inbound-bind", HOST, *self.s.meshproxy_args]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            try:
                child = self.sup.start(f"{self.case.key}-meshproxy", argv,
                                       cpu=self.s.proxy_cpu, env=env)
            except OSError as exc:
                raise TargetFailed(f"meshproxy: cannot run {argv[0]!r}: {exc}") from exc
            self.children.append(child)
            wait_ready(child, lambda: (_get(self.admin, "/ready", "localhost") or (0,))[0] == 200,
                       self.s.start_timeout, f"answer 200 to GET /ready on port {self.admin}")
        else:
            conf = self.dir / "nginx.conf"
            conf.write_text(nginx_conf(self.case, self.ports, self.listen, self.dir))
            child = self.sup.start(f"{self.case.key}-nginx",
                                   ["nginx", "-p", str(self.dir), "-c", str(conf)],
                                   cpu=self.s.proxy_cpu)
            self.children.append(child)
            wait_ready(child, lambda: _accepts(self.listen), self.s.start_timeout,
                       f"accept connections on {HOST}:{self.listen}")
        answer = _get(self.listen, "/", SERVICE)
        if answer is None:
            raise TargetFailed(f"{self.case.label}: GET / through the proxy got no answer; "
                               f"log {child.log_path}:\n{log_tail(child.log_path)}")
        return child

    def _start_load(self, seconds: float) -> Child:
        self.records_path = self.dir / "records.json"
        if self.case.rate is not None:
            argv = _python(OPEN_LOAD_SCRIPT, "--port", str(self.listen), "--host-header",
                           SERVICE, "--rate", str(self.case.rate),
                           "--connections", str(self.case.connections or self.s.concurrency),
                           "--seconds", str(seconds), "--timeout", str(self.s.request_timeout),
                           "--out", str(self.records_path))
        else:
            argv = _python(LOAD_SCRIPT, "--port", str(self.listen), "--host-header", SERVICE,
                           "--concurrency", str(self.s.concurrency), "--seconds", str(seconds),
                           "--timeout", str(self.s.request_timeout),
                           "--out", str(self.records_path))
        child = self.sup.start(f"{self.case.key}-load", argv, cpu=self.s.load_cpu)
        self.children.append(child)
        return child

    def _kill_and_restart(self, started: float, tally: CpuTally, events: dict) -> None:
        name = self.case.kill
        victim = self.backends[name]
        _sleep_until(started + self.s.warmup_for(self.case) + self.s.kill_at)
        tally.sample(list(self.backends.values()))
        os.killpg(victim.sid, signal.SIGKILL)
        events["killed_at"] = time.monotonic()
        self.sup.stop(victim)  # reaps it; the group is already gone
        self.children.remove(victim)
        self.progress(f"  killed {name} (SIGKILL) at +{events['killed_at'] - started:.1f} s")
        _sleep_until(events["killed_at"] + self.s.restart_after)
        events["restart_launched_at"] = time.monotonic()
        instance = next(i for i in self.case.instances if i.name == name)
        self.backends[name] = self._start_backend(instance, f"{name}-restarted")
        events["back_at"] = time.monotonic()
        self.progress(f"  restarted {name}, accepting at +{events['back_at'] - started:.1f} s")

    def run(self) -> dict:
        """Run the case; return its result (with `failed` when it could not be measured).

        Raises nothing for a failure of the case itself; KeyboardInterrupt and SystemExit pass.
        """
        try:
            return self._run()
        except TargetFailed as exc:
            return {"failed": str(exc)}
        finally:
            for child in reversed(self.children):
                self.sup.stop(child)

    def _run(self) -> dict:
        case, s = self.case, self.s
        for instance in case.instances:
            self.backends[instance.name] = self._start_backend(instance, instance.name)
        proxy = self._start_proxy()
        measured, warmup = s.measured_seconds(case), s.warmup_for(case)
        load = self._start_load(warmup + measured)
        deadline = time.monotonic() + s.start_timeout
        if not wait_until(lambda: not load.alive() or _log_value(load.log_path, _STARTED),
                          deadline) or not load.alive():
            raise TargetFailed(f"the load generator did not start; log {load.log_path}:\n"
                               f"{log_tail(load.log_path)}")
        started = _log_value(load.log_path, _STARTED)
        tally = CpuTally(proxy, s.proxy_cpu, s.load_cpu)
        tally.begin(list(self.backends.values()))
        events: dict = {}
        if case.kill:
            self._kill_and_restart(started, tally, events)
        # The load generator prints `finished` before it writes its records: the CPU window
        # ends there, so writing the file does not count as other programs' load.
        end_deadline = started + warmup + measured + s.request_timeout + 30
        wait_until(lambda: not load.alive() or _log_value(load.log_path, _FINISHED),
                   end_deadline, interval=0.05)
        tally.end(list(self.backends.values()))
        metrics = proxy_metrics(self.admin) if case.proxy == "meshproxy" else {}
        if not proxy.alive():
            raise TargetFailed(f"{case.label}: the proxy exited with status "
                               f"{proxy.popen.returncode} during the run; log "
                               f"{proxy.log_path}:\n{log_tail(proxy.log_path)}")
        try:
            load.popen.wait(timeout=max(1.0, end_deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise TargetFailed(f"the load generator did not finish: {exc}") from exc
        if load.popen.returncode != 0 or not self.records_path.exists():
            raise TargetFailed(f"the load generator exited {load.popen.returncode}; log "
                               f"{load.log_path}:\n{log_tail(load.log_path)}")
        rec = Records.from_json(json.loads(self.records_path.read_text()))
        since = rec.start + warmup
        result = {"summary": summarise(rec, since, rec.end), "metrics": metrics,
                  "warmup_summary": summarise(rec, rec.start, since),
                  "cpu": tally.figures(rec.cpu_s, len(rec.t))}
        result["failure_times_s"] = failure_times(rec, rec.start)
        if case.scenario == "a":
            result["timeline"] = timeline(rec, AFFECTED, rec.start)
        if case.scenario == "d":
            result["timeline"] = timeline(rec, SHARE_AFFECTED, rec.start)
            delayed = next((i for i in case.instances if i.delay_first), None)
            if delayed is not None:
                # Its share once its slow answers are over, to the end of the run.
                over = _log_value(self.backends[delayed.name].log_path, _DELAY_OVER)
                result["delay_over_s"] = None if over is None else over - rec.start
                result["after_delay"] = (None if over is None
                                         else summarise(rec, over, rec.end))
        if case.kill:
            result["events"] = {k: v - started for k, v in events.items()}
            result["recovery"] = recovery(rec, case.kill, events["killed_at"], events["back_at"])
            result["timeline"] = timeline(rec, case.kill, events["killed_at"] - 2.0)
        return result
