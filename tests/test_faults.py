"""Faults, each a test with its figure (printed; `pytest -s` shows them).

Fast tests drive jobs.tracking.TrialRun against a fake MLflow that goes away, and the trial's
checkpoint fallback against local checkpoint folders. The slow ones run real sweeps on a private
Ray head + MLflow server (2 CPUs, Tune's storage set once for the cluster through
MNISTJOBS_STORAGE_PATH) with tiny synthetic MNIST on the CPU:

- a trial's worker SIGKILLed mid-epoch: retried from its checkpoint in the same MLflow run, each
  epoch once, the same final weights as an uninterrupted run;
- the job's driver SIGKILLed: `mnistjobs resume` finishes what is left, repeats nothing;
- the MLflow server down for 30 s: training goes on, no metric or checkpoint is lost;
- three sweeps at once where one trial fits: all finish, one trial at a time;
- corrupt checkpoints on resume: a fallback to the previous one, or a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from _faults_helpers import (EPOCH_METRICS, driver_pids, job_ended, job_id_of, job_logs, job_status, kill,
                             mlflow, reference_fit, run_cli, same_weights, service_set, start_mlflow, steps,
                             stop_mlflow, trial_runs, trial_worker_pids, wait_for)
from jobs.contract import (CHECKPOINT_DIR, CHECKPOINT_FILES, LAYERS_ARTIFACT, PLOT_FILES, PLOTS_DIR,
                           SPEC_ARTIFACT, TAG_NODE, TAG_TRIAL)

LAST_PT, BEST_PT = (f"{CHECKPOINT_DIR}/{name}" for name in CHECKPOINT_FILES)  # last.pt, best.pt
PLOTS = {f"{PLOTS_DIR}/{name}" for name in PLOT_FILES}


def figure(text: str) -> None:
    print(f"\n  FIGURE {text}", flush=True)


# ============================================================== TrialRun with an unreliable MLflow

class FakeMlflow:
    """Just enough of MlflowClient, with a server that can be away or lose its answers."""

    def __init__(self):
        self.down = False
        self.lose_answer = False  # do the next call, then fail as a timed-out request would
        self.runs: dict[str, dict] = {}
        self.calls = 0

    def _gate(self):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.down:
            raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed "
                                  "with exception HTTPConnectionPool(host='127.0.0.1', port=9): Max retries "
                                  "exceeded (Caused by NewConnectionError: [Errno 111] Connection refused)")

    def _answer(self):
        from mlflow.exceptions import MlflowException

        if self.lose_answer:
            self.lose_answer = False
            raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed "
                                  "with timeout exception Read timed out.")

    def _run(self, run_id):
        from types import SimpleNamespace as NS

        r = self.runs[run_id]
        return NS(info=NS(run_id=run_id, experiment_id="0", status=r["status"], run_name=r["name"]),
                  data=NS(params=dict(r["params"]), tags=dict(r["tags"])))

    def get_run(self, run_id):
        from mlflow.exceptions import MlflowException

        self._gate()
        if run_id not in self.runs:
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

            raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return self._run(run_id)

    def search_runs(self, experiment_ids, filter_string, max_results):
        self._gate()
        return [self._run(i) for i, r in self.runs.items()
                if f"'{r['tags'].get(TAG_TRIAL)}'" in filter_string][:max_results]

    def create_run(self, experiment_id, run_name, tags):
        self._gate()
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"name": run_name, "tags": dict(tags), "params": {}, "metrics": set(),
                             "status": "RUNNING", "artifacts": set()}
        self._answer()
        return self._run(run_id)

    def update_run(self, run_id, status):
        self._gate()
        self.runs[run_id]["status"] = status

    def set_terminated(self, run_id, status):
        self.update_run(run_id, status)

    def get_metric_history(self, run_id, key):
        from types import SimpleNamespace as NS

        self._gate()
        return [NS(key=k, timestamp=t, step=s, value=v) for k, t, s, v in self.runs[run_id]["metrics"] if k == key]

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._gate()
        run = self.runs[run_id]
        run["metrics"] |= {(m.key, m.timestamp, m.step, m.value) for m in metrics}  # MLflow drops exact repeats
        run["params"].update({p.key: p.value for p in params})
        run["tags"].update({t.key: t.value for t in tags})
        self._answer()

    def log_text(self, run_id, text, artifact_file):
        self._gate()
        self.runs[run_id]["artifacts"].add(artifact_file)

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._gate()
        assert Path(local_path).is_file()
        self.runs[run_id]["artifacts"].add(f"{artifact_path}/{Path(local_path).name}")


def _epoch(n: int) -> dict:
    return {"epoch": n, "train_loss": 1.0 / n, "train_acc": 90.0 + n, "test_loss": 0.5 / n, "test_acc": 91.0 + n,
            "lr": 0.01, "epoch_seconds": 1.0, "images_per_second": 100.0}


def _open(fake, run_id=None):
    from jobs.tracking import TrialRun

    return TrialRun.open(fake, experiment_id="0", parent_run_id="parent", job_id="mj-x", trial_id="t1",
                         name="v0-cosine-s1", run_id=run_id, log=lambda msg: None)


def _logged_steps(fake, run_id, key="test_acc"):
    return sorted(s for k, _, s, _ in fake.runs[run_id]["metrics"] if k == key)


def test_trial_run_holds_calls_back_while_mlflow_is_away(tmp_path, monkeypatch):
    """Training never waits for MLflow; what an outage holds back arrives later, exactly once."""
    from mlflow.exceptions import MlflowException

    from jobs.tracking import TrackingUnavailable

    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (sleeps.append(s), real_sleep(s))[1])
    fake = FakeMlflow()
    fake.down = True
    run = _open(fake)  # MLflow away from the start: the run is opened later
    assert not run.opened
    run.set_tags({TAG_NODE: "n1"})
    run.log_params({"model": "v0", "epochs": 3}, params=18214, device="cpu")
    run.log_text("layers", LAYERS_ARTIFACT)
    for n in (1, 2, 3):
        assert run.log_epoch(_epoch(n))
    # A log call never waited for the server: one try each (the open and six calls), no retry, no
    # sleep; everything queued, nothing sent.
    assert fake.calls == 7 and sleeps == [], (fake.calls, sleeps)
    assert run.pending == 6 and not fake.runs

    fake.down = False
    assert run.log_epoch(_epoch(4))  # the next epoch sends everything, in order
    assert run.opened and run.pending == 0 and len(fake.runs) == 1
    rid = run.run_id
    assert _logged_steps(fake, rid) == [1, 2, 3, 4]
    assert fake.runs[rid]["params"]["params"] == "18214" and fake.runs[rid]["tags"][TAG_NODE] == "n1"
    assert LAYERS_ARTIFACT in fake.runs[rid]["artifacts"]

    fake.lose_answer = True  # done by the server, answer lost: retried with the same timestamp
    assert run.log_epoch(_epoch(5)) and run.pending == 1
    assert run.flush() and _logged_steps(fake, rid) == [1, 2, 3, 4, 5]
    assert not run.log_epoch(_epoch(5))  # never twice

    # A retried trial reopens the run and logs only what it lacks, e.g. from its checkpoint's history.
    again = _open(fake, run_id=rid)
    assert again.run_id == rid and again.last_step == 5
    assert [again.log_epoch(_epoch(n)) for n in (1, 2, 3, 4, 5, 6)] == [False] * 5 + [True]
    assert _logged_steps(fake, rid) == [1, 2, 3, 4, 5, 6]
    for key in ("train_loss", "lr", "images_per_second"):
        assert _logged_steps(fake, rid, key) == [1, 2, 3, 4, 5, 6]

    # The end waits, but only as long as allowed; then a clear error, nothing marked FINISHED.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"x")
    fake.down = True
    again.log_final_artifacts(ckpt, history=[_epoch(n) for n in range(1, 7)])
    (ckpt / "last.pt").unlink()  # the queued call holds its own copy
    with pytest.raises(TrackingUnavailable, match=f"did not answer for 1 s.*{LAST_PT}"):
        again.finish("FINISHED", wait=1.0)
    assert fake.runs[rid]["status"] == "RUNNING"
    fake.down = False
    again.finish("FINISHED", wait=1.0)
    assert fake.runs[rid]["status"] == "FINISHED"
    assert {LAST_PT, *PLOTS} <= fake.runs[rid]["artifacts"]

    # A creation whose answer was lost is found by its trial tag, not created twice.
    fake2 = FakeMlflow()
    fake2.lose_answer = True
    run2 = _open(fake2)
    assert not run2.opened and len(fake2.runs) == 1
    run2.log_epoch(_epoch(1))
    assert run2.opened and len(fake2.runs) == 1

    # A request MLflow refuses is an error at once, not an outage to wait out.
    def refuse(*a, **k):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        raise MlflowException("Invalid value for metric", error_code=INVALID_PARAMETER_VALUE)

    fake2.log_batch = refuse
    with pytest.raises(MlflowException, match="Invalid value"):
        run2.log_epoch(_epoch(2))


# ===================================================================== checkpoint fallback (fast)

def _checkpoint_folders(tmp_path, synthetic_dir, epochs=3):
    """A trial folder like Tune's storage: checkpoint_00000<i> holding fit's last.pt of epoch i+1."""
    from jobs.trial import STATE_FILE
    from mnistnets.train import TrainConfig, fit

    work, trial = tmp_path / "work", tmp_path / "storage" / "job" / "v0-cosine-s1_abc"
    cfg = TrainConfig(model="v2", epochs=epochs, batch_size=64, schedule="cosine", device="cpu",
                      train_limit=128, test_limit=64, data_dir=str(synthetic_dir))
    for i, result in enumerate(fit(cfg, checkpoint_dir=work)):
        folder = trial / f"checkpoint_{i:06d}"
        folder.mkdir(parents=True)
        shutil.copy2(work / "last.pt", folder / "last.pt")
        (folder / STATE_FILE).write_text(json.dumps({"run_id": "run-1", "epoch": result["epoch"]}))
    return trial


def test_corrupt_or_missing_checkpoint_falls_back_or_fails_clearly(tmp_path, synthetic_dir, capsys):
    from ray import tune

    from jobs.trial import _restore
    from mnistnets.train import CheckpointError

    trial = _checkpoint_folders(tmp_path, synthetic_dir)
    newest = trial / "checkpoint_000002"
    work = tmp_path / "restore"
    work.mkdir()

    last, state, run_id = _restore(tune.Checkpoint(str(newest)), work, "v0-cosine-s1")
    assert state["epoch"] == 3 and run_id == "run-1" and last == work / "last.pt"
    assert "fell back" not in capsys.readouterr().out
    # A driver killed between Tune's snapshots: the snapshot names an older checkpoint, or none.
    import pyarrow.fs

    _, state, _ = _restore(tune.Checkpoint(str(trial / "checkpoint_000000")), work, "v0-cosine-s1")
    assert state["epoch"] == 3
    _, state, _ = _restore(None, work, "v0-cosine-s1", (pyarrow.fs.LocalFileSystem(), str(trial)))
    assert state["epoch"] == 3
    assert _restore(None, work, "v0-cosine-s1", (pyarrow.fs.LocalFileSystem(), str(tmp_path / "none"))) == (None, None, None)

    (newest / "last.pt").write_bytes(b"\x80\x02not a checkpoint")  # corrupt: the previous one is used
    last, state, run_id = _restore(tune.Checkpoint(str(newest)), work, "v0-cosine-s1")
    out = capsys.readouterr().out
    assert state["epoch"] == 2 and run_id == "run-1"
    assert "fell back" in out and str(newest) in out and "after epoch 2" in out
    figure(f"corrupt newest checkpoint: resumed after epoch {state['epoch']} instead of 3, 1 epoch to redo "
           f"(skipped in MLflow)")

    gone = trial / "checkpoint_000003"  # Tune names a folder that is not there any more
    _, state, _ = _restore(tune.Checkpoint(str(gone)), work, "v0-cosine-s1")
    assert state["epoch"] == 2

    (trial / "checkpoint_000001" / "last.pt").unlink()  # missing
    (trial / "checkpoint_000000" / "last.pt").write_bytes(b"")  # truncated
    with pytest.raises(CheckpointError) as info:
        _restore(tune.Checkpoint(str(newest)), work, "v0-cosine-s1")
    message = str(info.value)
    assert "v0-cosine-s1 cannot resume" in message and "not started again from epoch 1" in message
    for i in range(3):
        assert f"checkpoint_00000{i}" in message
    assert "does not exist" in message and "corrupt" in message
    figure("no readable checkpoint: CheckpointError naming all 3 folders; no restart from epoch 1")


# ============================================================ stopping a service set's processes (fast)

def test_down_finds_marked_processes_and_kills_what_ignores_sigterm(tmp_path):
    """jobs.procs: the processes carrying the mark and their children are found (another process
    is not); one that ignores SIGTERM is SIGKILLed after the grace; all end, the other runs on."""
    import subprocess
    import sys

    from jobs import procs

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    parent = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', sys.argv[1]], env={}, "
              "stdout=subprocess.PIPE); c.stdout.readline(); print(c.pid, flush=True); time.sleep(600)")
    marked = subprocess.Popen([sys.executable, "-c", parent, stubborn], env={**os.environ, "MNJ_TEST_MARK": "set-1"},
                              stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env={**os.environ, "MNJ_TEST_MARK": "set-2"})
    try:
        child = int(marked.stdout.readline())  # its environment lacks the mark: found as a descendant
        assert procs.marked_pids("MNJ_TEST_MARK", "set-1") == {marked.pid, child}
        assert procs.descendants(marked.pid) == {marked.pid, child}
        assert procs.terminate({marked.pid, child}, grace=0.5, kill_wait=10.0) == set()
        assert marked.poll() is not None  # ended (by the SIGTERM) and reaped
        assert not procs.pid_alive(child) and not procs.pid_alive(marked.pid)
        assert procs.marked_pids("MNJ_TEST_MARK", "set-1") == set()
        assert procs.pid_alive(other.pid) and procs.marked_pids("MNJ_TEST_MARK", "set-2") == {other.pid}
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()


# ================================================================== real sweeps on a private cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private Ray head (2 CPUs) + MLflow; Tune's storage set once, for every job, through the
    head's environment (MNISTJOBS_STORAGE_PATH)."""
    base = tmp_path_factory.mktemp("faults")
    storage = base / "tune-storage"
    with service_set(base / "home", num_cpus=2, env={"MNISTJOBS_STORAGE_PATH": str(storage)}) as rec:
        yield rec, storage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from synthetic import make_synthetic_mnist

    return make_synthetic_mnist(tmp_path_factory.mktemp("faults-data"), n_train=1024, n_test=256, seed=0)


