"""The sweep spec: parsing, validation (clear SpecError), grid expansion. Fast, no Ray."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jobs.spec import SpecError, SweepSpec, format_trial_table, split_models, split_schedules
from mnistnets import list_models
from mnistnets.train import TrainConfig


def test_split_schedules_keeps_commas_inside_a_spec():
    assert split_schedules("onecycle:max_lr=0.05,pct_start=0.2") == ["onecycle:max_lr=0.05,pct_start=0.2"]
    assert split_schedules("onecycle:max_lr=0.05,pct_start=0.2,step:step_size=6,gamma=0.1,cosine") == [
        "onecycle:max_lr=0.05,pct_start=0.2", "step:step_size=6,gamma=0.1", "cosine"]
    assert split_schedules(["cosine;constant", "step"]) == ["cosine", "constant", "step"]
    assert split_schedules(None) == []


def test_split_models_all_and_lists():
    assert split_models("all") == list_models()
    assert split_models(["v0,v2", "v2"]) == ["v0", "v2"]


def test_grid_names_and_configs():
    spec = SweepSpec(models=["v0", "v2"], schedules=["onecycle:max_lr=0.05", "step:step_size=6"], seeds=2,
                     epochs=3, batch_size=64, train_limit=100, test_limit=50).validate()
    trials = spec.trials()
    names = [n for n, _ in trials]
    assert len(trials) == 2 * 2 * 2
    assert names[:4] == ["v0-onecycle-s1", "v0-onecycle-s2", "v0-step-s1", "v0-step-s2"]
    assert "v2-step-s2" in names
    name, config = trials[0]
    cfg = TrainConfig.from_dict(config).validate()
    assert (cfg.model, cfg.schedule, cfg.seed, cfg.epochs, cfg.batch_size) == ("v0", "onecycle:max_lr=0.05", 1, 3, 64)
    assert (cfg.train_limit, cfg.test_limit) == (100, 50)


def test_defaults_all_models_default_schedule():
    spec = SweepSpec().validate()
    assert spec.models == list_models()
    names = [n for n, _ in spec.trials()]
    assert len(names) == len(list_models())
    default = TrainConfig().schedule.split(":")[0]
    assert names[0] == f"v0-{default}-s1"


def test_same_schedule_name_twice_gets_unique_labels():
    spec = SweepSpec(models=["v1"], schedules=["onecycle:max_lr=0.05", "onecycle:max_lr=0.1"]).validate()
    assert [n for n, _ in spec.trials()] == ["v1-onecycle-s1", "v1-onecycle2-s1"]


def test_explicit_seed_list():
    spec = SweepSpec(models=["v0"], seeds=[3, 7]).validate()
    assert [c["seed"] for _, c in spec.trials()] == [3, 7]


@pytest.mark.parametrize("values, needle", [
    ({"models": ["v9"]}, "Unknown model 'v9'"),
    ({"models": []}, "No model"),
    ({"schedules": ["bogus"]}, "unknown schedule"),
    ({"schedules": ["onecycle:nokey=1"]}, "no key 'nokey'"),
    ({"epochs": 0}, "--epochs"),
    ({"epochs": -3}, "--epochs"),
    ({"epochs": 2.5}, "--epochs"),
    ({"batch_size": 0}, "--batch-size"),
    ({"seeds": 0}, "--seeds"),
    ({"gpus_per_trial": -0.1}, "between 0 and 1"),
    ({"gpus_per_trial": 1.5}, "between 0 and 1"),
    ({"cpus_per_trial": 0}, "--cpus-per-trial"),
    ({"max_failures": -2}, "--max-failures"),
    ({"reuse_workers": "no"}, "reuse_workers must be true or false (--no-reuse-workers: false), not 'no'"),
    ({"optimizer": "rmsprop"}, "Unknown optimizer"),
    ({"train_limit": 0}, "--train-limit"),
    ({"experiment": " "}, "--experiment"),
    ({"train": {"model": "v1"}}, "model is a sweep setting"),
    ({"train": {"lr": -1}}, "lr"),
])
def test_validate_rejects(values, needle):
    spec = SweepSpec(models=["v0"])
    for key, value in values.items():
        setattr(spec, key, value)
    with pytest.raises(SpecError) as info:
        spec.validate()
    assert needle in str(info.value)


def test_yaml_file_and_flags_override(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("models: [v0, v2]\nschedules:\n  - onecycle:max_lr=0.05,pct_start=0.2\n  - cosine\n"
                    "seeds: 2\nepochs: 4\nbatch-size: 32\ntrain:\n  weight_decay: 0.001\n")
    spec = SweepSpec.from_yaml(path)
    spec.update({"epochs": 6, "models": None})  # a flag given (epochs) and one not (models)
    spec.validate()
    assert spec.models == ["v0", "v2"] and spec.epochs == 6 and spec.batch_size == 32
    assert spec.schedules == ["onecycle:max_lr=0.05,pct_start=0.2", "cosine"]
    assert all(c["weight_decay"] == 0.001 and c["epochs"] == 6 for _, c in spec.trials())


@pytest.mark.parametrize("text, needle", [
    ("models: [v0\n", "not valid YAML"),
    ("- v0\n- v1\n", "must be a mapping"),
    ("modles: [v0]\n", "unknown setting 'modles'"),
    # values of the wrong type or out of range: a SpecError naming the setting, never a TypeError
    # here or a failure on the cluster after the trials started
    ("models: 5\n", "models must be a name or a list"),
    ("schedules: 5\n", "schedules must be a name or a list"),
    ("data_dir: 5\n", "data_dir must be a string"),
    ("storage_path: 5\n", "storage_path must be a string"),
    ("seeds: [1, 1]\n", "seeds lists a seed twice"),
    ("train: {dropout: '0.1'}\n", "dropout must be a number"),
    ("train: {translate: 1.5}\n", "translate is a fraction"),
    ("train: {shear: 90}\n", "shear must be < 90"),
    ("train: {nesterov: 'no'}\n", "nesterov must be true or false"),
    ("train: {device: cudax}\n", "device must be auto, cpu, cuda or cuda:N"),
    ("train: {model: v1, epochs: 2}\n", "are sweep settings"),
    ("train: {model: v1}\n", "model is a sweep setting"),
])
def test_bad_yaml(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        SweepSpec.from_yaml(path).validate()
    assert needle in str(info.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(SpecError, match="Cannot read"):
        SweepSpec.from_yaml(tmp_path / "nope.yaml")


def test_json_round_trip():
    spec = SweepSpec(models=["v1", "v3"], schedules=["step:step_size=2"], seeds=[1, 4], epochs=2,
                     gpus_per_trial=0.5, train={"dropout": 0.05}).validate()
    again = SweepSpec.from_json(spec.to_json()).validate()
    assert again == spec
    assert again.trials() == spec.trials()
    with pytest.raises(SpecError):
        SweepSpec.from_json("{not json")
    with pytest.raises(SpecError):
        SweepSpec.from_json(json.dumps({"bogus": 1}))


def test_gpu_auto_fraction():
    spec = SweepSpec(models=["v0"]).validate()
    assert spec.resolved_gpus(0) == 0.0
    assert spec.resolved_gpus(1) == 0.25
    spec.gpus_per_trial = 0.5
    assert spec.resolved_gpus(0) == 0.5


def test_summary_and_table():
    spec = SweepSpec(models=["v0", "v2"], schedules=["cosine"], seeds=3, epochs=5).validate()
    assert spec.summary() == "6 trials: v0, v2 x cosine x seeds 1-3, 5 epochs"
    table = format_trial_table(spec)
    assert "v2-cosine-s3" in table and table.count("\n") == 6
    assert table.splitlines()[0].endswith("other settings")


def test_table_shows_each_trials_own_settings(monkeypatch):
    from mnistnets import train

    monkeypatch.setitem(train.MODEL_RECIPES, "v0", {})
    monkeypatch.setitem(train.MODEL_RECIPES, "v2", {"lr": 0.3, "ema": 0.999})
    rows = format_trial_table(SweepSpec(models=["v0", "v2"], train={"label_smoothing": 0.1}).validate()).splitlines()
    assert rows[1].startswith("v0-") and rows[1].endswith("  label_smoothing 0.1")
    assert rows[2].startswith("v2-") and rows[2].endswith("  lr 0.3, label_smoothing 0.1, ema 0.999")
    plain = format_trial_table(SweepSpec(models=["v0"]).validate()).splitlines()[1]
    assert plain.endswith("  -")  # the shared defaults: nothing else to show


# ------------------------------------------------------------------------- CLI, no services

@pytest.mark.parametrize("args, needle", [
    (["--models", "v9"], "Unknown model 'v9'"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--gpus-per-trial", "-0.5"], "between 0 and 1"),
    (["--gpus-per-trial", "2"], "between 0 and 1"),
    (["--schedules", "bogus"], "unknown schedule"),
])
def test_submit_rejects_bad_spec_before_anything(tmp_path, args, needle):
    from jobs.cli import main

    home = tmp_path / "home"
    result = CliRunner().invoke(main, ["submit", "--home", str(home), *args],
                                env={"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not home.exists()  # no services, no state folder


def test_submit_bad_yaml_exit_2(tmp_path):
    from jobs.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("models: [v0\n")
    result = CliRunner().invoke(main, ["submit", "--home", str(tmp_path / "home"), "--config", str(path)])
    assert result.exit_code == 2 and "not valid YAML" in result.output
    assert not (tmp_path / "home").exists()


def test_submit_missing_data_dir_exit_2(tmp_path):
    from jobs.cli import main

    result = CliRunner().invoke(main, ["submit", "--home", str(tmp_path / "home"), "--models", "v0",
                                       "--data-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "home").exists()


def test_dry_run_prints_trials(tmp_path):
    from jobs.cli import main

    result = CliRunner().invoke(main, ["submit", "--home", str(tmp_path / "home"), "--models", "v0,v2",
                                       "--schedules", "onecycle:max_lr=0.05,pct_start=0.2,cosine",
                                       "--seeds", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "8 trials" in result.output and "v2-cosine-s2" in result.output
    assert not (tmp_path / "home").exists()


def test_unset_settings_come_from_each_models_recipe(monkeypatch):
    from mnistnets import train

    monkeypatch.setitem(train.MODEL_RECIPES, "v2", {"lr": 0.3, "batch_size": 64, "ema": 0.999,
                                                    "schedule": "cosine"})
    monkeypatch.setitem(train.MODEL_RECIPES, "v0", {})  # v0: the shared defaults
    spec = SweepSpec(models=["v0", "v2"], seeds=1).validate()
    configs = dict(spec.trials())
    assert set(configs) == {"v0-onecycle-s1", "v2-cosine-s1"}  # v2's recipe schedule names its runs
    v0, v2 = configs["v0-onecycle-s1"], configs["v2-cosine-s1"]
    assert (v0["lr"], v0["batch_size"], v0["ema"]) == (TrainConfig.lr, TrainConfig.batch_size, 0.0)
    assert (v2["lr"], v2["batch_size"], v2["ema"], v2["schedule"]) == (0.3, 64, 0.999, "cosine")
    assert "64" in format_trial_table(spec).splitlines()[2]
    # Settings given explicitly (top level, train:, or a schedule) beat the recipe, for every model.
    given = dict(SweepSpec(models=["v2"], batch_size=32, schedules=["step"], train={"lr": 0.05}).validate().trials())
    assert (given["v2-step-s1"]["batch_size"], given["v2-step-s1"]["lr"]) == (32, 0.05)
    assert given["v2-step-s1"]["ema"] == 0.999  # what was not given still comes from the recipe
    assert "onecycle, cosine" in SweepSpec(models=["v0", "v2"]).validate().summary()


def test_unknown_train_setting_is_a_spec_error():
    with pytest.raises(SpecError, match="unknown training setting"):
        SweepSpec(models=["v0"], train={"wd": 1}).validate()


# ------------------------------------------------------------------------------- priority

def test_priority_defaults_to_0_and_is_no_trial_setting():
    spec = SweepSpec(models=["v0", "v2"], schedules=["cosine"], seeds=2).validate()
    assert spec.priority == 0
    spec.update({"priority": 7}).validate()
    assert spec.priority == 7
    assert "priority" not in spec.axes() and "priority" not in spec.fixed_settings()
    assert all("priority" not in point for point in spec.points())
    assert all("priority" not in config for _, config in spec.trials())
    assert spec.summary() == "4 trials: v0, v2 x cosine x seeds 1-2, 15 epochs"
    assert "priority" not in format_trial_table(spec)


def test_priority_from_a_sweep_file_and_round_trips(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("models: [v1]\npriority: 5\n")
    spec = SweepSpec.from_yaml(path).validate()
    assert spec.priority == 5
    assert spec.to_dict()["priority"] == 5 and json.loads(spec.to_json())["priority"] == 5
    assert SweepSpec.from_json(spec.to_json()).validate() == spec
    assert SweepSpec.from_mapping(spec.to_dict()).validate() == spec
    assert SweepSpec.from_mapping({"models": "v0", "priority": -1000}).validate().priority == -1000
    assert SweepSpec().update({"models": ["v0"], "priority": None}).validate().priority == 0  # None: not given
    low = SweepSpec(models=["v0"], priority=-3).validate()
    assert SweepSpec.from_json(low.to_json()).priority == -3


@pytest.mark.parametrize("value", [True, False, 1001, -1001, 2.0, 0.5, "5", [5]])
def test_priority_must_be_a_whole_number_in_range(value):
    spec = SweepSpec(models=["v0"]).update({"priority": value})
    with pytest.raises(SpecError) as err:
        spec.validate()
    assert str(err.value).startswith("priority (--priority) must be a whole number from -1000 to 1000, not ")


@pytest.mark.parametrize("text", ["priority: true\n", "priority: 1e3\n", "priority: 2000\n"])
def test_priority_in_a_sweep_file_must_be_a_whole_number_in_range(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text("models: [v0]\n" + text)
    with pytest.raises(SpecError, match=r"priority \(--priority\) must be a whole number from -1000 to 1000"):
        SweepSpec.from_yaml(path).validate()
