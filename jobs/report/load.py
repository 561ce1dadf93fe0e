"""Loading a report's runs: MLflow trial runs -> two pandas frames (runs, epochs).

Reads MLflow only (never Ray's result folders), by the names in :mod:`jobs.contract`: trial
runs are tagged ``mnistjobs.role = trial`` and ``mnistjobs.job_id = <job>``, carry the params
``model``, ``params``, ``schedule``, ``seed`` ... and log one value per epoch (``step = epoch``)
of each metric in :data:`METRICS`. The runs come from :func:`jobs.mlflow_runs.search_all`
(MLflow's own paging) and each run's metrics from :func:`jobs.mlflow_runs.metric_history`.

:func:`load_compare` also reads the parent runs (``mnistjobs.role = sweep``) of those jobs and
returns a :class:`SearchJob` for each search job (parent tag ``mnistjobs.search`` = random or
optuna): what it searched and optimised, its best trial, and per trial the sampled values and
whether it was stopped early or diverged.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd

from jobs.contract import (DEFAULT_EXPERIMENT, EPOCH_METRICS, ROLE_SWEEP, ROLE_TRIAL, TAG_BEST_RUN, TAG_DEVICE,
                           TAG_DIVERGED, TAG_JOB, TAG_METRIC, TAG_MODE, TAG_ROLE, TAG_SCHEDULER, TAG_SEARCH,
                           TAG_SEARCHED, TAG_STOPPED_AT, TAG_STOPPED_EARLY, TAG_TRIAL, best_metric_name)
from jobs.mlflow_runs import metric_history, quote, search_all
from jobs.report.errors import ReportError
from jobs.report.stores import POINT_ELSEWHERE, check_local_store, check_reachable, file_store_folder

METRICS = EPOCH_METRICS
RUN_COLUMNS = [
    "run_id", "run", "label", "job_id", "trial_id", "model", "params", "schedule", "seed",
    "optimizer", "batch_size", "epochs_planned", "device", "status",
    "start_time", "end_time", "wall_seconds",
]
EPOCH_COLUMNS = ["run_id", "label", "epoch", *METRICS]
TRIALS = f"tags.`{TAG_ROLE}` = {quote(ROLE_TRIAL)}"
SWEEPS = f"tags.`{TAG_ROLE}` = {quote(ROLE_SWEEP)}"
#: The parent's TAG_SEARCH values that make a job a search job (absent or "grid": a grid job).
SEARCHES = ("random", "optuna")


@dataclass
class SearchJob:
    """One search job as `compare` reports it (from its parent run and its trial runs).

    ``values``: per trial run id, the searched settings' values as MLflow stores them (strings;
    a key the trial did not log is missing); ``stopped_at``: per trial stopped early, the epochs
    it trained (TAG_STOPPED_AT); ``diverged``: the trial runs tagged diverged.
    """

    job_id: str
    parent_run_id: str
    search: str
    searched: list[str]
    metric: str = "test_acc"
    mode: str = "max"
    scheduler: str = "fifo"
    best_run_id: str | None = None
    best_value: float | None = None
    run_ids: list[str] = field(default_factory=list)
    values: dict[str, dict[str, str]] = field(default_factory=dict)
    stopped_at: dict[str, int | None] = field(default_factory=dict)
    diverged: set[str] = field(default_factory=set)


def _to_int(value):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return pd.NA


def _ms_to_time(ms):
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def unique_labels(names: list[str], job_ids: list[str], run_ids: list[str]) -> list[str]:
    """Run names as column labels; a name used by several runs gets its job (or run) id added."""
    labels = []
    for name, job, run_id in zip(names, job_ids, run_ids):
        same = [i for i, n in enumerate(names) if n == name]
        if len(same) == 1:
            labels.append(name)
            continue
        jobs_of_same = {job_ids[i] for i in same}
        suffix = job if job and len(jobs_of_same) == len(same) else run_id[:8]
        labels.append(f"{name} ({suffix})")
    return labels


def run_labels(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(run_id, label) in the runs' order; label falls back to the run name."""
    if "label" in runs:
        labels = list(runs["label"])
    else:
        labels = unique_labels(
            list(runs["run"]),
            list(runs["job_id"]) if "job_id" in runs else [""] * len(runs),
            list(runs["run_id"]),
        )
    return list(zip(runs["run_id"], labels))


