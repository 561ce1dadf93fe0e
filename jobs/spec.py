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
    reuse_workers: false      # a fresh worker process for every trial  [default: true]
    system_metrics_interval: 30   # seconds between system-metric samples, 0: off  [default: 10]
    train:                    # any other TrainConfig setting, for every trial
      weight_decay: 0.0005
      lr: [0.05, 0.1]         # a list: one more grid axis (trials named ...-lr0.05, ...-lr0.1)

A search (issue 14, ``jobs.search``; ``jobs.space`` for the DIST texts) samples instead::

    models: v2
    search: random            # grid (default) | random | optuna
    num_samples: 12           # configs sampled (random: at each grid point)  [default: 10]
    search_seed: 1            # the same seed, the same configs
    space:                    # KEY: DIST (or a list of "KEY=DIST" strings)
      lr: loguniform(0.01,0.5)
      schedule: choice("onecycle:max_lr=0.05,pct_start=0.2",cosine)
    metric: test_acc          # test_acc | test_loss | train_acc | train_loss  [default: test_acc]
    mode: max                 # [default: max]
    scheduler: asha           # fifo (default) | asha
    grace_period: 1           # ASHA  [default: 1]
    reduction_factor: 3       # ASHA  [default: 3]

Under a search every sampled config trains with one seed; ``grid(...)`` dists, several models
or schedules and ``train:`` lists are grid axes of a random search (Optuna takes none); with
``search: grid`` a space may hold ``grid(...)`` dists only (more axes of the grid).

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

