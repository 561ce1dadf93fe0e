"""MLflow: the experiment, one parent run per job, one child run per trial, their artifacts.

The names every run carries (tags, params, metrics, artifact paths) are the contract in
:mod:`jobs.contract`; this package writes them and reads them back. Only MlflowClient is used
(no global ``mlflow.start_run`` state, no global tracking URI). The parts:

- here: the client, the experiment (created in ONE place: the job client at submit time, which
  hands the driver its id), links into the UI, the parent run (:class:`SweepRun`), ending a job's
  runs, and the trial table of ``status JOB``;
- :mod:`jobs.mlflow_runs`: the one run search (:func:`search_all`, MLflow's own paging) and the
  one metric-history reader (:func:`metric_history`);
- :mod:`jobs.trialrun`: a trial's run (:class:`TrialRun`), which never makes training wait;
- :mod:`jobs.plots`: the per-run plot artifacts.

Every name listed in ``__all__`` is importable from ``jobs.tracking``.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from jobs.contract import (ROLE_SWEEP, ROLE_TRIAL, SPEC_ARTIFACT, TAG_DEVICE, TAG_DIVERGED, TAG_JOB, TAG_NODE, TAG_RAY_JOB, TAG_ROLE,
                           sweep_run_name)
from jobs.mlflow_runs import job_filter, job_runs, metric_history, param_value, quote, search_all
from jobs.trialrun import (DEFAULT_PATIENCE_S, PATIENCE_VAR, TrackingUnavailable, TrialRun, fail_fast_requests,
                           is_transient, patience_s)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = ["client", "get_or_create_experiment", "experiment_url", "run_url", "search_all", "job_filter",
           "job_runs", "metric_history", "end_job_runs", "open_sweep_run", "run_finished", "trial_rows", "SweepRun", "set_tags",
           "LaterClient", "trials_started",
           "TrialRun",
           "TrackingUnavailable", "fail_fast_requests", "is_transient", "patience_s", "PATIENCE_VAR",
           "DEFAULT_PATIENCE_S", "quote", "param_value", "TAG_NODE", "TAG_DEVICE"]


def client(tracking_uri: str | None = None) -> "MlflowClient":
    """An MlflowClient of ``tracking_uri`` (else $MLFLOW_TRACKING_URI). For an embedded server
    that runs MLflow's basic-auth app, this process's MLFLOW_TRACKING_USERNAME / _PASSWORD are
    set from the state folder's password file (jobs.record.use_mlflow_credentials); for any
    other server the standard variables of the user's environment apply."""
    from mlflow import MlflowClient

    from jobs.record import use_mlflow_credentials

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" lines
    use_mlflow_credentials(uri)
    return MlflowClient(tracking_uri=uri)


_TRIALS_STARTED = threading.Event()


def trials_started() -> None:
    """Tell this process's :class:`LaterClient` that the job's first trial has started (the sweep
    driver's Tune callback calls it; a module-level event, since the callback is pickled)."""
    _TRIALS_STARTED.set()


class LaterClient:
    """MLflow's own client for the end of a sweep's driver, made in a thread once the first trial
    has started (:func:`trials_started`) or after ``wait`` s.

    Until then the driver talks plain HTTP to MLflow (``jobs.rest``): ``import mlflow`` costs
    about 1-1.5 s of a 2-core CPU, which before the first trial is taken from the trial worker's
    own imports, which run beside the driver (``jobs.rayconnect``). After it, the import runs
    while the trials train, and the job's end (the summary, the models' registration) finds the
    client made."""

    def __init__(self, tracking_uri: str | None, wait: float = 30.0) -> None:
        self._uri, self._wait, self._client = tracking_uri, wait, None
        self._thread = threading.Thread(target=self._make, name="mnistjobs-mlflow-client", daemon=True)
        self._thread.start()

    def _make(self) -> None:
        _TRIALS_STARTED.wait(self._wait)
        try:
            self._client = client(self._uri)
        except Exception:  # noqa: BLE001 - get() makes it again and raises what that raises
            pass

    def get(self) -> "MlflowClient":
        """The client; made at once if the thread still waits (Tune returned before any trial
        started: a resumed job with nothing left to run)."""
        _TRIALS_STARTED.set()
        self._thread.join()
        if self._client is None:
            self._client = client(self._uri)
        return self._client


def get_or_create_experiment(mlf: "MlflowClient", name: str) -> str:
    """The experiment id for ``name``, created if missing (restored if deleted)."""
    from mlflow.exceptions import MlflowException

    exp = mlf.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlf.create_experiment(name)
        except MlflowException:  # created meanwhile by another job
            exp = mlf.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        mlf.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        # MLflow 3 opens its GenAI overview for a bare experiment link; this opens the runs table.
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return tracking_uri


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return tracking_uri


def end_job_runs(mlf: "MlflowClient", job_id: str, status: str = "KILLED",
                 experiment_ids: list[str] | None = None, role: str | None = None) -> int:
    """Set every still-RUNNING (or SCHEDULED) run of a job to ``status``: the sweep's and the
    trials', or only those of ``role``; return how many."""
    n = 0
    for run in job_runs(mlf, job_id, role=role, experiment_ids=experiment_ids):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            mlf.set_terminated(run.info.run_id, status)
            n += 1
    return n


def run_finished(mlf: "MlflowClient", run_id: str | None) -> bool:
    """Whether ``run_id`` is FINISHED (a trial run is marked so only after all its calls were
    sent); False when unknown or MLflow does not answer."""
    if not run_id:
        return False
    try:
        return mlf.get_run(run_id).info.status == "FINISHED"
    except Exception:  # noqa: BLE001 - not known to be finished: the trial runs again
        return False


