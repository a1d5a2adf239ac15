"""`meshproxy inject` as a function: YAML text in, YAML text out, errors as FILE:LINE:COL."""

from __future__ import annotations

import argparse
import io
import textwrap

import pytest
import yaml

from meshproxy.kube.inject_cli import (
    InjectInputError,
    add_parser,
    inject_text,
    parse_labels,
    read_documents,
    run,
)

DEPLOYMENT = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
    spec:
      selector: {matchLabels: {app: web}}
      template:
        metadata:
          labels: {app: web}
        spec:
          containers:
          - name: web
            image: web:1
    """)
SERVICE = textwrap.dedent("""\
    apiVersion: v1
    kind: Service   # the web front
    metadata: {name: web}
    spec:
      ports: [{port: 80, targetPort: 8080}]
    """)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshproxy")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["inject", *argv])


def run_on(text: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(parse(list(argv)), stdin=io.StringIO(text), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_workloads_are_injected_and_other_documents_printed_as_written():
    code, out, err = run_on(SERVICE + "---\n" + DEPLOYMENT + "---\n" + SERVICE)
    assert (code, err) == (0, "")
    docs = out.split("---\n")
    assert docs[0] == SERVICE and docs[2] == SERVICE  # byte for byte, comment included
    deployment = yaml.safe_load(docs[1])
    inits = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["meshproxy-init", "meshproxy-proxy"]


def test_empty_documents_are_dropped_and_order_kept():
    text = "---\n" + DEPLOYMENT + "---\n---\n" + SERVICE + "...\n"
    code, out, _ = run_on(text)
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert (code, kinds) == (0, ["Deployment", "Service"])


def test_without_namespace_labels_explicit_objects_are_injected_unless_disabled():
    disabled = DEPLOYMENT.replace("labels: {app: web}",
                                  "labels: {app: web}\n      annotations: {meshproxy.io/inject: disabled}")
    code, out, _ = run_on(disabled)
    assert (code, out) == (0, disabled)


def test_namespace_labels_apply_the_webhook_rule():
    assert run_on(DEPLOYMENT, "--namespace-labels", "")[1] == DEPLOYMENT
    assert run_on(DEPLOYMENT, "--namespace-labels", "team=a,meshproxy.io/inject=enabled")[1] != DEPLOYMENT


def test_flags_become_options():
    code, out, _ = run_on(DEPLOYMENT, "--no-native-sidecar", "--proxy-image", "reg.local/mp:dev",
                          "--control", "http://control:15010")
    spec = yaml.safe_load(out)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["meshproxy-proxy", "web"]
    proxy = spec["containers"][0]
    assert proxy["image"] == "reg.local/mp:dev"
    assert {"name": "MESHPROXY_CONTROL", "value": "http://control:15010"} in proxy["env"]


def test_invalid_yaml_names_file_line_and_column_and_prints_nothing():
    text = DEPLOYMENT + "---\nkind: Service\nmetadata: {name: [oops}\n"
    code, out, err = run_on(text)
    assert code == 1 and out == ""
    assert err.startswith("<stdin>:16:")
    with pytest.raises(InjectInputError, match=r"^app\.yaml:16:\d+: "):
        read_documents(text, "app.yaml")


def test_unusable_annotation_names_the_document_and_the_annotation():
    bad = DEPLOYMENT.replace("labels: {app: web}",
                             "labels: {app: web}\n      annotations: {config.meshproxy.io/log-level: loud}")
    with pytest.raises(InjectInputError) as e:
        inject_text(SERVICE + "---\n" + bad, "app.yaml")
    assert str(e.value) == ("app.yaml:7:1: Deployment web: annotation config.meshproxy.io/log-level: "
                            "'loud' is not one of debug, info, warning, error")
    code, out, err = run_on(bad)
    assert (code, out) == (1, "") and err.startswith("<stdin>:1:1: Deployment web: ")


def test_injected_output_reads_back_as_the_injected_object():
    from meshproxy.kube.inject import inject

    out = inject_text(DEPLOYMENT, "app.yaml", namespace_labels={"meshproxy.io/inject": "enabled"})
    assert yaml.safe_load(out) == inject(yaml.safe_load(DEPLOYMENT),
                                         namespace_labels={"meshproxy.io/inject": "enabled"})


def test_missing_file(tmp_path):
    code, out, err = run_on("", "-f", str(tmp_path / "nope.yaml"))
    assert (code, out) == (1, "")
    assert err.startswith(f"meshproxy inject: cannot read {tmp_path / 'nope.yaml'}: ")


@pytest.mark.parametrize("text, labels", [
    ("", {}),
    ("a=b", {"a": "b"}),
    (" meshproxy.io/inject = enabled , team=", {"meshproxy.io/inject": "enabled", "team": ""}),
])
def test_parse_labels(text, labels):
    assert parse_labels(text) == labels


@pytest.mark.parametrize("text", ["a", "=b", "a=b,c"])
def test_parse_labels_refuses_items_without_a_key_and_value(text):
    with pytest.raises(ValueError):
        parse_labels(text)
    code, _, err = run_on(DEPLOYMENT, "--namespace-labels", text)
    assert code == 1 and err.startswith("meshproxy inject: --namespace-labels: ")


@pytest.mark.parametrize("text, message", [
    ("kind: Pod\nmetadata:\n  name: a\x07b\n",
     "x.yaml:3:10: invalid YAML: control characters are not allowed"),
    ("kind: Pod\n  bad: [\n", "x.yaml:2:6: invalid YAML: mapping values are not allowed in this context"),
])
def test_yaml_errors_point_at_the_character(text, message):
    with pytest.raises(InjectInputError) as e:
        read_documents(text, "x.yaml")
    assert str(e.value) == message
