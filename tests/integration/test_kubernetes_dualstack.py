"""KubernetesDiscovery, over real HTTP against the fake API server (tests/support/fakekube.py),
for a dual-stack Service: one EndpointSlice per IP family, the pod one instance reachable at
both of its addresses, and the other family's slice coming and going as the watch reports it."""

from __future__ import annotations

import asyncio
import random
from contextlib import suppress

from meshproxy.config import load_objects
from meshproxy.control.kubernetes import KubernetesDiscovery, make_api_client
from support import kubefactory as k
from support.fakekube import FakeKubeAPI
from support.threadedkube import write_kubeconfig

DEADLINE = 10.0


def web_instances(docs: list[dict]) -> dict[str, dict]:
    for s in docs[0]["spec"]["services"]:
        if (s["name"], s["namespace"]) == ("web", "default"):
            return {i["name"]: i["app"] for i in s["instances"]}
    return {}


async def test_the_other_familys_slice_adds_and_removes_the_pods_further_address(tmp_path):
    fake = FakeKubeAPI()
    await fake.start()
    published: list[list[dict]] = []
    changed = asyncio.Event()

    def on_change(documents: list[dict], generation: int) -> None:
        published.append(documents)
        changed.set()

    async def until(want: dict[str, dict]) -> list[dict]:
        try:
            async with asyncio.timeout(DEADLINE):
                while not (published and web_instances(published[-1]) == want):
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            last = web_instances(published[-1]) if published else None
            raise AssertionError(f"not published within {DEADLINE}s: {want}; last: {last}") from None
        return published[-1]

    api_client = await make_api_client(write_kubeconfig(tmp_path, fake.url))
    discovery = KubernetesDiscovery(api_client, on_change, debounce=0.02, backoff_base=0.02,
                                    backoff_max=0.2, rng=random.Random(7))
    task = asyncio.create_task(discovery.run())
    try:
        fake.apply(k.namespace("default"))
        fake.apply(k.service("web", cluster_ips=["10.96.0.10", "fd00:10:96::a"], ip_families=["IPv4", "IPv6"]))
        for i in range(2):
            fake.apply(k.pod(f"web-{i}", ip=f"10.244.0.{i + 1}"))
        fake.apply(k.endpoint_slice("web", [k.endpoint(f"10.244.0.{i + 1}", f"web-{i}") for i in range(2)],
                                    name="web-v4"))
        await until({"web-0": {"address": "10.244.0.1:8080"}, "web-1": {"address": "10.244.0.2:8080"}})

        fake.apply(k.endpoint_slice("web", [k.endpoint(f"fd00:10:244::{i + 1}", f"web-{i}") for i in range(2)],
                                    name="web-v6", address_type="IPv6"))
        docs = await until({
            "web-0": {"address": "10.244.0.1:8080", "otherAddresses": ["fd00:10:244::1"]},
            "web-1": {"address": "10.244.0.2:8080", "otherAddresses": ["fd00:10:244::2"]},
        })
        web0 = load_objects(docs).services["web.default"].instances[0]
        assert (web0.app_address, web0.other_app_hosts) == ("10.244.0.1:8080", ("fd00:10:244::1",))

        # web-1 leaves the IPv6 slice (not ready there), then the slice goes altogether
        fake.apply(k.endpoint_slice("web", [k.endpoint("fd00:10:244::1", "web-0"),
                                            k.endpoint("fd00:10:244::2", "web-1", ready=False)],
                                    name="web-v6", address_type="IPv6"))
        await until({"web-0": {"address": "10.244.0.1:8080", "otherAddresses": ["fd00:10:244::1"]},
                     "web-1": {"address": "10.244.0.2:8080"}})
        fake.delete("EndpointSlice", "default", "web-v6")
        await until({"web-0": {"address": "10.244.0.1:8080"}, "web-1": {"address": "10.244.0.2:8080"}})
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await api_client.close()
        await fake.stop()
