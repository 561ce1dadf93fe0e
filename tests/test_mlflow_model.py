"""jobs.mlflow_model: a trial's model logged to MLflow (pt2, raw uint8 images in, log-probabilities
out; pyfunc -> digit/probability), and the registry (best trial per architecture, alias `best`).

The fast tests use a real MLflow SQLite store in a temp folder (no server). The slow ones use the
session's embedded MLflow server (``embedded``) and load the registered model from a fresh Python
process in which this project cannot be imported: what a user of the registry has.

The registry tests register under their own prefix (``mmtest-<model>``, a parameter of
register_best), so sweeps elsewhere in the session that register ``mnistjobs-<model>`` on the shared
server never move the alias these tests check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs import mlflow_model as mm
from jobs.contract import ROLE_TRIAL, TAG_JOB, TAG_ROLE
from mnistnets import create_model
from mnistnets.data import MNIST_MEAN, MNIST_STD

PREFIX = "mmtest-"


def normalised(images: torch.Tensor) -> torch.Tensor:
    """What mnistnets trains on: (x/255 - mean)/std, [N, 1, 28, 28]."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def trained_v2(data, steps: int = 48, seed: int = 0) -> torch.nn.Module:
    """v2 after a few Adam steps on the synthetic digits (48 steps: ~89% of the first 64 test
    images): decisive outputs, so argmax is stable."""
    torch.manual_seed(seed)
    net = create_model("v2")
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    x, y = data.train_images, data.train_labels
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        opt.zero_grad()
        torch.nn.functional.nll_loss(net(normalised(x[i])), y[i]).backward()
        opt.step()
    return net.eval()


def make_trial_run(mlf, experiment_id, *, model="v2", job="raysubmit_a", final=98.0, status="FINISHED",
                   epochs=2, start=None):
    """A trial run under the contract's names, with test_acc per epoch ending at ``final``."""
    from mlflow.entities import Metric, Param

    run = mlf.create_run(experiment_id, run_name=f"{model}-cosine-s1", start_time=start,
                         tags={TAG_JOB: job, TAG_ROLE: ROLE_TRIAL})
    rid = run.info.run_id
    metrics = [Metric("test_acc", final - (epochs - e), 1_700_000_000_000 + e, e) for e in range(1, epochs + 1)]
    params = {"model": model, "params": 1234, "schedule": "cosine", "optimizer": "sgd", "lr": 0.1,
              "batch_size": 32, "epochs": epochs, "seed": 1, "device": "cpu"}
    mlf.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow SQLite store with its artifacts in a temp folder (cwd there too: nothing may
    land in ./mlruns)."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow_model_store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlf = MlflowClient(uri)
    exp = mlf.create_experiment("mm", artifact_location=str(tmp / "artifacts"))
    return mlf, exp, tmp


# ------------------------------------------------------------------------------------- fast


def test_raw_image_model_normalises_like_training(synthetic_data):
    net = trained_v2(synthetic_data, steps=4)
    images = synthetic_data.test_images[:16]
    assert images.dtype == torch.uint8
    wrapped = mm.raw_image_model(net)
    with torch.no_grad():
        want = net(normalised(images))
        got = wrapped(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (16, 10)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(16))  # log-probabilities
    assert next(net.parameters()) is not next(wrapped.parameters())  # a copy: net left as it was


def test_digit_predictor_frame_and_bad_input(synthetic_data):
    net = trained_v2(synthetic_data, steps=4)
    predictor = mm.DigitPredictor(mm.raw_image_model(net))
    images = synthetic_data.test_images[:8].numpy()
    out = predictor.predict(images)
    assert list(out.columns) == ["digit", "probability"] and len(out) == 8
    assert out["digit"].dtype == np.int64 and out["probability"].dtype == np.float64
    with torch.no_grad():
        logp = net(normalised(torch.from_numpy(images)))
    assert list(out["digit"]) == logp.argmax(1).tolist()
    np.testing.assert_allclose(out["probability"], logp.max(1).values.exp().numpy(), rtol=1e-5)
    flat = predictor.predict(pd.DataFrame(images.reshape(8, 784)))
    assert list(flat["digit"]) == list(out["digit"])
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        predictor.predict(images[:, :14])


def test_requirements_are_explicit_and_pinned():
    reqs = mm.pip_requirements()
    assert [r.split("==")[0] for r in reqs] == ["mlflow", "torch", "numpy", "pandas"]
    assert all("==" in r and "+" not in r for r in reqs)


