"""KubernetesDiscovery against an API server over real HTTP.

No Kubernetes API server runs on the test machines, so the API server here is a fake at the
HTTP boundary (tests/support/fakekube.py): it answers list and `?watch=1` requests the way
the real one does (JSON lines of {type, object}, resourceVersions from one counter, 410 Gone
for a compacted version, 404 for a CRD that is not installed). The client side is the real
one: kubernetes_asyncio configured from a kubeconfig file by `make_api_client`. The tests run
on the standard asyncio loop; the last one replays the hardest cases on uvloop, the loop the
control plane runs on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import pytest
import uvloop
from kubernetes_asyncio.config import ConfigException

from meshproxy.config import load_objects
from meshproxy.control.kubernetes import KubernetesDiscovery, make_api_client
from support import kubefactory as k
from support.fakekube import FakeKubeAPI
from support.threadedkube import write_kubeconfig

DEADLINE = 10.0


class Published:
    """Records every on_change call; `until` waits for documents that satisfy a condition."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict], int]] = []
        self._event = asyncio.Event()

    def __call__(self, documents: list[dict], generation: int) -> None:
        self.calls.append((documents, generation))
        self._event.set()

    async def until(self, predicate, what: str) -> tuple[list[dict], int]:
        try:
            async with asyncio.timeout(DEADLINE):
                while True:
                    if self.calls and predicate(self.calls[-1][0]):
                        return self.calls[-1]
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            last = self.calls[-1][0] if self.calls else None
            raise AssertionError(f"no published documents with {what} within {DEADLINE}s; last: {last}") from None


