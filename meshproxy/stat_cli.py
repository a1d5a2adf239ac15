"""`meshproxy stat`: golden metrics per Service, read from the proxies' admin ``/metrics``.

The proxies come from ``--admin HOST:PORT`` (repeatable) or else from the control plane's
``GET /v1/proxies``. Every proxy is scraped twice, ``--window`` seconds apart, all of them
concurrently; ``--window 0`` scrapes once and shows totals since each proxy started. The
arithmetic lives in ``meshproxy.observability.stat``; this module does the HTTP, the
error reporting and the output (a rich table, or JSON with ``-o json``).

A proxy that cannot be reached, or does not answer Prometheus text, is named on stderr and
left out; the command fails (exit 1) only when no proxy could be read at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # aiohttp and rich load only when `stat` runs, not for every command
    import aiohttp



from meshproxy.observability.stat import (
    ProxyWindow,
    Scrape,
    StatRow,
    compute_rows,
    increase,
    parse_scrape,
)

DEFAULT_CONTROL = "http://127.0.0.1:15010"  # spec §2
DEFAULT_WINDOW = 2.0
DEFAULT_TIMEOUT = 5.0


class StatError(Exception):
    """A step of ``meshproxy stat`` failed; the message says what, for stderr."""


@dataclass(frozen=True)
class Target:
    """A proxy to scrape: its admin address, and who it is when the control plane said."""

    admin: str
    service: str | None = None
    instance: str | None = None

    @property
    def metrics_url(self) -> str:
        """Return the URL of the proxy's ``/metrics``."""
        base = self.admin if "://" in self.admin else f"http://{self.admin}"
        return base.rstrip("/") + "/metrics"

    def describe(self) -> str:
        """Return the proxy's name for messages: address, and instance when known."""
        who = "/".join(part for part in (self.service, self.instance) if part)
        return f"{self.admin} ({who})" if who else self.admin


@dataclass(frozen=True)
class _Reading:
    """One scrape of one proxy: its series and when they were read, or why it failed."""

    scrape: Scrape | None
    at: float
    error: str | None = None


def _window_seconds(value: str) -> float:
    """argparse type of ``--window``: a number of seconds, 0 or more."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError("the window must be 0 (totals) or more seconds")
    return seconds


def _timeout_seconds(value: str) -> float:
    """argparse type of ``--timeout``: a positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return seconds


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``stat`` command and its flags; return its parser."""
    p = subparsers.add_parser(
        "stat",
        help="golden metrics per service, read from the proxies",
        description="Requests per second, success rate and p50/p95/p99 latency per Service, "
        "from the proxies' admin /metrics scraped twice --window seconds apart. The proxies "
        "come from --admin, or else from the control plane's proxy list.",
    )
    p.add_argument("--control", metavar="URL", default=DEFAULT_CONTROL,
                   help=f"control-plane URL to list the proxies (default {DEFAULT_CONTROL})")
    p.add_argument("--admin", metavar="HOST:PORT", action="append", default=None,
                   help="a proxy's admin address, instead of the control plane's list "
                   "(repeatable)")
    p.add_argument("--window", type=_window_seconds, default=DEFAULT_WINDOW, metavar="SECONDS",
                   help="time between the two scrapes (default 2); 0 shows totals since "
                   "each proxy started")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table",
                   help="a table, or a JSON list of rows for scripts")
    p.add_argument("--direction", choices=("inbound", "outbound"), default="inbound",
                   help="inbound: what each Service's own sidecars served (default); "
                   "outbound: what callers' sidecars sent to each Service")
    p.add_argument("--timeout", type=_timeout_seconds, default=DEFAULT_TIMEOUT,
                   metavar="SECONDS", help="how long each HTTP request may take (default 5)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``meshproxy stat`` with parsed ``args``; return the exit code (0, or 1 when no
    proxy could be read)."""
    return asyncio.run(run_async(args))


async def run_async(args: argparse.Namespace) -> int:
    """``run`` inside a running event loop; return the exit code."""
    import aiohttp

    err = sys.stderr
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if args.admin:
            targets = [Target(admin) for admin in dict.fromkeys(args.admin)]
        else:
            try:
                targets = await list_proxies(session, args.control, err)
            except StatError as exc:
                _complain(err, str(exc))
                return 1
            if not targets:
                _complain(err, f"the control plane at {args.control} lists no proxies")
                return 1
        windows = await _measure(session, targets, args.window, err)
    if not windows:
        _complain(err, "no proxy could be read")
        return 1
    rows = compute_rows(windows, args.direction)
    if args.output == "json":
        print(json.dumps([row.to_json() for row in rows], indent=2), file=sys.stdout)
    else:
        print_table(rows, args.direction, args.window, sys.stdout)
    return 0


