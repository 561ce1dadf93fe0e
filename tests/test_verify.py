"""`mnistjobs verify`: each trial's logged model, loaded through MLflow, re-scored on the test
images its run was scored on and compared with the run's logged final test accuracy.

The fast tests use a real MLflow SQLite store (no server): a run laid out as a trial logs it
(params, the data folder tag, test_acc per epoch, the model through jobs.mlflow_model), then
the CLI verifies it, and fails once its final test_acc is tampered with. The slow one verifies
a real tiny sweep on the session's embedded services, then tampers with it.
"""
from __future__ import annotations

import time

import pytest
import torch

from jobs import mlflow_model as mm
from jobs import verify
from jobs.contract import ROLE_TRIAL, TAG_DATA_DIR, TAG_JOB, TAG_ROLE, TAG_STOPPED_EARLY

from test_mlflow_model import normalised, trained_v2


def _cli(args):
    from click.testing import CliRunner

    from jobs.cli import main

    return CliRunner().invoke(main, ["verify", *map(str, args)], catch_exceptions=False,
                              env={"MLFLOW_TRACKING_URI": None, "MNISTJOBS_DATA_DIR": None})


@pytest.fixture(scope="module")
def store(tmp_path_factory, synthetic_dir, synthetic_data):
    """A SQLite store with experiment "vx" and one trial run "v2-cosine-s1" of job "job-a" that
    logged a briefly trained v2 and, as its final test_acc, that model's real accuracy on the
    first 64 synthetic test images (test_limit 64)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    tmp = tmp_path_factory.mktemp("verify_store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlf = MlflowClient(uri)
    exp = mlf.create_experiment("vx", artifact_location=str(tmp / "artifacts"))
    net = trained_v2(synthetic_data)
    with torch.no_grad():
        pred = net(normalised(synthetic_data.test_images[:64])).argmax(1)
    acc = 100.0 * (pred == synthetic_data.test_labels[:64]).float().mean().item()
    assert 30 < acc < 100  # the model is neither chance nor perfect: a tampered number shows

    def trial(name, *, final, with_model=True, tags=None):
        run = mlf.create_run(exp, run_name=name, tags={TAG_JOB: "job-a", TAG_ROLE: ROLE_TRIAL,
                                                       TAG_DATA_DIR: str(synthetic_dir), **(tags or {})})
        rid = run.info.run_id
        ts = int(time.time() * 1000)
        mlf.log_batch(rid, params=[Param(k, str(v)) for k, v in {"model": "v2", "test_limit": 64, "epochs": 2}.items()],
                      metrics=[Metric("test_acc", final - 5, ts, 1), Metric("test_acc", final, ts, 2)])
        if with_model:
            mm.log_trial_model(mlf, rid, net, step=2, input_example=synthetic_data.test_images[:4].numpy())
        mlf.set_terminated(rid)
        return rid

    rid = trial("v2-cosine-s1", final=acc)
    stopped = trial("v2-cosine-s2", final=acc, with_model=False, tags={TAG_STOPPED_EARLY: "true"})
    return mlf, uri, exp, rid, stopped, acc


def test_logged_final_is_the_last_value_at_the_last_step(store):
    from mlflow.entities import Metric

    mlf, uri, exp, *_ = store
    rid = mlf.create_run(exp, run_name="history").info.run_id
    mlf.log_batch(rid, metrics=[Metric("test_acc", 50.0, 1000, 1), Metric("test_acc", 60.0, 1000, 2),
                                Metric("test_acc", 61.0, 3000, 2), Metric("test_acc", 99.0, 9000, 1)])
    assert verify.logged_final(mlf, rid) == (2, 61.0)  # step 1's later value changes nothing
    assert verify.logged_final(mlf, rid, "tta_test_acc") is None


def test_rescore_batches_never_hold_one_image(synthetic_data):
    """The exported model's batch dimension is dynamic from 2: no batch of one image is made."""
    sizes = []

    def module(x):
        sizes.append(len(x))
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    labels = torch.zeros(1001, dtype=torch.long)
    labels[::2] = 1
    images = torch.zeros(1001, 28, 28, dtype=torch.uint8)
    assert verify.rescore(module, images, labels, batch=100) == pytest.approx(100 * 500 / 1001)
    assert sizes == [100] * 9 + [101] and sum(sizes) == 1001
    sizes.clear()
    assert verify.rescore(module, images[:1], labels[:1]) == 0.0  # label 1, predicted 0
    assert sizes == [2]


@pytest.mark.parametrize("text, want", [
    ("mnistjobs-v2@best", ("mnistjobs-v2", "best", None)),
    ("models:/mnistjobs-v2@champion", ("mnistjobs-v2", "champion", None)),
    ("mnistjobs-v2/3", ("mnistjobs-v2", None, "3")),
    ("mnistjobs-v2", ("mnistjobs-v2", "best", None)),
])
def test_parse_model(text, want):
    assert verify.parse_model(text) == want


def test_parse_model_refuses_what_names_no_version():
    with pytest.raises(verify.VerifyError, match="NAME@ALIAS"):
        verify.parse_model("mnistjobs-v2@")