def _submit(rec, data, *args, experiment):
    result = run_cli(["submit", "--schedules", "cosine", "--data-dir", data, "--experiment", experiment, *args],
                     home=rec.home)
    assert result.exit_code == 0, result.output
    return job_id_of(result.output)


def _wait_job(rec, job, timeout=300):
    return wait_for(lambda: job_ended(s := job_status(rec, job)) and s, timeout, 0.5, what=f"job {job} to end")


def _spec_train(mlf, job):
    """The TrainConfig dict of the job's first trial, from the spec the sweep run stores."""
    from jobs.spec import SweepSpec
    from jobs.tracking import job_runs

    (sweep,) = job_runs(mlf, job, role="sweep")
    spec = SweepSpec.from_mapping(json.loads(Path(mlf.download_artifacts(sweep.info.run_id, SPEC_ARTIFACT)).read_text()))
    return dict(spec.trials()[0][1])


def _final_weights(mlf, run_id, dest):
    from mnistnets.train import load_checkpoint

    return load_checkpoint(mlf.download_artifacts(run_id, LAST_PT, str(dest)))


@pytest.mark.slow
def test_three_sweeps_at_once_with_room_for_one_trial(cluster, data):
    """Each trial asks for both CPUs of the cluster: the three jobs' trials queue and all finish."""
    rec, _ = cluster
    start = time.monotonic()
    jobs_ = [_submit(rec, data, "--models", "v0", "--seeds", 1, "--epochs", 2, "--batch-size", 64, "--train-limit",
                     256, "--test-limit", 64, "--cpus-per-trial", 2, experiment="faults-queue") for _ in range(3)]
    assert len(set(jobs_)) == 3
    states = [_wait_job(rec, job, 420) for job in jobs_]
    wall = time.monotonic() - start
    assert states == ["SUCCEEDED"] * 3, [(j, job_logs(rec, j)[-2000:]) for j in jobs_]
    mlf = mlflow(rec)
    spans = []
    for job in jobs_:
        (run,) = trial_runs(mlf, job).values()
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert steps(mlf, run.info.run_id, key) == [1, 2]
        spans.append((run.info.start_time, run.info.end_time))  # ms, from the trials' own clock
    spans.sort()
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, f"two trials ran at once: {spans}"  # each run starts after the last ended
    spans = [(s / 1000, e / 1000) for s, e in spans]
    t0 = spans[0][0]
    figure(f"3 sweeps submitted at once, room for 1 trial: all SUCCEEDED in {wall:.0f} s; trials ran one at a "
           f"time: " + ", ".join(f"{s - t0:.0f}-{e - t0:.0f} s" for s, e in spans)
           + f"; the last waited {spans[-1][0] - t0:.0f} s for its turn")


