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
    priority: 5               # the job queue's order, -1000..1000, higher first  [default: 0]
    register: false           # do not register the best trial per model  [default: true]
    system_metrics_interval: 30   # seconds between system-metric samples, 0: off  [default: 10]
    train:                    # any other TrainConfig setting, for every trial
      weight_decay: 0.0005
      lr: [0.05, 0.1]         # a list: one more grid axis (trials named ...-lr0.05, ...-lr0.1)

Every input gets an answer at once: a job has at most MAX_TRIALS trials (counted from the axes'
lengths before any point is built) of at most MAX_EPOCHS epochs, and a sweep file is a regular
file of at most MAX_SPEC_BYTES whose YAML holds at most MAX_SPEC_VALUES values.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import reprlib
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from jobs.contract import DEFAULT_EXPERIMENT
from jobs.grid import GRID_AXES, NAMING_KEY, recipe_schedule, trial_config, trial_name

AUTO_GPU_FRACTION = 0.25
#: At most this many trials in one job (4 models x 7 schedules x 10 seeds = 280 fit): a typo such as
#: ``--seeds 1000000`` is refused at once, from the axes' lengths, before any trial is built.
MAX_TRIALS = 1000
#: At most this many epochs per trial (``--epochs``, ``epochs:``).
MAX_EPOCHS = 1000
#: A sweep file (``--config``) is a regular file of at most this many bytes (256 KiB: YAML parses at
#: 0.1-0.2 MB/s without libyaml, so even that answers in about 2 s) ...
MAX_SPEC_BYTES = 256 * 1024
#: ... whose YAML holds at most this many values (an anchor's values count at each alias): a file
#: of aliases to aliases cannot expand into billions.
MAX_SPEC_VALUES = 20_000
#: A job's priority in the queue (higher first): a whole number in this range, default 0.
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
#: MLflow's system metrics (CPU, memory; GPU when visible) on each trial run: one sample every this
#: many seconds by default (``--system-metrics-interval``, ``system_metrics_interval:``; 0 turns
#: them off), at most MAX_SYSTEM_METRICS_INTERVAL, at least MIN_SYSTEM_METRICS_INTERVAL when on.
DEFAULT_SYSTEM_METRICS_INTERVAL = 10.0
MIN_SYSTEM_METRICS_INTERVAL, MAX_SYSTEM_METRICS_INTERVAL = 0.5, 3600.0