def _experiment_id(client, experiment: str, where: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        known = ", ".join(names) if names else "none"
        raise ReportError(
            f"There is no MLflow experiment named {experiment!r} at {where} (experiments "
            f"there: {known}). Pass --experiment with the name used at submit time, or "
            "--tracking-uri for another server."
        )
    return exp.experiment_id


def _no_runs(client, experiment_id: str, experiment: str, job: str | None, where: str) -> ReportError:
    """The error for an experiment (or a job in it) without trial runs."""
    if job is None:
        return ReportError(
            f"Experiment {experiment!r} at {where} has no trial runs yet. Submit a sweep "
            "with `mnistjobs submit`, or pick another --experiment."
        )
    jobs = sorted({r.data.tags.get(TAG_JOB, "") for r in search_all(client, [experiment_id], TRIALS)} - {""})
    listed = ", ".join(jobs[:10]) + (", ..." if len(jobs) > 10 else "") if jobs else "none"
    return ReportError(
        f"Job {job!r} has no trial runs in experiment {experiment!r} at {where} (jobs "
        f"with trial runs there: {listed}). Check the id with `mnistjobs list`."
    )


def _parents(client, experiment_id: str, job: str | None) -> dict[str, object]:
    """The parent (sweep) run of each job, by job id; of several for one id the latest started."""
    flt = SWEEPS + (f" and tags.`{TAG_JOB}` = {quote(job)}" if job is not None else "")
    parents: dict[str, object] = {}
    for run in search_all(client, [experiment_id], flt):
        job_id = run.data.tags.get(TAG_JOB, "")
        mine = parents.get(job_id)
        if job_id and (mine is None or (run.info.start_time or 0) > (mine.info.start_time or 0)):
            parents[job_id] = run
    return parents


def _is_search(parent) -> bool:
    return parent.data.tags.get(TAG_SEARCH, "grid").strip().lower() in SEARCHES


def _read(uri: str, experiment: str, job: str | None, where: str,
          with_parents: bool = False) -> tuple[list, list[dict], dict]:
    """The trial runs, per run its metric history, and (``with_parents``) the parent run of
    each job with trials; ReportError for anything MLflow says."""
    from mlflow.exceptions import MlflowException

    from jobs import tracking

    try:
        client = tracking.client(uri)  # with the embedded server's login
        experiment_id = _experiment_id(client, experiment, where)
        flt = TRIALS + (f" and tags.`{TAG_JOB}` = {quote(job)}" if job is not None else "")
        found = search_all(client, [experiment_id], flt)
        if not found:
            raise _no_runs(client, experiment_id, experiment, job, where)
        parents = {}
        keys = list(METRICS)
        if with_parents:
            with_trials = {r.data.tags.get(TAG_JOB, "") for r in found}
            parents = {j: p for j, p in _parents(client, experiment_id, job).items() if j in with_trials}
            keys += sorted({p.data.tags.get(TAG_METRIC, "") for p in parents.values() if _is_search(p)}
                           - set(METRICS) - {""})  # a search metric that is no epoch metric
        with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:  # one server round trip per metric
            histories = list(pool.map(lambda r: metric_history(client, r.info.run_id, keys), found))
    except MlflowException as exc:
        if file_store_folder(uri) is not None:
            raise ReportError(
                f"The MLflow tracking URI {uri} is a local folder (MLflow's old file store), which "
                "MLflow refuses to open (it is in maintenance mode: `mlflow migrate-filestore` "
                "moves it into a database, MLFLOW_ALLOW_FILE_STORE=true opens it anyway). "
                + POINT_ELSEWHERE
            ) from None
        raise ReportError(f"MLflow at {where} could not be read: {exc.message}") from None
    return found, histories, parents


def _search_jobs(found: list, parents: dict) -> list[SearchJob]:
    """A SearchJob per search parent in ``parents``, in the order the jobs started (their
    parent's start, then their first trial's)."""
    jobs: dict[str, SearchJob] = {}
    first: dict[str, int] = {}
    for run in sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_name or "")):
        tags, params = run.data.tags, run.data.params
        job_id = tags.get(TAG_JOB, "")
        parent = parents.get(job_id)
        if parent is None or not _is_search(parent):
            continue
        sj = jobs.get(job_id)
        if sj is None:
            ptags = parent.data.tags
            metric = ptags.get(TAG_METRIC, "").strip() or "test_acc"
            best = parent.data.metrics.get(best_metric_name(metric))
            sj = jobs[job_id] = SearchJob(
                job_id=job_id, parent_run_id=parent.info.run_id,
                search=ptags[TAG_SEARCH].strip().lower(),
                searched=[k.strip() for k in ptags.get(TAG_SEARCHED, "").split(",") if k.strip()],
                metric=metric,
                mode="min" if ptags.get(TAG_MODE, "").strip().lower() == "min" else "max",
                scheduler=ptags.get(TAG_SCHEDULER, "").strip() or "fifo",
                best_run_id=ptags.get(TAG_BEST_RUN) or None,
                best_value=float(best) if best is not None else None,
            )
        rid = run.info.run_id
        first.setdefault(job_id, run.info.start_time or 0)
        sj.run_ids.append(rid)
        sj.values[rid] = {k: params[k] for k in sj.searched if k in params}
        if tags.get(TAG_STOPPED_EARLY, "").lower() == "true":
            at = _to_int(tags.get(TAG_STOPPED_AT))
            sj.stopped_at[rid] = None if at is pd.NA else at
        if tags.get(TAG_DIVERGED, "").lower() == "true":
            sj.diverged.add(rid)
    start = {j: (parents[j].info.start_time or 0, first[j], j) for j in jobs}
    return sorted(jobs.values(), key=lambda sj: start[sj.job_id])


