"""Model objects to plain JSON data, for the admin `/config` endpoint and the config version.

Field names become the camelCase of the YAML (`backend_refs` -> `backendRefs`); durations stay
float seconds; where a resource was written is `source: "FILE:LINE:COL"`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping

_NAMES = {"from_": "from", "default_rtt": "defaultRTT", "per_try": "perTry"}


def camel(name: str) -> str:
    """Return the YAML spelling of a model field name."""
    if name in _NAMES:
        return _NAMES[name]
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def to_plain(value: Any, with_source: bool = True) -> Any:
    """Return `value` (a model object, mapping, tuple or scalar) as JSON-serialisable data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        api_version = getattr(type(value), "api_version", None)
        if api_version is not None:
            out["apiVersion"] = api_version
            out["kind"] = type(value).kind
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "source":
                if with_source and item is not None:
                    out["source"] = str(item)
                continue
            out[camel(f.name)] = to_plain(item, with_source)
        return out
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, with_source) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_plain(v, with_source) for v in value]
    return value


def content_version(objects: Iterable[Any]) -> str:
    """Return a short hash of `objects`' content: the same for the same configuration, wherever
    and however it was written (comments, file names and positions do not count)."""
    data = json.dumps([to_plain(o, with_source=False) for o in objects], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:12]
