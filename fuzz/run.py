"""Run the fuzz targets, each under atheris in its own subprocess, for a given time.

    python3 fuzz/run.py [--seconds N] [--targets a,b] [--jobs J] [--out DIR] [--fresh]
                        [--timeout S] [--rss-limit-mb M] [--nice K] [--json FILE]

Each target reads its committed seeds (fuzz/corpus/TARGET/) and its working corpus
(OUT/TARGET/corpus/, where libFuzzer adds the inputs that reach new code; it is kept between
runs unless --fresh). An input that raises, runs longer than --timeout seconds or grows the
process past --rss-limit-mb is a finding: libFuzzer writes it to OUT/TARGET/findings/ and the
target is started again for the time left, so one run can collect several. Each run's
libFuzzer output goes to OUT/TARGET/fuzz.log.

Prints per target: executions, coverage (libFuzzer's `cov:`, the edges of meshproxy's Python
code reached, and `ft:`, its finer features), corpus size, time, findings. Exits 1 when there
was a finding (or a target could not run), else 0. `--seconds 0` only replays the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.targets import TARGETS  # noqa: E402 - after the repository is on the path

DRIVER = HERE / "driver.py"
SEEDS = HERE / "corpus"
DICTS = HERE / "dicts"
DEFAULT_OUT = os.environ.get("MESHPROXY_FUZZ_DIR", "/tmp/meshproxy-fuzz")
FINDING_KINDS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", re.M)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


@dataclass
class Finding:
    path: str
    kind: str  # crash, timeout, oom, ...
    message: str  # the exception's last line, or libFuzzer's summary


@dataclass
class Result:
    target: str
    seconds: float = 0.0
    executions: int = 0
    coverage: int = 0  # libFuzzer's cov: edges of instrumented code reached
    features: int = 0  # libFuzzer's ft:
    corpus_inputs: int = 0
    corpus_size: str = "0b"
    peak_rss_mb: int = 0
    starts: int = 0
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None


def _message(output: str, kind: str) -> str:
    """What a finding was: the uncaught exception's last line and where it was raised, or
    libFuzzer's summary line."""
    if kind == "crash":
        at = output.rfind("=== Uncaught Python exception: ===")
        if at >= 0:
            lines = []
            for line in output[at:].splitlines()[1:]:
                if line.startswith("=="):
                    break
                if line.strip():
                    lines.append(line.strip())
            frames = [line for line in lines if line.startswith('File "')]
            # Where in meshproxy (or in the target's checks) it went wrong, rather than the
            # library call it ended in.
            frames = [f for f in frames if "/meshproxy/" in f or "/fuzz/" in f] or frames
            if lines:
                where = re.sub(r'^File "(?:.*/)?([^/"]+)", line (\d+), in (\S+)$', r"\1:\2 in \3",
                               frames[-1]) if frames else ""
                return f"{lines[-1]} ({where})" if where else lines[-1]
    summary = re.findall(r"^SUMMARY: libFuzzer: (.*)$", output, re.M)
    return summary[-1] if summary else kind


