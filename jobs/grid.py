"""A point of a sweep's grid: one Tune trial's ``config``, as ``jobs.spec`` lays it out.

A point holds the axes' values (``model``, ``schedule``, ``seed``, and each ``train:`` setting
given as a list), the settings every trial shares as plain values (``schedule: None`` when no
schedules are given: each model runs its recipe's), what names it (:data:`NAMING_KEY`) and, in a
sweep, the driver's ``job``. The spec (``SweepSpec.points``, ``param_space``), the trial
(``jobs.trial``) and the driver's callbacks (``jobs.sweep``) read a point only through these
functions.
"""
from __future__ import annotations

from typing import Any

#: The config key under which a point carries what names it (schedule labels, the other axes).
NAMING_KEY = "mnistjobs_naming"
#: The axes every sweep has, in the order trials are listed (then the ``train:`` lists).
GRID_AXES = ("model", "schedule", "seed")
#: Keys of a point that are no training setting.
NOT_SETTINGS = (NAMING_KEY, "job")


def recipe_schedule(model: str) -> str:
    from mnistnets.config import recipe_for

    return recipe_for(model).schedule


def trial_config(config: dict[str, Any]):
    """The TrainConfig of one point of the grid (a Tune trial's ``config``): the model's recipe
    (``recipe_for``) with the point's settings on top; not validated (``fit`` and ``validate``
    do). Keys that are not training settings (the naming, the driver's ``job``) are left out."""
    from mnistnets.config import recipe_for

    settings = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    model = settings.pop("model")
    if settings.get("schedule") is None:  # no schedules given: the model's recipe's
        settings.pop("schedule", None)
    return recipe_for(model, **settings)


def _axis_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def trial_name(config: dict[str, Any]) -> str:
    """A trial's name from its config: ``<model>-<schedule label>-s<seed>``, then ``-<setting><value>``
    per other axis (``v2-onecycle-s1``, ``v2-onecycle-s1-lr0.05``). The label is the schedule's
    name, numbered when two given schedules share it (``onecycle2``); with none given, the name of
    the model's recipe schedule. The MLflow run, the Tune trial folder and the job log use it.

    Under a search (``--search random|optuna``) a trial is named ``<model>-t<NNN>`` by Tune's trial
    counter (``jobs.search.TrialNamer``), which a config cannot know: this then names the grid point
    only (``v2``, ``v2-dropout0.1``), for messages about the point."""
    from mnistnets.schedules import parse_schedule

    naming = config.get(NAMING_KEY) or {}
    model = config["model"]
    if naming.get("search"):  # a search's trial is named by Tune's counter (jobs.search): this is its grid point
        return model + "".join(f"-{name}{_axis_text(config[name])}" for name in naming.get("axes", []))
    schedule = config.get("schedule") or recipe_schedule(model)
    label = naming.get("labels", {}).get(schedule) or parse_schedule(schedule)[0]
    others = "".join(f"-{name}{_axis_text(config[name])}" for name in naming.get("axes", []))
    return f"{model}-{label}-s{config['seed']}{others}"
