"""`meshproxy inject` as a user runs it: a process, a multi-document file or standard input in,
manifests ready for `kubectl apply` out."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parents[2]
VERSIONS = sorted({"1.29.0", "1.37.0", kv.latest_version()}, key=kv.major_minor)

MANIFESTS = textwrap.dedent("""\
    # The shop: its configuration, its Service and its workloads.
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: web-config
    data:
      mode: "production"   # quoted on purpose
      greeting: |
        hello
        world
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: web
    spec:
      selector: {app: web}
      ports:
      - {name: http, port: 80, targetPort: http}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
    spec:
      replicas: 2
      selector:
        matchLabels: {app: web}
      template:
        metadata:
          labels: {app: web}
          annotations:
            config.meshproxy.io/opaque-ports: "5432"
        spec:
          initContainers:
          - name: migrate
            image: shop/migrate:1
          containers:
          - name: web
            image: shop/web:1
            ports: [{name: http, containerPort: 8080}]
            readinessProbe:
              httpGet: {path: /ready, port: http}
    ---
    apiVersion: batch/v1
    kind: CronJob
    metadata:
      name: report
    spec:
      schedule: "0 * * * *"
      jobTemplate:
        spec:
          template:
            spec:
              restartPolicy: OnFailure
              containers:
              - name: report
                image: shop/report:1
    ---
    apiVersion: apps/v1
    kind: DaemonSet
    metadata:
      name: node-agent
    spec:
      selector:
        matchLabels: {app: node-agent}
      template:
        metadata:
          labels: {app: node-agent}
        spec:
          hostNetwork: true
          containers:
          - name: agent
            image: shop/agent:1
    """)


def run_inject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshproxy.kube.inject_cli", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def test_multi_document_file_round_trip(tmp_path):
    path = tmp_path / "shop.yaml"
    path.write_text(MANIFESTS)
    result = run_inject("-f", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    docs = list(yaml.safe_load_all(result.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "web-config"), ("Service", "web"), ("Deployment", "web"),
        ("CronJob", "report"), ("DaemonSet", "node-agent")]
    originals = list(yaml.safe_load_all(MANIFESTS))
    configmap, service, deployment, cronjob, daemonset = docs
    # Passed through unchanged, down to the text: a ConfigMap, a Service, a hostNetwork pod.
    assert configmap == originals[0] and service == originals[1] and daemonset == originals[4]
    assert 'mode: "production"   # quoted on purpose' in result.stdout
    assert [c["name"] for c in pod_spec(deployment)["initContainers"]] == [
        "meshproxy-init", "meshproxy-proxy", "migrate"]
    assert [c["name"] for c in pod_spec(cronjob)["initContainers"]] == [
        "meshproxy-init", "meshproxy-proxy"]
    web = pod_spec(deployment)["containers"][0]
    assert web["readinessProbe"]["httpGet"] == {"path": "/app-health/web/readyz", "port": 15021,
                                                "scheme": "HTTP"}
    proxy = pod_spec(deployment)["initContainers"][1]
    assert {"name": "MESHPROXY_OPAQUE_PORTS", "value": "5432"} in proxy["env"]
    for doc in docs:
        for version in VERSIONS:
            kv.validate(doc, version, strict=True)

    # Injecting the output again prints it unchanged.
    again = run_inject(stdin=result.stdout)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout


def test_standard_input_and_classic_sidecar():
    result = run_inject("-f", "-", "--no-native-sidecar", stdin=MANIFESTS)
    assert result.returncode == 0, result.stderr
    deployment = list(yaml.safe_load_all(result.stdout))[2]
    spec = pod_spec(deployment)
    assert [c["name"] for c in spec["initContainers"]] == ["meshproxy-init", "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["meshproxy-proxy", "web"]
    for version in VERSIONS:
        kv.validate(deployment, version, strict=True)


def test_namespace_without_the_label_injects_only_annotated_pods():
    result = run_inject("--namespace-labels", "team=shop", stdin=MANIFESTS)
    assert result.returncode == 0, result.stderr
    assert list(yaml.safe_load_all(result.stdout)) == list(yaml.safe_load_all(MANIFESTS))


def test_invalid_yaml_exits_1_with_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(MANIFESTS + "---\nkind: Service\nmetadata:\n  name: [unclosed\n")
    result = run_inject("-f", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    # The parser notices at the end of the file; the message says where the list began.
    end, start = MANIFESTS.count("\n") + 5, MANIFESTS.count("\n") + 4
    assert result.stderr == (f"{path}:{end}:1: invalid YAML: did not find expected ',' or ']' "
                             f"(while parsing a flow sequence at line {start}, column 9)\n")


def test_bad_indentation_is_reported_at_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n labels: {}\n")
    result = run_inject("-f", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"{path}:5:2: invalid YAML: "), result.stderr
