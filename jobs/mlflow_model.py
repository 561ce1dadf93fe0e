"""A trial's final model in MLflow, and the Model Registry: ``log_trial_model`` and ``register_best``.

What a user gets back (``mlflow.pytorch.load_model`` / ``mlflow.pyfunc.load_model``)::

    input   raw 28x28 grayscale images, uint8 0-255 (MNIST's own pixels: 0 = black background,
            255 = white ink), as an array of shape [N, 28, 28]
    pytorch a module taking that uint8 tensor; it normalises the images itself (MNIST's
            mean 0.1307 / std 0.3081, as mnistnets trains with) and returns the class
            log-probabilities, float32 [N, 10]
    pyfunc  predict(images) -> a pandas DataFrame, one row per image, columns ``digit`` (int64,
            the most likely class) and ``probability`` (float64, its probability)

The model is stored in MLflow's safe ``pt2`` format (``torch.export``): loading it needs neither
this project nor pickle. Its pyfunc flavour is this file, shipped inside the model as the module
``mnistjobs_pyfunc`` (``code/``): only the standard library is imported at its top, so the copy
imports on any machine with mlflow, torch, numpy and pandas (the model's requirements, passed
explicitly: MLflow infers nothing in a subprocess).

``log_trial_model`` logs a model with a signature and an input example as a LoggedModel linked to
an existing (trial) run, through MLflow's ``Model.log`` (what ``mlflow.pytorch.log_model(name=...)``
runs) with the run id given, so no fluent run is started or ended. ``register_best`` registers,
per architecture, a job's (or an experiment's) best finished trial as a new version of
``mnistjobs-<model>`` and points the alias ``best`` at the best version there is.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

PYFUNC_MODULE = "mnistjobs_pyfunc"   # this file's name inside a logged model's code/ folder
IMAGE_SHAPE = (28, 28)
MODEL_NAME = "classifier"            # the LoggedModel's name in the run; not "model": the run's own model/ folder (layers.txt) would clash
REGISTERED_PREFIX = "mnistjobs-"     # mnistjobs-v2, ...
BEST_ALIAS = "best"
FINAL_METRIC = "test_acc"            # the final test accuracy: the run's last test_acc
# Tags of a registered version (and of the LoggedModel, for the job id and the run id).
TAG_JOB = "job_id"
TAG_RUN = "run_id"
TAG_FINAL = "final_test_acc"
TAG_RECIPE = "recipe"
TAG_MODEL = "model"
_NOT_RECIPE = ("model", "params", "device", "data_dir")  # params that say where or what, not how it trained


# ------------------------------------------------------------------------- the model as logged

def raw_image_model(net, mean: float | None = None, std: float | None = None):
    """``net`` (an mnistnets model: normalised [N, 1, 28, 28] -> log-probabilities) wrapped to take
    raw uint8 images [N, 28, 28]: a CPU copy in eval mode, ``net`` itself is left as it was."""
    import copy

    import torch
    from torch import nn

    if mean is None or std is None:
        from mnistnets.data import MNIST_MEAN, MNIST_STD

        mean = MNIST_MEAN if mean is None else mean
        std = MNIST_STD if std is None else std

    class RawImageClassifier(nn.Module):
        """uint8 [N, 28, 28] (0-255) -> log-probabilities float32 [N, 10]."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.net = inner
            # x/255 normalised: (x/255 - mean)/std == x * scale - shift
            self.register_buffer("scale", torch.tensor(1.0 / (255.0 * std), dtype=torch.float32))
            self.register_buffer("shift", torch.tensor(mean / std, dtype=torch.float32))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.to(torch.float32).unsqueeze(1) * self.scale - self.shift
            return self.net(x)

    inner = copy.deepcopy(net).to("cpu").eval()
    return RawImageClassifier(inner).eval()