@pytest.mark.slow
def test_sigkill_trial_worker_mid_epoch(cluster, data, tmp_path):
    """SIGKILL the trial's worker process during epoch 2: Tune retries it from epoch 1's
    checkpoint; the same MLflow run gets each epoch once and FINISHED; the final weights equal an
    uninterrupted run's."""
    rec, storage = cluster
    epochs = 3
    job = _submit(rec, data, "--models", "v0", "--epochs", epochs, "--batch-size", 8, "--train-limit", 1024,
                  "--test-limit", 256, "--max-failures", 2, experiment="faults-sigkill")
    mlf = mlflow(rec)

    def first_epoch_logged():
        runs = list(trial_runs(mlf, job).values())
        return runs and steps(mlf, runs[0].info.run_id) == [1] and runs[0]

    run = wait_for(first_epoch_logged, 240, 0.1, what="epoch 1 in MLflow")
    run_id = run.info.run_id
    epoch1 = mlf.get_metric_history(run_id, "epoch_seconds")[0]
    # Inside epoch 2: once epoch 1's checkpoint is in Tune's storage (so the retry has it), and
    # 0.5 s after epoch 1 was logged (the trial's clock at its end; the test sees it in MLflow a
    # little later, which must not count). Epoch 2 takes 1.3-2.2 s here (epoch 1 more: warm-up),
    # so a kill timed from epoch 1's length could land after epoch 2 under load.
    wait_for(lambda: list((storage / job).glob("*/checkpoint_000000/last.pt")), 60, 0.05,
             what="epoch 1's checkpoint in Tune's storage")
    time.sleep(max(0.0, epoch1.timestamp / 1000 + 0.5 - time.time()))
    (pid,) = trial_worker_pids(rec)
    killed_at = time.time()
    into_epoch = killed_at - epoch1.timestamp / 1000
    kill(pid)
    assert steps(mlf, run_id) == [1], "epoch 2 ended before the kill; not mid-epoch"

    assert _wait_job(rec, job, 300) == "SUCCEEDED", job_logs(rec, job)[-3000:]
    logs = job_logs(rec, job)
    # One line says which trial, what happened and the epoch it resumes from; the traceback is in
    # the job's log, marked, and only `logs --full` shows it.
    assert "[v0-cosine-s1] its worker process died" in logs and "retrying from epoch 1's checkpoint" in logs, logs[-3000:]
    shown = run_cli(["logs", job], home=rec.home).output
    full = run_cli(["logs", job, "--full"], home=rec.home).output
    from jobs.client import TRACE_PREFIX

    assert "retrying from epoch 1's checkpoint" in shown and "ActorDiedError" not in shown
    assert "A worker died or was killed" not in shown and "A worker died or was killed" in full  # Ray's notice
    assert not any(line.startswith(TRACE_PREFIX) for line in shown.splitlines())
    assert any(line.startswith(TRACE_PREFIX) for line in full.splitlines()), full[-3000:]  # Tune's error text
    runs = trial_runs(mlf, job)
    assert list(runs) == ["v0-cosine-s1"] and runs["v0-cosine-s1"].info.run_id == run_id  # the same run
    run = mlf.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert steps(mlf, run_id, key) == list(range(1, epochs + 1)), key  # each epoch exactly once

    reference, ref_weights = reference_fit(_spec_train(mlf, job), data)
    final = _final_weights(mlf, run_id, tmp_path)
    assert final["epoch"] == epochs and same_weights(final["model"], ref_weights)
    for key in ("test_acc", "test_loss", "train_loss"):
        logged = {m.step: m.value for m in mlf.get_metric_history(run_id, key)}
        assert logged == {r["epoch"]: r[key] for r in reference}, key
    epoch2 = {m.step: m for m in mlf.get_metric_history(run_id, "epoch_seconds")}[2]
    back = epoch2.timestamp / 1000 - killed_at  # kill -> the retried epoch 2 logged
    lost = into_epoch + back - epoch2.value
    figure(f"SIGKILL {into_epoch:.1f} s into epoch 2: retried from epoch 1's checkpoint, epoch 2 logged {back:.1f} s "
           f"after the kill; seconds lost {lost:.1f} (the partial epoch + the restart), whole epochs redone 0; "
           f"final test_acc {reference[-1]['test_acc']:.2f}% = uninterrupted, weights bit-identical")


