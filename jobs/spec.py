"""The sweep spec: models x schedules x seeds (x any other setting given as a list), with the
settings every trial shares.

Built from CLI options and/or a YAML file (``--config sweep.yaml``; options given on the
command line override the file) and validated before anything starts: ``validate()`` raises
``SpecError`` with one clear paragraph.

The spec is a grid: ``axes()`` (``model``, ``schedule``, ``seed``, each ``train:`` setting given
as a list) and ``fixed_settings()`` (plain values every trial shares). ``param_space()`` hands
both to Tune, each axis a ``tune.grid_search``; ``points()`` expands the same axes in a fixed
order (model, schedule, seed, then the others) for the dry run, ``summary()`` and validation,
and ``trials()`` names them. A point is a trial's ``config``; ``jobs.grid`` builds its
TrainConfig (``recipe_for``) and its name (``v2-onecycle-s1``). A YAML file looks like::

    models: [v0, v2]          # or "all", or "v0,v2"
    schedules:                # grid axis: schedule specs (see `mnistjobs train --help`)
      - onecycle:max_lr=0.05,pct_start=0.2
      - step:step_size=6,gamma=0.1
    seeds: 2                  # seeds 1..2 (or an explicit list: [1, 7])
    epochs: 15
    batch_size: 128
    optimizer: sgd
    augment: true
    gpus_per_trial: 0.25      # null: 0.25 when the cluster has GPUs, else 0
    train:                    # any other TrainConfig setting, for every trial
      weight_decay: 0.0005
      lr: [0.05, 0.1]         # a list: one more grid axis (trials named ...-lr0.05, ...-lr0.1)
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from jobs.contract import DEFAULT_EXPERIMENT
from jobs.grid import GRID_AXES, NAMING_KEY, recipe_schedule, trial_config, trial_name

AUTO_GPU_FRACTION = 0.25


class SpecError(ValueError):
    """A sweep spec that cannot run; the message says what is wrong and what is valid."""


def split_schedules(values: str | Iterable[str] | None) -> list[str]:
    """Schedule specs from option values. Specs contain commas themselves
    (``onecycle:max_lr=0.05,pct_start=0.2``), so a comma starts a new spec only when what follows
    is not a ``key=value`` of the previous one; ``;`` always separates."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for chunk in str(value).split(";"):
            current: str | None = None
            for piece in (p.strip() for p in chunk.split(",")):
                if not piece:
                    continue
                head = piece.split(":", 1)[0]
                if current is not None and "=" in head:  # key=value continuing the previous spec
                    current += "," + piece
                else:
                    if current is not None:
                        out.append(current)
                    current = piece
            if current is not None:
                out.append(current)
    return out


