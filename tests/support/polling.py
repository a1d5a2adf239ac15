"""Waiting for a condition in async tests: poll it with a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], Awaitable[bool]], what: str, deadline: float = 20.0) -> None:
    """Await `condition()` every 20 ms until it is true; raise AssertionError naming `what`
    after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not await condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what}")
        await asyncio.sleep(0.02)
