"""deploy/: the kustomize base that `kubectl apply -k deploy/` installs (spec §7).

Rendered with `kubectl kustomize` where kubectl is installed (else the files are read as the
kustomization lists them: it has no transformer that changes them), every object validated
against the Kubernetes API schemas of 1.29 (the first with native sidecars on by default) and
of the newest version kubernetes-validate knows; the pieces checked against each other and
against the code they configure: the CLI flags, the kinds the control plane watches, the CRD
schemas and the parsers.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshproxy import __version__
from meshproxy.config.diagnostics import ConfigError, Diagnostics
from meshproxy.config.loader import load_objects, load_text
from meshproxy.config.yamlsource import parse_yaml, to_python
from meshproxy.control.kubernetes import RESOURCES
from meshproxy.kube import crds
from meshproxy.kube.sidecar import DEFAULT_CONTROL, DEFAULT_IMAGE, PROXY_UID

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
SPEC_EXAMPLES = ROOT / "tests" / "spec_examples"
SYSTEM_NAMESPACE = "meshproxy-system"


def _files_objects() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        out += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    return out


def _kubectl_objects() -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is missing: run scripts/install-test-deps.sh"
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    if shutil.which("kubectl") is not None:
        return _kubectl_objects()
    return _files_objects()


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# Rendering and API validation.


def test_kubectl_kustomize_renders_exactly_the_files():
    rendered = _kubectl_objects()
    assert sorted(rendered, key=_key) == sorted(_files_objects(), key=_key)
    assert len({_key(o) for o in rendered}) == len(rendered)


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_every_object_is_valid_for_the_api(objects, version):
    import kubernetes_validate
    if version == "latest":
        version = kubernetes_validate.latest_version()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_key(obj)} is not valid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_what_kubectl_apply_k_needs_is_there(objects):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [("Namespace", SYSTEM_NAMESPACE), ("Deployment", "meshproxy-control"),
                     ("Service", "meshproxy-control"), ("ServiceAccount", "meshproxy-control"),
                     ("ClusterRole", "meshproxy-control"), ("ClusterRoleBinding", "meshproxy-control"),
                     ("Deployment", "meshproxy-webhook"), ("Service", "meshproxy-webhook"),
                     ("MutatingWebhookConfiguration", "meshproxy-injector"), ("ConfigMap", "meshproxy-policies")]:
        assert expected in kinds
    for obj in objects:
        if obj["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                               "MutatingWebhookConfiguration"):
            assert obj["metadata"]["namespace"] == SYSTEM_NAMESPACE, _key(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshproxy", _key(obj)


# The control plane.


def test_control_plane_deployment(objects):
    from meshproxy.cli import build_parser

    deployment = find(objects, "Deployment", "meshproxy-control")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "control")
    assert c["command"] == ["meshproxy"]
    assert c["args"] == ["control", "--kubernetes", "--config", "/etc/meshproxy/policies",
                         "--listen", "0.0.0.0:15010"]
    args = build_parser().parse_args(c["args"])
    assert args.kubernetes and args.listen == "0.0.0.0:15010"
    assert c["ports"][0]["containerPort"] == 15010
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15010}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": 15010}
    # The policies ConfigMap is the folder --config reads.
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == flag(c["args"], "--config"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    find(objects, "ConfigMap", volume["configMap"]["name"])
    find(objects, "ServiceAccount", pod["serviceAccountName"])
    service = find(objects, "Service", "meshproxy-control")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    port = service["spec"]["ports"][0]
    assert port["port"] == 15010
    assert port["targetPort"] in (15010, c["ports"][0]["name"])


def test_the_proxies_default_control_url_is_the_control_plane_service(objects):
    service = find(objects, "Service", "meshproxy-control")
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:" \
          f"{service['spec']['ports'][0]['port']}"
    assert DEFAULT_CONTROL == url
    webhook = container(find(objects, "Deployment", "meshproxy-webhook"), "webhook")
    env = {e["name"]: e.get("value") for e in webhook["env"]}
    assert env["MESHPROXY_CONTROL"] == url


def test_policies_configmap_is_valid_configuration(objects):
    config_map = find(objects, "ConfigMap", "meshproxy-policies")
    assert config_map["data"]
    for name, text in config_map["data"].items():
        assert name.endswith((".yaml", ".yml"))
        snapshot = load_text(text, name)  # raises ConfigError when invalid
        assert snapshot is not None


def _rules(role: dict) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(group, resource, verb, resourceNames) for each permission a role grants."""
    out = []
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.append((group, resource, verb, tuple(rule.get("resourceNames", ()))))
    return out


