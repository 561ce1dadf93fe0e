"""`mnistjobs verify`: load each trial's logged model through MLflow and score it again here.

How a user trusts a number: for every trial run chosen (a job's, a registered version's, or every
finished trial of the experiment) the model the run logged (``jobs.mlflow_model``) is loaded with
``mlflow.pytorch.load_model`` (MLflow's own loader: not this project's checkpoint code), run on
the test images that run was scored on (the run's data folder, tag ``mnistjobs.data_dir``, or
``--data-dir``; the first ``test_limit`` images when the run's param says so, else all 10,000),
and its accuracy compared with the run's logged final test accuracy.

"Logged final": the run's ``test_acc`` at its last step (epoch), and of several values logged at
that step the last one (the latest timestamp), as ``jobs.mlflow_runs.metric_history`` reads it:
the number the UI, ``compare`` and the registry show. It is the accuracy of the weights the run
logged as its model (with EMA on, the averaged weights: ``fit`` tests and checkpoints those);
``tta_test_acc`` (test-time augmentation) is another metric and is not compared.

A run passes when the two differ by at most ``tolerance`` points (0.01: one image in 10,000).
A finished run without a logged model (stopped early by Tune, or logged before models were) is
listed as skipped. :func:`verify` returns one :class:`Check` per run; the CLI (jobs.cli_verify)
prints them and exits 1 when one fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from jobs.contract import (DEFAULT_EXPERIMENT, ROLE_TRIAL, TAG_DATA_DIR, TAG_ROLE, TAG_STOPPED_EARLY)

DEFAULT_TOLERANCE = 0.01   # points of accuracy (percent)
BATCH = 1000


class VerifyError(ValueError):
    """A request verify cannot answer (no such job, model or experiment; no data): exit 2."""


@dataclass
class Check:
    """One run's verification."""

    run_name: str
    run_id: str
    model_uri: str | None
    images: int = 0
    logged: float | None = None
    recomputed: float | None = None
    problem: str | None = None     # why it could not be checked (a failure)
    skipped: str | None = None     # why it is not checked (no model: not a failure)
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def difference(self) -> float | None:
        if self.logged is None or self.recomputed is None:
            return None
        return self.recomputed - self.logged

    @property
    def ok(self) -> bool:
        if self.skipped is not None:
            return True
        return self.problem is None and self.difference is not None and abs(self.difference) <= self.tolerance + 1e-9

    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        if self.problem is not None:
            return f"FAILED: {self.problem}"
        return "ok" if self.ok else f"MISMATCH (more than {self.tolerance:g} points)"


def logged_final(mlf, run_id: str, key: str = "test_acc") -> tuple[int, float] | None:
    """(the last step, the last value logged at it) of ``key``, or None when never logged."""
    from jobs.mlflow_runs import metric_history

    history = metric_history(mlf, run_id, [key])[key]
    return history[-1] if history else None


def _int_param(params: dict[str, str], key: str) -> int | None:
    value = params.get(key)
    if value in (None, "", "None"):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


class _TestSets:
    """MNIST test images per data folder, loaded once each."""

    def __init__(self, data_dir: str | None):
        self.data_dir = data_dir
        self._cache: dict[str, Any] = {}

    def folder_for(self, run) -> str:
        from pathlib import Path

        from jobs.datadir import resolve_data_dir

        if self.data_dir:
            return str(resolve_data_dir(self.data_dir))
        tagged = run.data.tags.get(TAG_DATA_DIR) or run.data.params.get("data_dir")
        if tagged and tagged != "None":
            if not Path(tagged).is_dir():
                raise VerifyError(f"the run read MNIST from {tagged} (on the node that trained it), which is not a "
                                  f"folder here; give --data-dir (or MNISTJOBS_DATA_DIR) with a copy of MNIST")
            return tagged
        return str(resolve_data_dir(None))

    def get(self, run) -> tuple[Any, Any, str]:
        """(uint8 images [N, 28, 28], labels [N], folder) the run was scored on."""
        from jobs.datadir import load_data

        folder = self.folder_for(run)
        if folder not in self._cache:
            self._cache[folder] = load_data(folder)
        data = self._cache[folder]
        limit = _int_param(run.data.params, "test_limit")
        images, labels = data.test_images, data.test_labels
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return images, labels, folder


