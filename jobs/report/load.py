"""Loading a report's runs: MLflow trial runs -> two pandas frames (runs, epochs).

Reads MLflow only (never Ray's result folders), by the names in :mod:`jobs.contract`: trial
runs are tagged ``mnistjobs.role = trial`` and ``mnistjobs.job_id = <job>``, carry the params
``model``, ``params``, ``schedule``, ``seed`` ... and log one value per epoch (``step = epoch``)
of each metric in :data:`METRICS`. The runs come from :func:`jobs.mlflow_runs.search_all`
(MLflow's own paging) and each run's metrics from :func:`jobs.mlflow_runs.metric_history`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from jobs.contract import DEFAULT_EXPERIMENT, EPOCH_METRICS, ROLE_TRIAL, TAG_DEVICE, TAG_JOB, TAG_ROLE, TAG_TRIAL
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


def _read(uri: str, experiment: str, job: str | None, where: str) -> tuple[list, list[dict]]:
    """The trial runs and, per run, its metric history; ReportError for anything MLflow says."""
    from mlflow.exceptions import MlflowException

    from jobs import tracking

    try:
        client = tracking.client(uri)  # with the embedded server's login
        experiment_id = _experiment_id(client, experiment, where)
        flt = TRIALS + (f" and tags.`{TAG_JOB}` = {quote(job)}" if job is not None else "")
        found = search_all(client, [experiment_id], flt)
        if not found:
            raise _no_runs(client, experiment_id, experiment, job, where)
        with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:  # one server round trip per metric
            histories = list(pool.map(lambda r: metric_history(client, r.info.run_id, METRICS), found))
    except MlflowException as exc:
        if file_store_folder(uri) is not None:
            raise ReportError(
                f"The MLflow tracking URI {uri} is a local folder (MLflow's old file store), which "
                "MLflow refuses to open (it is in maintenance mode: `mlflow migrate-filestore` "
                "moves it into a database, MLFLOW_ALLOW_FILE_STORE=true opens it anyway). "
                + POINT_ELSEWHERE
            ) from None
        raise ReportError(f"MLflow at {where} could not be read: {exc.message}") from None
    return found, histories


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
    epochs = pd.DataFrame(rows, columns=["run_id", "epoch", *METRICS])
    epochs["epoch"] = epochs["epoch"].astype("int64")
    for key in METRICS:
        epochs[key] = epochs[key].astype("float64")
    return epochs.merge(runs[["run_id", "label"]], on="run_id", how="left")[EPOCH_COLUMNS]


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
    import mlflow

    if job is not None and ("'" in job or "\\" in job or not job.strip()):
        raise ReportError(f"Invalid job id {job!r}: a job id has no quotes or backslashes.")
    uri = tracking_uri or mlflow.get_tracking_uri()
    where = tracking_uri or f"the default MLflow tracking URI ({uri})"
    check_reachable(uri)
    check_local_store(uri)
    found, histories = _read(uri, experiment, job, where)
    runs = _runs_frame(found)
    epochs = _epochs_frame(found, histories, runs)
    runs = runs.sort_values(
        ["model", "schedule", "seed", "start_time", "run"], na_position="last", kind="stable"
    ).reset_index(drop=True)
    order = {rid: i for i, rid in enumerate(runs["run_id"])}
    epochs = epochs.sort_values(
        ["run_id", "epoch"], key=lambda s: s.map(order) if s.name == "run_id" else s
    ).reset_index(drop=True)
    return runs, epochs
