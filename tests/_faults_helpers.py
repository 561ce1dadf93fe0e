"""Helpers for the fault and multi-node tests (tests/test_faults.py, tests/test_multinode.py).

Each of those modules runs its own service set (jobs.services.up with free ports and a private
state folder), because it stops or adds processes that the shared session services must keep.
Teardown stops exactly the processes that carry the set's MNISTJOBS_SERVICE_ID (never `ray stop`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from click.testing import CliRunner

from _service_helpers import job_id_of, wait_for  # noqa: F401  (re-exported for the fault tests)

# The CLI must not pick up a cluster, server or storage from the developer's shell.
CLEAN_ENV = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "MNISTJOBS_DATA_DIR": None,
             "MNISTJOBS_RAY_PORT": None, "MNISTJOBS_DASHBOARD_PORT": None, "MNISTJOBS_MLFLOW_PORT": None,
             "MNISTJOBS_STORAGE_PATH": None}
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds", "images_per_second")


def run_cli(args, *, home):
    """`mnistjobs ARGS --home HOME` in-process; the click Result."""
    from jobs.cli import main

    return CliRunner().invoke(main, [str(a) for a in [*args, "--home", home]], env=CLEAN_ENV,
                              catch_exceptions=False)


@contextlib.contextmanager
def service_set(home: Path, *, num_cpus: int, env: dict[str, str] | None = None):
    """A private embedded Ray head + MLflow server; ``env`` goes into their environment (and so
    into every Ray worker and job driver of the set)."""
    from jobs import services

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        rec = services.up(home, ray_port=0, dashboard_port=0, mlflow_port=0, num_cpus=num_cpus)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield rec
    finally:
        services.down(home, grace=3.0)
        left = services.service_pids(rec)
        shutil.rmtree(rec.temp_dir, ignore_errors=True)
        assert not left, f"processes left running after down(): {sorted(left)}"


def job_client(rec):
    from jobs import services

    return services.job_client(services.Cluster(rec.dashboard_url, rec.headers, rec.mlflow_url, True, rec))


def job_status(rec, job: str) -> str:
    info = job_client(rec).get_job_info(job)
    return str(getattr(info.status, "value", info.status))


def job_logs(rec, job: str) -> str:
    return job_client(rec).get_job_logs(job)


def mlflow(rec):
    from jobs import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    return tracking.client(rec.mlflow_url)


def trial_runs(mlf, job: str) -> dict:
    from jobs import tracking

    return {r.info.run_name: r for r in tracking.job_runs(mlf, job, role="trial")}


def steps(mlf, run_id: str, key: str = "test_acc") -> list[int]:
    return sorted(m.step for m in mlf.get_metric_history(run_id, key))


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def service_processes(rec, *needles: bytes) -> list[int]:
    """Live processes of this service set whose command line holds every needle."""
    from jobs import services

    return sorted(p for p in services.service_pids(rec) if all(n in cmdline(p) for n in needles))


def trial_worker_pids(rec) -> list[int]:
    """Ray's actor processes running a Tune function trainable (process title ray::ImplicitFunc)."""
    return [p for p in service_processes(rec, b"ray::ImplicitFunc") if cmdline(p).startswith(b"ray::")]


def driver_pids(rec, job: str) -> list[int]:
    """The sweep driver of a job: the Python process `python -m jobs.sweep --job-id JOB ...` (not
    the shell that Ray's job supervisor runs the entrypoint with)."""
    def argv(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return []

    return [p for p in service_processes(rec, b"jobs.sweep", b"--job-id " + job.encode())
            if argv(p)[1:3] == [b"-m", b"jobs.sweep"]]


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ the MLflow server

def stop_mlflow(rec) -> None:
    """Stop the set's MLflow server (its whole process group), as a crash or restart would."""
    from jobs import services

    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.mlflow_pid, signal.SIGTERM)
    wait_for(lambda: not services.mlflow_answers(rec.mlflow_url) and services.port_is_free(rec.mlflow_port),
             30, what="the MLflow server to stop")


def start_mlflow(rec):
    """Start the set's MLflow server again: same port, same store, recorded so `down` stops it."""
    from jobs import services

    home = Path(rec.home)
    cmd = services.mlflow_server_command(home, services.load_mlflow_settings(), host=rec.host, port=rec.mlflow_port)
    env = {**os.environ, **services.ray_auth_env(home), services.SERVICE_ID_VAR: rec.service_id}
    with open(home / "logs" / "mlflow.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=home, start_new_session=True)
    rec.mlflow_pid = proc.pid
    services._write_record(home, rec)
    wait_for(lambda: services.mlflow_answers(rec.mlflow_url), 120, what="the MLflow server to start again")
    return rec


# --------------------------------------------------------------------------------- reference runs

def reference_fit(train: dict, data_dir) -> tuple[list[dict], dict]:
    """An uninterrupted in-process run of one trial's TrainConfig, with one thread as in a Ray
    worker of 1 CPU: (its epoch results, its final model state_dict)."""
    import torch

    from mnistnets.data import load_mnist
    from mnistnets.train import TrainConfig, fit, load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results = list(fit(TrainConfig.from_dict(dict(train)), data=load_mnist(data_dir), checkpoint_dir=tmp))
            state = load_checkpoint(Path(tmp) / "last.pt")["model"]
    finally:
        torch.set_num_threads(threads)
    return results, state


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
