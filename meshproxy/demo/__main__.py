"""`python -m meshproxy.demo ROLE [options]`: run one app of the drone-delivery demo.

ROLE is one of ingestion, scheduler, delivery, drone, telemetry, package, account, thirdparty.
Where to listen and how to reach other services come from the environment `meshproxy up` sets
(HOST, PORT, MESHPROXY_SERVICE, MESHPROXY_INSTANCE, MESHPROXY_OUTBOUND) or from the flags.
Every role serves HTTP (aiohttp) on PORT except `telemetry`, which serves gRPC there.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from meshproxy.demo.common import Settings, serve

ROLES = {
    "ingestion": "public REST API: schedule, update and cancel deliveries",
    "scheduler": "runs each delivery's steps; compensates failures",
    "delivery": "delivery status and drone location events",
    "drone": "the fleet: assigns drones, flies them, reports locations",
    "telemetry": "where the drones are, over gRPC (drone.v1.Telemetry)",
    "package": "packages (optionally flaky: --failure-rate)",
    "account": "customer accounts (some suspended)",
    "thirdparty": "an outside courier (not meshed)",
}


def _upstream(text: str) -> tuple[str, str]:
    name, sep, target = text.partition("=")
    if not sep or not name or not target:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    if "://" not in target:
        target = "http://" + target
    return name, target.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser: one subcommand per role, each with the common and its own options."""
    parser = argparse.ArgumentParser(prog="python -m meshproxy.demo",
                                     description="Run one app of the drone-delivery demo.")
    sub = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, summary in ROLES.items():
        p = sub.add_parser(role, help=summary, description=summary)
        p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="env HOST")
        p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")), help="env PORT")
        p.add_argument("--service", default=os.environ.get("MESHPROXY_SERVICE") or role,
                       help="env MESHPROXY_SERVICE")
        p.add_argument("--instance", default=os.environ.get("MESHPROXY_INSTANCE"),
                       help="env MESHPROXY_INSTANCE (default: the service name)")
        p.add_argument("--outbound", default=os.environ.get("MESHPROXY_OUTBOUND") or None,
                       help="the sidecar's outbound URL (env MESHPROXY_OUTBOUND)")
        p.add_argument("--upstream", type=_upstream, action="append", default=[], metavar="NAME=HOST:PORT",
                       help="call service NAME at this address directly, not through the sidecar")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds a call to a service may take")
        importlib.import_module(f"meshproxy.demo.{role}").add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s.%(msecs)03d %(message)s", datefmt="%H:%M:%S")
    settings = Settings(role=args.role, host=args.host, port=args.port, service=args.service,
                        instance=args.instance or args.service, outbound=args.outbound,
                        upstreams=dict(args.upstream), timeout=args.timeout)
    module = importlib.import_module(f"meshproxy.demo.{args.role}")
    if hasattr(module, "run"):  # a role that is not an aiohttp app (gRPC) runs itself
        module.run(settings, args)
        return 0
    serve(module.build_app(settings, args), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
