"""One trial of a sweep: Tune's function trainable (:func:`train_trial`) and its checkpoints.

The trial's config is one point of the spec's grid (``jobs.spec``): its TrainConfig is built
here, inside the trial, with ``recipe_for`` (:func:`jobs.grid.trial_config`), its name from the
same config (:func:`jobs.grid.trial_name`). MNIST is loaded once per worker process; the trial
runs ``mnistnets.train.fit`` and, after every epoch, logs the epoch to its MLflow run and then
reports it to Tune with a checkpoint (last.pt, best.pt and the MLflow run id). In that order a
crash can only leave MLflow one epoch ahead of the checkpoint, and the reopened run skips epochs
it already has. MLflow being away does not stop training (jobs.tracking queues the calls); a
retried trial logs the epochs its checkpoint has and its run lacks. A corrupt or missing
checkpoint falls back to the trial's previous one; with none readable the trial fails with a
clear error, never a silent restart.

The model and the system metrics (issue 15): after its last epoch a trial logs its final model
(the weights ``fit`` scored and checkpointed: the EMA weights when EMA is on) once, as the
LoggedModel of its run (:func:`log_model`, ``jobs.mlflow_model``): a retried or resumed trial
whose run has a READY model logs none. A trial stopped early logs no model (a scheduler's loser:
the registry and ``verify`` skip it); one stopped inside its last report does. While it runs,
MLflow's own SystemMetricsMonitor samples CPU, memory (and the GPUs nvidia-ml-py sees) every
``system_metrics_interval`` s of the spec into the run (:func:`start_system_metrics`). The run
also carries ``mnistjobs.data_dir``: the folder its test images came from, for ``verify``.

Stopped on purpose: when Tune stops a trial (a stopper, a scheduler's STOP), Ray's session ends
the function inside ``tune.report`` with ``SystemExit(0)`` (ray/train/_internal/session.py,
``_report_training_result``), so ``fit``'s loop never reaches ``run.finish``. The trial then logs
its final artifacts and ends its run FINISHED, tagged ``mnistjobs.stopped_early`` /
``mnistjobs.stopped_at_epoch`` when it trained fewer epochs than planned. That is best effort
(Tune may end the worker meanwhile); the driver makes sure of the status and tags
(``jobs.sweep``, :func:`jobs.sweep.close_stopped_run`).

Diverged: when ``fit`` raises ``mnistnets.train.Diverged`` (the training loss became NaN or
infinite; checked at the end of each epoch), the trial ends its run FAILED, tagged
``mnistjobs.diverged=true`` and ``mnistjobs.diverged_reason=<fit's one line>``, and returns
normally: Tune retries a trial that raises, and a retry would only diverge again. Tune sees the
trial as ended (TERMINATED) with the last good epoch as its last result; the driver leaves the run
as it is (it only closes runs still RUNNING).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from jobs.contract import (LAYERS_ARTIFACT, TAG_DATA_DIR, TAG_DEVICE, TAG_DIVERGED, TAG_DIVERGED_REASON, TAG_JOB,
                           TAG_NODE, TAG_STOPPED_AT, TAG_STOPPED_EARLY, TAG_TRIAL)
from jobs.process import process_started_at, startup_mark

STATE_FILE = "mnistjobs_trial.json"  # in every checkpoint: the MLflow run id, the epoch
STOPPED_WAIT_S = 20.0  # how long a stopped trial waits for MLflow (the driver closes its run anyway)
#: How long Tune lets a stopped trial's thread finish before it reuses the worker for the next trial
#: (Ray's TUNE_FUNCTION_THREAD_TIMEOUT_S, read by the worker, default 2 s). A trial ASHA stops at its
#: last epoch logs its model and artifacts after the stop (several seconds); past the timeout Tune
#: cannot reuse the worker and fails the NEXT trial ("Could not re-use actor", then its searcher
#: waits for that trial forever under --max-concurrent).
STOPPED_THREAD_TIMEOUT_S = 300

# Module-level: one copy of MNIST per worker process, shared by the trials that process runs.
_DATA_CACHE: dict[str, Any] = {}
_DATA_LOCK = threading.Lock()  # one reader at a time: the warm-up's (warm_worker) and a trial's


def _read_data(data_dir: str | None, download: bool = True):
    """(the folder MNIST is read from, the data), read once per worker process (``_DATA_CACHE``;
    a trial whose worker is still reading it waits for that read). ``download``: fill the state
    folder's copy when no folder is given and it lacks the files (``resolve_data_dir``)."""
    from jobs.datadir import resolve_data_dir
    from mnistnets.data import load_mnist

    folder = str(Path(resolve_data_dir(data_dir, download=download)).resolve())
    with _DATA_LOCK:
        if folder not in _DATA_CACHE:
            _DATA_CACHE[folder] = load_mnist(folder)
    return folder, _DATA_CACHE[folder]