def split_models(values: str | Iterable[str] | None) -> list[str]:
    """``"all"``, ``"v0,v2"`` or a list -> model names (``all`` expands to the registry)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values:
        for name in (p.strip() for p in str(value).split(",")):
            if not name:
                continue
            if name.lower() == "all":
                from mnistnets import list_models

                names.extend(list_models())
            else:
                names.append(name)
    return list(dict.fromkeys(names))  # keep order, drop repeats


@dataclass
class SweepSpec:
    """One job: every (model, schedule, seed) of the grid is one trial."""

    models: list[str] = field(default_factory=lambda: ["all"])
    schedules: list[str] = field(default_factory=list)  # empty: each model's recipe schedule
    seeds: int | list[int] = 1
    epochs: int = 15
    batch_size: int | None = None        # None: each model's recipe (mnistnets.train.recipe_for)
    optimizer: str | None = None
    augment: bool | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    data_dir: str | None = None
    gpus_per_trial: float | None = None  # None: AUTO_GPU_FRACTION when the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None    # None or 0: as many as the resources allow
    max_failures: int = 2                # retries of a trial from its last checkpoint; -1: forever
    experiment: str = DEFAULT_EXPERIMENT
    storage_path: str | None = None      # Tune's storage; None: <state folder>/ray_results
    train: dict[str, Any] = field(default_factory=dict)  # other TrainConfig settings, every trial

    # ------------------------------------------------------------------ construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], origin: str = "the spec") -> "SweepSpec":
        """From a dict (YAML file, JSON); keys may use dashes or underscores."""
        if not isinstance(values, dict):
            raise SpecError(f"{origin} must be a mapping of settings (models: ..., epochs: ...), "
                            f"not {type(values).__name__}.")
        known = cls.field_names()
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise SpecError(f"{origin}: unknown setting {key!r}; valid settings: {', '.join(known)}.")
            clean[name] = value
        spec = cls()
        spec.update(clean)
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "SweepSpec":
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"Cannot read the sweep file {path}: {e.strerror or e}.") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            detail = " ".join(str(e).split())
            raise SpecError(f"The sweep file {path} is not valid YAML: {detail}") from None
        return cls.from_mapping(values or {}, origin=f"the sweep file {path}")

    def update(self, values: dict[str, Any]) -> "SweepSpec":
        """Override settings (None values are skipped: "not given on the command line")."""
        for name, value in values.items():
            if value is None:
                continue
            if name in ("models", "schedules") and not (
                    isinstance(value, str)
                    or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
                example = "[v0, v2] or 'all'" if name == "models" else "['onecycle', 'cosine:warmup=1']"
                raise SpecError(f"{name} must be a name or a list of names, e.g. {example}; not {value!r}.")
            if name in ("data_dir", "storage_path", "experiment") and not isinstance(value, str):
                raise SpecError(f"{name} must be a string ({'a name' if name == 'experiment' else 'a path'}), "
                                f"not {value!r}.")
            if name == "models":
                value = split_models(value)
            elif name == "schedules":
                value = split_schedules(value)
            elif name == "train":
                if not isinstance(value, dict):
                    raise SpecError(f"train: must be a mapping of TrainConfig settings, not {value!r}.")
                value = {**self.train, **value}
            setattr(self, name, value)
        return self

    # ------------------------------------------------------------------ validation

    def validate(self) -> "SweepSpec":
        """Raise SpecError for anything that would make a trial fail before it trains."""
        self._validate_axes()
        self._validate_settings()
        self._validate_trials()
        return self

    def _validate_axes(self) -> None:
        """The models, the schedules, the seeds and the ``train:`` lists."""
        from mnistnets import list_models
        from mnistnets.schedules import ScheduleError, parse_schedule

        valid_models = list_models()
        self.models = split_models(self.models)
        if not self.models:
            raise SpecError(f"No model given; choose from {', '.join(valid_models)} or 'all' (--models).")
        unknown = [m for m in self.models if m not in valid_models]
        if unknown:
            raise SpecError(f"Unknown model {unknown[0]!r} (--models); valid models: "
                            f"{', '.join(valid_models)}, or 'all'.")
        self.schedules = split_schedules(self.schedules)
        for spec in self.schedules:
            try:
                parse_schedule(spec)
            except ScheduleError as e:
                raise SpecError(f"Bad schedule (--schedules): {e}.") from None
        twice = sorted({s for s in self.schedules if self.schedules.count(s) > 1})
        if twice:
            raise SpecError(f"schedules lists {twice[0]!r} twice (--schedules); each schedule runs once per "
                            f"(model, seed).")
        if isinstance(self.seeds, list):
            if not self.seeds or not all(_is_int(s) and s >= 0 for s in self.seeds):
                raise SpecError(f"seeds must be a number N >= 1 (seeds 1..N) or a list of seeds >= 0, "
                                f"not {self.seeds!r}.")
            if len(set(self.seeds)) != len(self.seeds):
                raise SpecError(f"seeds lists a seed twice ({self.seeds!r}); each seed runs once per "
                                f"(model, schedule).")
        else:
            self._check_int("seeds", 1, "--seeds")
        for name, values in self.train.items():
            if isinstance(values, (list, tuple)) and (not values or len(set(map(repr, values))) != len(values)):
                raise SpecError(f"train: {name}: a list is a grid axis of distinct values (one trial per value), "
                                f"not {list(values)!r}.")

    def _validate_settings(self) -> None:
        """The settings every trial shares, and where it runs."""
        from mnistnets.train import OPTIMIZERS, is_number

        self._check_int("epochs", 1, "--epochs")
        if self.batch_size is not None:
            self._check_int("batch_size", 1, "--batch-size")
        for name, option in (("train_limit", "--train-limit"), ("test_limit", "--test-limit")):
            if getattr(self, name) is not None:
                self._check_int(name, 1, option)
        if self.optimizer is not None:
            if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
                raise SpecError(f"Unknown optimizer {self.optimizer!r} (--optimizer); valid: {', '.join(OPTIMIZERS)}.")
            self.optimizer = self.optimizer.lower()
        if self.augment is not None and not isinstance(self.augment, bool):
            raise SpecError(f"augment must be true or false, not {self.augment!r}.")
        if self.gpus_per_trial is not None:
            g = self.gpus_per_trial
            if not is_number(g) or not 0 <= g <= 1:
                raise SpecError(f"--gpus-per-trial must be a fraction of one GPU between 0 and 1 (e.g. "
                                f"0.25: four trials share a GPU), not {g!r}.")
        if not is_number(self.cpus_per_trial) or self.cpus_per_trial <= 0:
            raise SpecError(f"--cpus-per-trial must be a number > 0, not {self.cpus_per_trial!r}.")
        if self.max_concurrent is not None:
            self._check_int("max_concurrent", 0, "--max-concurrent")
        self._check_int("max_failures", -1, "--max-failures")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise SpecError("--experiment must be a non-empty name.")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            self.data_dir = str(self.data_dir)
        reserved = {"model", "schedule", "seed", "epochs", "batch_size", "optimizer", "augment",
                    "train_limit", "test_limit", "data_dir"}
        clash = sorted(reserved & set(self.train))
        if clash:
            raise SpecError(f"train: {', '.join(clash)} {'is a sweep setting' if len(clash) == 1 else 'are sweep settings'}; "
                            f"set {'it' if len(clash) == 1 else 'them'} at the top level.")

    def _validate_trials(self) -> None:
        """Every trial's TrainConfig, before anything starts."""
        try:
            configs = [(trial_name(point), trial_config(point)) for point in self.points()]
        except ValueError as e:  # an unknown key under train:
            raise SpecError(f"train: {e}.") from None
        for name, config in configs:
            try:
                config.validate()
            except ValueError as e:
                raise SpecError(f"Trial {name}: {e}.") from None
        names = [n for n, _ in configs]
        if len(set(names)) != len(names):  # pragma: no cover - the axes keep names unique
            raise SpecError("two trials have the same name")

    def _check_int(self, name: str, minimum: int, option: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            raise SpecError(f"{option} must be a whole number >= {minimum}, not {value!r}.")

    # ------------------------------------------------------------------ expansion

    def seed_list(self) -> list[int]:
        return list(self.seeds) if isinstance(self.seeds, list) else list(range(1, int(self.seeds) + 1))

    def schedule_labels(self, model: str | None = None) -> list[tuple[str, str]]:
        """(label, spec) per schedule of ``model``'s trials; the label is the schedule's name, made
        unique with a number when two specs share a name (``onecycle``, ``onecycle2``). With no
        schedules given, each model runs its recipe's schedule (``model=None``: every model's)."""
        from mnistnets.schedules import parse_schedule

        if self.schedules:
            specs = list(self.schedules)
        else:
            models = split_models(self.models) if model is None else [model]
            specs = list(dict.fromkeys(recipe_schedule(m) for m in models))
        labels: list[tuple[str, str]] = []
        counts: dict[str, int] = {}
        for spec in specs:
            name = parse_schedule(spec)[0]
            counts[name] = counts.get(name, 0) + 1
            labels.append((name if counts[name] == 1 else f"{name}{counts[name]}", spec))
        return labels

    def axes(self) -> dict[str, list]:
        """The grid: each axis's name and values, in the order trials are listed (model,
        schedule, seed, then each ``train:`` setting given as a list). With no schedules given,
        ``schedule`` is no axis: each model runs its recipe's (``fixed_settings``)."""
        axes: dict[str, list] = {"model": split_models(self.models)}
        if self.schedules:
            axes["schedule"] = list(self.schedules)
        axes["seed"] = [int(seed) for seed in self.seed_list()]
        axes.update({name: list(values) for name, values in self.train.items() if isinstance(values, (list, tuple))})
        return axes

    def fixed_settings(self) -> dict[str, Any]:
        """The plain settings every trial shares (``schedule: None`` is "the model's recipe's")."""
        given = {name: getattr(self, name) for name in ("batch_size", "optimizer", "augment")
                 if getattr(self, name) is not None}
        shared = {name: value for name, value in self.train.items() if not isinstance(value, (list, tuple))}
        fixed = {**shared, **given, "epochs": self.epochs, "train_limit": self.train_limit,
                 "test_limit": self.test_limit, "data_dir": self.data_dir}
        if not self.schedules:
            fixed["schedule"] = None
        return fixed

    def _naming(self) -> dict[str, Any]:
        """What names a point besides its model and seed: the given schedules' labels and the
        other axes (a plain value of every point, so that a trial's config names it)."""
        labels = {spec: label for label, spec in self.schedule_labels()} if self.schedules else {}
        return {"labels": labels, "axes": [name for name in self.axes() if name not in GRID_AXES]}

    def param_space(self, **fixed: Any) -> dict[str, Any]:
        """Tune's ``param_space``: each axis a ``tune.grid_search``, every fixed setting a plain
        value; ``fixed`` adds plain values every trial gets (the driver's ``job``). Tune expands
        the grid in its own order; :meth:`points` lists the same points in the spec's."""
        from ray import tune

        grid = {name: tune.grid_search(values) for name, values in self.axes().items()}
        return {**self.fixed_settings(), NAMING_KEY: self._naming(), **grid, **fixed}

    def points(self) -> list[dict[str, Any]]:
        """Every point of the grid (a trial's config as Tune samples it), in grid order: model,
        schedule, seed, then the other axes, the last varying fastest."""
        axes = self.axes()
        base = {**self.fixed_settings(), NAMING_KEY: self._naming()}
        return [{**base, **dict(zip(axes, values))} for values in itertools.product(*axes.values())]

    def trials(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(name, TrainConfig dict), ...]`` of :meth:`points`; names like ``v2-onecycle-s1``
        (the MLflow run names). Settings the spec leaves unset come from each model's recipe."""
        return [(trial_name(point), trial_config(point).to_dict()) for point in self.points()]

    def resolved_gpus(self, cluster_gpus: float) -> float:
        if self.gpus_per_trial is not None:
            return float(self.gpus_per_trial)
        return AUTO_GPU_FRACTION if cluster_gpus and cluster_gpus > 0 else 0.0

    def summary(self) -> str:
        """``4 trials: v0, v2 x onecycle x seeds 1-2, 15 epochs``."""
        seeds = self.seed_list()
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else (
            f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
            else "seeds " + ",".join(map(str, seeds)))
        n = len(self.points())
        others = "".join(f" x {name} {', '.join(map(str, values))}" for name, values in self.axes().items()
                         if name not in GRID_AXES)
        return (f"{n} trial{'s' if n != 1 else ''}: {', '.join(split_models(self.models))} x "
                f"{', '.join(label for label, _ in self.schedule_labels())} x {seed_text}{others}, "
                f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SweepSpec":
        try:
            values = json.loads(text)
        except ValueError as e:
            raise SpecError(f"The sweep spec is not valid JSON: {e}") from None
        spec = cls.from_mapping(values, origin="the JSON spec")
        return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def format_trial_table(spec: SweepSpec, gpus: float | None = None) -> str:
    """The dry-run table: one line per trial."""
    from mnistnets.train import TrainConfig

    trials = spec.trials()
    gpu_text = ("auto" if spec.gpus_per_trial is None else f"{spec.gpus_per_trial:g}") if gpus is None else f"{gpus:g}"
    width = max([len("trial")] + [len(n) for n, _ in trials])
    shared = TrainConfig().to_dict()
    sched_width = max([len("schedule")] + [len(c["schedule"]) for _, c in trials])
    lines = [f"{'trial':<{width}}  model  seed  epochs  batch  gpu    cpu  {'schedule':<{sched_width}}  other settings"]
    for name, c in trials:
        lines.append(f"{name:<{width}}  {c['model']:<5}  {c['seed']:>4}  {c['epochs']:>6}  {c['batch_size']:>5}  "
                     f"{gpu_text:<5}  {spec.cpus_per_trial:>3g}  {c['schedule']:<{sched_width}}  "
                     f"{_other_settings(c, shared) or '-'}".rstrip())
    return "\n".join(lines)


#: Settings the dry-run table shows in columns of their own, or that say where, not how, a trial runs.
_TABLE_COLUMNS = {"model", "seed", "epochs", "batch_size", "schedule", "device", "data_dir", "eval_batch_size"}


def _other_settings(config: dict, shared: dict) -> str:
    """A trial's settings that differ from the ``shared`` defaults (TrainConfig's), e.g. "lr 0.3, ema
    0.999" (the model's recipe and what the sweep sets), so the dry run shows what each trial will run."""
    from mnistnets.train import settings_text

    return settings_text({k: v for k, v in config.items() if k not in _TABLE_COLUMNS and shared.get(k) != v})
