"""The experiment service end to end: a real local Ray head and a real MLflow server (the
session's one set, the ``embedded`` fixture of conftest.py), tiny synthetic MNIST, CPU only;
and the job client (jobs.client) on its own, against fakes."""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from _service_helpers import TINY, job_id_of, mlflow_client, run_cli, wait_for
from jobs.contract import (CHECKPOINT_DIR, CHECKPOINT_FILES, EPOCH_METRICS as ALL_EPOCH_METRICS, LAYERS_ARTIFACT,
                           PLOT_FILES, PLOTS_DIR, ROLE_SWEEP, ROLE_TRIAL, TAG_DEVICE, TAG_JOB, TAG_NODE, TAG_PARENT,
                           TAG_TRIAL, TRIAL_PARAMS, sweep_run_name)

# Logged at every epoch (step = epoch); the tta_* ones only after the last epoch.
EPOCH_METRICS = tuple(m for m in ALL_EPOCH_METRICS if not m.startswith("tta_"))
TTA_METRICS = tuple(m for m in ALL_EPOCH_METRICS if m.startswith("tta_"))
ARTIFACTS = {LAYERS_ARTIFACT, *(f"{CHECKPOINT_DIR}/{f}" for f in CHECKPOINT_FILES),
             *(f"{PLOTS_DIR}/{f}" for f in PLOT_FILES)}
REPO = Path(__file__).resolve().parents[1]


def _artifacts(mlf, run_id, path=None):
    out = set()
    for a in mlf.list_artifacts(run_id, path):
        out |= _artifacts(mlf, run_id, a.path) if a.is_dir else {a.path}
    return out


def _steps(mlf, run_id, key):
    return sorted(m.step for m in mlf.get_metric_history(run_id, key))


def _epoch_lines(output: str, trial: str) -> list[str]:
    """The driver's "[trial] epoch E/N" lines for one trial, as "E/N", in the order printed."""
    return re.findall(rf"^\[{re.escape(trial)}\] epoch (\d+/\d+)\b", output, flags=re.M)


def _runs(mlf, job_id, role=None):
    from jobs import tracking

    return tracking.job_runs(mlf, job_id, role=role)


# ---------------------------------------------------------------------------------- no services

def test_the_ray_head_runs_with_the_idle_settings_unless_the_environment_sets_them(tmp_path, monkeypatch):
    from jobs import services

    monkeypatch.delenv("RAY_prestart_worker_first_driver", raising=False)
    monkeypatch.setenv("REPORTER_UPDATE_INTERVAL_MS", "5000")  # the user's own value
    env = services._service_env(tmp_path, "id")
    assert env["RAY_prestart_worker_first_driver"] == "0"  # no idle workers no sweep could use
    assert env["REPORTER_UPDATE_INTERVAL_MS"] == "5000"
    assert {k: env[k] for k in services.RAY_IDLE_SETTINGS if k != "REPORTER_UPDATE_INTERVAL_MS"} == {
        k: v for k, v in services.RAY_IDLE_SETTINGS.items() if k != "REPORTER_UPDATE_INTERVAL_MS"}


def test_port_in_use_is_a_clear_usage_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home = tmp_path / "home"
        for option in ("--mlflow-port", "--dashboard-port", "--ray-port"):
            others = [o for o in ("--mlflow-port", "--dashboard-port", "--ray-port") if o != option]
            result = run_cli(["up", option, port, others[0], 0, others[1], 0], home=home)
            assert result.exit_code == 2, result.output
            assert f"Port {port}" in result.output and option in result.output
            assert not (home / "services.json").exists()


# ------------------------------------------------------------------- the job client, against fakes

