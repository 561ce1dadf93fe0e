"""--space KEY=DIST: parsing (quoted items, numbers as numbers), validation (every bad space is a
SpaceError naming the key), Ray Tune's search-space objects and the --dry-run text. Fast: no
Ray cluster (Tune's domains are sampled directly; its variant generator expands the grid)."""
from __future__ import annotations

import dataclasses
import random

import pytest

from jobs.space import (MAX_LR, NOT_SEARCHABLE, SETTING_TYPES, Dist, SpaceError, check_search, describe_space,
                        grid_size, parse_space, space_items, to_tune)


def test_the_issues_example_parses_with_numbers_as_numbers():
    space = parse_space(["lr=loguniform(0.01,0.5)", "weight_decay=loguniform(1e-5,1e-3)",
                         "schedule=choice(onecycle,cosine:warmup=1)"])
    assert list(space) == ["lr", "weight_decay", "schedule"]
    assert space["lr"] == Dist("lr", "loguniform", (0.01, 0.5))
    assert space["weight_decay"].args == (1e-5, 1e-3)
    assert space["schedule"] == Dist("schedule", "choice", ("onecycle", "cosine:warmup=1"))


@pytest.mark.parametrize("item, key, kind, args", [
    ('schedule=choice("onecycle:max_lr=0.05,pct_start=0.2",cosine)', "schedule", "choice",
     ("onecycle:max_lr=0.05,pct_start=0.2", "cosine")),
    ("schedule=choice( 'onecycle:max_lr=0.05,pct_start=0.2' , cosine )", "schedule", "choice",
     ("onecycle:max_lr=0.05,pct_start=0.2", "cosine")),
    # unquoted, a key=value item continues the schedule spec before it (as --schedules reads commas)
    ("schedule=grid(onecycle:max_lr=0.05,pct_start=0.2,cosine)", "schedule", "grid",
     ("onecycle:max_lr=0.05,pct_start=0.2", "cosine")),
    ("batch_size=choice(64,128)", "batch_size", "choice", (64, 128)),
    ("batch_size=randint(32,256)", "batch_size", "randint", (32, 256)),
    ("lr=choice(1,0.1)", "lr", "choice", (1.0, 0.1)),          # a float setting's items are floats
    ("momentum=uniform(0.8, 0.95)", "momentum", "uniform", (0.8, 0.95)),
    ("rotation=randint(0,15)", "rotation", "randint", (0, 15)),
    ("nesterov=choice(true,False)", "nesterov", "choice", (True, False)),
    ("optimizer=grid(sgd,adamw)", "optimizer", "grid", ("sgd", "adamw")),
    ("dropout=UNIFORM(0,0.5)", "dropout", "uniform", (0.0, 0.5)),
])
def test_items(item, key, kind, args):
    (dist,) = parse_space([item]).values()
    assert (dist.key, dist.kind, dist.args) == (key, kind, args)
    assert [type(v) for v in dist.args] == [type(v) for v in args]


def test_a_sweep_files_mapping_is_the_same_space():
    assert parse_space({"lr": "loguniform(0.01,0.5)", "batch_size": "grid(64,128)"}) == \
        parse_space(["lr=loguniform(0.01,0.5)", "batch_size=grid(64,128)"])


def test_the_items_parse_back_to_the_same_space():
    space = parse_space(['schedule=choice("onecycle:max_lr=0.05,pct_start=0.2",cosine,"step:step_size=3")',
                         "lr=loguniform(1e-3,0.5)", "nesterov=grid(true,false)", "batch_size=randint(16,64)",
                         "ema=choice(0,0.999)"])
    assert parse_space(space_items(space)) == space
    assert space_items(space)[0] == 'schedule=choice("onecycle:max_lr=0.05,pct_start=0.2",cosine,step:step_size=3)'


