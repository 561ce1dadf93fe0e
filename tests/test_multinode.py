"""Multi-node on one machine: a Ray head and a second Ray node (`ray start --address`, its own
CPU and a custom resource), one MLflow server, one sweep of 4 trials over both nodes.

Tune's storage is a folder both nodes reach (on one machine, any local folder). Ray 2.60 checks
that before a trial on another node saves a checkpoint (a marker file the driver writes in the
experiment folder) and fails the trial when the folder is the head's own disk; on a real
cluster use s3://... or a shared mount (MNISTJOBS_STORAGE_PATH on the head, or the spec's
storage_path). MLflow needs no shared disk: runs, metrics and artifacts go over HTTP.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from _faults_helpers import (EPOCH_METRICS, job_id_of, job_logs, mlflow, run_cli, service_set, steps, trial_runs,
                             wait_for)
from jobs.contract import CHECKPOINT_DIR, CHECKPOINT_FILES, LAYERS_ARTIFACT, PLOT_FILES, PLOTS_DIR, TAG_NODE

WORKER_RESOURCE = "mnistjobs_worker_b"
ARTIFACTS = {LAYERS_ARTIFACT, *(f"{CHECKPOINT_DIR}/{n}" for n in CHECKPOINT_FILES),
             *(f"{PLOTS_DIR}/{n}" for n in PLOT_FILES)}


def test_storage_path_settings(tmp_path, monkeypatch):
    """Tune's storage: the spec's storage_path > $MNISTJOBS_STORAGE_PATH > <home>/ray_results;
    URIs pass through to Tune untouched (no local folder named "s3:")."""
    from jobs.sweep import default_storage_path, resolve_storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNISTJOBS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MNISTJOBS_STORAGE_PATH", raising=False)
    assert default_storage_path() == str(tmp_path / "home" / "ray_results")
    assert resolve_storage() == str(tmp_path / "home" / "ray_results") and (tmp_path / "home" / "ray_results").is_dir()
    monkeypatch.setenv("MNISTJOBS_STORAGE_PATH", "s3://bucket/mnistjobs/")
    assert default_storage_path() == "s3://bucket/mnistjobs/"
    assert resolve_storage() == "s3://bucket/mnistjobs"
    assert resolve_storage("gs://other/x") == "gs://other/x"
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()
    assert resolve_storage("shared/results") == str(tmp_path / "shared" / "results")
    assert (tmp_path / "shared" / "results").is_dir()


def _nodes(rec) -> list[dict]:
    req = urllib.request.Request(f"{rec.dashboard_url}/api/v0/nodes?limit=100&detail=1", headers=rec.headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.load(r)
    return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def _start_worker_node(rec, *, num_cpus: int, resources: dict) -> Path:
    """`ray start --address HEAD` with the head's token; it carries the service id, so `down`
    stops it with the rest of the set. Returns its temp dir."""
    from jobs import services
    from jobs.state import ray_auth_env

    home = Path(rec.home)
    temp = Path(tempfile.mkdtemp(prefix="mnj-w-", dir="/tmp"))
    env = {**os.environ, **ray_auth_env(home), services.SERVICE_ID_VAR: rec.service_id,
           "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray), "start", "--address", rec.ray_address, "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--num-gpus", "0", "--resources", json.dumps(resources),
           "--object-store-memory", str(services.OBJECT_STORE_MEMORY), "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(services.free_port()), "--temp-dir", str(temp)]
    done = subprocess.run(cmd, env=env, cwd=home, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return temp


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    with service_set(base / "home", num_cpus=1) as rec:
        temp = None
        try:
            temp = _start_worker_node(rec, num_cpus=1, resources={WORKER_RESOURCE: 1})
            nodes = wait_for(lambda: len(n := _nodes(rec)) == 2 and n, 120, 1.0, what="the second node to join")
            yield rec, nodes, base
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)  # its processes stop with the set (service id)


@pytest.mark.slow
def test_sweep_runs_on_both_nodes(two_nodes, tmp_path):
    from synthetic import make_synthetic_mnist
    from mnistnets.train import load_checkpoint

    rec, nodes, base = two_nodes
    head = next(n for n in nodes if n["is_head_node"])
    worker = next(n for n in nodes if not n["is_head_node"])
    assert worker["resources_total"].get(WORKER_RESOURCE) == 1 and head["resources_total"].get("CPU") == 1
    data = make_synthetic_mnist(base / "data", n_train=512, n_test=128, seed=0)
    storage = base / "shared-storage"  # one folder that both nodes reach
    sweep = tmp_path / "sweep.yaml"
    # A fresh worker process for each trial: with Tune's actor reuse (the default) a short trial that
    # waits for the other node's worker to start is handed to the head's worker as soon as that is
    # free, and on a loaded machine all four may run there (Ray runs workers at nice 15).
    sweep.write_text(f"models: [v0, v2]\nseeds: 2\nepochs: 2\nbatch_size: 32\ntrain_limit: 512\ntest_limit: 128\n"
                     f"schedules: [cosine]\nstorage_path: {storage}\nexperiment: multinode\nreuse_workers: false\n")

    start = time.monotonic()
    result = run_cli(["submit", "--config", sweep, "--data-dir", data, "--wait"], home=rec.home)
    wall = time.monotonic() - start
    job = job_id_of(result.output)
    assert result.exit_code == 0, result.output + job_logs(rec, job)[-3000:]

    mlf = mlflow(rec)
    runs = trial_runs(mlf, job)
    assert sorted(runs) == ["v0-cosine-s1", "v0-cosine-s2", "v2-cosine-s1", "v2-cosine-s2"]
    per_node: dict[str, list[str]] = {}
    points = files = 0
    for name, run in runs.items():
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        node_tag = run.data.tags[TAG_NODE]  # "<ip>/<Ray node id prefix>"
        matches = [n["node_id"] for n in nodes if n["node_id"].startswith(node_tag.split("/")[-1])]
        assert len(matches) == 1, (node_tag, [n["node_id"] for n in nodes])
        per_node.setdefault(matches[0], []).append(name)
        for key in EPOCH_METRICS:
            assert steps(mlf, rid, key) == [1, 2], (name, key)
            points += 2
        # Artifacts live behind the server (mlflow-artifacts:/), uploaded and read over HTTP.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        found = {a.path for d in {p.rsplit("/", 1)[0] for p in ARTIFACTS} for a in mlf.list_artifacts(rid, d)}
        assert found >= ARTIFACTS, found
        files += len(found)
        last_pt = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILES[0]}"
        assert load_checkpoint(mlf.download_artifacts(rid, last_pt, str(tmp_path / name)))["epoch"] == 2
    assert set(per_node) == {head["node_id"], worker["node_id"]}, (  # both nodes ran trials
        f"head {head['node_id']}: {per_node}\n" + job_logs(rec, job)[-6000:])
    assert rec.mlflow_url.startswith("http://")
    # The queue's admitter had a trial worker started ahead of the job on each node (one CPU each).
    req = urllib.request.Request(f"{rec.dashboard_url}/api/jobs/{job}", headers=rec.headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["runtime_env"]["env_vars"]["MNISTJOBS_PRESTARTED"] == "2"

    # Tune's storage across the nodes: every trial's checkpoints in the one folder.
    trial_dirs = sorted((storage / job).glob("*-cosine-s*_*"))
    assert len(trial_dirs) == 4 and all(len(list(d.glob("checkpoint_*"))) == 2 for d in trial_dirs), trial_dirs
    print(f"\n  FIGURE 4 trials over 2 Ray nodes on one machine: head {head['node_id'][:8]} ran "
          f"{sorted(per_node[head['node_id']])}, worker {worker['node_id'][:8]} ({WORKER_RESOURCE}) ran "
          f"{sorted(per_node[worker['node_id']])}; {points} metric points and {files} artifacts reached MLflow over "
          f"HTTP; 8 Tune checkpoints in one storage folder; sweep {wall:.0f} s", flush=True)
