"""mypyc against Cython on the request path: µs per call, in-process, same workload.

Builds the sans-I/O modules every request passes through (http1/events, headers, errors,
reader, writer and policy/balancer) into a temporary folder in four ways, then times one
request's work in each, in a fresh interpreter per variant, variants interleaved over rounds:

  pure          CPython 3.11 running the .py source
  mypyc         the same .py source compiled by mypyc (what setup.py builds)
  cython-plain  the same .py source compiled by Cython 3, no declarations
  cython        Cython 3 pure-Python mode: the files in benchmarks/compile_choice_cython/
                (@cython.cclass with C-typed attributes, an events.pxd declaring the heads'
                public attributes, C-typed locals, cfunc/ccall helpers, cimports) laid over
                the same source

    python3 benchmarks/compile_choice.py                       # about 2 minutes on 2 cores
    python3 benchmarks/compile_choice.py --rounds 1 --repeat 5 # quicker, noisier

Needs a C compiler, mypy (for mypyc) and Cython 3: `pip install 'mypy>=1.11' 'Cython>=3'`.
Prints a Markdown table: per workload, the minimum and the median over all repetitions of the
time per call. `--keep DIR` builds in DIR and leaves it there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CYTHON_OVERLAY = Path(__file__).resolve().parent / "compile_choice_cython"
MODULES = [
    "meshproxy/http1/events.py",
    "meshproxy/http1/headers.py",
    "meshproxy/http1/errors.py",
    "meshproxy/http1/reader.py",
    "meshproxy/http1/response_reader.py",
    "meshproxy/http1/writer.py",
    "meshproxy/policy/balancer.py",
]
VARIANTS = ["pure", "mypyc", "cython-plain", "cython"]

# A typical keep-alive GET head from an HTTP client library (~300 bytes) and a small answer.
REQUEST = (
    b"GET /api/v1/deliveries/7f3c2a91?include=route&fields=eta HTTP/1.1\r\n"
    b"Host: delivery.default.svc.cluster.local:8080\r\n"
    b"User-Agent: python-requests/2.32.3\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Accept: application/json\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Request-Id: 5b0e7c1d-9a2f-4d3e-8c61-2f4a9e0b7d15\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Date: Mon, 07 Dec 2026 10:00:00 GMT\r\n"
    b"Content-Length: 2\r\n"
    b"\r\n"
    b"ok"
)


def lay_out(variant: str, dest: Path, source: Path) -> None:
    """Copy the modules (and a bare package __init__) into dest/meshproxy for one variant."""
    for package in ("meshproxy", "meshproxy/http1", "meshproxy/policy"):
        (dest / package).mkdir(parents=True, exist_ok=True)
        (dest / package / "__init__.py").write_text('"""(benchmark copy)"""\n')
    for module in MODULES:
        shutil.copy(source / module, dest / module)
    if variant == "cython":
        for path in CYTHON_OVERLAY.rglob("*"):
            if path.suffix in (".py", ".pxd"):
                target = dest / path.relative_to(CYTHON_OVERLAY)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)


def build(variant: str, dest: Path) -> None:
    """Compile the modules in place in dest (nothing to do for pure)."""
    log = dest / "build.log"
    if variant == "mypyc":
        cmd = [sys.executable, "-m", "mypyc", *MODULES]
    elif variant.startswith("cython"):
        script = (
            "from setuptools import setup\n"
            "from Cython.Build import cythonize\n"
            f"setup(name='bench', script_args=['build_ext', '--inplace'], ext_modules=cythonize("
            f"{MODULES!r}, compiler_directives={{'language_level': 3}}, quiet=True))\n"
        )
        cmd = [sys.executable, "-c", script]
    else:
        return
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=dest, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{variant}: build failed, see {log}")


# -- measuring (runs in a child interpreter with the variant's folder first on sys.path) ------

WORKLOADS = [
    "RequestReader.feed (keep-alive GET head)",
    "ResponseReader.feed (200, content-length)",
    "request_head_bytes",
    "response_head_bytes",
    "PeakEWMA pick+start+finish (3 endpoints)",
    "all of the above (one request)",
]


def measure(number: int, repeat: int) -> dict:
    import random
    import time
    import timeit

    import meshproxy.http1.reader as reader_module
    from meshproxy.http1.reader import RequestReader
    try:
        from meshproxy.http1.response_reader import ResponseReader
    except ImportError:  # the Cython snapshot keeps both readers in reader.py
        from meshproxy.http1.reader import ResponseReader  # type: ignore[attr-defined,no-redef]
    from meshproxy.http1.writer import request_head_bytes, response_head_bytes
    from meshproxy.policy.balancer import EndpointLoad, make_balancer

    loaded = {m: sys.modules[m.replace("/", ".")[:-3]].__file__ for m in MODULES
              if m.replace("/", ".")[:-3] in sys.modules}

    requests = RequestReader()
    responses = ResponseReader()
    events = requests.feed(REQUEST)
    head = events[0]
    responses.expect(False)
    response = responses.feed(RESPONSE)[0]
    assert len(events) == 2 and head.method == b"GET", events
    clock = time.monotonic
    endpoints = [EndpointLoad(f"10.0.0.{i}:8080", 0.001, 10.0, clock) for i in range(3)]
    balancer = make_balancer("PeakEWMA", random.Random(7))

    def feed_request() -> None:
        requests.feed(REQUEST)

    def feed_response() -> None:
        responses.expect(False)
        responses.feed(RESPONSE)

    def write_request() -> None:
        request_head_bytes(head, head.target)

    def write_response() -> None:
        response_head_bytes(response, chunked=False, keep_alive=True, client_version="1.1")

    def balance() -> None:
        endpoint = balancer.pick(endpoints)
        endpoint.finish(endpoint.start())

    def one_request() -> None:
        got = requests.feed(REQUEST)[0]
        request_head_bytes(got, got.target)
        endpoint = balancer.pick(endpoints)
        started = endpoint.start()
        responses.expect(False)
        answer = responses.feed(RESPONSE)[0]
        response_head_bytes(answer, chunked=False, keep_alive=True, client_version="1.1")
        endpoint.finish(started)

    results = {}
    for name, fn in zip(WORKLOADS, [feed_request, feed_response, write_request, write_response,
                                    balance, one_request]):
        n = number // 4 if fn is one_request else number
        times = timeit.repeat(fn, number=n, repeat=repeat)
        results[name] = [t / n * 1e6 for t in times]
    return {"loaded": loaded, "compiled": not reader_module.__file__.endswith(".py"),
            "results": results}


def child(dest: str, number: int, repeat: int) -> None:
    sys.path.insert(0, dest)
    print(json.dumps(measure(number, repeat)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each measures every variant once, in turn")
    parser.add_argument("--repeat", type=int, default=7, help="timeit repetitions per round")
    parser.add_argument("--number", type=int, default=20_000, help="calls per repetition")
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout to take modules from")
    parser.add_argument("--keep", type=Path, help="build here and keep it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.number, args.repeat)
        return
    variants = args.variants.split(",")
    top = args.keep or Path(tempfile.mkdtemp(prefix="compile-choice-"))
    try:
        for variant in variants:
            lay_out(variant, top / variant, args.source)
            build(variant, top / variant)
            print(f"built {variant} in {top / variant}", file=sys.stderr)
        samples: dict[str, dict[str, list[float]]] = {
            v: {w: [] for w in WORKLOADS} for v in variants}
        for r in range(args.rounds):
            for variant in variants:
                env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(top / variant),
                     "--number", str(args.number), "--repeat", str(args.repeat)],
                    check=True, capture_output=True, text=True, env=env, cwd=top,
                ).stdout
                got = json.loads(out)
                want_compiled = variant != "pure"
                if got["compiled"] != want_compiled:
                    sys.exit(f"{variant}: loaded {got['loaded']}")
                for w, values in got["results"].items():
                    samples[variant][w].extend(values)
                print(f"round {r + 1}: {variant} done", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(top, ignore_errors=True)
    print(f"µs per call: min / median of {args.rounds} rounds × {args.repeat} repetitions "
          f"× {args.number} calls ({args.number // 4} for the whole request), Python "
          f"{sys.version.split()[0]}\n")
    print("| workload | " + " | ".join(variants) + " |")
    print("| --- | " + " | ".join("---:" for _ in variants) + " |")
    pure = samples.get("pure")
    for w in WORKLOADS:
        cells = []
        for v in variants:
            values = samples[v][w]
            cell = f"{min(values):.2f} / {statistics.median(values):.2f}"
            if pure is not None and v != "pure":
                cell += f" ({statistics.median(pure[w]) / statistics.median(values):.2f}×)"
            cells.append(cell)
        print(f"| {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
