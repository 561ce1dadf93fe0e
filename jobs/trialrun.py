"""One trial's MLflow run, logged without ever making training wait for the server.

A trial retried from its checkpoint reopens the same run (its id travels in the checkpoint;
failing that, the ``mnistjobs.trial_id`` tag finds it) and skips epochs the run already has, so
no epoch is logged twice. Its calls are queued and sent in order, and what an outage holds back
is sent at the next epoch (:class:`TrialRun`). Re-exported by :mod:`jobs.tracking`.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.contract import (CHECKPOINT_DIR, CHECKPOINT_FILES, CURVE_METRICS, EPOCH_METRICS, PLOTS_DIR, ROLE_TRIAL,
                           TAG_JOB, TAG_PARENT, TAG_ROLE, TAG_TRIAL, TRIAL_PARAMS)
from jobs.mlflow_runs import metric_history, param_value, quote

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient


class TrackingUnavailable(RuntimeError):
    """MLflow did not answer for longer than the trial may wait (its calls stay unsent)."""


TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED")
PATIENCE_VAR = "MNISTJOBS_MLFLOW_PATIENCE_S"
DEFAULT_PATIENCE_S = 300.0


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call is worth retrying: the server is away, restarting or busy
    (connection refused or reset, timeout, 5xx, 429), not a request it refuses (4xx)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        # rest_utils wraps connection errors, timeouts and exhausted retries in "API request to ..."
        return str(exc.message).startswith("API request to") or exc.error_code in TRANSIENT_CODES
    return False


def fail_fast_requests(timeout_s: int = 15) -> None:
    """In a trial's process: one attempt per MLflow request, at most ``timeout_s`` s each (MLflow's
    own default retries a dead server for ~4 min, stalling training). TrialRun retries instead."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)


def patience_s() -> float:
    """How long a trial waits for MLflow at its end: ``$MNISTJOBS_MLFLOW_PATIENCE_S`` (300)."""
    try:
        return float(os.environ.get(PATIENCE_VAR) or DEFAULT_PATIENCE_S)
    except ValueError:
        return DEFAULT_PATIENCE_S


