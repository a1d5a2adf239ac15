"""The `meshproxy` command: argument parsing only; each subcommand calls its component's run()."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

# Spec §2 defaults; every one can be changed by a flag or a MESHPROXY_* variable.
DEFAULT_PORTS = {
    "outbound_port": 15001,
    "inbound_port": 15006,
    "admin_port": 15000,
    "health_port": 15021,
}


def _env_default(name: str, default):
    """Read MESHPROXY_<NAME> so a sidecar can be configured from its pod environment."""
    value = os.environ.get("MESHPROXY_" + name.upper())
    if value is None:
        return default
    if isinstance(default, int) or default is None and name.endswith("port"):
        try:
            return int(value)
        except ValueError:
            raise SystemExit(f"meshproxy: MESHPROXY_{name.upper()}={value!r} is not a port number")
    return value


def _add_proxy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proxy",
        help="run one sidecar proxy",
        description="Run one sidecar: outbound listener for the local app's calls, inbound "
        "listener for calls to it, admin and health servers.",
    )
    p.add_argument("--service", default=_env_default("service", None),
                   help="the sidecar's own Service (env MESHPROXY_SERVICE)")
    p.add_argument("--namespace", default=_env_default("namespace", "default"))
    p.add_argument("--instance", default=_env_default("instance", None),
                   help="this instance's name, for logs and metrics")
    p.add_argument("--config", nargs="+", metavar="PATH", default=None,
                   help="standalone mode: YAML files or folders to read (no control plane)")
    p.add_argument("--control", metavar="URL", default=_env_default("control", None),
                   help="control-plane URL, e.g. http://127.0.0.1:15010 (env MESHPROXY_CONTROL)")
    for name, port in DEFAULT_PORTS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=_env_default(name, port), metavar="PORT")
    p.add_argument("--app-port", type=int, default=_env_default("app_port", None), metavar="PORT",
                   help="local app port for inbound traffic (default: the original destination port)")
    p.add_argument("--app-host", default=_env_default("app_host", "127.0.0.1"),
                   help="local app host for inbound traffic")
    p.add_argument("--outbound-bind", default=_env_default("outbound_bind", "127.0.0.1"))
    p.add_argument("--inbound-bind", default=_env_default("inbound_bind", "0.0.0.0"))
    p.add_argument("--token-file", default=_env_default("token_file", None), metavar="PATH",
                   help="credential for the control plane's CA (a bootstrap token, or a projected "
                   "ServiceAccount token); with it the sidecar gets a certificate and speaks mTLS "
                   "to meshed peers (env MESHPROXY_TOKEN_FILE)")
    p.add_argument("--service-account", default=_env_default("service_account", None), metavar="NAME",
                   help="the pod's ServiceAccount (set by injection; env MESHPROXY_SERVICE_ACCOUNT): "
                   "a certificate for any other account or namespace is refused")
    p.add_argument("--app-probes", default=_env_default("app_probes", None), metavar="JSON",
                   help="the app's HTTP probes to answer on the health port at /app-health/... "
                   "(set by injection; env MESHPROXY_APP_PROBES)")
    p.add_argument("--default-mtls-mode", default=_env_default("default_mtls_mode", "PERMISSIVE"),
                   choices=["STRICT", "PERMISSIVE", "DISABLE"],
                   help="inbound mTLS mode when no PeerAuthentication or Mesh sets one")
    p.add_argument("--drain-timeout", type=float, default=25.0, metavar="SECONDS",
                   help="how long in-flight requests may take to finish on SIGTERM or /drain")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a client has to send a request head (408 after)")
    p.add_argument("--client-idle-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="idle keep-alive time for client connections")
    p.add_argument("--log-level", default=_env_default("log_level", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", nargs="?", const="-", default=_env_default("access_log", None),
                   metavar="PATH|-",
                   help="write one JSON line per request to PATH, or to stdout with `-` or no "
                   "value (env MESHPROXY_ACCESS_LOG; default off); see docs/observability.md")
    p.add_argument("--transparent", action="store_true",
                   default=_env_flag("transparent"),
                   help="transparent mode (env MESHPROXY_TRANSPARENT=true): connections redirected "
                   "by `meshproxy init` go to their original destination; non-HTTP traffic is "
                   "proxied as TCP")
    p.add_argument("--opaque-ports", default=_env_default("opaque_ports", None), metavar="PORTS",
                   help="ports proxied as TCP without protocol detection, in addition to 25, 587, "
                   "3306, 4444, 5432, 6379, 9300, 11211 (e.g. 8000-8010,9000; env "
                   "MESHPROXY_OPAQUE_PORTS); transparent mode")
    p.add_argument("--detect-timeout", type=float, default=0.1, metavar="SECONDS",
                   help="transparent mode: how long a silent connection waits before it is taken "
                   "for a server-first protocol (TCP)")
    p.add_argument("--pod-ips", metavar="IPS",
                   default=_env_default("pod_ips", None) or _env_default("pod_ip", None),
                   help="the pod's own addresses, comma-separated (e.g. 10.1.2.3,fd00::3; env "
                   "MESHPROXY_POD_IPS, else MESHPROXY_POD_IP; set by injection); transparent "
                   "mode refuses inbound connections sent to any other address")
    p.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio loop")


def _env_flag(name: str) -> bool:
    """A MESHPROXY_<NAME> switch: true for 1, true, yes, on (any case)."""
    value = os.environ.get("MESHPROXY_" + name.upper(), "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _add_control(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "control",
        help="run the control plane",
        description="Watch the configuration (YAML files and folders, and with --kubernetes the "
        "cluster's Services, EndpointSlices, Pods, HTTPRoutes, GRPCRoutes and meshproxy.io resources) and "
        "serve each proxy its view of it. An invalid change is refused and the last valid "
        "configuration stays in force.",
    )
    p.add_argument("--config", nargs="+", metavar="PATH", default=None,
                   help="YAML files or folders (a Mesh's policy files are followed)")
    p.add_argument("--listen", metavar="ADDR", default=None,
                   help="HOST:PORT to serve on (default: the Mesh's controlPlane.listen, "
                   "else 127.0.0.1:15010)")
    p.add_argument("--kubernetes", action="store_true",
                   help="discover Services and policies from the Kubernetes API server")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster)")
    p.add_argument("--ca-dir", default=None, metavar="DIR",
                   help="the CA made by `meshproxy ca init`: sign the proxies' certificates")
    p.add_argument("--tokens-dir", default=None, metavar="DIR",
                   help="bootstrap tokens that prove the proxies' identities (meshproxy up); with "
                   "--kubernetes, projected ServiceAccount tokens are checked by TokenReview")
    p.add_argument("--cert-lifetime", default="24h", metavar="DURATION",
                   help="lifetime of the proxies' certificates (at least 5s; default 24h)")
    p.add_argument("--sidecar-ports", default=None, metavar="FILE",
                   help="JSON list of the sidecars' inbound ports known in advance "
                   "([{\"namespace\", \"service\", \"instance\", \"inbound\"}]; meshproxy up "
                   "writes it): served from the first snapshot, before those sidecars register")
    p.add_argument("--log-level", default=_env_default("log_level", "info"),
                   choices=["debug", "info", "warning", "error"])


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="validate configuration files",
        description="Validate YAML files or folders. Exit 0 with a one-line summary when valid; "
        "exit 1 with one FILE:LINE:COL: message line per error otherwise.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--strict", action="store_true", help="warnings also fail the check")
    p.add_argument("--explain", metavar="REQUEST", default=None,
                   help="show how a request would be routed, e.g. "
                   "'GET http://delivery/api/deliveries/7 -H x-beta:true', or a gRPC call: "
                   "'GRPC [NAMESPACE/]SERVICE/grpc.Service/Method [-H NAME:VALUE]...', e.g. "
                   "'GRPC drone/drone.v1.Tracking/Watch'")


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run a whole mesh on this machine",
        description="Start every meshed instance's command and a sidecar for each, print a table "
        "of instances and ports, stop everything on Ctrl-C or SIGTERM.",
    )
    p.add_argument("mesh_file", nargs="?", default=None, metavar="MESH_FILE")
    p.add_argument("--state-dir", default=None, help="folder for logs and state (default: a temporary one)")


class _VersionAction(argparse.Action):
    """`--version`: the version and the build in force, e.g. `meshproxy 0.1.0 (compiled with
    mypyc: 6 modules)`; worked out only when asked (it imports the compiled modules)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and whether the request path runs compiled, and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from meshproxy.build_info import version_line

        print(version_line())
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `only="proxy"`, of the sidecar's alone: the other
    commands' modules are then not even imported (a sidecar's memory is counted per pod)."""
    parser = argparse.ArgumentParser(prog="meshproxy", description="A service mesh in Python.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only == "proxy":
        _add_proxy(sub)
        return parser
    if only == "wait-ready":  # a classic sidecar's postStart hook: as light as the proxy
        from meshproxy.kube import waitready

        waitready.add_parser(sub)
        return parser
    _add_up(sub)
    _add_control(sub)
    _add_proxy(sub)
    _add_check(sub)
    from meshproxy import stat_cli
    from meshproxy.demo import load as demo_load
    from meshproxy.identity import cli as ca_cli
    from meshproxy.kube import init_cli, inject_cli, waitready, webhook

    stat_cli.add_parser(sub)
    demo_load.add_parser(sub)
    ca_cli.add_parser(sub)
    init_cli.add_parser(sub)
    inject_cli.add_parser(sub)
    webhook.add_parser(sub)
    waitready.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words[:1] in (["proxy"], ["wait-ready"]) else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "proxy":
        from meshproxy.dataplane.process import run_proxy

        return run_proxy(args)
    if args.command == "wait-ready":
        from meshproxy.kube import waitready

        return waitready.run(args)
    if args.command == "control":
        from meshproxy.control.run import run_control

        return run_control(args)
    if args.command == "stat":
        from meshproxy import stat_cli

        return stat_cli.run(args)
    if args.command == "webhook":
        from meshproxy.kube import webhook

        return webhook.run(args)
    if args.command == "inject":
        from meshproxy.kube import inject_cli

        return inject_cli.run(args)
    if args.command == "init":
        from meshproxy.kube import init_cli

        return init_cli.run(args)
    if args.command == "ca":
        from meshproxy.identity import cli as ca_cli

        return ca_cli.run(args)
    if args.command == "demo":
        from meshproxy.demo import load as demo_load

        return demo_load.run(args)
    if args.command == "check":
        from meshproxy.config.check import run_check

        return run_check(args.paths, strict=args.strict, explain=args.explain)
    if args.command == "up":
        from meshproxy.local.up import run_up

        return run_up(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