@pytest.mark.slow
def test_killed_driver_then_resume(cluster, data):
    """SIGKILL the sweep's driver while its second trial trains: `mnistjobs resume` finishes that
    trial from its checkpoint, does not run the finished one again, and creates no run."""
    rec, storage = cluster
    epochs = 4
    job = _submit(rec, data, "--models", "v0", "--seeds", 2, "--epochs", epochs, "--batch-size", 16,
                  "--train-limit", 1024, "--test-limit", 256, "--max-concurrent", 1, experiment="faults-driver")
    mlf = mlflow(rec)

    def second_trial_training():
        runs = trial_runs(mlf, job)
        if len(runs) < 2 or runs["v0-cosine-s1"].info.status != "FINISHED":
            return None
        return steps(mlf, runs["v0-cosine-s2"].info.run_id) and runs

    runs = wait_for(second_trial_training, 300, 0.1, what="trial 1 finished and trial 2 training")
    (driver,) = driver_pids(rec, job)
    kill(driver)
    killed_at = time.monotonic()
    assert _wait_job(rec, job, 120) == "FAILED"
    wait_for(lambda: not trial_worker_pids(rec), 60, what="the trial workers to go with their driver")
    before = {name: (r.info.run_id, r.info.end_time, steps(mlf, r.info.run_id)) for name, r in
              trial_runs(mlf, job).items()}
    done_s2 = before["v0-cosine-s2"][2]
    assert done_s2 and len(done_s2) < epochs, before
    assert (storage / job).is_dir()  # Tune's storage from MNISTJOBS_STORAGE_PATH, set on the head

    result = run_cli(["resume", job, "--wait"], home=rec.home)
    assert result.exit_code == 0, result.output
    assert f"Submitted job {job}-r1" in result.output
    resume_log = job_logs(rec, f"{job}-r1")
    after = trial_runs(mlf, job)
    from jobs.tracking import job_runs

    assert len(job_runs(mlf, job)) == 3  # one sweep run, two trial runs: none duplicated
    assert {r.info.status for r in job_runs(mlf, job)} == {"FINISHED"}
    s1 = after["v0-cosine-s1"]
    assert (s1.info.run_id, s1.info.end_time) == before["v0-cosine-s1"][:2]  # not reopened
    assert "[v0-cosine-s1] epoch" not in resume_log  # not trained again
    assert after["v0-cosine-s2"].info.run_id == before["v0-cosine-s2"][0]
    for run in after.values():
        for key in EPOCH_METRICS:
            assert steps(mlf, run.info.run_id, key) == list(range(1, epochs + 1)), (run.info.run_name, key)
    resumed_epochs = [int(line.split("epoch ")[1].split("/")[0]) for line in resume_log.splitlines()
                      if line.startswith("[v0-cosine-s2] epoch ")]
    from_checkpoint = resumed_epochs[0] - 1
    figure(f"driver SIGKILLed with trial 1 finished and trial 2 at epoch {max(done_s2)}/{epochs}: resume ran trial 2 "
           f"from its epoch-{from_checkpoint} checkpoint ({max(done_s2) - from_checkpoint} epoch(s) redone, not "
           f"logged twice), trial 1 not repeated, 0 duplicate runs; kill -> all done {time.monotonic() - killed_at:.0f} s")


