"""What every mnistjobs process shares about itself: when it started, the startup trace, a fast
exit, and work done in a forked child while the process goes on (``fork_call``).

Standard library only: the CLI, the sweep driver and the trial workers import it first.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

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


class ChildFailed(Exception):
    """One of the expected errors of a :func:`fork_call` child: its message (``str``) and the
    name of its type (``kind``)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def single_threaded() -> bool:
    """True when this process runs one thread only, counted by the OS (/proc/self/task: C
    libraries' threads too, e.g. torch's OpenMP pool), so that a fork cannot copy a lock another
    thread holds. Where there is no /proc: one Python thread and no torch imported."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # pragma: no cover - no /proc (macOS)
        return threading.active_count() == 1 and "torch" not in sys.modules


def fork_call(fn: Callable[[], Any], expected: tuple[type[BaseException], ...] = ()) -> Callable[[], Any]:
    """Run ``fn()`` in a forked child process while this one goes on (on a machine with two cores,
    really at once: `mnistjobs submit` imports torch and steps the schedules there while it imports
    Ray's and MLflow's clients here). Returns ``result()``, which waits for the child and returns
    ``fn``'s value (sent back as JSON), raises :class:`ChildFailed` for an exception of the
    ``expected`` types, and RuntimeError with the child's traceback for any other (or when the
    child died without an answer); ``result.in_child`` says whether it was forked.

    A child forked from a process with other threads can hang on a lock one of them held (torch's
    thread pool does this), so ``fn`` is forked only while this process is :func:`single_threaded`
    (a CLI command before it imported torch); otherwise, or where there is no fork, it runs here, at
    once, with the same result."""
    import json
    import traceback

    def answer() -> str:
        """``fn``'s outcome as the JSON text the child sends back (made here in either case)."""
        try:
            payload = {"value": fn()}
        except expected as exc:
            payload = {"failed": str(exc), "kind": type(exc).__name__}
        except BaseException:  # noqa: BLE001 - a bug: the parent raises it with the traceback
            payload = {"crashed": traceback.format_exc()}
        try:
            return json.dumps(payload)
        except (TypeError, ValueError) as exc:  # a value JSON cannot carry
            return json.dumps({"crashed": f"fork_call: {fn!r} returned what JSON cannot carry: {exc}"})

    def settle(payload: dict[str, Any]) -> Any:
        if "failed" in payload:
            raise ChildFailed(payload["failed"], payload["kind"])
        if "crashed" in payload:
            raise RuntimeError(f"the checking process failed:\n{payload['crashed']}")
        return payload["value"]

    if not hasattr(os, "fork") or not single_threaded():
        text = answer()

        def here() -> Any:
            return settle(json.loads(text))

        here.in_child = False
        return here
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        stream.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then end without the parent's exit handlers
        os.close(read_end)
        status = 0
        text = answer()
        try:
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(text)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        except BaseException:  # noqa: BLE001 - the parent sees no answer and says so
            status = 1
        os._exit(status)
    os.close(write_end)

    def result() -> Any:
        with os.fdopen(read_end) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            raise RuntimeError(f"the checking process (pid {pid}) ended without an answer "
                               f"(wait status {status})")
        return settle(json.loads(text))

    result.in_child = True
    return result
