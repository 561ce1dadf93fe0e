"""Fixtures for the service tests: one embedded Ray + MLflow for the whole session.

Import the fixtures into a test module (``from _service_helpers import embedded, cli  # noqa``).
Every port is picked free at run time (never Ray's or MLflow's defaults), the state folder is a
pytest temp dir, and teardown stops exactly the processes this service set started (by the
MNISTJOBS_SERVICE_ID they carry), never other Ray clusters on the machine.
"""
from __future__ import annotations

import re
import shutil
import time

import pytest
from click.testing import CliRunner

# The CLI must not pick up a cluster or server from the developer's shell.
CLEAN_ENV = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "MNISTJOBS_DATA_DIR": None,
             "MNISTJOBS_RAY_PORT": None, "MNISTJOBS_DASHBOARD_PORT": None, "MNISTJOBS_MLFLOW_PORT": None}


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The running services (jobs.services.Services) of a private state folder."""
    from jobs import services

    home = tmp_path_factory.mktemp("service") / "home"
    rec = services.up(home, ray_port=0, dashboard_port=0, mlflow_port=0, num_cpus=2)
    try:
        yield rec
    finally:
        services.down(home, grace=3.0)
        left = services.service_pids(rec)
        shutil.rmtree(rec.temp_dir, ignore_errors=True)
        assert not left, f"processes left running after down(): {sorted(left)}"


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
    from jobs import tracking

    return tracking.client(rec.mlflow_url)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
