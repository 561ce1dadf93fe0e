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
- a trial that trained every epoch: its LoggedModel ``model`` (jobs.mlflow_model), tag
  :data:`TAG_DATA_DIR`; MLflow's system metrics ``system/...`` (every trial run)
- the parent at the sweep's end: :data:`SUMMARY_FINAL` / :data:`SUMMARY_BEST` per model
  (``v2.final_test_acc``) and of the best trial, tags :data:`TAG_BEST_RUN`, :data:`TAG_REGISTERED`

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
#: On a trial run whose training loss became NaN or infinite: the run ends FAILED, not retried.
TAG_DIVERGED = "mnistjobs.diverged"
TAG_DIVERGED_REASON = "mnistjobs.diverged_reason"

#: The queue (jobs.queue), on the parent run of each job. The run's status is the queue state:
#: SCHEDULED = queued, RUNNING = admitted (its Ray job runs), FINISHED / FAILED / KILLED = ended.
TAG_PRIORITY = "mnistjobs.priority"          # an integer; higher runs first
TAG_SUBMITTED_AT = "mnistjobs.submitted_at"  # ms since the epoch, the client's clock at submit
TAG_SUBMITTED_BY = "mnistjobs.submitted_by"  # user@host
TAG_QUEUE_STATE = "mnistjobs.queue_state"    # queued | admitted | cancelled | ended
TAG_NEXT_RAY_JOB = "mnistjobs.next_ray_job_id"  # the Ray submission id the admitter will use
TAG_RESUME = "mnistjobs.resume"              # "true": admit it with --resume (its Tune experiment exists)
TAG_WAITING_TRIALS = "mnistjobs.waiting_trials"  # the driver's count of trials not yet started
TAG_TOTAL_TRIALS = "mnistjobs.total_trials"
TAG_ADMITTED_AT = "mnistjobs.admitted_at"    # ms, when the admitter first started it (keeps its place)
TAG_SUMMARY = "mnistjobs.summary"            # the spec's one-line summary
TAG_HELD = "mnistjobs.held_by"              # "down": stopped by `mnistjobs down`, starts again after `up`
TAG_QUEUE_NOTE = "mnistjobs.queue_note"      # why the admitter could not start it, when it could not
#: Issue 15: where a trial read MNIST (the resolved folder on its node; `verify` reads it back).
TAG_DATA_DIR = "mnistjobs.data_dir"
#: On the parent run: the trial run with the sweep's highest final test accuracy.
TAG_BEST_RUN = "mnistjobs.best_run_id"
#: On the parent run: what the driver registered ("mnistjobs-v2 v3, mnistjobs-v0 v1"), or "off".
TAG_REGISTERED = "mnistjobs.registered"

#: The last line a sweep's driver writes to its job's log, after its parent run is closed and its
#: Ray connection is shut down, so that no forwarded trial line can come after it (state: SUCCEEDED
#: or FAILED, the Ray job's state once the process has exited). `submit --wait` and `logs --follow`
#: stop there, without waiting for Ray to notice that the driver's process ended (jobs.client.until_done).
DONE_LINE = "mnistjobs sweep {job_id}: ended {state}"
#: The parent run's summary metrics (step 0): per model ``<model>.final_test_acc`` and
#: ``<model>.best_epoch_test_acc`` (its highest epoch) of its best trial (highest final test
#: accuracy), and the same two of the sweep's best trial without the prefix. (``best_<metric>``,
#: below, is the search's outcome: the best trial's metric at its last epoch.)
SUMMARY_FINAL = "final_test_acc"
SUMMARY_BEST = "best_epoch_test_acc"
#: MLflow's own system metrics on every trial run (SystemMetricsMonitor): "system/<name>".
SYSTEM_METRIC_PREFIX = "system/"
#: Issue 14, search jobs, on the parent run: the search (grid | random | optuna), the searched
#: settings (the space's keys, comma-separated, in the space's order), what it optimised
#: (``--metric``, ``--mode``) and the scheduler (fifo | asha). At the end the parent also holds
#: metric ``best_<metric>`` (the best trial's value at its last logged epoch, stopped trials
#: included; :func:`best_metric_name`) and that trial's searched values as params ``best.<key>``
#: (:data:`BEST_PARAM_PREFIX`); TAG_BEST_RUN names the trial. Trial runs log the sampled values
#: as their ordinary params (TRIAL_PARAMS: numbers as numbers).
TAG_SEARCH = "mnistjobs.search"
TAG_SEARCHED = "mnistjobs.searched"
TAG_METRIC = "mnistjobs.metric"
TAG_MODE = "mnistjobs.mode"
TAG_SCHEDULER = "mnistjobs.scheduler"
BEST_PARAM_PREFIX = "best."


def best_metric_name(metric: str) -> str:
    return f"best_{metric}"


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
