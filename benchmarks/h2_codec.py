#!/usr/bin/env python3
"""CPU cost of two HTTP/2 codecs, in memory: `h2` (pure Python) and `ngh2` (libnghttp2).

For each codec a client connection and a server connection of the same library talk to each
other through plain byte strings: no sockets, no event loop, no threads. Every call the
application would make (submit headers/data/trailers, feed received bytes, read events, hand
back flow-control credit, collect bytes to send) is made by this script, and the CPU time of
each side is summed separately with time.process_time(), after a warm-up on the same
connection. Both sides run the receive windows by hand (h2 always does; ngh2 with
auto_window_update=False): credit goes back only when the receiver has consumed the data,
which is how a proxy with back-pressure has to drive them. Each side advertises a 1 MiB
stream window (SETTINGS_INITIAL_WINDOW_SIZE) and opens its connection window to 16 MiB.
Header validation is left at each library's default (on).

Scenarios (one connection each, reused for every call of a round):

  unary  a gRPC-shaped unary call: request HEADERS (:method POST, :scheme http,
         :path /pkg.Service/Method, :authority, content-type application/grpc, te trailers,
         grpc-timeout), one 100-byte DATA with END_STREAM; response HEADERS (:status 200,
         content-type), one 100-byte DATA, trailers (grpc-status 0, grpc-message).
         --inflight calls are submitted before the server answers any of them.
  get    GET with END_STREAM on the request HEADERS; response :status 200, content-type,
         content-length and one 1 KiB DATA with END_STREAM. Same batching.
  bulk   --bulk-mib MiB of DATA on one stream, server to client, in 16 KiB frames; the
         client returns credit as it consumes each DATA event. Reported as MB/s of CPU
         time per side (10^6 bytes per CPU second).

Codecs are measured side by side: each round runs every codec in turn (the order alternates
between rounds), so a change in machine load touches both. The table gives the median over
rounds with min-max, and the ratio between the codecs computed within each round
(h2/ngh2 for µs per call, ngh2/h2 for MB/s).

Run it (needs only the codecs; it does not import meshproxy):

    python -m pip install h2 ngh2
    python benchmarks/h2_codec.py                          # both codecs, 7 rounds
    python benchmarks/h2_codec.py --codecs ngh2 --calls 20000 --rounds 3
    python benchmarks/h2_codec.py --scenarios unary,get --out /tmp/h2codec.json

A codec that is not installed is reported as "not installed" and the others still run.
Exit status: 0 when every requested codec that is installed produced numbers, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pkg.Service/Method"),
    (b":authority", b"backend.default.svc.cluster.local:8080"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"1S"),
]
GRPC_RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
GRPC_TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]
GRPC_BODY = b"q" * 100
GRPC_REPLY = b"r" * 100

GET_REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":path", b"/index.html"),
    (b":authority", b"backend.default.svc.cluster.local:8080"),
    (b"user-agent", b"meshproxy-bench/1"),
    (b"accept", b"*/*"),
]
GET_BODY = b"g" * 1024
GET_RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"text/html"),
    (b"content-length", str(len(GET_BODY)).encode()),
]

FRAME = 16_384          # DATA frame payload for bulk (the default MAX_FRAME_SIZE)
STREAM_WINDOW = 1 << 20  # INITIAL_WINDOW_SIZE each side advertises
CONN_WINDOW = 16 << 20   # connection receive window each side opens to


class Timer:
    """Accumulates process CPU time per side."""

    __slots__ = ("client", "server")

    def __init__(self) -> None:
        self.client = 0.0
        self.server = 0.0


# --------------------------------------------------------------------------------------------
# h2


class H2Codec:
    name = "h2"

    def __init__(self) -> None:
        import h2  # ImportError here means "not installed"
        import h2.config
        import h2.connection
        import h2.events
        import h2.settings

        self.version = h2.__version__
        self._h2 = h2

    def _conn(self, client: bool):
        cfg = self._h2.config.H2Configuration(client_side=client, header_encoding=None)
        return self._h2.connection.H2Connection(config=cfg)

    def _pair(self):
        from h2.settings import SettingCodes

        c, s = self._conn(True), self._conn(False)
        for conn in (c, s):
            conn.initiate_connection()
            conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
            conn.increment_flow_control_window(CONN_WINDOW - 65_535)
        for _ in range(3):
            s.receive_data(c.data_to_send())
            c.receive_data(s.data_to_send())
        return c, s

    def unary_like(self, request, body, response, reply, trailers):
        """Returns run(n_calls, inflight, timer) -> number of completed calls."""
        ev = self._h2.events
        c, s = self._pair()
        pc = time.process_time

        def run(n: int, inflight: int, t: Timer) -> int:
            done = 0
            while done < n:
                k = min(inflight, n - done)
                # client: submit k requests
                t0 = pc()
                for _ in range(k):
                    sid = c.get_next_available_stream_id()
                    if body is None:
                        c.send_headers(sid, request, end_stream=True)
                    else:
                        c.send_headers(sid, request)
                        c.send_data(sid, body, end_stream=True)
                out = c.data_to_send()
                t1 = pc()
                # server: parse, answer
                for e in s.receive_data(out):
                    if isinstance(e, ev.DataReceived):
                        s.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, ev.StreamEnded):
                        sid = e.stream_id
                        if trailers is None:
                            s.send_headers(sid, response)
                            s.send_data(sid, reply, end_stream=True)
                        else:
                            s.send_headers(sid, response)
                            s.send_data(sid, reply)
                            s.send_headers(sid, trailers, end_stream=True)
                out = s.data_to_send()
                t2 = pc()
                # client: parse responses, give back credit
                for e in c.receive_data(out):
                    if isinstance(e, ev.DataReceived):
                        c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, ev.StreamEnded):
                        done += 1
                out = c.data_to_send()
                t3 = pc()
                if out:
                    s.receive_data(out)
                t4 = pc()
                t.client += (t1 - t0) + (t3 - t2)
                t.server += (t2 - t1) + (t4 - t3)
            return done

        return run

    def bulk(self, total: int, t: Timer) -> int:
        ev = self._h2.events
        c, s = self._pair()
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, GET_REQUEST, end_stream=True)
        s.receive_data(c.data_to_send())
        s.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
        chunk = memoryview(b"b" * FRAME)
        pc = time.process_time
        sent = received = 0
        ended = False
        while not ended:
            t0 = pc()
            window = s.local_flow_control_window(sid)
            while window > 0 and sent < total:
                n = min(FRAME, window, total - sent)
                sent += n
                s.send_data(sid, chunk[:n], end_stream=sent == total)
                window -= n
            out = s.data_to_send()
            t1 = pc()
            for e in c.receive_data(out):
                if isinstance(e, ev.DataReceived):
                    received += len(e.data)
                    c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, ev.StreamEnded):
                    ended = True
            out = c.data_to_send()
            t2 = pc()
            s.receive_data(out)
            t3 = pc()
            t.server += (t1 - t0) + (t3 - t2)
            t.client += t2 - t1
        return received


# --------------------------------------------------------------------------------------------
# ngh2


class Ngh2Codec:
    name = "ngh2"

    def __init__(self) -> None:
        import ngh2

        self.version = ngh2.__version__
        self._n = ngh2

    def _pair(self):
        n = self._n
        cfg = n.Configuration(auto_window_update=False)
        c = n.Connection(n.Role.CLIENT, cfg)
        s = n.Connection(n.Role.SERVER, cfg)
        for conn in (c, s):
            conn.initiate_connection({n.Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
            conn.set_local_window_size(CONN_WINDOW)
        for _ in range(3):
            s.receive_data(c.data_to_send())
            c.receive_data(s.data_to_send())
        c.events()
        s.events()
        return c, s

    def unary_like(self, request, body, response, reply, trailers):
        n = self._n
        RequestReceived, DataReceived, StreamClosed = n.RequestReceived, n.DataReceived, n.StreamClosed
        c, s = self._pair()
        pc = time.process_time

        def answer(sid: int) -> None:
            if trailers is None:
                s.send_response(sid, response)
                s.send_data(sid, reply, end_stream=True)
            else:
                s.send_response(sid, response)
                s.send_data(sid, reply)
                s.send_trailers(sid, trailers)

        def run(count: int, inflight: int, t: Timer) -> int:
            done = 0
            while done < count:
                k = min(inflight, count - done)
                t0 = pc()
                for _ in range(k):
                    if body is None:
                        c.send_request(request, end_stream=True)
                    else:
                        sid = c.send_request(request)
                        c.send_data(sid, body, end_stream=True)
                out = c.data_to_send()
                t1 = pc()
                s.receive_data(out)
                for e in s.events():
                    if isinstance(e, DataReceived):
                        if e.data:
                            s.acknowledge_received_data(len(e.data), e.stream_id)
                        if e.end_stream:
                            answer(e.stream_id)
                    elif isinstance(e, RequestReceived) and e.end_stream:
                        answer(e.stream_id)
                out = s.data_to_send()
                t2 = pc()
                c.receive_data(out)
                for e in c.events():
                    if isinstance(e, DataReceived):
                        if e.data:
                            c.acknowledge_received_data(len(e.data), e.stream_id)
                    elif isinstance(e, StreamClosed):
                        done += 1
                out = c.data_to_send()
                t3 = pc()
                if out:
                    s.receive_data(out)
                s.events()
                t4 = pc()
                t.client += (t1 - t0) + (t3 - t2)
                t.server += (t2 - t1) + (t4 - t3)
            return done

        return run

    def bulk(self, total: int, t: Timer) -> int:
        n = self._n
        c, s = self._pair()
        sid = c.send_request(GET_REQUEST, end_stream=True)
        s.receive_data(c.data_to_send())
        s.events()
        s.send_response(sid, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
        chunk = memoryview(b"b" * FRAME)
        DataReceived, StreamClosed = n.DataReceived, n.StreamClosed
        pc = time.process_time
        sent = received = 0
        ended = False
        while not ended:
            t0 = pc()
            # like the h2 loop: submit what the peer's windows allow now, then flush
            budget = min(s.remote_window_size, s.stream_remote_window_size(sid))
            budget -= s.queued_body_size(sid)
            while sent < total and budget > 0:
                k = min(FRAME, total - sent, budget)
                budget -= k
                sent += k
                s.send_data(sid, chunk[:k], end_stream=sent == total)
            out = s.data_to_send()
            t1 = pc()
            c.receive_data(out)
            for e in c.events():
                if isinstance(e, DataReceived):
                    if e.data:
                        received += len(e.data)
                        c.acknowledge_received_data(len(e.data), e.stream_id)
                elif isinstance(e, StreamClosed):
                    ended = True
            out = c.data_to_send()
            t2 = pc()
            s.receive_data(out)
            s.events()
            t3 = pc()
            t.server += (t1 - t0) + (t3 - t2)
            t.client += t2 - t1
        return received


CODECS: dict[str, Callable[[], Any]] = {"h2": H2Codec, "ngh2": Ngh2Codec}
SCENARIOS = ("unary", "get", "bulk")


# --------------------------------------------------------------------------------------------
# measurement


def measure(codec, scenario: str, args) -> dict:
    gc.collect()
    if scenario == "bulk":
        total = args.bulk_mib << 20
        codec.bulk(min(total, 4 << 20), Timer())       # warm-up on its own connection
        gc.collect()
        t = Timer()
        got = codec.bulk(total, t)
        if got != total:
            raise RuntimeError(f"bulk: received {got} of {total} bytes")
        mb = total / 1e6
        return {
            "bytes": total,
            "client_s": t.client,
            "server_s": t.server,
            "client_MBps": mb / t.client,
            "server_MBps": mb / t.server,
            "both_MBps": mb / (t.client + t.server),
        }
    if scenario == "unary":
        run = codec.unary_like(GRPC_REQUEST, GRPC_BODY, GRPC_RESPONSE, GRPC_REPLY, GRPC_TRAILERS)
    else:
        run = codec.unary_like(GET_REQUEST, None, GET_RESPONSE, GET_BODY, None)
    run(max(args.calls // 10, args.inflight * 4), args.inflight, Timer())   # warm-up
    gc.collect()
    t = Timer()
    done = run(args.calls, args.inflight, t)
    if done != args.calls:
        raise RuntimeError(f"{scenario}: {done} of {args.calls} calls completed")
    return {
        "calls": done,
        "client_us": t.client / done * 1e6,
        "server_us": t.server / done * 1e6,
        "both_us": (t.client + t.server) / done * 1e6,
    }


def machine_note() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        time.process_time()
    timer_us = (time.perf_counter() - t0) / n * 1e6
    return {
        "timer_call_us": round(timer_us, 3),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_start": load,
    }


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


KEYS = {"unary": ("client_us", "server_us"), "get": ("client_us", "server_us"),
        "bulk": ("client_MBps", "server_MBps", "both_MBps")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", default="h2,ngh2", help="comma-separated: h2,ngh2 (default both)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated: unary,get,bulk (default all)")
    p.add_argument("--calls", type=int, default=5000,
                   help="measured calls per round for unary and get (default 5000)")
    p.add_argument("--inflight", type=int, default=16,
                   help="calls submitted before the server answers, 1-100 (default 16)")
    p.add_argument("--bulk-mib", type=int, default=64, help="MiB moved in bulk (default 64)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)

    wanted = [c.strip() for c in args.codecs.split(",") if c.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in wanted:
        if name not in CODECS:
            p.error(f"unknown codec {name!r} (choose from {', '.join(CODECS)})")
    if not 1 <= args.inflight <= 100:   # 100 = both codecs' default MAX_CONCURRENT_STREAMS
        p.error("--inflight must be between 1 and 100")
    if args.calls < 1 or args.rounds < 1 or args.bulk_mib < 1:
        p.error("--calls, --rounds and --bulk-mib must be positive")
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r} (choose from {', '.join(SCENARIOS)})")

    codecs, status = [], {}
    for name in wanted:
        try:
            codec = CODECS[name]()
        except ImportError as e:
            status[name] = {"installed": False, "error": str(e)}
            print(f"{name}: not installed ({e})", file=sys.stderr)
            continue
        status[name] = {"installed": True, "version": codec.version}
        codecs.append(codec)

    machine = machine_note()
    rounds: dict[str, dict[str, list[dict]]] = {c.name: {s: [] for s in scenarios} for c in codecs}
    failed = False
    started = time.monotonic()
    for r in range(args.rounds):
        order = codecs if r % 2 == 0 else codecs[::-1]
        for scenario in scenarios:
            for codec in order:
                try:
                    rounds[codec.name][scenario].append(measure(codec, scenario, args))
                except Exception as e:  # a codec failing must not hide the others
                    failed = True
                    status[codec.name].setdefault("errors", []).append(f"{scenario}: {e!r}")
        print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)",
              file=sys.stderr)
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    summary: dict[str, Any] = {}
    for name, per in rounds.items():
        summary[name] = {}
        for scenario, rs in per.items():
            if rs:
                summary[name][scenario] = {k: summarize([x[k] for x in rs])
                                           for k in KEYS[scenario]}
    ratios: dict[str, Any] = {}
    if "h2" in rounds and "ngh2" in rounds:
        for scenario in scenarios:
            a, b = rounds["h2"][scenario], rounds["ngh2"][scenario]
            m = min(len(a), len(b))
            if not m:
                continue
            ratios[scenario] = {}
            for k in KEYS[scenario]:
                if k.endswith("us"):   # cost: h2 / ngh2
                    vals = [a[i][k] / b[i][k] for i in range(m)]
                else:                  # throughput: ngh2 / h2
                    vals = [b[i][k] / a[i][k] for i in range(m)]
                ratios[scenario][k] = summarize(vals)

    # ---- table
    def cell(d: dict, fmt: str) -> str:
        return f"{d['median']:{fmt}} ({d['min']:{fmt}}-{d['max']:{fmt}})"

    print()
    print(f"# HTTP/2 codec CPU, in memory: {args.rounds} rounds, {args.calls} calls/round, "
          f"{args.inflight} in flight, bulk {args.bulk_mib} MiB")
    load = machine["loadavg_start"]
    print(f"# {machine['implementation']} {machine['python']}, {machine['cpu']}, "
          f"{machine['cores']} cores, load {', '.join(f'{x:.2f}' for x in load) if load else '?'}")
    print(f"# one process_time() call costs {machine['timer_call_us']:.2f} µs; a batch makes 5, "
          f"shared by --inflight calls (included in the figures)")
    print("# median over rounds (min-max)")
    print()
    header = "| codec | scenario | client | server |\n| --- | --- | --- | --- |"
    print(header)
    for name in wanted:
        if not status[name]["installed"]:
            print(f"| {name} | - | not installed | not installed |")
            continue
        for scenario in scenarios:
            s = summary.get(name, {}).get(scenario)
            if not s:
                print(f"| {name} {status[name]['version']} | {scenario} | failed | failed |")
            elif scenario == "bulk":
                print(f"| {name} {status[name]['version']} | bulk MB/s | "
                      f"{cell(s['client_MBps'], '.0f')} | {cell(s['server_MBps'], '.0f')} |")
            else:
                print(f"| {name} {status[name]['version']} | {scenario} µs/call | "
                      f"{cell(s['client_us'], '.1f')} | {cell(s['server_us'], '.1f')} |")
    if ratios:
        print()
        print("| ratio (per round) | client | server |\n| --- | --- | --- |")
        for scenario, rr in ratios.items():
            label = "bulk: ngh2 / h2 MB/s" if scenario == "bulk" else f"{scenario}: h2 / ngh2 µs"
            keys = KEYS[scenario][:2]
            print(f"| {label} | {cell(rr[keys[0]], '.1f')} | {cell(rr[keys[1]], '.1f')} |")
    for name, st in status.items():
        for err in st.get("errors", []):
            print(f"{name}: {err}", file=sys.stderr)

    if args.out:
        doc = {
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "args": vars(args),
            "machine": machine,
            "codecs": status,
            "summary": summary,
            "ratios": ratios,
            "rounds": rounds,
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nJSON written to {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
