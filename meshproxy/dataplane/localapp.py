"""The local app as an endpoint: the runtime inbound requests (and inbound TCP connections)
go to, built the same way for the proxy's inbound listener (dataplane/server.py) and for each
original port in transparent mode (dataplane/redirected.py `InboundApps`).

The app is one plaintext endpoint on the pod's (or host's) own loopback or address: no mTLS,
no circuit breaker, no retry budget and no connection limits (those are for calls to other
Services, spec §3), balanced RoundRobin (there is nothing to choose between). Its pool keeps
idle connections only IDLE_TO_APP seconds, since apps often close idle connections after
2-5 s; it connects within the policy's connect timeout.

A new snapshot builds a new runtime (under the new policy), but an endpoint at the same
address is kept, with its load estimate and pooled connections.
"""

from __future__ import annotations

import asyncio
import random

from meshproxy.config.model.mesh import join_host_port
from meshproxy.dataplane.destinations import IDLE_TO_APP, EndpointRuntime, ServiceRuntime
from meshproxy.dataplane.upstream import ConnectionPool
from meshproxy.policy.balancer import EndpointLoad, make_balancer


def local_app_runtime(service_key: str, policy, app: tuple[str, int] | None, *, instance: str,
                      old: ServiceRuntime | None, loop: asyncio.AbstractEventLoop, metrics,
                      rng: random.Random) -> ServiceRuntime:
    """Return the runtime named `service_key`, under `policy` (the Service's TrafficPolicy),
    whose one endpoint is the app at `app` (host, port), named `instance`; no endpoint when
    `app` is None (no app address known, or one that must not be used: requests get 503,
    TCP connections are closed). `old`, the runtime this one replaces, gives its endpoint
    (load and pooled connections) when it has one at the same address. `loop` is also the
    load estimate's clock."""
    if app is None:
        return ServiceRuntime(service_key, policy, [], make_balancer("RoundRobin", rng))
    host, port = app
    key = join_host_port(host, port)
    endpoint = old.by_key.get(key) if old is not None else None
    if endpoint is None:
        pool = ConnectionPool(loop, host, port, idle_timeout=IDLE_TO_APP,
                              connect_timeout=policy.connection_pool.connect_timeout,
                              metrics=metrics)
        lb = policy.load_balancer
        load = EndpointLoad(key, lb.default_rtt, lb.decay, loop.time)
        endpoint = EndpointRuntime(host, port, meshed=False, instance=instance, load=load, pool=pool)
    return ServiceRuntime(service_key, policy, [endpoint], make_balancer("RoundRobin", rng))
