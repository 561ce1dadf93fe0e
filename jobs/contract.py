"""The tracking contract: every name a sweep writes to MLflow and every reader reads, defined once.

- experiment: ``--experiment`` (default ``mnistjobs``)
- parent run ``sweep-<job id>``: tags ``mnistjobs.job_id``, ``mnistjobs.role=sweep``,
  ``mnistjobs.ray_job_id``; the spec as the artifact ``spec.json``
- child run ``<model>-<schedule>-s<seed>``: tags ``mnistjobs.job_id``, ``mnistjobs.role=trial``,
  ``mnistjobs.trial_id`` (Tune's), ``mnistjobs.node``, ``mnistjobs.device``, ``mlflow.parentRunId``;
  a trial Tune stopped early also ``mnistjobs.stopped_early=true``, ``mnistjobs.stopped_at_epoch=E``
- params: :data:`TRIAL_PARAMS`
- metrics per epoch, ``step=epoch``: :data:`EPOCH_METRICS` (``tta_*`` after the last epoch only,
  when the recipe asks for test-time augmentation)
- artifacts: :data:`LAYERS_ARTIFACT`, ``checkpoints/last.pt``, ``checkpoints/best.pt``,
  ``plots/accuracy.png``, ``plots/loss.png``

jobs.tracking writes these, jobs.report and the CLI read them, and the tests check them by
these names. Pure constants: importing this module imports nothing else.
"""
from __future__ import annotations

DEFAULT_EXPERIMENT = "mnistjobs"

TAG_JOB = "mnistjobs.job_id"
TAG_ROLE = "mnistjobs.role"
TAG_TRIAL = "mnistjobs.trial_id"
TAG_NODE = "mnistjobs.node"
TAG_DEVICE = "mnistjobs.device"
TAG_RAY_JOB = "mnistjobs.ray_job_id"
TAG_PARENT = "mlflow.parentRunId"
#: On a trial run that Tune stopped on purpose (a stopper, a scheduler) before its last epoch; the
#: run ends FINISHED and the job does not count it as failed. STOPPED_AT: the epochs it trained.
TAG_STOPPED_EARLY = "mnistjobs.stopped_early"
TAG_STOPPED_AT = "mnistjobs.stopped_at_epoch"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"

EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                 "images_per_second", "tta_test_loss", "tta_test_acc")
CURVE_METRICS = ("train_acc", "test_acc", "train_loss", "test_loss")  # what the plots draw
TRIAL_PARAMS = ("model", "params", "schedule", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                "batch_size", "epochs", "seed", "augment", "train_limit", "test_limit", "device",
                "label_smoothing", "dropout", "rotation", "translate", "scale", "shear", "clean_epochs",
                "ema", "tta")

SPEC_ARTIFACT = "spec.json"
LAYERS_ARTIFACT = "model/layers.txt"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILES = ("last.pt", "best.pt")
PLOTS_DIR = "plots"
PLOT_FILES = ("accuracy.png", "loss.png")

TERMINAL_RUN_STATES = ("FINISHED", "FAILED", "KILLED")


def sweep_run_name(job_id: str) -> str:
    return f"sweep-{job_id}"