def rescore(module, images, labels, batch: int = BATCH) -> float:
    """Accuracy (percent) of ``module`` (uint8 [N, 28, 28] -> log-probabilities [N, 10]) on the
    images. No batch of one image: the exported model's batch dimension is dynamic from 2."""
    import torch

    n = len(images)
    if n == 0:
        raise VerifyError("no test images to score")
    bounds = [[start, min(start + batch, n)] for start in range(0, n, batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:  # no last batch of one image
        bounds[-2][1] = n
        bounds.pop()
    correct = 0
    with torch.no_grad():
        for start, stop in bounds:
            x = images[start:stop]
            if len(x) == 1:
                x = torch.cat([x, x])
            pred = module(x.contiguous()).argmax(1)[: stop - start]
            correct += int((pred == labels[start:stop].to(pred.device)).sum())
    return 100.0 * correct / n


def _load(model_uri: str, tracking_uri: str):
    import mlflow.pytorch

    from jobs.mlflow_model import _tracking_uri

    with _tracking_uri(tracking_uri):
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")


def parse_model(text: str) -> tuple[str, str | None, str | None]:
    """``name@alias``, ``name/version`` or ``name`` (its ``@best``) -> (name, alias, version);
    a ``models:/`` prefix is allowed."""
    from jobs.mlflow_model import BEST_ALIAS

    spec = text[len("models:/"):] if text.startswith("models:/") else text
    if "@" in spec:
        name, alias = spec.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in spec:
        name, version = spec.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    elif spec:
        return spec, BEST_ALIAS, None
    raise VerifyError(f"--model {text!r} is no registered model: give NAME@ALIAS (mnistjobs-v2@best), "
                      f"NAME/VERSION (mnistjobs-v2/3) or NAME (its @best)")


def candidates(mlf, *, experiment: str = DEFAULT_EXPERIMENT, job: str | None = None,
               model: str | None = None) -> list[tuple[Any, str | None]]:
    """(run, the model URI to load or None: the run's own logged model) to check."""
    from mlflow.exceptions import MlflowException

    from jobs.mlflow_runs import job_filter, quote, search_all

    if model is not None:
        name, alias, version = parse_model(model)
        try:
            mv = (mlf.get_model_version_by_alias(name, alias) if alias else mlf.get_model_version(name, version))
        except MlflowException as e:
            raise VerifyError(f"no registered model version {model!r} in the registry "
                              f"({' '.join(str(e.message).split())[:200]}); `mlflow models` or the MLflow UI's "
                              f"Models page lists them") from None
        if not mv.run_id:
            raise VerifyError(f"{model} (version {mv.version}) names no run: nothing to compare it with")
        uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        return [(mlf.get_run(mv.run_id), uri)]
    exp = mlf.get_experiment_by_name(experiment)
    if exp is None:
        raise VerifyError(f"no MLflow experiment {experiment!r} (--experiment; the --experiment given at submit "
                          f"time, default {DEFAULT_EXPERIMENT})")
    flt = job_filter(job, ROLE_TRIAL) if job else f"tags.`{TAG_ROLE}` = {quote(ROLE_TRIAL)}"
    runs = search_all(mlf, [exp.experiment_id], flt + " and attributes.status = 'FINISHED'")
    if not runs:
        where = f"job {job}" if job else "it"
        raise VerifyError(f"no finished trial run of {where} in the experiment {experiment!r}"
                          + (" (`mnistjobs list` shows the jobs; --experiment names another experiment)" if job else ""))
    return [(r, None) for r in sorted(runs, key=lambda r: (r.info.run_name or "", r.info.start_time or 0))]


def verify(tracking_uri: str, *, experiment: str = DEFAULT_EXPERIMENT, job: str | None = None,
           model: str | None = None, data_dir: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
           on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Check every run :func:`candidates` picks; ``on_check`` gets each result as it is known."""
    from jobs import mlflow_model as mm
    from jobs import tracking
    from mnistnets.data import DataError

    mlf = tracking.client(tracking_uri)
    sets = _TestSets(data_dir)
    checks = []
    for run, uri in candidates(mlf, experiment=experiment, job=job, model=model):
        check = Check(run.info.run_name or run.info.run_id, run.info.run_id, uri, tolerance=tolerance)
        checks.append(check)
        try:
            if check.model_uri is None:
                model_id = mm.logged_model_id(mlf, run)
                if model_id is None:
                    check.skipped = ("stopped early by Tune, no model logged" if run.data.tags.get(TAG_STOPPED_EARLY) == "true"
                                     else "the run logged no model")
                    continue
                check.model_uri = f"models:/{model_id}"
            final = logged_final(mlf, run.info.run_id)
            if final is None:
                check.problem = "the run logged no test_acc"
                continue
            check.logged = final[1]
            images, labels, _ = sets.get(run)
            check.images = len(images)
            check.recomputed = rescore(_load(check.model_uri, tracking_uri), images, labels)
        except (VerifyError, DataError) as e:
            check.problem = str(e)
        except Exception as e:  # noqa: BLE001 - one run's failure is that run's verdict
            check.problem = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        finally:
            if on_check is not None:
                on_check(check)
    return checks


def format_check(check: Check, width: int = 24) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"

    diff = "-" if check.difference is None else f"{check.difference:+.2f}"
    return (f"{check.run_name:<{width}}  {check.run_id[:12]:<12}  {check.images:>6}  {pct(check.logged):>8}  "
            f"{pct(check.recomputed):>10}  {diff:>6}  {check.verdict}")


def header(width: int = 24) -> str:
    return (f"{'run':<{width}}  {'run id':<12}  {'images':>6}  {'logged':>8}  {'recomputed':>10}  {'diff':>6}  result")
