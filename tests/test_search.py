"""Search and early stopping through `mnistjobs submit` (issue 14): --search random|optuna over
--space, --scheduler asha, the parent run's outcome, the dry run's configs, resume.

The fast tests need no Ray cluster (the spec, Tune's own generator driven in-process, a fake
MLflow); the slow ones submit real searches on the session's shared services (``embedded``) with
tiny synthetic data, through the CLI, and read MLflow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _service_helpers import job_id_of, mlflow_client, run_cli, wait_for
from jobs.contract import (BEST_PARAM_PREFIX, SPEC_ARTIFACT, TAG_BEST_RUN, TAG_METRIC, TAG_MODE, TAG_SCHEDULER,
                           TAG_SEARCH, TAG_SEARCHED, TAG_STOPPED_AT, TAG_STOPPED_EARLY, best_metric_name)
from jobs.search import (TrialNamer, best_trial, parent_tags, sample_configs, search_algorithm, trial_number,
                         tune_config_args)
from jobs.spec import MAX_TRIALS, SpecError, SweepSpec

LR_LOW, LR_HIGH = 1e-4, 0.5


def _search_spec(**values) -> SweepSpec:
    base = dict(models=["v0"], search="random", num_samples=6, search_seed=3, epochs=4,
                space={"lr": f"loguniform({LR_LOW},{LR_HIGH})"})
    return SweepSpec(**{**base, **values}).validate()


# ============================================================================== fast: the spec

def test_a_search_spec_validates_and_defaults():
    spec = SweepSpec(models=["v2"], search="random", space=["lr=loguniform(0.01,0.5)"], epochs=3,
                     scheduler="asha").validate()
    assert (spec.num_samples, spec.search_seed, spec.metric, spec.mode) == (10, None, "test_acc", "max")
    assert (spec.grace_period, spec.reduction_factor) == (1, 3)
    assert spec.space == {"lr": "loguniform(0.01,0.5)"}  # a list of KEY=DIST became a mapping
    assert spec.trial_count() == 10 and len(spec.points()) == 1
    again = SweepSpec.from_json(spec.to_json()).validate()  # the parent's spec.json holds it all
    assert again.to_dict() == spec.to_dict()
    grid = SweepSpec(models=["v2"]).validate()
    assert (grid.search, grid.num_samples, grid.scheduler, grid.grace_period) == ("grid", None, "fifo", None)


def test_random_search_keeps_models_and_grid_dists_as_axes():
    spec = SweepSpec(models=["v0", "v2"], search="random", num_samples=3, epochs=2,
                     space={"lr": "loguniform(0.01,0.5)", "dropout": "grid(0,0.1)"}).validate()
    assert spec.trial_count() == 3 * 2 * 2
    space = spec.param_space(job={"job_id": "j"})
    assert space["model"] == {"grid_search": ["v0", "v2"]} and space["dropout"] == {"grid_search": [0.0, 0.1]}
    assert type(space["lr"]).__name__ == "Float" and space["seed"] == 1  # a one-value axis is plain
    assert "12 trials: random search of lr (3 samples) x v0, v2" in spec.summary()


def test_a_grid_job_takes_grid_dists_of_the_space_as_axes():
    spec = SweepSpec(models=["v1"], schedules=["cosine"], space={"lr": "grid(0.05,0.1)"}, epochs=2).validate()
    assert [n for n, _ in spec.trials()] == ["v1-cosine-s1-lr0.05", "v1-cosine-s1-lr0.1"]
    assert spec.param_space()["lr"] == {"grid_search": [0.05, 0.1]}
    sched = SweepSpec(models=["v1"], space={"schedule": "grid(cosine,step)"}, epochs=2).validate()
    assert [n for n, _ in sched.trials()] == ["v1-cosine-s1", "v1-step-s1"]


def test_the_seeded_random_configs_are_the_ones_tunes_generator_makes():
    """sample_configs (the dry run) == BasicVariantGenerator(random_state=seed) driven as Tune
    drives it, names included: models and a grid axis, 3 samples, 12 trials."""
    from ray.tune.experiment import Experiment

    spec = SweepSpec(models=["v0", "v2"], search="random", num_samples=3, search_seed=5, epochs=2,
                     space={"lr": "loguniform(1e-4,0.5)", "dropout": "grid(0,0.1)"}).validate()
    alg = search_algorithm(spec)
    alg.add_configurations([Experiment("x", run=lambda config: None, config=spec.param_space(job={"job_id": "j"}),
                                       num_samples=spec.num_samples, trial_name_creator=TrialNamer("random"))])
    made = []
    while (trial := alg.next_trial()) is not None:
        made.append((str(trial), trial.config["model"], trial.config["dropout"], trial.config["lr"]))
    listed = [(name, p["model"], p["dropout"], p["lr"]) for name, p in sample_configs(spec)]
    assert made == listed and len(made) == 12
    assert [m[0] for m in made][:3] == ["v0-t001", "v0-t002", "v2-t003"]
    assert len({m[3] for m in made}) == 12 and all(1e-4 <= m[3] <= 0.5 for m in made)
    other = SweepSpec.from_json(spec.to_json()).validate()
    other.search_seed = 6
    assert [p["lr"] for _, p in sample_configs(other)] != [m[3] for m in made]


def test_tune_config_of_each_search():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    random = tune_config_args(_search_spec(scheduler="asha", grace_period=2, reduction_factor=2, max_concurrent=1))
    assert isinstance(random["search_alg"], BasicVariantGenerator) and random["search_alg"].max_concurrent == 1
    assert (random["metric"], random["mode"], random["num_samples"], random["max_concurrent_trials"]) == (
        "test_acc", "max", 6, None)
    asha = random["scheduler"]
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 4 and asha._time_attr == "epoch"
    assert [rung for rung, _ in asha._brackets[0]._rungs] == [4, 2]  # grace 2, factor 2: rungs 2 and 4 (= --epochs)
    optuna = tune_config_args(_search_spec(search="optuna", max_concurrent=2))
    assert isinstance(optuna["search_alg"], ConcurrencyLimiter)
    assert isinstance(optuna["search_alg"].searcher, OptunaSearch) and optuna["scheduler"] is None
    assert isinstance(tune_config_args(_search_spec(search="optuna"))["search_alg"], OptunaSearch)
    grid = tune_config_args(SweepSpec(models=["v0"], max_concurrent=2).validate())
    assert grid == {"max_concurrent_trials": 2}  # today's grid: no metric, Tune's own names


def test_trial_names_come_from_tunes_counter():
    class T:
        def __init__(self, tag, trial_id, model="v2"):
            self.experiment_tag, self.trial_id, self.config = tag, trial_id, {"model": model}

    assert trial_number(T("0_lr=0.1", "ab12c_00000"), "random") == 1  # BasicVariantGenerator: 0-based
    assert trial_number(T("12_lr=0.1", "ab12c_00012"), "random") == 13
    assert trial_number(T("1_lr=0.1", "3f9a2c1b"), "optuna") == 1  # SearchGenerator: 1-based
    assert TrialNamer("optuna")(T("7_lr=0.2", "3f9a2c1b", "v3")) == "v3-t007"


def test_parent_tags():
    assert parent_tags(_search_spec(scheduler="asha", space={"lr": "uniform(0.1,0.2)", "dropout": "grid(0,0.1)"})) == {
        TAG_SEARCH: "random", TAG_SEARCHED: "lr,dropout", TAG_METRIC: "test_acc", TAG_MODE: "max", TAG_SCHEDULER: "asha"}
    grid = parent_tags(SweepSpec(models=["v0"]).validate())
    assert grid == {TAG_SEARCH: "grid", TAG_METRIC: "test_acc", TAG_MODE: "max", TAG_SCHEDULER: "fifo"}


class _Run:
    def __init__(self, run_id, status, start, history, tags=None, params=None):
        from types import SimpleNamespace

        self.info = SimpleNamespace(run_id=run_id, status=status, start_time=start, run_name=run_id)
        self.data = SimpleNamespace(tags=tags or {}, params=params or {})
        self.history = history


class _FakeMlflow:
    def __init__(self, runs):
        self.runs = {r.info.run_id: r for r in runs}

    def get_metric_history(self, run_id, key):
        from types import SimpleNamespace

        return [SimpleNamespace(step=s, value=v, timestamp=i) for i, (s, v) in enumerate(self.runs[run_id].history)]


def test_the_best_trial_is_judged_at_its_last_logged_epoch():
    """Stopped trials count at the epoch they stopped; a FAILED or diverged one does not count;
    a trial whose best epoch was earlier counts with its last."""
    runs = [_Run("peaked", "FINISHED", 1, [(1, 90.0), (2, 99.0), (3, 80.0)]),
            _Run("stopped", "FINISHED", 2, [(1, 85.0)], tags={TAG_STOPPED_EARLY: "true"}),
            _Run("steady", "FINISHED", 3, [(1, 70.0), (2, 84.0), (3, 84.5)]),
            _Run("failed", "FAILED", 4, [(1, 99.9)]),
            _Run("diverged", "FINISHED", 5, [(1, 99.8)], tags={"mnistjobs.diverged": "true"})]
    mlf = _FakeMlflow(runs)
    run, epoch, value = best_trial(mlf, _search_spec(), runs)
    assert (run.info.run_id, epoch, value) == ("stopped", 1, 85.0)
    low = _search_spec(metric="test_acc", mode="min")
    assert best_trial(mlf, low, runs)[0].info.run_id == "peaked"  # 80.0 at its last epoch
    assert best_trial(mlf, _search_spec(), runs[3:]) is None


# ============================================================== fast: bad input exits 2, nothing made

@pytest.mark.parametrize("args, needle", [
    (["--search", "random", "--space", "bogus=uniform(0,1)"], "--space bogus: unknown setting 'bogus'"),
    (["--search", "random", "--space", "lr=loguniform(0.5,0.01)"], "lr=loguniform(0.5,0.01): the bounds are reversed"),
    (["--search", "random", "--space", "lr=gaussian(0,1)"], "--space lr: unknown distribution 'gaussian'"),
    (["--search", "random", "--space", "dropout=uniform(0,1.5)"], "dropout must be in [0, 1)"),
    (["--search", "optuna", "--space", "lr=grid(0.05,0.1)"], "--space lr=grid(0.05,0.1): a grid axis cannot be used"),
    (["--search", "optuna", "--models", "v0,v2", "--space", "lr=uniform(0.05,0.1)"], "--search optuna searches one model"),
    (["--search", "optuna", "--schedules", "cosine;step", "--space", "lr=uniform(0.05,0.1)"], "several --schedules"),
    (["--num-samples", "3"], "--num-samples is for a search"),
    (["--search-seed", "3"], "--search-seed is for a search"),
    (["--space", "lr=uniform(0.05,0.1)"], "add --search random or --search optuna"),
    (["--search", "random"], "no --space is given"),
    (["--search", "random", "--space", "lr=grid(0.05,0.1)"], "it has only grid(...) axes"),
    (["--search", "random", "--seeds", "3", "--space", "lr=uniform(0.05,0.1)"], "every sampled config trains with one seed"),
    (["--search", "random", "--lr", "0.1", "--space", "lr=uniform(0.05,0.1)"], "--space lr: lr is also given as a fixed"),
    (["--search", "random", "--batch-size", "32", "--space", "batch_size=randint(16,64)"], "--space batch_size"),
    (["--search", "random", "--schedules", "cosine", "--space", "schedule=choice(cosine,step)"], "--space schedule"),
    (["--search", "random", "--space", "lr=uniform(0.05,0.1)", "--num-samples", "0"], "--num-samples must be"),
    (["--search", "random", "--space", "lr=uniform(0.05,0.1)", "--num-samples", str(MAX_TRIALS), "--models", "v2"],
     f"a job runs at most {MAX_TRIALS}"),
    (["--search", "random", "--space", "lr=uniform(0.05,0.1)", "--search-seed", "-1"], "--search-seed must be"),
    (["--metric", "accuracy"], "Invalid value for '--metric'"),
    (["--search", "random", "--space", "lr=uniform(0.05,0.1)", "--metric", "test_loss"], "add --mode min"),
    (["--scheduler", "asha", "--grace-period", "9"], "--grace-period must be a whole number from 1 to 4"),
    (["--scheduler", "asha", "--reduction-factor", "1"], "--reduction-factor must be a number > 1"),
    (["--grace-period", "2"], "--grace-period is a setting of ASHA"),
])
def test_bad_search_input_exits_2_and_creates_nothing(tmp_path, args, needle):
    home = tmp_path / "home"
    result = run_cli(["submit", "--models", "v0", "--epochs", "4", *args], home=home)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split()), result.output
    assert not home.exists() or not any(home.iterdir())  # no service, no data, no job


def test_a_sweep_file_takes_the_search(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("models: v2\nsearch: random\nnum_samples: 4\nsearch_seed: 2\nepochs: 3\nscheduler: asha\n"
                    "space:\n  lr: loguniform(0.01,0.5)\n  schedule: choice(\"onecycle:max_lr=0.05,pct_start=0.2\",cosine)\n")
    spec = SweepSpec.from_yaml(path).validate()
    assert spec.space == {"lr": "loguniform(0.01,0.5)", "schedule": 'choice("onecycle:max_lr=0.05,pct_start=0.2",cosine)'}
    listed = SweepSpec.from_yaml(path).update({"space": ["lr=uniform(0.1,0.2)"]}).validate()  # the CLI overrides a key
    assert listed.space["lr"] == "uniform(0.1,0.2)" and "schedule" in listed.space
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: v2\nsearch: random\nspace: ['lr=uniform(0.1,0.2)', 'lr=uniform(0.2,0.3)']\n")
    with pytest.raises(SpecError, match="--space lr: given twice"):
        SweepSpec.from_yaml(bad).validate()
    result = run_cli(["submit", "--config", path, "--dry-run"], home=tmp_path / "home")
    assert result.exit_code == 0, result.output
    for name, point in sample_configs(spec):
        assert name in result.output and f"lr {point['lr']:g}" in result.output
    assert "schedule: one of onecycle:max_lr=0.05,pct_start=0.2 | cosine (sampled)" in result.output


def test_the_dry_run_of_an_unseeded_or_optuna_search_shows_the_space(tmp_path):
    result = run_cli(["submit", "--models", "v2", "--search", "optuna", "--num-samples", "5", "--space",
                      "lr=loguniform(0.01,0.5)", "--dry-run"], home=tmp_path / "home")
    assert result.exit_code == 0, result.output
    assert "5 trials: optuna search of lr (5 samples) x v2" in result.output
    assert "lr: log-uniform from 0.01 to 0.5" in result.output and "lr sampled" in result.output


# ===================================================================== slow: real searches in MLflow

TINY = ["--train-limit", "256", "--test-limit", "64", "--batch-size", "32", "--schedules", "cosine"]


def _submit_search(embedded, synthetic_dir, experiment, *args, wait=True):
    result = run_cli(["submit", "--models", "v0", *TINY, "--data-dir", synthetic_dir, "--experiment", experiment,
                      "--max-failures", "0", *args, *(["--wait"] if wait else [])], home=embedded.home)
    return result


def _runs(mlf, job):
    from jobs.tracking import job_runs

    (parent,) = job_runs(mlf, job, role="sweep")
    return parent, {r.info.run_name: r for r in job_runs(mlf, job, role="trial")}


def _steps(mlf, run_id, key="test_acc"):
    return sorted(m.step for m in mlf.get_metric_history(run_id, key))


def _last(mlf, run_id, key):
    history = sorted(mlf.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return history[-1].value


def _spec_of_parent(mlf, parent) -> SweepSpec:
    return SweepSpec.from_json(Path(mlf.download_artifacts(parent.info.run_id, SPEC_ARTIFACT)).read_text()).validate()


@pytest.mark.slow
def test_random_search_with_asha(embedded, synthetic_dir):
    """6 samples of lr from loguniform(1e-4, 0.5), 4 epochs, ASHA grace 1 / factor 2, one trial at
    a time (a fixed order, so ASHA's decisions are fixed too): 6 runs v0-t001..t006 with distinct
    lrs inside the bounds, exactly the configs the dry run listed; at least one stopped early,
    FINISHED with both tags and exactly its epochs logged; the parent's best is the trial with
    the best last-epoch test_acc."""
    args = ["--epochs", "4", "--search", "random", "--num-samples", "6", "--search-seed", "3", "--scheduler", "asha",
            "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "1",
            "--space", f"lr=loguniform({LR_LOW},{LR_HIGH})"]
    dry = _submit_search(embedded, synthetic_dir, "search-asha", *args, "--dry-run", wait=False)
    assert dry.exit_code == 0, dry.output
    result = _submit_search(embedded, synthetic_dir, "search-asha", *args)
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    mlf = mlflow_client(embedded)
    parent, runs = _runs(mlf, job)
    assert sorted(runs) == [f"v0-t{i:03d}" for i in range(1, 7)], sorted(runs)
    lrs = {name: float(r.data.params["lr"]) for name, r in runs.items()}
    assert len(set(lrs.values())) == 6 and all(LR_LOW <= v <= LR_HIGH for v in lrs.values()), lrs
    # The dry run's configs are the ones that ran (same names, same values, as the runs logged them)
    planned = sample_configs(_spec_of_parent(mlf, parent))
    assert {name: str(point["lr"]) for name, point in planned} == {n: r.data.params["lr"] for n, r in runs.items()}
    for name, point in planned:
        assert f"{name}  v0" in dry.output and f"lr {point['lr']:g}" in dry.output, dry.output
    stopped = {n: r for n, r in runs.items() if r.data.tags.get(TAG_STOPPED_EARLY) == "true"}
    assert stopped, "ASHA stopped no trial: " + result.output[-3000:]
    for name, run in runs.items():
        assert run.info.status == "FINISHED", (name, run.info.status)
        if name in stopped:
            at = int(run.data.tags[TAG_STOPPED_AT])
            assert 1 <= at < 4 and _steps(mlf, run.info.run_id) == list(range(1, at + 1)), name
            assert f"[{name}] stopped by ASHA after epoch {at}/4" in result.output
        else:
            assert TAG_STOPPED_EARLY not in run.data.tags and _steps(mlf, run.info.run_id) == [1, 2, 3, 4], name
    assert "0 failed" in result.output and "SUCCEEDED" in result.output
    # the parent: the search's tags, and its outcome
    tags = parent.data.tags
    assert (tags[TAG_SEARCH], tags[TAG_SEARCHED], tags[TAG_METRIC], tags[TAG_MODE], tags[TAG_SCHEDULER]) == (
        "random", "lr", "test_acc", "max", "asha")
    last = {n: _last(mlf, r.info.run_id, "test_acc") for n, r in runs.items()}
    top = max(last, key=lambda n: (last[n], -runs[n].info.start_time))
    assert tags[TAG_BEST_RUN] == runs[top].info.run_id, (last, tags[TAG_BEST_RUN])
    assert math.isclose(parent.data.metrics[best_metric_name("test_acc")], last[top])
    assert parent.data.params[BEST_PARAM_PREFIX + "lr"] == runs[top].data.params["lr"]
    assert f"search: best trial {top}" in result.output
    assert json.loads(Path(mlf.download_artifacts(parent.info.run_id, SPEC_ARTIFACT)).read_text())["scheduler"] == "asha"


@pytest.mark.slow
def test_optuna_search(embedded, synthetic_dir):
    """4 Optuna samples (TPE, seeded) of lr and weight_decay, 1 epoch: 4 runs with distinct
    values, the parent's tags and outcome."""
    result = _submit_search(embedded, synthetic_dir, "search-optuna", "--epochs", "1", "--search", "optuna",
                            "--num-samples", "4", "--search-seed", "1", "--space", "lr=loguniform(0.01,0.5)",
                            "--space", "weight_decay=loguniform(1e-5,1e-3)")
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    mlf = mlflow_client(embedded)
    parent, runs = _runs(mlf, job)
    assert sorted(runs) == ["v0-t001", "v0-t002", "v0-t003", "v0-t004"], sorted(runs)
    values = [(float(r.data.params["lr"]), float(r.data.params["weight_decay"])) for r in runs.values()]
    assert len(set(values)) == 4 and all(0.01 <= lr <= 0.5 and 1e-5 <= wd <= 1e-3 for lr, wd in values), values
    assert all(r.info.status == "FINISHED" for r in runs.values())
    tags = parent.data.tags
    assert (tags[TAG_SEARCH], tags[TAG_SEARCHED], tags[TAG_SCHEDULER]) == ("optuna", "lr,weight_decay", "fifo")
    best = next(r for r in runs.values() if r.info.run_id == tags[TAG_BEST_RUN])
    assert parent.data.params[BEST_PARAM_PREFIX + "weight_decay"] == best.data.params["weight_decay"]
    assert math.isclose(parent.data.metrics["best_test_acc"], max(_last(mlf, r.info.run_id, "test_acc")
                                                                   for r in runs.values()))


@pytest.mark.slow
def test_resume_of_a_search_job_restores_the_searcher(embedded, synthetic_dir):
    """SIGKILL the driver of a seeded random search (4 samples, one trial at a time) while its
    second trial trains; `resume` finishes it: 4 trial runs in all, the 4 planned configs each
    once, the finished trial not trained again."""
    from _faults_helpers import driver_pids, job_ended, job_status, kill

    result = _submit_search(embedded, synthetic_dir, "search-resume", "--epochs", "3", "--search", "random",
                            "--num-samples", "4", "--search-seed", "11", "--max-concurrent", "1",
                            "--space", "lr=loguniform(0.01,0.3)", wait=False)
    assert result.exit_code == 0, result.output
    job = job_id_of(result.output)
    mlf = mlflow_client(embedded)

    def second_trial_training():
        from jobs.tracking import job_runs

        runs = {r.info.run_name: r for r in job_runs(mlf, job, role="trial")}
        if runs.get("v0-t001") is None or runs["v0-t001"].info.status != "FINISHED" or "v0-t002" not in runs:
            return None
        return _steps(mlf, runs["v0-t002"].info.run_id) and runs

    before = wait_for(second_trial_training, 300, 0.2, what="trial 1 finished and trial 2 training")
    (driver,) = wait_for(lambda: driver_pids(embedded, job), 30, what="the driver")
    kill(driver)
    assert wait_for(lambda: job_ended(s := job_status(embedded, job)) and s, 120, what="the job to end") == "FAILED"
    t1 = before["v0-t001"]

    resumed = run_cli(["resume", job, "--wait"], home=embedded.home)
    assert resumed.exit_code == 0, resumed.output
    parent, runs = _runs(mlf, job)
    assert sorted(runs) == ["v0-t001", "v0-t002", "v0-t003", "v0-t004"], sorted(runs)  # none twice, none more
    planned = {name: str(point["lr"]) for name, point in sample_configs(_spec_of_parent(mlf, parent))}
    assert {n: r.data.params["lr"] for n, r in runs.items()} == planned  # each config once: no resample
    assert all(r.info.status == "FINISHED" for r in runs.values()), {n: r.info.status for n, r in runs.items()}
    assert (runs["v0-t001"].info.run_id, runs["v0-t001"].info.end_time) == (t1.info.run_id, t1.info.end_time)
    assert "[v0-t001] epoch" not in resumed.output  # not trained again
    for run in runs.values():
        assert _steps(mlf, run.info.run_id) == [1, 2, 3]
    assert parent.data.tags[TAG_BEST_RUN] in {r.info.run_id for r in runs.values()}
