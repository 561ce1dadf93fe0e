"""The Ray job that runs one sweep: a Tune experiment over the spec's grid, one trial per point.

``mnistjobs submit`` creates the MLflow experiment and queues ``python -m jobs.sweep --job-id ID
--ray-job-id RID --experiment-id EID`` through Ray's job submission API, with the spec as JSON in
``$MNISTJOBS_SPEC`` (its one copy in the job), validated again here before anything starts.
``mnistjobs resume ID`` queues the same with ``--resume``, which restores the Tune experiment
(``<storage>/<job id>``) and runs what is left: unfinished and errored trials continue from their
last checkpoint, finished ones are not repeated.

Tune gets the spec's ``param_space`` (``jobs.spec``: each axis a ``tune.grid_search``, fixed
settings plain values); a trial (``jobs.trial.train_trial``) builds its TrainConfig from the
point it is given. The driver: the parent MLflow run (:func:`open_sweep_run`), a resource check,
the tuner (:func:`build_tuner`), then the runs' final state (``tracking.end_job_runs``).

A search (``--search random|optuna``, issue 14): the TuneConfig gets the search's metric, mode,
num_samples, search algorithm, scheduler (ASHA) and trial names from ``jobs.search``; the
parent run carries the search's tags from the start and its outcome (``best_<metric>``,
``best.<key>``, the best run) at the end (``jobs.search.log_outcome``). ``Tuner.restore``
brings the searcher back with its state, so a resumed search samples no config twice.

Stopped on purpose: a trial Tune stops (a stopper, a scheduler's STOP) ends FINISHED, tagged
``mnistjobs.stopped_early=true`` and ``mnistjobs.stopped_at_epoch=E`` (the epochs it trained
and logged) when it trained fewer than planned; the job counts it as done, not failed. The trial
closes its own run when it can (``jobs.trial``); the :class:`Progress` callback makes sure, as
soon as Tune stops the trial and again when the experiment ends. ``run_sweep(..., stop=...)``
takes Tune's stop criterion (code and tests; no CLI option sets one).

Tune's storage: the spec's ``storage_path``, else ``$MNISTJOBS_STORAGE_PATH`` (set once per
cluster), else ``<state folder>/ray_results``; see ``default_storage_path``.

Exit code: 0 when every trial finished (or Tune stopped it on purpose), 1 otherwise (so
``submit --wait`` fails too), 2 for a bad spec or environment.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from jobs.process import fast_exit, process_started_at, startup_mark

startup_mark("driver process started", process_started_at())
startup_mark("driver: jobs.sweep imported")
if __name__ == "__main__":
    # The job's driver connects to Ray first and has the raylet start the trials' workers, so they
    # import torch, MLflow and Tune while this process imports Tune and opens its runs.
    from jobs.rayconnect import connect_early

    connect_early(sys.argv[1:])
from ray import tune  # noqa: E402

startup_mark("driver: ray.tune imported")

from jobs.contract import (DONE_LINE, ROLE_TRIAL, SUMMARY_BEST, SUMMARY_FINAL, TAG_BEST_RUN, TAG_DIVERGED, TAG_DIVERGED_REASON,
                           TAG_HELD, TAG_QUEUE_STATE, TAG_REGISTERED, TAG_STOPPED_EARLY, TAG_TRIAL, TAG_WAITING_TRIALS)
from jobs.grid import trial_config, trial_name
from jobs.rayconnect import connect_driver, connect_ray  # noqa: F401 - connect_ray: the driver's ray.init (tests)
from jobs.trial import stopped_tags, train_trial

STORAGE_VAR = "MNISTJOBS_STORAGE_PATH"  # Tune's storage for every job of a cluster


def default_storage_path() -> str:
    """Tune's storage when the spec names none: ``$MNISTJOBS_STORAGE_PATH``, else
    ``<state folder>/ray_results``.

    Set the variable once per cluster, in the environment of ``ray start --head`` (job drivers
    inherit it), to a place every node that runs trials can write: an ``s3://``/``gs://`` URI or
    a shared folder (NFS). Ray 2.60 checks this before a trial on another node saves a
    checkpoint (a marker file the driver writes in the experiment folder) and fails the trial
    ("Unable to set up cluster storage") when the folder is the head's own disk. Several nodes
    on one machine share its disk, so there a local folder works.
    """
    value = os.environ.get(STORAGE_VAR, "").strip()
    if value:
        return value
    from jobs.state import resolve_home

    return str(resolve_home() / "ray_results")


def resolve_storage(storage_path: str | None = None) -> str:
    """The storage to hand to Tune: ``storage_path`` (the spec's) or ``default_storage_path()``.
    A URI (``s3://bucket/prefix``) passes through unchanged for Tune's pyarrow filesystems; a
    folder is made absolute and created."""
    value = str(storage_path or default_storage_path()).strip()
    if "://" in value:
        return value.rstrip("/")
    path = Path(value).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _trial_dirname(trial) -> str:
    return f"{getattr(trial, 'custom_trial_name', None) or trial_name(trial.config)}_{trial.trial_id}"


def close_stopped_run(mlf, run_id: str, epoch: int | None, planned: int) -> None:
    """End the run of a trial that Tune stopped after ``epoch`` of ``planned`` epochs: FINISHED,
    with ``stopped_early``/``stopped_at_epoch`` when it trained fewer epochs than planned."""
    for key, value in stopped_tags(epoch, planned).items():
        mlf.set_tag(run_id, key, value)
    mlf.set_terminated(run_id, "FINISHED")


def _error_text(trial) -> str:
    """The trial's latest error as Tune wrote it (its local error.txt holds every failure, each
    after a ``Failure # N`` line; the copy in Tune's storage comes later)."""
    text = ""
    try:
        text = Path(trial.error_file).read_text()
    except Exception:  # noqa: BLE001 - no local file: the storage's copy, if any
        try:
            text = str(trial.get_error() or "")
        except Exception:  # noqa: BLE001
            return ""
    blocks = text.split("Failure # ")
    last = blocks[-1]
    return last.split("\n", 1)[1] if len(blocks) > 1 and "\n" in last else last


def failure_line(trial) -> str:
    """What happened to a failed trial, in one line: the error's type and its first line; a
    worker that died says so (Tune's ActorDiedError)."""
    text = _error_text(trial)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "ActorDiedError" in text or "RayActorError" in text or "actor died" in text.lower():
        pid = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("pid:")), None)
        cause = "its worker process died" + (f" (pid {pid})" if pid else "")
        if "SIGKILL" in text or "killed" in text.lower():
            cause += ", killed"
        return cause
    last = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "")
    return (" ".join(last.split())[:200] or "it raised an error")


