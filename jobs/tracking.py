"""MLflow: the experiment, one parent run per job, one child run per trial, their artifacts.

Names (the contract the report reads):

- experiment: ``--experiment`` (default ``mnistjobs``)
- parent run ``sweep-<job id>``, tags ``mnistjobs.job_id``, ``mnistjobs.role=sweep``; the spec
  as ``spec.json``
- child run ``<model>-<schedule>-s<seed>``, tags ``mnistjobs.job_id``, ``mnistjobs.role=trial``,
  ``mnistjobs.trial_id`` (Tune's), ``mnistjobs.node``, ``mnistjobs.device``,
  ``mlflow.parentRunId``
- params: model, params (parameter count), schedule, optimizer, lr, momentum, nesterov,
  weight_decay, batch_size, epochs, seed, augment, train_limit, test_limit, device,
  label_smoothing, dropout, rotation, translate, scale, shear (augmentation strengths),
  clean_epochs, ema, tta
- metrics per epoch, ``step=epoch``: train_loss, train_acc, test_loss, test_acc, lr,
  epoch_seconds, images_per_second; tta_test_loss and tta_test_acc after the last epoch when the
  recipe's ``tta`` asks for test-time augmentation
- artifacts: model/layers.txt, checkpoints/last.pt, checkpoints/best.pt, plots/accuracy.png,
  plots/loss.png

A trial retried from its checkpoint reopens the same run (its id travels in the checkpoint;
failing that, the ``mnistjobs.trial_id`` tag finds it) and skips epochs the run already has, so
no epoch is logged twice. A trial never waits for MLflow while it trains: its calls are queued
and sent in order, and what an outage holds back is sent at the next epoch (``TrialRun``).
Only MlflowClient is used (no global ``mlflow.start_run`` state).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

TAG_JOB = "mnistjobs.job_id"
TAG_ROLE = "mnistjobs.role"
TAG_TRIAL = "mnistjobs.trial_id"
TAG_NODE = "mnistjobs.node"
TAG_DEVICE = "mnistjobs.device"
TAG_RAY_JOB = "mnistjobs.ray_job_id"
TAG_PARENT = "mlflow.parentRunId"
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                 "images_per_second", "tta_test_loss", "tta_test_acc")  # tta_*: last epoch, when asked
TRIAL_PARAMS = ("model", "params", "schedule", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                "batch_size", "epochs", "seed", "augment", "train_limit", "test_limit", "device",
                "label_smoothing", "dropout", "rotation", "translate", "scale", "shear", "clean_epochs", "ema", "tta")
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def client(tracking_uri: str | None = None) -> "MlflowClient":
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" lines
    return MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)


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


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def job_runs(mlf: "MlflowClient", job_id: str, role: str | None = None,
             experiment_ids: list[str] | None = None) -> list:
    """All runs of a job (optionally only the sweep or the trial runs), over every experiment."""
    from mlflow.entities import ViewType

    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in mlf.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    flt = f"tags.`{TAG_JOB}` = {_quote(job_id)}"
    if role:
        flt += f" and tags.`{TAG_ROLE}` = {_quote(role)}"
    runs, token = [], None
    while True:
        page = mlf.search_runs(experiment_ids, filter_string=flt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def end_job_runs(mlf: "MlflowClient", job_id: str, status: str = "KILLED",
                 experiment_ids: list[str] | None = None) -> int:
    """Set every still-RUNNING run of a job (sweep and trials) to ``status``; return how many."""
    n = 0
    for run in job_runs(mlf, job_id, experiment_ids=experiment_ids):
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

    @classmethod
    def open(cls, mlf: "MlflowClient", experiment: str, job_id: str, spec: dict[str, Any],
             params: dict[str, Any] | None = None, ray_job_id: str | None = None) -> "SweepRun":
        """Find the job's parent run (a resumed job) or create it with ``params`` and the
        spec as ``spec.json``."""
        experiment_id = get_or_create_experiment(mlf, experiment)
        existing = job_runs(mlf, job_id, role="sweep", experiment_ids=[experiment_id])
        if existing:
            run = existing[0]
            if run.info.status != "RUNNING":
                mlf.update_run(run.info.run_id, status="RUNNING")
            if ray_job_id:
                mlf.set_tag(run.info.run_id, TAG_RAY_JOB, ray_job_id)
            return cls(mlf, experiment_id, run.info.run_id, job_id)
        tags = {TAG_JOB: job_id, TAG_ROLE: "sweep"}
        if ray_job_id:
            tags[TAG_RAY_JOB] = ray_job_id
        run = mlf.create_run(experiment_id, run_name=f"sweep-{job_id}", tags=tags)
        run_id = run.info.run_id
        from mlflow.entities import Param

        if params:
            mlf.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
        mlf.log_dict(run_id, spec, "spec.json")
        return cls(mlf, experiment_id, run_id, job_id)

    def finish(self, status: str) -> None:
        self.mlf.set_terminated(self.run_id, status)


# -------------------------------------------------------------------------------------- trial

def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "None" if value is None else str(value)


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
    by_key: dict[str, dict[int, float]] = {}
    for row in history:
        for key in ("train_acc", "test_acc", "train_loss", "test_loss"):
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
            flt = f"tags.`{TAG_TRIAL}` = {_quote(self.trial_id)} and tags.`{TAG_JOB}` = {_quote(self.job_id)}"
            found = self.mlf.search_runs([self.experiment_id], filter_string=flt, max_results=1)
            run = found[0] if found else None
        if run is not None:
            if run.info.status != "RUNNING":
                self.mlf.update_run(run.info.run_id, status="RUNNING")
            steps = [m.step for m in self.mlf.get_metric_history(run.info.run_id, "test_acc")]
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        else:
            tags = {TAG_JOB: self.job_id, TAG_ROLE: "trial", TAG_TRIAL: self.trial_id, TAG_PARENT: self.parent_run_id}
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
            new = [Param(k, _param_value(v)) for k, v in values.items() if k not in existing]
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
        """Per metric from the server: [(step, value)] sorted by step (the last value logged for a
        step wins)."""
        out = {}
        for key in ("train_acc", "test_acc", "train_loss", "test_loss"):
            by_step = {}
            for m in sorted(self.mlf.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
                by_step[m.step] = m.value
            out[key] = sorted(by_step.items())
        return out

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="mnistjobs-mlflow-"))
        return self._scratch

    def log_final_artifacts(self, checkpoint_dir: str | os.PathLike | None,
                            history: list[dict[str, Any]] | None = None) -> None:
        """checkpoints/last.pt, checkpoints/best.pt and the plots (from ``history``, fit's list of
        epoch results, else from the server). Queued with copies of the files."""
        scratch = self._scratch_dir()
        if checkpoint_dir is not None:
            (scratch / "checkpoints").mkdir(exist_ok=True)
            for name in ("last.pt", "best.pt"):
                path = Path(checkpoint_dir) / name
                if path.is_file():
                    copy = scratch / "checkpoints" / name
                    shutil.copy2(path, copy)
                    self._queue(f"checkpoints/{name}",
                                lambda rid, copy=copy: self.mlf.log_artifact(rid, str(copy), "checkpoints"))
        points = _history_points(history) if history is not None else None
        plots = scratch / "plots"
        plots.mkdir(exist_ok=True)
        if points is None:  # from the server: needs it now
            self.flush(wait=patience_s())
            points = self.history()
        for path in plot_history(points, plots):
            self._queue(f"plots/{path.name}", lambda rid, path=path: self.mlf.log_artifact(rid, str(path), "plots"))

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


def plot_history(history: dict[str, list[tuple[int, float]]], out_dir: str | os.PathLike) -> list[Path]:
    """accuracy.png (train/test accuracy per epoch) and loss.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    for fname, keys, ylabel in (("accuracy.png", ("train_acc", "test_acc"), "accuracy (%)"),
                                ("loss.png", ("train_loss", "test_loss"), "loss")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key in keys:
            points = history.get(key) or []
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def trial_rows(mlf: "MlflowClient", job_id: str) -> list[dict[str, Any]]:
    """For `status JOB`: one dict per trial run (name, status, epoch, epochs, test_acc, best_acc)."""
    rows = []
    for run in job_runs(mlf, job_id, role="trial"):
        try:
            history = mlf.get_metric_history(run.info.run_id, "test_acc")
        except Exception:  # pragma: no cover - the table is informative only
            history = []
        rows.append({"name": run.info.run_name, "status": run.info.status,
                     "epochs": run.data.params.get("epochs"), "test_acc": run.data.metrics.get("test_acc"),
                     "best_acc": max((m.value for m in history), default=None),
                     "epoch": max((m.step for m in history), default=0), "run_id": run.info.run_id,
                     "experiment_id": run.info.experiment_id, "node": run.data.tags.get(TAG_NODE),
                     "device": run.data.tags.get(TAG_DEVICE)})
    return sorted(rows, key=lambda r: r["name"] or "")