def _history_points(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """fit's list of epoch results as ``{metric: [(epoch, value)]}`` for the plots (the last
    result of an epoch wins, as in :func:`jobs.mlflow_runs.metric_history`)."""
    by_key: dict[str, dict[int, float]] = {}
    for row in history:
        for key in CURVE_METRICS:
            if row.get(key) is not None:
                by_key.setdefault(key, {})[int(row["epoch"])] = float(row[key])
    return {k: sorted(v.items()) for k, v in by_key.items()}


class TrialRun:
    """One trial's run: params once, metrics per epoch (never twice), artifacts at the end.

    Training never waits for MLflow. Every call is queued and sent in order; a call that fails
    because the server is away (refused, timeout, 5xx) stays queued and the queue is sent again
    at the next epoch, so metrics logged during an outage arrive late, not never. Only
    ``finish()`` waits (up to ``$MNISTJOBS_MLFLOW_PATIENCE_S``, 300 s) and raises
    TrackingUnavailable past that; the trial's checkpoint keeps every epoch's metrics
    (fit's history), so a retried or resumed trial logs what its run lacks.

    No epoch is logged twice: epochs the run already has (its largest ``test_acc`` step when the
    run is opened) are skipped, and a retried batch repeats the same timestamps, which MLflow's
    store drops as duplicates. The run itself is found (``run_id`` from the checkpoint, else the
    ``mnistjobs.trial_id`` tag) before one is created, also when the server was away at the start.
    """

    def __init__(self, mlf: "MlflowClient", *, experiment_id: str, parent_run_id: str, job_id: str,
                 trial_id: str, name: str, run_id: str | None = None, log=None):
        self.mlf, self.experiment_id, self.parent_run_id = mlf, experiment_id, parent_run_id
        self.job_id, self.trial_id, self.name = job_id, trial_id, name
        self.wanted_run_id = run_id
        self.run_id: str | None = None
        self.created = False
        self.last_step = 0              # the largest epoch the run has or has queued
        self._pending: list[tuple[int | None, str, Any]] = []  # (epoch or None, what, fn(run_id))
        self._down_since: float | None = None
        self._scratch: Path | None = None
        self.log = log or (lambda msg: print(msg, flush=True))

    @classmethod
    def open(cls, mlf: "MlflowClient", *, experiment_id: str, parent_run_id: str, job_id: str, trial_id: str,
             name: str, run_id: str | None = None, wait: float = 0.0, log=None) -> "TrialRun":
        """Reopen ``run_id`` (from the checkpoint), else the run tagged with ``trial_id``, else
        create the run. When MLflow does not answer within ``wait`` s, the run is opened later,
        at the first flush that reaches the server; calls made meanwhile are queued."""
        run = cls(mlf, experiment_id=experiment_id, parent_run_id=parent_run_id, job_id=job_id,
                  trial_id=trial_id, name=name, run_id=run_id, log=log)
        run.flush(wait=wait)
        return run

    @property
    def opened(self) -> bool:
        return self.run_id is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _open_now(self) -> None:
        from mlflow.exceptions import MlflowException

        run = None
        if self.wanted_run_id:
            try:
                run = self.mlf.get_run(self.wanted_run_id)
            except MlflowException as e:
                if is_transient(e):
                    raise
                run = None
        if run is None:  # also finds a run whose creation answered too late for us
            flt = f"tags.`{TAG_TRIAL}` = {quote(self.trial_id)} and tags.`{TAG_JOB}` = {quote(self.job_id)}"
            found = self.mlf.search_runs([self.experiment_id], filter_string=flt, max_results=1)
            run = found[0] if found else None
        if run is not None:
            if run.info.status != "RUNNING":
                self.mlf.update_run(run.info.run_id, status="RUNNING")
            steps = [step for step, _ in metric_history(self.mlf, run.info.run_id, ["test_acc"])["test_acc"]]
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        else:
            tags = {TAG_JOB: self.job_id, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: self.trial_id,
                    TAG_PARENT: self.parent_run_id}
            run = self.mlf.create_run(self.experiment_id, run_name=self.name, tags=tags)
            self.run_id, self.created, steps = run.info.run_id, True, []
        logged = max(steps, default=0)
        # Epochs queued before the run was opened that it has already: drop them.
        self._pending = [op for op in self._pending if op[0] is None or op[0] > logged]
        self.last_step = max(self.last_step, logged)

    def flush(self, wait: float = 0.0) -> bool:
        """Send the queued calls in order. With ``wait`` 0, one attempt: a server that is away
        costs at most one request's timeout and the calls stay queued. With ``wait`` > 0, retry
        with backoff for up to ``wait`` s. Return True when nothing is left to send; raise on a
        call MLflow refuses (a bad request, not an outage)."""
        deadline = time.monotonic() + wait
        delay = 0.5
        while True:
            try:
                if self.run_id is None:
                    self._open_now()
                while self._pending:
                    self._pending[0][2](self.run_id)
                    self._pending.pop(0)
            except Exception as e:  # noqa: BLE001 - sorted by is_transient
                if not is_transient(e):
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.log(f"[{self.name}] MLflow does not answer ({_short(e)}); {len(self._pending)} "
                             f"call(s) held back, training goes on and they are sent when it answers")
                if time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if self._down_since is not None:
                self.log(f"[{self.name}] MLflow answers again after {time.monotonic() - self._down_since:.0f} s; "
                         f"the held-back calls are sent")
                self._down_since = None
            return True

    def _queue(self, what: str, fn, epoch: int | None = None) -> None:
        self._pending.append((epoch, what, fn))
        self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._queue("tags", lambda rid: self.mlf.log_batch(rid, tags=batch))

    def log_params(self, config: dict[str, Any], *, params: int, device: str) -> None:
        """The contract's params (only those the run lacks: MLflow refuses changed params)."""
        from mlflow.entities import Param

        values = {**{k: config.get(k) for k in TRIAL_PARAMS}, "params": params, "device": device}

        def send(rid):
            existing = self.mlf.get_run(rid).data.params
            new = [Param(k, param_value(v)) for k, v in values.items() if k not in existing]
            if new:
                self.mlf.log_batch(rid, params=new)

        self._queue("params", send)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._queue(artifact_file, lambda rid: self.mlf.log_text(rid, text, artifact_file))

    def log_epoch(self, result: dict[str, Any]) -> bool:
        """Queue one epoch's metrics at ``step=epoch`` (one batch, one timestamp) and send what
        is queued; skip (return False) an epoch the run has already."""
        from mlflow.entities import Metric

        epoch = int(result["epoch"])
        if epoch <= self.last_step:
            return False
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS
                   if k in result and result[k] is not None and math.isfinite(float(result[k]))]
        self.last_step = epoch
        self._queue(f"epoch {epoch}", lambda rid: self.mlf.log_batch(rid, metrics=metrics), epoch=epoch)
        return True

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """The plotted metrics from the server: [(step, value)] sorted by step (the last value
        logged for a step wins)."""
        return metric_history(self.mlf, self.run_id, CURVE_METRICS)

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="mnistjobs-mlflow-"))
        return self._scratch

    def log_final_artifacts(self, checkpoint_dir: str | os.PathLike | None,
                            history: list[dict[str, Any]] | None = None) -> None:
        """checkpoints/last.pt, checkpoints/best.pt and the plots (from ``history``, fit's list of
        epoch results, else from the server). Queued with copies of the files."""
        from jobs.plots import plot_history

        scratch = self._scratch_dir()
        if checkpoint_dir is not None:
            (scratch / CHECKPOINT_DIR).mkdir(exist_ok=True)
            for name in CHECKPOINT_FILES:
                path = Path(checkpoint_dir) / name
                if path.is_file():
                    copy = scratch / CHECKPOINT_DIR / name
                    shutil.copy2(path, copy)
                    self._queue(f"{CHECKPOINT_DIR}/{name}",
                                lambda rid, copy=copy: self.mlf.log_artifact(rid, str(copy), CHECKPOINT_DIR))
        points = _history_points(history) if history is not None else None
        plots = scratch / PLOTS_DIR
        plots.mkdir(exist_ok=True)
        if points is None:  # from the server: needs it now
            self.flush(wait=patience_s())
            points = self.history()
        for path in plot_history(points, plots):
            self._queue(f"{PLOTS_DIR}/{path.name}",
                        lambda rid, path=path: self.mlf.log_artifact(rid, str(path), PLOTS_DIR))

    def finish(self, status: str = "FINISHED", wait: float | None = None) -> None:
        """Mark the run ``status`` after everything queued is sent, waiting up to ``wait`` s
        (default ``$MNISTJOBS_MLFLOW_PATIENCE_S``) for the server; TrackingUnavailable past that."""
        self._queue("status", lambda rid: self.mlf.set_terminated(rid, status))
        wait = patience_s() if wait is None else wait
        if not self.flush(wait=wait):
            what = ", ".join(w for _, w, _ in self._pending)
            raise TrackingUnavailable(
                f"Trial {self.name}: the MLflow server did not answer for {wait:.0f} s ({PATIENCE_VAR}); "
                f"not sent: {what}. The trial's checkpoint keeps every epoch's metrics: resume the job "
                f"(`mnistjobs resume JOB`) when MLflow answers again and the run gets what it lacks.")
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    for marker in ("Connection refused", "timed out", "Read timed out", "RemoteDisconnected", "Connection reset"):
        if marker in text:
            return marker
    return text[:160]

