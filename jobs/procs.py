"""Finding and stopping processes, through psutil.

A service set marks every process it starts with an environment variable
(``MNISTJOBS_SERVICE_ID=<id>``); Ray hands its environment down to its workers and job drivers.
``marked_pids`` finds the processes that carry the mark and their descendants (Ray's agents,
which do not), ``terminate`` stops a set of them: SIGTERM, a grace period, then SIGKILL.
A zombie (exited, not yet reaped by its parent) counts as gone.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable

import psutil

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
_NO_ACCESS = (psutil.NoSuchProcess, psutil.AccessDenied)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() not in _GONE
    except _NO_ACCESS:
        return False


def pid_alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def cmdline(pid: int) -> list[str]:
    """A process's command line ([] when it is gone or not ours to read)."""
    try:
        return psutil.Process(pid).cmdline()
    except _NO_ACCESS:
        return []


def marked_pids(var: str, value: str) -> set[int]:
    """Live processes whose environment holds ``var=value``, plus all their descendants; never
    this process or its parent (a test or CLI that carries the mark itself)."""
    found: set[int] = set()
    for proc in psutil.process_iter(["environ", "status"]):  # unreadable attributes come back None
        if proc.info["status"] in _GONE or (proc.info["environ"] or {}).get(var) != value:
            continue
        found.add(proc.pid)
        with contextlib.suppress(*_NO_ACCESS):
            found.update(c.pid for c in proc.children(recursive=True) if _running(c))
    return found - {os.getpid(), os.getppid()}


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it (empty when it is gone)."""
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True) if _running(c))} if _running(proc) else set()
    except _NO_ACCESS:
        return set()


def _wait(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for the processes to end (reaping our own children); the ones
    still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        alive = [p for p in alive if _running(p)]
    return alive


def terminate(pids: Iterable[int], grace: float = 8.0, kill_wait: float = 5.0) -> set[int]:
    """SIGTERM each process, up to ``grace`` seconds to exit, then SIGKILL what is left (and up
    to ``kill_wait`` seconds for that). Returns the pids still running after all that."""
    procs = []
    for pid in set(pids):
        with contextlib.suppress(*_NO_ACCESS):
            procs.append(psutil.Process(pid))
    for sig in ("terminate", "kill"):
        for proc in procs:
            with contextlib.suppress(*_NO_ACCESS):  # psutil refuses a pid reused by another process
                getattr(proc, sig)()
        procs = _wait(procs, grace if sig == "terminate" else kill_wait)
        if not procs:
            break
    return {p.pid for p in procs}
