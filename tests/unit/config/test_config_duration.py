"""Gateway API durations to float seconds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.config.duration import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0.0),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h2m3s4ms", 3723.004),
        ("99999ms", 99.999),
        ("1m1m", 120.0),
    ],
)
def test_valid_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "1", "1.5s", "-1s", "1d", "1 s", "s", "100000s", "1h1h1h1h1h", "1S", " 1s", "1s "],
)
def test_invalid_durations(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


_UNITS = {"h": 3600_000, "m": 60_000, "s": 1000, "ms": 1}


@given(st.lists(st.tuples(st.integers(0, 99999), st.sampled_from(list(_UNITS))), min_size=1, max_size=4))
def test_any_valid_combination_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    millis = sum(n * _UNITS[unit] for n, unit in parts)
    assert parse_duration(text) == pytest.approx(millis / 1000)