def print_traceback(trial) -> None:
    """The whole error into the job's log, each line prefixed with :data:`TRACE_PREFIX`: the
    CLI shows one line per failure and these only with ``logs JOB --full``."""
    from jobs.client import TRACE_PREFIX

    text = _error_text(trial)
    if text:
        print("\n".join(f"{TRACE_PREFIX}{line}" for line in text.rstrip().splitlines()), flush=True)


class Progress(tune.Callback):
    """One line per epoch and per trial event (the job's log, followed by `submit --wait`), and
    the MLflow run of every trial Tune stopped on purpose closed: at once for one stopped before
    its last epoch, and at the experiment's end for any trial Tune ended without error whose run
    is still RUNNING (stopped inside ``tune.report``: at its last epoch, or by a stopper's
    ``stop_all``). Pickled with the tuner (``Tuner.restore`` brings it back): it holds names, not
    clients, and never lets an MLflow error break Tune's loop (``run_sweep`` checks again)."""

    def __init__(self, n_trials: int, tracking_uri: str, job_id: str, experiment_id: str,
                 parent_run_id: str | None = None, stopper: str = "Tune") -> None:
        self.n_trials, self.tracking_uri, self.job_id, self.experiment_id = n_trials, tracking_uri, job_id, experiment_id
        self.parent_run_id = parent_run_id
        self.stopper = stopper  # who stops trials early, for the log: "ASHA", or "Tune" (a stopper)
        self.done = 0
        self.reported_waiting: int | None = None

    def _uri(self) -> str:
        """This driver's tracking URI (a restored callback may carry an older one)."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri

    def _mlflow(self):
        """The driver's MLflow client for the callback: plain HTTP where it can (no MLflow import
        in Tune's loop), retrying a server that is away as long as MLflow's own client would."""
        from jobs.rest import mlflow_reader
        from jobs.tracking import patience_s

        return mlflow_reader(self._uri(), patience=patience_s())

    def on_step_end(self, iteration, trials, **info):
        """Tell the queue how many of the job's trials have not started yet (the parent run's
        ``mnistjobs.waiting_trials``): the next job in the queue starts when it reaches 0."""
        started = sum(t.status != "PENDING" for t in trials)
        waiting = max(0, self.n_trials - started)
        if waiting == getattr(self, "reported_waiting", None) or not getattr(self, "parent_run_id", None):
            return
        try:
            self._mlflow().set_tag(self.parent_run_id, TAG_WAITING_TRIALS, str(waiting))
            self.reported_waiting = waiting
        except Exception as e:  # noqa: BLE001 - never break Tune's loop; tried again next step
            print(f"  note: could not report the waiting trials to MLflow: {' '.join(str(e).split())[:200]}",
                  flush=True)

    @staticmethod
    def _name(trial) -> str:
        """The trial's name: a search's (``v2-t003``, Tune's trial name) or the grid point's."""
        if getattr(trial, "custom_trial_name", None):
            return trial.custom_trial_name
        try:
            return trial_name(trial.config)
        except Exception:  # noqa: BLE001 - a config that is no point of a grid
            return str(trial)

    @staticmethod
    def _epochs(trial) -> tuple[int | None, int]:
        """(the last epoch it reported, the epochs it plans)."""
        return (trial.last_result or {}).get("epoch"), trial_config(trial.config).epochs

    def _close(self, trials) -> None:
        """Close the still-RUNNING runs of ``trials`` (ended by Tune without error)."""
        from jobs.rest import job_runs

        wanted = {t.trial_id: t for t in trials}
        if not wanted:
            return
        try:
            mlf = self._mlflow()
            for run in job_runs(mlf, self.job_id, role="trial", experiment_ids=[self.experiment_id]):
                trial = wanted.get(run.data.tags.get(TAG_TRIAL))
                if trial is not None and run.info.status == "RUNNING":
                    close_stopped_run(mlf, run.info.run_id, *self._epochs(trial))
        except Exception as e:  # noqa: BLE001 - never break Tune's loop
            print(f"  note: could not close the MLflow run of a stopped trial: {' '.join(str(e).split())[:200]}",
                  flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        startup_mark(f"driver: Tune started trial {self._name(trial)}")
        from jobs import tracking

        tracking.trials_started()  # MLflow's own client, for the job's end, may be made now

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"[{self._name(trial)}] epoch {result.get('epoch')}/{self._epochs(trial)[1]}  "
              f"train {result.get('train_acc', float('nan')):.2f}%  "
              f"test {result.get('test_acc', float('nan')):.2f}%  "
              f"test loss {result.get('test_loss', float('nan')):.4f}  "
              f"lr {result.get('lr', float('nan')):.4g}  {result.get('epoch_seconds', 0):.1f}s", flush=True)

    def _diverged_reason(self, trial) -> str | None:
        """fit's one line when the trial's run ended FAILED with ``mnistjobs.diverged=true`` (the
        trial closes it itself and returns, so that Tune does not retry it)."""
        from jobs.rest import job_runs

        try:
            mlf = self._mlflow()
            for run in job_runs(mlf, self.job_id, role="trial", experiment_ids=[self.experiment_id]):
                if run.data.tags.get(TAG_TRIAL) == trial.trial_id and run.data.tags.get(TAG_DIVERGED) == "true":
                    return run.data.tags.get(TAG_DIVERGED_REASON) or "diverged"
        except Exception:  # noqa: BLE001 - never break Tune's loop
            pass
        return None

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        reason = self._diverged_reason(trial)
        if reason is not None:
            print(f"[{self._name(trial)}] DIVERGED, not retried: {reason} ({self.done}/{self.n_trials} trials done)",
                  flush=True)
            return
        epoch, planned = self._epochs(trial)
        if epoch is not None and epoch < planned:  # a stopper's or a scheduler's decision
            print(f"[{self._name(trial)}] stopped by {getattr(self, 'stopper', 'Tune')} after epoch {epoch}/{planned} "
                  f"({self.done}/{self.n_trials} trials done)", flush=True)
            self._close([trial])
        else:
            print(f"[{self._name(trial)}] finished ({self.done}/{self.n_trials} trials done)", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        epoch = (trial.last_result or {}).get("epoch")
        where = f"from epoch {epoch}'s checkpoint" if epoch else "from the start (no checkpoint yet)"
        print(f"[{self._name(trial)}] {failure_line(trial)}; retrying {where} (failure {trial.num_failures})",
              flush=True)
        print_traceback(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"[{self._name(trial)}] FAILED for good: {failure_line(trial)} ({self.done}/{self.n_trials} trials "
              f"done; `mnistjobs logs JOB --full` shows the traceback)", flush=True)
        print_traceback(trial)

    def on_experiment_end(self, trials, **info):
        self._close([t for t in trials if t.status == "TERMINATED"])


def open_sweep_run(mlf, spec, job_id: str, experiment_id: str, ray_job_id: str | None):
    """The job's parent run, marked RUNNING (``jobs.tracking.open_sweep_run``)."""
    from jobs import tracking

    return tracking.open_sweep_run(mlf, spec, job_id, experiment_id, ray_job_id)


def check_resources(spec) -> float:
    """The GPUs per trial; a note when a trial asks for more than the cluster has now."""
    import ray

    resources = ray.cluster_resources()
    gpus = spec.resolved_gpus(resources.get("GPU", 0))
    for what, need, have in (("GPU", gpus, resources.get("GPU", 0)), ("CPU", spec.cpus_per_trial, resources.get("CPU", 0))):
        if need > have:
            print(f"  note: each trial asks for {need:g} {what} but the cluster has {have:g} now; the trials "
                  f"wait until a node with enough {what}s joins", flush=True)
    print(f"  resources per trial: {spec.cpus_per_trial:g} CPU, {gpus:g} GPU", flush=True)
    return gpus


def build_tuner(spec, job: dict[str, Any], storage: str, gpus: float, *, resume: bool = False, stop=None):
    """The Tune experiment ``<storage>/<job id>``: restored when ``resume`` finds it, else new,
    over ``spec.param_space(job=job)``; ``stop`` is Tune's stop criterion (None: none)."""
    experiment_path = f"{storage}/{job['job_id']}"
    trainable = tune.with_resources(train_trial, {"cpu": float(spec.cpus_per_trial), "gpu": gpus})
    if resume and tune.Tuner.can_restore(experiment_path):
        print(f"  resuming the Tune experiment in {experiment_path}", flush=True)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True, restart_errored=False)
    if resume:
        print(f"  nothing to restore in {experiment_path}; starting the sweep afresh", flush=True)
    from jobs import search

    progress = Progress(spec.trial_count(), job["tracking_uri"], job["job_id"], job["experiment_id"],
                        job.get("parent_run_id"), stopper="ASHA" if spec.scheduler == "asha" else "Tune")
    return tune.Tuner(
        trainable, param_space=spec.param_space(job=job),
        # The search (jobs.search): metric, mode, num_samples, search_alg, scheduler, trial names.
        tune_config=tune.TuneConfig(reuse_actors=spec.reuse_workers, trial_dirname_creator=_trial_dirname,
                                    **search.tune_config_args(spec)),
        run_config=tune.RunConfig(
            name=job["job_id"], storage_path=storage, verbose=0, stop=stop,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Every epoch's checkpoint is kept (a few hundred KB each): with num_to_keep, a
            # driver killed between snapshots leaves Tune deleting checkpoints twice on resume.
            callbacks=[progress]))


