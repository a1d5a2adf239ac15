"""Sidecar injection (meshproxy.kube.inject): which objects get the sidecar and what they get.

Every injected object is checked against the Kubernetes API schemas (strict: no unknown field)
of 1.29, the first release with native sidecars on by default, and of the newest release the
schemas are bundled for.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes_validate import utils as kv

from meshproxy import __version__
from meshproxy.kube.inject import InjectError, InjectOptions, inject, pod_template

VERSIONS = sorted({"1.29.0", "1.37.0", kv.latest_version()}, key=kv.major_minor)
ENABLED = {"meshproxy.io/inject": "enabled"}
IMAGE = f"ghcr.io/meshproxy/meshproxy:{__version__}"


def validate(obj: dict) -> None:
    """Fail unless `obj` (or each item of a List) is valid for every version in VERSIONS."""
    if obj["kind"] == "List":
        for item in obj["items"]:
            validate(item)
        return
    for version in VERSIONS:
        kv.validate(obj, version, strict=True)


def container(name: str = "app", **extra) -> dict:
    return {"name": name, "image": f"example.com/{name}:1", **extra}


def pod_spec(*containers: dict, **extra) -> dict:
    return {"containers": list(containers) or [container()], **extra}


def template(annotations: dict | None = None, labels: dict | None = None, **spec) -> dict:
    metadata: dict = {"labels": labels or {"app": "web"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": pod_spec(**spec)}


def pod(annotations: dict | None = None, **spec) -> dict:
    t = template(annotations, **spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", **t["metadata"]},
            "spec": t["spec"]}


SELECTOR = {"matchLabels": {"app": "web"}}


def workload(kind: str, annotations: dict | None = None, **spec) -> dict:
    t = template(annotations, **spec)
    meta = {"name": "web", "namespace": "shop"}
    if kind == "Pod":
        return pod(annotations, **spec)
    if kind == "CronJob":
        t["spec"]["restartPolicy"] = "OnFailure"
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": meta,
                "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": t}}}}
    if kind == "Job":
        t["spec"]["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": meta, "spec": {"template": t}}
    if kind == "ReplicationController":
        return {"apiVersion": "v1", "kind": kind, "metadata": meta,
                "spec": {"selector": {"app": "web"}, "template": t}}
    spec_extra = {"serviceName": "web"} if kind == "StatefulSet" else {}
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta,
            "spec": {"selector": SELECTOR, "template": t, **spec_extra}}


WORKLOADS = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
             "ReplicationController", "Job", "CronJob"]


def names(containers: list[dict] | None) -> list[str]:
    return [c["name"] for c in containers or []]


def by_name(containers: list[dict], name: str) -> dict:
    return next(c for c in containers if c["name"] == name)


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# --- what is injected where ---------------------------------------------------------------


@pytest.mark.parametrize("kind", WORKLOADS)
def test_every_workload_kind_gets_init_container_and_native_sidecar_first(kind):
    obj = workload(kind)
    out = inject(obj, namespace_labels=ENABLED)
    validate(out)
    pod_ = pod_template(out)
    spec = pod_["spec"]
    assert names(spec["initContainers"]) == ["meshproxy-init", "meshproxy-proxy"]
    assert names(spec["containers"]) == ["app"]
    proxy = spec["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["image"] == IMAGE and spec["initContainers"][0]["image"] == IMAGE
    annotations = pod_["metadata"]["annotations"]
    assert json.loads(annotations["meshproxy.io/status"]) == {
        "version": __version__, "initContainers": ["meshproxy-init", "meshproxy-proxy"],
        "containers": [], "volumes": ["meshproxy-token"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15021"
    assert annotations["prometheus.io/path"] == "/metrics"
    # The object around the pod template is left as it was.
    if kind != "Pod":
        assert {k: v for k, v in out.items() if k != "spec"} == {k: v for k, v in obj.items() if k != "spec"}


@pytest.mark.parametrize("kind", ["Service", "ConfigMap", "Namespace", "Secret"])
def test_other_kinds_come_back_equal(kind):
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "x"},
           "spec": {"template": template()["spec"]}}
    assert inject(obj) == obj


def test_workload_kind_of_another_api_group_is_not_touched():
    obj = workload("Deployment")
    obj["apiVersion"] = "example.com/v1"
    assert inject(obj) == obj


def test_lists_are_injected_item_by_item_recursively():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    inner = {"apiVersion": "v1", "kind": "List", "items": [workload("Job")]}
    off = {"meshproxy.io/inject": "disabled"}
    obj = {"apiVersion": "v1", "kind": "List",
           "items": [workload("Deployment"), service, inner, workload("Pod", off)]}
    out = inject(obj, namespace_labels=ENABLED)
    validate(out)
    deployment, svc, nested, disabled = out["items"]
    assert names(pod_template(deployment)["spec"]["initContainers"])[:2] == ["meshproxy-init", "meshproxy-proxy"]
    assert svc == service
    assert names(pod_template(nested["items"][0])["spec"]["initContainers"])[0] == "meshproxy-init"
    assert disabled == workload("Pod", off)


def test_input_is_never_changed():
    obj = workload("Deployment", {"a": "b"}, initContainers=[container("migrate")])
    obj["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": 8080}}
    before = copy.deepcopy(obj)
    out = inject(obj, namespace_labels=ENABLED)
    assert obj == before
    assert out != obj


# --- the decision --------------------------------------------------------------------------


@pytest.mark.parametrize("namespace_labels, annotation, injected", [
    (ENABLED, None, True),
    (ENABLED, "enabled", True),
    (ENABLED, "disabled", False),          # the pod's "disabled" wins over the namespace
    ({}, None, False),
    ({}, "enabled", True),                 # the pod's annotation alone is enough
    ({}, "disabled", False),
    ({"meshproxy.io/inject": "disabled"}, "enabled", False),  # the webhook never sees these pods
    ({"meshproxy.io/inject": "something"}, None, False),
    ({"team": "a"}, "enabled", True),
    (None, None, False),                   # labels not known: the annotation decides alone
    (None, "enabled", True),
    (None, "disabled", False),
])
def test_namespace_label_and_pod_annotation(namespace_labels, annotation, injected):
    annotations = None if annotation is None else {"meshproxy.io/inject": annotation}
    obj = workload("Deployment", annotations)
    out = inject(obj, namespace_labels=namespace_labels)
    assert (out != obj) is injected


def test_annotation_on_the_deployment_itself_does_not_count():
    obj = workload("Deployment")
    obj["metadata"]["annotations"] = {"meshproxy.io/inject": "enabled"}
    assert inject(obj, namespace_labels={}) == obj


def test_host_network_pods_are_skipped():
    obj = workload("DaemonSet", {"meshproxy.io/inject": "enabled"}, hostNetwork=True)
    assert inject(obj, namespace_labels=ENABLED) == obj


@pytest.mark.parametrize("kind", WORKLOADS)
@pytest.mark.parametrize("native", [True, False])
def test_injecting_twice_changes_nothing(kind, native):
    once = inject(workload(kind), namespace_labels=ENABLED, options=InjectOptions(native_sidecar=native))
    # Even with other options the second time: the pod already has its sidecar.
    assert inject(once, namespace_labels=ENABLED) == once
    assert inject(once, options=InjectOptions(native_sidecar=not native, proxy_image="x:2")) == once


# --- container order -----------------------------------------------------------------------


def test_mesh_containers_come_before_existing_init_containers():
    obj = workload("Deployment", initContainers=[
        container("migrate"), container("log-shipper", restartPolicy="Always")])
    out = inject(obj, namespace_labels=ENABLED)
    validate(out)
    spec = pod_template(out)["spec"]
    assert names(spec["initContainers"]) == ["meshproxy-init", "meshproxy-proxy", "migrate", "log-shipper"]
    assert spec["initContainers"][2:] == obj["spec"]["template"]["spec"]["initContainers"]


@pytest.mark.parametrize("how", ["annotation", "option"])
def test_classic_sidecar_is_the_first_container(how):
    annotations = {"meshproxy.io/native-sidecar": "false"} if how == "annotation" else {}
    options = InjectOptions(native_sidecar=how != "option")
    obj = workload("Deployment", annotations, initContainers=[container("migrate")],
                   containers=[container("web"), container("worker")])
    out = inject(obj, namespace_labels=ENABLED, options=options)
    validate(out)
    pod_ = pod_template(out)
    spec = pod_["spec"]
    assert names(spec["initContainers"]) == ["meshproxy-init", "migrate"]
    assert names(spec["containers"]) == ["meshproxy-proxy", "web", "worker"]
    assert "restartPolicy" not in spec["containers"][0]
    annotations = pod_["metadata"]["annotations"]
    # kubectl logs / exec still go to the app by default.
    assert annotations["kubectl.kubernetes.io/default-container"] == "web"
    status = json.loads(annotations["meshproxy.io/status"])
    assert status["initContainers"] == ["meshproxy-init"] and status["containers"] == ["meshproxy-proxy"]


def test_native_sidecar_annotation_overrides_the_option():
    obj = workload("Pod", {"meshproxy.io/native-sidecar": "true"})
    out = inject(obj, options=InjectOptions(native_sidecar=False), namespace_labels=ENABLED)
    assert names(out["spec"]["initContainers"]) == ["meshproxy-init", "meshproxy-proxy"]


# --- the containers ------------------------------------------------------------------------


def injected_pod(annotations: dict | None = None, options: InjectOptions = InjectOptions(),
                 **spec) -> dict:
    out = inject(pod(annotations, **spec), namespace_labels=ENABLED, options=options)
    validate(out)
    return out


def test_init_container_runs_meshproxy_init_as_root_with_net_admin_only():
    init = injected_pod()["spec"]["initContainers"][0]
    assert init["command"] == ["meshproxy", "init"]
    assert init["args"] == ["--proxy-uid", "1337", "--inbound-port", "15006",
                            "--outbound-port", "15001", "--health-port", "15021"]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False


def test_init_arguments_are_what_meshproxy_init_accepts():
    import argparse

    from meshproxy.kube.init_cli import add_parser, options_from_args

    init = injected_pod({"config.meshproxy.io/skip-inbound-ports": "22, 9000-9010",
                         "config.meshproxy.io/skip-outbound-ports": "5432"})["spec"]["initContainers"][0]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(init["command"][1:] + init["args"])
    opts = options_from_args(args, ipv6=False)
    assert (opts.proxy_uid, opts.inbound_port, opts.outbound_port, opts.health_port) == (1337, 15006, 15001, 15021)
    assert [(r.first, r.last) for r in opts.skip_inbound_ports] == [(22, 22), (9000, 9010)]
    assert [(r.first, r.last) for r in opts.skip_outbound_ports] == [(5432, 5432)]


def test_proxy_runs_unprivileged_as_uid_1337():
    proxy = injected_pod()["spec"]["initContainers"][1]
    assert proxy["command"] == ["meshproxy", "proxy"]
    sc = proxy["securityContext"]
    assert sc["runAsUser"] == 1337 and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_proxy_ports_and_probes():
    proxy = injected_pod()["spec"]["initContainers"][1]
    assert sorted(p["containerPort"] for p in proxy["ports"]) == [15006, 15021]  # admin: loopback only
    for field, path in [("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")]:
        assert proxy[field]["httpGet"] == {"path": path, "port": 15021, "scheme": "HTTP"}


def test_proxy_identity_from_the_downward_api_and_a_projected_token():
    out = injected_pod()
    proxy = out["spec"]["initContainers"][1]
    env = env_of(proxy)
    field = lambda path: {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}  # noqa: E731
    assert env["MESHPROXY_NAMESPACE"] == field("metadata.namespace")
    assert env["MESHPROXY_INSTANCE"] == field("metadata.name")
    assert env["MESHPROXY_POD_IP"] == field("status.podIP")
    assert env["MESHPROXY_POD_IPS"] == field("status.podIPs")  # every address of a dual-stack pod
    assert env["MESHPROXY_SERVICE_ACCOUNT"] == field("spec.serviceAccountName")
    assert env["MESHPROXY_SERVICE"] == "web"  # from the app label
    assert env["MESHPROXY_CONTROL"] == "http://meshproxy-control.meshproxy-system.svc:15010"
    mount = proxy["volumeMounts"][0]
    assert mount["name"] == "meshproxy-token" and mount["readOnly"] is True
    assert env["MESHPROXY_TOKEN_FILE"] == mount["mountPath"] + "/token"
    volume = by_name(out["spec"]["volumes"], "meshproxy-token")
    assert volume["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "meshproxy", "expirationSeconds": 3600, "path": "token"}}]


def test_existing_volumes_are_kept():
    out = injected_pod(volumes=[{"name": "data", "emptyDir": {}}])
    assert names(out["spec"]["volumes"]) == ["data", "meshproxy-token"]


def test_options_set_image_and_control_plane():
    out = injected_pod(options=InjectOptions(proxy_image="registry.local/mp:dev",
                                             control_url="http://control.mesh:15010"))
    init, proxy = out["spec"]["initContainers"]
    assert init["image"] == proxy["image"] == "registry.local/mp:dev"
    assert env_of(proxy)["MESHPROXY_CONTROL"] == "http://control.mesh:15010"


def test_proxy_environment_is_what_meshproxy_proxy_reads(monkeypatch):
    from meshproxy.cli import build_parser

    proxy = injected_pod({"config.meshproxy.io/log-level": "debug"})["spec"]["initContainers"][1]
    for name, value in env_of(proxy).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["proxy"])
    assert args.service == "web"
    assert args.control == "http://meshproxy-control.meshproxy-system.svc:15010"
    assert args.token_file == "/var/run/secrets/meshproxy.io/token/token"
    assert args.log_level == "debug"
    assert (args.inbound_port, args.health_port) == (15006, 15021)


def test_default_resources():
    proxy = injected_pod()["spec"]["initContainers"][1]
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"},
                                  "limits": {"memory": "256Mi"}}


def test_annotations_override_resources_log_level_and_ports():
    out = injected_pod({
        "config.meshproxy.io/proxy-cpu-request": "250m",
        "config.meshproxy.io/proxy-memory-limit": "512Mi",
        "config.meshproxy.io/log-level": "warning",
        "config.meshproxy.io/skip-inbound-ports": "22",
        "config.meshproxy.io/skip-outbound-ports": "5432,6379",
        "config.meshproxy.io/opaque-ports": "3306, 9000-9100",
    })
    init, proxy = out["spec"]["initContainers"]
    assert proxy["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"},
                                  "limits": {"memory": "512Mi"}}
    assert init["args"][-4:] == ["--skip-inbound-ports", "22", "--skip-outbound-ports", "5432,6379"]
    env = env_of(proxy)
    assert env["MESHPROXY_LOG_LEVEL"] == "warning"
    assert env["MESHPROXY_OPAQUE_PORTS"] == "3306,9000-9100"


def test_memory_limit_below_the_default_request_lowers_the_request():
    proxy = injected_pod({"config.meshproxy.io/proxy-memory-limit": "48Mi"})["spec"]["initContainers"][1]
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "48Mi"},
                                  "limits": {"memory": "48Mi"}}


@pytest.mark.parametrize("annotation, value, message", [
    ("config.meshproxy.io/skip-inbound-ports", "22,http", "'http' is not a port"),
    ("config.meshproxy.io/skip-outbound-ports", "70000", "'70000' is not a port"),
    ("config.meshproxy.io/opaque-ports", "20-10", "'20-10' is not a port"),
    ("config.meshproxy.io/proxy-cpu-request", "lots", "'lots' is not a positive resource quantity"),
    ("config.meshproxy.io/proxy-memory-limit", "-1Gi", "'-1Gi' is not a positive resource quantity"),
    ("config.meshproxy.io/log-level", "verbose", "'verbose' is not one of debug, info, warning, error"),
    ("meshproxy.io/native-sidecar", "no", "'no' is not \"true\" or \"false\""),
])
def test_unusable_annotations_are_refused_with_the_annotation_named(annotation, value, message):
    with pytest.raises(InjectError) as e:
        inject(pod({annotation: value}), namespace_labels=ENABLED)
    assert str(e.value).startswith(f"annotation {annotation}: ")
    assert message in str(e.value)


def test_unusable_annotation_on_a_pod_that_is_not_injected_is_ignored():
    obj = pod({"config.meshproxy.io/log-level": "verbose", "meshproxy.io/inject": "disabled"})
    assert inject(obj, namespace_labels=ENABLED) == obj


# --- properties ----------------------------------------------------------------------------

_port = st.integers(1, 65535).map(str)
_annotations = st.fixed_dictionaries({}, optional={
    "meshproxy.io/inject": st.sampled_from(["enabled", "disabled"]),
    "meshproxy.io/native-sidecar": st.sampled_from(["true", "false"]),
    "config.meshproxy.io/skip-inbound-ports": st.lists(_port, max_size=3).map(",".join),
    "config.meshproxy.io/skip-outbound-ports": st.lists(_port, max_size=3).map(",".join),
    "config.meshproxy.io/opaque-ports": st.lists(_port, max_size=3).map(",".join),
    "config.meshproxy.io/proxy-cpu-request": st.sampled_from(["10m", "1", "0.5", "2k"]),
    "config.meshproxy.io/proxy-memory-limit": st.sampled_from(["32Mi", "1Gi", "100M", "5e8"]),
    "config.meshproxy.io/log-level": st.sampled_from(["debug", "info", "warning", "error"]),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(WORKLOADS), annotations=_annotations,
       labels=st.one_of(st.none(), st.just(ENABLED), st.just({})),
       native=st.booleans(), init_count=st.integers(0, 2))
def test_any_injection_is_valid_and_idempotent(kind, annotations, labels, native, init_count):
    obj = workload(kind, annotations, initContainers=[container(f"init-{i}") for i in range(init_count)])
    options = InjectOptions(native_sidecar=native)
    once = inject(obj, namespace_labels=labels, options=options)
    assert inject(once, namespace_labels=labels, options=options) == once
    validate(once)
    spec = pod_template(once)["spec"]
    inits = names(spec["initContainers"])
    assert inits[-init_count or len(inits):] == [f"init-{i}" for i in range(init_count)]
    if once != obj:
        assert inits[0] == "meshproxy-init"
        assert "meshproxy-proxy" in inits[1:2] + names(spec["containers"])[:1]


# --- a classic sidecar's start and stop ---------------------------------------------------------


def classic_proxy(annotations: dict | None = None) -> dict:
    out = inject(workload("Deployment", annotations), namespace_labels=ENABLED,
                 options=InjectOptions(native_sidecar=False))
    validate(out)
    return next(c for c in pod_template(out)["spec"]["containers"] if c["name"] == "meshproxy-proxy")


def test_a_classic_proxy_holds_the_app_until_ready_and_outlives_its_shutdown():
    hooks = classic_proxy()["lifecycle"]
    # the kubelet starts the next container (the app) once postStart has returned
    assert hooks["postStart"]["exec"]["command"] == ["meshproxy", "wait-ready", "--timeout", "600"]
    assert hooks["preStop"]["exec"]["command"] == ["sleep", "5"]


@pytest.mark.parametrize("value, pre_stop", [("0", None), ("30", ["sleep", "30"]), (" 12 ", ["sleep", "12"])])
def test_wait_before_exit_annotation(value, pre_stop):
    hooks = classic_proxy({"config.meshproxy.io/proxy-wait-before-exit-seconds": value})["lifecycle"]
    assert hooks.get("preStop", {}).get("exec", {}).get("command") == pre_stop
    assert "postStart" in hooks


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", "3601"])
def test_an_unusable_wait_before_exit_is_refused(value):
    with pytest.raises(InjectError, match="proxy-wait-before-exit-seconds"):
        classic_proxy({"config.meshproxy.io/proxy-wait-before-exit-seconds": value})


def test_a_native_sidecar_needs_no_hooks():
    out = inject(workload("Deployment"), namespace_labels=ENABLED)
    proxy = next(c for c in pod_template(out)["spec"]["initContainers"] if c["name"] == "meshproxy-proxy")
    assert "lifecycle" not in proxy and proxy["restartPolicy"] == "Always"