def signature():
    """Input: a uint8 tensor [-1, 28, 28]; output (the pyfunc's): columns digit, probability."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *IMAGE_SHAPE))]),
                          outputs=Schema([ColSpec("long", "digit"), ColSpec("double", "probability")]))


def pip_requirements() -> list[str]:
    """What loading the model needs, pinned to this environment (local version labels such as
    torch's ``+cu130`` dropped: pip cannot resolve them from PyPI)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("mlflow", "torch", "numpy", "pandas")]


def default_input_example():
    """Two blank images (batch 2: torch.export keeps the batch size dynamic only when > 1)."""
    import numpy as np

    return np.zeros((2, *IMAGE_SHAPE), dtype=np.uint8)


class _Flavor:
    """The "flavour" Model.log saves with: the pytorch flavour's save_model, then the pyfunc
    flavour pointed at this file (shipped in code/) instead of mlflow.pytorch's own, whose predict
    returns the raw output tensor as a frame."""

    __name__ = "pytorch"

    @staticmethod
    def save_model(path, mlflow_model, pytorch_model, code_paths=None, **kwargs):
        import mlflow.pytorch
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.pyfunc import FLAVOR_NAME as PYFUNC

        kwargs.pop("validate_serving_input", None)  # Model.log's own, not the flavour's
        mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, code_paths=code_paths,
                                  **kwargs)
        conf = mlflow_model.flavors[PYFUNC]
        conf["loader_module"] = PYFUNC_MODULE
        conf.pop("pickle_module_name", None)
        mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block (Model.log reads only that), then
    put back as it was: the global and $MLFLOW_TRACKING_URI (which set_tracking_uri also sets)."""
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _uri_of(mlf_or_tracking_uri) -> str:
    if isinstance(mlf_or_tracking_uri, str):
        return mlf_or_tracking_uri
    return mlf_or_tracking_uri.tracking_uri


def log_trial_model(mlf_or_tracking_uri, run_id: str, model, *, name: str = MODEL_NAME, step: int = 0,
                    input_example=None, tags: dict[str, Any] | None = None, validate: bool = False,
                    mean: float | None = None, std: float | None = None):
    """Log ``model`` (an mnistnets ``nn.Module``: pass the EMA weights when EMA is on) as the
    LoggedModel ``name`` of the existing run ``run_id``; return MLflow's ``ModelInfo``
    (``model_uri`` is ``models:/<model_id>``).

    The logged model takes raw uint8 images [N, 28, 28] (module docstring). ``step``: the epoch
    the model is from (the final one); the run's metrics at that step are linked to the model, so
    the UI's model page shows its test accuracy. ``input_example``: a few uint8 images (default:
    two blank ones). ``validate``: let MLflow load the saved model and predict the example once
    before uploading (slower; off by default). The run's params become the model's params; its
    status is not touched.
    """
    import mlflow.pytorch  # noqa: F401  (the flavour's module, imported by save_model)
    import numpy as np
    from mlflow.models import Model

    from jobs import tracking

    uri = _uri_of(mlf_or_tracking_uri)
    mlf = tracking.client(uri) if isinstance(mlf_or_tracking_uri, str) else mlf_or_tracking_uri
    example = default_input_example() if input_example is None else np.asarray(input_example)
    if example.dtype != np.uint8 or example.shape[1:] != IMAGE_SHAPE or example.shape[0] < 2:
        raise ValueError(f"input_example must be uint8 images of shape [N>=2, 28, 28], not "
                         f"{example.dtype} {tuple(example.shape)}")
    wrapped = raw_image_model(model, mean, std)
    # The LoggedModel is made here, in the run's experiment: Model.log would put it in the
    # fluent API's current experiment (the Default one in a process that set none).
    run = mlf.get_run(run_id)
    logged = mlf.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                     tags={k: str(v) for k, v in (tags or {}).items()},
                                     params=dict(run.data.params))
    with tempfile.TemporaryDirectory(prefix="mnistjobs-model-") as tmp, _tracking_uri(uri):
        code = os.path.join(tmp, f"{PYFUNC_MODULE}.py")
        shutil.copyfile(os.path.abspath(__file__), code)
        return Model.log(artifact_path=None, name=name, flavor=_Flavor, flavor_name="pytorch", run_id=run_id,
                         model_id=logged.model_id, pytorch_model=wrapped, code_paths=[code],
                         signature=signature(), input_example=example, pip_requirements=pip_requirements(),
                         serialization_format="pt2", step=step, validate_serving_input=validate)


# ------------------------------------------------------------------------------ the pyfunc side

def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    """MLflow's pyfunc entry point (``loader_module``): ``path`` is the model's data folder."""
    import mlflow.pytorch

    device = (model_config or {}).get("device") or "cpu"
    return DigitPredictor(mlflow.pytorch._load_model(path, device=device), device)


class DigitPredictor:
    """The pyfunc model: predict(uint8 images [N, 28, 28]) -> DataFrame digit, probability."""

    def __init__(self, module, device: str = "cpu"):
        self.module = module
        self.device = device

    def get_raw_model(self):
        return self.module

    def predict(self, data, params: dict[str, Any] | None = None):
        import numpy as np
        import pandas as pd
        import torch

        if isinstance(data, pd.DataFrame):  # one image per row, 784 pixel columns
            data = data.to_numpy()
        images = np.asarray(data)
        if images.ndim == 2 and images.shape[1] == IMAGE_SHAPE[0] * IMAGE_SHAPE[1]:
            images = images.reshape(-1, *IMAGE_SHAPE)
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"expected images of shape [N, 28, 28] (or [N, 784]), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels 0-255, got {images.dtype}")
        with torch.no_grad():
            logp = self.module(torch.from_numpy(np.ascontiguousarray(images)).to(self.device)).cpu()
        best, digit = logp.max(dim=1)
        index = data.index if isinstance(data, pd.DataFrame) else None
        return pd.DataFrame({"digit": digit.numpy().astype("int64"),
                             "probability": best.exp().double().numpy()}, index=index)


# ------------------------------------------------------------------------------------ registry

def registered_name(model: str, prefix: str = REGISTERED_PREFIX) -> str:
    return f"{prefix}{model}"


def recipe_of(params: dict[str, str]) -> str:
    """The recipe a run trained with, from its params (contract.TRIAL_PARAMS order), one line."""
    from jobs.contract import TRIAL_PARAMS

    return ", ".join(f"{k}={params[k]}" for k in TRIAL_PARAMS if k in params and k not in _NOT_RECIPE)


def logged_model_id(mlf, run) -> str | None:
    """The id of the READY model ``run`` logged (the newest when several), or None. A LoggedModel
    left PENDING or FAILED by an upload that broke off does not count: the trial logs it again."""
    outputs = getattr(run, "outputs", None)
    ids = [o.model_id for o in (outputs.model_outputs if outputs and outputs.model_outputs else [])]
    found = [mlf.get_logged_model(i) for i in ids]
    if not found:
        found = mlf.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    ready = [m for m in found if str(getattr(m, "status", "READY")) == "READY"]
    if not ready:
        return None
    return max(ready, key=lambda m: m.creation_timestamp or 0).model_id


_logged_model_id = logged_model_id  # the name register_best's callers knew


def _final(run) -> float | None:
    value = run.data.metrics.get(FINAL_METRIC)
    return None if value is None else float(value)


def best_trials(runs) -> dict[str, Any]:
    """Per architecture (param ``model``), the FINISHED run with the highest final test accuracy
    (ties: the earlier run)."""
    best: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        model, final = run.data.params.get("model"), _final(run)
        if run.info.status != "FINISHED" or model is None or final is None:
            continue
        if model not in best or final > _final(best[model]):
            best[model] = run
    return best


def set_best_alias(mlf, name: str, alias: str = BEST_ALIAS):
    """Point ``alias`` at the version of ``name`` with the highest ``final_test_acc`` tag (ties:
    the older version); versions without the tag are not candidates. Returns that version."""
    versions = [v for v in _all_versions(mlf, name) if _float(v.tags.get(TAG_FINAL)) is not None]
    if not versions:
        return None
    top = max(versions, key=lambda v: (_float(v.tags[TAG_FINAL]), -int(v.version)))
    mlf.set_registered_model_alias(name, alias, top.version)
    return top


def _all_versions(mlf, name: str) -> list:
    from jobs.mlflow_runs import quote
    from mlflow.utils import get_results_from_paginated_fn

    def page(max_results, token):
        return mlf.search_model_versions(f"name = {quote(name)}", max_results=max_results, page_token=token)

    return get_results_from_paginated_fn(page, 1000)


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def register_best(mlf_or_tracking_uri, experiment_id: str | None = None, *, job_id: str | None = None,
                  runs=None, prefix: str = REGISTERED_PREFIX, alias: str = BEST_ALIAS,
                  log=None) -> list[dict[str, Any]]:
    """Register, for each architecture, the best finished trial run as a new version of
    ``<prefix><model>`` and point ``alias`` at that model's best version; return one dict per
    registered model (model, name, version, run_id, model_id, final_test_acc, best_version,
    best_final_test_acc).

    The candidates: ``runs`` (mlflow Run objects) when given, else the trial runs of
    ``experiment_id`` (those of ``job_id`` only, when given). A run that logged no model (see
    :func:`log_trial_model`) is skipped (``log`` says so). The version's tags: job id, run id,
    final test accuracy (the run's last ``test_acc``), the recipe, the model.
    """
    from jobs import tracking
    from jobs.contract import ROLE_TRIAL, TAG_JOB as RUN_TAG_JOB, TAG_ROLE
    from jobs.mlflow_runs import job_filter, quote, search_all
    from mlflow.exceptions import MlflowException

    mlf = tracking.client(mlf_or_tracking_uri) if isinstance(mlf_or_tracking_uri, str) else mlf_or_tracking_uri
    log = log or (lambda msg: None)
    if runs is None:
        if experiment_id is None:
            raise ValueError("register_best needs experiment_id or runs")
        flt = job_filter(job_id, ROLE_TRIAL) if job_id else f"tags.`{TAG_ROLE}` = {quote(ROLE_TRIAL)}"
        runs = search_all(mlf, [experiment_id], flt + " and attributes.status = 'FINISHED'")
    results = []
    candidates = sorted(runs, key=lambda r: (r.info.start_time or 0))
    for model in sorted({r.data.params.get("model") for r in candidates} - {None}):
        ranked = sorted((r for r in candidates if r.data.params.get("model") == model
                         and r.info.status == "FINISHED" and _final(r) is not None),
                        key=lambda r: -_final(r))  # stable: ties keep the earlier run first
        chosen = model_id = None
        for run in ranked:
            model_id = _logged_model_id(mlf, run)
            if model_id is not None:
                chosen = run
                break
            log(f"{run.info.run_name} ({run.info.run_id}): no logged model, not registered")
        if chosen is None:
            continue
        name = registered_name(model, prefix)
        try:
            mlf.create_registered_model(name, description=f"mnistjobs {model}: the best trial of each "
                                                          f"sweep; alias '{alias}': the best of them")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        final = _final(chosen)
        tags = {TAG_JOB: chosen.data.tags.get(RUN_TAG_JOB, ""), TAG_RUN: chosen.info.run_id,
                TAG_FINAL: f"{final:.4f}", TAG_RECIPE: recipe_of(chosen.data.params), TAG_MODEL: model}
        version = mlf.create_model_version(name, source=f"models:/{model_id}", run_id=chosen.info.run_id,
                                           tags=tags, model_id=model_id, await_creation_for=0)
        _wait_ready(mlf, name, version)
        top = set_best_alias(mlf, name, alias)
        results.append({"model": model, "name": name, "version": version.version, "run_id": chosen.info.run_id,
                        "model_id": model_id, "final_test_acc": final,
                        "best_version": top.version if top else None,
                        "best_final_test_acc": _float(top.tags.get(TAG_FINAL)) if top else None})
    return results


def _wait_ready(mlf, name: str, version, timeout: float = 60.0) -> None:
    """create_model_version (asked not to wait, which would log a line of its own) returns once
    READY on MLflow's own stores; poll anyway for others."""
    deadline = time.monotonic() + timeout
    while getattr(version, "status", "READY") not in ("READY", "FAILED_REGISTRATION") \
            and time.monotonic() < deadline:
        time.sleep(0.2)
        version = mlf.get_model_version(name, version.version)