@pytest.mark.slow
def test_corrupt_checkpoint_on_resume_falls_back(cluster, data, tmp_path):
    """The driver dies, then every checkpoint but the first is corrupt: the resumed trial falls
    back to the one readable checkpoint, logs no epoch twice and ends as an uninterrupted run."""
    rec, storage = cluster
    epochs = 6
    job = _submit(rec, data, "--models", "v0", "--epochs", epochs, "--batch-size", 16, "--train-limit", 1024,
                  "--test-limit", 256, "--max-failures", 1, experiment="faults-corrupt")
    mlf = mlflow(rec)
    run = wait_for(lambda: (r := list(trial_runs(mlf, job).values())) and len(steps(mlf, r[0].info.run_id)) >= 4
                   and r[0], 300, 0.1, what="epoch 4 in MLflow")
    (driver,) = driver_pids(rec, job)
    kill(driver)
    assert _wait_job(rec, job, 120) == "FAILED"
    wait_for(lambda: not trial_worker_pids(rec), 60, what="the trial worker to go with its driver")
    logged = steps(mlf, run.info.run_id)
    assert len(logged) < epochs
    (trial_dir,) = (storage / job).glob("v0-cosine-s1_*")
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    assert len(checkpoints) >= 2
    for folder in checkpoints[1:]:
        (folder / "last.pt").write_bytes(b"garbage, not a checkpoint")

    result = run_cli(["resume", job, "--wait"], home=rec.home)
    assert result.exit_code == 0, result.output
    log = job_logs(rec, f"{job}-r1")
    assert "fell back to an older one" in log and "resuming after epoch 1" in log, log[-3000:]
    run = mlf.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and len(trial_runs(mlf, job)) == 1
    for key in EPOCH_METRICS:
        assert steps(mlf, run.info.run_id, key) == list(range(1, epochs + 1)), key
    reference, ref_weights = reference_fit(_spec_train(mlf, job), data)
    final = _final_weights(mlf, run.info.run_id, tmp_path)
    assert same_weights(final["model"], ref_weights)
    assert {m.step: m.value for m in mlf.get_metric_history(run.info.run_id, "test_loss")} == \
        {r["epoch"]: r["test_loss"] for r in reference}
    figure(f"{len(checkpoints) - 1} of {len(checkpoints)} checkpoints corrupt on resume: fell back to epoch 1's, "
           f"{max(logged) - 1} logged epoch(s) trained again and not logged twice; final weights = uninterrupted run")