@pytest.mark.parametrize("items, needles", [
    (["lrr=uniform(0.1,0.2)"], ["lrr", "unknown setting", "searchable settings: lr,"]),
    (["epochs=randint(5,15)"], ["epochs", "cannot be searched", "--epochs"]),
    (["seed=choice(1,2)"], ["seed", "--seeds"]),
    (["model=choice(v0,v1)"], ["model", "--models"]),
    (["lr=normal(0.1,0.01)"], ["lr", "unknown distribution 'normal'", "loguniform"]),
    (["lr=0.1"], ["lr", "not a distribution", "its own option"]),
    (["lr loguniform(0.01,0.5)"], ["not KEY=DIST"]),
    (["lr=loguniform(0.5,0.01)"], ["lr", "reversed", "lr=loguniform(0.01,0.5)"]),
    (["lr=uniform(0.1,0.1)"], ["lr", "both bounds are 0.1", "choice(0.1)"]),
    (["lr=uniform(0,0.5)"], ["lr", "must be > 0", "not 0.0"]),
    (["lr=loguniform(1e-3,1e38)"], ["lr", "at most 3.4e+37"]),
    (["weight_decay=loguniform(0,1e-3)"], ["weight_decay", "loguniform needs bounds > 0"]),
    (["weight_decay=uniform(-1e-4,1e-3)"], ["weight_decay", "must be >= 0"]),
    (["dropout=uniform(0,1)"], ["dropout", "in [0, 1)", "not 1.0"]),
    (["label_smoothing=choice(0,1)"], ["label_smoothing", "in [0, 1)"]),
    (["ema=choice(0.999,1.5)"], ["ema", "in [0, 1)"]),
    (["shear=uniform(0,90)"], ["shear", "in [0, 90)"]),
    (["batch_size=randint(0,64)"], ["batch_size", "an integer >= 1"]),
    (["batch_size=uniform(32,64)"], ["batch_size", "takes integers", "randint"]),
    (["batch_size=choice(64,96.5)"], ["batch_size", "96.5 is not an integer"]),
    (["batch_size=randint(16,64.5)"], ["batch_size", "not an integer"]),
    (["lr=uniform(0.1)"], ["lr", "two bounds"]),
    (["lr=uniform(0.1,0.2,0.3)"], ["lr", "two bounds"]),
    (["lr=choice(fast,0.1)"], ["lr", "fast is not a finite number"]),
    (["lr=choice()"], ["lr", "at least one item"]),
    (["lr=choice(0.1,,0.2)"], ["lr", "empty item"]),
    (["lr=choice(0.1,0.2,)"], ["lr", "empty item"]),
    (["batch_size=choice(64,64)"], ["batch_size", "64 is listed twice"]),
    (["lr=choice(0.1)", "lr=choice(0.2)"], ["lr", "given twice"]),
    (['schedule=choice("onecycle,cosine)'], ["schedule", "not closed"]),
    (['schedule=choice(on"cycle",cosine)'], ["schedule", "quote in the middle"]),
    (["schedule=choice(onecycle,sine)"], ["schedule", "unknown schedule 'sine'"]),
    (["schedule=choice(onecycle:max_lr=-1)"], ["schedule", "max_lr must be a finite number > 0"]),
    (["optimizer=choice(sgd,lion)"], ["optimizer", "unknown optimizer 'lion'", "adamw"]),
    (["tta=choice(shift16)"], ["tta", "unknown tta"]),
    (["nesterov=choice(yes)"], ["nesterov", "not true or false"]),
    (["optimizer=uniform(1,2)"], ["optimizer", "not a number", "choice"]),
])
def test_bad_spaces_are_refused_naming_the_key(items, needles):
    with pytest.raises(SpaceError) as caught:
        parse_space(items)
    message = str(caught.value)
    assert message.startswith("--space "), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_clean_epochs_is_bounded_by_the_epochs_when_they_are_known():
    parse_space(["clean_epochs=randint(0,5)"])
    parse_space(["clean_epochs=randint(0,5)"], epochs=5)
    with pytest.raises(SpaceError, match=r"clean_epochs must be at most the epochs \(3\), not 5"):
        parse_space(["clean_epochs=randint(0,5)"], epochs=3)


def test_the_origin_names_where_the_space_came_from():
    with pytest.raises(SpaceError, match=r"^space: lr=uniform\(0.5,0.1\): the bounds are reversed"):
        parse_space({"lr": "uniform(0.5,0.1)"}, origin="space:")


def test_the_searchable_settings_are_trainconfigs_and_typed_like_it():
    """Every TrainConfig setting is either searchable or says what sets it instead; each type
    matches the field's default (so a new setting cannot be forgotten here)."""
    from mnistnets.train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(SETTING_TYPES) | set(NOT_SEARCHABLE) == set(fields)
    assert not set(SETTING_TYPES) & set(NOT_SEARCHABLE)
    kinds = {float: "float", int: "int", bool: "bool", str: "str"}
    for key, typ in SETTING_TYPES.items():
        default = fields[key].default
        if default is not None:
            assert kinds[type(default)] == typ, key


def test_max_lr_is_the_trainers():
    import torch

    from mnistnets.train import MAX_LR as TRAIN_MAX_LR

    assert MAX_LR == TRAIN_MAX_LR
    # mnistnets.config writes float32's largest value as a literal (no torch import there)
    assert TRAIN_MAX_LR == float(torch.finfo(torch.float32).max) / 10


