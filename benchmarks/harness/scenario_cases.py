"""The resilience scenarios: which backends, which proxy configuration, what goes wrong.

Every case puts one Service, `backend`, with instances b0, b1 (healthy) and b2 (the one that
misbehaves) behind one proxy. Scenario a: b2 answers 50 ms late. Scenario b: b2 answers 503 to
everything. Scenario c: b2 is killed with SIGKILL during the run and restarted on the same
port 10 s later. Scenario d: two instances at a modest open-loop rate (300 requests/s over 32
connections), where requests in flight are near zero and PeakEWMA's choice rests on its RTT
estimates alone: b0 and b1 equal; b1 40 ms slow for its first 30 requests only; b1 always
50 ms slower; and three equal instances, b2 killed and restarted as in scenario c. Configs
are rendered here (a Mesh file plus a TrafficPolicy for meshproxy, an nginx.conf for nginx),
one folder per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

SERVICE = "backend"
SLOW_DELAY_MS = 50.0
AFFECTED = "b2"  # the instance that is slow, failing or killed
# Scenario d: two instances, b1 the one that differs (if any), open-loop load.
SHARE_AFFECTED = "b1"
SHARE_RATE = 300.0  # requests per second
SHARE_CONNECTIONS = 32
SLOW_START_MS, SLOW_START_REQUESTS = 40.0, 30
SCENARIOS = {
    "a": f"One instance ({AFFECTED}) answers {SLOW_DELAY_MS:.0f} ms slower than the others",
    "b": f"One instance ({AFFECTED}) answers 503 to everything",
    "c": f"One instance ({AFFECTED}) killed (SIGKILL) mid-run, restarted 10 s later on the "
         "same port",
    "d": f"Two or three instances at {SHARE_RATE:.0f} requests/s (open loop, "
         f"{SHARE_CONNECTIONS} connections): equal ones share the load",
}


@dataclass(frozen=True)
class Instance:
    """One backend process: its name (the x-instance header) and how it answers."""

    name: str
    delay_ms: float = 0.0
    status: int = 200
    delay_first: int = 0  # only the first N requests are delayed (0: all of them)


HEALTHY = (Instance("b0"), Instance("b1"))


@dataclass(frozen=True)
class Case:
    """One proxy configuration in one scenario."""

    key: str
    scenario: str
    label: str
    proxy: str  # "meshproxy" or "nginx"
    instances: tuple[Instance, ...]
    policy: dict | None = None  # TrafficPolicy spec for meshproxy; None: the defaults
    nginx_upstream: tuple[str, ...] = ()  # extra directives in nginx's upstream block
    nginx_server: tuple[str, ...] = ()  # extra directives in nginx's server block
    kill: str | None = None  # instance killed and restarted (scenario c)
    rate: float | None = None  # open-loop requests per second (scenario d); None: closed loop
    connections: int | None = None  # the open loop's connections
    note: str = ""


def _lb(kind: str) -> dict:
    return {"loadBalancer": {"type": kind}}


SLOW = (*HEALTHY, Instance(AFFECTED, delay_ms=SLOW_DELAY_MS))
FAILING = (*HEALTHY, Instance(AFFECTED, status=503))
KILLED = (*HEALTHY, Instance(AFFECTED))

TWO_EQUAL = (Instance("b0"), Instance(SHARE_AFFECTED))
SLOW_START = (Instance("b0"), Instance(SHARE_AFFECTED, delay_ms=SLOW_START_MS,
                                       delay_first=SLOW_START_REQUESTS))
ONE_SLOWER = (Instance("b0"), Instance(SHARE_AFFECTED, delay_ms=SLOW_DELAY_MS))

CASES: tuple[Case, ...] = (
    Case("a-healthy", "a", "meshproxy PeakEWMA, b0 and b1 only", "meshproxy", HEALTHY,
         policy=_lb("PeakEWMA"), note="baseline: the two healthy instances alone"),
    Case("a-peakewma", "a", "meshproxy PeakEWMA", "meshproxy", SLOW, policy=_lb("PeakEWMA")),
    Case("a-leastrequest", "a", "meshproxy LeastRequest", "meshproxy", SLOW,
         policy=_lb("LeastRequest")),
    Case("a-roundrobin", "a", "meshproxy RoundRobin", "meshproxy", SLOW,
         policy=_lb("RoundRobin")),
    Case("a-nginx-rr", "a", "nginx round robin", "nginx", SLOW),
    Case("a-nginx-leastconn", "a", "nginx least_conn", "nginx", SLOW,
         nginx_upstream=("least_conn;",)),
    Case("b-defaults", "b", "meshproxy defaults", "meshproxy", FAILING,
         note="2 retries on 503 for GET, budget 20 % + 10/s, ejection after 5 failures"),
    Case("b-noretry", "b", "meshproxy retry.attempts: 0", "meshproxy", FAILING,
         policy={"retry": {"attempts": 0}}, note="no retries; ejection still on"),
    Case("b-nginx", "b", "nginx, proxy_next_upstream error timeout http_503", "nginx",
         FAILING, nginx_server=("proxy_next_upstream error timeout http_503;",),
         note="reference: what an nginx user would configure; max_fails=1 fail_timeout=10s"),
    Case("c-defaults", "c", "meshproxy defaults", "meshproxy", KILLED, kill=AFFECTED,
         note="connect failures and resets retried, ejection after 5 failures"),
    Case("c-nginx", "c", "nginx defaults", "nginx", KILLED, kill=AFFECTED,
         note="reference: proxy_next_upstream error timeout, max_fails=1 fail_timeout=10s"),
    Case("d-equal", "d", "meshproxy PeakEWMA, b0 and b1 equal", "meshproxy", TWO_EQUAL,
         policy=_lb("PeakEWMA"), rate=SHARE_RATE, connections=SHARE_CONNECTIONS),
    Case("d-slowstart", "d",
         f"meshproxy PeakEWMA, b1 {SLOW_START_MS:.0f} ms slow for its first "
         f"{SLOW_START_REQUESTS} requests", "meshproxy", SLOW_START, policy=_lb("PeakEWMA"),
         rate=SHARE_RATE, connections=SHARE_CONNECTIONS),
    Case("d-slower", "d", f"meshproxy PeakEWMA, b1 {SLOW_DELAY_MS:.0f} ms slower", "meshproxy",
         ONE_SLOWER, policy=_lb("PeakEWMA"), rate=SHARE_RATE, connections=SHARE_CONNECTIONS),
    Case("d-restart", "d", f"meshproxy PeakEWMA, three equal, {AFFECTED} killed and restarted",
         "meshproxy", KILLED, policy=_lb("PeakEWMA"), kill=AFFECTED, rate=SHARE_RATE,
         connections=SHARE_CONNECTIONS),
)
CASE_KEYS = tuple(case.key for case in CASES)


def select(spec: list[str]) -> list[Case]:
    """Return the cases named by scenario letters ("a") or case keys ("a-peakewma"), in
    the order of CASES. Raises ValueError naming anything unknown."""
    unknown = [item for item in spec if item not in SCENARIOS and item not in CASE_KEYS]
    if unknown:
        raise ValueError(f"unknown case or scenario: {', '.join(unknown)} "
                         f"(scenarios {', '.join(SCENARIOS)}; cases {', '.join(CASE_KEYS)})")
    return [c for c in CASES if c.scenario in spec or c.key in spec]


def mesh_documents(case: Case, ports: dict[str, int]) -> list[dict]:
    """Return the YAML documents for a standalone meshproxy: the Mesh and, when the case has
    one, its TrafficPolicy for `backend`."""
    mesh = {
        "apiVersion": "meshproxy.io/v1alpha1",
        "kind": "Mesh",
        "metadata": {"name": "scenarios"},
        "spec": {
            "trustDomain": "cluster.local",
            "outboundTrafficPolicy": "ALLOW_ANY",
            "services": [{
                "name": SERVICE, "namespace": "default", "port": 80,
                "instances": [{"name": i.name, "sidecar": False,
                               "app": {"address": f"127.0.0.1:{ports[i.name]}"}}
                              for i in case.instances],
            }],
        },
    }
    docs = [mesh]
    if case.policy is not None:
        docs.append({
            "apiVersion": "meshproxy.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": f"{SERVICE}-{case.key}", "namespace": "default"},
            "spec": {"targetRef": {"kind": "Service", "name": SERVICE}, **case.policy},
        })
    return docs


def write_mesh(case: Case, ports: dict[str, int], directory: Path) -> list[Path]:
    """Write the case's Mesh file (and policy file) into directory; return their paths."""
    docs = mesh_documents(case, ports)
    paths = [directory / "mesh.yaml"]
    paths[0].write_text(yaml.safe_dump(docs[0], sort_keys=False))
    if len(docs) > 1:
        paths.append(directory / "policy.yaml")
        paths[1].write_text(yaml.safe_dump(docs[1], sort_keys=False))
    return paths


def nginx_conf(case: Case, ports: dict[str, int], listen: int, directory: Path) -> str:
    """Return an nginx.conf proxying 127.0.0.1:listen to the case's instances.

    Same shape as the side-by-side benchmark's nginx: one worker, pooled keep-alive
    connections upstream, no access log. Server defaults (max_fails=1, fail_timeout=10s,
    proxy_next_upstream error timeout) are kept unless the case adds directives.
    """
    servers = "\n".join(f"        server 127.0.0.1:{ports[i.name]};" for i in case.instances)
    upstream = "\n".join(f"        {line}" for line in case.nginx_upstream)
    server_extra = "\n".join(f"        {line}" for line in case.nginx_server)
    return f"""worker_processes 1;
daemon off;
master_process on;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;

    upstream {SERVICE} {{
{upstream}
{servers}
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{listen} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
{server_extra}
        location / {{
            proxy_pass http://{SERVICE};
        }}
    }}
}}
"""
