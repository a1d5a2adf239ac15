"""Discovered objects judged one by one, as pure data: an invalid object is left out, or held
at its last valid version, and everyone else's go on being applied (docs/control-plane.md,
"An invalid object in the cluster"). The build itself is control/views.py's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from meshproxy.config import ConfigError, Diagnostic, LoadResult
from meshproxy.config.yamlsource import from_python
from meshproxy.control.views import (
    DISCOVERY_SOURCE,
    ControlSnapshot,
    EncodingCache,
    ObjectKey,
    Registrations,
    build,
    load_nodes,
    object_key,
    object_label,
)

ROUNDS = 10  # builds one change may take to find its invalid objects (each takes out some)
# Kinds whose absence opens what they close: an invalid one with no valid version to keep is
# replaced by a stand-in that closes instead (see `_stand_in`).
FAIL_CLOSED_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
_SERVICE_PATH = re.compile(r"^spec\.services\[\d+\]\.")


@dataclass(frozen=True)
class Rejection:
    """A discovered object not in force as it is now: left out, held at its last valid
    version (`kept`), or replaced by a stand-in that closes what it would (`fail_closed`:
    deny every request, or STRICT mTLS). Equal rejections are one: the plane reports each once."""

    kind: str
    namespace: str
    name: str
    reason: str
    kept: bool = False
    fail_closed: bool = False

    def __str__(self) -> str:
        if self.kept:
            outcome = "its last valid version stays in force"
        elif self.fail_closed:
            outcome = ("in force as DENY of every request to its target until fixed"
                       if self.kind == "AuthorizationPolicy" else "in force as STRICT until fixed")
        else:
            outcome = "left out"
        return f"{self.kind} {self.namespace}/{self.name}: {self.reason} ({outcome})"

    def to_json(self) -> dict:
        """The rejection as `/config` shows it."""
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name, "reason": self.reason,
                "keptLastValid": self.kept, "failClosed": self.fail_closed}


@dataclass
class Screening:
    """What `build_discovered` keeps from one change to the next: the discovered documents in
    force (each object's last valid version), and the objects found invalid on their own (by
    content: they stay so until they change, so they need not be found again)."""

    in_force: list[dict] = field(default_factory=list)
    invalid: dict[ObjectKey, tuple[dict, str]] = field(default_factory=dict)


def _split(discovered: Sequence[dict]) -> list[tuple[ObjectKey, dict]]:
    """The discovered objects in order: each Service of a Mesh, and each other document."""
    units: list[tuple[ObjectKey, dict]] = []
    for doc in discovered:
        if doc.get("kind") == "Mesh":
            spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
            units.extend((object_key(s, "Service"), s) for s in spec.get("services") or () if isinstance(s, dict))
        else:
            units.append((object_key(doc), doc))
    return units


def _join(discovered: Sequence[dict], chosen: dict[ObjectKey, dict]) -> list[dict]:
    """`discovered` with each object replaced by its `chosen` version, or left out when it has
    none. Unchanged documents stay the same objects (the EncodingCache knows them)."""
    out = []
    for doc in discovered:
        if doc.get("kind") != "Mesh":
            key = object_key(doc)
            if key in chosen:
                out.append(chosen[key])
            continue
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        services = [s for s in spec.get("services") or () if isinstance(s, dict)]
        kept = [chosen[k] for k in (object_key(s, "Service") for s in services) if k in chosen]
        same = len(kept) == len(services) and all(a is b for a, b in zip(kept, services))
        out.append(doc if same else {**doc, "spec": {**spec, "services": kept}})
    return out


def _reason(key: ObjectKey, errors: list[Diagnostic]) -> str:
    # A Service's messages name its field within the Mesh (`spec.services[12].port`): the
    # object is named already, the index means nothing to its owner.
    messages = [_SERVICE_PATH.sub("", e.message) if key[0] == "Service" else e.message for e in errors]
    return "; ".join(dict.fromkeys(messages))


def _invalid_alone(key: ObjectKey, doc: dict) -> bool:
    """True when the object has errors of its own, with no other object loaded."""
    if key[0] == "Service":
        doc = {"apiVersion": "meshproxy.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "check"},
               "spec": {"services": [doc]}}
    try:
        load_nodes([from_python(doc, object_label(key))])
    except ConfigError:
        return True
    return False


def _stand_in(key: ObjectKey, doc: dict) -> dict | None:
    """The fail-closed stand-in for an invalid AuthorizationPolicy (DENY of every request) or
    PeerAuthentication (STRICT) `doc`, for the same target: its `targetRef` when that is valid
    on its own, else its whole namespace (wider, never more open). None for other kinds."""
    if key[0] not in FAIL_CLOSED_KINDS:
        return None
    spec = {"action": "DENY", "rules": [{}]} if key[0] == "AuthorizationPolicy" else {"mtls": {"mode": "STRICT"}}
    base = {"apiVersion": doc.get("apiVersion") or "meshproxy.io/v1alpha1", "kind": key[0],
            "metadata": {"name": key[2], "namespace": key[1]}}
    original = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if "targetRef" in original:
        targeted = {**base, "spec": {"targetRef": original["targetRef"], **spec}}
        if not _invalid_alone(key, targeted):
            return targeted
    return {**base, "spec": spec}


def build_discovered(files: LoadResult | None, discovered: Sequence[dict], screening: Screening,
                     registrations: Registrations | None = None, generation: Iterable[int] = (0,),
                     cache: EncodingCache | None = None) -> tuple[ControlSnapshot, list[Rejection]]:
    """Return (`build`'s snapshot with every invalid discovered object left out, or replaced
    by its version in `screening.in_force` when it had one; the objects rejected), and note
    what was found in `screening`.

    An object is invalid when it has errors of its own, or conflicts with what is loaded
    before it (a kind and name the files use). Objects that `screening` knows to be invalid
    as they are now are set aside before the first build; otherwise each build that fails
    takes out the objects its errors name. Raises ConfigError when an error is no discovered
    object's (the files', or the settings of the discovered Mesh), or the errors do not end.
    """
    units = _split(discovered)
    previous = dict(_split(screening.in_force))
    labels = {object_label(k): k for k, _ in units}
    chosen = dict(units)
    rejected: dict[ObjectKey, Rejection] = {}

    def reject(key: ObjectKey, reason: str) -> None:
        # One that was valid keeps its last valid version rather than dropping out: the files'
        # rule (keep the last valid configuration) per object; what Linkerd's policy controller
        # does with an update it cannot read; and safe: a typo in a STRICT PeerAuthentication
        # or a DENY AuthorizationPolicy must not open what it closed. Not a Service: its last
        # version lists endpoints that are gone (and whose addresses other pods may have now).
        first = rejected.get(key)
        if first is None and key[0] != "Service" and key in previous and previous[key] != chosen[key]:
            chosen[key] = previous[key]
            rejected[key] = Rejection(*key, reason, kept=True)
            return
        reason = first.reason if first else reason
        # No version to keep (never valid, or held in the memory of a replica that has since
        # restarted), or the kept one no longer fits: policies that close something close
        # everything they may cover instead of opening it. Once only: a stand-in that does not
        # fit either (a conflict with another object) leaves the object out.
        stand_in = _stand_in(key, chosen[key]) if first is None or first.kept else None
        if stand_in is not None:
            chosen[key] = stand_in
            rejected[key] = Rejection(*key, reason, fail_closed=True)
        else:
            del chosen[key]
            rejected[key] = Rejection(*key, reason)

    for key, doc in units:
        known = screening.invalid.get(key)
        if known is not None and known[0] == doc:
            reject(key, known[1])
    invalid: dict[ObjectKey, tuple[dict, str]] = {}
    for _ in range(ROUNDS):
        candidate = _join(discovered, chosen) if rejected else list(discovered)
        try:
            snapshot = build(files, candidate, registrations, generation, cache)
        except ConfigError as exc:
            if any(e.file not in labels for e in exc.diagnostics):
                raise
            found: dict[str, list[Diagnostic]] = {}
            for error in exc.diagnostics:
                found.setdefault(error.file, []).append(error)
            for name, errors in found.items():
                key = labels[name]
                doc = chosen[key]
                reason = _reason(key, errors)
                if key not in rejected and _invalid_alone(key, doc):
                    invalid[key] = (doc, reason)
                reject(key, reason)
            continue
        screening.in_force = candidate
        screening.invalid = {k: v for k, v in screening.invalid.items() if k in rejected} | invalid
        return snapshot, list(rejected.values())
    raise ConfigError([Diagnostic(DISCOVERY_SOURCE, 0, 0, f"still invalid after taking out {len(rejected)} objects")])