class _DataReader:
    """MNIST read in a thread from the trial's start, while the trial looks up its checkpoint and
    opens its MLflow run (HTTP, and zlib and torch release the GIL as they read): about 0.5 s of a
    trial's start on a 2-core machine. ``result(node)`` waits for it."""

    def __init__(self, data_dir: str | None, download: bool = True):
        self._outcome: tuple | None = None
        self._thread = threading.Thread(target=self._read, args=(data_dir, download), name="mnistjobs-data",
                                        daemon=True)
        self._thread.start()

    def _read(self, data_dir: str | None, download: bool) -> None:
        try:
            self._outcome = ("ok", _read_data(data_dir, download))
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread by result()
            self._outcome = ("error", exc)

    def join(self) -> None:
        """Wait for the read (its outcome, or its error, stays for ``result``)."""
        self._thread.join()

    def result(self, node: str):
        """(the folder, the data), or the reader's error (a DataError says on which node)."""
        from mnistnets.data import DataError

        self._thread.join()
        kind, value = self._outcome
        if kind == "ok":
            return value
        if isinstance(value, DataError):
            raise DataError(f"On Ray node {node}: {value} A data folder is read on the node that runs the "
                            f"trial: with --address, give --data-dir (MNISTJOBS_DATA_DIR) as a path on the "
                            f"cluster's nodes, not on the machine you submit from.") from None
        raise value


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


#: Ray's worker_process_setup_hook for the workers of a sweep's Ray job (the driver's ray.init).
WARM_HOOK = "jobs.trial.warm_worker"


def warm_worker() -> None:
    """Import what a trial needs before it is given one (torch and the trainer, then Tune's
    function trainable), and start reading the job's MNIST.

    The driver names this function as its job's ``worker_process_setup_hook``, so Ray runs it in
    each worker of the sweep's job as the worker starts, before the worker takes work. The first
    trials' workers are started ahead of Tune (``jobs.rayconnect``: by the queue's admitter as it
    starts the job, else by the driver at its ``ray.init``), so this runs while Ray starts the
    driver and Tune sets up. Ray hands the worker a trial only when the hook returns, so it
    returns once torch, the trainer and Tune are in (about 2.5-3 s of one core of a 2-core CPU);
    MNIST (the folder the job's spec names, or ``$MNISTJOBS_DATA_DIR``; never a download) is read
    in a thread from the moment torch is in. MLflow's client (about 1 s of CPU) is left to the
    trial, which imports it once its first batch is done and opens its run in a thread while it
    trains (:class:`_RunOpener`): on a small CPU every process on the way to the first batch (the
    driver, Tune, this worker) is CPU-bound. A worker Ray starts later, for a trial beyond those,
    warms up the same way before its trial. Nothing here touches CUDA, so the GPU Ray gives the
    trial later (CUDA_VISIBLE_DEVICES, read at CUDA's first use) still applies. Never raises: a
    failing hook would make Ray end the worker; a trial imports and reads anything missing itself."""
    began = time.time()
    try:
        import mnistnets.train  # noqa: F401 - torch
        _prefetch_data()
        from ray import tune  # noqa: F401 - the function trainable's own imports (pandas among them)

        from jobs import grid, tracking  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head start
        return
    _WARMED.update(began=began, ended=time.time())  # marked by the trial (this output goes nowhere yet)
    _end_if_never_used()


#: The warm-up's read of the job's MNIST (:func:`_prefetch_data`; a test waits for it).
_PREFETCH: list[_DataReader] = []


