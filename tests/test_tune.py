"""Tune owns the space of trials: the spec's param_space has real axes, Tune expands it into the
same trials the dry run lists, and a trial Tune stops on purpose ends FINISHED, not failed.

The fast tests need no Ray cluster (Tune's own variant generator expands the param_space); the
slow ones run real sweeps with a Tune stopper on the session's shared services (``embedded``):
a small driver (``_STOP_DRIVER``) calls ``run_sweep(..., stop=...)`` connected to its Ray.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.contract import TAG_STOPPED_AT, TAG_STOPPED_EARLY, TAG_TRIAL, EPOCH_METRICS
from jobs.grid import NAMING_KEY, trial_config, trial_name
from jobs.mlflow_model import logged_model_id
from jobs.spec import SpecError, SweepSpec, format_trial_table

REPO = Path(__file__).resolve().parents[1]


def _tune_points(spec: SweepSpec) -> list[dict]:
    """The configs Tune's own grid expansion makes of the spec's param_space."""
    from ray.tune.search.variant_generator import generate_variants

    return [config for _, config in generate_variants(spec.param_space(job={"job_id": "j"}))]


def _strip_job(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "job"}


def test_param_space_axes_are_tune_grid_searches_and_fixed_settings_plain():
    spec = SweepSpec(models=["v0", "v2"], schedules=["onecycle:max_lr=0.05", "cosine"], seeds=2, epochs=3,
                     batch_size=64, train_limit=100, train={"weight_decay": 0.001}).validate()
    space = spec.param_space(job={"job_id": "j"})
    assert space["model"] == {"grid_search": ["v0", "v2"]}
    assert space["schedule"] == {"grid_search": ["onecycle:max_lr=0.05", "cosine"]}
    assert space["seed"] == {"grid_search": [1, 2]}
    assert (space["epochs"], space["batch_size"], space["train_limit"], space["weight_decay"]) == (3, 64, 100, 0.001)
    assert space["job"] == {"job_id": "j"}
    assert "trial" not in space  # no opaque per-trial dicts any more
    assert list(spec.axes()) == ["model", "schedule", "seed"]


def test_tune_expands_the_param_space_into_the_listed_trials():
    """One source of truth: Tune's expansion of param_space and points() are the same trials."""
    spec = SweepSpec(models=["v0", "v2"], schedules=["onecycle:max_lr=0.05", "onecycle:max_lr=0.1", "step"],
                     seeds=[1, 7], epochs=2).validate()
    tuned = [_strip_job(c) for c in _tune_points(spec)]
    listed = spec.points()
    assert len(tuned) == len(listed) == 2 * 3 * 2
    key = lambda c: (c["model"], c["schedule"], c["seed"])  # noqa: E731
    assert sorted(tuned, key=key) == sorted(listed, key=key)
    names = [trial_name(c) for c in listed]
    assert sorted(trial_name(c) for c in tuned) == sorted(names)
    assert names[:3] == ["v0-onecycle-s1", "v0-onecycle-s7", "v0-onecycle2-s1"]
    # trials() (the dry run, validation) is points() named, with the TrainConfig built from each
    assert [n for n, _ in spec.trials()] == names
    for (name, config), point in zip(spec.trials(), listed):
        assert config == trial_config(point).to_dict()
    assert all(n in format_trial_table(spec) for n in names)


def test_without_schedules_each_model_runs_its_recipe_schedule(monkeypatch):
    from mnistnets import train

    monkeypatch.setitem(train.MODEL_RECIPES, "v2", {"schedule": "cosine", "lr": 0.3})
    monkeypatch.setitem(train.MODEL_RECIPES, "v0", {})
    spec = SweepSpec(models=["v0", "v2"], seeds=1).validate()
    space = spec.param_space()
    assert "schedule" not in spec.axes() and space["schedule"] is None  # a plain value: "the recipe's"
    tuned = _tune_points(spec)
    assert sorted(trial_name(c) for c in tuned) == ["v0-onecycle-s1", "v2-cosine-s1"]
    v2 = next(c for c in tuned if c["model"] == "v2")
    cfg = trial_config(v2)  # built inside the trial from the sampled config
    assert (cfg.schedule, cfg.lr, cfg.model, cfg.seed) == ("cosine", 0.3, "v2", 1)
    assert trial_config(next(c for c in tuned if c["model"] == "v0")).schedule == train.TrainConfig.schedule