def run_target(name: str, args: argparse.Namespace) -> Result:
    """Fuzz one target for args.seconds, restarting it after each finding; return its figures."""
    target = TARGETS[name]
    base = Path(args.out) / name
    corpus, findings, log = base / "corpus", base / "findings", base / "fuzz.log"
    if args.fresh and corpus.exists():
        for old in corpus.iterdir():
            old.unlink()
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    reported: set[str] = set()
    result = Result(name)
    # The target's temporary files (a config file, token files) go here: libFuzzer ends the
    # process from C, so the target's own clean-up at exit never runs.
    scratch = base / "tmp"
    env = dict(os.environ, MESHPROXY_PURE="1", PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(scratch))
    started = time.monotonic()
    deadline = started + args.seconds
    while True:
        remaining = deadline - time.monotonic()
        if result.starts and remaining < 1:
            break
        flags = [
            f"-rss_limit_mb={args.rss_limit_mb}",
            f"-timeout={args.timeout}",
            f"-max_len={target.max_len}",
            f"-artifact_prefix={findings}/",
            "-print_final_stats=1",
        ]
        flags.append(f"-max_total_time={max(1, int(remaining))}" if args.seconds else "-runs=0")
        dictionary = DICTS / f"{name}.dict"
        if dictionary.exists():
            flags.append(f"-dict={dictionary}")
        command = [sys.executable, str(DRIVER), name, *flags, str(corpus), str(SEEDS / name)]
        if args.nice:
            command = ["nice", "-n", str(args.nice), *command]
        result.starts += 1
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        with open(log, "a") as out:
            out.write(f"\n### {' '.join(command)}\n")
            out.flush()
            start = out.tell()
            try:
                proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      cwd=base, timeout=max(remaining, 1) + 2 * args.timeout + 300)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None  # libFuzzer's own -timeout should have ended it: note it and go on
        with open(log, errors="replace") as f:
            f.seek(start)
            output = f.read()
        stats = dict((k, int(v)) for k, v in _STAT.findall(output))
        result.executions += stats.get("number_of_executed_units", 0)
        result.peak_rss_mb = max(result.peak_rss_mb, stats.get("peak_rss_mb", 0))
        status = _STATUS.findall(output)
        if status:
            _, cov, ft, inputs, size = status[-1]
            result.coverage = max(result.coverage, int(cov))
            result.features = max(result.features, int(ft))
            result.corpus_inputs, result.corpus_size = int(inputs), size
        written = re.findall(r"Test unit written to (\S+)", output)
        repeated = False
        for path in written:
            if path in reported:
                repeated = True  # an input of the corpus crashes as it loads: it would again
                continue
            reported.add(path)
            file = os.path.basename(path)
            kind = next((k.rstrip("-") for k in FINDING_KINDS if file.startswith(k)), "finding")
            result.findings.append(Finding(path, kind, _message(output, kind)))
        if code is None:
            result.error = f"did not end in time (see {log})"
            break
        if not written:
            if code != 0:
                result.error = f"exited {code} without a finding (see {log})"
            break
        if repeated or not args.seconds:
            break
    result.seconds = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60,
                        help="how long to fuzz each target (default 60; 0: replay the corpus only)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated targets (default all: {','.join(TARGETS)})")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"working corpora, findings and logs (default {DEFAULT_OUT}, or $MESHPROXY_FUZZ_DIR)")
    parser.add_argument("--fresh", action="store_true", help="start each working corpus empty (seeds only)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (default 10)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048,
                        help="memory one target process may grow to (default 2048)")
    parser.add_argument("--nice", type=int, default=0, help="run the targets this much nicer")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)} (known: {', '.join(TARGETS)})")

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda n: run_target(n, args), names))

    print(f"{'target':<16}{'executions':>12}{'exec/s':>8}{'cov':>7}{'ft':>8}{'corpus':>16}"
          f"{'time':>8}{'rss MB':>8}{'findings':>10}")
    for r in results:
        rate = int(r.executions / r.seconds) if r.seconds else 0
        print(f"{r.target:<16}{r.executions:>12}{rate:>8}{r.coverage:>7}{r.features:>8}"
              f"{f'{r.corpus_inputs}/{r.corpus_size}':>16}{f'{r.seconds:.0f}s':>8}{r.peak_rss_mb:>8}"
              f"{len(r.findings):>10}")
    failed = False
    for r in results:
        # The same bug is found again after each restart: one line per kind and message.
        groups: dict[tuple[str, str], list[Finding]] = {}
        for finding in r.findings:
            groups.setdefault((finding.kind, finding.message), []).append(finding)
        for (kind, message), same in groups.items():
            failed = True
            times = f" ({len(same)} inputs)" if len(same) > 1 else ""
            print(f"{r.target}: {kind}: {message}{times}\n    {same[0].path}")
        if r.error:
            failed = True
            print(f"{r.target}: error: {r.error}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