def _prefetch_data() -> None:
    """Read the job's MNIST into this process's cache in a thread (a :class:`_DataReader`: zlib and
    torch release the GIL as they read), when the job's spec (its env var) or ``$MNISTJOBS_DATA_DIR``
    names a folder that holds it, or the state folder has its copy; nothing when it would have to be
    downloaded (the trial does that, with its errors). Its own errors are dropped: the trial's read
    meets them again."""
    from jobs.client import SPEC_VAR

    try:
        data_dir = json.loads(os.environ.get(SPEC_VAR) or "{}").get("data_dir")
    except (ValueError, AttributeError):
        return
    _PREFETCH.append(_DataReader(data_dir, download=False))


_WARMED: dict[str, float] = {}

#: A worker the queue's admitter had started ahead of its job's driver belongs to no job until a
#: trial takes it; one that no trial took this many seconds after it warmed ends itself
#: (``$MNISTJOBS_UNUSED_WORKER_EXIT_S``: the tests' shorter wait). Ray would keep it: the raylet
#: ends idle workers only beyond one a CPU, and no other job can use it (its runtime_env is its job's).
UNUSED_WORKER_EXIT_S = 90.0


def _end_if_never_used() -> None:
    """Watch, from a daemon thread, whether this worker is given a job within the wait; if not, it
    leaves Ray's worker pool and ends (Ray's own drain-and-exit). A worker a job started, or one a
    trial took meanwhile, is left to Ray, which ends it with its job."""
    try:
        import ray

        worker = ray._private.worker.global_worker
        wait = float(os.environ.get("MNISTJOBS_UNUSED_WORKER_EXIT_S") or UNUSED_WORKER_EXIT_S)
        if not worker.connected or worker.mode != ray.WORKER_MODE:
            return  # not a Ray worker (a test calling the hook itself): nothing to watch
    except Exception:  # noqa: BLE001 - only a clean-up
        return

    def watch() -> None:
        time.sleep(wait)
        if worker.current_job_id.is_nil():
            worker.core_worker.drain_and_exit_worker(
                "user", "mnistjobs: a trial worker started ahead of its job that no trial took")

    threading.Thread(target=watch, name="mnistjobs-unused-worker", daemon=True).start()