def test_shipped_pyfunc_module_imports_only_the_standard_library():
    """The file is copied into each model as mnistjobs_pyfunc: importing it must not need jobs,
    mnistnets, torch or mlflow (they are imported when a model loads)."""
    code = (f"import sys; sys.modules.update(jobs=None, mnistnets=None, torch=None, mlflow=None); "
            f"import importlib.util as u; s = u.spec_from_file_location('mnistjobs_pyfunc', {mm.__file__!r}); "
            f"m = u.module_from_spec(s); s.loader.exec_module(m); print(m.PYFUNC_MODULE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mm.PYFUNC_MODULE


def test_log_trial_model_into_an_existing_run(store, synthetic_data, monkeypatch):
    mlf, exp, tmp = store
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # must be put back as it was
    rid = make_trial_run(mlf, exp, final=97.5)
    net = trained_v2(synthetic_data, steps=4)
    info = mm.log_trial_model(mlf, rid, net, step=2, input_example=synthetic_data.test_images[:3].numpy(),
                              tags={"mnistjobs.job_id": "raysubmit_a"})
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    assert not (tmp / "mlruns").exists()
    run = mlf.get_run(rid)
    assert run.info.status == "RUNNING"  # logging the model does not end the run
    assert [o.model_id for o in run.outputs.model_outputs] == [info.model_id]
    logged = mlf.get_logged_model(info.model_id)
    assert logged.experiment_id == exp and logged.source_run_id == rid and logged.name == mm.MODEL_NAME
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert logged.params["model"] == "v2" and logged.tags["mnistjobs.job_id"] == "raysubmit_a"
    assert {(m.key, m.step, m.value) for m in logged.metrics} == {("test_acc", 2, 97.5)}
    assert mm.best_trials([run]) == {}  # still RUNNING: not a candidate
    # the signature says what goes in and out
    sig = info.signature
    spec = sig.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 28, 28)
    assert sig.outputs.input_names() == ["digit", "probability"]
    with pytest.raises(ValueError, match="uint8 images"):
        mm.log_trial_model(mlf, rid, net, input_example=np.zeros((2, 28, 28), np.float32))
    mlf.set_terminated(rid)


def test_register_best_per_architecture_and_alias(store, synthetic_data, monkeypatch):
    """Two jobs: each registers its best finished trial per model; `best` follows the highest final
    test accuracy among all versions (not the newest); runs with no model or not finished are
    skipped."""
    mlf, exp, tmp = store
    monkeypatch.chdir(tmp)
    net = trained_v2(synthetic_data, steps=2)
    v0 = create_model("v0").eval()
    # job A: v2 at 98.0 (best of A) and 97.0; v0 at 96.0; a v2 at 99.9 that FAILED; a v2 at 99.5
    # FINISHED without a logged model
    a = {name: make_trial_run(mlf, exp, job="raysubmit_a", model=model, final=final, start=1000 + i)
         for i, (name, model, final) in enumerate([("v2_best", "v2", 98.0), ("v2_low", "v2", 97.0),
                                                   ("v0", "v0", 96.0), ("v2_failed", "v2", 99.9),
                                                   ("v2_nomodel", "v2", 99.5)])}
    for name in ("v2_best", "v2_low", "v2_failed"):
        mm.log_trial_model(mlf, a[name], net, step=2)
    mm.log_trial_model(mlf, a["v0"], v0, step=2)
    for name, rid in a.items():
        mlf.set_terminated(rid, status="FAILED" if name == "v2_failed" else "FINISHED")
    said = []
    got = {r["model"]: r for r in mm.register_best(mlf, exp, job_id="raysubmit_a", prefix=PREFIX,
                                                   log=said.append)}
    assert sorted(got) == ["v0", "v2"]
    assert got["v2"]["run_id"] == a["v2_best"] and got["v2"]["final_test_acc"] == 98.0
    assert got["v0"]["run_id"] == a["v0"]
    assert any(a["v2_nomodel"] in line and "no logged model" in line for line in said)
    version = mlf.get_model_version(f"{PREFIX}v2", got["v2"]["version"])
    assert version.run_id == a["v2_best"] and version.source == f"models:/{got['v2']['model_id']}"
    assert version.tags[mm.TAG_JOB] == "raysubmit_a" and version.tags[mm.TAG_RUN] == a["v2_best"]
    assert float(version.tags[mm.TAG_FINAL]) == 98.0
    assert "schedule=cosine" in version.tags[mm.TAG_RECIPE] and "model=" not in version.tags[mm.TAG_RECIPE]
    assert mlf.get_model_version_by_alias(f"{PREFIX}v2", "best").version == version.version

    # job B: v2 at 99.0 beats A's 98.0 -> new version, alias moves
    b = make_trial_run(mlf, exp, job="raysubmit_b", final=99.0)
    mm.log_trial_model(mlf, b, net, step=2)
    mlf.set_terminated(b)
    (rb,) = mm.register_best(mlf, exp, job_id="raysubmit_b", prefix=PREFIX)
    assert int(rb["version"]) == int(version.version) + 1 and rb["best_version"] == rb["version"]
    # job C: v2 at 97.5 -> registered too, but the alias stays on B's version
    c = make_trial_run(mlf, exp, job="raysubmit_c", final=97.5)
    mm.log_trial_model(mlf, c, net, step=2)
    mlf.set_terminated(c)
    (rc,) = mm.register_best(mlf, exp, job_id="raysubmit_c", prefix=PREFIX)
    assert int(rc["version"]) == int(rb["version"]) + 1
    assert rc["best_version"] == rb["version"] and rc["best_final_test_acc"] == 99.0
    assert mlf.get_model_version_by_alias(f"{PREFIX}v2", "best").version == rb["version"]
    assert mlf.get_model_version_by_alias(f"{PREFIX}v0", "best").version == got["v0"]["version"]
    # a job with nothing to register registers nothing
    assert mm.register_best(mlf, exp, job_id="raysubmit_none", prefix=PREFIX) == []


