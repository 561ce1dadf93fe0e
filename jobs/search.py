"""Search and early stopping (issue 14): what ``--search``, ``--space``, ``--metric``, ``--mode``
and ``--scheduler`` turn into for Ray Tune, the names of a search's trials, the configs a seeded
random search will run (for ``--dry-run``), and the search's outcome on the parent run.

- ``grid`` (the default): Tune's grid over the spec's axes, every trial once (nothing sampled).
- ``random``: Tune's ``BasicVariantGenerator(random_state=--search-seed)``: ``--num-samples``
  configs drawn from the space, each run at every point of the grid axes (models, given
  schedules, ``train:`` lists, ``grid(...)`` dists): num_samples x grid points trials.
- ``optuna``: Ray Tune's ``OptunaSearch(seed=--search-seed)`` (TPE), ``--num-samples`` trials of
  one model (Optuna takes no grid axes), in a ``ConcurrencyLimiter`` when ``--max-concurrent``
  is set.
- ``--scheduler asha``: ``ASHAScheduler(time_attr="epoch", max_t=--epochs, grace_period,
  reduction_factor)``. Its last rung is ``--epochs``: a trial that trains every epoch is stopped
  there by ASHA inside its last report and counts as finished, never as stopped early. The
  trials report ``epoch`` themselves (the epoch of the result, also after a retry from a
  checkpoint), so ASHA's rungs are epochs.

A search's trials are named ``<model>-t<NNN>`` (``v2-t003``): the number is Tune's trial
counter (1-based, in the order Tune created them), unique in the job and kept by ``resume``
(Tune restores the trials with their names and the searcher with its counter). The sampled
values are the trial run's ordinary params (``TRIAL_PARAMS``: numbers as numbers).

Parent run (``jobs.contract``): tags TAG_SEARCH, TAG_SEARCHED (searches only), TAG_METRIC,
TAG_MODE, TAG_SCHEDULER from the start (:func:`parent_tags`); at the end of a search metric
``best_<metric>``, params ``best.<key>`` and TAG_BEST_RUN (:func:`log_outcome`).

Importing this module imports no Ray; the functions that build Tune objects import it.
"""
from __future__ import annotations

import math
from typing import Any

from jobs.contract import (BEST_PARAM_PREFIX, TAG_BEST_RUN, TAG_DIVERGED, TAG_METRIC, TAG_MODE, TAG_SCHEDULER,
                           TAG_SEARCH, TAG_SEARCHED, TAG_STOPPED_EARLY, best_metric_name)

SEARCHES = ("grid", "random", "optuna")
#: What a search or ASHA can optimise: the metrics every trial reports at every epoch.
METRICS = ("test_acc", "test_loss", "train_acc", "train_loss")
MODES = ("max", "min")
SCHEDULERS = ("fifo", "asha")
DEFAULT_NUM_SAMPLES = 10
DEFAULT_GRACE_PERIOD = 1
DEFAULT_REDUCTION_FACTOR = 3
#: The largest --search-seed (numpy's and Optuna's samplers take seeds below 2**32).
MAX_SEARCH_SEED = 2**32 - 1


def is_search(spec) -> bool:
    return getattr(spec, "search", "grid") != "grid"


# ------------------------------------------------------------------------------------ naming