def _limit_threads() -> None:
    """As many torch threads as the trial has CPUs: trials sharing a node must not oversubscribe it
    (Ray's OMP_NUM_THREADS does not reach a torch imported before it was set)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    torch.set_num_threads(max(1, int(cpus)))


def train_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: one trial (a point of the grid), resumable from its checkpoint."""
    began = time.time()
    startup_mark("trial worker process started", process_started_at())
    startup_mark("trial function entered", began)
    if _WARMED:  # the first trial of a worker that warm_worker warmed: when that happened
        startup_mark("worker: warming began", _WARMED.pop("began"))
        startup_mark("worker: warmed (torch, Tune imported; MNIST read behind)", _WARMED.pop("ended"))
    from ray import tune

    from jobs import tracking
    from jobs.grid import trial_config
    from mnistnets.train import Diverged

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # no line per checkpoint
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(STOPPED_THREAD_TIMEOUT_S))  # this worker's reuse
    startup_mark("trial: imports done")
    _limit_threads()
    startup_mark("trial: torch threads set (torch imported)")
    tracking.fail_fast_requests()  # TrialRun retries; MLflow's own retries would stall training
    job, cfg = config["job"], trial_config(config)
    reader = _DataReader(cfg.data_dir)
    if job.get("home") and not os.environ.get("MNISTJOBS_HOME"):
        os.environ["MNISTJOBS_HOME"] = job["home"]  # the embedded MLflow's login is found there
    context = tune.get_context()
    trial_id = context.get_trial_id()
    name = _trial_name(config, context)
    # fit()'s checkpoint folder, in the trial's local folder (under Ray's session dir, so a killed
    # trial leaves nothing in /tmp itself); what persists is what Tune copies to its storage.
    try:
        local = Path(context.get_trial_dir())
    except Exception:  # pragma: no cover - outside a Tune session
        local = Path(tempfile.gettempdir())
    local.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mnistjobs-work-", dir=local))
    opener = None
    try:
        checkpoint = tune.get_checkpoint()
        resume_from, resumed, run_id = _restore(checkpoint, work, name, _trial_storage(context, checkpoint))
        startup_mark("trial: checkpoint looked up")
        facts = _describe(cfg)
        # The trial's MLflow side (the client, its run, params, tags, layer table, system metrics)
        # opens in a thread while it trains (_RunOpener); the epochs wait for it only at their end.
        # The job's own URI first: a trial restored after `up` runs under a new Ray job whose
        # environment holds the tracking URI of the services running now.
        opener = _RunOpener(os.environ.get("MLFLOW_TRACKING_URI") or job["tracking_uri"], job, cfg, facts,
                            name=name, trial_id=trial_id, run_id=run_id, resumed=resumed)
        if opener.complete and opener.finished_already():
            # Trained and logged to the end before a driver died: Tune's snapshot did not know.
            print(f"[{name}] finished already (epoch {resumed['epoch']}/{cfg.epochs}, MLflow run "
                  f"FINISHED): nothing to repeat", flush=True)
            return
        folder, data = reader.result(facts["node"])
        startup_mark("trial: data loaded (read in a thread meanwhile)")
        opener.tags_once_open({TAG_DATA_DIR: folder})

        def first_batch():
            startup_mark(f"trial: first batch ({time.time() - began:.1f} s after the trial began)")
            opener.training_started()

        try:
            for result in _fit_and_log(opener, cfg, data, work, resume_from, first_batch):
                try:
                    _report(result, work, local)
                except SystemExit as stop:  # Tune stopped this trial on purpose (see the module's doc)
                    if stop.code in (0, None):
                        opener.stop_system_metrics()
                        _end_stopped(opener.run(), work, name, int(result["epoch"]), cfg.epochs, cfg=cfg,
                                     data=data, with_model=job.get("log_model", True))
                    raise
        except Diverged as diverged:  # ends FAILED and returns: Tune retries only a trial that raises
            run = opener.run()
            opener.stop_system_metrics()
            _end_diverged(run, work, name, diverged)
            return
        run = opener.run()
        if job.get("log_model", True):
            log_model(run, cfg, data, work, name)
        opener.stop_system_metrics()
        _end(run, work)
        run.finish("FINISHED")
    finally:
        if opener is not None:
            opener.stop_system_metrics()
        shutil.rmtree(work, ignore_errors=True)


#: How long a trial's run opener waits for the first batch before it imports MLflow's client anyway.
OPENER_WAIT_S = 60.0