# ------------------------------------------------------------------------------------- parent

class SweepRun:
    """The parent run of one job."""

    def __init__(self, mlf: "MlflowClient", experiment_id: str, run_id: str, job_id: str):
        self.mlf, self.experiment_id, self.run_id, self.job_id = mlf, experiment_id, run_id, job_id
        self.existing = None  # the run as it was found (None: created now)

    @classmethod
    def open(cls, mlf: "MlflowClient", experiment_id: str, job_id: str, spec: dict[str, Any],
             params: dict[str, Any] | None = None, ray_job_id: str | None = None,
             status: str = "RUNNING", tags: dict[str, str] | None = None) -> "SweepRun":
        """Find the job's parent run in the experiment ``experiment_id`` (queued by the job
        client, or a resumed job) and mark it ``status``, or create it with ``params`` and the
        spec as ``spec.json``. The experiment must exist: the job client creates it at submit
        time (:func:`get_or_create_experiment`). ``existing`` says which it was."""
        from jobs.rest import job_runs as any_job_runs

        existing = any_job_runs(mlf, job_id, role=ROLE_SWEEP, experiment_ids=[experiment_id])
        if existing:
            run = existing[0]
            if run.info.status != status:
                mlf.update_run(run.info.run_id, status=status)
            if ray_job_id:
                mlf.set_tag(run.info.run_id, TAG_RAY_JOB, ray_job_id)
            found = cls(mlf, experiment_id, run.info.run_id, job_id)
            found.existing = run
            return found
        from mlflow.entities import Param  # creating the run takes MLflow's own client

        tags = {**(tags or {}), TAG_JOB: job_id, TAG_ROLE: ROLE_SWEEP}
        if ray_job_id:
            tags[TAG_RAY_JOB] = ray_job_id
        run_id = mlf.create_run(experiment_id, run_name=sweep_run_name(job_id), tags=tags).info.run_id
        if status != "RUNNING":
            mlf.update_run(run_id, status=status)
        if params:
            mlf.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in params.items()])
        mlf.log_dict(run_id, spec, SPEC_ARTIFACT)
        return cls(mlf, experiment_id, run_id, job_id)

    def finish(self, status: str) -> None:
        self.mlf.set_terminated(self.run_id, status)


def set_tags(mlf, run_id: str, tags: dict[str, Any]) -> None:
    """Several tags of a run in one request, with MLflow's client or the plain-HTTP one
    (``jobs.rest.MlflowRest``)."""
    from jobs.rest import is_lite

    if is_lite(mlf):
        mlf.set_tags(run_id, tags)
        return
    from mlflow.entities import RunTag

    mlf.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _or_recipe(value):
    return "per model recipe" if value is None else value


def open_sweep_run(mlf: "MlflowClient", spec, job_id: str, experiment_id: str, ray_job_id: str | None,
                   status: str = "RUNNING") -> SweepRun:
    """The job's parent run (found again when queued or resumed) with the sweep's params and the
    spec; the queue (``jobs.queue.enqueue``) creates it SCHEDULED, the driver marks it RUNNING."""
    params = {"models": spec.models, "schedules": ";".join(s for _, s in spec.schedule_labels()),
              "seeds": spec.seed_list(), "trials": spec.trial_count(), "epochs": spec.epochs,
              "batch_size": _or_recipe(spec.batch_size), "optimizer": _or_recipe(spec.optimizer),
              "augment": _or_recipe(spec.augment),
              "train_limit": spec.train_limit, "test_limit": spec.test_limit,
              "gpus_per_trial": spec.gpus_per_trial, "cpus_per_trial": spec.cpus_per_trial,
              "max_failures": spec.max_failures, "reuse_workers": spec.reuse_workers}
    from jobs.search import parent_tags

    # The search's tags from the start, so a queued job already says what it searches.
    return SweepRun.open(mlf, experiment_id, job_id, spec.to_dict(), params=params, ray_job_id=ray_job_id,
                         status=status, tags=parent_tags(spec))


# ------------------------------------------------------------------------------------- status

def trial_rows(mlf: "MlflowClient", job_id: str, runs: list | None = None) -> list[dict[str, Any]]:
    """For `status JOB`: one dict per trial run (name, status, epoch, epochs, test_acc, best_acc).
    ``runs``: the job's trial runs, when the caller found them itself (``jobs.rest.trial_rows``,
    whose plain-HTTP client has the same run fields and metric history)."""
    rows = []
    for run in (job_runs(mlf, job_id, role=ROLE_TRIAL) if runs is None else runs):
        try:
            history = metric_history(mlf, run.info.run_id, ["test_acc"])["test_acc"]
        except Exception:  # pragma: no cover - the table is informative only
            history = []
        rows.append({"name": run.info.run_name, "status": run.info.status,
                     "epochs": run.data.params.get("epochs"), "test_acc": run.data.metrics.get("test_acc"),
                     "best_acc": max((value for _, value in history), default=None),
                     "epoch": max((step for step, _ in history), default=0), "run_id": run.info.run_id,
                     "experiment_id": run.info.experiment_id, "node": run.data.tags.get(TAG_NODE),
                     "device": run.data.tags.get(TAG_DEVICE),
                     "diverged": run.data.tags.get(TAG_DIVERGED) == "true"})
    return sorted(rows, key=lambda r: r["name"] or "")