def test_a_train_setting_given_as_a_list_is_one_more_grid_axis():
    spec = SweepSpec(models=["v1"], schedules=["cosine"], seeds=1, epochs=2,
                     train={"lr": [0.05, 0.1], "dropout": 0.1}).validate()
    assert spec.axes() == {"model": ["v1"], "schedule": ["cosine"], "seed": [1], "lr": [0.05, 0.1]}
    space = spec.param_space()
    assert space["lr"] == {"grid_search": [0.05, 0.1]} and space["dropout"] == 0.1
    assert [n for n, _ in spec.trials()] == ["v1-cosine-s1-lr0.05", "v1-cosine-s1-lr0.1"]
    assert sorted(trial_name(c) for c in _tune_points(spec)) == ["v1-cosine-s1-lr0.05", "v1-cosine-s1-lr0.1"]
    assert [c["lr"] for _, c in spec.trials()] == [0.05, 0.1]
    assert spec.summary() == "2 trials: v1 x cosine x seed 1 x lr 0.05, 0.1, 2 epochs"
    again = SweepSpec.from_json(spec.to_json()).validate()
    assert again.trials() == spec.trials()


@pytest.mark.parametrize("values, needle", [
    ({"train": {"lr": []}}, "a list is a grid axis of distinct values"),
    ({"train": {"lr": [0.1, 0.1]}}, "a list is a grid axis of distinct values"),
    ({"train": {"lr": [0.1, -1.0]}}, "Trial v0-cosine-s1-lr-1: lr"),
    ({"schedules": ["cosine", "cosine"]}, "schedules lists 'cosine' twice"),
])
def test_grid_axes_are_checked(values, needle):
    spec = SweepSpec(models=["v0"], schedules=["cosine"])
    for key, value in values.items():
        setattr(spec, key, value)
    with pytest.raises(SpecError) as info:
        spec.validate()
    assert needle in str(info.value)


def test_the_naming_travels_in_the_config():
    """A trial's config names it on its own (trial folders, the progress lines, the MLflow run)."""
    spec = SweepSpec(models=["v3"], schedules=["onecycle:max_lr=0.05", "onecycle:max_lr=0.1"], seeds=1).validate()
    second = spec.points()[1]
    assert second[NAMING_KEY]["labels"] == {"onecycle:max_lr=0.05": "onecycle", "onecycle:max_lr=0.1": "onecycle2"}
    assert trial_name(second) == "v3-onecycle2-s1"

    class FakeTrial:
        config, trial_id = {**second, "job": {"job_id": "j"}}, "abc12_00001"

    from jobs.sweep import _trial_dirname

    assert _trial_dirname(FakeTrial()) == "v3-onecycle2-s1_abc12_00001"


def test_a_trials_data_is_read_in_a_thread_once_per_worker_and_its_errors_name_the_node(tmp_path, synthetic_dir):
    """jobs.trial reads MNIST in a thread while the trial opens its MLflow run; the data comes back
    (once per worker process), and a missing folder is the DataError that names the node."""
    from jobs import trial
    from mnistnets.data import DataError

    first = trial._DataReader(str(synthetic_dir)).result("10.0.0.1/abc")
    again = trial._DataReader(str(synthetic_dir)).result("10.0.0.1/abc")
    assert first[0] == str(Path(synthetic_dir).resolve()) and len(first[1].train_labels) > 0
    assert again[1] is first[1]  # the worker's copy
    with pytest.raises(DataError, match=r"On Ray node 10\.0\.0\.1/abc: .*nowhere.*--data-dir"):
        trial._DataReader(str(tmp_path / "nowhere")).result("10.0.0.1/abc")


def test_stopped_tags():
    from jobs.trial import stopped_tags

    assert stopped_tags(2, 5) == {TAG_STOPPED_EARLY: "true", TAG_STOPPED_AT: "2"}
    assert stopped_tags(None, 5) == {TAG_STOPPED_EARLY: "true", TAG_STOPPED_AT: "0"}
    assert stopped_tags(5, 5) == {}  # stopped after its last epoch: it trained all of them


# ------------------------------------------------------------------ real sweeps with a stopper

#: A sweep driver as the Ray job runs it, with a Tune stopper: argv = spec JSON, job id, experiment id.
_STOP_DRIVER = """
import sys
from jobs.spec import SweepSpec
from jobs.sweep import run_sweep
spec = SweepSpec.from_json(sys.argv[1]).validate()
sys.exit(run_sweep(spec, sys.argv[2], experiment_id=sys.argv[3], stop={"training_iteration": 1}))
"""