class _FakeJobs:
    """A JobSubmissionClient's log calls: each tail_job_logs call plays the next stream (its
    chunks, then a RuntimeError when it "breaks"); get_job_logs returns the whole log."""

    def __init__(self, streams, log, status="SUCCEEDED"):
        self.streams, self.log, self.status, self.tails = list(streams), log, status, 0

    async def tail_job_logs(self, job_id):
        self.tails += 1
        chunks, breaks = self.streams.pop(0)
        for chunk in chunks:
            yield chunk
        if breaks:
            raise RuntimeError("WebSocket connection closed unexpectedly")

    def get_job_info(self, job_id):
        return SimpleNamespace(status=self.status)

    def get_job_logs(self, job_id):
        return self.log


def test_follow_log_prints_each_part_once_across_a_broken_stream():
    from jobs.client import follow_log

    fake = _FakeJobs([(["a\n", "b\n"], True), (["a\nb\n", "c\n"], False)], log="a\nb\nc\nd")
    parts = list(follow_log(fake, "mj-1", pause=0))
    assert parts == ["a\n", "b\n", "c\n", "d"]  # the reopened stream's replay is skipped; "d" had no newline
    assert fake.tails == 2


def test_follow_log_of_a_job_whose_driver_never_started():
    from jobs.client import follow_log

    fake = _FakeJobs([([], False)], log="runtime_env setup failed\n", status="FAILED")
    assert "".join(follow_log(fake, "mj-1", pause=0)) == "runtime_env setup failed\n"


def test_the_log_filter_drops_traceback_lines_split_across_chunks():
    from jobs.client import TRACE_PREFIX, readable

    chunks = ["[v2] epoch 1/2\n  ", "| Traceback (most\n", f"{TRACE_PREFIX}  File x\n[v2] fini", "shed"]
    assert "".join(readable(chunks)) == "[v2] epoch 1/2\n[v2] finished"
    assert "".join(readable(chunks, full=True)) == "".join(chunks)


class _FileJob:
    """A job whose driver writes its log file in a thread (the embedded cluster's local log)."""

    def __init__(self, path, parts):
        self.path, self.parts, self.status, self.asked = path, parts, "PENDING", 0

    def write(self):
        import time

        time.sleep(0.05)  # the file appears once the driver started
        self.status = "RUNNING"
        with open(self.path, "wb") as f:
            for part in self.parts:
                f.write(part)
                f.flush()
                time.sleep(0.05)
        self.status = "SUCCEEDED"

    def get_job_info(self, job_id):
        self.asked += 1
        return SimpleNamespace(status=self.status)

    def get_job_logs(self, job_id):
        raise AssertionError("the file was there: the job API's log is not read")


def test_following_the_local_log_file_reads_it_whole_as_it_grows(tmp_path):
    import threading

    from jobs.client import follow_file

    euro = "€".encode()  # one character whose bytes land in two writes
    job = _FileJob(tmp_path / "job-driver-mj-1.log", [b"line 1\n", b"price 3" + euro[:1], euro[1:] + b"\n", b"end"])
    writer = threading.Thread(target=job.write)
    writer.start()
    text = "".join(follow_file(job.path, job, "mj-1", pause=0.01, status_every=0.02))
    writer.join()
    assert text == "line 1\nprice 3€\nend" and job.asked >= 1


def test_following_a_local_log_that_never_appeared_reads_the_job_api(tmp_path):
    from jobs.client import follow_file

    class Ended:
        def get_job_info(self, job_id):
            return SimpleNamespace(status="FAILED")

        def get_job_logs(self, job_id):
            return "runtime_env setup failed\n"

    assert "".join(follow_file(tmp_path / "none.log", Ended(), "mj-1", status_every=0)) == "runtime_env setup failed\n"


def test_following_stops_at_the_drivers_last_line():
    from jobs.client import readable, until_done
    from jobs.contract import DONE_LINE

    done = DONE_LINE.format(job_id="mj-1", state="FAILED")
    chunks = ["[v2] epoch 1/2\n", DONE_LINE.format(job_id="mj-2", state="SUCCEEDED") + "\n" + done[:20],
              f"{done[20:]}x\n", f"{done}\n(train_trial pid=1) late\n", "never read\n"]
    read, outcome = [], {}

    def source():
        for chunk in chunks:
            read.append(chunk)
            yield chunk

    out = "".join(until_done(readable(source()), "mj-1", outcome))
    # Another job's last line, a line (split across chunks) that only starts like it: passed on; the
    # line itself ends it.
    assert out.splitlines() == ["[v2] epoch 1/2", DONE_LINE.format(job_id="mj-2", state="SUCCEEDED"),
                                f"{done}x", done]
    assert outcome == {"state": "FAILED"}
    assert read == chunks[:4]  # not one chunk more was asked of the stream


