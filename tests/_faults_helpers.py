"""What the fault and multi-node tests (tests/test_faults.py, tests/test_multinode.py) need on
top of tests/_service_helpers.py (run_cli, CLEAN_ENV, job_id_of, wait_for, mlflow_client).

Each of those modules runs its own service set (jobs.services.up with free ports and a private
state folder), because it stops or adds processes that the shared session services must keep.
Teardown stops exactly the processes that carry the set's MNISTJOBS_SERVICE_ID (never `ray stop`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from _service_helpers import job_id_of, mlflow_client as mlflow, run_cli, wait_for  # noqa: F401  (re-exported)
from jobs.contract import EPOCH_METRICS as _ALL_EPOCH_METRICS

# The metrics logged at every epoch (the tta_* ones come after the last epoch only).
EPOCH_METRICS = tuple(m for m in _ALL_EPOCH_METRICS if not m.startswith("tta_"))


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
    from jobs.cluster import Cluster, job_client as client_of

    return client_of(Cluster(rec.dashboard_url, rec.headers, rec.mlflow_url, True, rec))


def job_status(rec, job: str) -> str:
    """The Ray job's state; QUEUED while the queue has not started it (Ray does not know it yet)."""
    try:
        info = job_client(rec).get_job_info(job)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc).lower():
            return "QUEUED"
        raise
    return str(getattr(info.status, "value", info.status))


def job_ended(status: str) -> bool:
    from ray.job_submission import JobStatus

    return status != "QUEUED" and JobStatus(status).is_terminal()


def job_logs(rec, job: str) -> str:
    return job_client(rec).get_job_logs(job)


def trial_runs(mlf, job: str) -> dict:
    from jobs import tracking

    return {r.info.run_name: r for r in tracking.job_runs(mlf, job, role="trial")}


def steps(mlf, run_id: str, key: str = "test_acc") -> list[int]:
    return sorted(m.step for m in mlf.get_metric_history(run_id, key))


def cmdline(pid: int) -> str:
    """A process's command line as one string ('' when it is gone)."""
    from jobs.procs import cmdline as argv

    return " ".join(argv(pid))


def service_processes(rec, *needles: str) -> list[int]:
    """Live processes of this service set whose command line holds every needle."""
    from jobs import services

    return sorted(p for p in services.service_pids(rec) if all(n in cmdline(p) for n in needles))


def trial_worker_pids(rec) -> list[int]:
    """Ray's actor processes running a Tune function trainable (process title ray::ImplicitFunc)."""
    return [p for p in service_processes(rec, "ray::ImplicitFunc") if cmdline(p).startswith("ray::")]


def driver_pids(rec, job: str) -> list[int]:
    """The sweep driver of a job: the Python process `python -m jobs.sweep --job-id JOB ...` (not
    the shell that Ray's job supervisor runs the entrypoint with)."""
    from jobs.procs import cmdline as argv

    return [p for p in service_processes(rec, "jobs.sweep", f"--job-id {job}") if argv(p)[1:3] == ["-m", "jobs.sweep"]]


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ the MLflow server

def stop_mlflow(rec) -> None:
    """Stop the set's MLflow server (it and its workers), as a crash or restart would."""
    from jobs import procs, services
    from jobs.cluster import mlflow_answers

    procs.terminate(procs.descendants(rec.mlflow_pid), grace=10.0)
    wait_for(lambda: not mlflow_answers(rec.mlflow_url) and services.port_is_free(rec.mlflow_port),
             30, what="the MLflow server to stop")


def start_mlflow(rec):
    """Start the set's MLflow server again through jobs.services: same port, same store, the same
    service id (so `down` stops it)."""
    from jobs import services

    rec.mlflow_pid = services.restart_mlflow(rec.home).mlflow_pid
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
