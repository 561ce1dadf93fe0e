"""What every mnistjobs process shares about itself: when it started, the startup trace, and a
fast exit.

Standard library only: the CLI, the sweep driver and the trial workers import it first.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

#: Set (to anything) in the services' environment (`MNISTJOBS_STARTUP_TRACE=1 mnistjobs up`, or in
#: `mnistjobs submit`'s): submit, the driver and the trials print ``[startup] <unix time> <what>``
#: lines, the moments of their startup (bench/service.py and the README's breakdown read them).
TRACE_VAR = "MNISTJOBS_STARTUP_TRACE"


def startup_mark(what: str, at: float | None = None) -> None:
    """One ``[startup]`` line (``at``: that moment, default now) when $MNISTJOBS_STARTUP_TRACE is set."""
    if os.environ.get(TRACE_VAR):
        print(f"[startup] {time.time() if at is None else at:.3f} {what}", flush=True)


def process_started_at() -> float:
    """When this process started (unix time, from /proc; now where there is no /proc). /proc's boot
    time is in whole seconds, so this can be up to a second early; marks taken inside a process
    with :func:`startup_mark` have no such error."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def exit_code(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives: None is 0, an int itself, anything else is printed
    to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def fast_exit(code: object = 0, last_words: str | None = None) -> NoReturn:
    """End the process now with ``code`` (as ``sys.exit`` reads it), without the interpreter's
    teardown of its modules: once torch, MLflow and Ray are imported that teardown takes about a
    second on a small CPU machine (measured: 1.08 s, against 0.04 s here), a second every
    `mnistjobs submit --wait` and every sweep driver (whose Ray job ends when its process does)
    paid at the end.

    What an ordinary exit does that matters still happens, in its order: the non-daemon threads are
    joined and threading's exit hooks run (``threading._shutdown``, as the interpreter calls it),
    then the ``atexit`` functions (``ray.shutdown``, MLflow's flushes, ...), then stdout and stderr
    are flushed. ``last_words``, when given, is printed to stdout after all of that: nothing the
    process runs at exit can print after it. Call it only at the very end of a program's main, never
    in a library function or a test's process."""
    status = exit_code(code)
    shutdown = getattr(threading, "_shutdown", None)
    try:
        if shutdown is not None and threading.current_thread() is threading.main_thread():
            shutdown()
        atexit._run_exitfuncs()
        if last_words is not None:
            print(last_words, flush=True)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(status)
