"""The Ray job that runs one sweep: a Tune experiment with one trial per (model, schedule, seed).

``mnistjobs submit`` queues ``python -m jobs.sweep --job-id ID`` (the spec as JSON in
``$MNISTJOBS_SPEC``) through Ray's job submission API; ``mnistjobs resume ID`` queues the same
with ``--resume``, which restores the Tune experiment (``<storage>/<job id>``) and runs what is
left: unfinished and errored trials continue from their last checkpoint, finished ones are not
repeated.

A trial (``train_trial``) loads MNIST once per worker process, runs ``mnistnets.train.fit`` and,
after every epoch, logs the epoch to its MLflow run and then reports it to Tune with a checkpoint
(last.pt, best.pt and the MLflow run id). In that order a crash can only leave MLflow one epoch
ahead of the checkpoint, and the reopened run skips epochs it already has. MLflow being away
does not stop training (jobs.tracking queues the calls); a retried trial logs the epochs its
checkpoint has and its run lacks. A corrupt or missing checkpoint falls back to the trial's
previous one; with none readable the trial fails with a clear error, never a silent restart.

Tune's storage: the spec's ``storage_path``, else ``$MNISTJOBS_STORAGE_PATH`` (set once per
cluster), else ``<state folder>/ray_results``; see ``default_storage_path``.

Exit code: 0 when every trial finished, 1 otherwise (so ``submit --wait`` fails too).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "mnistjobs_trial.json"  # in every checkpoint: the MLflow run id, the epoch
STORAGE_VAR = "MNISTJOBS_STORAGE_PATH"  # Tune's storage for every job of a cluster

# Module-level: one copy of MNIST per worker process, shared by the trials that process runs.
_DATA_CACHE: dict[str, Any] = {}


def _load_data(data_dir: str | None):
    from mnistnets.data import load_mnist, resolve_data_dir

    folder = str(resolve_data_dir(data_dir))
    if folder not in _DATA_CACHE:
        _DATA_CACHE[folder] = load_mnist(folder)
    return _DATA_CACHE[folder]


def _node_and_device(device) -> tuple[str, str]:
    import ray

    try:
        node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # pragma: no cover - outside Ray
        import socket

        node = socket.gethostname()
    label = str(device)
    if device.type == "cuda":
        import torch

        label = f"{device.type}:{torch.cuda.get_device_name(device)}"
    return node, label


def _trial_storage(context, checkpoint) -> tuple[Any, str] | None:
    """(pyarrow filesystem, the trial's folder in Tune's storage: local, NFS or s3://)."""
    try:
        storage = context.get_storage()
        return storage.storage_filesystem, storage.trial_fs_path
    except Exception:  # noqa: BLE001 - outside a Tune session, or another Ray: the checkpoint's folder
        if checkpoint is None:
            return None
        return checkpoint.filesystem, posixpath.dirname(str(checkpoint.path).rstrip("/"))


def _checkpoints(checkpoint, storage: tuple[Any, str] | None) -> list:
    """Every checkpoint of the trial, the most advanced first: Tune's own (``checkpoint``) and
    the checkpoint_NNNNNN folders beside it, ranked by the epoch their state file names.

    A trial's checkpoints are interchangeable (training is deterministic), so the newest readable
    one is the right start even when Tune's experiment snapshot, written every few seconds by a
    driver that was then killed, names an older one or none."""
    import pyarrow.fs as pafs
    from ray import tune

    found = {}
    if checkpoint is not None:
        found[str(checkpoint.path).rstrip("/")] = checkpoint
    if storage is not None:
        fs, folder = storage
        try:
            for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                if info.type == pafs.FileType.Directory and re.fullmatch(r"checkpoint_\d+", info.base_name):
                    found.setdefault(info.path.rstrip("/"), tune.Checkpoint(info.path, filesystem=fs))
        except Exception:  # noqa: BLE001 - no listing: Tune's checkpoint only
            pass

    def rank(candidate) -> tuple[int, str]:
        try:
            with candidate.filesystem.open_input_stream(posixpath.join(str(candidate.path), STATE_FILE)) as f:
                epoch = int(json.loads(f.read()).get("epoch", -1))
        except Exception:  # noqa: BLE001 - unreadable or gone: tried last
            epoch = -1
        return epoch, posixpath.basename(str(candidate.path).rstrip("/"))

    return sorted(found.values(), key=rank, reverse=True)


def _restore(checkpoint, work: Path, name: str,
             storage: tuple[Any, str] | None = None) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """Copy the trial's newest readable checkpoint into ``work``: (last.pt, its state, the MLflow
    run id), or (None, None, None) when the trial has none (a fresh start). A corrupt or missing
    last.pt falls back to the previous checkpoint; with checkpoints but none readable,
    CheckpointError: a trial never starts again from epoch 1 behind the user's back."""
    from mnistnets.train import CheckpointError, load_checkpoint

    if storage is None and checkpoint is not None:
        storage = (checkpoint.filesystem, posixpath.dirname(str(checkpoint.path).rstrip("/")))
    candidates = _checkpoints(checkpoint, storage)
    if not candidates:
        return None, None, None
    problems = []
    for candidate in candidates:
        staging = Path(tempfile.mkdtemp(prefix="restore-", dir=work))
        try:
            with candidate.as_directory() as d:
                for fname in ("last.pt", "best.pt", STATE_FILE):
                    if (Path(d) / fname).is_file():
                        shutil.copy2(Path(d) / fname, staging / fname)
            state = load_checkpoint(staging / "last.pt")
        except Exception as e:  # noqa: BLE001 - CheckpointError, or a checkpoint folder that is gone
            reason = " ".join(str(e).replace(str(staging / "last.pt"), f"{candidate.path}/last.pt").split())
            reason = reason if len(reason) <= 200 else reason[:197] + "..."
            problems.append(reason if str(candidate.path) in reason else f"{candidate.path}: {reason}")
            shutil.rmtree(staging, ignore_errors=True)
            continue
        for fname in ("last.pt", "best.pt", STATE_FILE):
            if (staging / fname).is_file():
                os.replace(staging / fname, work / fname)
        shutil.rmtree(staging, ignore_errors=True)
        run_id = None
        try:
            run_id = json.loads((work / STATE_FILE).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            pass  # the run is found by its trial tag
        if problems:
            print(f"[{name}] checkpoint unusable, fell back to an older one: {'; '.join(problems)}", flush=True)
        print(f"[{name}] resuming after epoch {state['epoch']} from {candidate.path}"
              + (" (the epochs after it are trained again and not logged twice)" if problems else ""), flush=True)
        return work / "last.pt", state, run_id
    raise CheckpointError(
        f"Trial {name} cannot resume: no checkpoint of it is readable ({'; '.join(problems)}). It is not "
        f"started again from epoch 1 (its MLflow run keeps the epochs it logged). Restore the checkpoint "
        f"files in Tune's storage and `mnistjobs resume` the job, or submit the trial as a new job.")


def _limit_threads() -> None:
    """As many torch threads as the trial has CPUs: trials sharing a node must not oversubscribe it
    (Ray's OMP_NUM_THREADS does not reach a torch imported before it was set)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    torch.set_num_threads(max(1, int(cpus)))


def train_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: one trial, resumable from its Tune checkpoint."""
    from ray import tune

    from jobs import tracking
    from mnistnets.data import DataError
    from mnistnets.models import count_parameters
    from mnistnets.summary import format_table
    from mnistnets.train import TrainConfig, build_model, fit, load_checkpoint, resolve_device

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # no line per checkpoint
    _limit_threads()
    tracking.fail_fast_requests()  # TrialRun retries; MLflow's own retries would stall training
    trial, job = config["trial"], config["job"]
    cfg = TrainConfig.from_dict(dict(trial["train"]))
    context = tune.get_context()
    trial_id = context.get_trial_id()
    # fit()'s checkpoint folder, in the trial's local folder (under Ray's session dir, so a killed
    # trial leaves nothing in /tmp itself); what persists is what Tune copies to its storage.
    try:
        local = Path(context.get_trial_dir())
    except Exception:  # pragma: no cover - outside a Tune session
        local = Path(tempfile.gettempdir())
    local.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mnistjobs-work-", dir=local))
    try:
        checkpoint = tune.get_checkpoint()
        resume_from, resumed, run_id = _restore(checkpoint, work, trial["name"], _trial_storage(context, checkpoint))
        mlf = tracking.client(job["tracking_uri"])
        if resumed is not None and resumed["epoch"] >= cfg.epochs and tracking.run_finished(mlf, run_id):
            # Trained and logged to the end before a driver died: Tune's snapshot did not know.
            print(f"[{trial['name']}] finished already (epoch {resumed['epoch']}/{cfg.epochs}, MLflow run "
                  f"FINISHED): nothing to repeat", flush=True)
            return

        run = tracking.TrialRun.open(mlf, experiment_id=job["experiment_id"],
                                     parent_run_id=job["parent_run_id"], job_id=job["job_id"],
                                     trial_id=trial_id, name=trial["name"], run_id=run_id)
        device = resolve_device(cfg.device)
        node, device_label = _node_and_device(device)
        run.set_tags({tracking.TAG_NODE: node, tracking.TAG_DEVICE: device_label})
        model = build_model(cfg)
        run.log_params(cfg.to_dict(), params=count_parameters(model), device=device.type)
        run.log_text(format_table(model), "model/layers.txt")
        del model
        if resumed is not None:  # epochs the checkpoint has and the run lacks (MLflow was away)
            for past in resumed.get("history", []):
                run.log_epoch(past)

        try:
            data = _load_data(cfg.data_dir)
        except DataError as e:
            raise DataError(f"On Ray node {node}: {e} A data folder is read on the node that runs the "
                            f"trial: with --address, give --data-dir (MNISTJOBS_DATA_DIR) as a path on the "
                            f"cluster's nodes, not on the machine you submit from.") from None
        for result in fit(cfg, data=data, checkpoint_dir=work, resume_from=resume_from):
            run.log_epoch(result)
            (work / STATE_FILE).write_text(json.dumps({"run_id": run.run_id, "epoch": result["epoch"],
                                                       "trial_id": trial_id}))
            metrics = {k: v for k, v in result.items() if k != "checkpoint"}
            metrics["best"] = bool(metrics.get("best"))
            with tempfile.TemporaryDirectory(prefix="mnistjobs-ckpt-", dir=local) as tmp:
                for name in ("last.pt", "best.pt", STATE_FILE):
                    if (work / name).is_file():
                        shutil.copy2(work / name, Path(tmp) / name)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        history = load_checkpoint(work / "last.pt").get("history") if (work / "last.pt").is_file() else None
        run.log_final_artifacts(work, history=history)
        run.finish("FINISHED")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trial_dirname(trial) -> str:
    return f"{trial.config['trial']['name']}_{trial.trial_id}"


def _progress_callback(n_trials: int):
    from ray import tune

    class Progress(tune.Callback):
        """One line per epoch and per trial event: the job's log, followed by `submit --wait`."""

        def __init__(self) -> None:
            self.done = 0

        @staticmethod
        def _name(trial) -> str:
            return trial.config.get("trial", {}).get("name", str(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            epochs = trial.config.get("trial", {}).get("train", {}).get("epochs", "?")
            print(f"[{self._name(trial)}] epoch {result.get('epoch')}/{epochs}  "
                  f"train {result.get('train_acc', float('nan')):.2f}%  "
                  f"test {result.get('test_acc', float('nan')):.2f}%  "
                  f"test loss {result.get('test_loss', float('nan')):.4f}  "
                  f"lr {result.get('lr', float('nan')):.4g}  {result.get('epoch_seconds', 0):.1f}s", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{self._name(trial)}] finished ({self.done}/{n_trials} trials done)", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"[{self._name(trial)}] failed; retrying from its last checkpoint", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{self._name(trial)}] FAILED for good ({self.done}/{n_trials} trials done); "
                  f"see its error in the Ray dashboard or the job log", flush=True)

    return Progress()


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
    from jobs.services import resolve_home

    return str(resolve_home() / "ray_results")


def _or_recipe(value):
    return "per model recipe" if value is None else value


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


def run_sweep(spec, job_id: str, *, resume: bool = False, ray_job_id: str | None = None) -> int:
    """Run (or resume) the sweep on the Ray cluster this process belongs to; return the exit code."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; our callback prints
    # Snapshot the experiment state every 2 s (Tune's "auto": >= 10 s): a killed driver then
    # leaves a state that `resume` trusts, with finished trials finished and recent checkpoints.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    import ray
    from ray import tune

    from jobs import tracking
    from mnistnets.data import DataError, load_mnist, resolve_data_dir

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print("MLFLOW_TRACKING_URI is not set for this job; `mnistjobs submit` sets it.", file=sys.stderr)
        return 2
    storage = resolve_storage(spec.storage_path)
    experiment_path = f"{storage}/{job_id}"

    mlf = tracking.client(tracking_uri)
    params = {"models": spec.models, "schedules": ";".join(s for _, s in spec.schedule_labels()),
              "seeds": spec.seed_list(), "trials": len(spec.trials()), "epochs": spec.epochs,
              "batch_size": _or_recipe(spec.batch_size), "optimizer": _or_recipe(spec.optimizer),
              "augment": _or_recipe(spec.augment),
              "train_limit": spec.train_limit, "test_limit": spec.test_limit,
              "gpus_per_trial": spec.gpus_per_trial, "cpus_per_trial": spec.cpus_per_trial,
              "max_failures": spec.max_failures}
    sweep_run = tracking.SweepRun.open(mlf, spec.experiment, job_id, spec.to_dict(), params=params,
                                       ray_job_id=ray_job_id)
    print(f"mnistjobs sweep {job_id}: {spec.summary()}", flush=True)
    print(f"  MLflow: {tracking.run_url(tracking_uri, sweep_run.experiment_id, sweep_run.run_id)}", flush=True)
    print(f"  Tune storage: {experiment_path}", flush=True)

    def on_sigterm(signum, frame):  # `mnistjobs cancel` / `ray job stop`: no run stays RUNNING
        try:
            n = tracking.end_job_runs(mlf, job_id, "KILLED", experiment_ids=[sweep_run.experiment_id])
            print(f"mnistjobs sweep {job_id}: stopped; {n} MLflow run(s) marked KILLED", flush=True)
        finally:
            os._exit(128 + signum)

    ray.init(log_to_driver=True, logging_level="WARNING")
    signal.signal(signal.SIGTERM, on_sigterm)  # after ray.init(), which installs its own

    try:
        load_mnist(resolve_data_dir(spec.data_dir), train_limit=1, test_limit=1)
    except DataError as e:
        print(f"mnistjobs sweep {job_id}: {e}", file=sys.stderr, flush=True)
        sweep_run.finish("FAILED")
        return 1

    resources = ray.cluster_resources()
    gpus = spec.resolved_gpus(resources.get("GPU", 0))
    for what, need, have in (("GPU", gpus, resources.get("GPU", 0)), ("CPU", spec.cpus_per_trial, resources.get("CPU", 0))):
        if need > have:
            print(f"  note: each trial asks for {need:g} {what} but the cluster has {have:g} now; the trials "
                  f"wait until a node with enough {what}s joins", flush=True)
    print(f"  resources per trial: {spec.cpus_per_trial:g} CPU, {gpus:g} GPU", flush=True)
    trials = spec.trials()
    trainable = tune.with_resources(train_trial, {"cpu": float(spec.cpus_per_trial), "gpu": gpus})
    if resume and tune.Tuner.can_restore(experiment_path):
        print(f"  resuming the Tune experiment in {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    else:
        if resume:
            print(f"  nothing to restore in {experiment_path}; starting the sweep afresh", flush=True)
        job = {"job_id": job_id, "experiment_id": sweep_run.experiment_id,
               "parent_run_id": sweep_run.run_id, "tracking_uri": tracking_uri}
        param_space = {"job": job, "trial": tune.grid_search([{"name": n, "train": c} for n, c in trials])}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent or None, reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=job_id, storage_path=storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # Every epoch's checkpoint is kept (a few hundred KB each): with num_to_keep, a
                # driver killed between snapshots leaves Tune deleting checkpoints twice on resume.
                callbacks=[_progress_callback(len(trials))]))
    start = time.perf_counter()
    results = tuner.fit()
    errors = results.num_errors
    # Trials that finished closed their runs; any still RUNNING failed for good.
    failed = 0
    for run in tracking.job_runs(mlf, job_id, role="trial", experiment_ids=[sweep_run.experiment_id]):
        if run.info.status == "RUNNING":
            mlf.set_terminated(run.info.run_id, "FAILED")
            failed += 1
    ok = errors == 0 and failed == 0
    sweep_run.finish("FINISHED" if ok else "FAILED")
    print(f"mnistjobs sweep {job_id}: {len(results)} trial{'s' if len(results) != 1 else ''}, {errors} failed, "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", required=True, help="the mnistjobs job id (names the Tune experiment)")
    parser.add_argument("--spec", default=os.environ.get("MNISTJOBS_SPEC"),
                        help="the sweep spec as JSON, or @FILE holding it  [default: $MNISTJOBS_SPEC, "
                             "which `mnistjobs submit` sets]")
    parser.add_argument("--resume", action="store_true", help="restore the Tune experiment and finish it")
    parser.add_argument("--ray-job-id", default=None, help="the Ray submission id of this run of the job")
    args = parser.parse_args(argv)
    if not args.spec:
        parser.error("no sweep spec: give --spec or set MNISTJOBS_SPEC")

    from jobs.spec import SpecError, SweepSpec

    text = Path(args.spec[1:]).read_text() if args.spec.startswith("@") else args.spec
    try:
        spec = SweepSpec.from_json(text).validate()
    except SpecError as e:
        print(f"bad sweep spec: {e}", file=sys.stderr)
        return 2
    return run_sweep(spec, args.job_id, resume=args.resume, ray_job_id=args.ray_job_id)


if __name__ == "__main__":
    sys.exit(main())
