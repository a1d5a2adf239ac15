"""Helpers the targets share."""

from __future__ import annotations

import zlib
from typing import Any, Coroutine


def pieces(data: bytes, count: int = 3) -> list[bytes]:
    """`data` cut at up to `count` points derived from its own checksum: a split that varies
    from input to input yet is the same every time one input is replayed."""
    seed = zlib.crc32(data)
    cuts = set()
    for i in range(count):
        seed = (seed * 1103515245 + 12345 + i) & 0x7FFFFFFF
        cuts.add(seed % (len(data) + 1))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def run_to_completion(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never has to wait (its awaits are answered from memory) without an
    event loop, which would cost more than the code under test; return its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the handler waited for something: the target's fakes must answer at once")


def shape(events: list, head_type: type, head_fields: tuple[str, ...]) -> list:
    """Comparable values of a reader's events: heads (of `head_type`) as their `head_fields`,
    adjacent body pieces joined, anything else (END_OF_MESSAGE, an Upgrade) by value."""
    from meshproxy.http1.events import Upgrade

    out: list = []
    for event in events:
        if isinstance(event, head_type):
            out.append(("head", *(getattr(event, name) for name in head_fields)))
        elif isinstance(event, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += event
            else:
                out.append(event)
        elif isinstance(event, Upgrade):
            out.append(("upgrade", event.rest))
        else:
            out.append(repr(event))
    return out