def _run_stopped_sweep(embedded, spec: SweepSpec, job_id: str, experiment: str):
    from jobs import tracking
    from jobs.record import mlflow_credentials_for
    from jobs.state import ray_auth_env

    mlf = tracking.client(embedded.mlflow_url)
    experiment_id = tracking.get_or_create_experiment(mlf, experiment)  # as the job client does
    env = {**os.environ, **ray_auth_env(embedded.home), "RAY_ADDRESS": embedded.ray_address,
           "MLFLOW_TRACKING_URI": embedded.mlflow_url, "MNISTJOBS_HOME": str(embedded.home),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MNISTJOBS_STORAGE_PATH", None)
    env.update(mlflow_credentials_for(embedded.mlflow_url, embedded.home) or {})  # the server's basic-auth login
    proc = subprocess.run([sys.executable, "-c", _STOP_DRIVER, spec.to_json(), job_id, experiment_id], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    return mlf, experiment_id, proc


def _steps(mlf, run_id, key="test_acc"):
    return sorted(m.step for m in mlf.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_trial_tune_stops_early_ends_finished_and_the_job_succeeds(embedded, synthetic_dir):
    """stop={"training_iteration": 1} on 3-epoch trials: each trains one epoch; its run ends
    FINISHED with stopped_early=true, stopped_at_epoch=1 and exactly epoch 1 logged; the
    sweep run FINISHED and the driver exits 0."""
    from jobs.tracking import job_runs

    spec = SweepSpec(models=["v0"], schedules=["cosine"], seeds=2, epochs=3, batch_size=32, train_limit=256,
                     test_limit=64, data_dir=str(synthetic_dir), cpus_per_trial=1).validate()
    mlf, experiment_id, proc = _run_stopped_sweep(embedded, spec, "tune-stopped-early", "tune-stopped")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "[v0-cosine-s1] stopped by Tune after epoch 1/3" in out and "0 failed" in out, out[-4000:]
    runs = {r.info.run_name: r for r in job_runs(mlf, "tune-stopped-early", role="trial",
                                                 experiment_ids=[experiment_id])}
    assert sorted(runs) == ["v0-cosine-s1", "v0-cosine-s2"]
    for run in runs.values():
        assert run.info.status == "FINISHED", run.info
        assert run.data.tags[TAG_STOPPED_EARLY] == "true" and run.data.tags[TAG_STOPPED_AT] == "1"
        assert run.data.tags[TAG_TRIAL]
        for key in EPOCH_METRICS[:6]:
            assert _steps(mlf, run.info.run_id, key) == [1], key  # exactly the epoch it trained
        assert logged_model_id(mlf, run) is None  # stopped early: a scheduler's loser logs no model
    assert "registry: no finished trial with a logged model; nothing registered" in out, out[-4000:]
    (parent,) = job_runs(mlf, "tune-stopped-early", role="sweep", experiment_ids=[experiment_id])
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_trial_tune_stops_after_its_last_epoch_is_finished_not_stopped_early(embedded, synthetic_dir):
    """Stopped by Tune at its last epoch (inside tune.report, before the trial closes its run):
    FINISHED without the stopped_early tag; the job succeeds."""
    from jobs.tracking import job_runs

    spec = SweepSpec(models=["v0"], schedules=["cosine"], seeds=1, epochs=1, batch_size=32, train_limit=256,
                     test_limit=64, data_dir=str(synthetic_dir)).validate()
    mlf, experiment_id, proc = _run_stopped_sweep(embedded, spec, "tune-stopped-last", "tune-stopped")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (run,) = job_runs(mlf, "tune-stopped-last", role="trial", experiment_ids=[experiment_id])
    assert run.info.status == "FINISHED" and TAG_STOPPED_EARLY not in run.data.tags, (run.info, run.data.tags)
    assert _steps(mlf, run.info.run_id) == [1]
    (parent,) = job_runs(mlf, "tune-stopped-last", role="sweep", experiment_ids=[experiment_id])
    assert parent.info.status == "FINISHED"


def _trial_actors(embedded) -> dict[str, int]:
    """Ray's records of every trial actor (Tune's ImplicitFunc) the cluster has had, dead ones
    included: actor id -> worker pid (the dashboard's state API)."""
    import json
    import urllib.request

    url = (f"{embedded.dashboard_url}/api/v0/actors?limit=10000&detail=1&filter_keys=class_name"
           f"&filter_predicates=%3D&filter_values=ImplicitFunc")
    with urllib.request.urlopen(urllib.request.Request(url, headers=embedded.headers), timeout=30) as r:
        return {a["actor_id"]: a.get("pid") for a in json.load(r)["data"]["result"]["result"]}


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_no_reuse_workers_runs_every_trial_in_a_fresh_worker_process(embedded, synthetic_dir, reuse):
    """--no-reuse-workers (spec reuse_workers: false) reaches Tune as reuse_actors=False: two trials
    one at a time get two trial actors in two worker processes (Ray's own records); by default
    the second trial runs in the first's actor."""
    spec = SweepSpec(models=["v0"], schedules=["cosine"], seeds=2, epochs=1, batch_size=32, train_limit=128,
                     test_limit=64, data_dir=str(synthetic_dir), max_concurrent=1, reuse_workers=reuse).validate()
    before = _trial_actors(embedded)
    _, _, proc = _run_stopped_sweep(embedded, spec, f"tune-reuse-{str(reuse).lower()}", "tune-reuse")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 trials, 0 failed" in out, out[-4000:]
    new = {a: pid for a, pid in _trial_actors(embedded).items() if a not in before}
    assert len(new) == len(set(new.values())) == (1 if reuse else 2), new


# ------------------------------------------------- the driver's MLflow client, plain HTTP first

#: A sweep driver whose Tuner.fit() says, as it is entered, whether MLflow's client was imported.
_CHECKED_DRIVER = """
import sys
from ray import tune
from jobs.spec import SweepSpec
from jobs.sweep import run_sweep
fit = tune.Tuner.fit
def checked_fit(self):
    print("MLFLOW IMPORTED AT FIT:", "mlflow" in sys.modules, flush=True)
    return fit(self)
tune.Tuner.fit = checked_fit
spec = SweepSpec.from_json(sys.argv[1]).validate()
sys.exit(run_sweep(spec, sys.argv[2], experiment_id=sys.argv[3], log_models=False))
"""


@pytest.mark.slow
def test_the_driver_of_a_queued_job_imports_mlflow_only_after_its_first_trial_started(embedded, synthetic_dir):
    """Up to Tuner.fit() the driver reads its queued parent run and marks it RUNNING with its tags
    over plain HTTP (jobs.rest), so the trial worker's imports beside it get the CPU; MLflow's own
    client is made in a thread once a trial started and closes the job as before: parent FINISHED
    with its summary, trial FINISHED."""
    from jobs import search, tracking
    from jobs.contract import SUMMARY_FINAL

    spec = SweepSpec(models=["v0"], schedules=["cosine"], seeds=1, epochs=1, batch_size=32, train_limit=128,
                     test_limit=64, data_dir=str(synthetic_dir), cpus_per_trial=1).validate()
    job_id = "driver-lite-http"
    mlf = tracking.client(embedded.mlflow_url)
    experiment_id = tracking.get_or_create_experiment(mlf, "driver-lite")
    # the job's parent run as `submit` leaves it, but without the queue's tags: the admitter of the
    # shared services leaves it to this driver
    queued = tracking.open_sweep_run(mlf, spec, job_id, experiment_id, None, status="SCHEDULED")
    from jobs.record import mlflow_credentials_for
    from jobs.state import ray_auth_env

    env = {**os.environ, **ray_auth_env(embedded.home), "RAY_ADDRESS": embedded.ray_address,
           "MLFLOW_TRACKING_URI": embedded.mlflow_url, "MNISTJOBS_HOME": str(embedded.home), "PYTHONUNBUFFERED": "1"}
    env.pop("MNISTJOBS_STORAGE_PATH", None)
    env.update(mlflow_credentials_for(embedded.mlflow_url, embedded.home) or {})
    proc = subprocess.run([sys.executable, "-c", _CHECKED_DRIVER, spec.to_json(), job_id, experiment_id], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MLFLOW IMPORTED AT FIT: False" in out, out[-4000:]
    parent = mlf.get_run(queued.run_id)
    assert parent.info.status == "FINISHED", parent.info
    for key, value in search.parent_tags(spec).items():  # tagged over plain HTTP
        assert parent.data.tags[key] == value, key
    assert SUMMARY_FINAL in parent.data.metrics and f"v0.{SUMMARY_FINAL}" in parent.data.metrics, parent.data.metrics
    (trial,) = tracking.job_runs(mlf, job_id, role="trial", experiment_ids=[experiment_id])
    assert trial.info.status == "FINISHED"
