"""Gateway API durations (GEP-2257): `250ms`, `2s`, `1m`, `1h30m`, as float seconds."""

from __future__ import annotations

import re

# GEP-2257: one to four <digits><unit> groups, at most five digits each, no sign, no fraction.
DURATION_RE = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_PART_RE = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Return the duration `text` in seconds.

    Raises ValueError when `text` is not a Gateway API duration.
    """
    if not isinstance(text, str) or not DURATION_RE.match(text):
        raise ValueError(f"bad duration {text!r} (expected e.g. 250ms, 2s, 1m, 1h30m)")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART_RE.findall(text))