def test_a_log_without_the_drivers_last_line_is_read_to_its_end():
    from jobs.client import readable, until_done

    outcome = {}
    chunks = ["mnistjobs sweep mj-1: 1 trial, 0 failed, 3.0 s\n", "Job entrypoint command failed\n", "tail"]
    assert "".join(until_done(readable(iter(chunks)), "mj-1", outcome)) == "".join(chunks)
    assert outcome == {}


def _spec():
    from jobs.spec import SweepSpec

    return SweepSpec(models=["v0", "v2"], schedules=["cosine"], epochs=2, experiment="exp-x").validate()


def test_the_job_carries_the_spec_once_and_the_experiment_id():
    from jobs.client import SPEC_VAR, build_submission, stored_spec
    from jobs.cluster import Cluster

    spec = _spec()
    cluster = Cluster("http://head:8265", {}, "http://mlflow:5000", embedded=False)
    job = build_submission(cluster, spec, "mj-1", "7")
    assert job["entrypoint"] == "python -m jobs.sweep --job-id mj-1 --ray-job-id mj-1 --experiment-id 7"
    assert job["submission_id"] == "mj-1"
    env = job["runtime_env"]["env_vars"]
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PYTHONUNBUFFERED": "1", SPEC_VAR: spec.to_json()}
    assert job["metadata"] == {"mnistjobs.job_id": "mj-1", "mnistjobs.summary": spec.summary(),
                               "mnistjobs.experiment": "exp-x", "mnistjobs.experiment_id": "7",
                               "mnistjobs.tracking_uri": "http://mlflow:5000"}
    # resume reads it back from the job's runtime_env, as get_job_info returns it
    info = SimpleNamespace(submission_id="mj-1", runtime_env=job["runtime_env"], metadata=job["metadata"])
    assert stored_spec(info).to_dict() == spec.to_dict()

    again = build_submission(cluster, spec, "mj-1", "7", ray_job_id="mj-1-r1", resume_of="mj-1")
    assert again["entrypoint"].endswith("--ray-job-id mj-1-r1 --experiment-id 7 --resume")
    assert again["submission_id"] == "mj-1-r1" and again["metadata"]["mnistjobs.resume_of"] == "mj-1"


def test_resume_refuses_a_job_that_mnistjobs_did_not_submit():
    from jobs.client import JobUsageError, stored_spec

    for runtime_env, metadata in [({}, {}), ({"env_vars": {"OTHER": "1"}}, {"mnistjobs.job_id": "mj-1"}),
                                  ({"env_vars": {"MNISTJOBS_SPEC": "{}"}}, {})]:
        info = SimpleNamespace(submission_id="raysubmit_1", runtime_env=runtime_env, metadata=metadata)
        with pytest.raises(JobUsageError, match="not submitted by mnistjobs"):
            stored_spec(info)
    info = SimpleNamespace(submission_id="mj-1", runtime_env={"env_vars": {"MNISTJOBS_SPEC": "{not json"}},
                           metadata={"mnistjobs.job_id": "mj-1"})
    with pytest.raises(JobUsageError, match="stored spec is unusable"):
        stored_spec(info)


_IMPORTS = """
import sys
from click.testing import CliRunner
from jobs.cli import main
r = CliRunner().invoke(main, sys.argv[1:])
assert r.exit_code in (0, 2), r.output
print("torch" in sys.modules)
"""