async def until(condition, what: str) -> None:
    """Poll `condition` (a plain function) until true, with a deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"not reached within {DEADLINE}s: {what}")
        await asyncio.sleep(0.01)


def instances(docs: list[dict], key: str = "web.default") -> dict[str, dict]:
    for s in docs[0]["spec"]["services"]:
        if f"{s['name']}.{s['namespace']}" == key:
            return {i["name"]: i for i in s["instances"]}
    return {}


def kinds(docs: list[dict]) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"]) for d in docs]


def seed(api: FakeKubeAPI, ready: int = 2) -> None:
    """A small cluster: Service `web` with `ready` meshed pods, and Service `legacy` unmeshed."""
    api.apply(k.namespace("default"))
    api.apply(k.service("web"))
    api.apply(k.service("legacy", cluster_ip="10.96.0.20"))
    for i in range(ready):
        api.apply(k.pod(f"web-{i}", service_account="web"))
    api.apply(k.pod("legacy-0", meshed=False))
    api.apply(k.endpoint_slice("web", [k.endpoint(f"10.244.0.{i + 1}", f"web-{i}") for i in range(ready)]))
    api.apply(k.endpoint_slice("legacy", [k.endpoint("10.244.1.1", "legacy-0")]))


@asynccontextmanager
async def discovery_against(fake: FakeKubeAPI, folder, **kwargs):
    """Run KubernetesDiscovery against `fake` (through a kubeconfig file) until the block ends;
    yields (Published, the run() task)."""
    api_client = await make_api_client(write_kubeconfig(folder, fake.url))
    published = Published()
    options = {"debounce": 0.02, "backoff_base": 0.02, "backoff_max": 0.2, "rng": random.Random(7), **kwargs}
    task = asyncio.create_task(KubernetesDiscovery(api_client, published, **options).run())
    try:
        yield published, task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await api_client.close()


@pytest.fixture
async def fake():
    api = FakeKubeAPI()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def start(fake, tmp_path):
    """Start discovery against `fake`; stopped at the end of the test."""
    async with AsyncExitStack() as stack:
        async def go(**kwargs):
            return await stack.enter_async_context(discovery_against(fake, tmp_path, **kwargs))
        yield go


async def test_initial_state_is_published_once_every_kind_is_listed(fake, start):
    seed(fake)
    fake.apply(k.http_route("web", "web", [("web", 80)]))
    fake.apply(k.policy("TrafficPolicy", "web", {"targetRef": {"kind": "Service", "name": "web"},
                                                 "retry": {"attempts": 4}}))
    published, _ = await start(page_size=2)  # several pages per list
    docs, generation = await published.until(lambda d: True, "anything")
    assert kinds(docs) == [("Mesh", "kubernetes"), ("HTTPRoute", "web"), ("TrafficPolicy", "web")]
    assert {n: (i["app"]["address"], i.get("sidecar"), i.get("labels", {}).get("meshproxy.io/service-account"))
            for n, i in instances(docs).items()} == {
        "web-0": ("10.244.0.1:8080", None, "web"), "web-1": ("10.244.0.2:8080", None, "web")}
    assert instances(docs, "legacy.default")["legacy-0"]["sidecar"] is False
    assert generation == fake.revision
    assert "status" not in docs[1] and "managedFields" not in docs[1]["metadata"]
    snap = load_objects(docs)
    assert [r.metadata.name for r in snap.routes_for("web.default")] == ["web"]
    assert snap.policy_for("web.default").retry.attempts == 4
    assert len(published.calls) == 1
    # Paged lists: the Pod list (3 pods, pages of 2) took two requests.
    assert fake.lists.count("/api/v1/pods") == 2


async def test_scaling_up_adds_an_instance(fake, start):
    seed(fake)
    published, _ = await start()
    _, first = await published.until(lambda d: set(instances(d)) == {"web-0", "web-1"}, "two web instances")
    fake.apply(k.pod("web-2", service_account="web"))
    fake.apply(k.endpoint_slice("web", [k.endpoint(f"10.244.0.{i + 1}", f"web-{i}") for i in range(3)]))
    docs, generation = await published.until(lambda d: "web-2" in instances(d), "web-2")
    assert instances(docs)["web-2"]["app"]["address"] == "10.244.0.3:8080"
    assert instances(docs)["web-2"]["labels"]["meshproxy.io/service-account"] == "web"
    assert generation > first
    load_objects(docs)


async def test_a_pod_that_becomes_unready_is_no_longer_an_instance(fake, start):
    seed(fake)
    published, _ = await start()
    await published.until(lambda d: "web-1" in instances(d), "web-1")
    fake.apply(k.endpoint_slice("web", [k.endpoint("10.244.0.1", "web-0"),
                                        k.endpoint("10.244.0.2", "web-1", ready=False)]))
    docs, _ = await published.until(lambda d: "web-1" not in instances(d), "web-1 gone")
    assert set(instances(docs)) == {"web-0"}


async def test_a_terminating_endpoint_that_still_serves_is_kept_and_marked(fake, start):
    seed(fake)
    published, _ = await start()
    await published.until(lambda d: "web-1" in instances(d), "web-1")
    fake.apply(k.endpoint_slice("web", [
        k.endpoint("10.244.0.1", "web-0"),
        k.endpoint("10.244.0.2", "web-1", ready=False, serving=True, terminating=True),
    ]))
    docs, _ = await published.until(
        lambda d: instances(d).get("web-1", {}).get("labels", {}).get("meshproxy.io/terminating") == "true",
        "web-1 marked terminating")
    assert instances(docs)["web-1"]["app"]["address"] == "10.244.0.2:8080"
    assert "meshproxy.io/terminating" not in instances(docs)["web-0"]["labels"]
    # Once it stops serving, it goes.
    fake.apply(k.endpoint_slice("web", [
        k.endpoint("10.244.0.1", "web-0"),
        k.endpoint("10.244.0.2", "web-1", ready=False, serving=False, terminating=True),
    ]))
    await published.until(lambda d: set(instances(d)) == {"web-0"}, "web-1 gone")


async def test_a_new_httproute_is_published(fake, start):
    seed(fake)
    fake.apply(k.service("web-v2", cluster_ip="10.96.0.30"))
    published, _ = await start()
    await published.until(lambda d: True, "anything")
    fake.apply(k.http_route("canary", "web", [("web", 80), ("web-v2", 80)]))
    docs, _ = await published.until(lambda d: ("HTTPRoute", "canary") in kinds(d), "the route")
    route = load_objects(docs).routes_for("web.default")[0]
    assert [b.name for b in route.rules[0].backend_refs] == ["web", "web-v2"]


async def test_410_gone_is_answered_by_listing_again(fake, start):
    seed(fake)
    published, _ = await start()
    await published.until(lambda d: "web-1" in instances(d), "web-1")
    await until(lambda: fake.open_watches == 8, "every kind watched")
    lists_before = len(fake.lists)
    # The watches end, the cluster changes while nobody watches, and the history of those
    # changes is compacted away: only a fresh list can show them.
    fake.drop_watches()
    fake.delete("Service", "default", "legacy")
    fake.apply(k.service("api", cluster_ip="10.96.0.40"))
    fake.apply(k.endpoint_slice("api", [k.endpoint("10.244.2.1")]))
    fake.compact()
    docs, generation = await published.until(
        lambda d: "api.default" in {f"{s['name']}.{s['namespace']}" for s in d[0]["spec"]["services"]}
        and "legacy-0" not in instances(d, "legacy.default") and instances(d, "api.default"), "the changes")
    assert {s["name"] for s in docs[0]["spec"]["services"]} == {"web", "api"}
    assert instances(docs, "api.default")["10.244.2.1"]["sidecar"] is False
    assert fake.gone_sent >= 2  # at least the Service and EndpointSlice watches got 410
    assert len(fake.lists) > lists_before
    assert generation == fake.revision


async def test_an_api_server_restart_is_survived_by_reconnecting(fake, start):
    seed(fake)
    published, _ = await start()
    await published.until(lambda d: "web-1" in instances(d), "web-1")
    await until(lambda: fake.open_watches == 8, "every kind watched")
    lists_before = len(fake.lists)
    await fake.stop()
    # Changes made while it is down (its storage keeps them, as etcd does).
    fake.apply(k.endpoint_slice("web", [k.endpoint("10.244.0.1", "web-0")]))
    await fake.start()
    docs, _ = await published.until(lambda d: set(instances(d)) == {"web-0"}, "web-1 gone after the restart")
    await until(lambda: fake.open_watches == 8, "every kind watched again")
    # The watches resumed from their resourceVersion: no list was needed.
    assert len(fake.lists) == lists_before
    fake.apply(k.pod("web-1", service_account="web"))
    fake.apply(k.endpoint_slice("web", [k.endpoint("10.244.0.1", "web-0"), k.endpoint("10.244.0.2", "web-1")]))
    await published.until(lambda d: set(instances(d)) == {"web-0", "web-1"}, "web-1 back")


async def test_missing_crds_are_logged_once_and_taken_as_empty(start, fake, caplog):
    for kind in ("TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy"):
        fake.uninstall(kind)
    seed(fake)
    fake.apply(k.http_route("web", "web", [("web", 80)]))
    caplog.set_level(logging.WARNING, logger="meshproxy.control.kubernetes")
    published, _ = await start()
    docs, _ = await published.until(lambda d: True, "anything")
    assert kinds(docs) == [("Mesh", "kubernetes"), ("HTTPRoute", "web")]
    # It keeps asking (the CRD may be installed later) but says so once.
    await until(lambda: fake.not_found.count("/apis/meshproxy.io/v1alpha1/trafficpolicies") >= 3, "asked again")
    warnings = [r.getMessage() for r in caplog.records if "trafficpolicies" in r.getMessage()]
    assert len(warnings) == 1 and "taken as empty" in warnings[0]


async def test_nothing_is_published_while_a_policy_kind_cannot_be_read(start, fake):
    seed(fake)
    fake.apply(k.policy("AuthorizationPolicy", "web-callers", {
        "targetRef": {"kind": "Service", "name": "web"}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]}))
    fake.forbidden.add("AuthorizationPolicy")
    published, _ = await start()
    await until(lambda: len(set(fake.lists)) == 7 and len(fake.refused) >= 3, "the rest listed, refused thrice")
    # Publishing now would drop the ALLOW policy, and so let every caller in.
    assert published.calls == []
    fake.forbidden.clear()
    docs, _ = await published.until(lambda d: True, "anything")
    assert ("AuthorizationPolicy", "web-callers") in kinds(docs)
    assert len(published.calls) == 1


async def test_objects_of_a_crd_removed_while_running_go_away(start, fake):
    seed(fake)
    fake.apply(k.policy("TrafficPolicy", "web", {"retry": {"attempts": 4}}))
    published, _ = await start()
    await published.until(lambda d: ("TrafficPolicy", "web") in kinds(d), "the policy")
    fake.uninstall("TrafficPolicy")
    fake.drop_watches()
    docs, _ = await published.until(lambda d: ("TrafficPolicy", "web") not in kinds(d), "the policy gone")
    assert kinds(docs) == [("Mesh", "kubernetes")]


async def test_make_api_client_without_a_kubeconfig_says_so(tmp_path):
    with pytest.raises(ConfigException, match="no kubeconfig file at .*absent"):
        await make_api_client(str(tmp_path / "absent"))


async def test_only_the_given_namespaces_are_watched(fake, start):
    seed(fake)
    fake.apply(k.service("web", "team-a", cluster_ip="10.96.1.1"))
    fake.apply(k.pod("web-0", "team-a"))
    fake.apply(k.endpoint_slice("web", [k.endpoint("10.244.5.1", "web-0", "team-a")], "team-a"))
    published, _ = await start(namespaces=["team-a"])
    docs, _ = await published.until(lambda d: True, "anything")
    assert [f"{s['name']}.{s['namespace']}" for s in docs[0]["spec"]["services"]] == ["web.team-a"]
    assert "/api/v1/namespaces/team-a/services" in fake.lists and "/api/v1/services" not in fake.lists


async def test_cancelling_run_closes_every_watch(fake, start):
    seed(fake)
    published, task = await start()
    await published.until(lambda d: True, "anything")
    await until(lambda: fake.open_watches == 8, "every kind watched")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: fake.open_watches == 0, "every watch closed")


def test_on_uvloop_a_restart_and_410_gone_are_survived(tmp_path):
    async def scenario():
        fake = FakeKubeAPI()
        await fake.start()
        try:
            seed(fake)
            async with discovery_against(fake, tmp_path) as (published, _):
                await published.until(lambda d: "web-1" in instances(d), "web-1")
                await until(lambda: fake.open_watches == 8, "every kind watched")
                await fake.stop()
                fake.apply(k.endpoint_slice("web", [k.endpoint("10.244.0.1", "web-0")]))
                await fake.start()
                await published.until(lambda d: set(instances(d)) == {"web-0"}, "web-1 gone after the restart")
                await until(lambda: fake.open_watches == 8, "every kind watched again")
                fake.drop_watches()
                fake.delete("Service", "default", "legacy")
                fake.compact()
                await published.until(lambda d: [s["name"] for s in d[0]["spec"]["services"]] == ["web"],
                                      "legacy gone after 410")
                assert fake.gone_sent >= 1
        finally:
            await fake.stop()

    uvloop.run(scenario())