def _tune_environment() -> None:
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; our callback prints
    # Snapshot the experiment state every 2 s (Tune's "auto": >= 10 s): a killed driver then
    # leaves a state that `resume` trusts, with finished trials finished and recent checkpoints.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # A trial's error goes to the log once, from Progress (one line, then the traceback marked
    # for `logs --full`), not also as Tune's own ERROR record.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Under a search (a TuneConfig metric) Tune fails the whole experiment on a result without the
    # metric; a trial that returns without reporting this session (resumed with nothing left to
    # train, finished already, diverged in its first epoch) ends with such a result. Its epochs are
    # in MLflow, where the search's outcome is judged (jobs.search.best_trial).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # No CSV, JSON and TensorBoard result files beside each trial: every metric is in MLflow, and
    # nothing here reads them (no ExperimentAnalysis; `resume` restores Tune's own state). The
    # TensorBoard logger imported tensorboardX, and with it torch, into the driver inside
    # Tuner.fit(): about 1.5 s before Tune asked for the first trial's worker.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ...so the ResultGrid Tuner.fit() returns finds no result files to read its trials' metrics
    # from (nothing here reads them) and warned so at the end of every job.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def run_sweep(spec, job_id: str, *, experiment_id: str, resume: bool = False, ray_job_id: str | None = None,
              stop=None, log_models: bool = True) -> int:
    """Run (or resume) the sweep on the Ray cluster this process belongs to, in the MLflow
    experiment ``experiment_id`` (created by the job client); return the exit code. ``stop``:
    Tune's stop criterion (``RunConfig(stop=...)``: a dict, a Stopper or a function).
    ``log_models=False`` (code and benchmarks only): the trials log no model, so nothing is
    registered either."""
    _tune_environment()
    import ray

    from jobs import tracking
    from jobs.datadir import find_data
    from mnistnets.data import DataError

    startup_mark("driver: tracking, datadir, mnistnets.data imported")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print("MLFLOW_TRACKING_URI is not set for this job; `mnistjobs submit` sets it.", file=sys.stderr)
        return 2
    storage = resolve_storage(spec.storage_path)
    from jobs import queue, rest

    # Until the trials run, plain HTTP (jobs.rest) where it does what MLflow's client would: the
    # queue entry, the parent run RUNNING and its tags (a driver started outside the queue, with
    # no parent run to find, creates it with MLflow's own client).
    mlf = rest.mlflow_reader(tracking_uri, patience=tracking.patience_s())  # retried, as MLflow's client would
    queued = queue.find(mlf, job_id)
    if queued is not None and queued.data.tags.get(TAG_QUEUE_STATE) == queue.CANCELLED:
        print(f"mnistjobs sweep {job_id}: cancelled while it was queued; not started", flush=True)
        return 0
    if queued is None and rest.is_lite(mlf):
        mlf = tracking.client(tracking_uri)
    startup_mark("driver: queue entry read")
    sweep_run = open_sweep_run(mlf, spec, job_id, experiment_id, ray_job_id)
    startup_mark("driver: parent run RUNNING")
    from jobs import search

    tracking.set_tags(mlf, sweep_run.run_id, search.parent_tags(spec))
    print(f"mnistjobs sweep {job_id}: {spec.summary()}", flush=True)
    if search.is_search(spec):
        from jobs.space import describe_space

        print("  " + describe_space(spec.parsed_space()).replace("\n", "\n  "), flush=True)
    print(f"  MLflow: {tracking.run_url(tracking_uri, experiment_id, sweep_run.run_id)}", flush=True)
    print(f"  Tune storage: {storage}/{job_id}", flush=True)

    def on_sigterm(signum, frame):  # `mnistjobs cancel` / `ray job stop`: no run stays RUNNING
        try:
            if mlf.get_run(sweep_run.run_id).data.tags.get(TAG_HELD) == "down":  # `mnistjobs down`
                print(f"mnistjobs sweep {job_id}: stopped by `mnistjobs down`; the queue starts it again at its "
                      f"place after `mnistjobs up`, from its trials' checkpoints", flush=True)
                return
            mlf.set_tag(sweep_run.run_id, TAG_QUEUE_STATE, queue.ENDED)
            n = rest.end_job_runs(mlf, job_id, "KILLED", experiment_ids=[experiment_id])
            print(f"mnistjobs sweep {job_id}: stopped; {n} MLflow run(s) marked KILLED", flush=True)
        finally:
            os._exit(128 + signum)

    startup_mark("driver: parent run tagged")
    connect_driver(spec)  # done already where the driver began with it (see the top of this module)
    signal.signal(signal.SIGTERM, on_sigterm)  # after ray.init(), which installs its own

    try:
        find_data(spec.data_dir)  # the four files are there (each trial reads and checks them)
    except DataError as e:
        print(f"mnistjobs sweep {job_id}: {e}", file=sys.stderr, flush=True)
        mlf.set_tag(sweep_run.run_id, TAG_QUEUE_STATE, queue.ENDED)
        sweep_run.finish("FAILED")
        return 1
    startup_mark("driver: data checked")
    job = {"job_id": job_id, "experiment_id": experiment_id, "parent_run_id": sweep_run.run_id,
           "tracking_uri": tracking_uri, "log_model": bool(log_models),
           # The state folder, where the trials find the embedded MLflow server's login
           # (jobs.record): a Ray job's trials have it in their env, a driver started otherwise
           # (the tests', a benchmark's) hands it on here.
           "home": os.environ.get("MNISTJOBS_HOME") or None,
           "system_metrics_interval": float(getattr(spec, "system_metrics_interval", 0) or 0)}
    tuner = build_tuner(spec, job, storage, check_resources(spec), resume=resume, stop=stop)
    later = tracking.LaterClient(tracking_uri)
    startup_mark("driver: tuner built, Tuner.fit()" + ("" if "mlflow" in sys.modules else " (MLflow's client not imported)"))
    start = time.perf_counter()
    results = tuner.fit()
    startup_mark("driver: Tuner.fit() returned")
    mlf = later.get()
    errors = results.num_errors
    # Trials that finished (or were stopped on purpose) closed their runs; any still RUNNING
    # failed for good.
    failed = tracking.end_job_runs(mlf, job_id, "FAILED", experiment_ids=[experiment_id], role=ROLE_TRIAL)
    trial_runs = tracking.job_runs(mlf, job_id, role=ROLE_TRIAL, experiment_ids=[experiment_id])
    diverged = sum(r.data.tags.get(TAG_DIVERGED) == "true" for r in trial_runs)
    # A diverged trial is an outcome of its recipe (in a search, of the space), not a failure
    # of the job: the job fails when every trial diverged.
    ok = errors == 0 and failed == 0 and (diverged == 0 or diverged < len(results))
    startup_mark("driver: trial runs read")
    finish_summary(mlf, spec, job_id, experiment_id, sweep_run.run_id, trial_runs)
    startup_mark("driver: summary logged, best models registered")
    mlf.set_tag(sweep_run.run_id, TAG_QUEUE_STATE, queue.ENDED)
    sweep_run.finish("FINISHED" if ok else "FAILED")
    startup_mark("driver: parent run closed")
    stopped = sum(r.data.tags.get(TAG_STOPPED_EARLY) == "true" for r in trial_runs)
    print(f"mnistjobs sweep {job_id}: {len(results)} trial{'s' if len(results) != 1 else ''}, {errors} failed, "
          + (f"{diverged} diverged, " if diverged else "")
          + (f"{stopped} stopped early by {'ASHA' if spec.scheduler == 'asha' else 'Tune'}, " if stopped else "")
          + f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0 if ok else 1


def summary_metrics(mlf, trial_runs) -> tuple[dict[str, float], str | None]:
    """The parent run's summary: per model, of its best trial (the FINISHED run with the highest
    final test accuracy), ``<model>.final_test_acc`` (its last test_acc, the last value at the
    last step) and ``<model>.best_epoch_test_acc`` (its highest epoch); then ``final_test_acc`` and
    ``best_epoch_test_acc`` of the sweep's best trial, whose run id is returned."""
    from jobs import mlflow_model as mm
    from jobs.tracking import metric_history

    metrics: dict[str, float] = {}
    top = None
    for model, run in sorted(mm.best_trials(trial_runs).items()):
        history = metric_history(mlf, run.info.run_id, ["test_acc"])["test_acc"]
        if not history:
            continue
        final, best = history[-1][1], max(value for _, value in history)
        metrics[f"{model}.{SUMMARY_FINAL}"], metrics[f"{model}.{SUMMARY_BEST}"] = final, best
        if top is None or final > top[0]:
            top = (final, best, run.info.run_id)
    if top is not None:
        metrics[SUMMARY_FINAL], metrics[SUMMARY_BEST] = top[0], top[1]
    return metrics, (top[2] if top else None)


def finish_summary(mlf, spec, job_id: str, experiment_id: str, parent_run_id: str, trial_runs) -> None:
    """At the sweep's end: the summary metrics on the parent run (:func:`summary_metrics`, step
    0), the tag ``mnistjobs.best_run_id``, and unless the spec says ``register: false`` each
    model's best trial registered (``jobs.mlflow_model.register_best``), one line each in the
    job's log. Never fails the job: a problem is one note line."""
    import time as _time

    from mlflow.entities import Metric, RunTag

    from jobs import mlflow_model as mm

    from jobs import search

    try:
        metrics, best_run = summary_metrics(mlf, trial_runs)
        now = int(_time.time() * 1000)
        # A search's best run is its outcome's (jobs.search.log_outcome, below): by --metric/--mode.
        tags = [RunTag(TAG_BEST_RUN, best_run)] if best_run and not search.is_search(spec) else []
        if metrics or tags:
            mlf.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], tags=tags)
        if SUMMARY_FINAL in metrics:
            names = {r.info.run_id: r.info.run_name for r in trial_runs}
            print(f"  best trial: {names.get(best_run, best_run)}, final test accuracy {metrics[SUMMARY_FINAL]:.2f}% "
                  f"(best epoch {metrics[SUMMARY_BEST]:.2f}%)", flush=True)
    except Exception as e:  # noqa: BLE001 - the trials' results are in MLflow either way
        print(f"  note: the sweep's summary was not logged to its parent run: {' '.join(str(e).split())[:300]}",
              flush=True)
    if search.is_search(spec):
        try:
            search.log_outcome(mlf, spec, parent_run_id, trial_runs, log=lambda m: print(m, flush=True))
        except Exception as e:  # noqa: BLE001 - the trials' results are in MLflow either way
            print(f"  note: the search's outcome was not logged to its parent run: {' '.join(str(e).split())[:300]}",
                  flush=True)
    if not getattr(spec, "register", True):
        print("  registry: not registered (--no-register / register: false)", flush=True)
        _set_tag_quietly(mlf, parent_run_id, TAG_REGISTERED, "off")
        return
    try:
        registered = mm.register_best(mlf, experiment_id, job_id=job_id, runs=trial_runs, log=lambda m: print(f"  registry: {m}", flush=True))
    except Exception as e:  # noqa: BLE001
        print(f"  note: registering the best trials failed: {' '.join(str(e).split())[:300]}", flush=True)
        return
    if not registered:
        print("  registry: no finished trial with a logged model; nothing registered", flush=True)
    for r in registered:
        print(f"  registered {r['name']} version {r['version']} (run {r['run_id']}, final test accuracy "
              f"{r['final_test_acc']:.2f}%); @{mm.BEST_ALIAS} -> version {r['best_version']} "
              f"({r['best_final_test_acc']:.2f}%): models:/{r['name']}@{mm.BEST_ALIAS}", flush=True)
    _set_tag_quietly(mlf, parent_run_id, TAG_REGISTERED,
                     ", ".join(f"{r['name']} v{r['version']}" for r in registered) or "none")