class _RunOpener:
    """A trial's MLflow side, opened in a thread while the trial trains: MLflow's client (imported
    once the trial's first batch is done, :meth:`training_started`, when the process has not
    imported it yet: about 1 s of CPU), the trial's run (:class:`jobs.tracking.TrialRun`: reopened
    or created), its node and device tags, params and layer table (the epochs a resumed checkpoint
    has and the run lacks), the model logging's imports, and the system metrics. :meth:`run` waits
    for it and raises what it raised; the trial calls it at the end of its first epoch, so the first
    batch does not wait for MLflow (about 1 s of imports and 0.1-0.5 s of requests on a 2-core CPU).
    What it needs of torch (the model: its size and layer table, built from the global RNG) is read
    before, in the trial's own thread (:func:`_describe`)."""

    def __init__(self, tracking_uri: str, job: dict[str, Any], cfg, facts: dict[str, Any], *, name: str,
                 trial_id: str, run_id: str | None, resumed: dict[str, Any] | None) -> None:
        self.tracking_uri, self.job, self.cfg, self.facts = tracking_uri, job, cfg, facts
        self.name, self.trial_id, self.run_id, self.resumed = name, trial_id, run_id, resumed
        #: Restored from the checkpoint of its last epoch: the run may be FINISHED already (finished_already)
        self.complete = resumed is not None and resumed["epoch"] >= cfg.epochs
        self._mlf = None
        self._run = None
        self._monitor = None
        self._error: BaseException | None = None
        self._later: dict[str, Any] = {}
        self._go = threading.Event()  # set at the first batch (training_started), or when the run is wanted
        self._thread = threading.Thread(target=self._open, name="mnistjobs-run-opener", daemon=True)
        self._thread.start()

    def training_started(self) -> None:
        """The trial's first batch is done: MLflow's client may be imported now."""
        self._go.set()

    def _open(self) -> None:
        from jobs import tracking

        try:
            if "mlflow" not in sys.modules:  # its imports (~1 s of CPU) wait until training is underway
                self._go.wait(OPENER_WAIT_S)
            self._mlf = tracking.client(self.tracking_uri)
            if self.complete:
                return  # the trial first asks whether its run finished already (finished_already)
            self._open_run()
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread by run()
            self._error = exc

    def _open_run(self) -> None:
        from jobs import tracking

        job, facts, resumed = self.job, self.facts, self.resumed
        run = tracking.TrialRun.open(self._mlf, experiment_id=job["experiment_id"], parent_run_id=job["parent_run_id"],
                                     job_id=job["job_id"], trial_id=self.trial_id, name=self.name, run_id=self.run_id)
        startup_mark("trial: MLflow run opened")
        if job.get("log_model", True):
            prewarm_model_logging()
        run.set_tags({TAG_NODE: facts["node"], TAG_DEVICE: facts["device_label"]})
        run.log_params(self.cfg.to_dict(), params=facts["params"], device=facts["device"])
        run.log_text(facts["layers"], LAYERS_ARTIFACT)
        if resumed is not None:
            for past in resumed.get("history", []):
                run.log_epoch(past)
        startup_mark("trial: params, tags, layer table logged")
        self._run = run
        self._monitor = start_system_metrics(run, job.get("system_metrics_interval", 0), resume=resumed is not None)
        startup_mark("trial: system metrics started")

    def finished_already(self) -> bool:
        """For a resumed trial that had trained every epoch: whether its run is FINISHED already.
        When it is not, the run is opened now (in this thread)."""
        from jobs import tracking

        self._go.set()
        self._thread.join()  # it made the client only
        if self._error is not None:
            raise self._error
        if tracking.run_finished(self._mlf, self.run_id):
            return True
        self._open_run()
        return False

    def tags_once_open(self, tags: dict[str, Any]) -> None:
        """``tags`` set on the run by :meth:`run`'s first call."""
        self._later.update(tags)

    def run(self):
        """The trial's TrialRun, once opened (waits); what the opening raised is raised here."""
        self._go.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._later:
            self._run.set_tags(self._later)
            self._later = {}
        return self._run

    def stop_system_metrics(self) -> None:
        """Stop the run's system metrics (once they are started; idempotent, never raises)."""
        self._go.set()
        self._thread.join()
        stop_system_metrics(self._monitor)


def _describe(cfg) -> dict[str, Any]:
    """What the trial's run records of its model and where it runs, read in the trial's thread:
    building the model draws from torch's global RNG, which ``fit`` seeds and draws from too."""
    from mnistnets.models import count_parameters
    from mnistnets.summary import format_table
    from mnistnets.train import build_model, resolve_device

    device = resolve_device(cfg.device)
    node, device_label = _node_and_device(device)
    model = build_model(cfg)
    return {"node": node, "device_label": device_label, "device": device.type,
            "params": count_parameters(model), "layers": format_table(model)}


def _trial_name(config: dict[str, Any], context) -> str:
    """The trial's name: a grid point's from its config (``v2-onecycle-s1``); a search's trial
    (``v2-t003``) is named by Tune's trial counter (``jobs.search.TrialNamer``), read back here."""
    from jobs.grid import NAMING_KEY, trial_name

    if (config.get(NAMING_KEY) or {}).get("search"):
        try:
            return str(context.get_trial_name())
        except Exception:  # noqa: BLE001 - outside a Tune session: the grid point's name and the trial id
            return f"{trial_name(config)}-{context.get_trial_id()}"
    return trial_name(config)


def _fit_and_log(opener: _RunOpener, cfg, data, work: Path, resume_from: Path | None, first_batch=None):
    """``fit``'s epochs, each logged to the run (opened meanwhile: ``opener``) and recorded in the
    state file before it is yielded."""
    from mnistnets.train import fit

    for result in fit(cfg, data=data, checkpoint_dir=work, resume_from=resume_from, first_batch=first_batch):
        run = opener.run()
        run.log_epoch(result)
        (work / STATE_FILE).write_text(json.dumps({"run_id": run.run_id, "epoch": result["epoch"],
                                                   "trial_id": run.trial_id}))
        yield result