def _imports_torch(*args) -> bool:
    out = subprocess.run([sys.executable, "-c", _IMPORTS, *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_help_does_not_import_torch():
    assert not _imports_torch("--help")
    assert not _imports_torch("submit", "--help")


@pytest.mark.parametrize("command", ["list", "status", "logs", "cancel"])
def test_job_commands_do_not_import_torch(command):
    args = [command] + ([] if command == "list" else ["mj-00000000"])
    assert not _imports_torch(*args, "--address", "http://127.0.0.1:9")


# ---------------------------------------------------------------------- with the embedded services

@pytest.mark.slow
def test_token_auth_on_the_dashboard(embedded):
    from jobs import services
    from jobs.cluster import http_status

    url = f"{embedded.dashboard_url}/api/jobs/"
    assert http_status(url) == 401
    assert http_status(url, {"Authorization": "Bearer " + "0" * 64}) == 403
    assert http_status(url, embedded.headers) == 200
    home = Path(embedded.home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(embedded.token_path).stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "services.json").stat().st_mode) == 0o600
    # Ray's servers read the token from the state folder.
    import psutil

    ray_servers = [psutil.Process(p) for p in services.service_pids(embedded)
                   if any(n in " ".join(psutil.Process(p).cmdline()) for n in ("gcs_server", "raylet"))]
    assert len(ray_servers) >= 2
    for proc in ray_servers:
        env = proc.environ()
        assert env.get("RAY_AUTH_TOKEN_PATH") == str(embedded.token_path) and env.get("RAY_AUTH_MODE") == "token"
    # `up` again reuses the running services.
    result = run_cli(["up"], home=embedded.home)
    assert result.exit_code == 0 and "Already running" in result.output and embedded.dashboard_url in result.output
    assert services.load_record(embedded.home).service_id == embedded.service_id


@pytest.mark.slow
def test_submit_wait_records_every_trial_in_mlflow(embedded, synthetic_dir):
    from mnistnets import count_parameters, create_model
    from mnistnets.summary import format_table
    from mnistnets.train import load_checkpoint

    result = run_cli(["submit", "--models", "v0,v2", "--epochs", 2, *TINY, "--data-dir", synthetic_dir,
                      "--experiment", "svc-wait", "--wait"], home=embedded.home)
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    assert f"{embedded.dashboard_url}/#/jobs/{job}" in result.output
    assert f"{embedded.mlflow_url}/#/experiments/" in result.output
    assert "SUCCEEDED" in result.output
    # --wait streams the driver's log: each trial's epochs once each, in order; then the trials
    # table, and the job's final state last.
    for trial in ("v0-cosine-s1", "v2-cosine-s1"):
        assert _epoch_lines(result.stdout, trial) == ["1/2", "2/2"], result.stdout
    assert result.stdout.rstrip().endswith(f"Job {job} SUCCEEDED: every trial finished."), result.stdout
    # The driver's last line comes before the trials table.
    last = result.stdout.index(f"mnistjobs sweep {job}: 2 trials, 0 failed")
    assert last < result.stdout.index("  trial ") < result.stdout.index(f"Job {job} SUCCEEDED")

    mlf = mlflow_client(embedded)
    (parent,) = _runs(mlf, job, ROLE_SWEEP)
    assert parent.info.run_name == sweep_run_name(job) and parent.info.status == "FINISHED"
    trials = {r.info.run_name: r for r in _runs(mlf, job, ROLE_TRIAL)}
    assert set(trials) == {"v0-cosine-s1", "v2-cosine-s1"}
    for name, run in trials.items():
        model = name.split("-")[0]
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == parent.info.experiment_id
        tags = run.data.tags
        assert tags[TAG_PARENT] == parent.info.run_id
        assert tags[TAG_JOB] == job and tags[TAG_TRIAL]
        assert tags[TAG_DEVICE] == "cpu" and tags[TAG_NODE]
        params = run.data.params
        assert set(params) == set(TRIAL_PARAMS)
        assert params["model"] == model and params["params"] == str(count_parameters(create_model(model)))
        assert (params["epochs"], params["seed"], params["batch_size"], params["train_limit"]) == ("2", "1", "32", "256")
        assert params["schedule"] == "cosine" and params["device"] == "cpu"
        for key in EPOCH_METRICS:
            assert _steps(mlf, run.info.run_id, key) == [1, 2], key  # each epoch exactly once
        for key in TTA_METRICS:  # the recipe's shift8 test-time augmentation, after the last epoch
            assert _steps(mlf, run.info.run_id, key) == [2], key
        assert _artifacts(mlf, run.info.run_id) >= ARTIFACTS
        local = Path(mlf.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(Path(embedded.home) / "dl" / name)))
        assert load_checkpoint(local)["epoch"] == 2
        layers = Path(mlf.download_artifacts(run.info.run_id, "model/layers.txt", str(Path(embedded.home) / "dl" / name)))
        assert layers.read_text() == format_table(create_model(model))

    status = run_cli(["status", job], home=embedded.home)
    assert status.exit_code == 0 and "SUCCEEDED" in status.output and "v2-cosine-s1" in status.output
    listing = run_cli(["list"], home=embedded.home)
    assert listing.exit_code == 0 and job in listing.output
    logs = run_cli(["logs", job], home=embedded.home)
    assert logs.exit_code == 0 and "[v0-cosine-s1] epoch 2/2" in logs.output
    assert logs.stdout in result.stdout  # --wait printed the whole log, once
    # no warning of Tune's about result files this project does not write (jobs.sweep._tune_environment)
    assert "WARNING" not in logs.stdout and "Failed to fetch metrics" not in logs.stdout, logs.stdout
    # ... which ends with the driver's last line, written after its Ray connection closed: nothing after it
    assert logs.stdout.rstrip("\n").splitlines()[-1] == f"mnistjobs sweep {job}: ended SUCCEEDED", logs.stdout[-500:]
    # --follow of a job that has ended prints its whole log (the same text), then its state.
    follow = run_cli(["logs", job, "--follow"], home=embedded.home)
    assert follow.exit_code == 0, follow.output
    assert follow.stdout == logs.stdout
    for trial in ("v0-cosine-s1", "v2-cosine-s1"):
        assert _epoch_lines(follow.stdout, trial) == ["1/2", "2/2"], follow.stdout
    assert follow.output.rstrip().endswith(f"[job {job} SUCCEEDED]"), follow.output
    # ... and it came over the job API's websocket (with the token), not only the final read.
    from jobs import client as jc
    from jobs.cluster import Cluster, job_client

    client = job_client(Cluster(embedded.dashboard_url, embedded.headers, embedded.mlflow_url, True, embedded))
    assert "".join(jc._tail(client, job)) == client.get_job_logs(job)  # raw: click strips Ray's colours


