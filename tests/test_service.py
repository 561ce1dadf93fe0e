"""The experiment service end to end: a real local Ray head and a real MLflow server (the
session's one set, the ``embedded`` fixture of conftest.py), tiny synthetic MNIST, CPU only."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from _service_helpers import job_id_of, mlflow_client, run_cli, wait_for

CONTRACT_PARAMS = {"model", "params", "schedule", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                   "batch_size", "epochs", "seed", "augment", "train_limit", "test_limit", "device",
                   "label_smoothing", "dropout", "rotation", "translate", "scale", "shear", "clean_epochs",
                   "ema", "tta"}
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds", "images_per_second")
ARTIFACTS = {"model/layers.txt", "checkpoints/last.pt", "checkpoints/best.pt", "plots/accuracy.png",
             "plots/loss.png"}
TINY = ["--train-limit", "256", "--test-limit", "64", "--batch-size", "32", "--schedules", "cosine"]


def _artifacts(mlf, run_id, path=None):
    out = set()
    for a in mlf.list_artifacts(run_id, path):
        out |= _artifacts(mlf, run_id, a.path) if a.is_dir else {a.path}
    return out


def _steps(mlf, run_id, key):
    return sorted(m.step for m in mlf.get_metric_history(run_id, key))


def _runs(mlf, job_id, role=None):
    from jobs import tracking

    return tracking.job_runs(mlf, job_id, role=role)


# ---------------------------------------------------------------------------------- no services

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
    ray_servers = [p for p in services.service_pids(embedded)
                   if any(n in Path(f"/proc/{p}/cmdline").read_bytes() for n in (b"gcs_server", b"raylet"))]
    assert len(ray_servers) >= 2
    for pid in ray_servers:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"RAY_AUTH_TOKEN_PATH={embedded.token_path}".encode() in env and b"RAY_AUTH_MODE=token" in env
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

    mlf = mlflow_client(embedded)
    (parent,) = _runs(mlf, job, "sweep")
    assert parent.info.run_name == f"sweep-{job}" and parent.info.status == "FINISHED"
    trials = {r.info.run_name: r for r in _runs(mlf, job, "trial")}
    assert set(trials) == {"v0-cosine-s1", "v2-cosine-s1"}
    for name, run in trials.items():
        model = name.split("-")[0]
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == parent.info.experiment_id
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["mnistjobs.job_id"] == job and tags["mnistjobs.trial_id"]
        assert tags["mnistjobs.device"] == "cpu" and tags["mnistjobs.node"]
        params = run.data.params
        assert set(params) == CONTRACT_PARAMS
        assert params["model"] == model and params["params"] == str(count_parameters(create_model(model)))
        assert (params["epochs"], params["seed"], params["batch_size"], params["train_limit"]) == ("2", "1", "32", "256")
        assert params["schedule"] == "cosine" and params["device"] == "cpu"
        for key in EPOCH_METRICS:
            assert _steps(mlf, run.info.run_id, key) == [1, 2], key  # each epoch exactly once
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


@pytest.mark.slow
def test_cancel_leaves_runs_killed_and_resume_finishes_them(embedded, synthetic_dir):
    epochs = 40
    result = run_cli(["submit", "--models", "v0,v2", "--epochs", epochs, *TINY, "--data-dir", synthetic_dir,
                      "--experiment", "svc-cancel"], home=embedded.home)
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    mlf = mlflow_client(embedded)

    def training():
        runs = _runs(mlf, job, "trial")
        return len(runs) == 2 and all(_steps(mlf, r.info.run_id, "test_acc") for r in runs)

    wait_for(training, 120, what="both trials to log an epoch")
    result = run_cli(["cancel", job], home=embedded.home)
    assert result.exit_code == 0, result.output
    assert "STOPPED" in result.output
    runs = _runs(mlf, job)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    done_before = {r.info.run_name: max(_steps(mlf, r.info.run_id, "test_acc")) for r in _runs(mlf, job, "trial")}
    assert all(n < epochs for n in done_before.values()), done_before

    result = run_cli(["resume", job, "--wait"], home=embedded.home)
    assert result.exit_code == 0, result.output
    assert f"Submitted job {job}-r1" in result.output
    runs = _runs(mlf, job)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # the same runs, no duplicates
    for run in _runs(mlf, job, "trial"):
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