def test_verify_passes_then_fails_on_a_tampered_final_metric(store, tmp_path, monkeypatch):
    from mlflow.entities import Metric

    monkeypatch.chdir(tmp_path)  # nothing may land in ./mlruns
    mlf, uri, exp, rid, stopped, acc = store
    result = _cli(["--tracking-uri", uri, "--experiment", "vx", "--job", "job-a"])
    assert result.exit_code == 0, result.output
    assert "All 1 run(s) verified" in result.output and "1 skipped" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("v2-cosine-s1 "))
    assert f"{acc:.2f}%" in row and row.count(f"{acc:.2f}%") == 2 and row.rstrip().endswith("ok"), row
    assert "skipped: stopped early by Tune" in result.output

    # a larger value logged at an EARLIER step is history, not the final: still verified
    mlf.log_metric(rid, "test_acc", 99.9, timestamp=int(time.time() * 1000) + 5000, step=1)
    assert _cli(["--tracking-uri", uri, "--experiment", "vx"]).exit_code == 0

    # a different value at the last step, logged later: that is the run's final now, and it is wrong
    mlf.log_batch(rid, metrics=[Metric("test_acc", acc + 0.5, int(time.time() * 1000) + 10_000, 2)])
    result = _cli(["--tracking-uri", uri, "--experiment", "vx", "--job", "job-a"])
    assert result.exit_code == 1, result.output
    assert "MISMATCH" in result.output and "1 of 1 run(s) FAILED verification" in result.output
    assert f"{acc + 0.5:.2f}%" in result.output and "-0.50" in result.output
    # ... unless the tolerance allows it
    assert _cli(["--tracking-uri", uri, "--experiment", "vx", "--tolerance", "0.6"]).exit_code == 0
    mlf.log_batch(rid, metrics=[Metric("test_acc", acc, int(time.time() * 1000) + 20_000, 2)])  # put back


def test_verify_reads_the_test_set_the_run_was_scored_on(store, tmp_path, monkeypatch, synthetic_data):
    """The run's test_limit decides the images: with another limit the same model scores differently."""
    monkeypatch.chdir(tmp_path)
    mlf, uri, exp, rid, stopped, acc = store
    checks = verify.verify(uri, experiment="vx", job="job-a")
    (checked,) = [c for c in checks if c.skipped is None]
    assert checked.images == 64 and checked.ok and checked.recomputed == pytest.approx(acc)
    net = mm.raw_image_model(trained_v2(synthetic_data))
    assert verify.rescore(net, synthetic_data.test_images[:200], synthetic_data.test_labels[:200]) != pytest.approx(acc)


@pytest.mark.parametrize("args, needle", [
    (["--job", "no-such-job"], "no finished trial run of job no-such-job"),
    (["--experiment", "nope"], "no MLflow experiment 'nope'"),
    (["--model", "mnistjobs-nothing@best"], "no registered model version 'mnistjobs-nothing@best'"),
    (["--job", "job-a", "--model", "x@best"], "Give --job or --model, not both"),
    (["--tolerance", "-1"], "--tolerance must be a number of points >= 0"),
])
def test_bad_requests_exit_2_and_say_why(store, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    mlf, uri, *_ = store
    result = _cli(["--tracking-uri", uri, "--experiment", "vx", *args] if "--experiment" not in args
                  else ["--tracking-uri", uri, *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output, result.output


def test_no_tracking_server_is_a_usage_error(tmp_path):
    result = _cli(["--home", tmp_path / "nothing-here"])
    assert result.exit_code == 2 and "No MLflow tracking server is known" in result.output


# ---------------------------------------------------------------------------- a real tiny sweep

@pytest.mark.slow
def test_verify_passes_on_a_finished_sweep_and_fails_once_tampered(embedded, synthetic_dir):
    """A tiny real sweep (submit --wait): verify --job passes, verify --model of its registered
    v0 passes; a test_acc logged again at the last epoch with another value makes it exit 1."""
    from mlflow.entities import Metric

    from _service_helpers import TINY, job_id_of, mlflow_client, run_cli
    from jobs.tracking import job_runs

    result = run_cli(["submit", "--models", "v0", "--epochs", 1, *TINY, "--data-dir", synthetic_dir,
                      "--experiment", "verify-sweep", "--system-metrics-interval", 0, "--wait"], home=embedded.home)
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    ok = run_cli(["verify", "--job", job, "--experiment", "verify-sweep"], home=embedded.home)
    assert ok.exit_code == 0, ok.output
    assert "All 1 run(s) verified" in ok.output and "v0-cosine-s1" in ok.output
    mlf = mlflow_client(embedded)
    (run,) = job_runs(mlf, job, role="trial")
    version = next(v for v in mlf.search_model_versions("name = 'mnistjobs-v0'") if v.run_id == run.info.run_id)
    by_model = run_cli(["verify", "--model", f"mnistjobs-v0/{version.version}"], home=embedded.home)
    assert by_model.exit_code == 0, by_model.output
    assert f"models:/mnistjobs-v0/{version.version}" not in by_model.output  # the table names the run
    assert "v0-cosine-s1" in by_model.output

    final = run.data.metrics["test_acc"]
    mlf.log_batch(run.info.run_id, metrics=[Metric("test_acc", final + 1.0, int(time.time() * 1000) + 60_000, 1)])
    bad = run_cli(["verify", "--job", job, "--experiment", "verify-sweep"], home=embedded.home)
    assert bad.exit_code == 1, bad.output
    assert "MISMATCH" in bad.output and "-1.00" in bad.output
