"""Parsing the parts every kind shares: metadata, targetRef, and name rules."""

from __future__ import annotations

import re

from meshproxy.config.model.common import DEFAULT_NAMESPACE, ObjectMeta, TargetRef, service_key
from meshproxy.config.parse.fields import Obj

# RFC 1123 label (namespaces, Service names: they are parts of a host name) and subdomain.
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Fields Kubernetes adds to metadata; accepted so exported objects load, and otherwise unused.
_BOOKKEEPING = (
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "ownerReferences", "finalizers",
    "generateName", "selfLink",
)


def check_name(obj: Obj, key: str, value: str | None, label: bool) -> str | None:
    """Return `value` when it is a valid DNS label (`label`) or subdomain, else report it."""
    if value is None:
        return None
    pattern, what = (DNS_LABEL_RE, "a DNS label") if label else (DNS_SUBDOMAIN_RE, "a DNS subdomain")
    if not pattern.match(value):
        obj.r.error(obj.value_pos(key), f"{obj.field(key)}: '{value}' is not {what} "
                    "(lowercase letters, digits and '-'" + ("" if label else ", '.' between parts") + ")")
        return None
    return value


def parse_metadata(doc: Obj) -> ObjectMeta:
    """Return the document's metadata; name is required, namespace defaults to `default`."""
    meta = doc.obj("metadata", required=True)
    if meta is None:
        return ObjectMeta(name="")
    name = check_name(meta, "name", meta.string("name", required=True), label=False)
    namespace = check_name(meta, "namespace", meta.string("namespace", DEFAULT_NAMESPACE), label=True)
    labels = meta.str_map("labels")
    annotations = meta.str_map("annotations")
    meta.ignore(*_BOOKKEEPING)
    return ObjectMeta(name=name or "", namespace=namespace or DEFAULT_NAMESPACE,
                      labels=labels, annotations=annotations)


def parse_target_ref(spec: Obj, namespace: str) -> TargetRef | None:
    """Return the policy's `targetRef` (a Service of its own namespace), or None when absent."""
    ref = spec.obj("targetRef")
    if ref is None:
        return None
    ref.string("group", "", choices=("", "core"))
    kind = ref.string("kind", "Service", choices=("Service",))
    name = check_name(ref, "name", ref.string("name", required=True), label=True)
    if name is None:
        return TargetRef(name="")
    spec.r.refs.append((service_key(name, namespace), ref.field("name"), None))
    return TargetRef(name=name, kind=kind)
