"""The one embedded Ray + MLflow service set of a test session, and THE helpers of every test
that drives the CLI or a service set (tests/_faults_helpers.py adds only what the fault and
multi-node tests need on top: a private service set, its processes, reference runs).

tests/conftest.py registers the ``embedded`` fixture (and ``finished_sweep``) for every test
module, so a test just asks for them::

    from _service_helpers import run_cli, job_id_of, mlflow_client, wait_for

    @pytest.mark.slow
    def test_something(embedded): ...

One Ray head and one MLflow server serve the whole pytest session, started lazily by the first
test that asks for them and stopped when the session ends. Every port is picked free at run
time (never Ray's or MLflow's defaults), the state folder is a pytest temp dir, and teardown
stops exactly the processes this service set started (by the MNISTJOBS_SERVICE_ID they carry),
never other Ray clusters on the machine.

The service set is a process-wide singleton with a reference count, so even a module that still
imports the fixture itself (``from _service_helpers import embedded``) shares it rather than
starting a second Ray head.
"""
from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

# The CLI must not pick up a cluster, server, data or storage from the developer's shell.
CLEAN_ENV = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "MNISTJOBS_DATA_DIR": None,
             "MNISTJOBS_RAY_PORT": None, "MNISTJOBS_DASHBOARD_PORT": None, "MNISTJOBS_MLFLOW_PORT": None,
             "MNISTJOBS_STORAGE_PATH": None}

# Small enough for a 2-core CI machine: a few seconds per trial.
TINY = ["--train-limit", "256", "--test-limit", "64", "--batch-size", "32", "--schedules", "cosine"]


# ------------------------------------------------------------------------------ the service set

_lock = threading.Lock()
_shared: dict = {"rec": None, "users": 0}


def acquire_services(tmp_path_factory):
    """The session's running services (jobs.services.Services), started on first use."""
    from jobs import services

    with _lock:
        if _shared["rec"] is None:
            home = tmp_path_factory.mktemp("service") / "home"
            _shared["rec"] = services.up(home, ray_port=0, dashboard_port=0, mlflow_port=0, num_cpus=2)
        _shared["users"] += 1
        return _shared["rec"]


def release_services() -> set[int]:
    """Drop one user; the last one stops the services. Returns the pids left running (none)."""
    from jobs import services

    with _lock:
        _shared["users"] -= 1
        rec = _shared["rec"]
        if _shared["users"] > 0 or rec is None:
            return set()
        _shared["rec"] = None
        services.down(rec.home, grace=3.0)
        left = services.service_pids(rec)
        shutil.rmtree(rec.temp_dir, ignore_errors=True)
        return left


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The running services (jobs.services.Services) shared by the whole test session."""
    rec = acquire_services(tmp_path_factory)
    try:
        yield rec
    finally:
        left = release_services()
        assert not left, f"processes left running after down(): {sorted(left)}"


@dataclass
class FinishedSweep:
    """A tiny 2-model sweep (v0, v2; 1 epoch) that ran to the end on the shared services."""

    job_id: str
    experiment: str
    experiment_id: str
    run_names: tuple[str, ...]
    output: str


@pytest.fixture(scope="session")
def finished_sweep(embedded, synthetic_dir) -> FinishedSweep:
    """Submit once per session and wait; for tests that only need a finished job to look at."""
    experiment = "svc-finished"
    result = run_cli(["submit", "--models", "v0,v2", "--epochs", 1, *TINY, "--data-dir", synthetic_dir,
                      "--experiment", experiment, "--wait"], home=embedded.home)
    assert result.exit_code == 0, result.output
    exp = mlflow_client(embedded).get_experiment_by_name(experiment)
    assert exp is not None, result.output
    return FinishedSweep(job_id_of(result.output), experiment, exp.experiment_id,
                         ("v0-cosine-s1", "v2-cosine-s1"), result.output)


# ------------------------------------------------------------------------------------- helpers

def run_cli(args, *, home=None):
    """Invoke `mnistjobs ARGS` in-process (with --home when given); return the click Result."""
    from jobs.cli import main

    if home is not None:
        args = [*args, "--home", str(home)]
    return CliRunner().invoke(main, [str(a) for a in args], env=CLEAN_ENV, catch_exceptions=False)


def job_id_of(output: str) -> str:
    match = re.search(r"Submitted job (\S+):", output)
    assert match, output
    return match.group(1)


def mlflow_client(rec):
    """An MlflowClient of the set's tracking server (artifact downloads without progress bars)."""
    import os

    from jobs import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return tracking.client(rec.mlflow_url)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