def _may(role: dict, group: str, resource: str, verb: str, name: str | None = None) -> bool:
    return any(g == group and r == resource and v == verb and (not names or name in names)
               for g, r, v, names in _rules(role))


def _bound_to(objects: list[dict], binding_kind: str, role: dict, account: str) -> bool:
    return any(b["roleRef"]["name"] == role["metadata"]["name"] and b["roleRef"]["kind"] == role["kind"]
               and {"kind": "ServiceAccount", "name": account, "namespace": SYSTEM_NAMESPACE} in b["subjects"]
               for b in objects if b["kind"] == binding_kind)


def test_control_plane_may_read_everything_it_watches(objects):
    role = find(objects, "ClusterRole", "meshproxy-control")
    assert _bound_to(objects, "ClusterRoleBinding", role, "meshproxy-control")
    for resource in RESOURCES:
        for verb in ("get", "list", "watch"):
            assert _may(role, resource.group, resource.plural, verb), (resource.plural, verb)
    assert _may(role, "authentication.k8s.io", "tokenreviews", "create")
    webhook_config = find(objects, "MutatingWebhookConfiguration", "meshproxy-injector")
    for verb in ("get", "patch"):
        assert _may(role, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", verb,
                    webhook_config["metadata"]["name"])
    # Nothing more: it writes no object outside its own namespace.
    writes = {(g, r) for g, r, v, _ in _rules(role) if v not in ("get", "list", "watch")}
    assert writes == {("authentication.k8s.io", "tokenreviews"),
                      ("admissionregistration.k8s.io", "mutatingwebhookconfigurations")}


