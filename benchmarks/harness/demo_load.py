"""Run `meshproxy demo load` and write down every request it makes (soak.py, chaos.py).

    python -m harness.demo_load RECORDS [demo load options: --url --rate --duration ...]

It is `meshproxy demo load` itself (its traffic mix, pacing, progress lines and summary),
with one addition: `demo load` keeps totals only, and the benchmarks need to know *when* each
request failed (chaos.py matches failures against the moments it killed a process), so the
tally's `record` is wrapped to also append one line per request to RECORDS:

    END OPERATION ANSWER MS

END is time.monotonic() when the answer (or the error) came (CLOCK_MONOTONIC is one clock for
every process on Linux, so the driver compares it with its own), OPERATION one of create,
status, update, cancel, ANSWER the status code or the exception's name, MS the latency. The
file is line-buffered, so the driver can read it while the load runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# Operations whose HTTP method is idempotent (RFC 9110 §9.2.2): status GET, update PUT,
# cancel DELETE. create is a POST.
IDEMPOTENT = frozenset({"status", "update", "cancel"})


def read_records(path, offset: int = 0) -> tuple[list[tuple[float, str, str, float]], int]:
    """Return the complete lines of RECORDS from byte `offset` on as (end, operation, answer,
    ms), and the offset after the last complete line."""
    records = []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return records, offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4:
            records.append((float(parts[0]), parts[1], parts[2], float(parts[3])))
    return records, offset + end


def expected(op: str, answer: str) -> bool:
    """True when `answer` is one `demo load` counts as the right one for `op`."""
    from meshproxy.demo.load import EXPECTED

    return answer.isdigit() and int(answer) in EXPECTED.get(op, ())


def start_load(records: Path, log: Path, url: str, rate: float, duration: float, concurrency: int,
               seed: int, cpu: int | None) -> subprocess.Popen:
    """Start the recording load (this interpreter, pinned to `cpu` when given) against `url`;
    its progress and summary go to `log`. Raises OSError when it cannot start."""
    from harness.procs import die_with_parent, pinned

    argv = pinned([sys.executable, "-m", "harness.demo_load", str(records), "--url", url,
                   "--rate", f"{rate:g}", "--duration", f"{duration:g}",
                   "--concurrency", str(concurrency), "--seed", str(seed)], cpu)
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1], preexec_fn=die_with_parent)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    import meshproxy.demo.load as load

    out = open(argv[0], "a", buffering=1)

    class RecordingTally(load.Tally):
        def record(self, op: str, code: int | str, ms: float) -> None:
            super().record(op, code, ms)
            out.write(f"{time.monotonic():.4f} {op} {code} {ms:.1f}\n")

    # drive() makes its Tally by this module-level name: the one place to hook in.
    load.Tally = RecordingTally
    parser = argparse.ArgumentParser(prog="python -m harness.demo_load RECORDS")
    load.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "load", *argv[1:]])
    try:
        return load.run(args)
    finally:
        out.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