def _report(result: dict[str, Any], work: Path, local: Path) -> None:
    """One epoch to Tune, with a checkpoint: copies of last.pt, best.pt and the state file."""
    from ray import tune

    metrics = {k: v for k, v in result.items() if k != "checkpoint"}
    metrics["best"] = bool(metrics.get("best"))
    with tempfile.TemporaryDirectory(prefix="mnistjobs-ckpt-", dir=local) as tmp:
        for fname in ("last.pt", "best.pt", STATE_FILE):
            if (work / fname).is_file():
                shutil.copy2(work / fname, Path(tmp) / fname)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _end(run, work: Path) -> None:
    """The run's final artifacts: the checkpoints and the plots of the checkpoint's history."""
    from mnistnets.train import load_checkpoint

    history = load_checkpoint(work / "last.pt").get("history") if (work / "last.pt").is_file() else None
    run.log_final_artifacts(work, history=history)


def stopped_tags(epoch: int | None, planned: int) -> dict[str, str]:
    """The tags of a run Tune stopped after ``epoch`` of ``planned`` epochs (none when it trained all)."""
    epoch = int(epoch or 0)
    return {TAG_STOPPED_EARLY: "true", TAG_STOPPED_AT: str(epoch)} if epoch < planned else {}


def _end_stopped(run, work: Path, name: str, epoch: int, planned: int, *, cfg=None, data=None,
                 with_model: bool = True) -> None:
    """A trial Tune stopped after ``epoch``: its artifacts and its run FINISHED (best effort:
    never raises, so that the SystemExit Tune asked for ends the trial). Its model is logged only
    when it trained every epoch (stopped inside its last report): a trial stopped early is a
    scheduler's loser, and neither registered nor verified."""
    try:
        tags = stopped_tags(epoch, planned)
        if tags:  # stopped at its last epoch (ASHA's last rung), it trained them all: the driver says "finished"
            print(f"[{name}] stopped by Tune after epoch {epoch}/{planned}", flush=True)
        if tags:
            run.set_tags(tags)
        elif with_model and cfg is not None and data is not None:
            log_model(run, cfg, data, work, name)
        _end(run, work)
        run.finish("FINISHED", wait=STOPPED_WAIT_S)
    except Exception as e:  # noqa: BLE001 - the driver closes the run (jobs.sweep)
        print(f"[{name}] stopped; its MLflow run is closed by the driver ({' '.join(str(e).split())[:200]})",
              flush=True)


def diverged_tags(reason: str) -> dict[str, str]:
    """The tags of a run whose training diverged: ``reason`` is fit's one line (``Diverged``)."""
    return {TAG_DIVERGED: "true", TAG_DIVERGED_REASON: " ".join(str(reason).split())[:500]}


def _end_diverged(run, work: Path, name: str, diverged) -> None:
    """A trial whose loss became NaN or infinite (``mnistnets.train.Diverged``): its run FAILED
    with the diverged tags, the artifacts of the epochs before it (the checkpoint of the last good
    epoch, the plots). Returns normally, so Tune records the trial as ended, not errored, and does
    not retry it (training is deterministic: a retry diverges again). Only MLflow not answering
    for $MNISTJOBS_MLFLOW_PATIENCE_S raises (TrackingUnavailable): then Tune retries, the retry
    resumes from the last good checkpoint, diverges at the same epoch and tries to close the run
    again; past max_failures the driver marks the run FAILED."""
    from mnistnets.train import load_checkpoint

    print(f"[{name}] {diverged}", flush=True)
    run.set_tags(diverged_tags(str(diverged)))
    last = work / "last.pt"
    history = load_checkpoint(last).get("history") if last.is_file() else None
    if history:  # diverged in its first epoch: no checkpoint, nothing to plot
        run.log_final_artifacts(work, history=history)
    run.finish("FAILED")


# ------------------------------------------------------------------------- the model, system metrics

#: How many of the trial's test images go into the logged model as its input example.
INPUT_EXAMPLE_IMAGES = 4