# Just inside and just outside each numeric setting's range, as parse_space judges a bound.
_EDGES = {"lr": (1e-9, 0.0), "momentum": (0.0, -1e-9), "weight_decay": (0.0, -1e-9),
          "label_smoothing": (0.999, 1.0), "rotation": (0.0, -1e-9), "translate": (0.999, 1.0),
          "scale": (0.999, 1.0), "shear": (89.9, 90.0), "dropout": (0.999, 1.0), "ema": (0.999, 1.0),
          "batch_size": (1, 0), "clean_epochs": (0, -1)}


@pytest.mark.parametrize("key", sorted(_EDGES))
def test_the_ranges_are_those_trainconfig_validates(key):
    """What the space accepts, TrainConfig.validate accepts; what it refuses, validate refuses."""
    from mnistnets.train import recipe_for

    inside, outside = _EDGES[key]
    parse_space([f"{key}=choice({inside!r})"])
    recipe_for("v1", epochs=2, train_limit=256, **{key: inside}).validate()
    with pytest.raises(SpaceError, match=key):
        parse_space([f"{key}=choice({outside!r})"])
    with pytest.raises(ValueError):
        recipe_for("v1", epochs=2, train_limit=256, **{key: outside}).validate()


def test_to_tune_gives_tunes_domains_with_our_bounds():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    tuned = to_tune(parse_space(["lr=loguniform(0.01,0.5)", "momentum=uniform(0.8,0.95)",
                                 "batch_size=randint(1,3)", "optimizer=choice(sgd,adamw)",
                                 "ema=grid(0,0.999)"]))
    assert isinstance(tuned["lr"], Float) and isinstance(tuned["lr"].get_sampler(), LogUniform)
    assert (tuned["lr"].lower, tuned["lr"].upper) == (0.01, 0.5)
    assert isinstance(tuned["momentum"].get_sampler(), Uniform)
    assert isinstance(tuned["batch_size"], Integer) and (tuned["batch_size"].lower, tuned["batch_size"].upper) == (1, 4)
    assert isinstance(tuned["optimizer"], Categorical) and tuned["optimizer"].categories == ["sgd", "adamw"]
    assert tuned["ema"] == {"grid_search": [0.0, 0.999]}
    rng = random.Random(0)
    seeds = [rng.randrange(2**31) for _ in range(300)]
    ints = {tuned["batch_size"].sample(random_state=s) for s in seeds}
    assert ints == {1, 2, 3}  # randint's upper bound is included
    lrs = [tuned["lr"].sample(random_state=s) for s in seeds]
    assert all(0.01 <= v <= 0.5 for v in lrs) and len(set(lrs)) == 300
    assert sum(v < 0.0707 for v in lrs) > 100  # log-uniform: about half below the geometric mean


def test_tune_expands_a_grid_axis_and_samples_the_rest():
    from ray.tune.search.variant_generator import generate_variants

    space = parse_space(["ema=grid(0,0.999)", "lr=loguniform(0.01,0.5)"])
    configs = [config for _, config in generate_variants(to_tune(space))]
    assert sorted(c["ema"] for c in configs) == [0.0, 0.999]
    assert all(0.01 <= c["lr"] <= 0.5 for c in configs)


def test_describe_space_for_the_dry_run():
    text = describe_space(parse_space(['schedule=choice("onecycle:max_lr=0.05,pct_start=0.2",cosine)',
                                       "lr=loguniform(0.01,0.5)", "batch_size=randint(32,256)",
                                       "ema=grid(0,0.999)"]))
    assert text.splitlines() == [
        "search space:",
        "  schedule: one of onecycle:max_lr=0.05,pct_start=0.2 | cosine (sampled)",
        "  lr: log-uniform from 0.01 to 0.5",
        "  batch_size: an integer from 32 to 256 (both included)",
        "  ema: every one of 0.0 | 0.999 (a grid axis: x2)",
        "  grid axes: x2 (each sample runs every grid point)",
    ]
    assert describe_space({}) == "search space: none (every setting is fixed)"
    assert grid_size(parse_space(["ema=grid(0,0.999)", "optimizer=grid(sgd,adam,adamw)"])) == 6


def test_check_search():
    sampled_and_grid = parse_space(["lr=loguniform(0.01,0.5)", "ema=grid(0,0.999)"])
    check_search(sampled_and_grid, "random")
    with pytest.raises(SpaceError, match=r"ema=grid\(0.0,0.999\): a grid axis cannot be used with --search optuna"):
        check_search(sampled_and_grid, "optuna")
    with pytest.raises(SpaceError, match=r"lr=loguniform\(0.01,0.5\): loguniform is sampled.*--search random"):
        check_search(sampled_and_grid, "grid")
    check_search(parse_space(["ema=grid(0,0.999)"]), "grid")
    check_search(parse_space(["lr=loguniform(0.01,0.5)"]), "optuna")