@pytest.mark.slow
def test_cancel_leaves_runs_killed_and_resume_finishes_them(embedded, synthetic_dir):
    epochs = 40
    result = run_cli(["submit", "--models", "v0,v2", "--epochs", epochs, *TINY, "--data-dir", synthetic_dir,
                      "--experiment", "svc-cancel"], home=embedded.home)
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    mlf = mlflow_client(embedded)

    def training():
        runs = _runs(mlf, job, ROLE_TRIAL)
        return len(runs) == 2 and all(_steps(mlf, r.info.run_id, "test_acc") for r in runs)

    wait_for(training, 120, what="both trials to log an epoch")
    result = run_cli(["cancel", job], home=embedded.home)
    assert result.exit_code == 0, result.output
    assert "STOPPED" in result.output
    runs = _runs(mlf, job)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    done_before = {r.info.run_name: max(_steps(mlf, r.info.run_id, "test_acc")) for r in _runs(mlf, job, ROLE_TRIAL)}
    assert all(n < epochs for n in done_before.values()), done_before

    result = run_cli(["resume", job, "--wait"], home=embedded.home)
    assert result.exit_code == 0, result.output
    assert f"Submitted job {job}-r1" in result.output
    for name in done_before:  # the resumed job's log, streamed: each remaining epoch once, in order
        done = [int(e.split("/")[0]) for e in _epoch_lines(result.stdout, name)]
        assert done and done == list(range(done[0], epochs + 1)), (name, result.stdout)
    runs = _runs(mlf, job)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # the same runs, no duplicates
    for run in _runs(mlf, job, ROLE_TRIAL):
        for key in EPOCH_METRICS:
            assert _steps(mlf, run.info.run_id, key) == list(range(1, epochs + 1)), (run.info.run_name, key)