from jobs import search as _search
from jobs.contract import DEFAULT_EXPERIMENT
from jobs.grid import GRID_AXES, NAMING_KEY, recipe_schedule, trial_config, trial_name
from jobs.space import SpaceError, check_search, parse_item, parse_space, to_tune

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
                from mnistnets.config import MODEL_NAMES

                names.extend(MODEL_NAMES)
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
    reuse_workers: bool = True           # a finished trial's worker process takes the next trial (Tune's reuse_actors)
    priority: int = 0                    # the job queue's order, higher first; no trial setting
    experiment: str = DEFAULT_EXPERIMENT
    storage_path: str | None = None      # Tune's storage; None: <state folder>/ray_results
    register: bool = True                # register each model's best trial (mnistjobs-<model>, @best)
    system_metrics_interval: float = DEFAULT_SYSTEM_METRICS_INTERVAL  # s between samples; 0: off
    train: dict[str, Any] = field(default_factory=dict)  # other TrainConfig settings, every trial
    # The search (issue 14; jobs.search): "grid" (the axes above, nothing sampled), "random"
    # (Tune's BasicVariantGenerator) or "optuna" (OptunaSearch, TPE) over ``space``.
    search: str = "grid"
    num_samples: int | None = None       # configs a search samples; None: DEFAULT_NUM_SAMPLES (searches only)
    search_seed: int | None = None       # makes the sampled configs reproducible
    space: dict[str, str] = field(default_factory=dict)  # setting -> DIST text (jobs.space)
    metric: str = "test_acc"             # what the search and the scheduler optimise (a per-epoch metric)
    mode: str = "max"                    # max | min
    scheduler: str = "fifo"              # fifo (every trial to the end) | asha (early stopping)
    grace_period: int | None = None      # ASHA: epochs before a trial can be stopped; None: 1
    reduction_factor: float | None = None  # ASHA: keep 1/this at each rung, > 1; None: 3

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
            elif name == "space":  # a mapping KEY -> DIST, or KEY=DIST strings; later ones override per key
                value = {**(self.space or {}), **_space_mapping(value)}
            setattr(self, name, value)
        return self

    # ------------------------------------------------------------------ validation

    def validate(self, *, deep: bool = True) -> "SweepSpec":
        """Raise SpecError for anything that would make a trial fail before it trains.

        ``deep=False`` leaves out the one check that imports torch: building each trial's schedule
        and stepping it through the run (``TrainConfig.validate(check_schedule=False)``); every
        other check runs, and the spec is normalised the same way. `mnistjobs submit` validates
        deep (the schedules in a child process while it connects: ``jobs.cli``); the job's driver,
        which never trains, checks shallow and so imports no torch."""
        self._validate_search()
        self._validate_axes()
        self._validate_settings()
        self._validate_trials(deep=deep)
        return self

    # ------------------------------------------------------------------ the search (issue 14)

    def is_search(self) -> bool:
        """A random or Optuna search (sampled configs), not a plain grid."""
        return self.search != "grid"

    def parsed_space(self) -> dict:
        """The space as {key: jobs.space.Dist} (validated by ``validate``)."""
        return parse_space(self.space or {}, origin="--space") if self.space else {}

    def _validate_search(self) -> None:
        """--search, --num-samples, --search-seed, --metric, --mode, --scheduler, --grace-period,
        --reduction-factor and the space itself (jobs.space.parse_space: keys, distributions,
        bounds); what the space must fit (the axes, the fixed settings) is checked with the axes."""
        from mnistnets.config import is_number

        if not isinstance(self.search, str) or self.search.strip().lower() not in _search.SEARCHES:
            raise SpecError(f"--search must be one of {', '.join(_search.SEARCHES)}, not {_brief.repr(self.search)}.")
        self.search = self.search.strip().lower()
        if not self.is_search():
            for name, option in (("num_samples", "--num-samples"), ("search_seed", "--search-seed")):
                if getattr(self, name) is not None:
                    raise SpecError(f"{option} is for a search: add --search random or --search optuna (a grid, "
                                    f"the default --search grid, runs each of its points once and samples nothing).")
        else:
            if self.num_samples is None:
                self.num_samples = _search.DEFAULT_NUM_SAMPLES
            self._check_int("num_samples", 1, "--num-samples", maximum=MAX_TRIALS)
            if self.search_seed is not None:
                self._check_int("search_seed", 0, "--search-seed", maximum=_search.MAX_SEARCH_SEED)
        if not isinstance(self.metric, str) or self.metric.strip() not in _search.METRICS:
            raise SpecError(f"--metric must be a metric every trial reports at every epoch: "
                            f"{', '.join(_search.METRICS)}; not {_brief.repr(self.metric)}.")
        self.metric = self.metric.strip()
        if not isinstance(self.mode, str) or self.mode.strip().lower() not in _search.MODES:
            raise SpecError(f"--mode must be max or min, not {_brief.repr(self.mode)}.")
        self.mode = self.mode.strip().lower()
        if self.metric.endswith("_loss") and self.mode == "max":
            raise SpecError(f"--metric {self.metric} with --mode max would look for the highest loss; "
                            f"add --mode min (or optimise an accuracy: --metric test_acc).")
        if not isinstance(self.scheduler, str) or self.scheduler.strip().lower() not in _search.SCHEDULERS:
            raise SpecError(f"--scheduler must be fifo (every trial trains all its epochs) or asha (early "
                            f"stopping), not {_brief.repr(self.scheduler)}.")
        self.scheduler = self.scheduler.strip().lower()
        if self.scheduler != "asha":
            for name, option in (("grace_period", "--grace-period"), ("reduction_factor", "--reduction-factor")):
                if getattr(self, name) is not None:
                    raise SpecError(f"{option} is a setting of ASHA: add --scheduler asha, or drop {option}.")
        else:
            if self.grace_period is None:
                self.grace_period = _search.DEFAULT_GRACE_PERIOD
            if self.reduction_factor is None:
                self.reduction_factor = _search.DEFAULT_REDUCTION_FACTOR
            epochs = self.epochs if _is_int(self.epochs) and self.epochs >= 1 else None
            if epochs is not None:
                self._check_int("grace_period", 1, "--grace-period", maximum=epochs)
            else:
                self._check_int("grace_period", 1, "--grace-period")
            rf = self.reduction_factor
            if not is_number(rf) or isinstance(rf, bool) or not math.isfinite(rf) or rf <= 1:
                raise SpecError(f"--reduction-factor must be a number > 1 (ASHA keeps the best 1/N of the "
                                f"trials at each rung; e.g. 3), not {_brief.repr(rf)}.")
        if not isinstance(self.space, dict):
            self.space = _space_mapping(self.space)
        epochs = self.epochs if _is_int(self.epochs) and self.epochs >= 1 else None
        try:
            space = parse_space(self.space, epochs=epochs, origin="--space")
            check_search(space, self.search)
        except SpaceError as e:
            raise SpecError(f"{e}.") from None
        self.space = {key: d.text() for key, d in space.items()}
        if self.search == "random" and not any(d.kind != "grid" for d in space.values()):
            raise SpecError("--search random samples settings from --space, and "
                            + ("it has only grid(...) axes" if space else "no --space is given")
                            + ": add e.g. --space 'lr=loguniform(0.01,0.5)' (uniform, loguniform, randint, "
                              "choice), or drop --search for a grid.")
        if self.search == "optuna" and not space:
            raise SpecError("--search optuna samples settings from --space, and no --space is given: add e.g. "
                            "--space 'lr=loguniform(0.01,0.5)'.")

    def _validate_search_fit(self) -> None:
        """What the space and the search need of the axes: a searched setting is not also fixed;
        one seed per sampled config; Optuna takes no grid axis."""
        space = self.parsed_space()
        for key in space:
            option = "--" + key.replace("_", "-")
            if key in self.train:
                raise SpecError(f"--space {key}: {key} is also given as a fixed setting ({option} or train: {key}); "
                                f"give it one way: drop {option} to search it, or drop --space {key}.")
            if key in ("batch_size", "optimizer", "augment") and getattr(self, key) is not None:
                flag = "--augment/--no-augment" if key == "augment" else option
                raise SpecError(f"--space {key}: {key} is also given as a fixed setting ({flag}); give it one "
                                f"way: drop {flag} to search it, or drop --space {key}.")
            if key == "schedule" and self.schedules:
                raise SpecError("--space schedule: the schedules are also given (--schedules); give them one way: "
                                "--space 'schedule=choice(a,b)' to sample them, --space 'schedule=grid(a,b)' or "
                                "--schedules for a grid axis.")
        if not self.is_search():
            return
        seeds = self.seed_list()
        if len(seeds) > 1:
            raise SpecError(f"--seeds {_brief.repr(self.seeds)}: under --search {self.search} every sampled config "
                            f"trains with one seed (--seeds 1, or one seed: seeds: [7]), so that the samples go to "
                            f"configs, not to repeats. To confirm the best config on more seeds afterwards, submit a "
                            f"grid job with its values as options, e.g. `mnistjobs submit --models v2 --lr 0.05 "
                            f"--seeds 5` (the parent run's best.<key> params hold them).")
        if self.search == "optuna":
            models = split_models(self.models)
            if len(models) > 1:
                raise SpecError(f"--search optuna searches one model, and --models gives {len(models)} "
                                f"({', '.join(models)}); submit one job per model (Optuna samples every setting "
                                f"itself and cannot run a grid axis), or use --search random, which searches "
                                f"each model.")
            if len(self._schedule_specs()) > 1:
                raise SpecError("--search optuna cannot run several --schedules (a grid axis): give one, or search "
                                "them with --space 'schedule=choice(a,b)'.")
            lists = [name for name, values in self.train.items() if isinstance(values, (list, tuple))]
            if lists:
                raise SpecError(f"train: {lists[0]}: a list is a grid axis, and --search optuna cannot run one; "
                                f"search it with --space '{lists[0]}=choice(...)', or use --search random.")

    def _schedule_specs(self) -> list[str]:
        """The schedules of the schedule axis: --schedules, or a ``schedule=grid(...)`` of the space."""
        schedules = split_schedules(self.schedules)
        if schedules:
            return schedules
        dist = self.parsed_space().get("schedule") if self.space else None
        return [str(v) for v in dist.args] if dist is not None and dist.kind == "grid" else []

    def _validate_axes(self) -> None:
        """The models, the schedules, the seeds and the ``train:`` lists; then the number of
        trials (from the axes' lengths: nothing is built yet), then each schedule."""
        from mnistnets.config import MODEL_NAMES
        from mnistnets.schedules import ScheduleError, parse_schedule

        valid_models = list(MODEL_NAMES)
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
        self._validate_search_fit()
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
        schedules = self._schedule_specs()
        if schedules:
            sizes["schedule"] = len(schedules)
        sizes["seed"] = len(self.seeds) if isinstance(self.seeds, list) else int(self.seeds)
        sizes.update({name: len(values) for name, values in self.train.items() if isinstance(values, (list, tuple))})
        sizes.update({key: len(d.args) for key, d in self.parsed_space().items()
                      if d.kind == "grid" and key != "schedule"})
        if self.is_search():
            sizes["sample"] = int(self.num_samples or _search.DEFAULT_NUM_SAMPLES)
        return sizes

    def trial_count(self) -> int:
        """How many trials a validated spec has: the product of the axes' lengths, times
        ``num_samples`` under a search (no trial is built; ``validate`` refuses more than
        MAX_TRIALS before it builds any)."""
        return math.prod(self._axis_sizes().values())

    def _check_trial_count(self) -> None:
        sizes = self._axis_sizes()
        count = math.prod(sizes.values())
        if count > MAX_TRIALS:
            words = {"model": "models", "schedule": "schedules", "seed": "seeds", "sample": "samples (--num-samples)"}
            space = self.parsed_space()
            parts = " x ".join(f"{n} {words.get(axis) or ('values of --space ' + axis if axis in space else 'values of train: ' + axis)}"
                               for axis, n in sizes.items())
            raise SpecError(f"The sweep has {count:,} trials ({parts}); a job runs at most {MAX_TRIALS}. "
                            f"Give fewer seeds (--seeds), models, schedules, train: values, grid(...) items or "
                            f"--num-samples, or split the sweep into several jobs.")

    def _validate_settings(self) -> None:
        """The settings every trial shares, and where it runs."""
        from mnistnets.config import OPTIMIZERS, is_number

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
        if not isinstance(self.reuse_workers, bool):
            raise SpecError(f"reuse_workers must be true or false (--no-reuse-workers: false), not "
                            f"{_brief.repr(self.reuse_workers)}.")
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

    def _validate_trials(self, *, deep: bool = True) -> None:
        """Every trial's TrainConfig, before anything starts. Under a search each point of the
        grid is checked with each sampled setting at its first value (a range's low bound, a
        choice's first item), and each model's first point with every other bound and item too:
        a sampled value that no recipe of the job can take (a schedule whose warmup exceeds the
        epochs) is refused up front."""
        points = self.points()
        sampled = {key: list(d.args) for key, d in self.parsed_space().items() if d.kind != "grid"}
        first = {key: values[0] for key, values in sampled.items()}
        checks = [({**point, **first}, None) for point in points]
        models_seen: set[str] = set()
        for point in points:
            if point["model"] in models_seen:
                continue
            models_seen.add(point["model"])
            checks += [({**point, **first, key: value}, key) for key, values in sampled.items() for value in values[1:]]
        try:
            configs = [(trial_name(point), trial_config(point), point, key) for point, key in checks]
        except ValueError as e:  # an unknown key under train:
            raise SpecError(f"train: {e}.") from None
        for name, config, point, key in configs:
            try:
                config.validate(check_schedule=deep)
            except ValueError as e:
                if not sampled:
                    raise SpecError(f"Trial {name}: {e}.") from None
                values = ", ".join(f"{k}={point[k]!r}" for k in ([key] if key else sampled))
                raise SpecError(f"Trial {name} with {values} of --space: {e}.") from None
        names = [n for n, _, _, key in configs if key is None]
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

        if self._schedule_specs():
            specs = self._schedule_specs()
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
        if self._schedule_specs():
            axes["schedule"] = self._schedule_specs()
        axes["seed"] = [int(seed) for seed in self.seed_list()]
        axes.update({name: list(values) for name, values in self.train.items() if isinstance(values, (list, tuple))})
        axes.update({key: list(d.args) for key, d in self.parsed_space().items()
                     if d.kind == "grid" and key != "schedule"})  # grid(...) of --space: axes too
        return axes

    def fixed_settings(self) -> dict[str, Any]:
        """The plain settings every trial shares (``schedule: None`` is "the model's recipe's")."""
        given = {name: getattr(self, name) for name in ("batch_size", "optimizer", "augment")
                 if getattr(self, name) is not None}
        shared = {name: value for name, value in self.train.items() if not isinstance(value, (list, tuple))}
        fixed = {**shared, **given, "epochs": self.epochs, "train_limit": self.train_limit,
                 "test_limit": self.test_limit, "data_dir": self.data_dir}
        if not self._schedule_specs():
            fixed["schedule"] = None
        return fixed

    def _naming(self) -> dict[str, Any]:
        """What names a point besides its model and seed: the given schedules' labels and the
        other axes (a plain value of every point, so that a trial's config names it)."""
        labels = {spec: label for label, spec in self.schedule_labels()} if self._schedule_specs() else {}
        naming = {"labels": labels, "axes": [name for name in self.axes() if name not in GRID_AXES]}
        if self.is_search():
            naming["search"] = self.search  # named by Tune's trial counter (jobs.search)
        return naming

    def param_space(self, **fixed: Any) -> dict[str, Any]:
        """Tune's ``param_space``: each axis a ``tune.grid_search``, every fixed setting a plain
        value; ``fixed`` adds plain values every trial gets (the driver's ``job``). Tune expands
        the grid in its own order; :meth:`points` lists the same points in the spec's. Under a
        search the space's sampled settings are Tune's distributions (``jobs.space.to_tune``) and
        an axis of one value is a plain value (Optuna takes no grid_search at all)."""
        from ray import tune

        grid = {name: (values[0] if self.is_search() and len(values) == 1 else tune.grid_search(values))
                for name, values in self.axes().items()}
        sampled = to_tune({key: d for key, d in self.parsed_space().items() if d.kind != "grid"})
        return {**self.fixed_settings(), NAMING_KEY: self._naming(), **grid, **sampled, **fixed}

    def points(self) -> list[dict[str, Any]]:
        """Every point of the grid (a trial's config as Tune samples it), in grid order: model,
        schedule, seed, then the other axes, the last varying fastest. Under a search, the grid
        points each sample runs at, without the sampled settings (:meth:`trial_count` counts
        the trials; ``jobs.search.sample_configs`` draws a seeded random search's)."""
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
        space = self.parsed_space()
        search = ""
        if self.is_search():
            sampled = [key for key, d in space.items() if d.kind != "grid"]
            search = f"{self.search} search of {', '.join(sampled)} ({self.num_samples} samples) x "
        schedules = ("" if self.is_search() and "schedule" in space and space["schedule"].kind != "grid"
                     else f"{', '.join(label for label, _ in self.schedule_labels())} x ")
        asha = (f", ASHA on {self.metric} ({self.mode}, grace {self.grace_period}, reduction {self.reduction_factor:g})"
                if self.scheduler == "asha" else "")
        return (f"{n} trial{'s' if n != 1 else ''}: {search}{', '.join(split_models(self.models))} x "
                f"{schedules}{seed_text}{others}, {self.epochs} epoch{'s' if self.epochs != 1 else ''}{asha}")

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


