"""The Ray job that runs one sweep: a Tune experiment with one trial per (model, schedule, seed).

``mnistjobs submit`` queues ``python -m jobs.sweep --job-id ID`` (the spec as JSON in
``$MNISTJOBS_SPEC``) through Ray's job submission API; ``mnistjobs resume ID`` queues the same
with ``--resume``, which restores the Tune experiment (``<storage>/<job id>``) and runs what is
left: unfinished and errored trials continue from their last checkpoint, finished ones are not
repeated.

A trial (``train_trial``) loads MNIST once per worker process, runs ``mnistnets.train.fit`` and,
after every epoch, logs the epoch to its MLflow run and then reports it to Tune with a checkpoint
(last.pt, best.pt and the MLflow run id). In that order a crash can only leave MLflow one epoch
ahead of the checkpoint, and the reopened run skips epochs it already has.

Exit code: 0 when every trial finished, 1 otherwise (so ``submit --wait`` fails too).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "mnistjobs_trial.json"  # in every checkpoint: the MLflow run id, the epoch

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


def train_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: one trial, resumable from its Tune checkpoint."""
    from ray import tune

    from jobs.tracking import TrialRun, client
    from mnistnets.models import count_parameters
    from mnistnets.summary import format_table
    from mnistnets.train import TrainConfig, build_model, fit, resolve_device

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # no line per checkpoint
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
        run_id, resume_from = None, None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                for name in ("last.pt", "best.pt", STATE_FILE):
                    if (Path(d) / name).is_file():
                        shutil.copy2(Path(d) / name, work / name)
            if (work / STATE_FILE).is_file():
                run_id = json.loads((work / STATE_FILE).read_text()).get("run_id")
            if (work / "last.pt").is_file():
                resume_from = work / "last.pt"

        mlf = client(job["tracking_uri"])
        run = TrialRun.open(mlf, experiment_id=job["experiment_id"], parent_run_id=job["parent_run_id"],
                            job_id=job["job_id"], trial_id=trial_id, name=trial["name"], run_id=run_id)
        device = resolve_device(cfg.device)
        node, device_label = _node_and_device(device)
        run.set_tags({"mnistjobs.node": node, "mnistjobs.device": device_label})
        model = build_model(cfg)
        run.log_params(cfg.to_dict(), params=count_parameters(model), device=device.type)
        run.log_text(format_table(model), "model/layers.txt")
        del model

        data = _load_data(cfg.data_dir)
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
        run.log_final_artifacts(work)
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


def default_storage_path() -> Path:
    from jobs.services import resolve_home

    return resolve_home() / "ray_results"


def run_sweep(spec, job_id: str, *, resume: bool = False, ray_job_id: str | None = None) -> int:
    """Run (or resume) the sweep on the Ray cluster this process belongs to; return the exit code."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; our callback prints
    import ray
    from ray import tune

    from jobs import tracking
    from mnistnets.data import DataError, load_mnist, resolve_data_dir

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print("MLFLOW_TRACKING_URI is not set for this job; `mnistjobs submit` sets it.", file=sys.stderr)
        return 2
    storage = Path(spec.storage_path or default_storage_path()).expanduser()
    storage.mkdir(parents=True, exist_ok=True)
    experiment_path = storage / job_id

    mlf = tracking.client(tracking_uri)
    params = {"models": spec.models, "schedules": ";".join(s for _, s in spec.schedule_labels()),
              "seeds": spec.seed_list(), "trials": len(spec.trials()), "epochs": spec.epochs,
              "batch_size": spec.batch_size, "optimizer": spec.optimizer, "augment": spec.augment,
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
    if resume and tune.Tuner.can_restore(str(experiment_path)):
        print(f"  resuming the Tune experiment in {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
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
                name=job_id, storage_path=str(storage), verbose=0,
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