def _runs_frame(found: list) -> pd.DataFrame:
    rows = []
    for run in found:
        info, params, tags = run.info, run.data.params, run.data.tags
        start, end = info.start_time, info.end_time
        rows.append({
            "run_id": info.run_id,
            "run": info.run_name or info.run_id[:8],
            "job_id": tags.get(TAG_JOB, ""),
            "trial_id": tags.get(TAG_TRIAL, ""),
            "model": params.get("model", ""),
            "params": _to_int(params.get("params")),
            "schedule": params.get("schedule", ""),
            "seed": _to_int(params.get("seed")),
            "optimizer": params.get("optimizer", ""),
            "batch_size": _to_int(params.get("batch_size")),
            "epochs_planned": _to_int(params.get("epochs")),
            "device": params.get("device", tags.get(TAG_DEVICE, "")),
            "status": info.status,
            "start_time": _ms_to_time(start),
            "end_time": _ms_to_time(end),
            "wall_seconds": (end - start) / 1000.0 if start and end else math.nan,
        })
    runs = pd.DataFrame(rows)
    for col in ("params", "seed", "batch_size", "epochs_planned"):
        runs[col] = runs[col].astype("Int64")
    runs["label"] = unique_labels(list(runs["run"]), list(runs["job_id"]), list(runs["run_id"]))
    return runs[RUN_COLUMNS]


def _epochs_frame(found: list, histories: list[dict], runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run, history in zip(found, histories):
        per_step: dict[int, dict[str, float]] = {}
        for key, points in history.items():
            for step, value in points:
                per_step.setdefault(step, {})[key] = value
        rows += [{"run_id": run.info.run_id, "epoch": step, **values} for step, values in sorted(per_step.items())]
    extra = sorted({key for history in histories for key in history} - set(METRICS))
    epochs = pd.DataFrame(rows, columns=["run_id", "epoch", *METRICS, *extra])
    epochs["epoch"] = epochs["epoch"].astype("int64")
    for key in (*METRICS, *extra):
        epochs[key] = epochs[key].astype("float64")
    return epochs.merge(runs[["run_id", "label"]], on="run_id", how="left")[EPOCH_COLUMNS + extra]


def load_runs(
    tracking_uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    job: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every trial run of `experiment` (optionally of one job) from MLflow.

    Returns ``(runs, epochs)``: ``runs`` has one row per trial run (columns :data:`RUN_COLUMNS`;
    ``label`` is the run name, made unique when two jobs reuse a name), sorted by model,
    schedule, seed and start; ``epochs`` has one row per (run, epoch) with every metric of
    :data:`METRICS` (NaN where a metric was not logged). Raises :class:`ReportError` for an
    unreachable server, an unknown experiment, or no trial runs.
    """
    runs, epochs, _ = _load(tracking_uri, experiment, job, with_parents=False)
    return runs, epochs


def load_compare(
    tracking_uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    job: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[SearchJob]]:
    """:func:`load_runs` plus the search jobs among the runs' jobs: ``(runs, epochs, searches)``.

    ``searches`` holds a :class:`SearchJob` per job whose parent run says it searched (tag
    ``mnistjobs.search`` = random or optuna); grid jobs (the tag absent or ``grid``) and trials
    without a parent run are in none. ``epochs`` also has a column for a search's metric that
    is not one of :data:`METRICS`.
    """
    return _load(tracking_uri, experiment, job, with_parents=True)


def _load(tracking_uri, experiment, job, with_parents: bool):
    import mlflow

    if job is not None and ("'" in job or "\\" in job or not job.strip()):
        raise ReportError(f"Invalid job id {job!r}: a job id has no quotes or backslashes.")
    uri = tracking_uri or mlflow.get_tracking_uri()
    where = tracking_uri or f"the default MLflow tracking URI ({uri})"
    check_reachable(uri)
    check_local_store(uri)
    found, histories, parents = _read(uri, experiment, job, where, with_parents=with_parents)
    runs = _runs_frame(found)
    epochs = _epochs_frame(found, histories, runs)
    runs = runs.sort_values(
        ["model", "schedule", "seed", "start_time", "run"], na_position="last", kind="stable"
    ).reset_index(drop=True)
    order = {rid: i for i, rid in enumerate(runs["run_id"])}
    epochs = epochs.sort_values(
        ["run_id", "epoch"], key=lambda s: s.map(order) if s.name == "run_id" else s
    ).reset_index(drop=True)
    return runs, epochs, _search_jobs(found, parents)