# -------------------------------------------------------------------- real server, fresh process

FRESH = textwrap.dedent("""
    import json, sys
    sys.modules.update(jobs=None, mnistnets=None)   # a user's process: no mnistjobs to import
    import numpy as np, torch, mlflow
    uri, images_path = sys.argv[1], sys.argv[2]
    images = np.load(images_path)
    net = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        logp = net(torch.from_numpy(images))
    frame = mlflow.pyfunc.load_model(uri).predict(images)
    print(json.dumps({"shape": list(logp.shape), "dtype": str(logp.dtype),
                      "argmax": logp.argmax(1).tolist(), "sum_p": logp.exp().sum(1).tolist(),
                      "columns": list(frame.columns), "rows": len(frame),
                      "digit": frame["digit"].tolist(), "probability": frame["probability"].tolist()}))
""")


@pytest.fixture(scope="module")
def registered(embedded, synthetic_data):
    """A briefly trained v2 logged into a trial run on the real server and registered: (the
    register_best result, the torch model)."""
    import time

    from _service_helpers import mlflow_client

    mlf = mlflow_client(embedded)
    exp = mlf.create_experiment("mlflow-model-fresh")
    rid = make_trial_run(mlf, exp, job="raysubmit_fresh", final=99.0)
    net = trained_v2(synthetic_data)
    t0 = time.perf_counter()
    info = mm.log_trial_model(mlf, rid, net, step=2, input_example=synthetic_data.test_images[:4].numpy())
    print(f"\nlog_trial_model (v2, embedded server): {time.perf_counter() - t0:.2f} s")
    mlf.set_terminated(rid)
    (reg,) = mm.register_best(mlf, exp, job_id="raysubmit_fresh", prefix=PREFIX)
    assert reg["model_id"] == info.model_id and reg["best_version"] == reg["version"]
    return reg, net


def user_env(embedded) -> dict[str, str]:
    """A user's shell after `eval "$(mnistjobs env)"`: the tracking URI and the server's login."""
    from jobs.record import mlflow_credentials_for

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = embedded.mlflow_url
    env.update(mlflow_credentials_for(embedded.mlflow_url, embedded.home) or {})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # an activated venv
    return env


@pytest.mark.slow
def test_registered_model_loads_in_a_fresh_process(embedded, registered, synthetic_data, tmp_path):
    """models:/<name>@best from a fresh process (no mnistjobs importable) with mlflow.pytorch and
    mlflow.pyfunc: log-probabilities, and digit/probability rows that match the torch model."""
    reg, net = registered
    images = synthetic_data.test_images[:64].numpy()
    np.save(tmp_path / "images.npy", images)
    out = subprocess.run([sys.executable, "-c", FRESH, f"models:/{reg['name']}@best", str(tmp_path / "images.npy")],
                         capture_output=True, text=True, env=user_env(embedded), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        want = net(normalised(torch.from_numpy(images)))
    assert got["shape"] == [64, 10] and got["dtype"] == "torch.float32"
    assert got["argmax"] == want.argmax(1).tolist()
    np.testing.assert_allclose(got["sum_p"], np.ones(64), rtol=1e-5)
    assert got["columns"] == ["digit", "probability"] and got["rows"] == 64
    assert got["digit"] == want.argmax(1).tolist()
    np.testing.assert_allclose(got["probability"], want.max(1).values.exp().numpy(), rtol=1e-4)
    # the briefly trained model does learn the synthetic digits: the checks above are not vacuous
    assert (np.array(got["digit"]) == synthetic_data.test_labels[:64].numpy()).mean() > 0.6  # chance: 0.1
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(embedded, registered, synthetic_data, tmp_path):
    """`mlflow models serve -m models:/<name>@best --env-manager local` (MLflow's own server
    process) answers POST /invocations with the same digits as the torch model."""
    import socket
    import urllib.request

    from _service_helpers import wait_for
    from jobs import procs

    reg, net = registered
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{reg['name']}@best", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=user_env(embedded), cwd=tmp_path,
                            start_new_session=True)
    try:
        def ping():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ping, timeout=180, what="mlflow models serve to answer /ping")
        images = synthetic_data.test_images[:16].numpy()
        body = json.dumps({"inputs": images.tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
    finally:
        procs.terminate(procs.descendants(proc.pid) | {proc.pid}, grace=5.0)
        log.close()
    with torch.no_grad():
        want = net(normalised(torch.from_numpy(images))).argmax(1).tolist()
    assert [p["digit"] for p in predictions] == want
    assert all(0.0 < p["probability"] <= 1.0 for p in predictions)
