"""`account`: customer accounts, which the scheduler checks before it schedules a delivery.

    GET /api/accounts/{id}   -> 200 {"accountId", "status": "active"}
                             -> 403 {"accountId", "status": "suspended"} for a suspended account:
                                a non-transient failure, which the scheduler compensates

Suspended: the ids given with `--suspended` (comma-separated) and every id that starts with
`suspended`. Only the scheduler may call this service (an AuthorizationPolicy says so); the
caller's verified identity arrives in `x-meshproxy-client-id` and is logged.
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from meshproxy.demo.common import Settings, base_app

log = logging.getLogger("meshproxy.demo")
SUSPENDED = web.AppKey("suspended", frozenset)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suspended", default="acct-0013",
                        help="comma-separated ids of suspended accounts (besides 'suspended*')")


def is_suspended(account_id: str, suspended: frozenset) -> bool:
    """True when the account may not schedule deliveries."""
    return account_id in suspended or account_id.startswith("suspended")


async def get_account(request: web.Request) -> web.Response:
    account_id = request.match_info["id"]
    caller = request.headers.get("x-meshproxy-client-id")
    if caller:
        log.info("account %s checked by %s", account_id, caller)
    if is_suspended(account_id, request.app[SUSPENDED]):
        return web.json_response({"accountId": account_id, "status": "suspended",
                                  "error": f"account {account_id} is suspended"}, status=403)
    return web.json_response({"accountId": account_id, "status": "active"})


def build_app(settings: Settings, args: argparse.Namespace) -> web.Application:
    """Return the account app."""
    app = base_app(settings)
    app[SUSPENDED] = frozenset(s.strip() for s in args.suspended.split(",") if s.strip())
    app.router.add_get("/api/accounts/{id}", get_account)
    return app
