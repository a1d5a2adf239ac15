"""The app's HTTP probes, answered on the health port (spec §7).

Injection rewrites each app container's httpGet liveness, readiness and startup probes to
`GET :15021/app-health/CONTAINER/livez|readyz|startupz` and hands the originals to the sidecar
in `MESHPROXY_APP_PROBES` (JSON: path -> {"port", "path", "scheme", "timeoutSeconds",
"headers": [[name, value], ...]}). The kubelet's plaintext probe then never meets a STRICT
inbound; the sidecar makes the original request to the app over loopback, as the kubelet
would have: any status from 200 to 399 is success (answered 200), anything else or no answer
in time is failure (answered 503). Like the kubelet, an HTTPS probe does not verify the app's
certificate.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass

from meshproxy.localhttp import Reply

DEFAULT_TIMEOUT = 1.0  # the kubelet's default timeoutSeconds


@dataclass(frozen=True)
class AppProbe:
    """One original probe of the app."""

    port: int
    path: str = "/"
    scheme: str = "HTTP"
    timeout: float = DEFAULT_TIMEOUT
    headers: tuple[tuple[str, str], ...] = ()


def parse_app_probes(text: str | None) -> dict[bytes, AppProbe]:
    """Return {health-port path: probe} from MESHPROXY_APP_PROBES; raises ValueError when the
    JSON is malformed (the sidecar then refuses to start rather than fail the pod's probes)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
        probes = {}
        for path, spec in data.items():
            if not path.startswith("/app-health/"):
                raise ValueError(f"probe path {path!r} is not under /app-health/")
            probes[path.encode()] = AppProbe(
                port=int(spec["port"]), path=str(spec.get("path") or "/"),
                scheme=str(spec.get("scheme") or "HTTP").upper(),
                timeout=float(spec.get("timeoutSeconds") or DEFAULT_TIMEOUT),
                headers=tuple((str(n), str(v)) for n, v in spec.get("headers") or ()),
            )
        return probes
    except (AttributeError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"MESHPROXY_APP_PROBES: {exc}") from None


def _insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def run_probe(probe: AppProbe, host: str = "127.0.0.1") -> Reply:
    """Make the app's original probe request; return the answer for the kubelet."""
    request = [f"GET {probe.path} HTTP/1.1", f"Host: {host}:{probe.port}", "User-Agent: kube-probe/meshproxy",
               "Accept: */*", "Connection: close"]
    request += [f"{name}: {value}" for name, value in probe.headers]
    tls = _insecure_context() if probe.scheme == "HTTPS" else None
    writer = None
    try:
        async with asyncio.timeout(probe.timeout):
            reader, writer = await asyncio.open_connection(host, probe.port, ssl=tls)
            writer.write(("\r\n".join(request) + "\r\n\r\n").encode("latin-1"))
            status_line = await reader.readline()
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Reply(503, f"app probe failed: {exc.__class__.__name__}\n".encode())
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return Reply(503, b"app probe failed: not an HTTP answer\n")
    status = int(parts[1])
    if 200 <= status < 400:
        return Reply(200, f"app answered {status}\n".encode())
    return Reply(503, f"app answered {status}\n".encode())
