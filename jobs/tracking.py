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
  label_smoothing, dropout
- metrics per epoch, ``step=epoch``: train_loss, train_acc, test_loss, test_acc, lr,
  epoch_seconds, images_per_second
- artifacts: model/layers.txt, checkpoints/last.pt, checkpoints/best.pt, plots/accuracy.png,
  plots/loss.png

A trial retried from its checkpoint reopens the same run (its id travels in the checkpoint;
failing that, the ``mnistjobs.trial_id`` tag finds it) and skips epochs the run already has, so
no epoch is logged twice. Only MlflowClient is used (no global ``mlflow.start_run`` state).
"""
from __future__ import annotations

import math
import os
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
                 "images_per_second")
TRIAL_PARAMS = ("model", "params", "schedule", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                "batch_size", "epochs", "seed", "augment", "train_limit", "test_limit", "device",
                "label_smoothing", "dropout")
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
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"
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


class TrialRun:
    """One trial's run: params once, metrics per epoch (never twice), artifacts at the end."""

    def __init__(self, mlf: "MlflowClient", run_id: str, experiment_id: str, created: bool):
        self.mlf, self.run_id, self.experiment_id, self.created = mlf, run_id, experiment_id, created
        self.last_step = 0 if created else self._last_logged_step()

    @classmethod
    def open(cls, mlf: "MlflowClient", *, experiment_id: str, parent_run_id: str, job_id: str, trial_id: str,
             name: str, run_id: str | None = None) -> "TrialRun":
        """Reopen ``run_id`` (from the checkpoint), else the run tagged with ``trial_id``, else
        create the run."""
        from mlflow.exceptions import MlflowException

        run = None
        if run_id:
            try:
                run = mlf.get_run(run_id)
            except MlflowException:
                run = None
        if run is None:
            flt = f"tags.`{TAG_TRIAL}` = {_quote(trial_id)} and tags.`{TAG_JOB}` = {_quote(job_id)}"
            found = mlf.search_runs([experiment_id], filter_string=flt, max_results=1)
            run = found[0] if found else None
        if run is not None:
            if run.info.status != "RUNNING":
                mlf.update_run(run.info.run_id, status="RUNNING")
            return cls(mlf, run.info.run_id, run.info.experiment_id, created=False)
        tags = {TAG_JOB: job_id, TAG_ROLE: "trial", TAG_TRIAL: trial_id, TAG_PARENT: parent_run_id}
        run = mlf.create_run(experiment_id, run_name=name, tags=tags)
        return cls(mlf, run.info.run_id, experiment_id, created=True)

    def _last_logged_step(self) -> int:
        steps = [m.step for m in self.mlf.get_metric_history(self.run_id, "test_acc")]
        return max(steps, default=0)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.mlf.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, config: dict[str, Any], *, params: int, device: str) -> None:
        """The contract's params (only when the run is new: MLflow refuses changed params)."""
        from mlflow.entities import Param

        values = {**{k: config.get(k) for k in TRIAL_PARAMS}, "params": params, "device": device}
        existing = self.mlf.get_run(self.run_id).data.params
        new = [Param(k, _param_value(v)) for k, v in values.items() if k not in existing]
        if new:
            self.mlf.log_batch(self.run_id, params=new)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlf.log_text(self.run_id, text, artifact_file)

    def log_epoch(self, result: dict[str, Any]) -> bool:
        """Log one epoch's metrics at ``step=epoch`` in one batch; skip (return False) an epoch
        the run already has (a trial resumed from an older checkpoint)."""
        from mlflow.entities import Metric

        epoch = int(result["epoch"])
        if epoch <= self.last_step:
            return False
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS
                   if k in result and result[k] is not None and math.isfinite(float(result[k]))]
        self.mlf.log_batch(self.run_id, metrics=metrics)
        self.last_step = epoch
        return True

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Per metric: [(step, value)] sorted by step (the last value logged for a step wins)."""
        out = {}
        for key in ("train_acc", "test_acc", "train_loss", "test_loss"):
            by_step = {}
            for m in sorted(self.mlf.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
                by_step[m.step] = m.value
            out[key] = sorted(by_step.items())
        return out

    def log_final_artifacts(self, checkpoint_dir: str | os.PathLike | None) -> None:
        """checkpoints/last.pt, checkpoints/best.pt and the plots."""
        if checkpoint_dir is not None:
            for name in ("last.pt", "best.pt"):
                path = Path(checkpoint_dir) / name
                if path.is_file():
                    self.mlf.log_artifact(self.run_id, str(path), "checkpoints")
        with tempfile.TemporaryDirectory(prefix="mnistjobs-plots-") as tmp:
            for path in plot_history(self.history(), tmp):
                self.mlf.log_artifact(self.run_id, str(path), "plots")

    def finish(self, status: str = "FINISHED") -> None:
        self.mlf.set_terminated(self.run_id, status)


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