def log_model(run, cfg, data, work: Path, name: str) -> str | None:
    """Log the trial's final model (the weights fit scored and checkpointed as ``model``: the EMA
    weights when EMA is on) as the LoggedModel of its run (``jobs.mlflow_model.log_trial_model``):
    signature, the first INPUT_EXAMPLE_IMAGES test images (uint8) as its input example, linked to
    the run's metrics at its last epoch. Once per run: a retried or resumed trial whose run has a
    READY model already logs none. Returns the model id.

    Waits for MLflow first (the last epoch's metrics must be there to be linked to the model); an
    MLflow that does not answer for $MNISTJOBS_MLFLOW_PATIENCE_S raises TrackingUnavailable, and
    Tune retries the trial: it resumes from its last checkpoint with nothing left to train and
    logs the model then."""
    import time

    from jobs import mlflow_model as mm
    from jobs import tracking
    from mnistnets.train import build_model, load_checkpoint

    last = work / "last.pt"
    if not last.is_file():
        return None
    if not run.flush(wait=tracking.patience_s()):
        raise tracking.TrackingUnavailable(
            f"Trial {name}: the MLflow server did not answer for {tracking.patience_s():.0f} s "
            f"({tracking.PATIENCE_VAR}) before its model could be logged; the trial is retried from its checkpoint.")
    existing = mm.logged_model_id(run.mlf, run.mlf.get_run(run.run_id))
    if existing is not None:
        print(f"[{name}] model logged already (models:/{existing}): not logged twice", flush=True)
        return existing
    state = load_checkpoint(last)
    net = build_model(cfg)
    net.load_state_dict(state["model"])
    example = data.test_images[:INPUT_EXAMPLE_IMAGES].numpy()
    start = time.perf_counter()
    info = mm.log_trial_model(run.mlf, run.run_id, net, step=int(state["epoch"]), input_example=example,
                              tags={TAG_JOB: run.job_id, TAG_TRIAL: run.trial_id})
    print(f"[{name}] model logged: models:/{info.model_id} ({time.perf_counter() - start:.1f} s)", flush=True)
    return info.model_id


_PREWARM: dict[str, Any] = {}


def prewarm_model_logging() -> None:
    """Once per worker process, in a background thread while the trial trains: import what
    logging the model needs (torch.export, ~3.7 s of imports on a 2-core CPU) and let MLflow map
    the installed packages (~1.6 s), so that the end of the first trial in a process does not
    wait for them where the node has a CPU to spare (a GPU node). Never raises."""
    if _PREWARM:
        return

    def warm():
        try:
            import mlflow.pytorch  # noqa: F401
            import torch.export  # noqa: F401
            from mlflow.utils.requirements_utils import _init_packages_to_modules_map

            _init_packages_to_modules_map()
        except Exception:  # noqa: BLE001 - only a head start: log_model imports them anyway
            pass

    _PREWARM["thread"] = threading.Thread(target=warm, name="mnistjobs-prewarm", daemon=True)
    _PREWARM["thread"].start()


def start_system_metrics(run, interval, *, resume: bool = False):
    """MLflow's own SystemMetricsMonitor on the trial's run (CPU, memory, disk, network; the GPUs
    when nvidia-ml-py sees any: the whole device's figures, also for a fractional GPU), one sample
    every ``interval`` s; None when ``interval`` is 0 or the run is not open yet (MLflow away at
    the start). :func:`stop_system_metrics` logs what the last, partial interval sampled, so a
    trial shorter than one interval carries its metrics too."""
    interval = float(interval or 0)
    if interval <= 0 or not run.opened:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # no "Started monitoring" lines
        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=interval, resume_logging=resume,
                                       tracking_uri=run.mlf.tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - metrics about training never stop it
        print(f"[{run.name}] note: no system metrics ({' '.join(str(e).split())[:200]})", flush=True)
        return None


def stop_system_metrics(monitor, timeout: float = 30.0) -> None:
    """Stop ``monitor`` (idempotent): its thread ends, the samples it holds are logged as one more
    step, and its batch is sent. Never raises."""
    if monitor is None or getattr(monitor, "_mnistjobs_stopped", False):
        return
    monitor._mnistjobs_stopped = True
    try:
        monitor._shutdown_event.set()
        if monitor._process is not None:
            monitor._process.join(timeout)
        monitor._process = None
        if any(values for m in monitor.monitors for values in m._metrics.values()):
            monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - metrics about training never fail it
        print(f"  note: the last system metrics were not logged ({' '.join(str(e).split())[:200]})", flush=True)