def trial_number(trial, search: str) -> int:
    """A search trial's number, 1-based, from Tune's own counter: the experiment tag starts with
    it (``BasicVariantGenerator``: 0-based, ``SearchGenerator``: 1-based)."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    try:
        number = int(head)
    except ValueError:  # pragma: no cover - Tune always tags its trials with the counter
        tail = str(trial.trial_id).rsplit("_", 1)[-1]
        number = int(tail) if tail.isdigit() else 0
        return number + 1
    return number + 1 if search == "random" else number


def search_trial_name(model: str, number: int) -> str:
    """``v2-t003``."""
    return f"{model}-t{number:03d}"


class TrialNamer:
    """Tune's ``trial_name_creator`` for a search (pickled with the tuner, so ``resume`` names
    new trials the same way): ``<model>-t<NNN>``. The trial reads its name back from Tune
    (``tune.get_context().get_trial_name()``) for its MLflow run."""

    def __init__(self, search: str) -> None:
        self.search = search

    def __call__(self, trial) -> str:
        return search_trial_name(str(trial.config.get("model")), trial_number(trial, self.search))


# -------------------------------------------------------------------------------- Tune pieces

def search_algorithm(spec):
    """Tune's search algorithm for the spec (None: grid, Tune's default generator)."""
    if spec.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=spec.max_concurrent or 0, random_state=spec.search_seed)
    if spec.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=spec.search_seed)
        return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent) if spec.max_concurrent else searcher
    return None


def scheduler(spec):
    """ASHA for ``--scheduler asha`` (metric and mode come from the TuneConfig), else None (FIFO)."""
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=int(spec.epochs),
                         grace_period=int(spec.grace_period or DEFAULT_GRACE_PERIOD),
                         reduction_factor=float(spec.reduction_factor or DEFAULT_REDUCTION_FACTOR))


def tune_config_args(spec) -> dict[str, Any]:
    """The TuneConfig arguments of the search: metric, mode, num_samples, search_alg, scheduler
    and the trial names; max_concurrent_trials (the searcher limits concurrency under a search).
    A grid job with the FIFO scheduler gets today's: no metric, one sample, Tune's own names."""
    if not is_search(spec) and spec.scheduler == "fifo":
        return {"max_concurrent_trials": spec.max_concurrent or None}
    args: dict[str, Any] = {"metric": spec.metric, "mode": spec.mode, "scheduler": scheduler(spec)}
    if is_search(spec):
        args.update(num_samples=int(spec.num_samples), search_alg=search_algorithm(spec),
                    trial_name_creator=TrialNamer(spec.search), max_concurrent_trials=None)
    else:
        args["max_concurrent_trials"] = spec.max_concurrent or None
    return args


def sample_configs(spec, **fixed: Any) -> list[tuple[str, dict[str, Any]]]:
    """The configs a seeded random search runs, in Tune's order, named as Tune names them:
    ``[(name, point), ...]``. Drawn with the generator ``BasicVariantGenerator`` uses
    (``generate_variants`` with one numpy generator seeded by ``--search-seed``, one call per
    sample), over the same ``param_space``: the configs the job will run."""
    if spec.search != "random" or spec.search_seed is None:
        raise ValueError("only a random search with a --search-seed has its configs known before it runs")
    from ray.tune.search.basic_variant import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    rng = _BackwardsCompatibleNumpyRng(spec.search_seed)
    space = spec.param_space(**fixed)
    out = []
    for _ in range(int(spec.num_samples)):
        for _, resolved in generate_variants({"config": space}, random_state=rng):
            point = resolved["config"]
            out.append((search_trial_name(str(point["model"]), len(out) + 1), point))
    return out


# ---------------------------------------------------------------------------- the parent run

def parent_tags(spec) -> dict[str, str]:
    """The tags every job's parent run carries: the search, what it searched (searches only),
    the metric, the mode and the scheduler."""
    tags = {TAG_SEARCH: spec.search, TAG_METRIC: spec.metric, TAG_MODE: spec.mode, TAG_SCHEDULER: spec.scheduler}
    if is_search(spec):
        tags[TAG_SEARCHED] = ",".join(spec.space)
    return tags


def last_value(history: list[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, value) at the last logged step (its last value there), or None."""
    if not history:
        return None
    step = max(s for s, _ in history)
    return step, [v for s, v in history if s == step][-1]


def best_trial(mlf, spec, trial_runs) -> tuple[Any, int, float] | None:
    """The search's best trial: by ``spec.metric`` at its last logged epoch, ``spec.mode``;
    stopped trials included, FAILED, KILLED and diverged ones not. (run, epoch, value) or None.
    Ties: the earlier run."""
    from jobs.tracking import metric_history

    best = None
    for run in sorted(trial_runs, key=lambda r: r.info.start_time or 0):
        if run.info.status != "FINISHED" or run.data.tags.get(TAG_DIVERGED) == "true":
            continue
        last = last_value(metric_history(mlf, run.info.run_id, [spec.metric])[spec.metric])
        if last is None or not math.isfinite(last[1]):
            continue
        better = best is None or (last[1] > best[2] if spec.mode == "max" else last[1] < best[2])
        if better:
            best = (run, last[0], last[1])
    return best


def log_outcome(mlf, spec, parent_run_id: str, trial_runs, log=print) -> str | None:
    """At a search's end: metric ``best_<metric>``, params ``best.<key>`` (the best trial's
    searched values as its run logged them) and TAG_BEST_RUN on the parent; one line to ``log``.
    Returns the best run's id. A param the parent has already with another value (a resumed job
    whose best changed) is left as it is, with a note: MLflow params cannot change."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    found = best_trial(mlf, spec, trial_runs)
    if found is None:
        log(f"  search: no trial finished with a {spec.metric}; no best config")
        return None
    run, epoch, value = found
    params = {f"{BEST_PARAM_PREFIX}{key}": run.data.params.get(key, "None") for key in spec.space}
    existing = mlf.get_run(parent_run_id).data.params
    clash = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    mlf.log_batch(parent_run_id, metrics=[Metric(best_metric_name(spec.metric), value, int(time.time() * 1000), 0)],
                  params=new, tags=[RunTag(TAG_BEST_RUN, run.info.run_id)])
    stopped = sum(r.data.tags.get(TAG_STOPPED_EARLY) == "true" for r in trial_runs)
    values = ", ".join(f"{key} {_short(run.data.params.get(key))}" for key in spec.space)
    unit = "%" if spec.metric.endswith("_acc") else ""
    log(f"  search: best trial {run.info.run_name}, {spec.metric} {value:.4g}{unit} at epoch {epoch}/{spec.epochs}"
        f" ({values}); {len(trial_runs)} trial(s), {stopped} stopped early")
    if clash:
        log(f"  note: the parent run keeps its earlier {', '.join(clash)} (MLflow params cannot change); "
            f"the best run is now {run.info.run_name}")
    return run.info.run_id


def _short(text: str | None) -> str:
    """A param for the log line: a float to 4 significant digits (the run's param keeps every digit)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return str(text)
    return str(text) if str(text).lstrip("-").isdigit() else f"{value:.4g}"