@pytest.mark.slow
def test_bad_specs_create_no_job_and_no_run(embedded):
    from jobs import cluster as clusters, tracking

    client = clusters.job_client(clusters.Cluster(embedded.dashboard_url, embedded.headers, None, True))
    mlf = mlflow_client(embedded)

    def counts():
        exps = [e.experiment_id for e in mlf.search_experiments()]
        return len(client.list_jobs()), len(mlf.search_runs(exps)) if exps else 0, len(exps)

    before = counts()
    for args in (["--models", "v9"], ["--epochs", "0"], ["--gpus-per-trial", "-1"], ["--gpus-per-trial", "1.5"],
                 ["--schedules", "onecycle:bogus=1"], ["--batch-size", "0"]):
        result = run_cli(["submit", *args, "--experiment", "svc-bad"], home=embedded.home)
        assert result.exit_code == 2, (args, result.output)
    assert counts() == before
    assert mlf.get_experiment_by_name("svc-bad") is None
    assert tracking.job_runs(mlf, "nope") == []


@pytest.mark.slow
@pytest.mark.parametrize("command", [["status", "nope"], ["logs", "nope"], ["cancel", "nope"], ["resume", "nope"]])
def test_unknown_job_id(embedded, command):
    result = run_cli(command, home=embedded.home)
    assert result.exit_code == 2, result.output
    assert "No job 'nope'" in result.output and "mnistjobs list" in result.output


def test_commands_need_running_services(tmp_path):
    result = run_cli(["status", "anything"], home=tmp_path / "home")
    assert result.exit_code == 2 and "not running" in result.output
    result = run_cli(["down"], home=tmp_path / "home")
    assert result.exit_code == 0 and "Nothing to stop" in result.output
    assert not os.path.exists(tmp_path / "home" / "services.json")


def test_a_submitted_drivers_runtime_env_is_the_one_the_admitter_predicts(embedded):
    """The queue's admitter starts a job's trial workers before Ray starts the job's driver, with
    the runtime_env it predicts for the job (jobs.rayconnect.job_runtime_env: the submission's
    env_vars, then the driver's ray.init with the setup hook). A driver that Ray's job API really
    started (this cluster's job supervisor) ends up with that runtime_env, so its trials' string
    (jobs.rayconnect.trial_runtime_env), the one the raylet matches workers by, is the same."""
    import json
    import shlex

    from _faults_helpers import job_client, job_ended, job_status
    from jobs.rayconnect import job_runtime_env, trial_runtime_env

    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "PYTHONUNBUFFERED": "1",
           "MNISTJOBS_SPEC": '{"models": ["v2"], "note": "a \\"quoted\\" é"}', "MNISTJOBS_PRESTARTED": "1"}
    script = ("import ray\nfrom jobs import rayconnect\nrayconnect.connect_ray()\n"
              "print('JOB_ENV=' + ray._private.worker.global_worker.core_worker.get_job_config()"
              ".runtime_env_info.serialized_runtime_env)\n")
    client = job_client(embedded)
    job = client.submit_job(entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}",
                            runtime_env={"env_vars": env})
    wait_for(lambda: job_ended(job_status(embedded, job)), timeout=120)
    logs = client.get_job_logs(job)
    assert job_status(embedded, job) == "SUCCEEDED", logs[-3000:]
    actual = next(line.split("=", 1)[1] for line in logs.splitlines() if line.startswith("JOB_ENV="))
    assert json.loads(actual) == json.loads(job_runtime_env(env)), actual
    assert trial_runtime_env(actual) == trial_runtime_env(job_runtime_env(env))