def test_control_plane_manages_its_own_secrets_only_in_its_namespace(objects):
    role = find(objects, "Role", "meshproxy-control-secrets")
    assert role["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert _bound_to(objects, "RoleBinding", role, "meshproxy-control")
    assert _may(role, "", "secrets", "create")
    tls_secret = _webhook_tls_secret(objects)
    for name in ("meshproxy-ca", tls_secret):
        for verb in ("get", "update", "patch"):
            assert _may(role, "", "secrets", verb, name)
    assert not _may(role, "", "secrets", "list") and not _may(role, "", "secrets", "get", "someone-elses")
    assert not any(r == "secrets" for o in objects if o["kind"] == "ClusterRole" for _, r, _, _ in _rules(o))


# The webhook.


def _webhook_tls_secret(objects: list[dict]) -> str:
    deployment = find(objects, "Deployment", "meshproxy-webhook")
    return next(v["secret"]["secretName"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v)


def test_webhook_deployment_and_service(objects):
    from meshproxy.kube import webhook as webhook_module
    import argparse

    deployment = find(objects, "Deployment", "meshproxy-webhook")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "webhook")
    assert c["command"] == ["meshproxy"] and c["args"][0] == "webhook"
    parser = argparse.ArgumentParser()
    webhook_module.add_parser(parser.add_subparsers())
    args = parser.parse_args(c["args"])
    assert args.listen == "0.0.0.0:15017"
    # Certificate and key come from the mounted Secret.
    mount = next(m for m in c["volumeMounts"] if args.tls_cert.startswith(m["mountPath"] + "/"))
    assert args.tls_key.startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "meshproxy-webhook-tls"
    assert {args.tls_cert.rsplit("/", 1)[1], args.tls_key.rsplit("/", 1)[1]} == {"tls.crt", "tls.key"}
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": 15017, "scheme": "HTTPS"}
    find(objects, "ServiceAccount", pod["serviceAccountName"])
    role = find(objects, "ClusterRole", "meshproxy-webhook")
    assert _bound_to(objects, "ClusterRoleBinding", role, pod["serviceAccountName"])
    assert _rules(role) == [("", "namespaces", "get", ())]
    service = find(objects, "Service", "meshproxy-webhook")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    port = service["spec"]["ports"][0]
    assert port["port"] == 443
    assert port["targetPort"] in (15017, next(p["name"] for p in c["ports"] if p["containerPort"] == 15017))


def test_one_image_runs_everything_and_the_webhook_injects_it(objects):
    images = {c["image"] for o in objects if o["kind"] == "Deployment"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {DEFAULT_IMAGE}
    assert DEFAULT_IMAGE.endswith(":" + __version__)
    c = container(find(objects, "Deployment", "meshproxy-webhook"), "webhook")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MESHPROXY_PROXY_IMAGE"] == c["image"]


def test_the_webhook_injects_the_image_the_kustomization_names(tmp_path):
    """Changing `images:` changes the webhook's image and the image it injects, together."""
    assert shutil.which("kubectl") is not None, "kubectl is missing: run scripts/install-test-deps.sh"
    overlay = tmp_path / "deploy"
    shutil.copytree(DEPLOY, overlay)
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["images"] = [{"name": DEFAULT_IMAGE.rsplit(":", 1)[0], "newName": "registry.test/meshproxy",
                                "newTag": "dev"}]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    done = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    c = container(find(list(yaml.safe_load_all(done.stdout)), "Deployment", "meshproxy-webhook"), "webhook")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == env["MESHPROXY_PROXY_IMAGE"] == "registry.test/meshproxy:dev"


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector's meaning (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value, present = labels.get(e["key"]), e["key"] in labels
        ok = {"In": present and value in e.get("values", []),
              "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def _namespace_labels(name: str, **labels: str) -> dict:
    # The API server labels every namespace with its name.
    return {"kubernetes.io/metadata.name": name, **labels}


def test_webhook_configuration(objects):
    config = find(objects, "MutatingWebhookConfiguration", "meshproxy-injector")
    [hook] = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == "/inject"
    service = find(objects, "Service", ref["name"])
    assert service["metadata"]["namespace"] == ref["namespace"]
    assert ref.get("port", 443) in [p["port"] for p in service["spec"]["ports"]]
    selector = hook["namespaceSelector"]
    for excluded in ("kube-system", "kube-node-lease", SYSTEM_NAMESPACE):
        assert not _selects(selector, _namespace_labels(excluded))
    assert not _selects(selector, _namespace_labels("shop", **{"meshproxy.io/inject": "disabled"}))
    for included in (_namespace_labels("default"), _namespace_labels("kube-public"),
                     _namespace_labels("shop", **{"meshproxy.io/inject": "enabled"})):
        assert _selects(selector, included)
    # The mesh's own namespace is left out by its label too.
    namespace = find(objects, "Namespace", SYSTEM_NAMESPACE)
    assert not _selects(selector, {**namespace["metadata"]["labels"], "kubernetes.io/metadata.name": "x"})


def test_system_pods_meet_the_restricted_pod_security_standard(objects):
    namespace = find(objects, "Namespace", SYSTEM_NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == PROXY_UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert "memory" in c["resources"]["limits"]


# The CRDs.


def test_crds_yaml_is_what_the_generator_makes():
    assert (DEPLOY / "crds.yaml").read_text() == crds.render()
    done = subprocess.run([sys.executable, "-m", "meshproxy.kube.crds"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (DEPLOY / "crds.yaml").read_text(), \
        "deploy/crds.yaml is stale: python -m meshproxy.kube.crds > deploy/crds.yaml"


def test_a_crd_for_every_meshproxy_kind_the_control_plane_watches(objects):
    rendered = {o["spec"]["names"]["kind"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    watched = [r for r in RESOURCES if r.group == crds.GROUP]
    assert sorted(rendered) == sorted(r.kind for r in watched)
    for resource in watched:
        crd = rendered[resource.kind]
        assert crd["metadata"]["name"] == f"{resource.plural}.{resource.group}"
        assert crd["spec"]["group"] == resource.group
        assert crd["spec"]["names"]["plural"] == resource.plural
        assert crd["spec"]["scope"] == "Namespaced"
        [version] = crd["spec"]["versions"]
        assert version["name"] == resource.version and version["served"] and version["storage"]
        assert f"{resource.group}/{resource.version}" == "meshproxy.io/v1alpha1"


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    for sub in schema.get("anyOf", []):
        yield from _walk(sub, f"{path}(anyOf)")


def test_crd_schemas_are_structural():
    """apiextensions.k8s.io/v1 refuses a CRD whose schema is not structural: every node has a
    type (or is int-or-string), anyOf branches carry no other structure, properties and
    additionalProperties are not mixed."""
    for crd in crds.crds():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(root):
            if "(anyOf)" in path:
                continue
            if node.get("x-kubernetes-int-or-string"):
                assert "type" not in node
                assert node.get("anyOf") in (None, [{"type": "integer"}, {"type": "string"}])
                continue
            assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
            assert not ("properties" in node and "additionalProperties" in node), path
            assert "anyOf" not in node, path
            if node["type"] == "array":
                assert "items" in node, path
        assert root["properties"]["metadata"] == {"type": "object"}


def _strict(schema: dict) -> dict:
    """The schema as the API server applies it with field validation (kubectl's default):
    unknown fields are errors. `metadata` is the API server's to check."""
    out = copy.deepcopy(schema)
    for path, node in _walk(out):
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
    return out


def _validator(kind: str):
    import jsonschema
    schema = crds.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(_strict(schema))


def _documents(text: str, file: str) -> list[dict]:
    """YAML documents read as the API server receives them from `kubectl apply -k` (kustomize
    keeps a key such as `on` a string, where a YAML 1.1 reader would make it the boolean true);
    the project's own reader does the same."""
    diags = Diagnostics()
    docs = [to_python(node) for node in parse_yaml(text, file, diags)]
    assert not diags.errors, diags.errors
    return docs


def _meshproxy_documents(folder: Path) -> list[tuple[str, dict]]:
    out = []
    for file in sorted(folder.glob("*.yaml")):
        for doc in _documents(file.read_text(), file.name):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(crds.GROUP + "/") \
                    and doc.get("kind") in crds.KINDS:
                out.append((file.name, doc))
    return out


def test_crd_schemas_accept_the_spec_examples():
    assert SPEC_EXAMPLES.is_dir(), f"no spec examples at {SPEC_EXAMPLES}"
    documents = _meshproxy_documents(SPEC_EXAMPLES)
    assert {doc["kind"] for _, doc in documents} == set(crds.KINDS)
    for name, doc in documents:
        errors = [f"{list(e.path)}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]
        assert not errors, f"{name} {doc['kind']}/{doc['metadata']['name']}: {errors}"


def test_crd_schemas_accept_the_projects_own_policies(objects):
    documents = _meshproxy_documents(ROOT / "config" / "demo") + _meshproxy_documents(ROOT / "config" / "examples")
    config_map = find(objects, "ConfigMap", "meshproxy-policies")
    documents += [(name, doc) for name, text in config_map["data"].items() for doc in _documents(text, name)]
    assert documents
    for name, doc in documents:
        errors = [f"{list(e.path)}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]
        assert not errors, f"{name} {doc['kind']}/{doc['metadata']['name']}: {errors}"


def _doc(kind: str, spec: dict) -> dict:
    return {"apiVersion": f"{crds.GROUP}/{crds.VERSION}", "kind": kind,
            "metadata": {"name": "p", "namespace": "default"}, "spec": spec}


REFUSED = [
    ("PeerAuthentication", {"mtls": {"mode": "OPTIONAL"}}),
    ("PeerAuthentication", {"mtls": {}}),
    ("PeerAuthentication", {}),
    ("PeerAuthentication", {"mtls": {"mode": "STRICT"}, "portLevelMtls": {}}),
    ("TrafficPolicy", {"timeouts": {"request": "5 seconds"}}),
    ("TrafficPolicy", {"timeouts": {"request": "1.5s"}}),
    ("TrafficPolicy", {"retry": {"attempts": 101}}),
    ("TrafficPolicy", {"retry": {"on": ["bogus"]}}),
    ("TrafficPolicy", {"retry": {"on": [302]}}),
    ("TrafficPolicy", {"loadBalancer": {"type": "Maglev"}}),
    ("TrafficPolicy", {"connectionPool": {"maxConnections": 0}}),
    ("TrafficPolicy", {"circuitBreaker": {"maxEjectionPercent": 150}}),
    ("TrafficPolicy", {"retry": {"budget": {"percent": -1}}}),
    ("TrafficPolicy", {"targetRef": {"kind": "Deployment", "name": "x"}}),
    ("TrafficPolicy", {"targetRef": {"kind": "Service"}}),
    ("TrafficPolicy", {"targetRef": {"name": "Not_A_Name"}}),
    ("AuthorizationPolicy", {"action": "AUDIT"}),
    ("AuthorizationPolicy", {"rules": [{"from": [{}]}]}),
    ("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"methods": "GET"}}]}]}),
    ("AuthorizationPolicy", {"rules": [{"when": []}]}),
]


@pytest.mark.parametrize("kind,spec", REFUSED, ids=[f"{k}-{i}" for i, (k, _) in enumerate(REFUSED)])
def test_crd_schemas_refuse_what_the_parser_refuses(kind, spec):
    doc = _doc(kind, spec)
    assert list(_validator(kind).iter_errors(doc)), f"the schema accepts {spec}"
    with pytest.raises(ConfigError):
        load_objects([doc])


def _sample(schema: dict):
    """A value for every field the schema describes."""
    if schema.get("x-kubernetes-int-or-string"):
        return "503"
    if "enum" in schema:
        return schema["enum"][-1]
    kind = schema["type"]
    if kind == "object":
        return {name: _sample(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_sample(schema["items"])]
    if kind == "string":
        return "1s" if "pattern" in schema and "ms" in schema["pattern"] else "web"
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "number":
        return 1.5
    return True


@pytest.mark.parametrize("kind", list(crds.KINDS))
def test_every_schema_field_is_one_the_parser_reads(kind):
    """A document with every field the schema allows parses without an error: the schema
    names no field the parser would call unknown, and its enums are the parser's."""
    spec = _sample(crds.KINDS[kind][2])
    spec["targetRef"] = {"group": "", "kind": "Service", "name": "web"}
    doc = _doc(kind, spec)
    assert not list(_validator(kind).iter_errors(doc))
    load_objects([doc])
    for schema_path, node in _walk(crds.KINDS[kind][2]):
        for value in node.get("enum", []):
            if value in ("", "core", "Service"):
                continue
            variant = copy.deepcopy(spec)
            target = variant
            keys = [k for k in schema_path.strip(".").split(".")]
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
            load_objects([_doc(kind, variant)])


# The image.


def test_dockerfile_builds_one_image_for_every_command():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert f"USER {PROXY_UID}" in lines
    assert any("pip install" in line and "'.[kubernetes]'" in line for line in lines)
    assert 'ENTRYPOINT ["meshproxy"]' in lines
    assert "iptables" in text  # meshproxy init runs from the same image


def test_the_files_the_dockerfile_copies_make_the_package(tmp_path):
    """What the Dockerfile COPYs (and .dockerignore lets through) is enough to build it."""
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert copied
    for name in copied:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & set(copied)
    # setuptools' own metadata step lists every file that goes into the package.
    done = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info",
                           "--egg-base", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sources = (tmp_path / "meshproxy.egg-info" / "SOURCES.txt").read_text().split()
    assert "meshproxy/kube/webhook.py" in sources and "meshproxy/cli.py" in sources
    assert "meshproxy/py.typed" in sources


def test_first_start_objects_are_the_ones_deploy_names(objects):
    """The control plane's first start (meshproxy.kube.bootstrap) writes the Secrets the webhook
    mounts and RBAC allows, and the caBundle of the configuration deploy/ installs."""
    from meshproxy.kube.bootstrap import Names

    names = Names()
    assert names.namespace == SYSTEM_NAMESPACE
    assert names.webhook_secret == _webhook_tls_secret(objects)
    config = find(objects, "MutatingWebhookConfiguration", names.webhook_configuration)
    service = config["webhooks"][0]["clientConfig"]["service"]
    assert (service["name"], service["namespace"]) == (names.webhook_service, names.namespace)
    role = find(objects, "Role", "meshproxy-control-secrets")
    for secret in (names.ca_secret, names.webhook_secret):
        assert _may(role, "", "secrets", "get", secret) and _may(role, "", "secrets", "update", secret)