def _set_tag_quietly(mlf, run_id: str, key: str, value: str) -> None:
    try:
        mlf.set_tag(run_id, key, value)
    except Exception:  # noqa: BLE001 - informative only
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.sweep`: parse the arguments, run the sweep, return the exit code."""
    return run(parse_args(argv))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", required=True, help="the mnistjobs job id (names the Tune experiment)")
    parser.add_argument("--experiment-id", required=True,
                        help="the MLflow experiment's id (`mnistjobs submit` creates the experiment)")
    parser.add_argument("--spec", default=os.environ.get("MNISTJOBS_SPEC"),
                        help="the sweep spec as JSON, or @FILE holding it  [default: $MNISTJOBS_SPEC, "
                             "which `mnistjobs submit` sets]")
    parser.add_argument("--resume", action="store_true", help="restore the Tune experiment and finish it")
    parser.add_argument("--ray-job-id", default=None, help="the Ray submission id of this run of the job")
    args = parser.parse_args(argv)
    if not args.spec:
        parser.error("no sweep spec: give --spec or set MNISTJOBS_SPEC")
    return args


def run(args: argparse.Namespace) -> int:
    from jobs.spec import SpecError, driver_spec

    startup_mark("driver: jobs.spec imported")

    try:
        spec = driver_spec(args.spec)  # shallow: no torch in the driver
    except SpecError as e:
        print(f"bad sweep spec: {e}", file=sys.stderr)
        return 2
    return run_sweep(spec, args.job_id, experiment_id=args.experiment_id, resume=args.resume,
                     ray_job_id=args.ray_job_id)


def done_line(job_id: str, code: int) -> str:
    """The driver's last line (``jobs.contract.DONE_LINE``) for exit code ``code``."""
    return DONE_LINE.format(job_id=job_id, state="SUCCEEDED" if code == 0 else "FAILED")


if __name__ == "__main__":
    # Ray's connection is closed before the last line (so no forwarded trial line can follow it),
    # and the process then ends without the interpreter's module teardown (jobs.process.fast_exit):
    # Ray marks the job ended when this process is gone.
    _args = parse_args()
    _code = run(_args)
    import ray as _ray

    _ray.shutdown()
    startup_mark("driver: ray.shutdown() done")
    fast_exit(_code, last_words=done_line(_args.job_id, _code))
