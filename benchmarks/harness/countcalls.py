"""Run `meshproxy ...` with a profile hook that counts Python calls (used by percall.py).

    COUNTCALLS_OUT=FILE PYTHONPATH=[SRC:]benchmarks python -m harness.countcalls proxy ...

The hook is installed with sys.setprofile (this thread) and threading.setprofile (threads
started later: executor threads, the file watcher) before meshproxy.cli.main() runs, so
every Python frame of the proxy process is seen. It counts

- `call` events per code object: each entry of a Python function, and each resumption of a
  coroutine or generator (a coroutine that awaits twice counts three times);
- `c_call` events per (module, qualified name): calls made *from Python code* to built-in
  functions and methods (PyCFunction). Calls of types, and calls made from C or Cython code
  (uvloop, httptools) to anything, are not `c_call` events.

Signals drive it, so the driver can bracket a batch of requests: SIGUSR1 zeroes the counts,
SIGUSR2 writes them; after either, FILE is (re)written atomically, so the driver deletes it,
sends the signal and waits for it to appear. The hook slows the proxy down many times over:
the counts are exact, its CPU time means nothing. Modules compiled to C extensions (mypyc)
are invisible to it; the dump lists those that are loaded.

With COUNTCALLS_SRC=DIR it refuses to run unless meshproxy is imported from DIR.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

# co_flags of code whose frames are resumed: generator, coroutine, iterable coroutine,
# async generator. Their `call` events include every resumption.
RESUMABLE = 0x20 | 0x80 | 0x100 | 0x200

_calls: dict = {}  # code object -> count
_c_calls: dict = {}  # (module or None, qualified name) -> count


def _hook(frame, event, arg):
    # As little work as possible per event: the proxy runs this millions of times.
    if event == "call":
        code = frame.f_code
        _calls[code] = _calls.get(code, 0) + 1
    elif event == "c_call":
        key = (arg.__module__, arg.__qualname__)
        _c_calls[key] = _c_calls.get(key, 0) + 1


def snapshot(meshproxy_file: str) -> dict:
    """Return the counts so far as JSON-ready data: one row per function."""
    calls = [{"qualname": code.co_qualname, "file": code.co_filename,
              "line": code.co_firstlineno, "resumable": bool(code.co_flags & RESUMABLE),
              "count": count}
             for code, count in list(_calls.items())]
    c_calls = [{"module": module, "qualname": name, "count": count}
               for (module, name), count in list(_c_calls.items())]
    return {"pid": os.getpid(), "meshproxy_file": meshproxy_file,
            "allocated_blocks": sys.getallocatedblocks(),
            "compiled_modules": compiled_modules(),
            "calls": calls, "c_calls": c_calls}


def compiled_modules() -> list[str]:
    """Return the meshproxy modules loaded from C extensions (mypyc, Cython): the profile
    hook sees none of their functions, nor the built-ins they call, so the counts then cover
    the interpreted code only."""
    return sorted(name for name, module in list(sys.modules.items())
                  if name.split(".")[0] == "meshproxy"
                  and str(getattr(module, "__file__", "") or "").endswith((".so", ".pyd")))


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the driver never sees half a file


def main() -> int:
    """Check where meshproxy comes from, install the hook and the signals, run the CLI."""
    out = Path(os.environ["COUNTCALLS_OUT"])
    import meshproxy
    import meshproxy.cli

    where = meshproxy.__file__
    print(f"countcalls: meshproxy imported from {where}", file=sys.stderr, flush=True)
    src = os.environ.get("COUNTCALLS_SRC")
    if src and not Path(where).resolve().is_relative_to(Path(src, "meshproxy").resolve()):
        print(f"countcalls: expected meshproxy from {src}; refusing to run", file=sys.stderr)
        return 3

    def reset(signum, frame):
        _calls.clear()
        _c_calls.clear()
        _write(out, {"reset": True, "pid": os.getpid(), "meshproxy_file": where,
                     "allocated_blocks": sys.getallocatedblocks()})

    def dump(signum, frame):
        _write(out, snapshot(where))

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)
    sys.argv[0] = "meshproxy"
    threading.setprofile(_hook)
    sys.setprofile(_hook)
    try:
        return meshproxy.cli.main()
    finally:
        sys.setprofile(None)


if __name__ == "__main__":
    sys.exit(main())