async def list_proxies(session: aiohttp.ClientSession, control: str, err: TextIO
                       ) -> list[Target]:
    """Return the proxies the control plane lists (``GET {control}/v1/proxies``).

    Entries without an admin address are named on ``err`` and left out. Raises StatError
    when the control plane cannot be reached or its answer is not the documented shape.
    """
    import aiohttp

    url = control.rstrip("/") + "/v1/proxies"
    try:
        async with session.get(url) as response:
            if response.status != 200:
                raise StatError(f"{url}: HTTP {response.status}")
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise StatError(f"cannot reach the control plane at {url}: {_reason(exc)}") from None
    except ValueError as exc:
        raise StatError(f"{url}: the answer is not JSON: {exc}") from None
    proxies = body.get("proxies") if isinstance(body, dict) else None
    if not isinstance(proxies, list):
        raise StatError(f'{url}: the answer has no "proxies" list')
    targets: dict[str, Target] = {}
    for entry in proxies:
        if not isinstance(entry, dict):
            continue
        admin = entry.get("admin")
        service = entry.get("service") if isinstance(entry.get("service"), str) else None
        instance = entry.get("instance") if isinstance(entry.get("instance"), str) else None
        if not isinstance(admin, str) or not admin:
            who = "/".join(part for part in (service, instance) if part) or "a proxy"
            _complain(err, f"{who}: the control plane knows no admin address; skipped")
            continue
        targets.setdefault(admin, Target(admin, service, instance))
    return list(targets.values())


async def _measure(session: aiohttp.ClientSession, targets: Sequence[Target],
                   window: float, err: TextIO) -> list[ProxyWindow]:
    """Scrape every target (twice, ``window`` seconds apart, unless ``window`` is 0) and
    return what each readable proxy counted; name every unreadable one on ``err``."""
    failed: set[int] = set()
    first: list[_Reading] | None = None
    if window > 0:
        first = await _scrape_all(session, targets)
        for index, reading in enumerate(first):
            if reading.error is not None:
                failed.add(index)
                _complain(err, f"{targets[index].describe()}: {reading.error}; skipped")
        if len(failed) == len(targets):
            return []
        await asyncio.sleep(window)
    second = await _scrape_all(session, targets)
    windows = []
    for index, reading in enumerate(second):
        if index in failed:
            continue
        if reading.error is not None:
            _complain(err, f"{targets[index].describe()}: {reading.error}; skipped")
            continue
        if first is None:
            windows.append(ProxyWindow(reading.scrape, None, targets[index].service))
        else:
            before = first[index]
            windows.append(ProxyWindow(increase(before.scrape, reading.scrape),
                                       reading.at - before.at, targets[index].service))
    return windows


async def _scrape_all(session: aiohttp.ClientSession, targets: Sequence[Target]
                      ) -> list[_Reading]:
    """Return one reading per target, in order, all fetched concurrently."""
    return list(await asyncio.gather(*(_scrape(session, target) for target in targets)))


async def _scrape(session: aiohttp.ClientSession, target: Target) -> _Reading:
    """Return the target's parsed ``/metrics``, or the reason it could not be read."""
    import aiohttp

    try:
        async with session.get(target.metrics_url) as response:
            if response.status != 200:
                return _Reading(None, time.monotonic(), f"/metrics answered HTTP {response.status}")
            text = await response.text()
        # The window is measured from when each answer arrived, not from when the
        # scrapes were sent, so a slow proxy's rate is not diluted.
        at = time.monotonic()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return _Reading(None, time.monotonic(), f"unreachable: {_reason(exc)}")
    try:
        return _Reading(parse_scrape(text), at)
    except ValueError as exc:
        return _Reading(None, at, f"/metrics is not Prometheus text: {exc}")


def print_table(rows: Sequence[StatRow], direction: str, window: float, out: TextIO) -> None:
    """Write ``rows`` to ``out`` as a table titled with the direction and the window."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    span = f"last {window:g}s" if window > 0 else "since each proxy started"
    table = Table(title=f"{direction}, {span}", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    table.add_column("SERVICE", no_wrap=True)
    table.add_column("INSTANCES", justify="right")
    table.add_column("SUCCESS", justify="right")
    table.add_column("RPS", justify="right")
    table.add_column("P50", justify="right")
    table.add_column("P95", justify="right")
    table.add_column("P99", justify="right")
    table.add_column("REQUESTS", justify="right")
    for row in rows:
        table.add_row(
            row.service,
            str(row.instances),
            "-" if row.success_rate is None else f"{row.success_rate * 100:.2f}%",
            "-" if row.rps is None else f"{row.rps:.2f}",
            _format_ms(row.p50_ms),
            _format_ms(row.p95_ms),
            _format_ms(row.p99_ms),
            str(row.requests),
        )
    # Piped output (grep, watch) is not wrapped at 80 columns.
    width = None if getattr(out, "isatty", lambda: False)() else 200
    Console(file=out, width=width, highlight=False).print(table)
    if not rows:
        print(f"no {direction} requests recorded", file=out)


def _format_ms(value: float | None) -> str:
    """Return a latency for the table: ``-`` when undefined, fewer decimals as it grows."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}ms"
    if value < 100:
        return f"{value:.1f}ms"
    return f"{value:.0f}ms"


def _reason(exc: BaseException) -> str:
    """Return an exception as a short reason; a timeout's message is empty."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _complain(err: TextIO, message: str) -> None:
    """Write one line for the user on ``err``."""
    print(f"meshproxy stat: {message}", file=err)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as ``meshproxy stat``'s flags and run it; return the exit code."""
    parser = argparse.ArgumentParser(prog="meshproxy")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return run(parser.parse_args(["stat", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
