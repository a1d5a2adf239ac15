"""`meshproxy inject`: Kubernetes manifests in, the same manifests out with the sidecar injected.

Reads multi-document YAML from ``-f FILE`` (or standard input), injects every workload that the
rules of `meshproxy.kube.inject` select, and prints every document in the order read. A document
that injection leaves unchanged (a Service, a ConfigMap, a pod annotated ``disabled``) is
printed as it was written, comments included; an injected one is printed anew. Nothing is
printed unless every document could be read and injected: invalid YAML or an unusable
annotation exits 1 with ``FILE:LINE:COL: message`` on standard error, so that
``meshproxy inject -f app.yaml | kubectl apply -f -`` never applies half a file.

Without ``--namespace-labels`` the objects are treated as going to a namespace labelled
``meshproxy.io/inject: enabled``, so every workload given is injected unless its pods say
``disabled`` (as ``istioctl kube-inject`` does): naming the file is the request. With it, the
admission webhook's rule applies to those labels, so ``--namespace-labels ''`` shows what a
namespace without the label gets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TextIO

import yaml

from meshproxy.kube.inject import INJECT_ANNOTATION, InjectError, InjectOptions, inject
from meshproxy.kube.sidecar import DEFAULT_CONTROL, DEFAULT_IMAGE

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# The labels assumed for the namespace of objects given without --namespace-labels.
ENABLED_NAMESPACE: Mapping[str, str] = MappingProxyType({INJECT_ANNOTATION: "enabled"})


class InjectInputError(Exception):
    """The input cannot be injected; the message is ``FILE:LINE:COL: what``."""


@dataclass(frozen=True)
class Document:
    """One YAML document: its value, its text as written and where it starts (1-based)."""

    value: Any
    text: str
    line: int
    column: int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``inject`` on `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "inject",
        help="print Kubernetes manifests with the sidecar injected",
        description="Print the Kubernetes manifests read from FILE (or standard input) with the "
        "meshproxy sidecar injected into every workload: Pods, Deployments, StatefulSets, "
        "DaemonSets, ReplicaSets, Jobs, CronJobs and Lists of them. Pods annotated "
        "meshproxy.io/inject: disabled, on hostNetwork or already injected, and every other "
        "object, are printed unchanged.",
    )
    p.add_argument("-f", "--filename", default="-", metavar="FILE",
                   help="multi-document YAML to read; - (the default) for standard input")
    p.add_argument("--namespace-labels", default=None, metavar="KEY=VALUE,...",
                   help="the labels of the namespace the objects go to; then only pods the "
                   "webhook would inject are (namespace labelled meshproxy.io/inject=enabled, or "
                   "pod annotated so). Without it every workload given is injected")
    p.add_argument("--proxy-image", default=DEFAULT_IMAGE, metavar="IMAGE",
                   help=f"image of the proxy and of meshproxy-init (default {DEFAULT_IMAGE})")
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="URL",
                   help=f"the control plane's URL, as the proxies reach it (default {DEFAULT_CONTROL})")
    p.add_argument("--no-native-sidecar", action="store_true",
                   help="add the proxy as a classic container rather than as an init container "
                   "with restartPolicy: Always (for clusters before Kubernetes 1.29)")
    p.set_defaults(command="inject")
    return p


def parse_labels(text: str) -> dict[str, str]:
    """Return the labels of ``KEY=VALUE,KEY=VALUE`` ({} for ''). Raises ValueError for an item
    without ``=`` or with an empty key."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def read_documents(text: str, name: str) -> list[Document]:
    """Return the non-empty documents of `text` in order. Raises InjectInputError, naming
    `name` and the line and column, when `text` is not valid YAML."""
    loader = _LOADER(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            value = loader.construct_document(node)
            if value is None:
                continue
            start, end = node.start_mark, node.end_mark
            documents.append(Document(value, text[start.index:end.index].rstrip() + "\n",
                                      start.line + 1, start.column + 1))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else f"{name}:1:1"
        problem = e.problem or e.context or "malformed YAML"
        if e.problem and e.context:
            problem += f" ({e.context}"
            if e.context_mark and e.context_mark is not mark:
                problem += f" at line {e.context_mark.line + 1}, column {e.context_mark.column + 1}"
            problem += ")"
        raise InjectInputError(f"{where}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise InjectInputError(f"{name}:{line}:{column}: invalid YAML: {e.reason}") from None
    finally:
        loader.dispose()
    return documents


def _describe(value: Any) -> str:
    metadata = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
    name = metadata.get("name") or metadata.get("generateName") or "?"
    namespace = metadata.get("namespace")
    return f"{value.get('kind', '?')} {namespace + '/' if namespace else ''}{name}"


def inject_text(text: str, name: str, *,
                namespace_labels: Mapping[str, str] | None = ENABLED_NAMESPACE,
                options: InjectOptions = InjectOptions()) -> str:
    """Return the YAML stream `text` with the sidecar injected, documents separated by
    ``---``; `namespace_labels` as for `meshproxy.kube.inject.inject`, by default those of a
    namespace labelled for injection. Raises InjectInputError (``FILE:LINE:COL: message``, FILE being `name`) for
    invalid YAML or a document that cannot be injected."""
    out = []
    for doc in read_documents(text, name):
        if not isinstance(doc.value, dict):
            out.append(doc.text)
            continue
        try:
            injected = inject(doc.value, namespace_labels=namespace_labels, options=options)
        except InjectError as e:
            raise InjectInputError(
                f"{name}:{doc.line}:{doc.column}: {_describe(doc.value)}: {e}") from None
        if injected == doc.value:
            out.append(doc.text)
        else:
            out.append(yaml.dump(injected, Dumper=_DUMPER, sort_keys=False,
                                 default_flow_style=False, allow_unicode=True, width=1 << 16))
    return "---\n".join(out)


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run ``meshproxy inject``: return 0 after printing the manifests, 1 (with the error on
    standard error and nothing printed) when the input cannot be read or injected."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        labels = (ENABLED_NAMESPACE if args.namespace_labels is None
                  else parse_labels(args.namespace_labels))
    except ValueError as e:
        print(f"meshproxy inject: --namespace-labels: {e}", file=stderr)
        return 1
    options = InjectOptions(proxy_image=args.proxy_image, control_url=args.control,
                            native_sidecar=not args.no_native_sidecar)
    if args.filename == "-":
        name, text = "<stdin>", stdin.read()
    else:
        name = args.filename
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"meshproxy inject: cannot read {name}: {e}", file=stderr)
            return 1
    try:
        result = inject_text(text, name, namespace_labels=labels, options=options)
    except InjectInputError as e:
        print(e, file=stderr)
        return 1
    stdout.write(result)
    stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshproxy.kube.inject_cli [ARGS]``: the same as ``meshproxy inject``."""
    parser = argparse.ArgumentParser(prog="meshproxy")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["inject", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
