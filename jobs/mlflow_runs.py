"""Reading runs back from MLflow: the one run search and the one metric-history reader.

Everything that looks runs up (the CLI's ``status``/``stop``, the sweep driver, the report, the
benchmarks) goes through :func:`search_all`; everything that reads a metric's values per epoch
goes through :func:`metric_history`. Re-exported by :mod:`jobs.tracking`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from jobs.contract import TAG_JOB, TAG_ROLE

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities import Run

PAGE_SIZE = 1000  # MLflow's default page size for search_runs


def quote(value: Any) -> str:
    """``value`` as a quoted string literal of an MLflow filter string."""
    return "'" + str(value).replace("'", "\\'") + "'"


def param_value(value: Any) -> str:
    """How a value is logged as an MLflow param: lists comma-joined, None as "None"."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "None" if value is None else str(value)


def search_all(mlf: "MlflowClient", experiment_ids: list[str], filter_string: str = "") -> list["Run"]:
    """Every active run of ``experiment_ids`` matching ``filter_string``, over all pages.

    The paging is MLflow's own (the helper ``mlflow.search_runs`` pages with), driven through
    the client given, so no global tracking URI is read or set.
    """
    from mlflow.entities import ViewType
    from mlflow.utils import get_results_from_paginated_fn

    if not experiment_ids:
        return []

    def page(max_results: int, token: str | None):
        return mlf.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                               max_results=max_results, page_token=token)

    return get_results_from_paginated_fn(page, PAGE_SIZE)


def job_filter(job_id: str, role: str | None = None) -> str:
    """The filter string for a job's runs (optionally only its sweep or its trial runs)."""
    flt = f"tags.`{TAG_JOB}` = {quote(job_id)}"
    if role:
        flt += f" and tags.`{TAG_ROLE}` = {quote(role)}"
    return flt


def job_runs(mlf: "MlflowClient", job_id: str, role: str | None = None,
             experiment_ids: list[str] | None = None) -> list["Run"]:
    """All runs of a job (optionally only the sweep or the trial runs), over every active
    experiment unless ``experiment_ids`` says which."""
    from mlflow.entities import ViewType

    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in mlf.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    return search_all(mlf, experiment_ids, job_filter(job_id, role))


def metric_history(mlf: "MlflowClient", run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """Per metric key, ``[(step, value)]`` sorted by step, as the server has them.

    A step logged more than once (a retried epoch) keeps its last value: the latest timestamp,
    and of equal timestamps the one the server lists last. A key never logged maps to ``[]``.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for key in keys:
        by_step: dict[int, float] = {}
        for m in sorted(mlf.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            by_step[int(m.step)] = float(m.value)
        out[key] = sorted(by_step.items())
    return out