_brief = reprlib.Repr()  # values in messages: a long list or string is cut short, never printed whole
_brief.maxlist = _brief.maxtuple = _brief.maxdict = 8
_brief.maxstring = _brief.maxother = 80


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
    priority: int = 0                    # the job queue's order, higher first; no trial setting
    experiment: str = DEFAULT_EXPERIMENT
    storage_path: str | None = None      # Tune's storage; None: <state folder>/ray_results
    register: bool = True                # register each model's best trial (mnistjobs-<model>, @best)
    system_metrics_interval: float = DEFAULT_SYSTEM_METRICS_INTERVAL  # s between samples; 0: off
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
        """From a sweep file: a regular file of at most MAX_SPEC_BYTES, UTF-8 YAML holding at most
        MAX_SPEC_VALUES values. Anything else (a device such as /dev/zero, a FIFO, a folder, a
        bigger file) is a SpecError before more than that is read."""
        import yaml

        path = Path(path)
        text = _read_spec_file(path)
        try:  # libyaml's loader where PyYAML has it (5x faster), else the pure-Python one: same types
            values = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as e:
            detail = " ".join(str(e).split())
            raise SpecError(f"The sweep file {path} is not valid YAML: {detail}") from None
        except RecursionError:
            raise SpecError(f"The sweep file {path} nests its values too deeply to be a sweep spec "
                            f"(models: ..., epochs: ...).") from None
        if _count_values(values, MAX_SPEC_VALUES) > MAX_SPEC_VALUES:
            raise SpecError(f"The sweep file {path} holds more than {MAX_SPEC_VALUES:,} values (counting "
                            f"each use of a YAML alias); a sweep spec needs a few dozen (at most "
                            f"{MAX_TRIALS} trials per job).")
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
        """The models, the schedules, the seeds and the ``train:`` lists; then the number of
        trials (from the axes' lengths: nothing is built yet), then each schedule."""
        from mnistnets import list_models
        from mnistnets.schedules import ScheduleError, parse_schedule

        valid_models = list_models()
        self.models = split_models(self.models)
        if not self.models:
            raise SpecError(f"No model given; choose from {', '.join(valid_models)} or 'all' (--models).")
        unknown = [m for m in self.models if m not in valid_models]
        if unknown:
            raise SpecError(f"Unknown model {_brief.repr(unknown[0])} (--models); valid models: "
                            f"{', '.join(valid_models)}, or 'all'.")
        self.schedules = split_schedules(self.schedules)
        if isinstance(self.seeds, list):
            if not self.seeds or not all(_is_int(s) and s >= 0 for s in self.seeds):
                raise SpecError(f"seeds must be a number N >= 1 (seeds 1..N) or a list of seeds >= 0, "
                                f"not {_brief.repr(self.seeds)}.")
            if len(set(self.seeds)) != len(self.seeds):
                raise SpecError(f"seeds lists a seed twice ({_brief.repr(self.seeds)}); each seed runs once "
                                f"per (model, schedule).")
        else:
            self._check_int("seeds", 1, "--seeds")
        for name, values in self.train.items():
            if not isinstance(values, (list, tuple)):
                continue
            if not all(v is None or isinstance(v, (str, int, float)) for v in values):
                raise SpecError(f"train: {name}: a list is a grid axis of plain values (numbers, strings, "
                                f"true/false), not {_brief.repr(list(values))}.")
            if not values or len(set(map(repr, values))) != len(values):
                raise SpecError(f"train: {name}: a list is a grid axis of distinct values (one trial per value), "
                                f"not {_brief.repr(list(values))}.")
        self._check_trial_count()
        for spec in self.schedules:
            try:
                parse_schedule(spec)
            except ScheduleError as e:
                raise SpecError(f"Bad schedule (--schedules): {e}.") from None
        seen: set[str] = set()
        for spec in self.schedules:
            if spec in seen:
                raise SpecError(f"schedules lists {spec!r} twice (--schedules); each schedule runs once per "
                                f"(model, seed).")
            seen.add(spec)

    def _axis_sizes(self) -> dict[str, int]:
        """Each axis's length, computed without building it (``seeds: 1000000`` is a number)."""
        sizes = {"model": len(split_models(self.models))}
        schedules = split_schedules(self.schedules)
        if schedules:
            sizes["schedule"] = len(schedules)
        sizes["seed"] = len(self.seeds) if isinstance(self.seeds, list) else int(self.seeds)
        sizes.update({name: len(values) for name, values in self.train.items() if isinstance(values, (list, tuple))})
        return sizes

    def trial_count(self) -> int:
        """How many trials the grid of a validated spec has: the product of the axes' lengths (no
        trial is built; ``validate`` refuses more than MAX_TRIALS before it builds any)."""
        return math.prod(self._axis_sizes().values())

    def _check_trial_count(self) -> None:
        sizes = self._axis_sizes()
        count = math.prod(sizes.values())
        if count > MAX_TRIALS:
            words = {"model": "models", "schedule": "schedules", "seed": "seeds"}
            parts = " x ".join(f"{n} {words.get(axis, 'values of train: ' + axis)}" for axis, n in sizes.items())
            raise SpecError(f"The sweep has {count:,} trials ({parts}); a job runs at most {MAX_TRIALS}. "
                            f"Give fewer seeds (--seeds), models, schedules or train: values, or split the "
                            f"sweep into several jobs.")

    def _validate_settings(self) -> None:
        """The settings every trial shares, and where it runs."""
        from mnistnets.train import OPTIMIZERS, is_number

        self._check_int("epochs", 1, "--epochs", maximum=MAX_EPOCHS)
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
        self._check_int("priority", MIN_PRIORITY, "priority (--priority)", maximum=MAX_PRIORITY)
        if not isinstance(self.register, bool):
            raise SpecError(f"register must be true or false (--no-register: false), not {_brief.repr(self.register)}.")
        interval = self.system_metrics_interval
        if (not is_number(interval) or isinstance(interval, bool) or interval < 0 or interval > MAX_SYSTEM_METRICS_INTERVAL
                or 0 < interval < MIN_SYSTEM_METRICS_INTERVAL):
            raise SpecError(f"--system-metrics-interval must be 0 (off) or a number of seconds from "
                            f"{MIN_SYSTEM_METRICS_INTERVAL:g} to {MAX_SYSTEM_METRICS_INTERVAL:g} (e.g. "
                            f"{DEFAULT_SYSTEM_METRICS_INTERVAL:g}), not {_brief.repr(interval)}.")
        self.system_metrics_interval = float(interval)
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

    def _check_int(self, name: str, minimum: int, option: str, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if maximum is None:
            if not _is_int(value) or value < minimum:
                raise SpecError(f"{option} must be a whole number >= {minimum}, not {_brief.repr(value)}.")
        elif not _is_int(value) or not minimum <= value <= maximum:
            raise SpecError(f"{option} must be a whole number from {minimum} to {maximum}, "
                            f"not {_brief.repr(value)}.")

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
        n = self.trial_count()
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


def _read_spec_file(path: Path) -> str:
    """A sweep file's text: a regular file of at most MAX_SPEC_BYTES, read no further than that.
    Opened without blocking (a FIFO with no writer) and checked on the open file itself."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise SpecError(f"Cannot read the sweep file {path}: {e.strerror or e}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                    else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                    else "a socket" if stat.S_ISSOCK(info.st_mode) else "no regular file")
            raise SpecError(f"The sweep file {path} is {kind}; --config takes a YAML file "
                            f"(models: ..., epochs: ...) of at most {MAX_SPEC_BYTES // 1024} KiB.")
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecError(_too_big(path, info.st_size))
        chunks: list[bytes] = []
        left = MAX_SPEC_BYTES + 1  # bounded: a file that grows meanwhile is cut here
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise SpecError(f"Cannot read the sweep file {path}: {e.strerror or e}.") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(_too_big(path, None))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"The sweep file {path} is not UTF-8 text (byte {e.start}): --config takes a "
                        f"YAML file (models: ..., epochs: ...).") from None


def _too_big(path: Path, size: int | None) -> str:
    what = f"{size:,} bytes" if size is not None else f"more than {MAX_SPEC_BYTES:,} bytes"
    return (f"The sweep file {path} is {what}; a sweep file is at most {MAX_SPEC_BYTES:,} bytes "
            f"({MAX_SPEC_BYTES // 1024} KiB): models, schedules, seeds and settings take a few lines.")


def _count_values(value: Any, limit: int) -> int:
    """How many values ``value`` holds (itself included; a value reached twice through a YAML
    alias counts twice), counting no further than just past ``limit``: bounded work either way."""
    count = 1
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            count += 2 * len(item) if isinstance(item, dict) else len(item)
            if count > limit:  # counted before anything is pushed: the work stays bounded
                break
            stack.extend(itertools.chain(item.keys(), item.values()) if isinstance(item, dict) else item)
    return count


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