def driver_spec(arg: str) -> SweepSpec:
    """The sweep driver's spec (``python -m jobs.sweep --spec``): its JSON text, or ``@FILE``
    holding it, checked without torch (``validate(deep=False)``: `submit` stepped the schedules)."""
    text = Path(arg[1:]).read_text() if arg.startswith("@") else arg
    return SweepSpec.from_json(text).validate(deep=False)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _space_mapping(value: Any) -> dict[str, str]:
    """``space:`` / ``--space`` values as {KEY: DIST text}: a mapping of KEY to DIST, or KEY=DIST
    strings (one, or a list of them); a key given twice in one list is refused."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k).strip(): (v if isinstance(v, str) else _format_plain(v)) for k, v in value.items()}
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"space: must be a mapping of settings to distributions (lr: loguniform(0.01,0.5)) or a "
                        f"list of KEY=DIST strings, not {_brief.repr(value)}.")
    out: dict[str, str] = {}
    for item in value:
        if not isinstance(item, str):
            raise SpecError(f"space: an item must be a KEY=DIST string, e.g. 'lr=loguniform(0.01,0.5)', "
                            f"not {_brief.repr(item)}.")
        try:
            key = parse_item(item).key
        except SpaceError as e:
            raise SpecError(f"{e}.") from None
        dist = item.partition("=")[2].strip()
        if key in out:
            raise SpecError(f"--space {key}: given twice ({out[key]} and {dist}); give each setting one distribution.")
        out[key] = dist
    return out


def _format_plain(value: Any) -> str:
    """A YAML value under ``space:`` that is no DIST text (``lr: 0.1``), as text for the message."""
    return "true" if value is True else "false" if value is False else str(value)


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


def format_trial_table(spec: SweepSpec, gpus: float | None = None, trials=None) -> str:
    """The dry-run table: one line per trial (``trials``: ``[(name, point), ...]``, e.g. a seeded
    random search's configs from ``jobs.search.sample_configs``; default: the spec's grid points,
    under a search without the settings it samples)."""
    from mnistnets.config import TrainConfig

    if trials is not None:
        trials = [(name, trial_config(point).to_dict()) for name, point in trials]
    else:
        sampled = set(spec.parsed_space()) if spec.is_search() else set()
        trials = [(name, {k: ("sampled" if k in sampled else v) for k, v in config.items()})
                  for name, config in spec.trials()]
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
    from mnistnets.config import settings_text

    return settings_text({k: v for k, v in config.items() if k not in _TABLE_COLUMNS and shared.get(k) != v})