@pytest.mark.slow
def test_mlflow_outage_loses_nothing(cluster, data, tmp_path):
    """Stop the MLflow server for 30 s in the middle of a 2-trial sweep, start it again on the
    same port and store: the trials train on; every metric and checkpoint arrives."""
    from mnistnets.train import load_checkpoint

    rec, _ = cluster
    epochs = 30
    job = _submit(rec, data, "--models", "v0,v2", "--epochs", epochs, "--batch-size", 32, "--train-limit", 512,
                  "--test-limit", 128, experiment="faults-outage")
    mlf = mlflow(rec)
    wait_for(lambda: len(r := trial_runs(mlf, job)) == 2 and all(len(steps(mlf, x.info.run_id)) >= 2 for x in r.values()),
             240, 0.2, what="both trials at epoch 2")
    log_before = job_logs(rec, job)
    down_at = time.time()
    try:
        stop_mlflow(rec)
        time.sleep(max(0.0, down_at + 30 - time.time()))
        log_during = job_logs(rec, job)
    finally:
        restart_at = time.time()
        start_mlflow(rec)
    up_at = time.time()
    trained_meanwhile = log_during.count("] epoch ") - log_before.count("] epoch ")
    assert trained_meanwhile > 0, "training stopped while MLflow was away"
    assert "MLflow does not answer" in log_during

    assert _wait_job(rec, job, 300) == "SUCCEEDED", job_logs(rec, job)[-3000:]
    done_at = time.time()
    mlf = mlflow(rec)
    late = 0
    for name, run in trial_runs(mlf, job).items():
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert steps(mlf, rid, key) == list(range(1, epochs + 1)), (name, key)  # none lost, none twice
        late += sum(down_at <= m.timestamp / 1000 <= up_at for m in mlf.get_metric_history(rid, "test_acc"))
        names = {a.path for a in mlf.list_artifacts(rid, CHECKPOINT_DIR)} | {a.path for a in mlf.list_artifacts(rid, PLOTS_DIR)}
        assert {LAST_PT, BEST_PT, *PLOTS} <= names
        assert load_checkpoint(mlf.download_artifacts(rid, LAST_PT, str(tmp_path / name)))["epoch"] == epochs
    assert late > 0
    figure(f"MLflow stopped {restart_at - down_at:.0f} s (unreachable {up_at - down_at:.0f} s with its restart): the 2 trials trained {trained_meanwhile} epochs meanwhile; {late} epochs' "
           f"metrics were held back and sent after the restart; lost 0 metrics, 0 checkpoints; job done "
           f"{done_at - up_at:.0f} s after MLflow came back")
