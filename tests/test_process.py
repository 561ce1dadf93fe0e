"""jobs.process: the fast exit of the CLI and the sweep driver does what an ordinary exit does that
matters (threads joined, atexit functions run, output flushed, the exit status), in its order."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from jobs.process import fast_exit

    def late():
        time.sleep(0.3)
        print("thread done", flush=True)

    threading.Thread(target=late).start()          # not a daemon: joined before the exit
    atexit.register(lambda: print("atexit ran"))   # unflushed: flushed before the exit
    sys.stdout.write("no newline yet")
    fast_exit({code}, last_words={last!r})
    print("never printed")
""")


@pytest.mark.parametrize("code, status", [(0, 0), (None, 0), (3, 3), ("a message", 1)])
def test_fast_exit_joins_threads_runs_atexit_and_flushes(code, status):
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(code=repr(code), last="the end")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "no newline yetthread done\natexit ran\nthe end\n"
    assert proc.stderr == ("a message\n" if status == 1 else "")


def test_the_console_script_keeps_the_exit_codes():
    run = [sys.executable, "-c", "from jobs.cli import run; run()"]
    ok = subprocess.run([*run, "models"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "v0" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, "submit", "--models", "v9", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "v9" in bad.stderr and bad.stdout == "", (bad.stdout, bad.stderr)
    usage = subprocess.run([*run, "submit", "--no-such-option"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_free_ports_of_one_process_are_all_different():
    from jobs.services import free_port

    ports = [free_port() for _ in range(200)]  # the OS offered the same one twice in CI's ray start
    assert len(set(ports)) == len(ports)
